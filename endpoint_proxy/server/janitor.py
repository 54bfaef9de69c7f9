"""The janitor: session timeouts (query_timeout_ms, idle_transaction_timeout_ms, client_idle_timeout_ms).

One per process. Every tick it samples each session's activity and acts on what has not changed
for longer than its cluster's timeout. The sessions never read a clock for this: a request costs
them one counter increment, and the janitor tells time from the samples alone.

What a session implements (both shells)::

    class Timed(Protocol):
        def activity(self) -> tuple[int, bool, bool] | None: ...
        def cancel_running(self) -> None: ...
        def expire(self, reason: str) -> None: ...

- ``activity()``: ``(requests started so far, a request in flight, inside a transaction)``, or
  None while the session is not subject to the timeouts (its login, the admin console). Cheap:
  called once per tick. "Inside a transaction" is the status of the last ReadyForQuery (``T`` or
  ``E``; MySQL: SERVER_STATUS_IN_TRANS).
- ``cancel_running()``: query_timeout_ms passed with the same request in flight: cancel it on
  its server (PostgreSQL CancelRequest, MySQL KILL QUERY), so the server's own error (57014 /
  1317) reaches the client and the session goes on. Called at most once per request.
- ``expire(reason)``: ``"idle_transaction"`` (idle inside a transaction for
  idle_transaction_timeout_ms; PostgreSQL FATAL 25P03, as idle_in_transaction_session_timeout)
  or ``"client_idle"`` (idle outside one for client_idle_timeout_ms; FATAL 57P05, as
  idle_session_timeout): the shell sends the error and closes the session (rolling back what
  its server connection holds). Called once.

All three are called from the janitor's task and must not block: a shell records what to do,
wakes its own task, and returns.

Rules (``decide``): a sample unchanged since it was first seen for at least the timeout of its
state — in flight (query), idle inside a transaction, idle outside — is acted on once; any change
starts the count again. A session is acted on no earlier than its timeout and, with a tick of a
quarter of the smallest enabled timeout (50 ms to 1 s), at most two ticks later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog
import trio

log = structlog.get_logger("endpoint_proxy.janitor")

CANCEL: Final = "cancel"
IDLE_TRANSACTION: Final = "idle_transaction"
CLIENT_IDLE: Final = "client_idle"

MIN_TICK_S: Final = 0.05
MAX_TICK_S: Final = 1.0

Activity = tuple[int, bool, bool]  # (requests started so far, a request in flight, inside a transaction)


class Timed(Protocol):
    """What the janitor asks of a session (see the module docstring)."""

    def activity(self) -> Activity | None: ...

    def cancel_running(self) -> None: ...

    def expire(self, reason: str) -> None: ...


class HasTimeouts(Protocol):
    """A cluster's configuration, as far as the janitor reads it (0: off)."""

    @property
    def query_timeout_ms(self) -> int: ...

    @property
    def idle_transaction_timeout_ms(self) -> int: ...

    @property
    def client_idle_timeout_ms(self) -> int: ...


@dataclass(frozen=True)
class Timeouts:
    """A cluster's session timeouts in seconds; None: off."""

    query_s: float | None = None
    idle_transaction_s: float | None = None
    client_idle_s: float | None = None

    @classmethod
    def of(cls, config: HasTimeouts) -> Timeouts:
        def s(ms: int) -> float | None:
            return ms / 1000 if ms > 0 else None

        return cls(s(config.query_timeout_ms), s(config.idle_transaction_timeout_ms), s(config.client_idle_timeout_ms))

    @property
    def enabled(self) -> bool:
        return self.smallest is not None

    @property
    def smallest(self) -> float | None:
        return min((t for t in (self.query_s, self.idle_transaction_s, self.client_idle_s) if t is not None),
                   default=None)


@dataclass
class Track:
    """What the janitor remembers of a session: its last sample, since when it is unchanged,
    and whether that sample was acted on already."""

    sample: Activity
    since: float
    acted: bool = False


def decide(track: Track | None, sample: Activity, now: float, timeouts: Timeouts) -> tuple[Track, str | None]:
    """The session's new track and what to do now: None, CANCEL, IDLE_TRANSACTION or CLIENT_IDLE."""
    if track is None or track.sample != sample:
        return Track(sample, now), None
    if track.acted:
        return track, None
    _, in_flight, in_transaction = sample
    if in_flight:
        limit, action = timeouts.query_s, CANCEL
    elif in_transaction:
        limit, action = timeouts.idle_transaction_s, IDLE_TRANSACTION
    else:
        limit, action = timeouts.client_idle_s, CLIENT_IDLE
    if limit is None or now - track.since < limit:
        return track, None
    track.acted = True
    return track, action


def tick_interval(timeouts: Iterable[Timeouts]) -> float:
    """A quarter of the smallest enabled timeout, within [MIN_TICK_S, MAX_TICK_S]; MAX_TICK_S
    when none is enabled (a reload may enable one)."""
    smallest = min((t.smallest for t in timeouts if t.smallest is not None), default=None)
    if smallest is None:
        return MAX_TICK_S
    return min(MAX_TICK_S, max(MIN_TICK_S, smallest / 4))


class Janitor:
    """Samples the sessions every tick and acts on the timeouts of their clusters.

    ``sessions()``: the sessions now; ``config_of(session)``: its cluster's configuration now;
    ``configs()``: every cluster's configuration (for the tick). Sessions that do not implement
    ``Timed`` (no ``activity``) are left alone."""

    def __init__(self, sessions: Callable[[], Iterable[Any]], config_of: Callable[[Any], HasTimeouts],
                 configs: Callable[[], Iterable[HasTimeouts]]) -> None:
        self.sessions = sessions
        self.config_of = config_of
        self.configs = configs
        self.tracks: dict[Any, Track] = {}  # by session (identity); sessions gone are dropped each tick

    def interval(self) -> float | None:
        """Seconds to the next tick; None while no cluster has a timeout on (nothing to sample)."""
        timeouts = [Timeouts.of(c) for c in self.configs()]
        return tick_interval(timeouts) if any(t.enabled for t in timeouts) else None

    def sweep(self, now: float) -> None:
        """One tick: sample every session, act, forget the sessions that left."""
        previous, self.tracks = self.tracks, {}
        cache: dict[int, tuple[HasTimeouts, Timeouts]] = {}  # per configuration object, this tick
        for session in list(self.sessions()):
            config = self.config_of(session)
            entry = cache.get(id(config))
            if entry is None or entry[0] is not config:
                entry = cache[id(config)] = (config, Timeouts.of(config))
            timeouts = entry[1]
            activity = getattr(session, "activity", None)
            if not timeouts.enabled or activity is None:
                continue
            try:
                sample = activity()
            except Exception:  # noqa: BLE001 - one session's bug must not stop the janitor
                log.exception("janitor_sample_failed", session=getattr(session, "session_id", None))
                continue
            if sample is None:
                continue
            track, action = decide(previous.get(session), sample, now, timeouts)
            self.tracks[session] = track
            if action is not None:
                self._act(session, action, now - track.since)

    @staticmethod
    def _act(session: Any, action: str, unchanged_s: float) -> None:
        log.info("session_timeout", session=getattr(session, "session_id", None), action=action,
                 unchanged_ms=round(unchanged_s * 1000))
        try:
            if action == CANCEL:
                session.cancel_running()
            else:
                session.expire(action)
        except Exception:  # noqa: BLE001 - see sweep
            log.exception("janitor_action_failed", session=getattr(session, "session_id", None), action=action)

    async def run(self) -> None:
        """Tick until cancelled (the interval follows reloads)."""
        while True:
            interval = self.interval()
            if interval is None:  # every timeout off: look again later (a reload may set one)
                self.tracks.clear()
                await trio.sleep(MAX_TICK_S)
                continue
            await trio.sleep(interval)
            self.sweep(trio.current_time())
