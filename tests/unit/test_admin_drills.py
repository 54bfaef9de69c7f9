"""Drills in the admin plane without a database: console SWITCHOVER / SIMULATE / SHOW FAULTS /
CLEAR FAULTS, POST /switchover, GET/POST/DELETE /faults, GET /history, and the metrics
faults_active and statement_duration_seconds."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from endpoint_proxy.admin.collectors import FaultsCollector, LatencyCollector
from endpoint_proxy.config import PromotionConfig
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.server.cluster import ClusterRuntime
from tests.unit.test_admin_console import Console, error_of, make_state, open_console, rows, table
from tests.unit.test_admin_server import Harness, start
from tests.unit.test_switchover import fake


def allow_promotion(cluster: ClusterRuntime) -> None:
    cluster.config = dataclasses.replace(cluster.config, promotion=PromotionConfig("sql", "promoter"),
                                         switchover_timeout_ms=1000)


@pytest.fixture
async def console(nursery: trio.Nursery) -> AsyncIterator[Console]:
    c = await open_console(nursery, make_state())
    await c.client.login("admin", "admin-secret")
    for name, replica in (("a", False), ("b", True), ("c", True)):
        c.state.probe(name, in_recovery=replica)
    yield c


def tag(messages: list[m.BackendMessage]) -> str:
    return next(x.tag for x in messages if isinstance(x, m.CommandComplete))


def notices(messages: list[m.BackendMessage]) -> list[str]:
    return [x.message for x in messages if isinstance(x, m.NoticeResponse)]


async def test_simulate_show_and_clear_faults(console: Console) -> None:
    q = console.client.query
    answer = await q("SIMULATE LATENCY 50 JITTER 5 TO b FOR 30 SECONDS")
    assert tag(answer) == "SIMULATE"
    (fault,) = [dict(zip(("id", "cluster", "kind", "instance", "description", "expires_in_s"), r, strict=True))
                for r in [[v.decode() if v else None for v in x.values] for x in answer if isinstance(x, m.DataRow)]]
    assert (fault["cluster"], fault["kind"], fault["instance"]) == ("app", "latency", "b")
    assert fault["description"] == "latency 50 ms \u00b1 5 ms to b"
    await q("simulate replica lag c 4000 for 1 minute")
    await q("SIMULATE 25 PERCENT READ REPLICA FAILURE FOR 10 SECONDS")
    shown = table(await q("SHOW FAULTS"))
    assert [(f["kind"], f["instance"]) for f in shown] == [("latency", "b"), ("replica_lag", "c"),
                                                           ("read_replica_failure", None)]
    assert float(shown[1]["expires_in_s"] or 0) == pytest.approx(60, abs=1)
    assert console.state.cluster.topology.simulated_lag_ms == {"c": 4000}

    answer = await q(f"CLEAR FAULT {fault['id']}")
    assert tag(answer) == "CLEAR"
    assert notices(answer) == [f"cleared fault #{fault['id']}: latency 50 ms \u00b1 5 ms to b"]
    assert error_of(await q(f"CLEAR FAULT {fault['id']}")).sqlstate == "42704"
    answer = await q("CLEAR FAULTS")
    assert len(notices(answer)) == 2
    assert rows(await q("SHOW FAULTS"))[1] == []
    assert console.state.cluster.topology.simulated_lag_ms == {}


@pytest.mark.parametrize(("sql", "sqlstate", "text"), [
    ("SIMULATE LATENCY 50 TO nowhere FOR 1 SECONDS", "22023", "no instance named 'nowhere'"),
    ("SIMULATE LATENCY TO b FOR 1 SECONDS", "22023", "expected the latency in milliseconds"),
    ("SIMULATE FLOOD", "22023", "unknown fault"),
    ("CLEAR EVERYTHING", "42601", "usage: CLEAR FAULTS"),
    ("SWITCHOVER app TO", "42601", "usage: SWITCHOVER"),
    ("SWITCHOVER", "55000", 'not configured for cluster app: set [clusters.promotion] method = "sql"'),
    ("SWITCHOVER nosuch", "55000", "no cluster named 'nosuch'"),
])
async def test_drill_command_errors(console: Console, sql: str, sqlstate: str, text: str) -> None:
    error = error_of(await console.client.query(sql))
    assert error.sqlstate == sqlstate
    assert text in error.message
    assert tag(await console.client.query("SHOW FAULTS")) == "SHOW"  # the session goes on


async def test_switchover_from_the_console(console: Console, autojump_clock: trio.testing.MockClock) -> None:
    cluster = console.state.cluster
    allow_promotion(cluster)
    fake(cluster)
    columns, data = rows_of(await console.client.query("SWITCHOVER app TO c"))
    assert columns == ["cluster", "from", "to", "outcome", "pause_ms", "detail"]
    assert data == [["app", "a", "c", "completed", "300", "old writer left read-only"]]
    assert cluster.topology.writer == "c"


async def test_an_abandoned_switchover_is_an_error_with_its_reason(
        console: Console, autojump_clock: trio.testing.MockClock) -> None:
    cluster = console.state.cluster
    allow_promotion(cluster)
    fake(cluster)
    await cluster.drills.gate.enter("a transaction that never ends")
    error = error_of(await console.client.query("SWITCHOVER TO b"))
    assert error.sqlstate == "55006"
    assert error.message == ("switchover of cluster app from a to b abandoned after 1000 ms: "
                             "1 transaction still running")
    assert cluster.topology.writer == "a"


def rows_of(messages: list[m.BackendMessage]) -> tuple[list[str], list[list[str | None]]]:
    desc = next(x for x in messages if isinstance(x, m.RowDescription))
    data = [[None if v is None else v.decode() for v in x.values] for x in messages if isinstance(x, m.DataRow)]
    return [f.name for f in desc.fields], data


async def test_show_endpoints_has_latency_once_sampled(console: Console) -> None:
    cluster = console.state.cluster
    em = cluster.metrics.endpoint("rw")
    cluster.drills.sample(0.0)
    for _ in range(10):
        em.statement("writer")
        em.statement_finished("writer", 5_000_000)
    cluster.drills.sample(1.0)
    rw = table(await console.client.query("SHOW ENDPOINTS"))[0]
    assert rw["statements"] == "10"
    assert 4.0 < float(rw["p50_ms"] or 0) <= 5.0 and 4.0 < float(rw["p99_ms"] or 0) <= 5.0


# --- HTTP --------------------------------------------------------------------------------------------


async def post(harness: Harness, path: str, doc: Any = None, method: str = "POST") -> tuple[int, Any]:
    body = b"" if doc is None else (doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    status, headers, raw = await harness.get(path, method=method, body=body)
    assert headers["content-type"] == "application/json"
    return status, json.loads(raw)


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = await start(nursery)
    h.probe("a", in_recovery=False)
    h.probe("b", in_recovery=True)
    h.probe("c", in_recovery=True)
    yield h


async def test_faults_over_http(harness: Harness) -> None:
    assert await harness.json("/faults") == (200, {"faults": []})
    status, doc = await post(harness, "/faults", {"kind": "instance_failure", "instance": "c", "seconds": 30})
    assert status == 200 and doc["ok"]
    (fault,) = doc["faults"]
    assert (fault["kind"], fault["instance"], fault["cluster"], fault["seconds"]) == ("instance_failure", "c", "app",
                                                                                      30)
    status, doc = await post(harness, "/faults", {"command": "SIMULATE RESET AFTER 10 TO app.b FOR 5 SECONDS"})
    assert status == 200 and doc["faults"][0]["after_ms"] == 10
    _, listed = await harness.json("/faults")
    assert [f["kind"] for f in listed["faults"]] == ["instance_failure", "reset"]
    _, topo = await harness.json("/topology")
    assert [f["id"] for f in topo["clusters"][0]["faults"]] == [f["id"] for f in listed["faults"]]

    status, doc = await post(harness, "/faults", {"id": fault["id"]}, method="DELETE")
    assert (status, doc) == (200, {"ok": True, "cleared": [fault["id"]]})
    status, doc = await post(harness, "/faults", None, method="DELETE")
    assert status == 200 and len(doc["cleared"]) == 1
    assert await harness.json("/faults") == (200, {"faults": []})


@pytest.mark.parametrize(("body", "status", "text"), [
    ({"kind": "latency", "instance": "b", "seconds": 1}, 400, "latency or jitter must be more than 0"),
    ({"kind": "latency", "instance": "zz", "latency_ms": 1, "seconds": 1}, 400, "no instance named 'zz'"),
    ({"kind": "instance_failure", "instance": "b", "seconds": 1, "cluster": "nope"}, 400, "no cluster named"),
    ({"command": "SIMULATE NOTHING"}, 400, "unknown fault"),
    ({"command": 5}, 400, '"command" must be a string'),
    (b"{not json", 400, "the body is not JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
])
async def test_bad_fault_requests(harness: Harness, body: Any, status: int, text: str) -> None:
    got, doc = await post(harness, "/faults", body)
    assert got == status
    assert text in (doc.get("error") or "")
    assert await harness.json("/faults") == (200, {"faults": []})


async def test_switchover_over_http(harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    status, doc = await post(harness, "/switchover", {})
    assert status == 409 and "not configured" in doc["error"] and doc["ok"] is False
    allow_promotion(harness.cluster)
    fake(harness.cluster)
    status, doc = await post(harness, "/switchover", {"cluster": "app", "to": "c"})
    assert status == 200 and doc["ok"] is True
    assert (doc["switchover"]["from"], doc["switchover"]["to"], doc["switchover"]["outcome"]) == ("a", "c",
                                                                                                  "completed")
    _, topo = await harness.json("/topology")
    c = topo["clusters"][0]
    assert c["writer"] == "c" and c["last_switchover"] == doc["switchover"] and c["promotion"] == "sql"
    await harness.cluster.drills.gate.enter("stuck")
    status, doc = await post(harness, "/switchover", {"to": "b"})
    assert status == 409 and doc["switchover"]["outcome"] == "abandoned"
    status, doc = await post(harness, "/switchover", {"to": 3})
    assert status == 400


async def test_history_over_http(harness: Harness) -> None:
    harness.cluster.metrics.endpoint("rw")
    harness.cluster.drills.sample(10.0)
    harness.cluster.drills.sample(11.0)
    status, doc = await harness.json("/history")
    assert status == 200 and isinstance(doc["now"], float)
    (c,) = doc["clusters"]
    assert c["name"] == "app" and c["interval_s"] == 1.0
    assert c["endpoints"] == [{"name": "rw", "points": [[11.0, 0.0, None, None]]}]
    assert ("writer_changed", "a") in [(e["kind"], e["instance"]) for e in c["events"]]


async def test_faults_active_and_statement_duration_metrics(harness: Harness) -> None:
    source = harness.source
    source.metrics.registry.register(FaultsCollector(lambda: source.clusters.values()))
    source.metrics.registry.register(LatencyCollector(lambda: source.clusters.values()))
    em = harness.cluster.metrics.endpoint("rw")
    for ns in (300_000, 2_000_000, 40_000_000):
        em.statement_finished("writer", ns)
    await post(harness, "/faults", {"kind": "instance_failure", "instance": "c", "seconds": 30})
    await post(harness, "/faults", {"kind": "replica_lag", "instance": "b", "lag_ms": 1, "seconds": 30})
    await post(harness, "/faults", {"kind": "replica_lag", "instance": "c", "lag_ms": 1, "seconds": 30})
    _, _, body = await harness.get("/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    def active(kind: str) -> float:
        return samples[("endpoint_proxy_faults_active", (("kind", kind),))]

    assert (active("instance_failure"), active("replica_lag"), active("latency")) == (1, 2, 0)
    labels = (("cluster", "app"), ("endpoint", "rw"), ("route", "writer"))
    assert samples[("endpoint_proxy_statement_duration_seconds_count", labels)] == 3
    assert samples[("endpoint_proxy_statement_duration_seconds_sum", labels)] == pytest.approx(0.0423)
    assert samples[("endpoint_proxy_statement_duration_seconds_bucket", (*labels[:2], ("le", "0.0005"),
                                                                         labels[2]))] == 1
    assert samples[("endpoint_proxy_statement_duration_seconds_bucket", (*labels[:2], ("le", "0.05"),
                                                                         labels[2]))] == 3
    reader = (("cluster", "app"), ("endpoint", "rw"), ("route", "reader"))
    assert samples[("endpoint_proxy_statement_duration_seconds_count", reader)] == 0
