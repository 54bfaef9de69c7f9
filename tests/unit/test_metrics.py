"""Metrics hooks: held statements around a wait for a writer, failover timing, endpoint counters."""

from __future__ import annotations

import trio
import trio.testing

from endpoint_proxy.admin.collectors import TopologyCollector
from endpoint_proxy.config import parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.topology.state import TopologyEvent

CONFIG = parse_config({"clusters": [{
    "name": "app", "protocol": "postgresql",
    "instances": [{"name": "a", "host": "127.0.0.1", "port": 1}],
    "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "writer"}],
}]})


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"cluster": "app", **labels})


async def test_a_held_statement_shows_while_it_waits_for_a_writer() -> None:
    metrics = ProxyMetrics()
    rt = ClusterRuntime(CONFIG.clusters[0], metrics.cluster("app"))
    ep = CONFIG.clusters[0].endpoints[0]
    result = []

    async def wait(held: bool) -> None:
        result.append(await rt.wait_for_route(ep, 5.0, held=held))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, True)
        nursery.start_soon(wait, False)
        await trio.testing.wait_all_tasks_blocked()
        assert sample(metrics, "endpoint_proxy_held_statements") == 1
        assert sample(metrics, "endpoint_proxy_statements_held_total") == 1
        rt._apply(rt.topology.probe_succeeded("a", trio.current_time(), in_recovery=False, timeline=1))
    assert [r.instance for r in result] == ["a", "a"]
    assert sample(metrics, "endpoint_proxy_held_statements") == 0
    assert sample(metrics, "endpoint_proxy_statements_held_total") == 1
    # With a writer known nothing waits, so nothing is held.
    await rt.wait_for_route(ep, 5.0, held=True)
    assert sample(metrics, "endpoint_proxy_statements_held_total") == 1


def test_failover_duration_and_writer_changes() -> None:
    metrics = ProxyMetrics()
    cm = metrics.cluster("app")

    def writer(name: str | None, t: float) -> None:
        cm.topology_changed([TopologyEvent("instance_up", "x"), TopologyEvent("writer_changed", name)], t)

    writer("a", 1.0)  # the first writer: not a change, not a failover
    assert sample(metrics, "endpoint_proxy_writer_changes_total") == 0
    assert sample(metrics, "endpoint_proxy_failover_duration_seconds_count") == 0
    writer(None, 10.0)
    assert cm.writer_lost_at == 10.0
    writer("b", 13.5)
    assert cm.writer_lost_at is None
    assert sample(metrics, "endpoint_proxy_writer_changes_total") == 1
    assert sample(metrics, "endpoint_proxy_failover_duration_seconds_count") == 1
    assert sample(metrics, "endpoint_proxy_failover_duration_seconds_sum") == 3.5
    assert sample(metrics, "endpoint_proxy_failover_duration_seconds_bucket", le="5.0") == 1
    assert sample(metrics, "endpoint_proxy_failover_duration_seconds_bucket", le="2.0") == 0
    writer("c", 20.0)  # a direct switch: a change with no time without a writer
    assert sample(metrics, "endpoint_proxy_writer_changes_total") == 2
    assert sample(metrics, "endpoint_proxy_failover_duration_seconds_count") == 1


def test_endpoint_counters() -> None:
    metrics = ProxyMetrics()
    em = metrics.cluster("app").endpoint("rw")
    assert metrics.cluster("app").endpoint("rw") is em
    em.client_connected()
    em.client_connected()
    em.client_disconnected()
    em.statement("writer")
    em.statement("reader")
    em.statement("reader")
    em.session_pinned("LISTEN")
    metrics.cluster("app").error("no_route")
    labels = {"endpoint": "rw"}
    assert sample(metrics, "endpoint_proxy_client_connections", **labels) == 1
    assert sample(metrics, "endpoint_proxy_client_connections_accepted_total", **labels) == 2
    assert sample(metrics, "endpoint_proxy_statements_total", route="writer", **labels) == 1
    assert sample(metrics, "endpoint_proxy_statements_total", route="reader", **labels) == 2
    assert sample(metrics, "endpoint_proxy_pinned_sessions", reason="LISTEN", **labels) == 1
    assert sample(metrics, "endpoint_proxy_errors_total", kind="no_route") == 1


def test_topology_gauges_follow_the_live_clusters() -> None:
    metrics = ProxyMetrics()
    rt = ClusterRuntime(CONFIG.clusters[0], metrics.cluster("app"))
    clusters = {"app": rt}
    metrics.registry.register(TopologyCollector(lambda: clusters.values()))
    assert sample(metrics, "endpoint_proxy_instance_up", instance="a") == 0
    assert sample(metrics, "endpoint_proxy_instance_role", instance="a", role="unknown") == 1
    rt.topology.probe_succeeded("a", 1.0, in_recovery=False, timeline=1)
    rt.connections["a"] += 3
    assert sample(metrics, "endpoint_proxy_instance_up", instance="a") == 1
    assert sample(metrics, "endpoint_proxy_instance_role", instance="a", role="writer") == 1
    assert sample(metrics, "endpoint_proxy_instance_lag_bytes", instance="a") == 0
    assert sample(metrics, "endpoint_proxy_backend_connections", instance="a") == 3
    assert sample(metrics, "endpoint_proxy_cluster_writer_known") == 1
    assert sample(metrics, "endpoint_proxy_endpoint_members", endpoint="rw") == 1
    clusters.clear()  # a reload that dropped the cluster: its gauges go with it
    assert sample(metrics, "endpoint_proxy_instance_up", instance="a") is None
