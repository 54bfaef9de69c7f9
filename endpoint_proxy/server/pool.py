"""Pools of server connections: borrowed for one transaction (transaction mode), kept idle between.

One pool per (instance, user, database). A connection keeps what state it carries (its
``mark``: SET values, prepared statements), so the next borrower is brought to its own state by
the difference, not by a reset.

Rules of this file:
- Counting is exact: every connection is in exactly one of idle / lent / opening, and a place
  granted to a waiter is counted as opening from the moment it is granted (nobody can take it
  meanwhile).
- Waiters are served in order of arrival; while anyone waits, nobody else takes an idle
  connection or a free place. So idle connections and waiters never coexist.
- Nothing here blocks but ``borrow`` (bounded by its timeout), ``fill`` (bounded by the opener)
  and ``close_discarded`` (bounded per connection). ``give_back``, ``forget``, ``drain``,
  ``sweep`` and ``set_limits`` only move counts and lists; what they let go of is closed later
  by ``close_discarded``.
- A borrower cancelled at any point (its client left) loses nothing: a connection handed to it,
  or a place granted, goes to the next waiter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, NamedTuple, Protocol, TypeVar

import structlog
import trio

C = TypeVar("C")

log = structlog.get_logger("endpoint_proxy.pool")

# Closing one discarded connection (a Terminate / COM_QUIT and the socket) may take at most this.
CLOSE_TIMEOUT_S: Final = 5.0


class PoolTimeout(Exception):
    """No server connection could be borrowed within the borrow timeout."""


class PoolKey(NamedTuple):
    """(A tuple: made and hashed on every borrow, which a frozen dataclass does in Python.)"""

    instance: str
    user: str
    database: str

    def __str__(self) -> str:
        return f"{self.instance}/{self.user}/{self.database}"


class Pooled(Generic[C]):
    """A pool's server connection, with what of a session it carries. (Not a dataclass: mypyc
    cannot build a generic one.)"""

    def __init__(self, conn: C, *, created_at: float, last_used: float, generation: int, mark: object = None,
                 key: PoolKey | None = None, pool: ServerPool[Any] | None = None) -> None:
        self.conn = conn
        self.created_at = created_at
        self.last_used = last_used
        self.generation = generation  # the pool's generation when it was opened (a drain makes it stale)
        self.mark = mark  # the session core's record of this connection's state
        self.key = key  # the pool it belongs to
        self.pool = pool  # the same pool, itself

    def __repr__(self) -> str:
        return f"Pooled({self.conn!r}, generation={self.generation}, key={self.key})"


@dataclass
class PoolLimits:
    size: int = 20
    min_size: int = 0
    idle_timeout_s: float | None = None
    lifetime_s: float | None = None


@dataclass(frozen=True)
class PoolStatus:
    """One pool as SHOW POOLS, /topology and the metrics show it."""

    instance: str
    user: str
    database: str
    size: int  # the limit
    in_use: int  # lent to sessions
    idle: int
    opening: int
    waiting: int  # clients waiting for a connection
    longest_wait_ms: int  # how long the first of them has waited (0: nobody waits)
    borrows: int  # connections lent since the pool was made

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance, "user": self.user, "database": self.database, "size": self.size,
                "in_use": self.in_use, "idle": self.idle, "opening": self.opening, "waiting": self.waiting,
                "longest_wait_ms": self.longest_wait_ms, "borrows": self.borrows}


class QuickWaiter(Protocol):
    """A borrower that waits without a task (a session parked in the relay hub): the pool calls
    it from whatever gives a connection back. None of these may call back into the pool."""

    def granted(self, pooled: Pooled[Any]) -> bool:
        """A connection for it (counted as lent): True if it took it, False if it is gone."""
        ...

    def may_open(self) -> None:
        """A place freed up: it borrows again the usual way (which may open a connection)."""
        ...

    def expired(self) -> None:
        """It waited the borrow timeout: it is out of the line."""
        ...


@dataclass(eq=False, slots=True)
class _Waiter:
    since: float
    event: trio.Event | None = None  # a task's (quick waiters have none)
    given: Pooled[Any] | None = None  # a connection handed over (counted as lent)
    allowed_to_open: bool = False  # a place granted (counted as opening)
    gone: bool = False  # gave up: skipped when served
    quick: QuickWaiter | None = None  # waits without a task (see QuickWaiter)
    deadline: float = 0.0  # quick waiters: when the borrow timeout ends


class ServerPool(Generic[C]):
    def __init__(self, key: PoolKey, limits: PoolLimits, *, close: Callable[[C], Awaitable[None]]) -> None:
        self.key = key
        self.limits = limits
        self._close = close
        self.idle: deque[Pooled[C]] = deque()  # most recently returned last
        self.lent = 0
        self.opening = 0
        self._waiters: deque[_Waiter] = deque()  # may hold ``gone`` ones (dropped lazily)
        self._waiting = 0
        self.generation = 0
        self.borrows = 0
        self.longest_wait_s = 0.0  # since the last read of ``take_longest_wait``
        self._closing: list[C] = []
        # The opener the last borrow passed: ``fill`` opens min_size connections through it. It
        # must not depend on its session still running. None after a drain: a drained pool is
        # not refilled until it is borrowed from again.
        self.opener: Callable[[], Awaitable[C]] | None = None
        self.filling = False  # a fill is under way (PoolRegistry runs one at a time)
        self.fill_error: str | None = None  # the last fill's failure (logged once per new error)
        self._clock: Callable[[], float] | None = None  # the run's clock, read on every borrow and give-back

    def _now(self) -> float:
        """trio.current_time(), without its three calls to reach the clock."""
        clock = self._clock
        if clock is None:
            clock = self._clock = trio.lowlevel.current_clock().current_time
        return clock()

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
        return self._waiting

    def oldest_wait_s(self, now: float) -> float:
        """How long the first waiter in line has waited (0 when nobody waits)."""
        waiter = self._first_waiter()
        return max(0.0, now - waiter.since) if waiter is not None else 0.0

    def status(self, now: float) -> PoolStatus:
        return PoolStatus(self.key.instance, self.key.user, self.key.database, self.limits.size, self.lent,
                          len(self.idle), self.opening, self._waiting, round(self.oldest_wait_s(now) * 1000),
                          self.borrows)

    # --- borrowing ------------------------------------------------------------------------------

    async def borrow(self, open_conn: Callable[[], Awaitable[C]], timeout_s: float) -> Pooled[C]:
        """A connection for one transaction: an idle one, a new one while under the size, else
        the next one returned (in order of asking). Raises PoolTimeout after ``timeout_s``; a
        failure to open propagates (nothing is counted for it). Once it has a connection, the
        pool remembers ``open_conn`` as its opener (``fill``)."""
        pooled = await self._borrow(open_conn, timeout_s)
        self.opener = open_conn
        return pooled

    async def _borrow(self, open_conn: Callable[[], Awaitable[C]], timeout_s: float) -> Pooled[C]:
        now = trio.current_time()
        if not self._waiting:
            pooled = self._take_idle(now)
            if pooled is not None:
                self.borrows += 1
                return pooled
            if self.total < self.limits.size:
                self.opening += 1
                return await self._open(open_conn)
        waiter = _Waiter(now, trio.Event())
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            with trio.move_on_after(timeout_s):
                await waiter.event.wait()  # type: ignore[union-attr]
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            self.longest_wait_s = max(self.longest_wait_s, trio.current_time() - now)
        if waiter.given is not None:
            self.borrows += 1
            return waiter.given
        if waiter.allowed_to_open:
            return await self._open(open_conn)
        self._abandon(waiter)
        raise PoolTimeout(f"no server connection of pool {self.key} within {timeout_s * 1000:.0f} ms "
                          f"({self.limits.size} in use)")

    def take_idle_now(self) -> Pooled[C] | None:
        """An idle connection, lent, when nobody waits in line; else None (no waiting)."""
        if self._waiting:
            return None
        pooled = self._take_idle(self._now())
        if pooled is not None:
            self.borrows += 1
        return pooled

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

    async def _open(self, open_conn: Callable[[], Awaitable[C]]) -> Pooled[C]:
        """Open a connection in a place already counted as opening; it is lent on success."""
        generation = self.generation  # a drain meanwhile makes it stale
        try:
            conn = await open_conn()
        except BaseException:
            self.opening -= 1
            self._serve_waiters()  # a place freed up: someone waiting may try
            raise
        self.opening -= 1
        self.lent += 1
        self.borrows += 1
        now = trio.current_time()
        return Pooled(conn, created_at=now, last_used=now, generation=generation, key=self.key, pool=self)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gives up (timeout, or its task was cancelled): whatever it was granted goes on."""
        if not waiter.gone and waiter.event is not None and not waiter.event.is_set():
            waiter.gone = True
            self._waiting -= 1
            return
        given, waiter.given = waiter.given, None
        if given is not None:
            self.give_back(given)
        elif waiter.allowed_to_open:
            waiter.allowed_to_open = False
            self.opening -= 1
            self._serve_waiters()

    def _first_waiter(self) -> _Waiter | None:
        while self._waiters and self._waiters[0].gone:
            self._waiters.popleft()
        return self._waiters[0] if self._waiters else None

    def _next_waiter(self) -> _Waiter | None:
        waiter = self._first_waiter()
        if waiter is not None:
            self._waiters.popleft()
            self._waiting -= 1
        return waiter

    def give_back(self, pooled: Pooled[C], *, reusable: bool = True) -> None:
        """A borrowed connection comes back: to the next waiter, to the idle list, or closed
        (``reusable`` False: broken, or state that must not reach another client; also when
        stale, past its lifetime, or beyond a pool_size lowered meanwhile)."""
        self.lent -= 1
        now = self._now()
        pooled.last_used = now
        if not reusable or self._expired(pooled, now) or self.total >= self.limits.size:
            self._discard(pooled)
            self._serve_waiters()
            return
        self._put(pooled)

    def _put(self, pooled: Pooled[C]) -> None:
        """A usable connection (not counted anywhere): to the first waiter, else idle."""
        while True:
            waiter = self._next_waiter()
            if waiter is None:
                self.idle.append(pooled)
                return
            self.lent += 1
            if waiter.quick is not None:
                if waiter.quick.granted(pooled):
                    self.borrows += 1
                    return
                self.lent -= 1  # that borrower is gone: the next one
                continue
            waiter.given = pooled
            assert waiter.event is not None
            waiter.event.set()
            return

    # --- waiting without a task -----------------------------------------------------------------

    def wait_quick(self, quick: QuickWaiter, timeout_s: float) -> _Waiter:
        """Join the line as a quick waiter (see QuickWaiter); the handle cancels with ``cancel_quick``."""
        now = self._now()
        waiter = _Waiter(now, quick=quick, deadline=now + timeout_s)
        self._waiters.append(waiter)
        self._waiting += 1
        return waiter

    def cancel_quick(self, waiter: _Waiter) -> None:
        """A quick waiter leaves the line (its client left); nothing was given to it."""
        if not waiter.gone and waiter in self._waiters:
            waiter.gone = True
            self._waiting -= 1

    def next_quick_deadline(self) -> float | None:
        for waiter in self._waiters:
            if waiter.quick is not None and not waiter.gone:
                return waiter.deadline
        return None

    def expire_quick(self, now: float) -> int:
        """Quick waiters past their deadline leave the line and are told; returns how many."""
        expired = [w for w in self._waiters if w.quick is not None and not w.gone and w.deadline <= now]
        for waiter in expired:
            waiter.gone = True
            self._waiting -= 1
            self.longest_wait_s = max(self.longest_wait_s, now - waiter.since)
        for waiter in expired:
            assert waiter.quick is not None
            waiter.quick.expired()
        return len(expired)

    def forget(self, pooled: Pooled[C]) -> None:
        """A borrowed connection is gone (lost, or kept by a session it is pinned to, then closed
        by it): it stops counting."""
        self.lent -= 1
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        """Places freed up: the first waiters may open connections of their own (a quick waiter
        is told to borrow again the usual way, which opens one)."""
        free = self.limits.size - self.total
        while free > 0:
            waiter = self._next_waiter()
            if waiter is None:
                return
            free -= 1
            if waiter.quick is not None:
                waiter.quick.may_open()
                continue
            self.opening += 1
            waiter.allowed_to_open = True
            assert waiter.event is not None
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
        ones close now, lent ones when they come back. The pool is not refilled to min_size
        until its next borrow."""
        self.generation += 1
        self.opener = None
        while self.idle:
            self._discard(self.idle.popleft())

    def set_limits(self, limits: PoolLimits) -> None:
        """New limits (a reload): beyond a smaller size, idle connections close now (least
        recently used first) and lent ones as they come back; a larger size serves waiters."""
        self.limits = limits
        while self.idle and self.total > limits.size:
            self._discard(self.idle.popleft())
        self._serve_waiters()

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

    @property
    def unused(self) -> bool:
        """Nothing open, opening, lent or waiting, and nothing to keep open: the pool may go."""
        return self.total == 0 and not self._waiting and not self.filling and not self.wants_fill

    @property
    def wants_fill(self) -> bool:
        """Below min_size with an opener to open more with."""
        limits = self.limits
        return self.opener is not None and self.total < min(limits.min_size, limits.size)

    async def fill(self) -> None:
        """Open connections through the last borrower's opener until min_size are open (one at
        a time). A failure to open propagates; what was opened stays."""
        while True:
            opener = self.opener
            if opener is None or not self.wants_fill:
                return
            self.opening += 1
            generation = self.generation
            try:
                conn = await opener()
            except BaseException:
                self.opening -= 1
                self._serve_waiters()
                raise
            self.opening -= 1
            now = trio.current_time()
            pooled = Pooled(conn, created_at=now, last_used=now, generation=generation, key=self.key, pool=self)
            self.lent += 1  # as if lent and given back: stale or over the size, it closes
            self.give_back(pooled)

    async def close_discarded(self) -> None:
        """Close what the pool let go of (closing may take a moment: not done in give_back).
        Never raises and never blocks for long: each close is bounded and its errors logged."""
        closing, self._closing = self._closing, []
        for conn in closing:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
                try:
                    await self._close(conn)
                except Exception as e:  # noqa: BLE001 - a connection that fails to close is gone anyway
                    log.info("pool_close_failed", pool=str(self.key), error=str(e) or type(e).__name__)

    def take_longest_wait(self) -> float:
        longest, self.longest_wait_s = self.longest_wait_s, 0.0
        return longest
