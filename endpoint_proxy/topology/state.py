"""The topology state machine: per instance health and role, derived from probe results.

Rules of this file: no I/O and no clock. Callers pass the current time (seconds, monotonic)
and what a probe saw; methods return the events the change caused, for the I/O layer to log.
The writer is the instance that is up and not in recovery; if two claim it, the higher
timeline wins and the other is fenced (it never receives traffic).

Fencing remembers: the highest timeline ever seen on a writable instance (PostgreSQL's
timeline; MariaDB's binlog history depth) is a high-water mark. An instance that claims to
be writable below it is fenced even when the instance that reached it is down or gone, so
an old primary that comes back writable while the new one is away is never the writer.
The mark only rises; the I/O layer may seed it from what an earlier run saw (``remember``).

An HA authority (Patroni's leader key) overrides the proxy's own choice: with ``set_authority``
only the member it names may be the writer, and only once a probe shows that member writable
(the key moves before the server does); every other writable instance is fenced, whatever its
timeline, and with no member named there is no writer. The authority is the fencing token
then: the timeline mark is still kept but no longer vetoes the named leader.

Only probes change health and roles: what a session sees (a broken connection, a
terminated backend) is a reason to probe, never a verdict.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    # Part of the /topology interface, but nothing sets it any more: a session's failure only
    # asks for a probe (see the module docstring).
    SUSPECT = "suspect"
    DOWN = "down"


class Role(StrEnum):
    UNKNOWN = "unknown"
    WRITER = "writer"
    READER = "reader"
    FENCED = "fenced"


@dataclass
class InstanceStatus:
    name: str
    health: Health = Health.UNKNOWN
    in_recovery: bool | None = None
    timeline: int | None = None
    last_probe_at: float | None = None
    last_error: str | None = None
    fenced: bool = False
    current_lsn: int | None = None  # the writer's WAL position (bytes)
    receive_lsn: int | None = None  # a replica's received WAL position
    replay_lsn: int | None = None  # a replica's replayed WAL position
    replay_age_s: float = 0.0  # now() - pg_last_xact_replay_timestamp() on a replica
    lag_bytes: int | None = None
    lag_ms: float | None = None

    @property
    def up(self) -> bool:
        return self.health is Health.UP


@dataclass(frozen=True)
class ProbeResult:
    """What one probe of an instance saw."""

    in_recovery: bool
    timeline: int | None = None
    current_lsn: int | None = None
    receive_lsn: int | None = None
    replay_lsn: int | None = None
    replay_age_s: float = 0.0


@dataclass(frozen=True, order=True)
class HighWater:
    """The highest timeline (MariaDB: binlog history depth) seen on a writable instance, and where."""

    timeline: int
    instance: str


@dataclass(frozen=True)
class TopologyEvent:
    """Something worth a log line: kind is a stable event name (instance_up, writer_changed, ...)."""

    kind: str
    instance: str | None
    detail: str = ""


@dataclass(frozen=True)
class AuthorityConstraint:
    """What an HA authority allows: ``leader`` is the only instance that may be the writer
    (None: none may, for now: the leader key is gone and no successor holds it yet)."""

    leader: str | None
    source: str = "authority"


@dataclass
class ClusterTopology:
    instance_names: tuple[str, ...]
    max_replica_lag_ms: float | None = None  # None: lag never excludes a replica
    instances: dict[str, InstanceStatus] = field(default_factory=dict)
    _writer: str | None = None
    # Bumped whenever anything routing depends on changes (health, roles, fencing, lag
    # eligibility): sessions re-check their placement only when it moved.
    generation: int = 0
    # Fault injection (SIMULATE REPLICA LAG): instances to treat as at least this far behind.
    simulated_lag_ms: dict[str, float] = field(default_factory=dict)
    # (time, LSN) of the writer at each probe, to tell how old a replica's unreplayed WAL is.
    _writer_lsn_history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=1024))
    # Fencing's memory: no instance below this timeline is ever the writer (module docstring).
    high_water: HighWater | None = None
    # An HA authority's constraint on the election (None: the proxy elects on its own).
    authority: AuthorityConstraint | None = None
    # Instances kept out of reader endpoints whatever their state (Patroni's noloadbalance tag).
    no_readers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in self.instance_names:
            self.instances.setdefault(name, InstanceStatus(name))

    # --- queries ----------------------------------------------------------------------------

    @property
    def writer(self) -> str | None:
        return self._writer

    def role(self, name: str) -> Role:
        st = self.instances[name]
        if st.fenced:
            return Role.FENCED
        if name == self._writer:
            return Role.WRITER
        if st.in_recovery:
            return Role.READER
        return Role.UNKNOWN

    def is_up(self, name: str) -> bool:
        return self.instances[name].up

    def readers(self) -> list[str]:
        """Replicas that are up, not fenced and within the lag limit, in configuration order."""
        return [n for n in self.instance_names if self._eligible_reader(self.instances[n])]

    def _eligible_reader(self, st: InstanceStatus) -> bool:
        if not (st.up and st.in_recovery and not st.fenced) or st.name in self.no_readers:
            return False
        limit = self.max_replica_lag_ms
        return limit is None or st.lag_ms is None or st.lag_ms <= limit

    def _routing_view(self) -> tuple[object, ...]:
        return (self._writer, tuple((st.health, st.fenced, st.in_recovery, self._eligible_reader(st))
                                    for st in self.instances.values()))

    # --- inputs -----------------------------------------------------------------------------

    def set_instances(self, names: tuple[str, ...]) -> list[TopologyEvent]:
        """Configuration changed: instances not named any more leave (and lose the writer role)."""
        before = self._routing_view()
        for name in set(self.instances) - set(names):
            del self.instances[name]
        self.instance_names = names
        for name in names:
            self.instances.setdefault(name, InstanceStatus(name))
        events = self._elect()
        self._bump_if_changed(before)
        return events

    def probe_succeeded(self, name: str, now: float, *, in_recovery: bool | None = None,
                        timeline: int | None = None, result: ProbeResult | None = None) -> list[TopologyEvent]:
        if result is None:
            assert in_recovery is not None
            result = ProbeResult(in_recovery=in_recovery, timeline=timeline)
        if name not in self.instances:
            return []  # removed by a reload while its probe was under way
        before = self._routing_view()
        st = self.instances[name]
        events: list[TopologyEvent] = []
        if st.health is not Health.UP:
            events.append(TopologyEvent("instance_up", name))
        st.health = Health.UP
        st.in_recovery = result.in_recovery
        st.timeline = result.timeline
        st.current_lsn = result.current_lsn
        st.receive_lsn = result.receive_lsn
        st.replay_lsn = result.replay_lsn
        st.replay_age_s = result.replay_age_s
        st.last_probe_at = now
        st.last_error = None
        events.extend(self._elect())
        if name == self._writer and result.current_lsn is not None:
            history = self._writer_lsn_history
            if not history or history[-1][1] != result.current_lsn:
                history.append((now, result.current_lsn))
        events.extend(self._update_lag(now))
        self._bump_if_changed(before)
        return events

    def probe_failed(self, name: str, now: float, error: str) -> list[TopologyEvent]:
        if name not in self.instances:
            return []
        before = self._routing_view()
        st = self.instances[name]
        events: list[TopologyEvent] = []
        if st.health is not Health.DOWN:
            events.append(TopologyEvent("instance_down", name, error))
        st.health = Health.DOWN
        st.last_probe_at = now
        st.last_error = error
        events.extend(self._elect())
        self._bump_if_changed(before)
        return events

    def remember(self, mark: HighWater) -> list[TopologyEvent]:
        """Seed fencing's memory (from an earlier run); a mark below the current one changes nothing."""
        before = self._routing_view()
        if self.high_water is None or mark.timeline > self.high_water.timeline:
            self.high_water = mark
        events = self._elect()
        self._bump_if_changed(before)
        return events

    def set_authority(self, constraint: AuthorityConstraint | None) -> list[TopologyEvent]:
        """The HA authority's constraint changed (None: no authority any more): elect again."""
        before = self._routing_view()
        self.authority = constraint
        events = self._elect()
        self._bump_if_changed(before)
        return events

    def set_no_readers(self, names: frozenset[str]) -> None:
        """Instances that must stay out of reader endpoints (sessions there move)."""
        before = self._routing_view()
        self.no_readers = names
        self._bump_if_changed(before)

    def _bump_if_changed(self, before: tuple[object, ...]) -> None:
        if self._routing_view() != before:
            self.generation += 1

    def _unreplayed_since(self, replay_lsn: int) -> float | None:
        """When the writer first had WAL beyond ``replay_lsn`` (None: not in the history)."""
        for t, lsn in self._writer_lsn_history:
            if lsn > replay_lsn:
                return t
        return None

    def _update_lag(self, now: float) -> list[TopologyEvent]:
        """Lag of each replica against the writer's last known WAL position.

        Bytes: writer LSN minus replay LSN. Milliseconds: zero when the replica has replayed
        everything the writer has (an idle primary shows no false lag), else how long ago the
        writer first had WAL the replica has not replayed (from the writer's probe history),
        or at least the age of the last replayed transaction.
        """
        events: list[TopologyEvent] = []
        writer = self.instances[self._writer] if self._writer is not None else None
        for st in self.instances.values():
            if not st.in_recovery:
                st.lag_bytes, st.lag_ms = (0, 0.0) if st.name == self._writer else (None, None)
                continue
            if st.replay_lsn is None:
                continue
            was_eligible = self._eligible_reader(st)
            if writer is not None and writer.current_lsn is not None:
                st.lag_bytes = max(0, writer.current_lsn - st.replay_lsn)
            else:
                st.lag_bytes = None
            caught_up = st.lag_bytes == 0 or (st.lag_bytes is None and st.receive_lsn == st.replay_lsn)
            if caught_up:
                st.lag_ms = 0.0
            else:
                since = self._unreplayed_since(st.replay_lsn)
                oldest = self._writer_lsn_history[0][0] if self._writer_lsn_history else now
                st.lag_ms = max(0.0, (now - (since if since is not None else oldest)) * 1000)
            simulated = self.simulated_lag_ms.get(st.name)
            if simulated is not None:
                st.lag_ms = max(st.lag_ms, simulated)
            if st.up and was_eligible != self._eligible_reader(st):
                kind = "replica_lag_ok" if not was_eligible else "replica_lagging"
                events.append(TopologyEvent(kind, st.name, f"lag {st.lag_ms:.0f} ms, {st.lag_bytes} bytes"))
        return events

    # --- the decision -----------------------------------------------------------------------

    def _elect(self) -> list[TopologyEvent]:
        claimants = [self.instances[n] for n in self.instance_names
                     if self.instances[n].up and self.instances[n].in_recovery is False]
        best: InstanceStatus | None
        if self.authority is not None:
            # The authority names the writer; a probe must still show it writable.
            leader = self.authority.leader
            best = next((st for st in claimants if st.name == leader), None)
            events = self._raise_high_water([best] if best is not None else [])
        else:
            events = self._raise_high_water(claimants)
            floor = self.high_water.timeline if self.high_water is not None else 0
            # Claimants at the high-water mark may be the writer; on a tie keep the current one.
            eligible = [st for st in claimants if (st.timeline or 0) >= floor]
            best = max(eligible, key=lambda st: st.name == self._writer, default=None)
        for st in claimants:
            fenced = st is not best
            if fenced and not st.fenced:
                events.append(TopologyEvent("instance_fenced", st.name, self._fence_reason(st, best)))
            st.fenced = fenced
        for st in self.instances.values():
            if st.fenced and not (st.up and st.in_recovery is False):
                st.fenced = False  # it went down or back into recovery: no longer a rival
        new_writer = best.name if best is not None else None
        if new_writer != self._writer:
            events.append(TopologyEvent("writer_changed", new_writer, f"was {self._writer}"))
            self._writer = new_writer
        return events

    def _raise_high_water(self, claimants: list[InstanceStatus]) -> list[TopologyEvent]:
        top = max(claimants, key=lambda st: st.timeline or 0, default=None)
        if top is None or top.timeline is None:
            return []
        old = self.high_water
        if old is not None and top.timeline <= old.timeline:
            return []
        self.high_water = HighWater(top.timeline, top.name)
        if old is None:
            return []  # the first writer seen: nothing advanced
        return [TopologyEvent("timeline_advanced", top.name,
                              f"timeline {top.timeline} (was {old.timeline} on {old.instance})")]

    def _fence_reason(self, st: InstanceStatus, best: InstanceStatus | None) -> str:
        if self.authority is not None:
            leader = self.authority.leader
            return (f"claims to be writable; {self.authority.source} names "
                    + (f"{leader} the leader" if leader is not None else "no leader"))
        mark = self.high_water
        if mark is not None and (st.timeline or 0) < mark.timeline:
            return (f"claims to be writable on timeline {st.timeline}; "
                    f"timeline {mark.timeline} was seen on {mark.instance}")
        assert best is not None
        return f"claims to be writable; {best.name} is the writer"
