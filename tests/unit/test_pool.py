"""Server pools: borrow and give back, the size limit, waiting in order, the borrow timeout,
idle timeout and lifetime, draining, resizing, min_size fills, closing that cannot block
(trio's MockClock: timing without waiting)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from endpoint_proxy.server.pool import Pooled, PoolKey, PoolLimits, PoolTimeout, ServerPool

KEY = PoolKey("a", "app", "app")


class Conns:
    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.closed: list[int] = []

    async def open(self) -> int:
        await trio.sleep(0)
        return next(self.ids)

    async def close(self, conn: int) -> None:
        self.closed.append(conn)


def pool(conns: Conns, **limits: object) -> ServerPool[int]:
    return ServerPool(KEY, PoolLimits(**limits), close=conns.close)  # type: ignore[arg-type]


async def test_an_idle_connection_is_reused_and_the_size_is_a_limit(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=2)
    a = await p.borrow(conns.open, 1)
    b = await p.borrow(conns.open, 1)
    assert (a.conn, b.conn, p.lent, p.total) == (1, 2, 2, 2)
    with pytest.raises(PoolTimeout):
        await p.borrow(conns.open, 0.5)  # full: waits, then gives up
    p.give_back(a)
    c = await p.borrow(conns.open, 1)
    assert c is a and p.total == 2  # the idle one, not a third


async def test_waiters_are_served_in_order(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    first = await p.borrow(conns.open, 1)
    got: list[str] = []

    async def client(name: str) -> None:
        pooled = await p.borrow(conns.open, 10)
        got.append(name)
        await trio.sleep(0.1)
        p.give_back(pooled)

    async with trio.open_nursery() as nursery:
        for name in "xyz":
            nursery.start_soon(client, name)
            await trio.testing.wait_all_tasks_blocked()
        assert p.waiting == 3
        p.give_back(first)
    assert got == ["x", "y", "z"] and p.total == 1 and p.lent == 0


async def test_a_broken_connection_frees_its_place_for_a_waiter(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    a = await p.borrow(conns.open, 1)

    async def waiter() -> None:
        b = await p.borrow(conns.open, 5)
        assert b.conn == 2  # a new one: the broken one was not handed on
        p.give_back(b)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        p.give_back(a, reusable=False)
    await p.close_discarded()
    assert conns.closed == [1] and p.total == 1


async def test_idle_timeout_lifetime_and_min_size(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=4, min_size=1, idle_timeout_s=10, lifetime_s=100)
    lent = [await p.borrow(conns.open, 1) for _ in range(3)]
    for pooled in lent:
        p.give_back(pooled)
    await trio.sleep(11)
    p.sweep(trio.current_time())
    await p.close_discarded()
    assert p.total == 1 and len(conns.closed) == 2  # idle past the timeout, but min_size kept
    await trio.sleep(100)
    p.sweep(trio.current_time())
    await p.close_discarded()
    assert p.total == 0  # past its lifetime even the last one goes


async def test_drain_makes_every_connection_stale(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=3)
    a = await p.borrow(conns.open, 1)
    b = await p.borrow(conns.open, 1)
    p.give_back(b)
    p.drain()  # b (idle) closes now, a when it comes back
    p.give_back(a)
    await p.close_discarded()
    assert sorted(conns.closed) == [1, 2] and p.total == 0
    c = await p.borrow(conns.open, 1)
    assert c.conn == 3 and c.generation == p.generation


async def test_a_place_granted_to_a_waiter_is_not_taken_by_a_newcomer(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    a = await p.borrow(conns.open, 1)
    order: list[str] = []

    async def waiter() -> None:
        pooled = await p.borrow(conns.open, 10)
        order.append("waiter")
        await trio.sleep(1)
        p.give_back(pooled)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        p.give_back(a, reusable=False)  # the place goes to the waiter, who opens its own...
        newcomer = await p.borrow(conns.open, 10)  # ...so a newcomer, arriving first, queues behind
        order.append("newcomer")
        assert p.total == 1
        p.give_back(newcomer)
    assert order == ["waiter", "newcomer"] and p.total == 1


async def test_a_waiter_whose_client_leaves_is_skipped(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    a = await p.borrow(conns.open, 1)
    got: list[int] = []
    leaver = trio.CancelScope()

    async def first() -> None:
        with leaver:
            await p.borrow(conns.open, 10)
            raise AssertionError("cancelled while waiting")

    async def second() -> None:
        got.append((await p.borrow(conns.open, 10)).conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        leaver.cancel()  # the first client leaves while it waits
        await trio.testing.wait_all_tasks_blocked()
        assert p.waiting == 1
        p.give_back(a)
    assert got == [1] and p.lent == 1 and p.waiting == 0 and p.total == 1


async def test_a_waiter_that_times_out_leaves_the_line_without_holding_it_up(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    a = await p.borrow(conns.open, 1)
    results: list[str] = []

    async def client(name: str, timeout: float) -> None:
        try:
            pooled = await p.borrow(conns.open, timeout)
        except PoolTimeout:
            results.append(f"{name} timed out")
            return
        results.append(f"{name} got {pooled.conn}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, "impatient", 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, "patient", 100)
        await trio.testing.wait_all_tasks_blocked()
        assert p.waiting == 2
        await trio.sleep(2)
        assert p.waiting == 1 and p.status(trio.current_time()).longest_wait_ms == 2000
        p.give_back(a)
    assert results == ["impatient timed out", "patient got 1"]
    assert p.waiting == 0 and p.status(trio.current_time()).longest_wait_ms == 0


async def test_a_lent_connection_past_its_lifetime_closes_when_given_back(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=2, lifetime_s=10)
    a = await p.borrow(conns.open, 1)
    await trio.sleep(11)  # a long transaction: the connection ages while lent
    p.give_back(a)
    await p.close_discarded()
    assert conns.closed == [1] and p.total == 0
    assert (await p.borrow(conns.open, 1)).conn == 2


async def test_a_smaller_size_closes_idle_ones_and_lends_no_more_than_it(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=4)
    lent = [await p.borrow(conns.open, 1) for _ in range(4)]
    p.give_back(lent.pop())  # conn 4 idle
    p.set_limits(PoolLimits(size=2))
    await p.close_discarded()
    assert conns.closed == [4] and p.total == 3  # three still lent: nobody loses theirs

    async def waiter() -> None:
        pooled = await p.borrow(conns.open, 10)
        assert p.lent <= 2
        p.give_back(pooled)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        p.give_back(lent.pop())  # conn 3: over the new size, closed; the waiter keeps waiting
        await trio.testing.wait_all_tasks_blocked()
        assert p.waiting == 1 and p.lent == 2
        p.give_back(lent.pop())  # conn 2: now within the size, handed to the waiter
    await p.close_discarded()
    assert sorted(conns.closed) == [3, 4] and p.total == 2 and p.lent == 1


async def test_a_larger_size_lets_waiters_open(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    await p.borrow(conns.open, 1)
    got: list[int] = []

    async def waiter() -> None:
        got.append((await p.borrow(conns.open, 10)).conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        p.set_limits(PoolLimits(size=2))
    assert got == [2] and p.lent == 2


async def test_fill_opens_min_size_through_the_last_opener(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=5, min_size=3)
    assert not p.wants_fill  # never borrowed from: no opener
    a = await p.borrow(conns.open, 1)
    assert p.wants_fill
    await p.fill()
    assert (p.lent, len(p.idle), p.total) == (1, 2, 3) and not p.wants_fill
    p.give_back(a)
    p.drain()  # the instance left its role: idle ones close, and the pool is not refilled...
    assert not p.wants_fill
    await p.fill()
    assert p.total == 0
    await p.borrow(conns.open, 1)  # ...until it is used again
    await p.fill()
    assert p.total == 3


async def test_a_connection_opened_across_a_drain_is_stale(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=2)

    async def slow_open() -> int:
        await trio.sleep(1)
        return next(conns.ids)

    got: list[Pooled[int]] = []

    async def borrow() -> None:
        got.append(await p.borrow(slow_open, 5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(borrow)
        await trio.testing.wait_all_tasks_blocked()
        assert p.opening == 1
        p.drain()  # the instance left its role while the connection was being opened
    p.give_back(got[0])
    await p.close_discarded()
    assert conns.closed == [1] and p.total == 0


async def test_a_failed_open_frees_its_place(autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)

    async def refused() -> int:
        raise OSError("connection refused")

    with pytest.raises(OSError):
        await p.borrow(refused, 1)
    assert p.total == 0
    assert (await p.borrow(conns.open, 1)).conn == 1


async def test_closing_never_raises_nor_hangs(autojump_clock: trio.testing.MockClock) -> None:
    closed: list[int] = []

    async def bad_close(conn: int) -> None:
        if conn == 1:
            raise OSError("reset")
        if conn == 2:
            await trio.sleep_forever()  # a server that never answers the goodbye
        closed.append(conn)

    conns = Conns()
    p: ServerPool[int] = ServerPool(KEY, PoolLimits(size=3), close=bad_close)
    lent = [await p.borrow(conns.open, 1) for _ in range(3)]
    for pooled in lent:
        p.give_back(pooled, reusable=False)
    start = trio.current_time()
    await p.close_discarded()
    assert closed == [3] and trio.current_time() - start <= 5.0 + 0.01


async def test_a_connection_handed_to_a_client_that_is_leaving_goes_to_the_next(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    a = await p.borrow(conns.open, 1)
    got: list[int] = []
    leaver = trio.CancelScope()

    async def first() -> None:
        with leaver:
            await p.borrow(conns.open, 10)
            raise AssertionError("cancelled while waiting")

    async def second() -> None:
        got.append((await p.borrow(conns.open, 10)).conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        leaver.cancel()  # the first client leaves; before its task has run again...
        p.give_back(a)  # ...the connection is handed to it, and it must pass it on
    assert got == [1] and p.lent == 1 and p.waiting == 0 and p.total == 1


class Quick:
    """A borrower that waits without a task (pool.QuickWaiter), as a hub-parked session does."""

    def __init__(self, name: str, log: list[str], *, present: bool = True) -> None:
        self.name = name
        self.log = log
        self.present = present
        self.got: Pooled[int] | None = None

    def granted(self, pooled: Pooled[int]) -> bool:  # type: ignore[override]
        if not self.present:
            return False
        self.got = pooled
        self.log.append(f"{self.name} got {pooled.conn}")
        return True

    def may_open(self) -> None:
        self.log.append(f"{self.name} may open")

    def expired(self) -> None:
        self.log.append(f"{self.name} expired")


async def test_quick_waiters_share_the_line_with_task_waiters_in_order(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    held = await p.borrow(conns.open, 1)
    log: list[str] = []
    q1 = Quick("q1", log)
    p.wait_quick(q1, 10)

    async def task_waiter() -> None:
        pooled = await p.borrow(conns.open, 10)
        log.append(f"task got {pooled.conn}")
        p.give_back(pooled)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task_waiter)
        await trio.testing.wait_all_tasks_blocked()
        gone = Quick("gone", log, present=False)
        p.wait_quick(gone, 10)
        q2 = Quick("q2", log)
        p.wait_quick(q2, 10)
        assert p.waiting == 4  # q1, the task, the one that left, q2
        p.give_back(held)  # to q1 at once (no task involved)
        assert log == ["q1 got 1"] and p.lent == 1
        assert q1.got is not None
        p.give_back(q1.got)  # to the task, in its turn
        await trio.testing.wait_all_tasks_blocked()
    # the task gave it back: the session that left is skipped, q2 gets it
    assert log == ["q1 got 1", "task got 1", "q2 got 1"] and p.lent == 1 and p.waiting == 0


async def test_a_quick_waiter_expires_after_the_borrow_timeout_and_a_cancelled_one_is_skipped(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    held = await p.borrow(conns.open, 1)
    log: list[str] = []
    early, late, leaving = Quick("early", log), Quick("late", log), Quick("leaving", log)
    p.wait_quick(early, 1)
    handle = p.wait_quick(leaving, 1)
    await trio.sleep(0.5)
    p.wait_quick(late, 1)
    p.cancel_quick(handle)
    assert p.next_quick_deadline() == pytest.approx(trio.current_time() + 0.5)
    await trio.sleep(0.6)
    assert p.expire_quick(trio.current_time()) == 1 and log == ["early expired"]
    p.give_back(held)
    assert log == ["early expired", "late got 1"] and p.waiting == 0


async def test_a_freed_place_tells_a_quick_waiter_to_borrow_the_usual_way(
        autojump_clock: trio.testing.MockClock) -> None:
    conns = Conns()
    p = pool(conns, size=1)
    held = await p.borrow(conns.open, 1)
    log: list[str] = []
    p.wait_quick(Quick("q", log), 10)
    p.forget(held)  # lost: a place is free, but no connection to hand over
    assert log == ["q may open"] and p.waiting == 0 and p.total == 0
