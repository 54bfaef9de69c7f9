"""The admin HTTP server of a real proxy process in front of the real cluster, and its status page
rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


def admin_port(proxy: ProxyProcess) -> int:
    return int(proxy.doc["admin"]["listen"].rsplit(":", 1)[1])


def request(proxy: ProxyProcess, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port(proxy), timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_request(proxy: ProxyProcess, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", admin_port(proxy)), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return int(out.split(b" ", 2)[1])


def topology(proxy: ProxyProcess) -> dict[str, Any]:
    status, _, body = request(proxy, "/topology")
    assert status == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


@pytest.fixture(scope="module")
def admin_proxy(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    doc = pg_proxy_config(pg_cluster)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    with ProxyProcess(doc, tmp_path_factory.mktemp("admin-proxy")) as proxy:
        wait_until(lambda: request(proxy, "/readyz")[0] == 200, 20, "the proxy to be ready")
        yield proxy


def settled(proxy: ProxyProcess, cluster: PostgresCluster) -> dict[str, Any] | None:
    """The topology once every instance is up with its role and the replicas are in reader rotation."""
    doc = topology(proxy)
    c = doc["clusters"][0]
    replicas = sorted(i.name for i in cluster.instances if i.name != cluster.primary_name)
    ok = (all(i["health"] == "up" for i in c["instances"])
          and c["writer"] == cluster.primary_name
          and next(e for e in c["endpoints"] if e["name"] == "reader")["members"] == replicas)
    return doc if ok else None


def test_healthz_and_readyz(admin_proxy: ProxyProcess) -> None:
    assert request(admin_proxy, "/healthz")[::2] == (200, b"ok\n")
    status, headers, body = request(admin_proxy, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True})
    assert headers["content-type"] == "application/json"


def test_topology_matches_the_cluster(admin_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    doc = wait_until(lambda: settled(admin_proxy, pg_cluster), 20, "a settled topology")
    (c,) = doc["clusters"]
    primary = pg_cluster.primary_name
    names = [i.name for i in pg_cluster.instances]
    replicas = [n for n in names if n != primary]
    assert (c["name"], c["protocol"], c["status"], c["writer"]) == ("pg", "postgresql", "available", primary)
    assert [i["name"] for i in c["instances"]] == names
    for inst in c["instances"]:
        real = pg_cluster.instance(inst["name"])
        assert inst["address"] == f"{real.host}:{real.port}"
        assert inst["role"] == ("writer" if inst["name"] == primary else "reader")
        assert inst["is_writer"] == (inst["name"] == primary)
        assert inst["fenced"] is False and inst["last_error"] is None
        assert isinstance(inst["lag_bytes"], int) and isinstance(inst["lag_ms"], float)
    assert isinstance(c["instances"][names.index(primary)]["timeline"], int)

    expected_members = {
        "writer": [primary],
        "reader": replicas,
        "inst1": [names[1]],
        "custom_r": [names[1]],
        "custom_any": [names[0]],
    }
    endpoints = {e["name"]: e for e in c["endpoints"]}
    assert set(endpoints) == {e["name"] for e in admin_proxy.doc["clusters"][0]["endpoints"]}
    for name, members in expected_members.items():
        assert endpoints[name]["members"] == members, name
    for name, ep in endpoints.items():
        assert ep["listen"] == admin_proxy.endpoint(name)["listen"]
        assert ep["kind"] == admin_proxy.endpoint(name)["kind"]


def samples(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = request(proxy, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_metrics(admin_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    wait_until(lambda: settled(admin_proxy, pg_cluster), 20, "a settled topology")

    async def one_session() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=admin_proxy.port("writer"), user=pg_cluster.app_user,
                                     password=pg_cluster.app_password, database=pg_cluster.database,
                                     ssl=False, timeout=10)
        await conn.fetchval("select 1")
        await conn.close()

    asyncio.run(one_session())
    s = samples(admin_proxy)

    def value(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted({"cluster": "pg", **labels}.items())))]

    for inst in pg_cluster.instances:
        assert value("endpoint_proxy_instance_up", instance=inst.name) == 1
        role = "writer" if inst.name == pg_cluster.primary_name else "reader"
        assert value("endpoint_proxy_instance_role", instance=inst.name, role=role) == 1
        assert value("endpoint_proxy_instance_role", instance=inst.name, role="fenced") == 0
        assert value("endpoint_proxy_instance_lag_bytes", instance=inst.name) >= 0
        assert ("endpoint_proxy_backend_connections",
                (("cluster", "pg"), ("instance", inst.name))) in s
    assert value("endpoint_proxy_cluster_writer_known") == 1
    assert value("endpoint_proxy_endpoint_members", endpoint="reader") == 2
    wait_until(lambda: samples(admin_proxy)[("endpoint_proxy_client_connections",
                                             (("cluster", "pg"), ("endpoint", "writer")))] == 0,
               5, "the session to be counted closed")
    assert value("endpoint_proxy_client_connections_accepted_total", endpoint="writer") >= 1
    assert value("endpoint_proxy_writer_changes_total") == 0
    assert value("endpoint_proxy_held_statements") == 0


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /no-such-page HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"PUT /topology HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"this is not http\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno-colon\r\n\r\n", 400),
    (b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
])
def test_error_statuses(admin_proxy: ProxyProcess, data: bytes, status: int) -> None:
    assert raw_request(admin_proxy, data) == status
    assert request(admin_proxy, "/healthz")[0] == 200  # and the server goes on


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1200,800", "--virtual-time-budget=3000", *args],
        capture_output=True, text=True, timeout=120)


def test_status_page_in_headless_chromium(admin_proxy: ProxyProcess, pg_cluster: PostgresCluster,
                                          tmp_path: Path) -> None:
    assert shutil.which(CHROMIUM), "chromium is missing: scripts/bootstrap.sh installs it"
    wait_until(lambda: settled(admin_proxy, pg_cluster), 20, "a settled topology")
    shot = tmp_path / "status.png"
    url = f"http://127.0.0.1:{admin_port(admin_proxy)}/"
    out = chromium([f"--screenshot={shot}", "--dump-dom", url], tmp_path / "profile")
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    # The page rendered the live topology: every instance, its role, the writer named.
    assert 'data-cluster="pg"' in dom
    for inst in pg_cluster.instances:
        role = "writer" if inst.name == pg_cluster.primary_name else "reader"
        assert f'data-instance="{inst.name}" data-role="{role}"' in dom, dom[-3000:]
        assert f"127.0.0.1:{inst.port}" in dom
    assert f"writer <b>{pg_cluster.primary_name}</b>" in dom
    assert "available" in dom
    for ep in admin_proxy.doc["clusters"][0]["endpoints"]:
        assert f'data-endpoint="{ep["name"]}"' in dom
    assert 'id="dot" class="dot ok"' in dom  # the last fetch of /topology succeeded
