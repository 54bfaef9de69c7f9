"""Connection-level routing and the writer election, as tables."""

from __future__ import annotations

import pytest

from endpoint_proxy.config import Address, EndpointConfig
from endpoint_proxy.routing.endpoints import route
from endpoint_proxy.topology.state import ClusterTopology, Health, Role

NAMES = ("a", "b", "c")


def topo(writer: str | None = "a", up: tuple[str, ...] = NAMES) -> ClusterTopology:
    t = ClusterTopology(NAMES)
    for n in NAMES:
        if n in up:
            t.probe_succeeded(n, 1.0, in_recovery=(n != writer))
        else:
            t.probe_failed(n, 1.0, "refused")
    return t


def ep(kind: str, **kw: object) -> EndpointConfig:
    return EndpointConfig(name="e", listen=Address("127.0.0.1", 1), kind=kind, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("endpoint", "t", "load", "fallback", "expected"), [
    (ep("writer"), topo(), {}, True, "a"),
    (ep("writer"), topo(writer=None), {}, True, None),
    (ep("reader"), topo(), {}, True, "b"),
    (ep("reader"), topo(), {"b": 2, "c": 1}, True, "c"),
    (ep("reader"), topo(up=("a", "c")), {"c": 5}, True, "c"),
    (ep("reader"), topo(up=("a",)), {}, True, "a"),
    (ep("reader"), topo(up=("a",)), {}, False, None),
    (ep("instance", instance="b"), topo(), {}, True, "b"),
    (ep("instance", instance="b"), topo(up=("a", "c")), {}, True, None),
    (ep("instance", instance="a"), topo(), {}, True, "a"),
    (ep("custom", role="reader", members=("c",)), topo(), {}, True, "c"),
    # fallback for a custom endpoint only goes to a writer its membership allows
    (ep("custom", role="reader", members=("c",)), topo(up=("a", "b")), {}, True, None),
    (ep("custom", role="reader", members=("a", "c")), topo(up=("a", "b")), {}, True, "a"),
    (ep("custom", role="reader", members=("c",)), topo(up=("a", "b")), {}, False, None),
    (ep("custom", role="any", members=("a", "b")), topo(), {"b": 1}, True, "a"),
    (ep("custom", role="any", excluded=("a",)), topo(), {"b": 1}, True, "c"),
    (ep("custom", role="reader", excluded=("b", "c")), topo(), {}, True, "a"),
])
def test_route(endpoint: EndpointConfig, t: ClusterTopology, load: dict[str, int], fallback: bool,
               expected: str | None) -> None:
    assert route(endpoint, t, load, fallback_to_writer=fallback).instance == expected


@pytest.mark.parametrize(("endpoint", "t", "exclude", "fallback", "expected"), [
    # the writer excluded: no route, and it is the writer the caller must wait for
    (ep("writer"), topo(), {"a"}, True, None),
    (ep("readwrite"), topo(), {"a"}, True, None),
    (ep("writer"), topo(), {"b"}, True, "a"),
    # a reader that failed: the next replica, then the writer as the fallback
    (ep("reader"), topo(), {"b"}, True, "c"),
    (ep("reader"), topo(), {"b", "c"}, True, "a"),
    (ep("reader"), topo(), {"b", "c"}, False, None),
    (ep("reader"), topo(), {"a", "b", "c"}, True, None),
    (ep("reader"), topo(up=("a", "b")), {"b"}, True, "a"),
    (ep("instance", instance="b"), topo(), {"b"}, True, None),
    (ep("instance", instance="b"), topo(), {"c"}, True, "b"),
    (ep("custom", role="any", members=("a", "b")), topo(), {"a"}, True, "b"),
    (ep("custom", role="any", members=("a", "b")), topo(), {"a", "b"}, True, None),
    (ep("custom", role="reader", members=("b", "c")), topo(), {"b"}, True, "c"),
    (ep("custom", role="reader", members=("a", "b")), topo(), {"b"}, True, "a"),
    # the fallback writer must be allowed by the membership and not excluded
    (ep("custom", role="reader", members=("c",)), topo(), {"c"}, True, None),
    (ep("custom", role="reader", members=("a", "c")), topo(), {"a", "c"}, True, None),
])
def test_route_with_exclusions(endpoint: EndpointConfig, t: ClusterTopology, exclude: set[str], fallback: bool,
                               expected: str | None) -> None:
    before = (t.writer, {n: (st.health, st.fenced) for n, st in t.instances.items()}, t.generation)
    decision = route(endpoint, t, {}, fallback_to_writer=fallback, exclude=frozenset(exclude))
    assert decision.instance == expected
    if expected is None:
        assert decision.reason
    # Excluding marks nothing: the topology is as it was.
    assert (t.writer, {n: (st.health, st.fenced) for n, st in t.instances.items()}, t.generation) == before


def test_an_excluded_writer_is_waited_for() -> None:
    decision = route(ep("writer"), topo(), {}, fallback_to_writer=True, exclude=frozenset({"a"}))
    assert decision.needs_writer and "a" in decision.reason


def test_weights_shift_reader_choice() -> None:
    t = topo()
    chosen = route(ep("reader"), t, {"b": 2, "c": 1}, fallback_to_writer=True, weights={"b": 4, "c": 1}).instance
    assert chosen == "b"
    # weight 0 takes an instance out of rotation while others qualify
    chosen = route(ep("reader"), t, {}, fallback_to_writer=True, weights={"b": 0, "c": 1}).instance
    assert chosen == "c"


def test_writer_election_and_fencing() -> None:
    t = ClusterTopology(NAMES)
    events = t.probe_succeeded("a", 0.0, in_recovery=False, timeline=1)
    assert [e.kind for e in events] == ["instance_up", "writer_changed"]
    assert t.writer == "a" and t.role("a") is Role.WRITER
    t.probe_succeeded("b", 0.1, in_recovery=True, timeline=1)
    assert t.role("b") is Role.READER
    # b is promoted (timeline 2) while a still answers as writable: a is fenced
    events = t.probe_succeeded("b", 1.0, in_recovery=False, timeline=2)
    assert {e.kind for e in events} == {"instance_fenced", "writer_changed", "timeline_advanced"}
    assert t.writer == "b" and t.role("a") is Role.FENCED
    assert "a" not in t.readers()
    # the newer writer goes down: the old one stays fenced, there is no writer
    t.probe_failed("b", 2.0, "refused")
    assert t.instances["b"].health is Health.DOWN
    assert t.writer is None and t.role("a") is Role.FENCED
    # the old primary goes down too: nothing left to fence
    t.probe_failed("a", 2.1, "refused")
    assert t.writer is None and t.role("a") is not Role.FENCED


def test_ties_take_turns_with_rotation() -> None:
    t = topo()
    chosen = {route(ep("reader"), t, {}, fallback_to_writer=True, rotation=r).instance for r in range(4)}
    assert chosen == {"b", "c"}


def test_least_in_flight_then_lower_lag() -> None:
    t = ClusterTopology(NAMES)
    t.probe_succeeded("a", 0.0, in_recovery=False)
    from endpoint_proxy.topology.state import ProbeResult

    t.probe_succeeded("a", 0.0, result=ProbeResult(False, current_lsn=100))
    t.probe_succeeded("b", 0.1, result=ProbeResult(True, replay_lsn=90, receive_lsn=100))
    t.probe_succeeded("c", 0.1, result=ProbeResult(True, replay_lsn=100, receive_lsn=100))
    # equal load: the replica with less lag
    assert route(ep("reader"), t, {"b": 0, "c": 0}, fallback_to_writer=True).instance == "c"
    # fewer requests in flight beats lower lag
    assert route(ep("reader"), t, {"b": 0, "c": 2}, fallback_to_writer=True).instance == "b"
