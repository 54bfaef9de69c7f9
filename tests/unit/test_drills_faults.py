"""Fault injection, pure: the SIMULATE grammar, the JSON form, the registry and its expiry."""

from __future__ import annotations

import random
from typing import Any

import pytest

from endpoint_proxy.drills.faults import (
    FaultError,
    FaultKind,
    FaultSet,
    FaultSpec,
    parse_simulate,
    routing_fails,
    spec_from_json,
)

K = FaultKind


@pytest.mark.parametrize(("command", "expected"), [
    ("SIMULATE INSTANCE FAILURE pg0 FOR 10 SECONDS", FaultSpec(K.INSTANCE_FAILURE, "pg0", 10)),
    ("simulate instance failure pg0 for 1 second;", FaultSpec(K.INSTANCE_FAILURE, "pg0", 1)),
    ("SIMULATE INSTANCE FAILURE \"odd name\" FOR 2 MINUTES", FaultSpec(K.INSTANCE_FAILURE, "odd name", 120)),
    ("SIMULATE INSTANCE FAILURE 'it''s' FOR 1.5 SECONDS", FaultSpec(K.INSTANCE_FAILURE, "it's", 1.5)),
    ("SIMULATE 50 PERCENT READ REPLICA FAILURE FOR 30 SECONDS",
     FaultSpec(K.READ_REPLICA_FAILURE, None, 30, percent=50)),
    ("SIMULATE 12.5 PERCENT READ REPLICA FAILURE TO pg2 FOR 30 SECONDS",
     FaultSpec(K.READ_REPLICA_FAILURE, "pg2", 30, percent=12.5)),
    ("SIMULATE 100 PERCENT READ REPLICA FAILURE TO ALL FOR 5 SECONDS",
     FaultSpec(K.READ_REPLICA_FAILURE, None, 5, percent=100)),
    ("SIMULATE LATENCY 50 TO pg1 FOR 10 SECONDS", FaultSpec(K.LATENCY, "pg1", 10, latency_ms=50)),
    ("SIMULATE LATENCY 50 MS JITTER 10 MS TO pg1 FOR 10 SECONDS",
     FaultSpec(K.LATENCY, "pg1", 10, latency_ms=50, jitter_ms=10)),
    ("SIMULATE BANDWIDTH 64 TO pg1 FOR 10 SECONDS", FaultSpec(K.BANDWIDTH, "pg1", 10, kilobytes_per_second=64)),
    ("SIMULATE BANDWIDTH 64 KB/S TO pg1 FOR 10 SECONDS", FaultSpec(K.BANDWIDTH, "pg1", 10, kilobytes_per_second=64)),
    ("SIMULATE SLICER TO pg1 FOR 10 SECONDS", FaultSpec(K.SLICER, "pg1", 10)),
    ("SIMULATE SLICER SIZE 8 VARIATION 4 DELAY 2 TO pg1 FOR 10 SECONDS",
     FaultSpec(K.SLICER, "pg1", 10, size=8, variation=4, delay_ms=2)),
    ("SIMULATE SLICER DELAY 0.5 MS SIZE 1 BYTES TO pg1 FOR 10 SECONDS",
     FaultSpec(K.SLICER, "pg1", 10, size=1, delay_ms=0.5)),
    ("SIMULATE RESET TO pg1 FOR 10 SECONDS", FaultSpec(K.RESET, "pg1", 10)),
    ("SIMULATE RESET AFTER 250 TO pg1 FOR 10 SECONDS", FaultSpec(K.RESET, "pg1", 10, after_ms=250)),
    ("SIMULATE REPLICA LAG pg2 5000 FOR 10 SECONDS", FaultSpec(K.REPLICA_LAG, "pg2", 10, lag_ms=5000)),
    ("  SIMULATE   REPLICA LAG  app.pg2 5000 MS  FOR 10 SECONDS ", FaultSpec(K.REPLICA_LAG, "app.pg2", 10,
                                                                               lag_ms=5000)),
])
def test_parse_simulate(command: str, expected: FaultSpec) -> None:
    assert parse_simulate(command) == expected


@pytest.mark.parametrize(("command", "message"), [
    ("SIMULATE", "unknown fault"),
    ("SIMULATE EARTHQUAKE FOR 10 SECONDS", "unknown fault"),
    ("SIMULATE INSTANCE FAILURE pg0", "expected FOR"),
    ("SIMULATE INSTANCE FAILURE pg0 FOR SECONDS", "expected a duration"),
    ("SIMULATE INSTANCE FAILURE pg0 FOR 10", "expected SECONDS or MINUTES"),
    ("SIMULATE INSTANCE FAILURE pg0 FOR 10 HOURS", "expected SECONDS or MINUTES"),
    ("SIMULATE INSTANCE FAILURE pg0 FOR 0 SECONDS", "more than 0"),
    ("SIMULATE INSTANCE FAILURE pg0 FOR 10 SECONDS NOW", "unexpected 'NOW'"),
    ("SIMULATE INSTANCE FAILURE pg0 FOR -1 SECONDS", "expected a duration"),
    ("SIMULATE 0 PERCENT READ REPLICA FAILURE FOR 10 SECONDS", "percentage"),
    ("SIMULATE 101 PERCENT READ REPLICA FAILURE FOR 10 SECONDS", "percentage"),
    ("SIMULATE 50 PERCENT REPLICA FAILURE FOR 10 SECONDS", "expected PERCENT READ REPLICA FAILURE"),
    ("SIMULATE LATENCY TO pg1 FOR 10 SECONDS", "latency in milliseconds"),
    ("SIMULATE LATENCY 0 TO pg1 FOR 10 SECONDS", "more than 0"),
    ("SIMULATE LATENCY 50 pg1 FOR 10 SECONDS", "expected TO"),
    ("SIMULATE LATENCY 999999 TO pg1 FOR 10 SECONDS", "0..600000"),
    ("SIMULATE BANDWIDTH 0 TO pg1 FOR 10 SECONDS", "bandwidth"),
    ("SIMULATE SLICER SIZE 0 TO pg1 FOR 10 SECONDS", "SIZE"),
    ("SIMULATE SLICER SIZE 4 VARIATION 4 TO pg1 FOR 10 SECONDS", "VARIATION"),
    ("SIMULATE SLICER SIZE 1.5 TO pg1 FOR 10 SECONDS", "whole number"),
    ("SIMULATE SLICER COLOR 4 TO pg1 FOR 10 SECONDS", "expected TO"),
    ("SIMULATE RESET AFTER TO pg1 FOR 10 SECONDS", "time in milliseconds"),
    ("SIMULATE REPLICA LAG pg1 FOR 10 SECONDS", "lag in milliseconds"),
    ("SIMULATE REPLICA LAG pg1 '5' FOR 10 SECONDS", "lag in milliseconds"),
    ("SIMULATE INSTANCE FAILURE '' FOR 10 SECONDS", "must not be empty"),
])
def test_bad_commands_say_what_is_wrong(command: str, message: str) -> None:
    with pytest.raises(FaultError, match=message):
        parse_simulate(command)


@pytest.mark.parametrize(("doc", "expected"), [
    ({"kind": "instance_failure", "instance": "a", "seconds": 5}, FaultSpec(K.INSTANCE_FAILURE, "a", 5)),
    ({"kind": "read_replica_failure", "percent": 25, "seconds": 5},
     FaultSpec(K.READ_REPLICA_FAILURE, None, 5, percent=25)),
    ({"kind": "latency", "instance": "a", "latency_ms": 20, "jitter_ms": 5, "seconds": 1, "cluster": "x"},
     FaultSpec(K.LATENCY, "a", 1, latency_ms=20, jitter_ms=5)),
    ({"kind": "slicer", "instance": "a", "size": 3, "seconds": 1}, FaultSpec(K.SLICER, "a", 1, size=3)),
    ({"kind": "replica_lag", "instance": "a", "lag_ms": 1500.5, "seconds": 1},
     FaultSpec(K.REPLICA_LAG, "a", 1, lag_ms=1500.5)),
])
def test_json_form(doc: dict[str, Any], expected: FaultSpec) -> None:
    assert spec_from_json(doc) == expected


@pytest.mark.parametrize(("doc", "message"), [
    ({"kind": "flood", "seconds": 1}, "kind must be one of"),
    ({"instance": "a", "seconds": 1}, "kind must be one of"),
    ({"kind": "latency", "instance": "a", "latency_ms": 5}, "seconds: is required"),
    ({"kind": "latency", "instance": "a", "latency_ms": 5, "percent": 5, "seconds": 1}, "percent: not a parameter"),
    ({"kind": "latency", "instance": "a", "latency_ms": "5", "seconds": 1}, "latency_ms: must be a number"),
    ({"kind": "latency", "instance": "a", "latency_ms": True, "seconds": 1}, "latency_ms: must be a number"),
    ({"kind": "slicer", "instance": "a", "size": 2.5, "seconds": 1}, "size: must be a whole number"),
    ({"kind": "instance_failure", "instance": 3, "seconds": 1}, "instance: must be a string"),
    ({"kind": "instance_failure", "seconds": 1}, "instance name is required"),
])
def test_bad_json_says_which_key(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(FaultError, match=message):
        spec_from_json(doc)


def test_descriptions_read_like_the_command() -> None:
    assert parse_simulate("SIMULATE LATENCY 50 JITTER 10 TO b FOR 1 SECONDS").describe() == \
        "latency 50 ms \u00b1 10 ms to b"
    assert parse_simulate("SIMULATE 50 PERCENT READ REPLICA FAILURE FOR 1 SECONDS").describe() == \
        "50% read replica failure (every replica)"
    assert parse_simulate("SIMULATE REPLICA LAG b 5000 FOR 1 SECONDS").describe() == "replica lag 5000 ms on b"


def test_faults_lift_when_their_time_is_up() -> None:
    faults = FaultSet(cluster="app")
    a = faults.add(FaultSpec(K.INSTANCE_FAILURE, "a", 10), now=100.0, wall=5.0)
    b = faults.add(FaultSpec(K.REPLICA_LAG, "b", 5, lag_ms=3000), now=101.0)
    assert [f.id for f in faults.active(104.0)] == [a.id, b.id]
    assert faults.instance_failed("a", 109.9) is a
    assert faults.instance_failed("b", 100.0) is None
    assert faults.lag_ms(105.9) == {"b": 3000}
    # Past its time a fault no longer acts, even before expire() removes it.
    assert faults.lag_ms(106.0) == {}
    assert faults.next_expiry() == 106.0
    generation = faults.generation
    assert faults.expire(106.0) == [b]
    assert faults.generation > generation
    assert faults.expire(106.0) == []
    assert faults.instance_failed("a", 110.0) is None
    assert faults.expire(110.0) == [a] and faults.active(110.0) == [] and faults.next_expiry() is None
    doc = a.to_json(now=104.0)
    assert (doc["id"], doc["cluster"], doc["kind"], doc["instance"], doc["expires_in_s"], doc["started_at"]) == \
        (a.id, "app", "instance_failure", "a", 6.0, 5.0)


def test_clear_one_or_all() -> None:
    faults = FaultSet()
    a = faults.add(FaultSpec(K.LATENCY, "a", 10, latency_ms=5), now=0)
    b = faults.add(FaultSpec(K.LATENCY, "b", 10, latency_ms=5), now=0)
    assert faults.clear(999) == []
    assert faults.clear(a.id) == [a]
    assert faults.active(1) == [b]
    assert faults.clear() == [b] and faults.active(1) == []


def test_read_replica_failure_share_per_instance() -> None:
    faults = FaultSet()
    faults.add(FaultSpec(K.READ_REPLICA_FAILURE, None, 10, percent=20), now=0)
    faults.add(FaultSpec(K.READ_REPLICA_FAILURE, "b", 10, percent=70), now=0)
    assert faults.read_failure_percent("a", 1) == 20
    assert faults.read_failure_percent("b", 1) == 70
    assert faults.read_failure_percent("b", 11) == 0


def test_routing_fails_for_the_given_share_and_is_seedable() -> None:
    rng = random.Random(7)
    outcomes = [routing_fails(30, rng) for _ in range(10_000)]
    assert 2700 < sum(outcomes) < 3300
    assert [routing_fails(50, random.Random(1)) for _ in range(3)] == [routing_fails(50, random.Random(1))
                                                                      for _ in range(3)]
    assert not any(routing_fails(0, rng) for _ in range(100))
    assert all(routing_fails(100, rng) for _ in range(100))


def test_toxics_combine_the_faults_of_one_instance() -> None:
    faults = FaultSet()
    assert faults.toxics("a", 0) is None
    faults.add(FaultSpec(K.LATENCY, "a", 10, latency_ms=20, jitter_ms=5), now=0)
    faults.add(FaultSpec(K.LATENCY, "a", 5, latency_ms=30), now=0)
    faults.add(FaultSpec(K.BANDWIDTH, "a", 10, kilobytes_per_second=100), now=0)
    faults.add(FaultSpec(K.BANDWIDTH, "a", 10, kilobytes_per_second=50), now=0)
    faults.add(FaultSpec(K.RESET, "a", 10, after_ms=500), now=1)
    faults.add(FaultSpec(K.REPLICA_LAG, "a", 10, lag_ms=1), now=0)  # not a toxic
    faults.add(FaultSpec(K.LATENCY, "b", 10, latency_ms=1), now=0)  # another instance
    t = faults.toxics("a", 2)
    assert t is not None
    assert (t.latency_ms, t.jitter_ms, t.bytes_per_second, t.reset_after_ms, t.reset_since, t.failed, t.until) == \
        (50, 5, 50_000, 500, 1, False, 5)
    # The 5-second latency runs out: the cached answer is not used past its time.
    t = faults.toxics("a", 6)
    assert t is not None and t.latency_ms == 20
    faults.add(FaultSpec(K.INSTANCE_FAILURE, "a", 1), now=6)
    t = faults.toxics("a", 6.5)
    assert t is not None and t.failed
    faults.clear()
    assert faults.toxics("a", 6.5) is None
