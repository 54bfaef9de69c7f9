"""Client connection limits at login: per endpoint, per user of a cluster, and in total (one process).

The proxy makes one ``Admission`` per process (``[server] max_client_connections``) and hands
each new client connection a ``Ticket``, not counted yet. The login admits it:

    refusal = ticket.admit(ctx.endpoint)    # the endpoint's and the process's limits
        # PostgreSQL: after the StartupMessage (an SSLRequest got its answer first, a
        # CancelRequest and the admin console are never counted); MySQL: before the greeting
    refusal = ticket.admit_user(user)       # the user's max_connections, after authentication
    ...
    ticket.release()                        # the session ended (idempotent; the shell's _close)

A refusal carries the protocol's error (PostgreSQL FATAL 53300, as PostgreSQL's "too many
connections for role" and PgBouncer's max_client_conn; MySQL ERR 1040 "Too many connections"
for the endpoint and process limits, and 1203 for a user's, as MySQL's max_user_connections).
The limits are read at each admission, so a reload's new values apply to the next logins;
sessions already in are never closed by a lower limit.

Rules of this file: no I/O and no clock; counts are exact (a ticket counts at most once in each
of its scopes, and release undoes exactly what it counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

from ..config import EndpointConfig, UserConfig

# PostgreSQL's too_many_connections; MySQL's ER_CON_COUNT_ERROR and ER_TOO_MANY_USER_CONNECTIONS.
PG_TOO_MANY: Final = "53300"
MY_CON_COUNT: Final = (1040, "08004")
MY_USER_CONNECTIONS: Final = (1203, "42000")


@dataclass(frozen=True)
class Refusal:
    """A login over a limit: which one (``scope``: "server", "endpoint" or "user") and what to say."""

    scope: str
    limit: int
    name: str  # the endpoint or user name ("" for the process)

    @property
    def pg_message(self) -> str:
        """The message of the FATAL 53300 a PostgreSQL client gets."""
        if self.scope == "user":
            return f'too many connections for role "{self.name}" (max_connections = {self.limit})'
        if self.scope == "endpoint":
            return f'too many connections to endpoint "{self.name}" (max_client_connections = {self.limit})'
        return f"too many connections to the proxy (server.max_client_connections = {self.limit})"

    @property
    def mysql_error(self) -> tuple[int, str, str]:
        """(errno, SQLSTATE, message) of the ERR packet a MySQL client gets."""
        if self.scope == "user":
            errno, sqlstate = MY_USER_CONNECTIONS
            return errno, sqlstate, f"User {self.name} already has more than 'max_user_connections' active connections"
        errno, sqlstate = MY_CON_COUNT
        return errno, sqlstate, "Too many connections"


class Ticket:
    """One client connection's places in the counts."""

    __slots__ = ("_admission", "cluster", "endpoint", "user")

    def __init__(self, admission: Admission, cluster: str) -> None:
        self._admission = admission
        self.cluster = cluster
        self.endpoint: str | None = None  # the endpoint counted (None: not admitted yet, or released)
        self.user: str | None = None  # the user counted

    @property
    def admitted(self) -> bool:
        return self.endpoint is not None

    def admit(self, endpoint: EndpointConfig) -> Refusal | None:
        """Count the connection on its endpoint and in the process, or say which limit is full.
        Once admitted, later calls change nothing."""
        if self.endpoint is not None:
            return None
        a = self._admission
        if a.max_total and a.total >= a.max_total:
            return Refusal("server", a.max_total, "")
        key = (self.cluster, endpoint.name)
        if endpoint.max_client_connections and a.per_endpoint[key] >= endpoint.max_client_connections:
            return Refusal("endpoint", endpoint.max_client_connections, endpoint.name)
        a.total += 1
        a.per_endpoint[key] += 1
        self.endpoint = endpoint.name
        return None

    def admit_user(self, user: UserConfig) -> Refusal | None:
        """Count the connection for its user (after authentication), or refuse it when the user
        has ``max_connections`` already. Another user (COM_CHANGE_USER) moves the count if the
        new user has room; refused, the ticket keeps counting the old one."""
        if self.user == user.name:
            return None
        counts = self._admission.per_user
        key = (self.cluster, user.name)
        if user.max_connections and counts[key] >= user.max_connections:
            return Refusal("user", user.max_connections, user.name)
        self._release_user()
        counts[key] += 1
        self.user = user.name
        return None

    def _release_user(self) -> None:
        if self.user is not None:
            _decrement(self._admission.per_user, (self.cluster, self.user))
            self.user = None

    def release(self) -> None:
        """The connection ended: it stops counting everywhere (idempotent)."""
        self._release_user()
        if self.endpoint is not None:
            a = self._admission
            a.total -= 1
            _decrement(a.per_endpoint, (self.cluster, self.endpoint))
            self.endpoint = None


def _decrement(counts: Counter[tuple[str, str]], key: tuple[str, str]) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]  # names come and go with reloads: keep no zeros


class Admission:
    """The counts of one process's client connections, and its total limit (0: none)."""

    def __init__(self, max_total: int = 0) -> None:
        self.max_total = max_total
        self.total = 0
        self.per_endpoint: Counter[tuple[str, str]] = Counter()  # (cluster, endpoint) -> connections
        self.per_user: Counter[tuple[str, str]] = Counter()  # (cluster, user) -> connections

    def ticket(self, cluster: str) -> Ticket:
        """A ticket for a new connection to ``cluster``, not counted yet (see ``Ticket.admit``)."""
        return Ticket(self, cluster)

    def admit(self, cluster: str, endpoint: EndpointConfig) -> Ticket | Refusal:
        """A counted ticket for a new connection to ``endpoint``, or the refusal."""
        ticket = self.ticket(cluster)
        refusal = ticket.admit(endpoint)
        return ticket if refusal is None else refusal
