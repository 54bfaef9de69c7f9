"""The relay hub inside trio's I/O dispatch must never swallow an event of trio's own."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from endpoint_proxy.relay.hub import HandBack, Hub

# Hub calls in a row: twice the dispatch wrapper's round limit (64) and more.
CALLS = range(1, 140)


async def _hub_busy_for(hub: Hub, k: int, then: Callable[[], None]) -> None:
    """Keep a parked socket readable for ``k`` hub callbacks in a row (no task wakes meanwhile);
    during the ``k``-th, call ``then``. Returns once the parked task is cancelled."""
    parked, feeder = socket.socketpair()
    with parked, feeder:
        parked.setblocking(False)
        calls = 0

        def busy() -> HandBack | None:
            nonlocal calls
            calls += 1
            parked.recv(16)
            if calls < k:
                feeder.send(b"x")  # readable again at the hub's next poll
            elif calls == k:
                then()
            return None

        feeder.send(b"x")
        await hub.wait(parked.fileno(), busy)


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    hub = Hub(hooked=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        assert hub.in_dispatch
        yield hub
        nursery.cancel_scope.cancel()


async def test_a_trio_wait_wakes_whichever_hub_round_its_socket_turns_readable_in(hub: Hub) -> None:
    """Trio's registrations are one-shot: an event taken from trio's epoll and not handed to
    trio's dispatch disarms the descriptor for good, and the task waiting on it (a session
    reading its client, a monitor) never wakes. The hub keeps polling trio's epoll while only
    parked sockets are busy; whichever of those polls sees trio's socket, its task must wake."""
    missed = []
    for k in CALLS:
        waited, poker = socket.socketpair()
        with waited, poker:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_hub_busy_for, hub, k, lambda poker=poker: poker.send(b"!"))
                with trio.move_on_after(1) as scope:
                    await trio.lowlevel.wait_readable(waited)
                if scope.cancelled_caught:
                    missed.append(k)
                nursery.cancel_scope.cancel()
    assert not missed, f"trio's wait never woke when its socket turned readable in hub call(s) {missed}"


async def test_an_accept_loop_takes_a_connection_that_arrives_while_the_hub_is_busy(hub: Hub) -> None:
    """The proxy's accept loop (accept until EAGAIN, then wait through trio) must take a
    connection that arrives while the hub serves parked sockets back to back."""
    missed = []
    for k in CALLS:
        listener = socket.socket()
        with listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            listener.setblocking(False)
            clients: list[socket.socket] = []

            def connect(listener: socket.socket = listener, clients: list[socket.socket] = clients) -> None:
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(listener.getsockname())
                clients.append(c)

            async def accept_one(listener: socket.socket = listener) -> None:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(listener)
                        continue
                    conn.close()
                    return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_hub_busy_for, hub, k, connect)
                with trio.move_on_after(1) as scope:
                    await accept_one()
                if scope.cancelled_caught:
                    missed.append(k)
                nursery.cancel_scope.cancel()
            for c in clients:
                c.close()
    assert not missed, f"a connection arriving in hub call(s) {missed} was never accepted"
