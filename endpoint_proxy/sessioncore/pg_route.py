"""readwrite (PostgreSQL): which backend a request goes to, decided on its first flush unit.

Rules of this file: a request (everything up to its Sync, or one Query/FunctionCall) goes
to one backend. The decision is taken on the request's first *flush unit*: its messages up
to the first Flush, Sync, Query or FunctionCall — a client cannot wait for an answer before
sending one of those, so holding them costs no round trip, and the decision does not depend
on how the network cut the bytes. Any write in the unit sends it to the writer; a unit of
reads goes to a replica; transaction control alone (COMMIT, ROLLBACK, an empty query) stays
where the session is. Inside a transaction, or when the session is pinned, everything stays on
the writer.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..routing.dialect import PgDialect
from ..routing.pg_classify import FunctionPolicy, Route, classify
from .actions import READER, WRITER
from .pg_emulate import parse_query, query_text

_Q, _P, _B, _F, _S, _H = (ord(c) for c in "QPBFSH")
UNIT_ENDS = frozenset((_Q, _S, _F, _H))
STAY = ""  # the unit decides nothing: keep the current backend


class PgReadWriteDecider:
    """Per-session memory of the decisions: roles of named statements and SQL PREPAREs."""

    __slots__ = ("statement_roles", "prepared_routes")

    def __init__(self) -> None:
        self.statement_roles: dict[bytes, str] = {}  # protocol-level statement name -> role of its query
        self.prepared_routes: dict[str, Route] = {}  # SQL-level PREPARE name -> its route

    def decide(self, unit: Sequence[tuple[int, bytes, int]], functions: FunctionPolicy,
               dialect: PgDialect) -> str:
        """The role of a flush unit: WRITER, READER or STAY."""
        decided = STAY
        for type_, payload, _end in unit:
            role = self._role(type_, payload, functions, dialect)
            if role == WRITER:
                return WRITER
            if role == READER:
                decided = READER
        return decided

    def _role(self, type_: int, payload: bytes, functions: FunctionPolicy, dialect: PgDialect) -> str:
        if type_ == _Q:
            c = classify(query_text(payload), functions, self.prepared_routes, dialect=dialect)
            if c.session_state == "prepare" and c.prepared_name:
                self.prepared_routes[c.prepared_name] = c.route
            if c.route is Route.READ and c.reason.startswith(("transaction", "empty")) and c.hint is None:
                return STAY
            return READER if c.route is Route.READ and c.transaction != "begin" else WRITER
        if type_ == _P:
            name = payload[: payload.find(b"\0")]
            c = classify(parse_query(payload), functions, self.prepared_routes, dialect=dialect)
            role = READER if c.route is Route.READ and c.transaction != "begin" else WRITER
            self.statement_roles[name] = role
            return role
        if type_ == _B:
            _portal, _, rest = payload.partition(b"\0")
            return self.statement_roles.get(rest[: rest.find(b"\0")], WRITER)
        if type_ == _F:
            return WRITER
        return STAY

    def forget(self, name: bytes) -> None:
        self.statement_roles.pop(name, None)
