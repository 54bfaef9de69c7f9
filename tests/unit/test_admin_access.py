"""Admin HTTP access control, TLS and /healthz's liveness checks, in process over real sockets."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from endpoint_proxy.admin import http as admin
from endpoint_proxy.admin.http import AdminAccess, AdminServer, basic_credentials, cross_site, parse_request_head
from endpoint_proxy.app import open_listener
from endpoint_proxy.config import Address, UserConfig, parse_config, parse_stored_password
from endpoint_proxy.localcluster.certs import write_self_signed
from endpoint_proxy.protocol.pg import auth as pg_auth
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics

TOKEN = "t0ken-for-the-admin-server"
VERIFIER = pg_auth.format_scram_verifier(pg_auth.make_scram_secret("ops-pass"))
USERS = {
    "admin": UserConfig("admin", password="admin-pass"),
    "ops": UserConfig("ops", stored=parse_stored_password(VERIFIER, "postgresql")),
}
DOC: dict[str, Any] = {
    "clusters": [{
        "name": "app", "protocol": "postgresql",
        "users": [{"name": "u", "password": "p"}],
        "instances": [{"name": "a", "host": "10.0.0.1", "port": 5432}],
        "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "writer"}],
    }],
}


class Source:
    def __init__(self) -> None:
        self.metrics = ProxyMetrics()
        config = parse_config(DOC)
        self.clusters = {c.name: ClusterRuntime(c, self.metrics.cluster(c.name)) for c in config.clusters}
        self.bound: dict[str, Address] = {}


class Client:
    def __init__(self, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.ssl_context = ssl_context

    async def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                      ) -> tuple[int, dict[str, list[str]], bytes]:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_hostname="localhost")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        async with stream:
            await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{extra}\r\n".encode())
            out = bytearray()
            with trio.fail_after(10):
                try:
                    while chunk := await stream.receive_some(65536):
                        out += chunk
                except trio.BrokenResourceError:
                    pass  # TLS peers may close without close_notify after Connection: close
        head, _, body = bytes(out).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        found: dict[str, list[str]] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            found.setdefault(k.lower(), []).append(v.strip())
        return int(lines[0].split(" ")[1]), found, body


async def serve(nursery: trio.Nursery, access: AdminAccess | Callable[[], AdminAccess], *,
                tls: ssl.SSLContext | None = None, liveness: Callable[[], list[str]] | None = None,
                reload: Any = None) -> tuple[AdminServer, int]:
    sock = open_listener(Address("127.0.0.1", 0), reuse_port=False)
    port = sock.getsockname()[1]
    getter = access if callable(access) else (lambda: access)
    server = AdminServer(Source(), reload=reload, access=getter, tls_context=lambda: tls, liveness=liveness)
    await nursery.start(server.serve, sock)
    return server, port


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def _noop_reload() -> list[str]:
    return []


@pytest.fixture
async def protected(nursery: trio.Nursery) -> Client:
    _, port = await serve(nursery, AdminAccess(token=TOKEN, users=USERS), reload=_noop_reload)
    return Client(port)


async def test_everything_but_health_needs_a_credential(protected: Client) -> None:
    for path, method in [("/", "GET"), ("/topology", "GET"), ("/metrics", "GET"), ("/reload", "POST"),
                         ("/nowhere", "GET"), ("/topology", "HEAD")]:
        status, headers, body = await protected.request(path, method)
        assert status == 401, path
        challenges = headers["www-authenticate"]
        assert any(c.startswith("Basic ") for c in challenges) and any(c.startswith("Bearer ") for c in challenges)
    assert (await protected.request("/healthz"))[0] == 200
    assert (await protected.request("/readyz"))[0] == 503  # public, and honest: no writer yet
    assert (await protected.request("/healthz", "HEAD"))[0] == 200


async def test_bearer_token(protected: Client) -> None:
    status, _, body = await protected.request("/topology", headers=BEARER)
    assert status == 200 and json.loads(body)["clusters"][0]["name"] == "app"
    assert (await protected.request("/reload", "POST", BEARER))[0] == 200
    for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Token {TOKEN}", TOKEN):
        assert (await protected.request("/topology", headers={"Authorization": wrong}))[0] == 401, wrong


async def test_basic_auth_with_a_user_or_the_token(protected: Client) -> None:
    assert (await protected.request("/topology", headers=basic("admin", "admin-pass")))[0] == 200
    assert (await protected.request("/topology", headers=basic("anyone", TOKEN)))[0] == 200
    for user, password in [("admin", "wrong"), ("ops", "admin-pass"), ("nobody", "admin-pass"), ("admin", "")]:
        assert (await protected.request("/topology", headers=basic(user, password)))[0] == 401
    assert (await protected.request("/topology", headers={"Authorization": "Basic !!!"}))[0] == 401


async def test_basic_auth_against_a_scram_verifier_runs_pbkdf2_once_in_a_thread(
        protected: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    derive = pg_auth.scram_keys_from_password

    def counting(password: str, salt: bytes, iterations: int) -> pg_auth.ScramKeys:
        calls.append(trio.lowlevel.in_trio_run())  # False in a worker thread
        return derive(password, salt, iterations)

    monkeypatch.setattr(admin, "scram_keys_from_password", counting)
    assert (await protected.request("/topology", headers=basic("ops", "ops-pass")))[0] == 200
    assert (await protected.request("/topology", headers=basic("ops", "ops-pass")))[0] == 200
    assert calls == [False]  # derived once, off the event loop; the second check hit the cache
    assert (await protected.request("/topology", headers=basic("ops", "nope")))[0] == 401
    assert calls == [False, False]


async def test_metrics_public(nursery: trio.Nursery) -> None:
    _, port = await serve(nursery, AdminAccess(token=TOKEN, metrics_public=True))
    client = Client(port)
    status, _, body = await client.request("/metrics")
    assert status == 200 and b"endpoint_proxy_" in body
    assert (await client.request("/topology"))[0] == 401


async def test_without_credentials_configured_everything_is_open(nursery: trio.Nursery) -> None:
    _, port = await serve(nursery, AdminAccess())
    assert (await Client(port).request("/topology"))[0] == 200


async def test_cross_site_posts_are_refused_whatever_they_carry(protected: Client, nursery: trio.Nursery) -> None:
    port = protected.port
    evil = {**BEARER, "Origin": "http://evil.example"}
    assert (await protected.request("/reload", "POST", evil))[0] == 403
    fetch = {**BEARER, "Sec-Fetch-Site": "cross-site"}
    assert (await protected.request("/reload", "POST", fetch))[0] == 403
    same = {**BEARER, "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert (await protected.request("/reload", "POST", same))[0] == 200
    # Without any credential configured (loopback only) a browser form cannot reload either.
    _, open_port = await serve(nursery, AdminAccess(), reload=_noop_reload)
    assert (await Client(open_port).request("/reload", "POST", {"Origin": "http://evil.example"}))[0] == 403
    assert (await Client(open_port).request("/reload", "POST"))[0] == 200


async def test_access_is_read_at_each_request(nursery: trio.Nursery) -> None:
    current = [AdminAccess()]
    _, port = await serve(nursery, lambda: current[0])
    client = Client(port)
    assert (await client.request("/topology"))[0] == 200
    current[0] = AdminAccess(token=TOKEN)  # a reload set a token
    assert (await client.request("/topology"))[0] == 401
    assert (await client.request("/topology", headers=BEARER))[0] == 200


async def test_admin_over_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    _, port = await serve(nursery, AdminAccess(token=TOKEN), tls=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    status, _, body = await Client(port, client_ctx).request("/topology", headers=BEARER)
    assert status == 200 and b"clusters" in body
    assert (await Client(port, client_ctx).request("/healthz"))[0] == 200
    # Plain HTTP on the TLS port gets nothing useful.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /topology HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(15):
            data = b""
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk
            except trio.BrokenResourceError:
                pass
    assert b"clusters" not in data


async def test_healthz_fails_with_liveness_problems(nursery: trio.Nursery) -> None:
    problems: list[str] = []
    _, port = await serve(nursery, AdminAccess(token=TOKEN), liveness=lambda: list(problems))
    client = Client(port)
    assert (await client.request("/healthz"))[:3:2] == (200, b"ok\n")
    problems.append("endpoint app/rw (127.0.0.1:7000): 3 connection(s) wait in the accept queue")
    status, _, body = await client.request("/healthz")
    assert status == 503 and b"endpoint app/rw" in body


def test_basic_credentials_parsing() -> None:
    assert basic_credentials(base64.b64encode(b"a:b:c").decode()) == ("a", "b:c")
    assert basic_credentials(base64.b64encode("é:ü".encode()).decode()) == ("é", "ü")
    assert basic_credentials(base64.b64encode(b"no-colon").decode()) is None
    assert basic_credentials("%%%") is None


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, False),
    ({"Origin": "http://127.0.0.1:9187"}, False),
    ({"Origin": "https://127.0.0.1:9187/"}, False),
    ({"Origin": "http://evil.example"}, True),
    ({"Origin": "http://127.0.0.1:9188"}, True),
    ({"Origin": "null"}, True),
    ({"Sec-Fetch-Site": "same-origin"}, False),
    ({"Sec-Fetch-Site": "none"}, False),
    ({"Sec-Fetch-Site": "same-site"}, True),
    ({"Sec-Fetch-Site": "cross-site"}, True),
])
def test_cross_site(headers: dict[str, str], expected: bool) -> None:
    head = "POST /reload HTTP/1.1\r\nHost: 127.0.0.1:9187\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    assert cross_site(parse_request_head(head.rstrip("\r\n").encode())) is expected
