"""Fault injection through a real proxy in front of the shared clusters: every kind is listed,
acts where the monitor sees it (probes, the lag rule) and lifts by itself; the metrics and the
status page (headless Chromium) show it. (Faults on live session connections are the sessions'
part: tested with them.)"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, my_proxy_config, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

ADMIN = {"name": "admin", "password": "admin-secret"}
CHROMIUM = "/usr/bin/chromium"
KINDS = ("instance_failure", "read_replica_failure", "latency", "bandwidth", "slicer", "reset", "replica_lag")


def admin_request(proxy: ProxyProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    host, port = proxy.doc["admin"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    basic = base64.b64encode(f"{ADMIN['name']}:{ADMIN['password']}".encode()).decode()
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Authorization": f"Basic {basic}"})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if path != "/metrics" else data.decode()
    finally:
        conn.close()


def cluster_doc(proxy: ProxyProcess) -> dict[str, Any]:
    cluster: dict[str, Any] = admin_request(proxy, "GET", "/topology")[1]["clusters"][0]
    return cluster


def instance(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    return next(i for i in cluster_doc(proxy)["instances"] if i["name"] == name)


def members(proxy: ProxyProcess, endpoint: str) -> list[str]:
    return next(e for e in cluster_doc(proxy)["endpoints"] if e["name"] == endpoint)["members"]


def faults_active(proxy: ProxyProcess) -> dict[str, float]:
    text = admin_request(proxy, "GET", "/metrics")[1]
    return {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "endpoint_proxy_faults_active"}


def events(proxy: ProxyProcess) -> list[tuple[str, str | None]]:
    doc = admin_request(proxy, "GET", "/history")[1]
    return [(e["kind"], e["instance"]) for e in doc["clusters"][0]["events"]]


def console(proxy: ProxyProcess, sql: str) -> list[dict[str, str]]:
    env = {**os.environ, "PGPASSWORD": ADMIN["password"], "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(proxy.port("writer")), "-U", ADMIN["name"],
                          "endpoint_proxy", "--csv", "-v", "ON_ERROR_STOP=1", "-c", sql],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return list(csv.DictReader(io.StringIO(out.stdout)))


@pytest.fixture(scope="module")
def proxy(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    doc = pg_proxy_config(pg_cluster, health_check_interval_ms=100, max_replica_lag_ms=1000)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}", "users": [ADMIN]}
    with ProxyProcess(doc, tmp_path_factory.mktemp("faults-proxy")) as proxy:
        wait_until(lambda: members(proxy, "reader") == ["pg1", "pg2"], 20, "both replicas in rotation")
        yield proxy


def test_instance_failure_of_a_replica_and_its_expiry(proxy: ProxyProcess) -> None:
    status, answer = admin_request(proxy, "POST", "/faults", {"kind": "instance_failure", "instance": "pg1",
                                                              "seconds": 2})
    assert status == 200, answer
    wait_until(lambda: instance(proxy, "pg1")["health"] == "down", 5, "pg1 seen down")
    assert "simulated instance failure" in instance(proxy, "pg1")["last_error"]
    assert members(proxy, "reader") == ["pg2"]
    assert [f["kind"] for f in admin_request(proxy, "GET", "/faults")[1]["faults"]] == ["instance_failure"]
    assert faults_active(proxy)["instance_failure"] == 1
    wait_until(lambda: instance(proxy, "pg1")["health"] == "up", 10, "pg1 back after two seconds")
    assert members(proxy, "reader") == ["pg1", "pg2"]
    assert admin_request(proxy, "GET", "/faults")[1] == {"faults": []}
    assert faults_active(proxy)["instance_failure"] == 0
    seen = events(proxy)
    assert ("fault_started", "pg1") in seen and ("instance_down", "pg1") in seen and ("fault_lifted", "pg1") in seen


def test_replica_lag_takes_a_replica_out_of_rotation_until_cleared(proxy: ProxyProcess) -> None:
    (fault,) = console(proxy, "SIMULATE REPLICA LAG pg2 5000 FOR 60 SECONDS")
    assert (fault["kind"], fault["instance"]) == ("replica_lag", "pg2")
    wait_until(lambda: members(proxy, "reader") == ["pg1"], 5, "pg2 out of the reader endpoint")
    assert instance(proxy, "pg2")["lag_ms"] >= 5000
    assert [r["kind"] for r in console(proxy, "SHOW FAULTS")] == ["replica_lag"]
    console(proxy, "CLEAR FAULTS")
    wait_until(lambda: members(proxy, "reader") == ["pg1", "pg2"], 5, "pg2 back in rotation")
    assert console(proxy, "SHOW FAULTS") == []


def test_every_fault_kind_is_listed_counted_and_lifts_by_itself(proxy: ProxyProcess) -> None:
    commands = [
        "SIMULATE INSTANCE FAILURE pg2 FOR 2 SECONDS",
        "SIMULATE 50 PERCENT READ REPLICA FAILURE FOR 2 SECONDS",
        "SIMULATE LATENCY 20 JITTER 5 TO pg1 FOR 2 SECONDS",
        "SIMULATE BANDWIDTH 100 TO pg1 FOR 2 SECONDS",
        "SIMULATE SLICER SIZE 16 DELAY 1 TO pg1 FOR 2 SECONDS",
        "SIMULATE RESET AFTER 100 TO pg1 FOR 2 SECONDS",
        "SIMULATE REPLICA LAG pg1 3000 FOR 2 SECONDS",
    ]
    for command in commands:
        console(proxy, command)
    assert sorted(r["kind"] for r in console(proxy, "SHOW FAULTS")) == sorted(KINDS)
    assert faults_active(proxy) == dict.fromkeys(KINDS, 1)
    topo = cluster_doc(proxy)
    assert sorted(f["kind"] for f in topo["faults"]) == sorted(KINDS)
    wait_until(lambda: console(proxy, "SHOW FAULTS") == [], 10, "every fault to lift")
    assert faults_active(proxy) == dict.fromkeys(KINDS, 0)
    wait_until(lambda: members(proxy, "reader") == ["pg1", "pg2"], 10, "both replicas back")
    lifted = [k for k, _ in events(proxy)].count("fault_lifted")
    assert lifted >= len(commands)


def test_a_writer_failure_without_promotion_holds_until_it_lifts(proxy: ProxyProcess,
                                                                 pg_cluster: PostgresCluster) -> None:
    console(proxy, f"SIMULATE INSTANCE FAILURE {pg_cluster.primary_name} FOR 2 SECONDS")
    wait_until(lambda: cluster_doc(proxy)["writer"] is None, 5, "the writer seen gone")
    assert cluster_doc(proxy)["status"] == "failing-over"
    assert admin_request(proxy, "GET", "/readyz")[0] == 503
    wait_until(lambda: cluster_doc(proxy)["writer"] == pg_cluster.primary_name, 10, "the same writer back")
    assert cluster_doc(proxy)["last_switchover"] is None  # promotion = none: nothing was promoted


def test_status_page_charts_and_timeline_in_headless_chromium(proxy: ProxyProcess, pg_cluster: PostgresCluster,
                                                              tmp_path: Path) -> None:
    assert shutil.which(CHROMIUM), "chromium is missing: scripts/bootstrap.sh installs it"
    env = {**os.environ, "PGPASSWORD": pg_cluster.app_password, "PGSSLMODE": "disable"}
    port = str(proxy.port("writer"))
    script = tmp_path / "select.sql"
    script.write_text("select 1;\n")
    bench = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", port, "-U", pg_cluster.app_user, "-n", "-c", "2",
                            "-T", "3", "-f", str(script), pg_cluster.database],
                           env=env, capture_output=True, text=True, timeout=60)
    assert bench.returncode == 0, bench.stderr
    console(proxy, "SIMULATE REPLICA LAG pg2 5000 FOR 120 SECONDS")

    def charted() -> bool:
        doc = admin_request(proxy, "GET", "/history")[1]
        writer = next(e for e in doc["clusters"][0]["endpoints"] if e["name"] == "writer")
        return sum(1 for p in writer["points"] if p[1] > 0) >= 2

    wait_until(charted, 10, "the writer endpoint's statements in the series")
    shot = tmp_path / "status.png"
    url = f"http://{ADMIN['name']}:{ADMIN['password']}@{proxy.doc['admin']['listen']}/"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1100", "--virtual-time-budget=3000",
         f"--screenshot={shot}", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    console(proxy, "CLEAR FAULTS")
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert shot.is_file() and shot.stat().st_size > 20_000
    writer_row = dom[dom.index('data-endpoint="writer"'):]
    writer_row = writer_row[:writer_row.index("</tr>")]
    rate = writer_row[writer_row.index('data-chart="rate"'):]
    points = int(rate.split('data-points="', 1)[1].split('"', 1)[0])
    assert points >= 2 and "<path" in rate.split("</svg>", 1)[0]  # a drawn line, not an empty box
    assert 'data-chart="p99"' in writer_row
    assert 'data-faults="1"' in dom and 'data-fault="replica_lag"' in dom
    assert 'data-event-kind="fault_started"' in dom  # a mark on the timeline
    assert 'data-event="fault_started"' in dom and 'data-event="writer_changed"' in dom  # and the list
    assert "promotion: none" in dom
    assert 'id="dot" class="dot ok"' in dom


# --- MariaDB ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def my_proxy_with_admin(my_cluster: MariaDBCluster,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    doc = my_proxy_config(my_cluster, health_check_interval_ms=100, max_replica_lag_ms=1000)
    doc["clusters"] = doc["clusters"][:1]
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    with ProxyProcess(doc, tmp_path_factory.mktemp("my-faults-proxy")) as proxy:
        wait_until(lambda: members(proxy, "reader") == ["my1", "my2"], 20, "both replicas in rotation")
        yield proxy


def test_mariadb_instance_failure_and_replica_lag(my_proxy_with_admin: ProxyProcess) -> None:
    proxy = my_proxy_with_admin
    status, _ = admin_request(proxy, "POST", "/faults", {"command": "SIMULATE INSTANCE FAILURE my1 FOR 2 SECONDS"})
    assert status == 200
    status, _ = admin_request(proxy, "POST", "/faults", {"kind": "replica_lag", "instance": "my2", "lag_ms": 4000,
                                                         "seconds": 2})
    assert status == 200
    wait_until(lambda: members(proxy, "reader") == [], 5, "both replicas out of rotation")
    assert instance(proxy, "my1")["health"] == "down" and instance(proxy, "my2")["health"] == "up"
    wait_until(lambda: members(proxy, "reader") == ["my1", "my2"], 10, "both back when the faults lift")
    assert admin_request(proxy, "GET", "/faults")[1] == {"faults": []}
