"""Statement latency: a fixed-bucket histogram cheap enough to record every statement, and the
per-endpoint series (statements/s, p50, p99) the status page charts.

Rules of this file: no clock and no I/O; integers on the recording path. A statement costs
one ``bisect`` over a tuple of ints, two integer additions and no allocation: the caller
passes the duration in nanoseconds (``time.perf_counter_ns()`` differences).

Buckets follow the R10 preferred-number series (1, 1.25, 1.6, 2, 2.5, 3.2, 4, 5, 6.3, 8 per
decade) from 10 µs to 100 s, so a quantile read from them is within one step (at most 28%)
before interpolation. The Prometheus buckets are the 1-2.5-5 subset of the same bounds, so
exposing them merges fine buckets exactly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

_R10: Final = (100, 125, 160, 200, 250, 320, 400, 500, 630, 800)

# Upper bounds (inclusive, nanoseconds) of the fine buckets; one more bucket holds the rest.
BOUNDS_NS: Final[tuple[int, ...]] = tuple(
    step * 10 ** exp for exp in range(2, 9) for step in _R10) + (100_000_000_000,)
N_BUCKETS: Final = len(BOUNDS_NS) + 1

# The buckets Prometheus sees (seconds): 100 µs .. 10 s in 1-2.5-5 steps, each one of BOUNDS_NS.
EXPORTED_NS: Final[tuple[int, ...]] = tuple(
    step * 10 ** exp for exp in range(3, 8) for step in (100, 250, 500)) + (10_000_000_000,)


class LatencyHistogram:
    """Counts of durations per fine bucket, and their sum. What a session records into."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * N_BUCKETS
        self.sum_ns = 0

    def record(self, ns: int) -> None:
        """One statement took ``ns`` nanoseconds (request sent to ReadyForQuery / OK)."""
        self.counts[bisect_left(BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> list[int]:
        return list(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, count at or below it) at EXPORTED_NS, then (+inf, total):
        the Prometheus ``_bucket`` samples."""
        out: list[tuple[float, int]] = []
        running = 0
        i = 0
        for bound in EXPORTED_NS:
            while i < len(BOUNDS_NS) and BOUNDS_NS[i] <= bound:
                running += self.counts[i]
                i += 1
            out.append((bound / 1e9, running))
        out.append((float("inf"), sum(self.counts)))
        return out


def merged(histograms: Sequence[LatencyHistogram]) -> list[int]:
    """The bucket counts of several histograms added up."""
    total = [0] * N_BUCKETS
    for h in histograms:
        for i, c in enumerate(h.counts):
            total[i] += c
    return total


def quantile_ns(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of the durations counted, interpolated linearly inside
    its bucket; None when nothing was counted. The open last bucket answers its lower bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if seen + c >= rank:
            low = BOUNDS_NS[i - 1] if i > 0 else 0
            if i >= len(BOUNDS_NS):
                return float(low)
            high = BOUNDS_NS[i]
            return low + (high - low) * max(0.0, rank - seen) / c
        seen += c
    return float(BOUNDS_NS[-1])


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


@dataclass(frozen=True)
class Sample:
    """What one endpoint had counted at one moment: statements routed (all routes), and
    the latency buckets (all routes, since start)."""

    at: float  # wall clock, epoch seconds
    statements: int
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Point:
    """One step of a series: statements/s and latency quantiles between two samples."""

    at: float
    rate: float
    p50_ms: float | None
    p99_ms: float | None

    def to_json(self) -> list[float | None]:
        return [round(self.at, 3), round(self.rate, 2), self.p50_ms, self.p99_ms]


class EndpointSeries:
    """The last ``keep`` samples of one endpoint (taken about once a second by the proxy)."""

    def __init__(self, keep: int = 301) -> None:
        self.samples: deque[Sample] = deque(maxlen=keep)

    def sample(self, at: float, statements: int, counts: Sequence[int]) -> None:
        self.samples.append(Sample(at, statements, tuple(counts)))

    def points(self) -> list[Point]:
        """One point per pair of consecutive samples (the last minutes, for the charts)."""
        out = []
        items = list(self.samples)
        for a, b in zip(items, items[1:], strict=False):
            out.append(_between(a, b))
        return out

    def recent(self, window_s: float) -> Point | None:
        """Statements/s and quantiles over the last ``window_s`` seconds of samples (or as
        many as there are); None before two samples exist."""
        if len(self.samples) < 2:
            return None
        last = self.samples[-1]
        first = last
        for s in reversed(self.samples):
            first = s
            if last.at - s.at >= window_s:
                break
        return _between(first, last) if first is not last else None


def _between(a: Sample, b: Sample) -> Point:
    dt = b.at - a.at
    rate = (b.statements - a.statements) / dt if dt > 0 else 0.0
    delta = [max(0, y - x) for x, y in zip(a.counts, b.counts, strict=True)]
    return Point(b.at, max(0.0, rate), _ms(quantile_ns(delta, 0.5)), _ms(quantile_ns(delta, 0.99)))
