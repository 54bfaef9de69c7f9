"""Reload is all or nothing: listeners, users, TLS, in every worker process. In process, no database
(instances point at a closed port; nothing here needs a server)."""

from __future__ import annotations

import copy
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from endpoint_proxy import app as app_module
from endpoint_proxy.app import Proxy, ReloadError
from endpoint_proxy.config import Config, parse_config
from endpoint_proxy.localcluster.certs import write_self_signed
from tests.fixtures.hostile import closed_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def document(port: int, **cluster: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "app", "protocol": "postgresql", "health_check_interval_ms": 1000,
        "users": [{"name": "app", "password": "one"}, {"name": "gone-soon", "password": "two"}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": closed_port()}],
        "endpoints": [{"name": "rw", "listen": f"127.0.0.1:{port}", "kind": "writer"}],
    }
    c.update(cluster)
    return {"clusters": [c]}


def config(doc: dict[str, Any]) -> Config:
    return parse_config(doc, {})


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


async def start(nursery: trio.Nursery, cfg: Config, **kw: Any) -> Proxy:
    proxy: Proxy = await nursery.start(Proxy(cfg, **kw).run)
    return proxy


async def test_a_move_to_a_new_host_on_the_same_port_keeps_the_old_listener_until_the_new_one_is_bound(
        nursery: trio.Nursery) -> None:
    port = free_port()
    doc = document(port)
    proxy = await start(nursery, config(doc))
    old_sock = proxy._listeners[("app", "rw")].sock
    # 192.0.2.1 (TEST-NET-1) is nobody's address: binding it fails. The old listener, on the
    # same port, must still be there afterwards (it used to be closed first).
    bad = copy.deepcopy(doc)
    bad["clusters"][0]["endpoints"][0]["listen"] = f"192.0.2.1:{port}"
    with pytest.raises(ReloadError, match="endpoint rw: cannot listen on 192.0.2.1"):
        await proxy.reload(config(bad))
    assert proxy._listeners[("app", "rw")].sock is old_sock and old_sock.fileno() != -1
    assert accepts(port) and proxy.config.clusters[0].endpoints[0].listen.host == "127.0.0.1"
    # The same move to a host that exists: the new socket is bound beside the old, then swapped.
    good = copy.deepcopy(doc)
    good["clusters"][0]["endpoints"][0]["listen"] = f"0.0.0.0:{port}"
    changes = await proxy.reload(config(good))
    assert "endpoint rw moved" in changes
    new_sock = proxy._listeners[("app", "rw")].sock
    assert new_sock.getsockname() == ("0.0.0.0", port) and old_sock.fileno() == -1
    assert accepts(port)
    # ...and nothing else may now take the port from under it.
    with socket.socket() as intruder:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))
            intruder.listen(1)
    proxy._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


async def test_a_failed_reload_changes_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    port, taken_port = free_port(), free_port()
    doc = document(port)
    proxy = await start(nursery, config(doc))
    before = proxy.config
    taken = socket.socket()
    taken.bind(("127.0.0.1", taken_port))
    taken.listen(1)
    try:
        new = copy.deepcopy(doc)
        c = new["clusters"][0]
        c["users"] = [{"name": "app", "password": "rotated"}]  # one user removed, one changed
        c["endpoints"].append({"name": "added", "listen": f"127.0.0.1:{free_port()}", "kind": "reader"})
        c["endpoints"].append({"name": "clash", "listen": f"127.0.0.1:{taken_port}", "kind": "reader"})
        new["clusters"].append({**copy.deepcopy(c), "name": "second", "endpoints": []})
        with pytest.raises(ReloadError, match="endpoint clash"):
            await proxy.reload(config(new))
    finally:
        taken.close()
    assert proxy.config is before
    cluster = proxy.clusters["app"]
    assert set(proxy.clusters) == {"app"} and cluster.config is before.clusters[0]
    assert cluster.config.user("gone-soon") is not None and cluster.pg_backend_credential("app").password == "one"
    assert set(proxy._listeners) == {("app", "rw")}
    added_port = int(new["clusters"][0]["endpoints"][1]["listen"].rsplit(":", 1)[1])
    assert not accepts(added_port)  # what the failed reload had opened is closed again
    # Bad [tls] files: refused whole too.
    cert, key = write_self_signed(tmp_path)
    key.write_text("not a key")
    with_tls = copy.deepcopy(doc)
    with_tls["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    with_tls["clusters"][0]["users"] = [{"name": "app", "password": "rotated"}]
    with pytest.raises(ReloadError, match=r"\[tls\]"):
        await proxy.reload(config(with_tls))
    assert proxy.config is before and proxy.tls_context is None
    # And a good one applies all of it.
    changes = await proxy.reload(config(new | {"clusters": [new["clusters"][0]]}))
    assert "cluster app: user gone-soon removed" in changes and "cluster app: user app changed" in changes
    assert proxy.clusters["app"].config.user("gone-soon") is None
    assert proxy.clusters["app"].pg_backend_credential("app").password == "rotated"
    assert accepts(added_port)
    proxy._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


def peer_certificate(port: int) -> bytes:
    """The certificate an endpoint presents after a PostgreSQL SSLRequest."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(struct.pack("!II", 8, 80877103))
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            cert = tls.getpeercert(binary_form=True)
            assert cert is not None
            return cert


async def test_tls_certificates_are_read_again(nursery: trio.Nursery, tmp_path: Path) -> None:
    port = free_port()
    cert, key = write_self_signed(tmp_path)
    doc = document(port)
    doc["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    proxy = await start(nursery, config(doc))
    first = await trio.to_thread.run_sync(peer_certificate, port)
    assert first == ssl.PEM_cert_to_DER_cert(cert.read_text())
    write_self_signed(tmp_path)  # rotated in place: same paths, new files
    changes = await proxy.reload(config(doc))
    assert "[tls] certificate and key read again" in changes
    second = await trio.to_thread.run_sync(peer_certificate, port)
    assert second == ssl.PEM_cert_to_DER_cert(cert.read_text()) and second != first
    proxy._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


# --- worker processes -------------------------------------------------------------------------------


async def two_workers(nursery: trio.Nursery, doc: dict[str, Any], runtime: Path) -> tuple[Proxy, Proxy]:
    cfg = config(doc)
    workers = []
    for index in range(2):
        workers.append(await start(nursery, cfg, worker_index=index, workers=2, runtime_dir=str(runtime)))
    return workers[0], workers[1]


async def test_a_reload_reaches_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    port = free_port()
    doc = document(port)
    zero, one = await two_workers(nursery, doc, tmp_path)
    new = copy.deepcopy(doc)
    new["clusters"][0]["users"] = [{"name": "app", "password": "one"}]
    extra_port = free_port()
    new["clusters"][0]["endpoints"].append({"name": "r", "listen": f"127.0.0.1:{extra_port}", "kind": "reader"})
    await zero.reload(config(new))
    for worker in (zero, one):
        assert worker.clusters["app"].config.user("gone-soon") is None
        assert ("app", "r") in worker._listeners
    # A reload that reaches worker 1 first (the console's RELOAD on a session it holds) is
    # run by worker 0 for both.
    newer = copy.deepcopy(new)
    newer["clusters"][0]["users"].append({"name": "back", "password": "three"})
    await one.reload(config(newer))
    for worker in (zero, one):
        assert worker.clusters["app"].config.user("back") is not None
    zero._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
    one._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


async def test_a_worker_that_refuses_stops_the_reload_everywhere(nursery: trio.Nursery, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    doc = document(port)
    zero, one = await two_workers(nursery, doc, tmp_path)
    before = (zero.config, one.config)
    original = Proxy._prepare

    async def refusing(self: Proxy, new: Config) -> Any:
        if self is one:
            raise ReloadError("worker 1 cannot bind (simulated)")
        return await original(self, new)

    monkeypatch.setattr(Proxy, "_prepare", refusing)
    new = copy.deepcopy(doc)
    new["clusters"][0]["users"] = [{"name": "app", "password": "one"}]
    extra_port = free_port()
    new["clusters"][0]["endpoints"].append({"name": "r", "listen": f"127.0.0.1:{extra_port}", "kind": "reader"})
    with pytest.raises(ReloadError, match="simulated"):
        await zero.reload(config(new))
    assert (zero.config, one.config) == before
    assert zero.clusters["app"].config.user("gone-soon") is not None
    assert ("app", "r") not in zero._listeners and not accepts(extra_port)
    # Worker 1 unreachable: the same.
    monkeypatch.setattr(Proxy, "_prepare", original)
    one._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
    await trio.sleep(0.1)
    (tmp_path / "control-1.sock").unlink(missing_ok=True)
    with pytest.raises(ReloadError, match="worker 1"):
        await zero.reload(config(new))
    assert zero.config is before[0] and not accepts(extra_port)
    zero._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


async def test_queued_connections_of_a_moved_listener_are_served_not_reset(nursery: trio.Nursery) -> None:
    port, new_port = free_port(), free_port()
    doc = document(port)
    proxy = await start(nursery, config(doc))
    listener = proxy._listeners[("app", "rw")]
    listener.scope.cancel()  # hold its accept loop so connections wait in the queue
    await trio.sleep(0.05)
    waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    moved = copy.deepcopy(doc)
    moved["clusters"][0]["endpoints"][0]["listen"] = f"127.0.0.1:{new_port}"
    before = len(proxy.sessions)
    await proxy.reload(config(moved))
    with trio.fail_after(5):
        while len(proxy.sessions) < before + 3:
            await trio.sleep(0.01)
    for conn in waiting:
        # An SSLRequest gets its answer from a session (N: no [tls]): the connection lives.
        conn.sendall(struct.pack("!II", 8, 80877103))
        conn.settimeout(5)
        assert await trio.to_thread.run_sync(conn.recv, 1) == b"N"
        conn.close()
    assert not accepts(port) and accepts(new_port)
    proxy._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


@pytest.fixture(autouse=True)
def quick_control_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "CONTROL_TIMEOUT_S", 5.0)
