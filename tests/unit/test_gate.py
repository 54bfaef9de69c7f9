"""The writer gate on trio's mock clock: sessions hold new writer work while it is closed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio
import trio.testing

from endpoint_proxy.server.gate import WriterGate


async def test_an_open_gate_costs_no_wait_and_counts_who_is_inside() -> None:
    gate = WriterGate()
    assert gate.is_open and gate.inside == 0
    await gate.enter("s1")
    gate.begin("s1")  # again, mid-transaction: idempotent
    gate.begin("s2")
    assert gate.inside == 2
    gate.end("s1")
    gate.end("s1")
    gate.end("nobody")
    assert gate.inside == 1
    with trio.move_on_after(0) as scope:
        await gate.wait_empty()
    assert scope.cancelled_caught  # s2 is still inside


async def test_new_work_waits_while_closed_and_goes_when_opened(autojump_clock: trio.testing.MockClock) -> None:
    holding = []

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        holding.append(trio.current_time())
        yield

    gate = WriterGate(holding=hold)
    gate.close()
    entered: list[tuple[str, float]] = []

    async def session(key: str) -> None:
        await gate.enter(key)
        entered.append((key, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, "s1")
        nursery.start_soon(session, "s2")
        await trio.sleep(2)
        assert entered == [] and gate.held == 2 and len(holding) == 2
        assert gate.inside == 0  # held sessions are not inside: the switchover does not wait for them
        gate.open()
    assert sorted(entered) == [("s1", 2.0), ("s2", 2.0)]
    assert gate.inside == 2 and gate.held == 0


async def test_wait_empty_returns_when_the_last_session_ends(autojump_clock: trio.testing.MockClock) -> None:
    gate = WriterGate()
    gate.begin("a")
    gate.begin("b")
    gate.close()

    async def finish(key: str, after: float) -> None:
        await trio.sleep(after)
        gate.end(key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish, "a", 1.0)
        nursery.start_soon(finish, "b", 3.0)
        await gate.wait_empty()
        assert trio.current_time() == 3.0 and gate.inside == 0


async def test_a_session_inside_may_go_on_while_the_gate_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    """The transaction that was running finishes its statements (begin again, no wait)."""
    gate = WriterGate()
    await gate.enter("tx")
    gate.close()
    gate.begin("tx")  # its next statement
    gate.end("tx")  # its COMMIT answered: idle again
    with trio.fail_after(1):
        await gate.wait_empty()


async def test_open_is_idempotent_and_close_twice_keeps_one_event(autojump_clock: trio.testing.MockClock) -> None:
    gate = WriterGate()
    gate.open()
    gate.close()
    gate.close()
    assert not gate.is_open

    async def waiter() -> None:
        await gate.wait_open()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        gate.open()
        gate.open()
    assert gate.is_open
