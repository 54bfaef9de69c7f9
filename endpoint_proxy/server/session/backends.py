"""A session's server connections: the active one, parked ones per role, each counted while held.

Every backend a session holds is counted in ``ClusterRuntime.connections`` exactly once, from
the moment it is opened until it is closed, whatever path closes it (a failed replay, a lost
connection, a switch, the end of the session): ``BackendSet`` is the one place that counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import trio

from ...relay.net import Conn

if TYPE_CHECKING:
    from ..cluster import ClusterRuntime


class Backend(Protocol):
    conn: Conn
    instance: str


B = TypeVar("B", bound=Backend)


B_in = TypeVar("B_in", bound=Backend, contravariant=True)


class FaultTaker(Protocol[B_in]):
    def take_fault(self, backend: B_in) -> None: ...


_NONE: dict[str, object] = {}  # never written: replaced by a dict of the session's own first
_NONE_COUNTED: list[object] = []


class BackendSet(Generic[B]):
    __slots__ = ("cluster", "active", "active_role", "parked", "_counted", "owner")

    def __init__(self, cluster: ClusterRuntime) -> None:
        self.cluster = cluster
        self.active: B | None = None
        self.active_role: str | None = None
        # Idle backends kept per role (readwrite endpoints in session mode). Until the first, a
        # shared empty dict, as is _counted until a backend is counted: a transaction-mode session
        # keeps none (its connections are its pool's), and these would be memory of each one.
        self.parked: dict[str, B] = _NONE  # type: ignore[assignment]
        self._counted: list[B] = _NONE_COUNTED  # type: ignore[assignment]
        # Told when a fault starts on the instance of one of these backends (see
        # ClusterRuntime.faults_changed): the session applies it.
        self.owner: FaultTaker[B] | None = None

    def count(self, backend: B) -> B:
        """A backend was just opened for this session: count it."""
        self.cluster.connections[backend.instance] += 1
        if self._counted is _NONE_COUNTED:
            self._counted = []
        self._counted.append(backend)
        self.cluster.live_backends.setdefault(backend.instance, {})[id(backend)] = self
        return backend

    def fault(self, backend_id: int) -> None:
        """A fault started on the instance of one of these backends (ClusterRuntime.faults_changed)."""
        for backend in self._counted:
            if id(backend) == backend_id and self.owner is not None:
                self.owner.take_fault(backend)

    def activate(self, role: str, backend: B) -> None:
        assert self.active is None, "a session has one active backend"
        self.active, self.active_role = backend, role

    def park(self) -> None:
        """Keep the active backend idle for a later switch back to its role."""
        if self.active is not None and self.active_role is not None:
            old = self.parked.pop(self.active_role, None)
            if old is not None:
                self._drop(old)
            self.keep(self.active_role, self.active)
        self.active = self.active_role = None

    def keep(self, role: str, backend: B) -> None:
        """Keep ``backend`` idle for ``role`` (the caller dropped any other of that role)."""
        if self.parked is _NONE:
            self.parked = {}
        self.parked[role] = backend

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
