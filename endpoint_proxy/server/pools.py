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

Rules of this file: every pooled connection is counted in ``cluster.connections`` from open to
close, once; nothing here decides routing (the session routes, then borrows from that instance).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .pool import Pooled, PoolKey, PoolLimits, PoolTimeout, ServerPool

if TYPE_CHECKING:
    from .cluster import ClusterRuntime

__all__ = ["PoolRegistry", "PoolTimeout", "Pooled"]

SWEEP_INTERVAL_S = 1.0


class PoolRegistry:
    def __init__(self, cluster: ClusterRuntime) -> None:
        self.cluster = cluster
        self.pools: dict[PoolKey, ServerPool[Any]] = {}

    def limits(self) -> PoolLimits:
        c = self.cluster.config
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

    async def borrow(self, instance: str, user: str, database: str, open_conn: Callable[[], Awaitable[Any]],
                     close: Callable[[Any], Awaitable[None]]) -> Pooled[Any]:
        """A connection of the pool for one transaction. Raises PoolTimeout after borrow_timeout_ms;
        what ``open_conn`` raises propagates."""
        pool = self.pool(instance, user, database, close)
        cluster = self.cluster

        async def open_counted() -> Any:
            conn = await open_conn()
            cluster.connections[instance] += 1
            return conn

        return await pool.borrow(open_counted, cluster.config.borrow_timeout_ms / 1000)

    def _pool_of(self, pooled: Pooled[Any]) -> ServerPool[Any] | None:
        return self.pools.get(pooled.key) if pooled.key is not None else None

    def give_back(self, pooled: Pooled[Any], *, reusable: bool = True) -> None:
        pool = self._pool_of(pooled)
        if pool is not None:
            pool.give_back(pooled, reusable=reusable)
            if pool.has_discarded and self.cluster.nursery is not None:
                self.cluster.nursery.start_soon(pool.close_discarded)

    def forget(self, pooled: Pooled[Any]) -> None:
        """A lent connection the session closes itself (lost, or past saving): it stops counting
        in its pool, and in ``cluster.connections`` (the caller closes it)."""
        pool = self._pool_of(pooled)
        if pool is not None:
            pool.forget(pooled)
            self.cluster.connections[pooled.key.instance if pooled.key else ""] -= 1

    def drain_instance(self, instance: str) -> None:
        """The instance left its role (or the configuration): its idle connections close now,
        lent ones when they come back."""
        for key, pool in self.pools.items():
            if key.instance == instance:
                pool.drain()

    def drain_all(self) -> None:
        for pool in self.pools.values():
            pool.drain()

    async def run(self) -> None:
        """Upkeep: close idle connections past their idle timeout or lifetime, keep what was let go closed."""
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = trio.current_time()
            for pool in list(self.pools.values()):
                pool.sweep(now)
                if pool.has_discarded:
                    await pool.close_discarded()
