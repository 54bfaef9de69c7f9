"""Statement latency: the histogram sessions record into, its quantiles, Prometheus buckets and series."""

from __future__ import annotations

import random

import pytest

from endpoint_proxy.drills.latency import (
    BOUNDS_NS,
    EXPORTED_NS,
    N_BUCKETS,
    EndpointSeries,
    LatencyHistogram,
    merged,
    quantile_ns,
)


def test_bounds_are_increasing_and_exported_ones_are_among_them() -> None:
    assert list(BOUNDS_NS) == sorted(set(BOUNDS_NS))
    assert BOUNDS_NS[0] == 10_000 and BOUNDS_NS[-1] == 100_000_000_000
    assert all(b in BOUNDS_NS for b in EXPORTED_NS)
    # Neighbouring fine buckets are at most 28% apart: a quantile is that close or closer.
    assert max(b / a for a, b in zip(BOUNDS_NS, BOUNDS_NS[1:], strict=False)) <= 1.28


@pytest.mark.parametrize(("ns", "bucket"), [
    (0, 0), (10_000, 0), (10_001, 1), (12_500, 1), (1_000_000, BOUNDS_NS.index(1_000_000)),
    (1_000_001, BOUNDS_NS.index(1_000_000) + 1), (100_000_000_000, N_BUCKETS - 2), (10**15, N_BUCKETS - 1),
])
def test_record_counts_a_duration_in_the_bucket_whose_bound_is_not_below_it(ns: int, bucket: int) -> None:
    h = LatencyHistogram()
    h.record(ns)
    assert h.counts[bucket] == 1 and h.count == 1 and h.sum_ns == ns


def test_quantiles_are_close_to_the_true_ones() -> None:
    rng = random.Random(3)
    # Log-normal latencies around a millisecond, as a database answers.
    values = [int(rng.lognormvariate(13.8, 0.6)) for _ in range(20_000)]
    h = LatencyHistogram()
    for v in values:
        h.record(v)
    values.sort()
    for q in (0.5, 0.9, 0.99):
        true = values[int(q * len(values)) - 1]
        estimate = quantile_ns(h.counts, q)
        assert estimate is not None
        assert abs(estimate - true) / true < 0.12, (q, estimate, true)


def test_quantile_of_nothing_is_none_and_of_the_open_bucket_its_lower_bound() -> None:
    assert quantile_ns([0] * N_BUCKETS, 0.99) is None
    h = LatencyHistogram()
    h.record(10**15)
    assert quantile_ns(h.counts, 0.5) == BOUNDS_NS[-1]


def test_cumulative_buckets_for_prometheus() -> None:
    h = LatencyHistogram()
    for ns in (50_000, 100_000, 120_000, 3_000_000, 20_000_000_000):
        h.record(ns)
    buckets = dict(h.cumulative())
    assert buckets[0.0001] == 2  # le is inclusive: 100 µs counts
    assert buckets[0.00025] == 3
    assert buckets[0.0025] == 3 and buckets[0.005] == 4
    assert buckets[10.0] == 4 and buckets[float("inf")] == 5
    counts = [c for _, c in h.cumulative()]
    assert counts == sorted(counts)


def test_merged_adds_routes() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record(1_000_000)
    b.record(1_000_000)
    b.record(2_000_000)
    assert sum(merged([a, b])) == 3


def test_series_gives_rates_and_quantiles_per_interval() -> None:
    series = EndpointSeries(keep=10)
    h = LatencyHistogram()
    assert series.recent(10) is None
    series.sample(100.0, 0, h.counts)
    for _ in range(50):
        h.record(1_000_000)
    series.sample(101.0, 50, h.counts)
    for _ in range(200):
        h.record(4_000_000)
    series.sample(103.0, 250, h.counts)
    first, second = series.points()
    assert (first.at, first.rate) == (101.0, 50.0)
    assert first.p99_ms is not None and 0.8 < first.p99_ms <= 1.0
    assert (second.at, second.rate) == (103.0, 100.0)
    assert second.p50_ms is not None and 3.2 < second.p50_ms <= 4.0
    recent = series.recent(10)
    assert recent is not None and recent.rate == pytest.approx(250 / 3)
    only_last = series.recent(1.5)
    assert only_last is not None and only_last.rate == 100.0
    assert second.to_json() == [103.0, 100.0, second.p50_ms, second.p99_ms]


def test_series_keeps_a_bounded_number_of_samples() -> None:
    series = EndpointSeries(keep=3)
    for t in range(10):
        series.sample(float(t), t, [0] * N_BUCKETS)
    assert len(series.points()) == 2
    quiet = series.points()[-1]
    assert quiet.p99_ms is None and quiet.rate == 1.0
