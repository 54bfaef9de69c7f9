"""A probe's verdict on one instance: what a session that lost its backend there may conclude.

Rules of this file: pure, no I/O and no clock. A session never judges an instance itself; it
asks the monitor for a fresh probe and reads the answer through this object.
"""

from __future__ import annotations

from dataclasses import dataclass

from .state import ClusterTopology, Health, Role


@dataclass(frozen=True)
class Verdict:
    """The state of an instance after a probe (or, if none finished in time, as last known).

    ``fresh``: a probe that started after the question was asked has answered; False means
    the answer is the last known state (the probe did not finish in time, or the instance is
    not monitored any more).
    """

    instance: str
    health: Health
    role: Role
    in_recovery: bool | None
    is_writer: bool
    error: str | None
    fresh: bool

    @property
    def up(self) -> bool:
        return self.health is Health.UP

    def same_role(self, was_writer: bool) -> bool:
        """Up, not fenced, and still the writer (``was_writer``) or still a replica: the
        instance is what the session connected to, so its lost connection was the session's
        own affair (a terminated backend), not a failover."""
        if not self.up or self.role is Role.FENCED:
            return False
        return self.is_writer if was_writer else self.role is Role.READER


def verdict_of(topology: ClusterTopology, name: str, *, fresh: bool) -> Verdict:
    """The verdict the topology holds on ``name``; an instance it does not know is unknown."""
    st = topology.instances.get(name)
    if st is None:
        return Verdict(name, Health.UNKNOWN, Role.UNKNOWN, None, False, "not a monitored instance", fresh=False)
    return Verdict(
        instance=name,
        health=st.health,
        role=topology.role(name),
        in_recovery=st.in_recovery,
        is_writer=topology.writer == name,
        error=st.last_error,
        fresh=fresh,
    )
