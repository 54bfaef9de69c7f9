"""The switchover orchestrator and the fault hooks of a cluster, on trio's mock clock, with a
fake promotion and fake sessions at the writer gate (no database)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from endpoint_proxy.config import ClusterConfig, parse_config
from endpoint_proxy.drills.faults import FaultError, FaultKind, FaultSpec
from endpoint_proxy.drills.switchover import SwitchoverRefused
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.promotion import CatchUpTimeout, PromotionError
from endpoint_proxy.topology.state import Health, ProbeResult


def runtime(**cluster: Any) -> ClusterRuntime:
    doc: dict[str, Any] = {
        "name": "app", "protocol": "postgresql",
        "users": [{"name": "u", "password": "p"}],
        "switchover_timeout_ms": 2000,
        "promotion": {"method": "sql", "user": "promoter", "password": "x", "timeout_ms": 3000},
        "instances": [{"name": n, "host": "10.0.0.1", "port": 5432 + i} for i, n in enumerate("abc")],
        "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "writer"}],
    }
    doc.update(cluster)
    rt = ClusterRuntime(parse_config({"clusters": [doc]}).clusters[0])
    probe(rt, "a", writer=True)
    probe(rt, "b")
    probe(rt, "c")
    return rt


def probe(rt: ClusterRuntime, name: str, *, writer: bool = False, timeline: int = 1) -> None:
    result = (ProbeResult(in_recovery=False, current_lsn=1000, timeline=timeline) if writer
              else ProbeResult(in_recovery=True, receive_lsn=1000, replay_lsn=1000))
    rt._apply(rt.topology.probe_succeeded(name, trio.current_time(), result=result))


class FakePromotion:
    """Records the steps; ``promote`` makes the monitor see the candidate as the writer."""

    def __init__(self, rt: ClusterRuntime, old: str, new: str, *, prepare_s: float = 0.3,
                 prepare_error: Exception | None = None, promote_error: Exception | None = None,
                 elect: bool = True) -> None:
        self.rt, self.old, self.new = rt, old, new
        self.prepare_s = prepare_s
        self.prepare_error = prepare_error
        self.promote_error = promote_error
        self.elect = elect
        self.steps: list[tuple[str, float]] = []
        self.notes: list[str] = []

    async def prepare(self, deadline: float) -> None:
        self.steps.append(("prepare", trio.current_time()))
        await trio.sleep(self.prepare_s)
        if self.prepare_error is not None:
            raise self.prepare_error

    async def promote(self, deadline: float) -> None:
        self.steps.append(("promote", trio.current_time()))
        if self.promote_error is not None:
            raise self.promote_error
        if self.elect:
            probe(self.rt, self.new, writer=True, timeline=2)

    async def rollback(self) -> None:
        self.steps.append(("rollback", trio.current_time()))

    async def follow(self, deadline: float) -> None:
        self.steps.append(("follow", trio.current_time()))
        self.notes.append("old writer left read-only")

    async def aclose(self) -> None:
        self.steps.append(("aclose", trio.current_time()))


def fake(rt: ClusterRuntime, **options: Any) -> list[FakePromotion]:
    made: list[FakePromotion] = []

    def make(config: ClusterConfig, old: str, new: str) -> FakePromotion:
        made.append(FakePromotion(rt, old, new, **options))
        return made[-1]

    rt.drills.make_promotion = make
    return made


def steps(p: FakePromotion) -> list[str]:
    return [s for s, _ in p.steps]


async def test_completed_switchover(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    made = fake(rt)
    record = await rt.drills.switchover()
    (p,) = made
    assert (p.old, p.new) == ("a", "b")
    assert steps(p) == ["prepare", "promote", "follow", "aclose"]
    assert (record.outcome, record.from_, record.to, record.reason) == ("completed", "a", "b", "requested")
    assert record.pause_ms == 300  # the gate was closed while the candidate caught up
    assert record.detail == "old writer left read-only"
    assert rt.topology.writer == "b" and rt.drills.gate.is_open
    assert rt.drills.last_switchover == record and not rt.drills.switchover_running
    assert rt.drills.last_switchover_json() == record.to_json()
    kinds = [e.kind for e in rt.drills.events]
    assert kinds[-1] == "switchover" and "writer_changed" in kinds


async def test_new_writer_work_waits_at_the_gate_until_the_new_writer_is_elected(
        autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    fake(rt, prepare_s=1.0)
    entered: list[tuple[float, str | None]] = []

    async def session() -> None:
        await trio.sleep(0.5)  # arrives while the switchover holds
        await rt.drills.gate.enter("s")
        entered.append((trio.current_time(), rt.topology.writer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session)
        record = await rt.drills.switchover("c")
    assert record.outcome == "completed" and record.to == "c"
    assert entered == [(1.0, "c")]  # released with the promotion, onto the new writer


async def test_waits_for_running_transactions_to_finish(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    made = fake(rt)
    gate = rt.drills.gate
    await gate.enter("tx")  # a transaction is running on the writer

    async def commit_later() -> None:
        await trio.sleep(1.5)
        gate.end("tx")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit_later)
        record = await rt.drills.switchover()
    assert record.outcome == "completed"
    assert made[0].steps[0] == ("prepare", 1.5)  # nothing was touched before it committed
    assert record.pause_ms == 1800


async def test_abandoned_when_a_transaction_outlasts_switchover_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    made = fake(rt)
    gate = rt.drills.gate
    await gate.enter("tx1")
    await gate.enter("tx2")
    record = await rt.drills.switchover()
    assert (record.outcome, record.detail) == ("abandoned", "2 transactions still running")
    assert record.pause_ms == 2000
    assert steps(made[0]) == ["aclose"]  # nothing promoted, nothing fenced
    assert rt.topology.writer == "a" and gate.is_open and gate.inside == 2  # never killed
    assert rt.drills.last_switchover == record


async def test_abandoned_when_the_candidate_does_not_catch_up(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    made = fake(rt, prepare_s=2.0, prepare_error=CatchUpTimeout("b did not replay the old writer's WAL in time"))
    record = await rt.drills.switchover()
    assert (record.outcome, record.detail) == ("abandoned", "b did not replay the old writer's WAL in time")
    assert steps(made[0]) == ["prepare", "rollback", "aclose"]
    assert rt.topology.writer == "a" and rt.drills.gate.is_open


@pytest.mark.parametrize(("options", "expected_steps"), [
    ({"prepare_error": PromotionError("a: ALTER SYSTEM: permission denied")}, ["prepare", "rollback", "aclose"]),
    ({"promote_error": PromotionError("b: pg_promote() failed")}, ["prepare", "promote", "rollback", "aclose"]),
])
async def test_failed_steps_roll_back_and_reopen(autojump_clock: trio.testing.MockClock, options: dict[str, Any],
                                                 expected_steps: list[str]) -> None:
    rt = runtime()
    made = fake(rt, **options)
    record = await rt.drills.switchover()
    assert record.outcome == "failed"
    error = options.get("prepare_error") or options.get("promote_error")
    assert record.detail == str(error)
    assert steps(made[0]) == expected_steps
    assert rt.drills.gate.is_open and rt.topology.writer == "a"


async def test_failed_when_the_monitor_never_sees_the_new_writer(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    fake(rt, elect=False)
    record = await rt.drills.switchover()
    assert record.outcome == "failed"
    assert "b was promoted but the monitor did not see it as the writer within 3000 ms" in record.detail
    assert record.pause_ms == 3300 and rt.drills.gate.is_open


async def test_refused_before_anything_changes(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime(promotion={"method": "none"})
    made = fake(rt)
    with pytest.raises(SwitchoverRefused, match="not configured"):
        await rt.drills.switchover()
    assert made == [] and rt.drills.last_switchover is None and rt.drills.gate.is_open


async def test_one_switchover_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    fake(rt, prepare_s=1.0)
    errors: list[str] = []

    async def second() -> None:
        await trio.sleep(0.5)
        try:
            await rt.drills.switchover()
        except SwitchoverRefused as e:
            errors.append(str(e))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        assert (await rt.drills.switchover()).outcome == "completed"
    assert errors == ["a switchover of cluster app is already running"]


async def test_probe_of_an_instance_under_simulated_failure_fails_without_touching_it(
        autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    fault = rt.drills.inject(FaultSpec(FaultKind.INSTANCE_FAILURE, "b", 5))
    assert await rt.probe_once("b", None) is None  # 10.0.0.1 is never dialled
    st = rt.topology.instances["b"]
    assert st.health is Health.DOWN and st.last_error is not None and "simulated instance failure" in st.last_error
    assert f"fault {fault.id}" in st.last_error
    with pytest.raises(ConnectionRefusedError):
        rt.drills.check_connect("b")
    rt.drills.check_connect("c")
    assert rt.drills.toxics("b") is not None and rt.drills.toxics("b").failed  # type: ignore[union-attr]
    assert rt.drills.toxics("c") is None


async def test_faults_expire_on_their_own_and_leave_a_timeline(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime(max_replica_lag_ms=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.drills.run)
        rt.drills.inject(FaultSpec(FaultKind.REPLICA_LAG, "b", 3, lag_ms=5000))
        assert rt.topology.simulated_lag_ms == {"b": 5000}
        probe(rt, "b")
        assert rt.topology.readers() == ["c"]
        await trio.sleep(2.9)
        assert len(rt.drills.active_faults()) == 1
        await trio.sleep(0.2)
        assert rt.drills.active_faults() == [] and rt.topology.simulated_lag_ms == {}
        probe(rt, "b")
        assert rt.topology.readers() == ["b", "c"]
        nursery.cancel_scope.cancel()
    kinds = [(e.kind, e.instance) for e in rt.drills.events]
    assert ("fault_started", "b") in kinds and ("fault_lifted", "b") in kinds
    lifted = next(e for e in rt.drills.events if e.kind == "fault_lifted")
    assert lifted.detail.endswith("(expired)")


async def test_clear_lifts_faults_at_once(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    changed = rt.drills.faults_changed
    a = rt.drills.inject(FaultSpec(FaultKind.LATENCY, "b", 60, latency_ms=5))
    assert changed.is_set() and not rt.drills.faults_changed.is_set()  # watchers wake, the next wait is fresh
    rt.drills.inject(FaultSpec(FaultKind.LATENCY, "c", 60, latency_ms=5))
    changed = rt.drills.faults_changed
    assert [f.id for f in rt.drills.clear(a.id)] == [a.id]
    assert changed.is_set()
    assert len(rt.drills.active_faults()) == 1
    assert len(rt.drills.clear()) == 1 and rt.drills.active_faults() == []


async def test_faults_name_instances_of_the_cluster(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    with pytest.raises(FaultError, match="no instance named 'zz'"):
        rt.drills.inject(FaultSpec(FaultKind.INSTANCE_FAILURE, "zz", 5))


async def test_read_replica_failure_decides_per_routing(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    rt.drills.rng.seed(11)
    rt.drills.inject(FaultSpec(FaultKind.READ_REPLICA_FAILURE, "b", 10, percent=40))
    decisions = [rt.drills.reader_routing_fails("b") for _ in range(2000)]
    assert 700 < sum(decisions) < 900
    assert not any(rt.drills.reader_routing_fails("c") for _ in range(100))


async def test_a_simulated_writer_failure_starts_a_switchover_when_promotion_allows(
        autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    made = fake(rt)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.drills.run)
        await trio.testing.wait_all_tasks_blocked()
        rt.drills.inject(FaultSpec(FaultKind.INSTANCE_FAILURE, "a", 10))
        await rt.probe_once("a", None)  # the monitor sees it "die" before the drill runs
        assert rt.topology.writer is None
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (p,) = made
    assert (p.old, p.new) == ("a", "b")
    record = rt.drills.last_switchover
    assert record is not None and record.outcome == "completed"
    assert record.reason == "simulated failure of the writer"
    assert rt.topology.writer == "b"


async def test_a_simulated_writer_failure_without_promotion_only_holds(
        autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime(promotion={"method": "none"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.drills.run)
        rt.drills.inject(FaultSpec(FaultKind.INSTANCE_FAILURE, "a", 2))
        await rt.probe_once("a", None)
        assert rt.topology.writer is None
        await trio.sleep(2.5)
        assert rt.drills.active_faults() == []
        rt.drills.check_probe("a")  # lifted: the next probe goes to the server again
        nursery.cancel_scope.cancel()
    assert rt.drills.last_switchover is None
    assert [e.kind for e in rt.drills.events if e.kind.startswith("fault")] == ["fault_started", "fault_lifted"]


async def test_endpoint_stats_from_the_sampled_series(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    em = rt.metrics.endpoint("rw")
    assert rt.drills.endpoint_stats("rw") == {"statements": 0, "statements_per_s": None, "p50_ms": None,
                                              "p99_ms": None}
    rt.drills.sample(100.0)
    for _ in range(100):
        em.statement("writer")
        em.statement_finished("writer", 2_000_000)
    rt.drills.sample(102.0)
    stats = rt.drills.endpoint_stats("rw")
    assert stats["statements"] == 100 and stats["statements_per_s"] == 50.0
    assert 1.6 < stats["p50_ms"] <= 2.0 and 1.6 < stats["p99_ms"] <= 2.0
    history = rt.drills.history_json()
    assert history["name"] == "app" and history["endpoints"][0]["name"] == "rw"
    assert history["endpoints"][0]["points"][0][:2] == [102.0, 50.0]
