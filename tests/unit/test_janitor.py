"""The janitor's session timeouts, decided from samples only: a statement in flight too long is
cancelled once, a session idle in a transaction or idle at all too long is expired, nothing happens
when a timeout is off, and a session that leaves between ticks is simply forgotten (MockClock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from endpoint_proxy.server.janitor import (
    CANCEL,
    CLIENT_IDLE,
    IDLE_TRANSACTION,
    Janitor,
    Timeouts,
    Track,
    decide,
    tick_interval,
)


@dataclass
class Config:
    query_timeout_ms: int = 0
    idle_transaction_timeout_ms: int = 0
    client_idle_timeout_ms: int = 0


@dataclass(eq=False)
class FakeSession:
    """A session as the janitor sees it; records what it was asked to do, and when."""

    config: Config
    requests: int = 0
    in_flight: bool = False
    in_transaction: bool = False
    logged_in: bool = True
    cancels: list[float] = field(default_factory=list)
    expired: list[tuple[str, float]] = field(default_factory=list)
    sampled: int = 0

    def activity(self) -> tuple[int, bool, bool] | None:
        self.sampled += 1
        if not self.logged_in:
            return None
        return self.requests, self.in_flight, self.in_transaction

    def cancel_running(self) -> None:
        self.cancels.append(trio.current_time())

    def expire(self, reason: str) -> None:
        self.expired.append((reason, trio.current_time()))

    # What the client does, as the session would count it.
    def start(self) -> None:
        self.requests += 1
        self.in_flight = True

    def finish(self, *, in_transaction: bool = False) -> None:
        self.in_flight = False
        self.in_transaction = in_transaction


class Sessions:
    def __init__(self) -> None:
        self.live: set[object] = set()
        self.configs: list[Config] = []


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> AsyncIterator[Sessions]:
    sessions = Sessions()
    janitor = Janitor(lambda: sessions.live, lambda s: s.config, lambda: sessions.configs)
    nursery.start_soon(janitor.run)
    yield sessions


def add(sessions: Sessions, config: Config, **state: object) -> FakeSession:
    session = FakeSession(config, **state)  # type: ignore[arg-type]
    sessions.live.add(session)
    if config not in sessions.configs:
        sessions.configs.append(config)
    return session


# --- the rules, as a table --------------------------------------------------------------------------

T = Timeouts(query_s=10, idle_transaction_s=20, client_idle_s=30)


@pytest.mark.parametrize(("sample", "elapsed", "timeouts", "action"), [
    ((5, True, False), 9.9, T, None),
    ((5, True, False), 10, T, CANCEL),
    ((5, True, True), 10, T, CANCEL),  # a statement inside a transaction: the query timeout
    ((5, False, True), 19.9, T, None),
    ((5, False, True), 20, T, IDLE_TRANSACTION),
    ((5, False, False), 29.9, T, None),
    ((5, False, False), 30, T, CLIENT_IDLE),
    ((5, True, False), 1000, Timeouts(None, 20, 30), None),
    ((5, False, True), 1000, Timeouts(10, None, 30), None),
    ((5, False, False), 1000, Timeouts(10, 20, None), None),
])
def test_rules(sample: tuple[int, bool, bool], elapsed: float, timeouts: Timeouts, action: str | None) -> None:
    assert decide(Track(sample, 100.0), sample, 100.0 + elapsed, timeouts)[1] == action


def test_a_changed_sample_starts_again_and_an_acted_one_is_not_acted_on_again() -> None:
    track, action = decide(Track((5, True, False), 0.0), (6, True, False), 50.0, T)
    assert action is None and track.since == 50.0  # a new request: its own clock
    track, action = decide(track, (6, True, False), 60.0, T)
    assert action == CANCEL
    assert decide(track, (6, True, False), 1000.0, T)[1] is None  # once per request
    track, action = decide(track, (6, False, False), 1000.0, T)  # it ended: idle from now
    assert action is None and track.since == 1000.0
    assert decide(None, (1, False, False), 5.0, T) == (Track((1, False, False), 5.0), None)


@pytest.mark.parametrize(("timeouts", "interval"), [
    ([], 1.0),
    ([Timeouts()], 1.0),
    ([Timeouts(query_s=2.0)], 0.5),
    ([Timeouts(query_s=100.0), Timeouts(client_idle_s=0.4)], 0.1),
    ([Timeouts(idle_transaction_s=0.01)], 0.05),
    ([Timeouts(client_idle_s=3600.0)], 1.0),
])
def test_the_tick(timeouts: list[Timeouts], interval: float) -> None:
    assert tick_interval(timeouts) == interval


# --- the janitor, running ---------------------------------------------------------------------------


async def test_a_statement_running_too_long_is_cancelled_once(proxy: Sessions,
                                                               autojump_clock: trio.testing.MockClock) -> None:
    session = add(proxy, Config(query_timeout_ms=2000))
    await trio.sleep(1)  # the janitor sees a timeout on (it looks every second while none is)
    session.start()
    started = trio.current_time()
    await trio.sleep(10)  # it never ends (the server ignores the cancel)
    assert len(session.cancels) == 1
    assert 2.0 <= session.cancels[0] - started <= 3.0  # within two ticks (0.5 s) of the timeout
    session.finish()
    session.start()  # the next statement gets its own timeout
    started = trio.current_time()
    await trio.sleep(1.5)
    session.finish()  # done in time: nothing
    session.start()
    await trio.sleep(1.5)
    assert len(session.cancels) == 1
    await trio.sleep(1.5)
    assert len(session.cancels) == 2
    assert session.expired == []


async def test_short_statements_back_to_back_are_never_cancelled(proxy: Sessions,
                                                                  autojump_clock: trio.testing.MockClock) -> None:
    session = add(proxy, Config(query_timeout_ms=1000))
    for _ in range(200):  # always busy, but each request lasts 0.1 s
        session.start()
        await trio.sleep(0.1)
        session.finish()
    assert session.cancels == []


async def test_idle_in_a_transaction_too_long_expires(proxy: Sessions,
                                                      autojump_clock: trio.testing.MockClock) -> None:
    session = add(proxy, Config(idle_transaction_timeout_ms=4000, client_idle_timeout_ms=60_000))
    session.start()
    await trio.sleep(0.3)
    session.finish(in_transaction=True)  # BEGIN ...; then the client goes quiet
    idle_from = trio.current_time()
    await trio.sleep(3.5)
    assert session.expired == []
    await trio.sleep(10)
    assert len(session.expired) == 1
    reason, at = session.expired[0]
    assert reason == IDLE_TRANSACTION and 4.0 <= at - idle_from <= 6.0


async def test_idle_outside_a_transaction_too_long_expires(proxy: Sessions,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    busy = add(proxy, Config(client_idle_timeout_ms=1000))
    quiet = add(proxy, busy.config)
    for _ in range(30):
        busy.start()
        busy.finish()
        await trio.sleep(0.5)
    assert busy.expired == []
    assert [r for r, _ in quiet.expired] == [CLIENT_IDLE]  # once, though it stays idle


async def test_nothing_happens_with_the_timeouts_off(proxy: Sessions, autojump_clock: trio.testing.MockClock) -> None:
    running = add(proxy, Config())
    running.start()
    in_tx = add(proxy, Config())
    in_tx.in_transaction = True
    idle = add(proxy, Config())
    await trio.sleep(3600)
    assert all(s.cancels == [] and s.expired == [] for s in (running, in_tx, idle))
    assert running.sampled == 0  # with every timeout off, sessions cost the janitor nothing


async def test_a_session_logging_in_or_without_the_protocol_is_left_alone(
        proxy: Sessions, autojump_clock: trio.testing.MockClock) -> None:
    login = add(proxy, Config(client_idle_timeout_ms=500), logged_in=False)

    @dataclass(eq=False)
    class Old:  # a shell that does not implement Timed
        config: Config

    proxy.live.add(Old(login.config))
    await trio.sleep(10)
    assert login.expired == []


async def test_a_session_that_leaves_between_ticks_is_forgotten(nursery: trio.Nursery,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    sessions = Sessions()
    janitor = Janitor(lambda: sessions.live, lambda s: s.config, lambda: sessions.configs)
    session = add(sessions, Config(client_idle_timeout_ms=1000))
    janitor.sweep(trio.current_time())
    assert session in janitor.tracks
    sessions.live.discard(session)  # the client left
    await trio.sleep(5)
    janitor.sweep(trio.current_time())
    assert janitor.tracks == {} and session.expired == []
    sessions.live.add(session)  # the same object seen again starts from scratch
    janitor.sweep(trio.current_time())
    assert janitor.tracks[session].since == trio.current_time()


async def test_a_failing_session_does_not_stop_the_others(proxy: Sessions,
                                                          autojump_clock: trio.testing.MockClock) -> None:
    class Broken(FakeSession):
        def activity(self) -> tuple[int, bool, bool] | None:
            raise RuntimeError("bug")

    config = Config(client_idle_timeout_ms=500)
    proxy.live.add(Broken(config))
    fine = add(proxy, config)
    await trio.sleep(2)
    assert [r for r, _ in fine.expired] == [CLIENT_IDLE]


async def test_a_reload_that_enables_a_timeout_is_followed(proxy: Sessions,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    session = add(proxy, Config())
    await trio.sleep(100)
    session.config.client_idle_timeout_ms = 200  # the cluster's config now says so
    await trio.sleep(1.5)
    assert [r for r, _ in session.expired] == [CLIENT_IDLE]
