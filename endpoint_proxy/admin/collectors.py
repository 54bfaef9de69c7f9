"""Prometheus collectors that read live state at scrape time: the topology, the relay hub, statement
latency, injected faults and the pools of server connections.

Nothing here is stored: the instance and endpoint gauges are computed from the live
``ClusterRuntime`` objects when Prometheus scrapes, so they never drift from what the proxy
routes by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..drills.faults import FAULT_KINDS
from ..drills.latency import LatencyHistogram
from ..relay.hub import Hub
from ..routing.endpoints import members
from ..server.cluster import ClusterRuntime
from ..topology.state import Role

ROLES = tuple(r.value for r in Role)


class HubCollector:
    """The relay hub's counts (see server/hub.py), read at scrape time."""

    def __init__(self, hub: Callable[[], Hub | None]) -> None:
        self.hub = hub

    @staticmethod
    def _families(events: int = 0, handbacks: int = 0, parked: int = 0) -> list[Metric]:
        return [
            CounterMetricFamily("endpoint_proxy_relay_events",
                                "socket readiness events the relay hub served (a request or an answer, mostly)",
                                value=events),
            CounterMetricFamily("endpoint_proxy_relay_handbacks",
                                "times the relay hub handed a session back to its own task (slow paths)",
                                value=handbacks),
            GaugeMetricFamily("endpoint_proxy_relay_parked", "sockets parked in the relay hub now", value=parked),
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        hub = self.hub()
        if hub is None:
            return []
        return self._families(hub.events, hub.handbacks, hub.parked)


class TopologyCollector:
    """Instance and endpoint gauges computed at scrape time from the live clusters."""

    def __init__(self, clusters: Callable[[], Iterable[ClusterRuntime]]) -> None:
        self.clusters = clusters

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        def g(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        ci = ["cluster", "instance"]
        return {
            "up": g("endpoint_proxy_instance_up", "1 when the last probe of the instance succeeded", ci),
            "role": g("endpoint_proxy_instance_role",
                      "1 for the instance's current role (writer, reader, fenced, unknown), 0 for the others",
                      [*ci, "role"]),
            "lag_bytes": g("endpoint_proxy_instance_lag_bytes",
                           "WAL the replica has not replayed yet, in bytes (0 on the writer)", ci),
            "lag_seconds": g("endpoint_proxy_instance_lag_seconds",
                             "how far the replica's replay is behind the writer, in seconds (0 on the writer)", ci),
            "backends": g("endpoint_proxy_backend_connections",
                          "session connections from the proxy to the instance", ci),
            "writer_known": g("endpoint_proxy_cluster_writer_known",
                              "1 when the cluster has a known writer", ["cluster"]),
            "members": g("endpoint_proxy_endpoint_members",
                         "instances the endpoint may route to right now", ["cluster", "endpoint"]),
            "revision": g("endpoint_proxy_authority_revision",
                          "the HA authority's fencing token: the leader key's revision (Patroni's etcd)",
                          ["cluster", "source"]),
            "stale": g("endpoint_proxy_authority_stale",
                       "1 while the HA authority's store does not answer (the writer is kept, none elected)",
                       ["cluster"]),
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        fam = self._families()
        for cluster in self.clusters():
            c = cluster.config.name
            topo = cluster.topology
            fam["writer_known"].add_metric([c], 0 if topo.writer is None else 1)
            for name in topo.instance_names:
                st = topo.instances[name]
                fam["up"].add_metric([c, name], 1 if st.up else 0)
                role = topo.role(name).value
                for r in ROLES:
                    fam["role"].add_metric([c, name, r], 1 if r == role else 0)
                if st.lag_bytes is not None:
                    fam["lag_bytes"].add_metric([c, name], st.lag_bytes)
                if st.lag_ms is not None:
                    fam["lag_seconds"].add_metric([c, name], st.lag_ms / 1000)
                fam["backends"].add_metric([c, name], max(0, cluster.connections.get(name, 0)))
            for ep in cluster.config.endpoints:
                fam["members"].add_metric([c, ep.name], len(members(ep, topo)))
            authority = cluster.patroni
            if authority is not None:
                if authority.view.revision is not None:
                    fam["revision"].add_metric([c, authority.source or "etcd"], authority.view.revision)
                fam["stale"].add_metric([c], 1 if authority.stale else 0)
        return list(fam.values())


class LatencyCollector:
    """``endpoint_proxy_statement_duration_seconds{cluster,endpoint,route}`` from the histograms
    sessions record into (server.metrics.EndpointMetrics)."""

    def __init__(self, clusters: Callable[[], Iterable[ClusterRuntime]]) -> None:
        self.clusters = clusters

    @staticmethod
    def _family() -> HistogramMetricFamily:
        return HistogramMetricFamily("endpoint_proxy_statement_duration_seconds",
                                     "statement duration through the proxy, request to ReadyForQuery / OK",
                                     labels=["cluster", "endpoint", "route"])

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for cluster in self.clusters():
            for em in cluster.metrics.endpoints():
                for route, histogram in (("writer", em.writer_latency), ("reader", em.reader_latency)):
                    family.add_metric([em.cluster, em.endpoint, route], _buckets(histogram),
                                      histogram.sum_ns / 1e9)
        return [family]


def _buckets(histogram: LatencyHistogram) -> list[tuple[str, float]]:
    return [("+Inf" if bound == float("inf") else f"{bound:g}", float(count))
            for bound, count in histogram.cumulative()]


class FaultsCollector:
    """``endpoint_proxy_faults_active{kind}``: injected faults active now, over every cluster
    (each kind present, 0 when none)."""

    def __init__(self, clusters: Callable[[], Iterable[ClusterRuntime]]) -> None:
        self.clusters = clusters

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("endpoint_proxy_faults_active", "injected faults active now, by kind",
                                 labels=["kind"])

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        counts = dict.fromkeys(FAULT_KINDS, 0)
        for cluster in self.clusters():
            for fault in cluster.drills.active_faults():
                counts[fault.kind.value] += 1
        family = self._family()
        for kind, n in counts.items():
            family.add_metric([kind], n)
        return [family]


POOL_STATES = ("idle", "in_use", "opening")


class PoolCollector:
    """The pools of server connections (server/pools.py), read at scrape time:
    ``endpoint_proxy_pool_connections{cluster,instance,user,database,state}``,
    ``endpoint_proxy_pool_waiting_clients{cluster,instance,user,database}`` and
    ``endpoint_proxy_pool_borrow_seconds{cluster}``."""

    def __init__(self, clusters: Callable[[], Iterable[ClusterRuntime]]) -> None:
        self.clusters = clusters

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, HistogramMetricFamily]:
        labels = ["cluster", "instance", "user", "database"]
        return (
            GaugeMetricFamily("endpoint_proxy_pool_connections",
                              "pooled server connections, by state (idle, in_use, opening)", labels=[*labels, "state"]),
            GaugeMetricFamily("endpoint_proxy_pool_waiting_clients",
                              "clients waiting for a connection of the pool now", labels=labels),
            HistogramMetricFamily("endpoint_proxy_pool_borrow_seconds",
                                  "time to borrow a pooled server connection (waiting and opening included)",
                                  labels=["cluster"]),
        )

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        connections, waiting, borrow = self._families()
        for cluster in self.clusters():
            c = cluster.config.name
            for st in cluster.pools.status(0.0):  # the time only matters for longest_wait_ms
                labels = [c, st.instance, st.user, st.database]
                for state, n in zip(POOL_STATES, (st.idle, st.in_use, st.opening), strict=True):
                    connections.add_metric([*labels, state], n)
                waiting.add_metric(labels, st.waiting)
            histogram = cluster.metrics.pool_borrow
            borrow.add_metric([c], _buckets(histogram), histogram.sum_ns / 1e9)
        return [connections, waiting, borrow]
