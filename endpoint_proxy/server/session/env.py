"""What a session core reads from the cluster and reports to it: routing rules, load, metrics."""

from __future__ import annotations

import dataclasses
from time import perf_counter_ns
from typing import TYPE_CHECKING

from ...config import EndpointConfig
from ...routing.endpoints import members
from ...routing.pg_classify import FunctionPolicy
from ...sessioncore.actions import MAIN, READER, WRITER

if TYPE_CHECKING:
    from ..cluster import ClusterRuntime
    from ..metrics import EndpointMetrics


# An endpoint's routing rules per role, made once per endpoint (an idle session costs no copy of
# them): keyed by the endpoint's identity, as a reload makes new endpoint objects.
_ROLES: dict[int, tuple[EndpointConfig, dict[str, EndpointConfig]]] = {}


def roles_of(endpoint: EndpointConfig) -> dict[str, EndpointConfig]:
    """MAIN is the endpoint's own rule; WRITER and READER a readwrite endpoint's halves."""
    known = _ROLES.get(id(endpoint))
    if known is not None and known[0] is endpoint:
        return known[1]
    if len(_ROLES) > 256:
        _ROLES.clear()  # endpoints of earlier configs (reloads): made again when asked for
    roles = {
        MAIN: endpoint,
        WRITER: dataclasses.replace(endpoint, kind="writer"),
        READER: dataclasses.replace(endpoint, kind="reader"),
    }
    _ROLES[id(endpoint)] = (endpoint, roles)
    return roles


class SessionEnv:
    """One session's view of its cluster, as the cores' ``PgEnv``/``MyEnv`` protocols ask.

    Rules of this file: no I/O; every method is cheap (the relay calls ``request_started`` and
    ``request_ended`` once per request)."""

    __slots__ = ("cluster", "endpoint", "metrics", "database", "_roles", "busy", "_gate", "_started", "_route",
                 "pin")

    def __init__(self, cluster: ClusterRuntime, endpoint: EndpointConfig, metrics: EndpointMetrics,
                 database: str = "") -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.metrics = metrics
        self.database = database
        self._roles = roles_of(endpoint)
        self.busy = False  # a request of this session is running (SHOW SESSIONS)
        self._gate = cluster.drills.gate
        self._started = 0  # perf_counter_ns() when the request in flight began
        self._route = "writer"
        self.pin: str | None = None  # why the session is pinned now (SHOW SESSIONS), counted in pinned_sessions

    def rule(self, role: str) -> EndpointConfig:
        """The routing rule of a role: the endpoint's own, or a readwrite endpoint's writer/reader half."""
        return self._roles[role]

    @property
    def generation(self) -> int:
        return self.cluster.topology.generation

    def placement_ok(self, role: str, instance: str) -> bool:
        cluster = self.cluster
        endpoint = self._roles[role]
        eligible = members(endpoint, cluster.topology)
        if instance in eligible:
            return True
        return not eligible and cluster.route(endpoint).instance == instance

    def function_policy(self) -> FunctionPolicy:
        return self.cluster.function_policy(self.database)

    def request_started(self, instance: str, in_recovery: bool) -> None:
        self.cluster.inflight[instance] += 1
        route = self._route = "reader" if in_recovery else "writer"
        self.metrics.statement(route)
        self.busy = True
        self._started = perf_counter_ns()

    def request_ended(self, instance: str) -> None:
        self.cluster.inflight[instance] -= 1
        self.busy = False
        self.metrics.statement_finished(self._route, perf_counter_ns() - self._started)

    # The writer gate (server/gate.py): a switchover holds new writer work at its boundary.

    @property
    def gate_open(self) -> bool:
        return self._gate.is_open

    def writer_begin(self) -> None:
        self._gate.begin(self)

    def writer_end(self) -> None:
        self._gate.end(self)

    def pinned(self, reason: str) -> None:
        """The session became tied to its server by state that cannot move (``reason``: its
        label, e.g. "LISTEN"): counted in ``pinned_sessions{reason}`` until ``unpinned`` or
        ``closed``. A second call with another reason moves the count to it."""
        if self.pin == reason:
            return
        if self.pin is not None:
            self.metrics.session_unpinned(self.pin)
        self.pin = reason
        self.metrics.session_pinned(reason)

    def unpinned(self, reason: str) -> None:
        """The state that pinned the session is gone (UNLISTEN *, DISCARD TEMP, the lock
        released, COM_RESET_CONNECTION): the session may move again. The count that goes is the
        one ``pinned`` made, whatever ``reason`` says (it is for the caller's log)."""
        if self.pin is not None:
            self.metrics.session_unpinned(self.pin)
            self.pin = None

    def closed(self) -> None:
        """The session ended: a pin it still holds stops counting (the proxy calls this)."""
        self.unpinned("session closed")

    def error(self, kind: str) -> None:
        self.cluster.metrics.error(kind)
