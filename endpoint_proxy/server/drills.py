"""A cluster's drills at run time: the writer gate, planned switchovers, injected faults, the
per-endpoint series and the events timeline the status page shows.

``ClusterRuntime`` owns one ``ClusterDrills`` (``cluster.drills``) and calls it from three
places only: ``check_probe`` before each monitor probe (an instance under INSTANCE FAILURE
fails its probes), ``note_topology`` with the topology's events, and ``run`` as one more
monitor task (fault expiry, sampling once a second).

What sessions use (each method says how): ``gate`` (server.gate), ``check_connect``,
``reader_routing_fails``, ``toxics`` / ``wrap`` (relay.toxics), ``faults_changed`` (to drop
server connections an INSTANCE FAILURE or RESET now covers), and the latency histograms of
``server.metrics.EndpointMetrics``.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
import trio

from ..config import ClusterConfig
from ..drills.faults import Fault, FaultError, FaultKind, FaultSet, FaultSpec, Toxics, routing_fails
from ..drills.latency import EndpointSeries, merged
from ..drills.switchover import (
    ABANDONED,
    COMPLETED,
    FAILED,
    SwitchoverPlan,
    SwitchoverRecord,
    SwitchoverRefused,
    plan_switchover,
)
from ..relay.net import Conn
from ..relay.toxics import ToxicConn
from ..topology.state import TopologyEvent
from .gate import WriterGate
from .promotion import CatchUpTimeout, Promotion, PromotionError, make_promotion

if TYPE_CHECKING:
    from ..topology.state import ClusterTopology
    from .metrics import ClusterMetrics


class DrillHost(Protocol):
    """What the drills use of their cluster (server/cluster.py's ClusterRuntime)."""

    config: ClusterConfig
    metrics: ClusterMetrics
    topology: ClusterTopology

    def faults_changed(self, instance: str | None) -> None: ...

    def request_probe(self, name: str | None = None) -> None: ...

log = structlog.get_logger("endpoint_proxy.drills")

SAMPLE_INTERVAL_S: Final = 1.0
SERIES_KEEP: Final = 301  # five minutes of one-second samples
RECENT_WINDOW_S: Final = 10.0  # p50/p99 in /topology and SHOW ENDPOINTS: the last ten seconds
EVENTS_KEEP: Final = 200
# Topology events that go on the timeline (besides switchovers and faults).
TIMELINE_KINDS: Final = frozenset({"writer_changed", "instance_down", "instance_up", "instance_fenced"})

# Fault ids are unique across the clusters of a process.
_FAULT_IDS = itertools.count(1)


@dataclass(frozen=True)
class TimelineEvent:
    at: float  # wall clock, epoch seconds
    kind: str
    instance: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "kind": self.kind, "instance": self.instance, "detail": self.detail}


class SimulatedFailure(ConnectionRefusedError):
    """A connection refused because of an injected fault (an OSError, as a real refusal)."""


class ClusterDrills:
    def __init__(self, runtime: DrillHost, *, seed: int | None = None) -> None:
        self.runtime = runtime
        self.gate = WriterGate(holding=runtime.metrics.holding)
        self.faults = FaultSet(cluster=runtime.config.name, ids=_FAULT_IDS)
        self.rng = random.Random(seed)
        self.last_switchover: SwitchoverRecord | None = None
        self.switchover_running = False
        self.events: deque[TimelineEvent] = deque(maxlen=EVENTS_KEEP)
        self.series: dict[str, EndpointSeries] = {}
        self._wake = trio.Event()
        # Set (and replaced) whenever a fault starts or lifts: a session that parked its server
        # connection where no ToxicConn sees it waits on this to re-check ``toxics()``.
        self.faults_changed = trio.Event()
        self._nursery: trio.Nursery | None = None  # for switchovers a fault starts
        # How a switchover promotes (server.promotion); tests put a fake here.
        self.make_promotion: Callable[[ClusterConfig, str, str], Promotion] = make_promotion

    @property
    def name(self) -> str:
        return self.runtime.config.name

    # --- timeline ---------------------------------------------------------------------------------

    def _event(self, kind: str, instance: str | None, detail: str = "") -> None:
        self.events.append(TimelineEvent(time.time(), kind, instance, detail))

    def note_topology(self, events: Iterable[TopologyEvent]) -> None:
        """The topology's events (from ClusterRuntime._apply): the ones a drill watcher wants
        go on the timeline."""
        for ev in events:
            if ev.kind in TIMELINE_KINDS:
                self._event(ev.kind, ev.instance, ev.detail)

    # --- faults: what the monitor and sessions ask ---------------------------------------------

    def check_probe(self, name: str) -> None:
        """Before a monitor probe: raise as a dead server would when the instance is under a
        simulated INSTANCE FAILURE (the probe then fails like a real one)."""
        if self.faults.empty:
            return
        fault = self.faults.instance_failed(name, trio.current_time())
        if fault is not None:
            raise SimulatedFailure(f"connection refused (simulated instance failure, fault {fault.id})")

    def check_connect(self, instance: str) -> None:
        """Before a session opens a server connection: raises SimulatedFailure (an OSError, as
        a refused connect) while ``instance`` is under INSTANCE FAILURE."""
        self.check_probe(instance)

    def reader_routing_fails(self, instance: str) -> bool:
        """For a new reader connection, or a readwrite read routed to a replica: should it fail
        as against a dead replica (SIMULATE n PERCENT READ REPLICA FAILURE)?"""
        if self.faults.empty:
            return False
        percent = self.faults.read_failure_percent(instance, trio.current_time())
        return routing_fails(percent, self.rng)

    def toxics(self, instance: str) -> Toxics | None:
        """What the faults do to server connections of ``instance`` right now (None: nothing)."""
        return self.faults.toxics(instance, trio.current_time())

    def wrap(self, conn: Conn, instance: str) -> ToxicConn:
        """A server connection of ``instance`` with the cluster's toxics applied (a
        pass-through while none is active)."""
        return ToxicConn(conn, lambda: self.faults.toxics(instance, trio.current_time()), rng=self.rng)

    # --- faults: what the admin plane does --------------------------------------------------------

    def inject(self, spec: FaultSpec) -> Fault:
        """Register a fault (FaultError for an unknown instance). Probes and the lag rule see
        it at once; a simulated failure of the writer starts a switchover when the cluster's
        promotion allows (the proxy knows the writer is alive: the failure is simulated)."""
        known = self.runtime.topology.instance_names
        if spec.instance is not None and spec.instance not in known:
            raise FaultError(f"cluster {self.name} has no instance named {spec.instance!r} "
                             f"(instances: {', '.join(known)})")
        now = trio.current_time()
        fault = self.faults.add(spec, now, time.time())
        log.info("fault_started", cluster=self.name, fault=fault.id, kind=spec.kind.value, instance=spec.instance,
                 description=spec.describe(), seconds=spec.seconds)
        self._event("fault_started", spec.instance, f"#{fault.id} {spec.describe()} for {spec.seconds:g} s")
        self._sync_topology(now)
        writer = self.runtime.topology.writer
        if spec.kind is FaultKind.INSTANCE_FAILURE and writer is not None and spec.instance == writer:
            self._failover_drill(writer)
        self.runtime.faults_changed(spec.instance)  # open server connections take the fault now
        self._wake.set()
        return fault

    def clear(self, fault_id: int | None = None) -> list[Fault]:
        removed = self.faults.clear(fault_id)
        for fault in removed:
            self._lifted(fault, "cleared")
        if removed:
            self._sync_topology(trio.current_time())
            self._wake.set()
        return removed

    def active_faults(self) -> list[Fault]:
        return self.faults.active(trio.current_time())

    def _lifted(self, fault: Fault, how: str) -> None:
        log.info("fault_lifted", cluster=self.name, fault=fault.id, kind=fault.kind.value,
                 instance=fault.instance, how=how)
        self._event("fault_lifted", fault.instance, f"#{fault.id} {fault.spec.describe()} ({how})")

    def _sync_topology(self, now: float) -> None:
        """Hand the REPLICA LAG faults to the topology and probe at once, so that failures and
        lags show (and go) without waiting for the next interval; wake whoever watches faults."""
        self.runtime.topology.simulated_lag_ms = self.faults.lag_ms(now)
        self.runtime.request_probe()
        self.faults_changed.set()
        self.faults_changed = trio.Event()

    def _failover_drill(self, writer: str) -> None:
        if self.runtime.config.promotion.method == "none" or self.switchover_running:
            return
        nursery = self._nursery
        if nursery is None:
            return
        log.info("failover_drill", cluster=self.name, instance=writer)
        nursery.start_soon(self._switchover_quietly, writer)

    async def _switchover_quietly(self, writer: str) -> None:
        try:
            await self.switchover(None, reason="simulated failure of the writer", drain=False, writer=writer)
        except SwitchoverRefused as e:
            log.warning("failover_drill_refused", cluster=self.name, error=str(e))

    # --- the background task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Lift faults when their time is up and sample the endpoints once a second."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._tick_forever()

    async def _tick_forever(self) -> None:
        next_sample = trio.current_time()
        while True:
            now = trio.current_time()
            lifted = self.faults.expire(now)
            for fault in lifted:
                self._lifted(fault, "expired")
            if lifted:
                self._sync_topology(now)
            if now >= next_sample:
                self.sample(time.time())
                next_sample = now + SAMPLE_INTERVAL_S
            expiry = self.faults.next_expiry()
            wake_at = min(next_sample, expiry if expiry is not None else math.inf)
            self._wake = trio.Event()
            with trio.move_on_at(wake_at):
                await self._wake.wait()

    def sample(self, at: float) -> None:
        for em in self.runtime.metrics.endpoints():
            series = self.series.get(em.endpoint)
            if series is None:
                series = self.series[em.endpoint] = EndpointSeries(SERIES_KEEP)
            series.sample(at, em.writer_statements + em.reader_statements,
                          merged((em.writer_latency, em.reader_latency)))

    def endpoint_stats(self, endpoint: str) -> dict[str, Any]:
        """``statements``, ``statements_per_s``, ``p50_ms``, ``p99_ms`` of an endpoint (rates
        and quantiles over the last RECENT_WINDOW_S; None before there is data)."""
        em = self.runtime.metrics.endpoint_if_known(endpoint)
        series = self.series.get(endpoint)
        recent = series.recent(RECENT_WINDOW_S) if series is not None else None
        return {
            "statements": None if em is None else em.writer_statements + em.reader_statements,
            "statements_per_s": None if recent is None else round(recent.rate, 2),
            "p50_ms": None if recent is None else recent.p50_ms,
            "p99_ms": None if recent is None else recent.p99_ms,
        }

    # --- switchover ---------------------------------------------------------------------------

    async def switchover(self, to: str | None = None, *, reason: str = "requested",
                         drain: bool = True, writer: str | None = None) -> SwitchoverRecord:
        """A planned switchover (SwitchoverRefused before anything changes).

        Closes the gate; waits (up to switchover_timeout_ms) until no session has writer work
        under way (``drain``); fences the old writer and waits for the candidate to catch up
        (within the same bound); promotes it; waits for the monitor to elect it; reopens the
        gate, then re-points what is left. A bound that runs out abandons the switchover (the
        fence is undone, nothing is promoted, traffic resumes on the old writer)."""
        if self.switchover_running:
            raise SwitchoverRefused(f"a switchover of cluster {self.name} is already running")
        config = self.runtime.config
        plan = plan_switchover(self.name, self.runtime.topology, config.promotion.method, to, writer)
        promotion = self.make_promotion(config, plan.old, plan.new)
        self.switchover_running = True
        try:
            record = await self._switchover(plan, promotion, reason, drain)
        finally:
            self.switchover_running = False
            with trio.CancelScope(shield=True):
                await promotion.aclose()
        self.last_switchover = record
        detail = record.detail
        log.info("switchover", cluster=self.name, **{"from": record.from_}, to=record.to, outcome=record.outcome,
                 pause_ms=record.pause_ms, detail=detail, reason=reason)
        self._event("switchover", None, f"{record.from_} \u2192 {record.to}: {record.outcome}, "
                                             f"pause {record.pause_ms} ms" + (f" ({detail})" if detail else ""))
        return record

    async def _switchover(self, plan: SwitchoverPlan, promotion: Promotion, reason: str,
                          drain: bool) -> SwitchoverRecord:
        config = self.runtime.config
        started_wall = time.time()
        started = trio.current_time()
        hold_deadline = started + config.switchover_timeout_ms / 1000
        outcome, detail = COMPLETED, ""
        log.info("switchover_started", cluster=self.name, **{"from": plan.old}, to=plan.new, reason=reason)
        self.gate.close()
        try:
            outcome, detail = await self._hold_and_promote(plan, promotion, hold_deadline, drain)
        finally:
            self.gate.open()
            pause_ms = round((trio.current_time() - started) * 1000)
        if outcome == COMPLETED:
            deadline = trio.current_time() + config.promotion.timeout_ms / 1000
            with trio.move_on_at(deadline):
                await promotion.follow(deadline)
            notes = "; ".join(promotion.notes)
            detail = notes
        elif promotion.notes:
            detail = f"{detail}; {'; '.join(promotion.notes)}"
        return SwitchoverRecord(self.name, plan.old, plan.new, outcome, pause_ms, started_wall, detail, reason)

    async def _hold_and_promote(self, plan: SwitchoverPlan, promotion: Promotion, hold_deadline: float,
                                drain: bool) -> tuple[str, str]:
        config = self.runtime.config
        if drain:
            with trio.move_on_at(hold_deadline):
                await self.gate.wait_empty()
            if self.gate.inside:
                n = self.gate.inside
                return ABANDONED, f"{n} transaction{'s' if n != 1 else ''} still running"
        try:
            await promotion.prepare(hold_deadline)
        except CatchUpTimeout as e:
            await promotion.rollback()
            return ABANDONED, str(e)
        except PromotionError as e:
            await promotion.rollback()
            return FAILED, str(e)
        deadline = trio.current_time() + config.promotion.timeout_ms / 1000
        try:
            await promotion.promote(deadline)
        except PromotionError as e:
            await promotion.rollback()
            return FAILED, str(e)
        if not await self._confirm(plan.new, deadline):
            return FAILED, (f"{plan.new} was promoted but the monitor did not see it as the writer within "
                            f"{config.promotion.timeout_ms} ms")
        return COMPLETED, ""

    async def _confirm(self, new: str, deadline: float) -> bool:
        """Wait until the proxy's own monitor elects ``new`` (probing every instance at once)."""
        topology = self.runtime.topology
        with trio.move_on_at(deadline):
            while topology.writer != new:
                self.runtime.request_probe()
                await trio.sleep(0.005)
            return True
        return False

    # --- what /topology shows ---------------------------------------------------------------------

    def last_switchover_json(self) -> dict[str, Any] | None:
        return None if self.last_switchover is None else self.last_switchover.to_json()

    def history_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "interval_s": SAMPLE_INTERVAL_S,
            "endpoints": [{"name": name, "points": [p.to_json() for p in series.points()]}
                          for name, series in self.series.items()],
            "events": [e.to_json() for e in self.events],
        }
