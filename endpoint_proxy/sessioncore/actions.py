"""What a session core asks its shell to do, and the facts the shell reports back.

The shell runs actions in order. ``ToClient``/``ToServer`` are sends; the others name a step
that needs I/O or waiting (open or reuse a backend, ask the monitor for a verdict, wait for a
replica to catch up) and end with the shell calling the matching method of the core
(``attached``/``attach_failed``, ``verdict``, ``caught_up``).
"""

from __future__ import annotations

from dataclasses import dataclass

# What feeding bytes returns: FORWARD = send exactly what was fed to the other side, nothing
# else to do (the hot path); ATTEND = take the queued actions with ``next_action()``;
# FORWARD_FIRST = send exactly what was fed to the other side, then take the queued actions
# (a transaction's last answer, then its connection goes back to the pool).
FORWARD = 0
ATTEND = 1
FORWARD_FIRST = 2

# Backend roles. A readwrite session has a writer and a reader backend; every other
# endpoint kind has one, under its own routing rule.
MAIN = "main"
WRITER = "writer"
READER = "reader"


@dataclass(slots=True)
class ToClient:
    data: bytes


@dataclass(slots=True)
class ToServer:
    data: bytes


@dataclass(slots=True)
class Attach:
    """Make a backend of ``role`` the active one: reuse the parked one if it is still good,
    else route and open one (waiting up to the failover timeout for an eligible instance,
    skipping ``exclude``), bring it up to the session's state, then call ``attached`` — or
    ``attach_failed`` when none can be had."""

    role: str
    reason: str
    exclude: frozenset[str] = frozenset()


@dataclass(slots=True)
class Detach:
    """Let go of the active backend (``park``: keep it idle for a later switch back)."""

    park: bool = False


@dataclass(slots=True)
class Lost:
    """The active backend is gone (closed, reset, or it sent a FATAL error). Close it, ask the
    monitor whether its instance is still up in the same role, and report with ``verdict``."""

    instance: str


@dataclass(slots=True)
class WaitGate:
    """A switchover holds new writer work: wait until the writer gate opens, then call
    ``gate_opened`` (the request waits, held, meanwhile)."""


@dataclass(slots=True)
class CatchUp:
    """Session consistency: wait (bounded) until the reader has replayed what this session
    wrote on the writer; report with ``caught_up``."""


@dataclass(slots=True)
class Release:
    """Pooled: give the active backend back to its pool, after sending it ``cleanup`` (our own
    requests, e.g. closing prepared statements past the limit, answered by ``expected_ready``
    ReadyForQuery messages)."""

    cleanup: bytes = b""
    expected_ready: int = 0


@dataclass(slots=True)
class PrepareStatements:
    """Pooled: prepare ``statements`` (server name, Parse body) on the active backend before the
    held request goes on; report with ``prepared``."""

    statements: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Close:
    """End the session (after the sends queued before this)."""


Action = ToClient | ToServer | Attach | Detach | Lost | CatchUp | WaitGate | Close | Release | PrepareStatements


@dataclass(frozen=True, slots=True)
class BackendFacts:
    """What the shell reports about a backend it attached."""

    instance: str
    in_recovery: bool  # a replica when it was opened (the route label of its requests)
    status: str = "I"  # PostgreSQL: transaction status I/T/E; MySQL: "I" or "T"
    parameters: tuple[tuple[str, str], ...] = ()  # PostgreSQL ParameterStatus values


@dataclass(frozen=True, slots=True)
class AttachError:
    """Why no backend could be had: ``kind`` is ``no_route`` (nothing eligible in time),
    ``refused`` (the server said no; ``raw`` is its error, verbatim, when it sent one) or
    ``failed`` (network or protocol failure)."""

    kind: str
    code: str  # SQLSTATE (PostgreSQL) or errno as text (MySQL)
    message: str
    raw: bytes | None = None
