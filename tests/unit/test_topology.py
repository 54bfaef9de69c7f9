"""The topology state machine as tables of events, and the runtime's waiting under trio's MockClock."""

from __future__ import annotations

from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from endpoint_proxy.config import parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.topology.state import ClusterTopology, Health, ProbeResult, Role

W = "w"

# Each step: (time, instance, probe result or an error string for a failed probe),
# then what must hold after it: writer, {instance: role}, {instance: health}.
Step = tuple[float, str, Any, str | None, dict[str, Role], dict[str, Health]]

SCENARIOS: dict[str, list[Step]] = {
    "promotion after the primary dies": [
        (0.0, "a", ProbeResult(False, timeline=1, current_lsn=100), "a", {"a": Role.WRITER}, {"a": Health.UP}),
        (0.1, "b", ProbeResult(True, replay_lsn=100, receive_lsn=100), "a", {"b": Role.READER}, {}),
        (1.0, "a", "connection refused", None, {}, {"a": Health.DOWN}),
        (2.0, "b", ProbeResult(False, timeline=2, current_lsn=200), "b", {"b": Role.WRITER}, {}),
    ],
    "old primary back writable with a lower timeline is fenced": [
        (0.0, "b", ProbeResult(False, timeline=2, current_lsn=500), "b", {}, {}),
        (0.1, "a", ProbeResult(False, timeline=1, current_lsn=400), "b", {"a": Role.FENCED, "b": Role.WRITER}, {}),
        (0.2, "a", ProbeResult(True, replay_lsn=500), "b", {"a": Role.READER}, {}),
    ],
    # Fencing remembers: the timeline seen on b stays the floor while b is down.
    "old primary back writable while the new one is down is never the writer": [
        (0.0, "a", ProbeResult(False, timeline=1, current_lsn=100), "a", {"a": Role.WRITER}, {}),
        (0.1, "b", ProbeResult(True, replay_lsn=100), "a", {"b": Role.READER}, {}),
        (1.0, "a", "connection refused", None, {}, {"a": Health.DOWN}),
        (2.0, "b", ProbeResult(False, timeline=2, current_lsn=200), "b", {"b": Role.WRITER}, {}),
        (3.0, "b", "connection refused", None, {}, {"b": Health.DOWN}),
        (4.0, "a", ProbeResult(False, timeline=1, current_lsn=150), None, {"a": Role.FENCED}, {"a": Health.UP}),
        (5.0, "a", ProbeResult(False, timeline=1, current_lsn=160), None, {"a": Role.FENCED}, {}),
        # the new primary comes back: the writer again, a still fenced
        (6.0, "b", ProbeResult(False, timeline=2, current_lsn=200), "b", {"a": Role.FENCED, "b": Role.WRITER}, {}),
        # a rejoins as a replica: no longer a rival
        (7.0, "a", ProbeResult(True, replay_lsn=200), "b", {"a": Role.READER}, {}),
    ],
    "the old primary and the new one both down, the old one back first": [
        (0.0, "a", ProbeResult(False, timeline=3, current_lsn=100), "a", {}, {}),
        (1.0, "b", ProbeResult(False, timeline=4, current_lsn=200), "b", {"a": Role.FENCED}, {}),
        (2.0, "a", "connection refused", "b", {"a": Role.UNKNOWN}, {"a": Health.DOWN}),
        (3.0, "b", "connection refused", None, {}, {"b": Health.DOWN}),
        (4.0, "a", ProbeResult(False, timeline=3, current_lsn=100), None, {"a": Role.FENCED}, {}),
    ],
    "a replica promoted after the writer died is the writer; the floor rises with it": [
        (0.0, "a", ProbeResult(False, timeline=1, current_lsn=100), "a", {}, {}),
        (1.0, "a", "connection refused", None, {}, {}),
        (2.0, "c", ProbeResult(False, timeline=2, current_lsn=300), "c", {"c": Role.WRITER}, {}),
        (3.0, "b", ProbeResult(False, timeline=2, current_lsn=250), "c", {"b": Role.FENCED}, {}),
        (4.0, "c", "connection refused", "b", {"b": Role.WRITER}, {}),
    ],
    "a writer without a timeline is fenced once a timeline is known": [
        (0.0, "a", ProbeResult(False, timeline=2, current_lsn=100), "a", {}, {}),
        (1.0, "a", "connection refused", None, {}, {}),
        (2.0, "b", ProbeResult(False, timeline=None, current_lsn=100), None, {"b": Role.FENCED}, {}),
    ],
    "a failed probe of a replica leaves the writer alone": [
        (0.0, "a", ProbeResult(False, timeline=1, current_lsn=100), "a", {}, {}),
        (0.1, "b", ProbeResult(True, replay_lsn=100), "a", {}, {}),
        (0.2, "b", "reset by peer", "a", {"a": Role.WRITER}, {"a": Health.UP, "b": Health.DOWN}),
    ],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_topology_scenarios(name: str) -> None:
    t = ClusterTopology(("a", "b", "c"))
    for now, inst, event, writer, roles, health in SCENARIOS[name]:
        if isinstance(event, ProbeResult):
            t.probe_succeeded(inst, now, result=event)
        else:
            t.probe_failed(inst, now, event)
        assert t.writer == writer, (name, now)
        for i, role in roles.items():
            assert t.role(i) is role, (name, now, i)
        for i, h in health.items():
            assert t.instances[i].health is h, (name, now, i)


def test_lag_is_zero_on_an_idle_primary_and_grows_with_unreplayed_wal() -> None:
    t = ClusterTopology(("a", "b"), max_replica_lag_ms=1000)
    t.probe_succeeded("a", 0.0, result=ProbeResult(False, timeline=1, current_lsn=1000))
    # The replica's last replayed transaction is old, but it has everything: no lag.
    t.probe_succeeded("b", 0.1, result=ProbeResult(True, replay_lsn=1000, receive_lsn=1000, replay_age_s=3600))
    assert (t.instances["b"].lag_bytes, t.instances["b"].lag_ms) == (0, 0.0)
    assert t.readers() == ["b"]
    gen = t.generation
    # The writer moves on at t=1; the replica stops replaying.
    t.probe_succeeded("a", 1.0, result=ProbeResult(False, timeline=1, current_lsn=5000))
    t.probe_succeeded("b", 1.5, result=ProbeResult(True, replay_lsn=1000, receive_lsn=5000))
    assert t.instances["b"].lag_bytes == 4000
    assert t.instances["b"].lag_ms == pytest.approx(500)
    assert t.readers() == ["b"]
    t.probe_succeeded("b", 2.5, result=ProbeResult(True, replay_lsn=1000, receive_lsn=5000))
    assert t.instances["b"].lag_ms == pytest.approx(1500)
    assert t.readers() == []
    assert t.generation > gen  # sessions re-check their placement
    t.probe_succeeded("b", 3.0, result=ProbeResult(True, replay_lsn=5000, receive_lsn=5000))
    assert t.readers() == ["b"]


def _runtime() -> ClusterRuntime:
    cfg = parse_config({"clusters": [{
        "name": "c", "protocol": "postgresql", "failover_timeout_ms": 3000,
        "users": [{"name": "u", "password": "p"}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 1}, {"name": "b", "host": "127.0.0.1", "port": 2}],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer"}],
    }]})
    return ClusterRuntime(cfg.clusters[0])


async def test_a_route_waits_for_a_writer_until_the_timeout(autojump_clock: trio.testing.MockClock) -> None:
    rt = _runtime()
    ep = rt.config.endpoints[0]
    start = trio.current_time()
    decision = await rt.wait_for_route(ep, 3.0)
    assert decision.instance is None
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_a_waiting_route_wakes_when_a_writer_appears(autojump_clock: trio.testing.MockClock) -> None:
    rt = _runtime()
    ep = rt.config.endpoints[0]
    start = trio.current_time()

    async def promote_later() -> None:
        await trio.sleep(1.25)
        rt._apply(rt.topology.probe_succeeded("b", trio.current_time(), result=ProbeResult(False, timeline=2)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(promote_later)
        decision = await rt.wait_for_route(ep, 3.0)
    assert decision.instance == "b"
    assert trio.current_time() - start == pytest.approx(1.25)


# --- a session's failure never moves the cluster (only probes do) -----------------------------------


async def test_many_session_failures_leave_the_writer_in_place() -> None:
    rt = _runtime()
    rt._apply(rt.topology.probe_succeeded("a", 0.0, result=ProbeResult(False, timeline=1, current_lsn=100)))
    rt._apply(rt.topology.probe_succeeded("b", 0.0, result=ProbeResult(True, replay_lsn=100, receive_lsn=100)))
    generation = rt.topology.generation
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            rt.backend_failed("a", "terminating connection due to administrator command")
            rt.backend_failed("b", "connection reset by peer")
    assert rt.topology.writer == "a"
    assert rt.topology.instances["a"].health is Health.UP
    assert rt.topology.readers() == ["b"]
    assert rt.topology.generation == generation  # sessions see nothing to re-check
    assert {e["event"] for e in logs} == {"backend_failed"}
