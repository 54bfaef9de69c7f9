"""Planned switchover, pure parts: may it start, which replica becomes the writer, what is reported.

Rules of this file: no I/O and no clock. ``plan_switchover`` reads the topology the monitor
keeps and refuses (``SwitchoverRefused``) before anything is touched; the record of a
switchover that ran is a ``SwitchoverRecord``, shown in /topology and logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ..topology.state import ClusterTopology

COMPLETED: Final = "completed"
ABANDONED: Final = "abandoned"
FAILED: Final = "failed"


class SwitchoverRefused(Exception):
    """The switchover cannot start; nothing was changed. The message says why."""


@dataclass(frozen=True)
class SwitchoverPlan:
    cluster: str
    old: str
    new: str


def plan_switchover(cluster: str, topology: ClusterTopology, method: str, to: str | None,
                    writer: str | None = None) -> SwitchoverPlan:
    """Check that a switchover may start and pick the replica to promote.

    ``to`` names it; None picks the healthy replica with the least lag (bytes, then ms;
    ties go to the earlier instance of the configuration). ``writer``: the writer to switch
    over from, when the topology may no longer show it (a simulated failure); by default
    the topology's."""
    if method == "none":
        raise SwitchoverRefused(
            f"switchover is not configured for cluster {cluster}: set [clusters.promotion] "
            'method = "sql" or "command"')
    old = writer if writer is not None else topology.writer
    if old is None:
        raise SwitchoverRefused(f"cluster {cluster} has no known writer to switch over from")
    if to is not None:
        if to not in topology.instances:
            known = ", ".join(topology.instance_names)
            raise SwitchoverRefused(f"cluster {cluster} has no instance named {to!r} (instances: {known})")
        if to == old:
            raise SwitchoverRefused(f"{to} is already the writer of cluster {cluster}")
        problem = _unfit(topology, to)
        if problem:
            raise SwitchoverRefused(f"cannot promote {to}: {problem}")
        return SwitchoverPlan(cluster, old, to)
    fit = [n for n in topology.instance_names if n != old and not _unfit(topology, n)]
    if not fit:
        raise SwitchoverRefused(f"cluster {cluster} has no healthy replica to promote")

    def lag(name: str) -> tuple[float, float]:
        st = topology.instances[name]
        return (float("inf") if st.lag_bytes is None else st.lag_bytes,
                float("inf") if st.lag_ms is None else st.lag_ms)

    return SwitchoverPlan(cluster, old, min(fit, key=lag))


def _unfit(topology: ClusterTopology, name: str) -> str:
    st = topology.instances[name]
    if not st.up:
        return f"it is {st.health.value}"
    if st.fenced:
        return "it is fenced"
    if not st.in_recovery:
        return "it is not a replica"
    return ""


@dataclass(frozen=True)
class SwitchoverRecord:
    """How a switchover went. ``pause_ms``: how long new writer work was held. ``at``:
    when it started (wall clock, epoch seconds)."""

    cluster: str
    from_: str
    to: str
    outcome: str  # completed | abandoned | failed
    pause_ms: int
    at: float
    detail: str = ""
    reason: str = "requested"

    @property
    def ok(self) -> bool:
        return self.outcome == COMPLETED

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "from": self.from_, "to": self.to, "outcome": self.outcome,
                "pause_ms": self.pause_ms, "at": round(self.at, 3), "detail": self.detail,
                "reason": self.reason}
