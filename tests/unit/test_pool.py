"""Server pools: borrow and give back, the size limit, waiting in order, the borrow timeout,
idle timeout and lifetime, draining (trio's MockClock: timing without waiting)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from endpoint_proxy.server.pool import PoolKey, PoolLimits, PoolTimeout, ServerPool

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
