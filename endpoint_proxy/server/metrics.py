"""Prometheus metrics: the registry and the counters sessions and monitors bump.

Rules of this file: nothing here runs per message. Sessions hold pre-labelled children
(``EndpointMetrics``) and bump them once per connection or per routed statement. What
describes the topology is not stored here at all: ``admin.collectors`` reads the live
clusters when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from ..drills.latency import LatencyHistogram
from ..topology.state import TopologyEvent

# The *_created series double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

ROUTES = ("writer", "reader")

# The error kinds in use, for ``ClusterMetrics.error``. Keep the set small and fixed: it is
# a label value, and every distinct value is a time series.
ERROR_KINDS = {
    "probe_failed": "a monitor probe of an instance failed (connect, query or timeout)",
    "backend_failed": "a session could not reach its instance, or lost its connection to it",
    "no_route": "a connection or statement found no eligible instance within failover_timeout_ms",
    "server_refused": "the server itself refused a session's login (its error went to the client)",
    "transaction_lost": "a transaction's server died under it (08007 to the client)",
    "client_protocol": "a client broke the wire protocol",
    "auth_failed": "a client failed authentication",
    "startup_timeout": "a client did not finish startup in time",
    "statement_lost": "a statement's server died while it ran outside a transaction (outcome unknown)",
    "session_fatal": "a session ended with a FATAL error other than authentication",
    "session_crashed": "a session ended on an unexpected internal error (logged with its traceback)",
    "cancel_unknown": "a CancelRequest named no session of this proxy (past 20 a minute from one address, that "
                      "address's cancels are dropped for the rest of the minute)",
    "borrow_timeout": "a client waited longer than borrow_timeout_ms for a pooled server connection",
    "connection_limit": "a client was refused at login: max_client_connections or a user's max_connections",
}

FAILOVER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

class EndpointMetrics:
    """Children of the per-endpoint metrics, labelled once; what a session bumps."""

    __slots__ = ("cluster", "endpoint", "connections", "accepted", "writer_statements", "reader_statements",
                 "_pinned", "writer_latency", "reader_latency")

    def __init__(self, metrics: ProxyMetrics, cluster: str, endpoint: str) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.connections = metrics.client_connections.labels(cluster, endpoint)
        self.accepted = metrics.client_connections_accepted.labels(cluster, endpoint)
        # Plain integers, read at scrape time (StatementCollector): a statement costs an
        # addition, not a lock.
        self.writer_statements = 0
        self.reader_statements = 0
        self._pinned = metrics.pinned_sessions  # labelled per reason when a session pins (rare)
        # Statement durations per route (request to ReadyForQuery / OK), read at scrape time
        # as endpoint_proxy_statement_duration_seconds: a session calls ``record(ns)``.
        self.writer_latency = LatencyHistogram()
        self.reader_latency = LatencyHistogram()

    def client_connected(self) -> None:
        self.connections.inc()
        self.accepted.inc()

    def client_disconnected(self) -> None:
        self.connections.dec()

    def statement(self, route: str) -> None:
        """One statement (or transaction) routed: ``route`` is "writer" or "reader"."""
        if route == "writer":
            self.writer_statements += 1
        else:
            self.reader_statements += 1

    def statement_finished(self, route: str, ns: int) -> None:
        """A statement's answer is complete after ``ns`` nanoseconds; ``route`` as for
        ``statement``. (A session may also keep the histogram and call ``record`` on it.)"""
        (self.writer_latency if route == "writer" else self.reader_latency).record(ns)

    def session_pinned(self, reason: str) -> None:
        """A session became tied to its server by state that cannot be replayed elsewhere;
        ``reason`` is the state's label (``routing.session_kinds``: a small fixed set)."""
        self._pinned.labels(self.cluster, self.endpoint, reason).inc()

    def session_unpinned(self, reason: str) -> None:
        """The state that pinned a session for ``reason`` is gone (or the session ended)."""
        self._pinned.labels(self.cluster, self.endpoint, reason).dec()


class ClusterMetrics:
    """A cluster's counters, and when it lost its writer (for the failover histogram and status)."""

    def __init__(self, metrics: ProxyMetrics, name: str) -> None:
        self.name = name
        self._metrics = metrics
        self._endpoints: dict[str, EndpointMetrics] = {}
        self._held = metrics.held_statements.labels(name)
        self._held_total = metrics.statements_held.labels(name)
        self._writer_changes = metrics.writer_changes.labels(name)
        self._failover = metrics.failover_duration.labels(name)
        self.writer: str | None = None  # the writer as of the last topology event
        self.last_writer: str | None = None  # the last writer ever known
        self.writer_lost_at: float | None = None  # trio time the writer was lost, while none is known
        # How long borrowing a pooled server connection took (server/pools.py), read at scrape
        # time as endpoint_proxy_pool_borrow_seconds (admin.collectors.PoolCollector).
        self.pool_borrow = LatencyHistogram()

    def endpoint(self, name: str) -> EndpointMetrics:
        em = self._endpoints.get(name)
        if em is None:
            em = self._endpoints[name] = EndpointMetrics(self._metrics, self.name, name)
        return em

    def endpoints(self) -> list[EndpointMetrics]:
        """The endpoints counted so far (one per listener that has started)."""
        return list(self._endpoints.values())

    def endpoint_if_known(self, name: str) -> EndpointMetrics | None:
        return self._endpoints.get(name)

    def error(self, kind: str) -> None:
        """Count one error; ``kind`` is one of ERROR_KINDS."""
        self._metrics.errors.labels(self.name, kind).inc()

    def pool_borrowed(self, ns: int) -> None:
        """A pooled server connection was borrowed after ``ns`` nanoseconds (waiting and opening included)."""
        self.pool_borrow.record(ns)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Around a statement that waits for a writer: counted, and in the gauge while it waits."""
        self._held_total.inc()
        self._held.inc()
        try:
            yield
        finally:
            self._held.dec()

    def topology_changed(self, events: Iterable[TopologyEvent], now: float) -> None:
        """Feed the topology's events (``now`` in trio time): writer changes and failover time.

        The failover duration runs from the moment no writer is known to the moment one is
        known again. A writer change counts only a writer different from the last one known:
        the first writer found at startup, and an old primary coming back, are not changes.
        """
        for ev in events:
            if ev.kind != "writer_changed":
                continue
            new = ev.instance
            if new is None:
                if self.writer is not None:
                    self.writer_lost_at = now
                self.writer = None
                continue
            if self.writer_lost_at is not None:
                self._failover.observe(max(0.0, now - self.writer_lost_at))
                self.writer_lost_at = None
            if self.last_writer is not None and new != self.last_writer:
                self._writer_changes.inc()
            self.writer = self.last_writer = new


class StatementCollector:
    """``endpoint_proxy_statements_total{cluster,endpoint,route}`` from the endpoints' counts."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily("endpoint_proxy_statements",
                                   "statements (or transactions) routed, per endpoint and route",
                                   labels=["cluster", "endpoint", "route"])

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for cm in list(self.metrics._clusters.values()):
            for em in list(cm._endpoints.values()):
                family.add_metric([em.cluster, em.endpoint, "writer"], em.writer_statements)
                family.add_metric([em.cluster, em.endpoint, "reader"], em.reader_statements)
        return [family]


class ProxyMetrics:
    """One process's metrics: a registry of its own (never the global one) and the metric objects."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ce = ["cluster", "endpoint"]
        self.client_connections = Gauge(
            "endpoint_proxy_client_connections", "client connections open now, per endpoint", ce, registry=r)
        self.client_connections_accepted = Counter(
            "endpoint_proxy_client_connections_accepted", "client connections accepted, per endpoint", ce,
            registry=r)
        self.errors = Counter("endpoint_proxy_errors", "errors, by kind", ["cluster", "kind"], registry=r)
        self.writer_changes = Counter(
            "endpoint_proxy_writer_changes", "times the cluster's writer became a different instance",
            ["cluster"], registry=r)
        self.failover_duration = Histogram(
            "endpoint_proxy_failover_duration_seconds", "from the writer lost to a writer known again",
            ["cluster"], buckets=FAILOVER_BUCKETS, registry=r)
        self.held_statements = Gauge(
            "endpoint_proxy_held_statements", "statements waiting for a writer now", ["cluster"], registry=r)
        self.statements_held = Counter(
            "endpoint_proxy_statements_held", "statements that had to wait for a writer", ["cluster"], registry=r)
        self.pinned_sessions = Gauge(
            "endpoint_proxy_pinned_sessions", "sessions tied to their server by state that cannot be replayed",
            [*ce, "reason"], registry=r)
        self._clusters: dict[str, ClusterMetrics] = {}
        r.register(StatementCollector(self))

    def cluster(self, name: str) -> ClusterMetrics:
        cm = self._clusters.get(name)
        if cm is None:
            cm = self._clusters[name] = ClusterMetrics(self, name)
        return cm
