"""The relay hub (server/hub.py) on socket pairs: no server, no proxy."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from endpoint_proxy.relay import hub as hub_module
from endpoint_proxy.relay.hub import READ, HandBack, Hub


@pytest.fixture
def pairs() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


@pytest.fixture(params=[True, False], ids=["in-trio-dispatch", "trio-waits"])
async def hub(request: pytest.FixtureRequest) -> AsyncIterator[Hub]:
    hub = Hub(hooked=request.param)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub
        nursery.cancel_scope.cancel()


def _reader(sock: socket.socket, seen: list[bytes], until: bytes) -> Callable[[], HandBack | None]:
    """A callback that reads what is there and hands back once it has read ``until``."""

    def on_readable() -> HandBack | None:
        data = sock.recv(4096)
        if not data:
            return READ
        seen.append(data)
        return HandBack(7, b"".join(seen)) if b"".join(seen).endswith(until) else None

    return on_readable


async def test_callbacks_run_in_the_hub_until_one_hands_back(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    a, b = pairs()
    seen: list[bytes] = []
    result: list[object] = []

    async def parked() -> None:
        result.append(await hub.wait(a.fileno(), _reader(a, seen, b"!")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.parked == 1
        for part in (b"one ", b"two ", b"three!"):
            b.send(part)
            await trio.testing.wait_all_tasks_blocked()
    assert len(result) == 1
    got = result[0]
    assert isinstance(got, HandBack) and got.kind == 7 and got.data == b"one two three!"
    assert len(seen) == 3  # one call per readiness, in the hub's task
    assert hub.parked == 0
    # Handed back: the socket is no longer watched, so the hub leaves new data alone.
    b.send(b"later")
    await trio.testing.wait_all_tasks_blocked()
    assert a.recv(100) == b"later"


async def test_level_triggered_a_partial_read_is_called_again(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    a, b = pairs()
    got: list[bytes] = []

    def one_byte() -> HandBack | None:
        got.append(a.recv(1))
        return HandBack(1) if len(got) == 5 else None

    b.send(b"12345")
    with trio.fail_after(5):
        result = await hub.wait(a.fileno(), one_byte)
    assert isinstance(result, HandBack) and result.kind == 1
    assert b"".join(got) == b"12345"


async def test_cancel_unparks_and_forgets_the_socket(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    a, b = pairs()
    calls: list[int] = []

    def never() -> HandBack | None:
        calls.append(1)
        return None

    with trio.move_on_after(0.05) as scope:
        await hub.wait(a.fileno(), never)
    assert scope.cancelled_caught
    assert hub.parked == 0
    b.send(b"x")
    await trio.sleep(0.05)
    assert calls == []
    # The same descriptor can be parked again afterwards.
    got: list[bytes] = []
    result = await hub.wait(a.fileno(), _reader(a, got, b"x"))
    assert isinstance(result, HandBack) and result.data == b"x"


async def test_a_failing_callback_raises_in_its_own_task_only(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    (a, b), (c, d) = pairs(), pairs()
    outcomes: dict[str, object] = {}

    def broken() -> HandBack | None:
        raise ValueError("bad bytes")

    async def victim() -> None:
        try:
            await hub.wait(a.fileno(), broken)
        except ValueError as e:
            outcomes["victim"] = e

    async def bystander() -> None:
        outcomes["bystander"] = await hub.wait(c.fileno(), _reader(c, [], b"ok"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim)
        nursery.start_soon(bystander)
        await trio.testing.wait_all_tasks_blocked()
        b.send(b"boom")
        await trio.testing.wait_all_tasks_blocked()
        d.send(b"ok")
    assert isinstance(outcomes["victim"], ValueError)
    got = outcomes["bystander"]
    assert isinstance(got, HandBack) and got.data == b"ok"


async def test_end_of_stream_hands_back_read(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    a, b = pairs()
    b.close()
    with trio.fail_after(5):
        assert await hub.wait(a.fileno(), _reader(a, [], b"never")) is READ


async def test_many_sockets_share_one_hub(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    socks = [pairs() for _ in range(200)]
    results: dict[int, object] = {}

    async def park(i: int, s: socket.socket) -> None:
        results[i] = await hub.wait(s.fileno(), _reader(s, [], b"\n"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i, (a, _b) in enumerate(socks):
                nursery.start_soon(park, i, a)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.parked == 200
            for i, (_a, b) in enumerate(socks):
                b.send(f"{i}\n".encode())
    assert all(isinstance(r, HandBack) and r.data == f"{i}\n".encode() for i, r in results.items())
    assert len(results) == 200
    assert hub.events >= 200


async def test_a_stopped_hub_hands_every_socket_back(pairs) -> None:  # type: ignore[no-untyped-def]
    hub = Hub()
    a, _b = pairs()
    # Not running yet: the caller reads by itself.
    assert await hub.wait(a.fileno(), _reader(a, [], b"!")) is READ
    result: list[object] = []

    async def parked() -> None:
        result.append(await hub.wait(a.fileno(), _reader(a, [], b"!")))

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            outer.start_soon(parked)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.parked == 1
            nursery.cancel_scope.cancel()
    assert result == [READ]
    assert hub.parked == 0
    # Stopped: the caller reads by itself again.
    assert await hub.wait(a.fileno(), _reader(a, [], b"!")) is READ


async def test_one_task_per_descriptor(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    a, b = pairs()
    result: list[object] = []

    async def parked() -> None:
        result.append(await hub.wait(a.fileno(), _reader(a, [], b"!")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already parked"):
            await hub.wait(a.fileno(), _reader(a, [], b"!"))
        b.send(b"!")
    assert len(result) == 1 and isinstance(result[0], HandBack) and result[0].data == b"!"


async def test_the_pinned_trio_lets_the_hub_serve_from_its_dispatch(hub: Hub) -> None:
    # The hub reaches into trio's run loop (no public API for it); a trio upgrade that
    # moves those internals must fail here, not quietly fall back to the slower path.
    assert hub.in_dispatch == hub.hooked
    # Nor to the larger wait: a parked task waits on one small object (hub._Park), not on trio's
    # wait_task_rescheduled coroutine and its helpers (memory of every idle session).
    assert hub_module._Trap is not None


async def test_trio_stays_responsive_while_the_hub_is_busy(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    """A thread keeps a parked socket busy: trio's own sockets, threads and timers must
    still wake their tasks while the hub serves it."""
    busy, feeder_end = pairs()
    served: list[int] = []

    def drain() -> HandBack | None:
        served.append(len(busy.recv(65536)))
        return None

    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.0005):
            try:
                feeder_end.send(b"x")
            except BlockingIOError:
                pass

    feeder = threading.Thread(target=feed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.wait, busy.fileno(), drain)
        feeder.start()
        try:
            with trio.fail_after(5):  # the only deadline: nothing else would make the hub let go
                # trio's own sockets: a ping-pong between two tasks
                a, b = trio.socket.socketpair()
                with a, b:
                    async def echo() -> None:
                        for _ in range(200):
                            await b.send(await b.recv(10))

                    nursery.start_soon(echo)
                    for i in range(200):
                        await a.send(bytes([i]))
                        assert await a.recv(10) == bytes([i])
                # a worker thread's result
                assert await trio.to_thread.run_sync(lambda: 42) == 42
                # a timer
                await trio.sleep(0.01)
                assert len(served) > 10  # the hub went on serving all along
        finally:
            stop.set()
            feeder.join()
        nursery.cancel_scope.cancel()


async def test_a_second_hub_in_the_same_run_waits_through_trio(pairs) -> None:  # type: ignore[no-untyped-def]
    first, second = Hub(), Hub()
    a, b = pairs()
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        assert first.in_dispatch and not second.in_dispatch
        b.send(b"!")
        with trio.fail_after(5):
            result = await second.wait(a.fileno(), _reader(a, [], b"!"))
        assert isinstance(result, HandBack) and result.data == b"!"
        nursery.cancel_scope.cancel()


async def test_a_callback_can_watch_another_descriptor_and_let_one_go(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    # A pooled session: parked on its client; a callback borrows a server connection (park_more),
    # its answer is read by the new callback, which gives it back (unpark_fd); the task stays
    # parked throughout, and wakes only when the client says so.
    client, client_peer = pairs()
    server, server_peer = pairs()
    log: list[str] = []
    result: list[object] = []

    def on_server() -> object:
        log.append("server " + server.recv(100).decode())
        hub.unpark_fd(server.fileno())  # given back: no longer this task's
        return None

    def on_client() -> object:
        data = client.recv(100)
        if data == b"bye":
            return READ
        log.append("client " + data.decode())
        assert hub.park_more(server.fileno(), on_server, client.fileno())
        assert not hub.park_more(server.fileno(), on_server, client.fileno())  # parked already
        return None

    async def parked() -> None:
        result.append(await hub.wait(client.fileno(), on_client))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        client_peer.send(b"request")
        await _until(lambda: hub.is_parked(server.fileno()))
        assert not result
        server_peer.send(b"answer")
        await _until(lambda: not hub.is_parked(server.fileno()))
        assert hub.is_parked(client.fileno()) and not result
        server_peer.send(b"not ours any more")  # nobody watches the server descriptor now
        client_peer.send(b"bye")
        await _until(lambda: bool(result))
    assert log == ["client request", "server answer"] and result == [READ]
    assert not hub.is_parked(client.fileno())


async def test_a_callback_that_lets_its_descriptor_go_can_still_wake_the_task(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    # A pooled session's server answers the end of a transaction: the callback gives the
    # connection back (unpark_fd of its own descriptor) and the next request needs the task
    # (a routing decision that waits): the task wakes, parked on its client no more.
    client, client_peer = pairs()
    server, server_peer = pairs()
    result: list[object] = []
    wake = HandBack(7)

    def on_server() -> object:
        server.recv(100)
        hub.unpark_fd(server.fileno())
        return wake

    async def parked() -> None:
        result.append(await hub.wait_any(((client.fileno(), lambda: None), (server.fileno(), on_server))))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        server_peer.send(b"ReadyForQuery")
        await _until(lambda: bool(result))
    assert result == [wake]
    assert not hub.is_parked(client.fileno()) and not hub.is_parked(server.fileno())


class _CountingEpoll:
    """The hub's epoll, with its registrations counted."""

    def __init__(self, epoll: Any) -> None:
        self.epoll = epoll
        self.registers = 0

    def register(self, fd: int, mask: int) -> None:
        self.registers += 1
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.registers += 1
        self.epoll.modify(fd, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.epoll, name)


async def test_a_connection_kept_between_borrowers_stays_registered(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    # A pooled connection goes back with its socket kept (unpark_fd ``keep``): the next borrower's
    # park_more costs no registration. A byte on it while nobody borrows it (a server closing an
    # idle connection) unregisters it (no spinning) and waits for the next borrower, who reads it.
    # A socket closed while kept, and another under the same number, is registered afresh.
    client, client_peer = pairs()
    server, server_peer = pairs()
    counting = _CountingEpoll(hub._epoll)
    hub._epoll = counting  # type: ignore[assignment]
    answers: list[bytes] = []
    current = [server]

    def on_server() -> object:
        sock = current[0]
        answers.append(sock.recv(100))
        hub.unpark_fd(sock.fileno(), sock)
        return None

    def on_client() -> object:
        if client.recv(100) == b"bye":
            return READ
        sock = current[0]
        assert hub.park_more(sock.fileno(), on_server, client.fileno(), sock)
        return None

    async def parked() -> None:
        await hub.wait(client.fileno(), on_client)

    async def borrow_and_answer(peer: socket.socket, answer: bytes) -> None:
        client_peer.send(b"request")
        await _until(lambda: hub.is_parked(current[0].fileno()))
        peer.send(answer)
        await _until(lambda: not hub.is_parked(current[0].fileno()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        before = counting.registers
        await borrow_and_answer(server_peer, b"one")
        assert counting.registers == before + 1
        await borrow_and_answer(server_peer, b"two")
        assert counting.registers == before + 1  # kept: registered once for both borrows

        server_peer.send(b"closing")  # nobody borrows it now
        await _until(lambda: server.fileno() not in hub._kept)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [b"one", b"two"]  # not read by anyone while in the pool
        client_peer.send(b"request")
        await _until(lambda: answers[-1] == b"closing")  # the next borrower finds it

        fd = server.fileno()
        other, other_peer = pairs()
        server.close()  # closed while kept; a new connection gets the same number
        os.dup2(other.fileno(), fd)
        current[0] = socket.socket(fileno=fd)
        current[0].setblocking(False)
        await borrow_and_answer(other_peer, b"three")
        assert answers[-1] == b"three"
        client_peer.send(b"bye")
    current[0].close()


async def test_a_kept_connection_that_spoke_is_not_kept_for_any_callback_of_that_batch(hub: Hub, pairs) -> None:  # type: ignore[no-untyped-def]
    # A borrower skips the peek at a pooled connection that is still kept (is_kept): silent as
    # of the hub's last batch. A server closing it while idle must count even when the
    # borrower's request comes earlier in the same batch than the close.
    client, client_peer = pairs()
    server, server_peer = pairs()
    seen: list[bool] = []
    answers: list[bytes] = []

    def on_server() -> object:
        answers.append(server.recv(100))
        hub.unpark_fd(server.fileno(), server)
        return None

    def on_client() -> object:
        data = client.recv(100)
        if data == b"bye":
            return READ
        if data == b"borrow":
            assert hub.park_more(server.fileno(), on_server, client.fileno(), server)
        else:
            seen.append(hub.is_kept(server.fileno(), server))
        return None

    async def parked() -> None:
        await hub.wait(client.fileno(), on_client)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        client_peer.send(b"borrow")
        await _until(lambda: hub.is_parked(server.fileno()))
        server_peer.send(b"ReadyForQuery")
        await _until(lambda: answers == [b"ReadyForQuery"])
        client_peer.send(b"check")  # silent since: kept
        await _until(lambda: len(seen) == 1)
        # The request, then the close, with no checkpoint between: one batch, the client's
        # descriptor ready first.
        client_peer.send(b"check")
        server_peer.send(b"FATAL")
        server_peer.close()
        await _until(lambda: len(seen) == 2)
        assert seen == [True, False]
        assert answers == [b"ReadyForQuery"]  # nobody read the close: the next borrower's peek finds it
        client_peer.send(b"bye")


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait, bounded, until the hub's callbacks have made ``condition`` true."""
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.001)
