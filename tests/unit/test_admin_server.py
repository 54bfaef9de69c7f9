"""The admin HTTP server in process, over real sockets, with a topology fed by hand (no database)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from endpoint_proxy.admin import http as admin
from endpoint_proxy.admin.collectors import TopologyCollector
from endpoint_proxy.admin.http import AdminServer
from endpoint_proxy.app import open_listener
from endpoint_proxy.config import Address, parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.topology.state import ProbeResult

DOC: dict[str, Any] = {
    "clusters": [{
        "name": "app",
        "protocol": "postgresql",
        "failover_timeout_ms": 30_000,
        "users": [{"name": "u", "password": "p"}],
        "instances": [{"name": "a", "host": "10.0.0.1", "port": 5432},
                      {"name": "b", "host": "10.0.0.2", "port": 5433},
                      {"name": "c", "host": "10.0.0.3", "port": 5434}],
        "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "writer"},
                      {"name": "ro", "listen": "127.0.0.1:0", "kind": "reader"},
                      {"name": "only_c", "listen": "127.0.0.1:0", "kind": "instance", "instance": "c"}],
    }],
}


@dataclass
class Source:
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    clusters: dict[str, ClusterRuntime] = field(default_factory=dict)
    bound: dict[str, Address] = field(default_factory=dict)


@dataclass
class Harness:
    source: Source
    server: AdminServer
    port: int

    @property
    def cluster(self) -> ClusterRuntime:
        return self.source.clusters["app"]

    def probe(self, name: str, *, in_recovery: bool, lsn: int = 1000, timeline: int = 1) -> None:
        result = (ProbeResult(in_recovery=False, current_lsn=lsn, timeline=timeline) if not in_recovery
                  else ProbeResult(in_recovery=True, receive_lsn=lsn, replay_lsn=lsn))
        self.cluster._apply(self.cluster.topology.probe_succeeded(name, trio.current_time(), result=result))

    def fail(self, name: str) -> None:
        self.cluster._apply(self.cluster.topology.probe_failed(name, trio.current_time(), "connection refused"))

    async def raw(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(data)
            out = bytearray()
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    out += chunk
        head, _, body = bytes(out).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert int(headers["content-length"]) == len(body) or not body
        return status, headers, body

    async def get(self, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        extra = f"Content-Length: {len(body)}\r\n" if body else ""
        return await self.raw(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode() + body)

    async def json(self, path: str) -> tuple[int, Any]:
        status, headers, body = await self.get(path)
        assert headers["content-type"] == "application/json"
        return status, json.loads(body)


async def start(nursery: trio.Nursery, reload: Any = None) -> Harness:
    config = parse_config(DOC)
    source = Source()
    for c in config.clusters:
        source.clusters[c.name] = ClusterRuntime(c, source.metrics.cluster(c.name))
    source.metrics.registry.register(TopologyCollector(lambda: source.clusters.values()))
    source.bound["app/rw"] = Address("127.0.0.1", 7001)
    sock = open_listener(Address("127.0.0.1", 0), reuse_port=False)
    port = sock.getsockname()[1]
    server = AdminServer(source, reload=reload)
    await nursery.start(server.serve, sock)
    return Harness(source, server, port)


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    yield await start(nursery)


async def test_healthz_and_readiness_follow_the_writer(harness: Harness) -> None:
    status, headers, body = await harness.get("/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    assert await harness.json("/readyz") == (503, {"ready": False, "clusters_without_writer": ["app"]})
    harness.probe("a", in_recovery=False)
    assert await harness.json("/readyz") == (200, {"ready": True})


async def test_topology_document(harness: Harness) -> None:
    status, doc = await harness.json("/topology")
    assert status == 200
    (c,) = doc["clusters"]
    assert (c["name"], c["protocol"], c["status"], c["writer"]) == ("app", "postgresql", "no-writer", None)
    assert [i["role"] for i in c["instances"]] == ["unknown"] * 3
    assert [i["health"] for i in c["instances"]] == ["unknown"] * 3

    harness.probe("a", in_recovery=False, lsn=5000)
    harness.probe("b", in_recovery=True, lsn=5000)
    harness.probe("c", in_recovery=True, lsn=4000)
    harness.cluster.connections["b"] += 2
    _, doc = await harness.json("/topology")
    (c,) = doc["clusters"]
    assert (c["status"], c["writer"]) == ("available", "a")
    inst = {i["name"]: i for i in c["instances"]}
    assert inst["a"]["address"] == "10.0.0.1:5432"
    assert (inst["a"]["role"], inst["a"]["health"], inst["a"]["is_writer"]) == ("writer", "up", True)
    assert (inst["b"]["role"], inst["b"]["lag_bytes"], inst["b"]["connections"]) == ("reader", 0, 2)
    assert inst["c"]["lag_bytes"] == 1000
    assert inst["a"]["timeline"] == 1 and inst["a"]["fenced"] is False and inst["a"]["last_error"] is None
    eps = {e["name"]: e for e in c["endpoints"]}
    assert eps["rw"] == {"name": "rw", "kind": "writer", "listen": "127.0.0.1:7001", "members": ["a"],
                         "statements": None, "statements_per_s": None, "p50_ms": None, "p99_ms": None}
    assert eps["ro"]["listen"] == "127.0.0.1:0"  # not bound: the configured address
    assert eps["ro"]["members"] == ["b", "c"]
    assert eps["only_c"]["members"] == ["c"] and eps["only_c"]["instance"] == "c"

    harness.fail("a")
    _, doc = await harness.json("/topology")
    (c,) = doc["clusters"]
    assert (c["status"], c["writer"]) == ("failing-over", None)
    assert c["writer_lost_ms"] >= 0
    a = c["instances"][0]
    assert (a["health"], a["last_error"]) == ("down", "connection refused")
    assert c["endpoints"][0]["members"] == []


async def test_metrics_reflect_topology_and_failover(harness: Harness) -> None:
    harness.probe("a", in_recovery=False)
    harness.probe("b", in_recovery=True)
    ep = harness.cluster.metrics.endpoint("rw")
    ep.client_connected()
    ep.statement("writer")
    ep.statement("writer")
    harness.cluster.metrics.error("no_route")
    with harness.cluster.metrics.holding():
        harness.fail("a")
        await trio.sleep(0.05)
        harness.probe("b", in_recovery=False, timeline=2)

    status, headers, body = await harness.get("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("endpoint_proxy_instance_up", cluster="app", instance="a") == 0
    assert value("endpoint_proxy_instance_up", cluster="app", instance="b") == 1
    assert value("endpoint_proxy_instance_up", cluster="app", instance="c") == 0
    assert value("endpoint_proxy_instance_role", cluster="app", instance="b", role="writer") == 1
    assert value("endpoint_proxy_instance_role", cluster="app", instance="b", role="reader") == 0
    assert value("endpoint_proxy_cluster_writer_known", cluster="app") == 1
    assert value("endpoint_proxy_endpoint_members", cluster="app", endpoint="rw") == 1
    assert value("endpoint_proxy_client_connections", cluster="app", endpoint="rw") == 1
    assert value("endpoint_proxy_client_connections_accepted_total", cluster="app", endpoint="rw") == 1
    assert value("endpoint_proxy_statements_total", cluster="app", endpoint="rw", route="writer") == 2
    assert value("endpoint_proxy_writer_changes_total", cluster="app") == 1
    assert value("endpoint_proxy_failover_duration_seconds_count", cluster="app") == 1
    assert value("endpoint_proxy_failover_duration_seconds_sum", cluster="app") >= 0.05
    assert value("endpoint_proxy_held_statements", cluster="app") == 0
    assert value("endpoint_proxy_statements_held_total", cluster="app") == 1
    assert value("endpoint_proxy_errors_total", cluster="app", kind="no_route") == 1
    assert value("endpoint_proxy_backend_connections", cluster="app", instance="b") == 0
    assert not any(name.endswith("_created") for name, _ in samples)


async def test_first_writer_and_a_returning_writer_are_not_changes(harness: Harness) -> None:
    cm = harness.cluster.metrics
    harness.probe("a", in_recovery=False)
    harness.fail("a")
    harness.probe("a", in_recovery=False)
    assert cm.writer == "a" and cm.writer_lost_at is None
    samples = {s.name: s.value for fam in text_string_to_metric_families(
        (await harness.get("/metrics"))[2].decode()) for s in fam.samples if s.labels.get("cluster") == "app"}
    assert samples["endpoint_proxy_writer_changes_total"] == 0
    assert samples["endpoint_proxy_failover_duration_seconds_count"] == 1


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    (b"GET /reload HTTP/1.1\r\n\r\n", 404),  # no reload callback
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /topology HTTP/1.1\r\n\r\n", 405),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
    (b"GET / HTTP/3.0\r\n\r\n", 505),
    (b"POST /x HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", 413),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 431),
])
async def test_error_statuses(harness: Harness, request_bytes: bytes, status: int) -> None:
    got, headers, body = await harness.raw(request_bytes)
    assert got == status
    assert "error" in json.loads(body)
    if status == 405:
        assert "GET" in headers["allow"] and "HEAD" in headers["allow"]


async def test_head_has_no_body(harness: Harness) -> None:
    status, headers, body = await harness.get("/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "3"


async def test_status_page_is_self_contained(harness: Harness) -> None:
    status, headers, body = await harness.get("/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    text = body.decode()
    assert text.startswith("<!doctype html>") and "fetch(new URL(\"topology\", base)" in text
    # The SVG namespace is a name, never fetched; any other URL would be a resource.
    text = text.replace('"http://www.w3.org/2000/svg"', "")
    assert "http://" not in text and "https://" not in text


async def test_reload_callback(nursery: trio.Nursery) -> None:
    calls = []

    async def reload() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("clusters[0].name: is required")

    h = await start(nursery, reload=reload)
    status, _, body = await h.get("/reload", method="POST")
    assert (status, json.loads(body)) == (200, {"ok": True})
    status, _, body = await h.get("/reload", method="POST", body=b"{}")
    assert (status, json.loads(body)) == (400, {"ok": False, "error": "clusters[0].name: is required"})
    status, headers, _ = await h.get("/reload")
    assert status == 405 and headers["allow"] == "POST"


async def test_a_slow_client_does_not_block_others(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT_S", 0.5)
    slow = await trio.open_tcp_stream("127.0.0.1", harness.port)
    async with slow:
        await slow.send_all(b"GET /healthz HTTP/1.1\r\nHost:")  # and then nothing
        with trio.fail_after(0.4):
            status, _, _ = await harness.get("/healthz")
        assert status == 200
        out = bytearray()
        with trio.fail_after(3):
            while chunk := await slow.receive_some(4096):
                out += chunk
        assert out.startswith(b"HTTP/1.1 408 ")


async def test_idle_sockets_cannot_starve_healthz(harness: Harness) -> None:
    # Every request slot held by a socket that never sends a byte (64 of them used to turn
    # /healthz into 503, and a liveness probe into a restart of a healthy proxy).
    idle = [await trio.open_tcp_stream("127.0.0.1", harness.port) for _ in range(admin.MAX_CONNECTIONS)]
    try:
        with trio.fail_after(5):
            while harness.server.active < admin.MAX_CONNECTIONS:
                await trio.sleep(0.01)
        for _ in range(3):
            with trio.fail_after(1):  # a kubelet's default probe timeout
                status, _, body = await harness.get("/healthz")
            assert (status, body) == (200, b"ok\n")
        assert harness.server.active <= admin.MAX_CONNECTIONS
        # The room was made by closing the connections that waited longest.
        with trio.fail_after(2):
            assert await idle[0].receive_some(100) == b""
    finally:
        for s in idle:
            await s.aclose()


async def test_every_slot_serving_answers_503(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "MAX_CONNECTIONS", 2)
    release = trio.Event()

    async def slow_reload() -> list[str]:
        await release.wait()
        return []

    h = await start(nursery, reload=slow_reload)
    for _ in range(2):
        nursery.start_soon(h.get, "/reload", "POST")
    with trio.fail_after(5):
        while not (h.server.active == 2 and all(not slot.waiting for slot in h.server._slots)):
            await trio.sleep(0.01)
    status, _, _ = await h.get("/healthz")
    assert status == 503  # nothing idle to close: every slot is answering a request
    release.set()
    with trio.fail_after(5):
        while h.server.active:
            await trio.sleep(0.01)
    assert (await h.get("/healthz"))[0] == 200


async def test_a_failing_handler_answers_500_and_the_server_lives_on(harness: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(admin, "topology_document", boom)
    status, _, _ = await harness.get("/topology")
    assert status == 500
    status, _, _ = await harness.get("/healthz")
    assert status == 200
