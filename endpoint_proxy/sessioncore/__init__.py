"""The client session's decisions, sans-IO: fed events (bytes, backend facts, verdicts), returning actions.

Rules of this package: no trio, no sockets, no clock, no logging. A session core never
sees a socket; the trio shell (server/pg/session.py, server/mysql/session.py) moves bytes
and runs the actions these objects return. Everything here is unit-tested with tables and
with a simulator that re-chunks traffic at every byte boundary.
"""
