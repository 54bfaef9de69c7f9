"""/healthz fails when an endpoint's connections pile up in the accept queue with nobody taking them."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import structlog.testing
import trio

from endpoint_proxy import app as app_module
from endpoint_proxy.app import Proxy
from endpoint_proxy.config import parse_config
from endpoint_proxy.server.acceptwatch import AcceptWatch, accept_backlog
from endpoint_proxy.server.pg import session as pg_session_module


def test_accept_backlog_counts_waiting_connections() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    clients = []
    try:
        assert accept_backlog(listener) == 0
        for _ in range(3):
            clients.append(socket.create_connection(listener.getsockname()))
        assert accept_backlog(listener) == 3
        conn, _ = listener.accept()
        conn.close()
        assert accept_backlog(listener) == 2
    finally:
        for c in clients:
            c.close()
        listener.close()
    assert accept_backlog(listener) is None  # closed: nothing to say


@pytest.mark.parametrize(("steps", "verdicts"), [
    # (backlog, accepted so far, time) per observation
    ([(0, 0, 0.0), (0, 0, 100.0)], [False, False]),  # idle listener
    ([(2, 0, 0.0), (2, 0, 4.9), (2, 0, 5.0)], [False, False, True]),  # queue never served
    ([(2, 0, 0.0), (2, 1, 6.0), (2, 1, 10.0), (2, 1, 11.0)], [False, False, False, True]),  # progress restarts it
    ([(2, 0, 0.0), (0, 0, 6.0), (1, 0, 7.0), (1, 0, 11.9)], [False, False, False, False]),  # drained in between
    ([(5, 0, 0.0), (5, 0, 60.0)], [False, True]),  # two looks far apart are enough
    ([(None, 0, 0.0), (None, 0, 60.0)], [False, False]),  # the kernel does not say
])
def test_accept_watch(steps: list[tuple[int | None, int, float]], verdicts: list[bool]) -> None:
    watch = AcceptWatch(stuck_after_s=5.0)
    got = []
    for backlog, accepted, now in steps:
        watch.accepted = accepted
        got.append(watch.observe(backlog, now))
    assert got == verdicts


DOC: dict[str, Any] = {
    "clusters": [{
        "name": "app", "protocol": "postgresql", "health_check_interval_ms": 1000,
        "users": [{"name": "u", "password": "p"}],
        # Nothing listens there: the monitor's probes fail at once, which is all this needs.
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 1}],
        "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "writer"}],
    }],
    "admin": {"listen": "127.0.0.1:0"},
}


async def healthz(port: int) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_healthz_fails_while_an_accept_loop_is_gone(nursery: trio.Nursery,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "STUCK_ACCEPT_S", 0.3)
    proxy: Proxy = await nursery.start(Proxy(parse_config(DOC)).run)
    admin_port = proxy.bound["admin"].port
    endpoint = proxy.bound["app/rw"]
    assert await healthz(admin_port) == (200, b"ok\n")
    listener = proxy._listeners[("app", "rw")]
    # The wedge: the accept loop stops while its socket stays open and registered.
    listener.scope.cancel()
    await trio.sleep(0.05)
    clients = [socket.create_connection((endpoint.host, endpoint.port)) for _ in range(3)]
    try:
        with trio.fail_after(10):
            while (result := await healthz(admin_port))[0] == 200:
                await trio.sleep(0.1)
        status, body = result
        assert status == 503
        assert b"endpoint app/rw" in body and b"3 connection(s)" in body
        # An accept loop again: the queue drains and /healthz recovers.
        listener.scope = trio.CancelScope()
        assert proxy._nursery is not None
        proxy._nursery.start_soon(proxy._accept_loop, listener)
        with trio.fail_after(10):
            while (await healthz(admin_port))[0] != 200:
                await trio.sleep(0.1)
        assert accept_backlog(listener.sock) == 0
    finally:
        for c in clients:
            c.close()
    proxy._nursery.cancel_scope.cancel()


async def test_a_busy_listener_is_not_stuck(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "STUCK_ACCEPT_S", 0.3)
    proxy: Proxy = await nursery.start(Proxy(parse_config(DOC)).run)
    endpoint = proxy.bound["app/rw"]
    clients = []
    for _ in range(5):
        clients.append(socket.create_connection((endpoint.host, endpoint.port)))
        await trio.sleep(0.1)
        assert proxy.stuck_endpoints() == []
    for c in clients:
        c.close()
    assert proxy._nursery is not None
    proxy._nursery.cancel_scope.cancel()


async def test_a_session_that_crashes_is_logged_counted_and_alone(nursery: trio.Nursery,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug in one session (here: its login raises): the session's task ends through the proxy's
    # session_ended, which logs and counts it and forgets the session; the client's connection
    # closes; the listener and the next client carry on.
    calls = []

    async def broken_login(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug in a session")
        await trio.sleep_forever()

    monkeypatch.setattr(pg_session_module, "login", broken_login)
    proxy: Proxy = await nursery.start(Proxy(parse_config(DOC)).run)
    endpoint = proxy.bound["app/rw"]
    cluster = proxy.clusters["app"]
    with structlog.testing.capture_logs() as logs:
        first = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        with trio.fail_after(5):
            assert await first.receive_some(100) == b""  # closed by the crashed session
        with trio.fail_after(5):
            while cluster.metrics._metrics.registry.get_sample_value(
                    "endpoint_proxy_errors_total", {"cluster": "app", "kind": "session_crashed"}) != 1:
                await trio.sleep(0.01)
    crashes = [e for e in logs if e["event"] == "session_crashed"]
    assert len(crashes) == 1 and crashes[0]["endpoint"] == "rw"
    assert isinstance(crashes[0]["exc_info"], RuntimeError)
    assert not proxy.sessions
    second = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    try:
        with trio.fail_after(5):
            while len(calls) < 2 or len(proxy.sessions) != 1:
                await trio.sleep(0.01)
    finally:
        await first.aclose()
        await second.aclose()
    proxy._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
