"""A cluster's pools of server connections (transaction-mode endpoints), one per (instance, user, database).

What a session calls (both protocols):

    pooled = await cluster.pools.borrow(instance, user, database, open_conn, close)
        # an idle connection of that pool, or one ``open_conn()`` makes (counted as the
        # instance's), or the next one given back; PoolTimeout after borrow_timeout_ms.
        # ``close(conn)`` says goodbye to one and closes it (Terminate / COM_QUIT).
    cluster.pools.give_back(pooled, reusable=True)    # the transaction is over
    cluster.pools.forget(pooled)                      # lost or kept: it no longer counts as lent

``pooled.mark`` is the protocol's record of what state the connection carries (SET values,
prepared statements): the next borrower is brought to its own state by the difference.

``open_conn`` and ``close`` must not depend on the borrowing session still running: the pool
keeps the last ``open_conn`` to open min_pool_size connections in the background, and closes
connections given back long after their session ended. Both should be bounded (the connect
timeout; a goodbye of a few seconds at most) and ``close`` must close the socket whatever
happens.

What the cluster calls: ``note_topology(events)`` on every topology change (an instance that
goes down, is fenced, or changes role between writer and reader has its pools drained: idle
connections close now, lent ones when given back), ``configure(gone)`` on a reload (new limits
for every pool; instances removed or moved are drained), and ``run`` in its nursery (the
sweeper: idle timeout, lifetime, min_pool_size, closing).

Rules of this file: every pooled connection is counted in ``cluster.connections`` from open to
close, once; nothing here decides routing (the session routes, then borrows from that instance);
nothing a session calls blocks but ``borrow``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
import trio

from ..config import ClusterConfig
from ..topology.state import TopologyEvent
from .pool import Pooled, PoolKey, PoolLimits, PoolStatus, PoolTimeout, QuickWaiter, ServerPool

if TYPE_CHECKING:
    from ..topology.state import ClusterTopology
    from .metrics import ClusterMetrics


class PoolHost(Protocol):
    """What the registry uses of its cluster (server/cluster.py's ClusterRuntime)."""

    config: ClusterConfig
    connections: Counter[str]  # server connections per instance, pooled ones included
    metrics: ClusterMetrics
    topology: ClusterTopology

    @property
    def nursery(self) -> trio.Nursery | None: ...

__all__ = ["PoolRegistry", "PoolStatus", "PoolTimeout", "Pooled", "instances_to_drain"]

log = structlog.get_logger("endpoint_proxy.pools")

SWEEP_INTERVAL_S: Final = 1.0
# A guard only: the opener is bounded by the connect timeout itself.
FILL_TIMEOUT_S: Final = 60.0


def instances_to_drain(events: Iterable[TopologyEvent], writer_before: str | None,
                       writer_after: str | None) -> set[str]:
    """Whose pools must go after these topology events: an instance that went down or was
    fenced, and both sides of a writer change (the old writer is no longer one; connections a
    new writer's pools hold were opened to a replica)."""
    drain = {ev.instance for ev in events
             if ev.kind in ("instance_down", "instance_fenced") and ev.instance is not None}
    if writer_before != writer_after:
        drain |= {n for n in (writer_before, writer_after) if n is not None}
    return drain


class PoolRegistry:
    def __init__(self, cluster: PoolHost) -> None:
        self.cluster = cluster
        self.pools: dict[PoolKey, ServerPool[Any]] = {}
        self._writer: str | None = None  # the writer as of the last note_topology
        self._quick_changed = trio.Event()  # a quick waiter joined a line (_expire_quick)
        self._quick_next = math.inf  # the deadline _expire_quick sleeps until

    def limits(self) -> PoolLimits:
        """The cluster's pool limits now."""
        return self.limits_of(self.cluster.config)

    @staticmethod
    def limits_of(c: ClusterConfig) -> PoolLimits:
        return PoolLimits(size=c.pool_size, min_size=c.min_pool_size,
                          idle_timeout_s=c.server_idle_timeout_ms / 1000 if c.server_idle_timeout_ms else None,
                          lifetime_s=c.server_lifetime_ms / 1000 if c.server_lifetime_ms else None)

    def pool(self, instance: str, user: str, database: str,
             close: Callable[[Any], Awaitable[None]]) -> ServerPool[Any]:
        key = PoolKey(instance, user, database)
        pool = self.pools.get(key)
        if pool is None:
            cluster = self.cluster

            async def close_counted(conn: Any) -> None:
                cluster.connections[instance] -= 1
                await close(conn)

            pool = self.pools[key] = ServerPool(key, self.limits(), close=close_counted)
        return pool

    # --- what sessions call ----------------------------------------------------------------------

    async def borrow(self, instance: str, user: str, database: str, open_conn: Callable[[], Awaitable[Any]],
                     close: Callable[[Any], Awaitable[None]]) -> Pooled[Any]:
        """A connection of the pool for one transaction. Raises PoolTimeout after borrow_timeout_ms
        (counted as the error ``borrow_timeout``); what ``open_conn`` raises propagates. The time
        it took goes to ``endpoint_proxy_pool_borrow_seconds``."""
        pool = self.pool(instance, user, database, close)
        cluster = self.cluster

        async def open_counted() -> Any:
            conn = await open_conn()
            cluster.connections[instance] += 1
            return conn

        started = trio.current_time()
        try:
            pooled = await pool.borrow(open_counted, cluster.config.borrow_timeout_ms / 1000)
        except PoolTimeout:
            cluster.metrics.error("borrow_timeout")
            raise
        cluster.metrics.pool_borrowed(int((trio.current_time() - started) * 1e9))
        return pooled

    def borrow_quick(self, instance: str, user: str, database: str,
                     quick: QuickWaiter) -> Pooled[Any] | tuple[ServerPool[Any], Any] | None:
        """Borrow without a task: an idle connection when one is there and nobody waits (lent);
        else, when the pool is full, a place in its line (see pool.QuickWaiter; this handle goes
        to ``cancel_quick``); else None: no such pool, or it has room (the caller borrows the
        usual way, which opens a connection)."""
        pool = self.pools.get(PoolKey(instance, user, database))
        if pool is None:
            return None
        pooled = pool.take_idle_now()
        if pooled is not None:
            self.cluster.metrics.pool_borrowed(0)
            return pooled
        if pool.total < pool.limits.size:
            return None
        waiter = pool.wait_quick(quick, self.cluster.config.borrow_timeout_ms / 1000)
        if waiter.deadline < self._quick_next:
            self._quick_next = waiter.deadline
            self._quick_changed.set()  # sooner than the expiry task sleeps (usually it is later: no wake-up)
        return (pool, waiter)

    def cancel_quick(self, handle: Any) -> None:
        pool, waiter = handle
        pool.cancel_quick(waiter)

    async def _expire_quick(self) -> None:
        """Tell quick waiters whose borrow timeout passed (counted as ``borrow_timeout``)."""
        while True:
            deadlines = [d for d in (p.next_quick_deadline() for p in self.pools.values()) if d is not None]
            self._quick_next = min(deadlines, default=math.inf)
            with trio.move_on_at(self._quick_next):
                await self._quick_changed.wait()
            self._quick_changed = trio.Event()
            now = trio.current_time()
            for pool in list(self.pools.values()):
                for _ in range(pool.expire_quick(now)):
                    self.cluster.metrics.error("borrow_timeout")

    def _pool_of(self, pooled: Pooled[Any]) -> ServerPool[Any] | None:
        if pooled.pool is not None:
            return pooled.pool
        return self.pools.get(pooled.key) if pooled.key is not None else None

    def give_back(self, pooled: Pooled[Any], *, reusable: bool = True) -> None:
        """The transaction is over. Never blocks: a connection to close is closed in the
        cluster's nursery."""
        pool = self._pool_of(pooled)
        if pool is not None:
            pool.give_back(pooled, reusable=reusable)
            self._close_soon(pool)

    def forget(self, pooled: Pooled[Any]) -> None:
        """A lent connection the session closes itself (lost, or past saving): it stops counting
        in its pool, and in ``cluster.connections`` (the caller closes it)."""
        pool = self._pool_of(pooled)
        if pool is not None:
            pool.forget(pooled)
            self.cluster.connections[pool.key.instance] -= 1

    # --- what the cluster calls ------------------------------------------------------------------

    def note_topology(self, events: Iterable[TopologyEvent]) -> None:
        """Drain the pools of instances that left their role (see ``instances_to_drain``)."""
        writer = self.cluster.topology.writer
        drain = instances_to_drain(events, self._writer, writer)
        self._writer = writer
        for instance in sorted(drain):
            self.drain_instance(instance)

    def configure(self, gone: Iterable[str] = ()) -> None:
        """A reload: every pool takes the cluster's new limits (a smaller pool_size closes idle
        connections beyond it at once and lent ones as they come back; a larger one serves
        waiters); the pools of instances removed or moved (``gone``) are drained."""
        limits = self.limits()
        for pool in self.pools.values():
            pool.set_limits(limits)
        for instance in gone:
            self.drain_instance(instance)
        for pool in list(self.pools.values()):
            self._close_soon(pool)

    def drain_instance(self, instance: str) -> None:
        """The instance left its role (or the configuration): its idle connections close now,
        lent ones when they come back."""
        for key, pool in self.pools.items():
            if key.instance == instance:
                pool.drain()
                self._close_soon(pool)

    def drain_all(self) -> None:
        for pool in self.pools.values():
            pool.drain()
            self._close_soon(pool)

    def status(self, now: float) -> list[PoolStatus]:
        """Every pool, ordered by instance, user, database."""
        return [self.pools[key].status(now)
                for key in sorted(self.pools, key=lambda k: (k.instance, k.user, k.database))]

    # --- upkeep ----------------------------------------------------------------------------------

    def _close_soon(self, pool: ServerPool[Any]) -> None:
        if pool.has_discarded and self.cluster.nursery is not None:
            self.cluster.nursery.start_soon(pool.close_discarded)

    def sweep(self, now: float) -> None:
        """One round of upkeep: idle timeout and lifetime, closing, min_pool_size, and forgetting
        pools left with nothing (no connection, no waiter, nothing to keep open: a pool whose
        opens all fail, say for a database that does not exist, costs nothing for long)."""
        for key, pool in list(self.pools.items()):
            pool.sweep(now)
            self._close_soon(pool)
            if pool.unused:
                del self.pools[key]  # made again by the next borrow (closes under way hold the pool)
                continue
            if pool.wants_fill and not pool.filling and self._may_fill(key.instance):
                nursery = self.cluster.nursery
                if nursery is not None:
                    pool.filling = True
                    nursery.start_soon(self._fill, pool)

    def _may_fill(self, instance: str) -> bool:
        st = self.cluster.topology.instances.get(instance)
        return st is not None and st.up and not st.fenced

    async def _fill(self, pool: ServerPool[Any]) -> None:
        """Open min_pool_size connections; a failure is logged (once per new error) and tried
        again at the next sweep."""
        try:
            with trio.fail_after(FILL_TIMEOUT_S):
                await pool.fill()
            pool.fill_error = None
        except Exception as e:  # noqa: BLE001 - whatever the server does, the next sweep tries again
            error = str(e) or type(e).__name__
            if error != pool.fill_error:
                log.info("pool_fill_failed", cluster=self.cluster.config.name, pool=str(pool.key), error=error)
            pool.fill_error = error
        finally:
            pool.filling = False
            self._close_soon(pool)

    async def run(self) -> None:
        """Upkeep every SWEEP_INTERVAL_S (see ``sweep``), and the quick waiters' borrow timeouts."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_quick)
            while True:
                await trio.sleep(SWEEP_INTERVAL_S)
                self.sweep(trio.current_time())
