"""The topology state machine: per instance health and role, derived from probe results.

Rules of this file: no I/O and no clock. Callers pass the current time (seconds, monotonic)
and what a probe saw; methods return the events the change caused, for the I/O layer to log.
The writer is the instance that is up and not in recovery; if two claim it, the higher
timeline wins and the other is fenced (it never receives traffic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
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

    @property
    def up(self) -> bool:
        return self.health is Health.UP


@dataclass(frozen=True)
class TopologyEvent:
    """Something worth a log line: kind is a stable event name (instance_up, writer_changed, ...)."""

    kind: str
    instance: str | None
    detail: str = ""


@dataclass
class ClusterTopology:
    instance_names: tuple[str, ...]
    instances: dict[str, InstanceStatus] = field(default_factory=dict)
    _writer: str | None = None

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
        """Instances that are up and in recovery, in configuration order."""
        return [n for n in self.instance_names if self.instances[n].up and self.instances[n].in_recovery
                and not self.instances[n].fenced]

    # --- inputs -----------------------------------------------------------------------------

    def probe_succeeded(self, name: str, now: float, *, in_recovery: bool,
                        timeline: int | None = None) -> list[TopologyEvent]:
        st = self.instances[name]
        events: list[TopologyEvent] = []
        if st.health is not Health.UP:
            events.append(TopologyEvent("instance_up", name))
        st.health = Health.UP
        st.in_recovery = in_recovery
        st.timeline = timeline
        st.last_probe_at = now
        st.last_error = None
        events.extend(self._elect())
        return events

    def probe_failed(self, name: str, now: float, error: str) -> list[TopologyEvent]:
        st = self.instances[name]
        events: list[TopologyEvent] = []
        if st.health is not Health.DOWN:
            events.append(TopologyEvent("instance_down", name, error))
        st.health = Health.DOWN
        st.last_probe_at = now
        st.last_error = error
        events.extend(self._elect())
        return events

    # --- the decision -----------------------------------------------------------------------

    def _elect(self) -> list[TopologyEvent]:
        claimants = [self.instances[n] for n in self.instance_names
                     if self.instances[n].up and self.instances[n].in_recovery is False]
        events: list[TopologyEvent] = []
        new_writer: str | None = None
        if claimants:
            # The higher timeline is the newer primary; on a tie keep the current writer.
            def rank(st: InstanceStatus) -> tuple[int, int]:
                return (st.timeline or 0, 1 if st.name == self._writer else 0)

            best = max(claimants, key=rank)
            new_writer = best.name
            for st in claimants:
                fenced = st is not best
                if fenced and not st.fenced:
                    events.append(TopologyEvent("instance_fenced", st.name,
                                                f"claims to be writable; {best.name} is newer"))
                st.fenced = fenced
        for st in self.instances.values():
            if st.fenced and not (st.up and st.in_recovery is False):
                st.fenced = False  # it went down or back into recovery: no longer a rival
        if new_writer != self._writer:
            events.append(TopologyEvent("writer_changed", new_writer, f"was {self._writer}"))
            self._writer = new_writer
        return events
