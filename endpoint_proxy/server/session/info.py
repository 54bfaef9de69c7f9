"""One client session as the admin plane lists it (SHOW SESSIONS)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionInfo:
    """One client session, as SHOW SESSIONS lists it."""

    cluster: str
    endpoint: str
    id: int
    user: str | None  # None before the client has logged in
    database: str | None
    instance: str | None  # the instance of its current backend, None while it has none
    state: str  # see ``session_state``
    client: str | None = None  # "host:port" of the client, when known
    pinned: str | None = None  # why the session is tied to its server (e.g. "LISTEN"), None when it is not


def session_state(*, logged_in: bool, busy: bool, transaction: str) -> str:
    """The ``state`` column, in pg_stat_activity's words: ``startup`` before login, ``active``
    while a request is in flight, else by the transaction status of the last ReadyForQuery
    (``I``/``T``/``E``): ``idle``, ``idle in transaction``, ``idle in transaction (aborted)``."""
    if not logged_in:
        return "startup"
    if busy:
        return "active"
    return {"T": "idle in transaction", "E": "idle in transaction (aborted)"}.get(transaction, "idle")
