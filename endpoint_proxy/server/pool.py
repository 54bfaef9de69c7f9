"""Pools of server connections: borrowed for one transaction (transaction mode), kept idle between.

One pool per (instance, user, database). A connection keeps what state it carries (its
``mark``: SET values, prepared statements), so the next borrower is brought to its own state by
the difference, not by a reset. Rules of this file: counting is exact (every connection is in
exactly one of idle / lent / opening), a waiter is served in order, and nothing here blocks
but ``borrow`` (bounded by its timeout).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

C = TypeVar("C")


class PoolTimeout(Exception):
    """No server connection could be borrowed within the borrow timeout."""


@dataclass(frozen=True, slots=True)
class PoolKey:
    instance: str
    user: str
    database: str

    def __str__(self) -> str:
        return f"{self.instance}/{self.user}/{self.database}"


@dataclass(eq=False)
class Pooled(Generic[C]):
    """A pool's server connection, with what of a session it carries."""

    conn: C
    created_at: float
    last_used: float
    generation: int  # the pool's generation when it was opened (a drain makes it stale)
    mark: object = None  # the session core's record of this connection's state
    key: PoolKey | None = None  # the pool it belongs to


@dataclass
class PoolLimits:
    size: int = 20
    min_size: int = 0
    idle_timeout_s: float | None = None
    lifetime_s: float | None = None


@dataclass(eq=False)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    given: Pooled[object] | None = None
    allowed_to_open: bool = False


class ServerPool(Generic[C]):
    def __init__(self, key: PoolKey, limits: PoolLimits, *, close: Callable[[C], Awaitable[None]]) -> None:
        self.key = key
        self.limits = limits
        self._close = close
        self.idle: deque[Pooled[C]] = deque()  # most recently returned last
        self.lent = 0
        self.opening = 0
        self._waiters: deque[_Waiter] = deque()
        self.generation = 0
        self.borrows = 0
        self.longest_wait_s = 0.0  # since the last read of ``take_longest_wait``
        self._closing: list[C] = []

    # --- what the status reports --------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self.idle) + self.lent + self.opening

    @property
    def has_discarded(self) -> bool:
        """Connections let go of and not closed yet (``close_discarded``)."""
        return bool(self._closing)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # --- borrowing ------------------------------------------------------------------------------

    async def borrow(self, open_conn: Callable[[], Awaitable[C]], timeout_s: float) -> Pooled[C]:
        """A connection for one transaction: an idle one, a new one while under the size, else
        the next one returned (in order of asking). Raises PoolTimeout after ``timeout_s``; a
        failure to open propagates (nothing is counted for it)."""
        now = trio.current_time()
        pooled = self._take_idle(now)
        if pooled is not None:
            self.borrows += 1
            return pooled
        if self.total < self.limits.size and not self._waiters:
            return await self._open(open_conn, now)
        waiter = _Waiter()
        self._waiters.append(waiter)
        started = now
        try:
            with trio.move_on_after(timeout_s):
                await waiter.event.wait()
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self.longest_wait_s = max(self.longest_wait_s, trio.current_time() - started)
        if waiter.given is not None:
            self.borrows += 1
            return waiter.given  # type: ignore[return-value]
        if waiter.allowed_to_open:
            return await self._open(open_conn, trio.current_time())
        raise PoolTimeout(f"no server connection of pool {self.key} within {timeout_s * 1000:.0f} ms "
                          f"({self.limits.size} in use)")

    def _take_idle(self, now: float) -> Pooled[C] | None:
        while self.idle:
            pooled = self.idle.pop()
            if self._expired(pooled, now):
                self._discard(pooled)
                continue
            self.lent += 1
            pooled.last_used = now
            return pooled
        return None

    async def _open(self, open_conn: Callable[[], Awaitable[C]], now: float) -> Pooled[C]:
        self.opening += 1
        try:
            conn = await open_conn()
        except BaseException:
            self.opening -= 1
            self._serve_waiters()  # a place freed up: someone waiting may try
            raise
        self.opening -= 1
        self.lent += 1
        self.borrows += 1
        return Pooled(conn, created_at=now, last_used=now, generation=self.generation, key=self.key)

    def give_back(self, pooled: Pooled[C], *, reusable: bool = True) -> None:
        """A borrowed connection comes back: to the next waiter, to the idle list, or closed
        (``reusable`` False: broken, or state that must not reach another client)."""
        self.lent -= 1
        now = trio.current_time()
        pooled.last_used = now
        if not reusable or self._expired(pooled, now):
            self._discard(pooled)
            self._serve_waiters()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            self.lent += 1
            waiter.given = pooled  # type: ignore[assignment]
            waiter.event.set()
            return
        self.idle.append(pooled)

    def forget(self, pooled: Pooled[C]) -> None:
        """A borrowed connection is gone (lost, or kept by a session it is pinned to, then closed
        by it): it stops counting."""
        self.lent -= 1
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        """A place freed up: the first waiter may open a connection of its own."""
        while self._waiters and self.total < self.limits.size:
            waiter = self._waiters.popleft()
            waiter.allowed_to_open = True
            waiter.event.set()

    def _expired(self, pooled: Pooled[C], now: float) -> bool:
        if pooled.generation != self.generation:
            return True
        lifetime = self.limits.lifetime_s
        return lifetime is not None and now - pooled.created_at > lifetime

    def _discard(self, pooled: Pooled[C]) -> None:
        self._closing.append(pooled.conn)

    # --- upkeep ---------------------------------------------------------------------------------

    def drain(self) -> None:
        """Every connection of this pool is stale (the instance left its role, a reload): idle
        ones close now, lent ones when they come back."""
        self.generation += 1
        while self.idle:
            self._discard(self.idle.popleft())

    def sweep(self, now: float) -> None:
        """Close idle connections past the idle timeout or their lifetime (keeping min_size)."""
        keep = self.limits.min_size
        idle_timeout = self.limits.idle_timeout_s
        for pooled in list(self.idle):
            if self.total <= keep and not self._expired(pooled, now):
                break
            if self._expired(pooled, now) or (idle_timeout is not None and now - pooled.last_used > idle_timeout):
                self.idle.remove(pooled)
                self._discard(pooled)
        self._serve_waiters()

    async def close_discarded(self) -> None:
        """Close what the pool let go of (closing may take a moment: not done in give_back)."""
        closing, self._closing = self._closing, []
        for conn in closing:
            with trio.CancelScope(shield=True):
                await self._close(conn)

    def take_longest_wait(self) -> float:
        longest, self.longest_wait_s = self.longest_wait_s, 0.0
        return longest
