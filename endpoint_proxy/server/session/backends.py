"""A session's server connections: the active one, parked ones per role, each counted while held.

Every backend a session holds is counted in ``ClusterRuntime.connections`` exactly once, from
the moment it is opened until it is closed, whatever path closes it (a failed replay, a lost
connection, a switch, the end of the session): ``BackendSet`` is the one place that counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import trio

from ...relay.net import Conn

if TYPE_CHECKING:
    from ..cluster import ClusterRuntime


class Backend(Protocol):
    conn: Conn
    instance: str


B = TypeVar("B", bound=Backend)


class BackendSet(Generic[B]):
    __slots__ = ("cluster", "active", "active_role", "parked", "_counted", "on_fault")

    def __init__(self, cluster: ClusterRuntime) -> None:
        self.cluster = cluster
        self.active: B | None = None
        self.active_role: str | None = None
        self.parked: dict[str, B] = {}
        self._counted: list[B] = []  # the backends counted in cluster.connections (a few at most)
        # Called when a fault starts on the instance of one of these backends (see
        # ClusterRuntime.faults_changed): the session applies it.
        self.on_fault: Callable[[B], None] | None = None

    def count(self, backend: B) -> B:
        """A backend was just opened for this session: count it."""
        self.cluster.connections[backend.instance] += 1
        self._counted.append(backend)
        self.cluster.live_backends.setdefault(backend.instance, {})[id(backend)] = self
        return backend

    def fault(self, backend_id: int) -> None:
        """A fault started on the instance of one of these backends (ClusterRuntime.faults_changed)."""
        for backend in self._counted:
            if id(backend) == backend_id and self.on_fault is not None:
                self.on_fault(backend)

    def activate(self, role: str, backend: B) -> None:
        assert self.active is None, "a session has one active backend"
        self.active, self.active_role = backend, role

    def park(self) -> None:
        """Keep the active backend idle for a later switch back to its role."""
        if self.active is not None and self.active_role is not None:
            old = self.parked.pop(self.active_role, None)
            if old is not None:
                self._drop(old)
            self.parked[self.active_role] = self.active
        self.active = self.active_role = None

    def take_parked(self, role: str) -> B | None:
        return self.parked.pop(role, None)

    def release_active(self) -> B | None:
        """The active backend leaves the session (the caller closes it with ``close``)."""
        backend, self.active, self.active_role = self.active, None, None
        return backend

    async def close(self, backend: B | None, goodbye: bytes = b"") -> None:
        """Uncount and close a backend (``goodbye``: a last message, e.g. Terminate)."""
        if backend is None:
            return
        self._drop(backend)
        with trio.CancelScope(shield=True):
            if goodbye and not backend.conn.closed:
                with trio.move_on_after(0.5):
                    try:
                        await backend.conn.send_all(goodbye)
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await backend.conn.aclose()

    def _drop(self, backend: B) -> None:
        if any(b is backend for b in self._counted):
            self._counted = [b for b in self._counted if b is not backend]
            self.cluster.connections[backend.instance] -= 1
            live = self.cluster.live_backends.get(backend.instance)
            if live is not None:
                live.pop(id(backend), None)

    async def close_all(self, goodbye: bytes = b"") -> None:
        backends = [b for b in (self.release_active(), *self.parked.values()) if b is not None]
        self.parked.clear()
        for backend in backends:
            await self.close(backend, goodbye)
