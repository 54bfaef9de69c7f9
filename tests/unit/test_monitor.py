"""The monitor under trio's MockClock: sessions' failures, verdicts, routing around an instance, probe errors.

The runtime's probes are scripted here (``Scripted``): each instance answers what the test
says, after the delay it says, so the timing rules can be checked to the millisecond.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from endpoint_proxy.config import ClusterConfig, parse_config
from endpoint_proxy.server.cluster import FIRST_PROBE_TIMEOUT_S, ClusterRuntime
from endpoint_proxy.server.state_file import StateFile
from endpoint_proxy.topology.state import Health, HighWater, ProbeResult, Role

Clock = trio.testing.MockClock
WRITER = ProbeResult(False, timeline=1, current_lsn=100)
REPLICA = ProbeResult(True, replay_lsn=100, receive_lsn=100)


class Hang:
    """What a SIGSTOPped server answers: nothing."""


@dataclass
class Scripted:
    """One instance's script: what a probe sees (a result, an exception to raise, or Hang),
    decided when the probe starts, and how long the answer takes."""

    answer: ProbeResult | BaseException | Hang
    delay: float = 0.001
    started: list[float] = field(default_factory=list)
    answered: list[float] = field(default_factory=list)

    @property
    def in_flight(self) -> bool:
        return len(self.started) > len(self.answered)


class _Conn:
    def __init__(self, name: str) -> None:
        self.name = name

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class ScriptedRuntime(ClusterRuntime):
    def __init__(self, config: ClusterConfig, script: dict[str, Scripted], **kw: Any) -> None:
        super().__init__(config, **kw)
        self.script = script

    async def _open_probe(self, name: str) -> Any:
        await trio.lowlevel.checkpoint()
        return _Conn(name)

    async def _ask(self, conn: Any) -> ProbeResult:
        inst = self.script[conn.name]
        inst.started.append(trio.current_time())
        seen = inst.answer
        await trio.sleep(inst.delay)
        if isinstance(seen, Hang):
            await trio.sleep_forever()
        inst.answered.append(trio.current_time())
        if isinstance(seen, BaseException):
            raise seen
        assert isinstance(seen, ProbeResult)
        return seen


def config(**overrides: Any) -> ClusterConfig:
    doc: dict[str, Any] = {
        "name": "c", "protocol": "postgresql", "health_check_interval_ms": 100, "failover_timeout_ms": 3000,
        "users": [{"name": "u", "password": "p"}],
        "instances": [{"name": n, "host": "127.0.0.1", "port": 1} for n in ("a", "b", "c")],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer"},
                      {"name": "r", "listen": "127.0.0.1:0", "kind": "reader"}],
        **overrides,
    }
    return parse_config({"clusters": [doc]}).clusters[0]


@pytest.fixture
def script() -> dict[str, Scripted]:
    return {"a": Scripted(WRITER), "b": Scripted(REPLICA), "c": Scripted(REPLICA)}


@pytest.fixture
async def rt(script: dict[str, Scripted]) -> AsyncIterator[ScriptedRuntime]:
    """The runtime, its monitors running; tests that use it take ``autojump_clock`` (pytest-trio
    looks for the clock among the test's own arguments)."""
    runtime = ScriptedRuntime(config(), script)
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        assert runtime.topology.writer == "a"
        yield runtime
        nursery.cancel_scope.cancel()


def endpoint(rt: ClusterRuntime, name: str) -> Any:
    return next(e for e in rt.config.endpoints if e.name == name)


# --- a session's failure never moves the cluster ---------------------------------------------


async def test_a_session_failure_only_asks_for_a_probe(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    await trio.sleep(0.05)  # between two probes of a (interval 100 ms)
    before = len(script["a"].started)
    rt.backend_failed("a", "connection reset by peer")
    await trio.sleep(0.01)
    assert len(script["a"].started) == before + 1  # probed at once, not at the next interval
    assert rt.topology.writer == "a"


# --- verdicts -----------------------------------------------------------------------------------


async def test_a_verdict_comes_from_a_probe_that_started_after_the_call(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    script["a"].delay = 0.3
    await trio.sleep(0.5)
    while not script["a"].in_flight:
        await trio.sleep(0.01)
    # A probe of a is under way and will say "writer": the server dies now.
    script["a"].answer = ConnectionRefusedError(111, "connection refused")
    asked = trio.current_time()
    verdict = await rt.verdict("a")
    assert verdict.fresh
    assert verdict.health is Health.DOWN and not verdict.same_role(was_writer=True)
    assert "connection refused" in (verdict.error or "")
    assert script["a"].started[-1] > asked
    assert rt.topology.writer is None  # the probe, not the session, moved it


async def test_a_verdict_on_a_healthy_instance(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    writer = await rt.verdict("a")
    replica = await rt.verdict("b")
    assert (writer.fresh, writer.is_writer, writer.role, writer.same_role(was_writer=True)) == (
        True, True, Role.WRITER, True)
    assert not writer.same_role(was_writer=False)
    assert (replica.role, replica.same_role(was_writer=False), replica.same_role(was_writer=True)) == (
        Role.READER, True, False)


async def test_a_hung_server_gives_a_down_verdict_in_about_a_second(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    script["a"].answer = Hang()
    start = trio.current_time()
    verdict = await rt.verdict("a")
    elapsed = trio.current_time() - start
    assert verdict.fresh and verdict.health is Health.DOWN
    assert verdict.error is not None and "timed out" in verdict.error
    assert rt.probe_timeout_s == 1.0
    assert 0.99 <= elapsed <= 1.0 + 0.1 + 0.01  # the probe timeout, plus at most the probe under way


async def test_a_verdict_that_takes_too_long_is_the_current_state(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    script["a"].answer = Hang()
    start = trio.current_time()
    verdict = await rt.verdict("a", timeout_s=0.2)
    assert trio.current_time() - start == pytest.approx(0.2)
    assert not verdict.fresh
    assert verdict.health is Health.UP and verdict.is_writer


async def test_a_verdict_on_an_unknown_instance(rt: ScriptedRuntime, autojump_clock: Clock) -> None:
    verdict = await rt.verdict("nope")
    assert not verdict.fresh and verdict.health is Health.UNKNOWN and not verdict.same_role(was_writer=False)


# --- routing around an instance -----------------------------------------------------------------


async def test_a_reported_writer_is_not_handed_out_until_its_probe_answers(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    script["a"].answer = ConnectionRefusedError(111, "connection refused")
    script["a"].delay = 0.05
    rt.backend_failed("a", "connection refused")
    assert rt.route(endpoint(rt, "w")).instance == "a"  # route() itself decides nothing new

    async def promote_b() -> None:
        await trio.sleep(0.5)
        script["b"].answer = ProbeResult(False, timeline=2, current_lsn=200)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(promote_b)
        decision = await rt.wait_for_route(endpoint(rt, "w"), 3.0)
    assert decision.instance == "b"


async def test_a_reported_writer_that_is_fine_is_handed_out_after_its_probe(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    # pg_terminate_backend on a session: the instance is fine.
    script["a"].delay = 0.02
    rt.backend_failed("a", "terminating connection due to administrator command")
    start = trio.current_time()
    decision = await rt.wait_for_route(endpoint(rt, "w"), 3.0)
    assert decision.instance == "a"
    assert trio.current_time() - start < 0.1
    assert rt.topology.writer == "a" and rt.topology.instances["a"].health is Health.UP


async def test_excluded_replicas_are_passed_over(rt: ScriptedRuntime, autojump_clock: Clock) -> None:
    ep = endpoint(rt, "r")
    assert (await rt.wait_for_route(ep, 1.0, exclude={"b"})).instance == "c"
    assert (await rt.wait_for_route(ep, 1.0, exclude={"b", "c"})).instance == "a"  # the fallback
    assert rt.topology.readers() == ["b", "c"]


async def test_an_excluded_writer_is_waited_for_until_another_one_appears(
        rt: ScriptedRuntime, script: dict[str, Scripted], autojump_clock: Clock) -> None:
    start = trio.current_time()
    decision = await rt.wait_for_route(endpoint(rt, "w"), 0.5, exclude={"a"})
    assert decision.instance is None and trio.current_time() - start == pytest.approx(0.5)
    assert rt.topology.writer == "a"


# --- nothing from a probe ends the monitor -------------------------------------------------------


def _unicode_error() -> UnicodeDecodeError:
    try:
        b"\xff".decode()
    except UnicodeDecodeError as e:
        return e
    raise AssertionError


def _struct_error() -> struct.error:
    try:
        struct.unpack(">I", b"\x00")
    except struct.error as e:
        return e
    raise AssertionError


@pytest.mark.parametrize(("error", "name"), [
    (_unicode_error(), "UnicodeDecodeError"),
    (_struct_error(), "error"),
    (KeyError("server_version"), "KeyError"),
    (AssertionError("not a DataRow"), "AssertionError"),
    (ssl.SSLError(1, "WRONG_VERSION_NUMBER"), "SSLError"),
    (trio.BrokenResourceError("TLS handshake failed"), "BrokenResourceError"),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError"),
    (ValueError("probe column in_recovery is 'x', not t or f"), "ValueError"),
])
async def test_no_exception_from_a_probe_ends_the_monitor(
        rt: ScriptedRuntime, script: dict[str, Scripted], error: BaseException, name: str,
        autojump_clock: Clock) -> None:
    script["b"].answer = error
    with structlog.testing.capture_logs() as logs:
        await trio.sleep(0.5)
    st = rt.topology.instances["b"]
    assert st.health is Health.DOWN
    assert st.last_error is not None and st.last_error.startswith(name)
    assert len(script["b"].started) > 3  # the monitor kept probing
    assert rt.topology.writer == "a"
    if not isinstance(error, ValueError | ssl.SSLError):
        # not what a broken server causes: logged with its traceback, once
        assert [e["event"] for e in logs].count("probe_error") == 1
    script["b"].answer = REPLICA
    await trio.sleep(0.3)
    assert st.health is Health.UP


async def test_a_failing_open_is_a_failed_probe(
        rt: ScriptedRuntime, monkeypatch: pytest.MonkeyPatch, autojump_clock: Clock) -> None:
    async def broken_tls(name: str) -> Any:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("TLS handshake failed")

    rt._monitor_scopes["c"].cancel()  # drop c's connection so that the next probe opens one
    await trio.sleep(0.01)
    monkeypatch.setattr(rt, "_open_probe", broken_tls)
    assert rt._nursery is not None
    rt._nursery.start_soon(rt.monitor_instance, "c")
    await trio.sleep(0.3)
    st = rt.topology.instances["c"]
    assert st.health is Health.DOWN and st.last_error == "BrokenResourceError: TLS handshake failed"


async def test_a_catalog_that_cannot_be_read_falls_back_to_the_configured_lists(
        autojump_clock: Clock) -> None:
    class BrokenCatalog(ScriptedRuntime):
        async def _read_volatile_functions(self, database: str) -> frozenset[str]:
            await trio.lowlevel.checkpoint()
            raise _unicode_error()

    cfg = config(write_functions=["my_writer"], read_functions=["my_reader"])
    rt = BrokenCatalog(cfg, {"a": Scripted(WRITER), "b": Scripted(REPLICA), "c": Scripted(REPLICA)})
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with structlog.testing.capture_logs() as logs:
            await rt.ensure_functions("latin1db")
        policy = rt.function_policy("latin1db")
        assert policy.write_functions == frozenset({"my_writer"})
        assert policy.read_functions == frozenset({"my_reader"})
        failed = [e for e in logs if e["event"] == "function_catalog_failed"]
        assert failed and failed[0]["error"].startswith("UnicodeDecodeError")
        nursery.cancel_scope.cancel()


# --- the first probe ----------------------------------------------------------------------------


async def test_a_slow_first_probe_is_not_a_failure_but_a_slow_later_one_is(
        autojump_clock: Clock) -> None:
    script = {"a": Scripted(WRITER, delay=2.5), "b": Scripted(REPLICA), "c": Scripted(REPLICA)}
    rt = ScriptedRuntime(config(), script)
    assert 2.5 < FIRST_PROBE_TIMEOUT_S
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.run)
            await trio.sleep(3.0)
            assert rt.topology.writer == "a"
            assert ("instance_down", "a") not in [(e["event"], e.get("instance")) for e in logs]
            # Once it has answered, the normal timeout applies: a hung writer is down in a second.
            script["a"].answer = Hang()
            rt.request_probe("a")
            hung_at = trio.current_time()
            while rt.topology.writer == "a":
                await trio.sleep(0.01)
            assert trio.current_time() - hung_at <= rt.probe_timeout_s + 2.5 + 0.05
            nursery.cancel_scope.cancel()


# --- fencing's memory ---------------------------------------------------------------------------


async def test_a_remembered_timeline_fences_from_the_first_probe(
        tmp_path: Any, autojump_clock: Clock) -> None:
    state = StateFile(tmp_path / "state.json")
    state.record("c", HighWater(2, "b"))
    restarted = StateFile(tmp_path / "state.json")
    restarted.load()
    # b, the newer primary, is down; a comes back writable with its old timeline.
    script = {"a": Scripted(WRITER), "b": Scripted(ConnectionRefusedError(111, "refused")), "c": Scripted(REPLICA)}
    rt = ScriptedRuntime(config(), script, state=restarted)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.sleep(1.0)
        assert rt.topology.writer is None and rt.topology.role("a") is Role.FENCED
        nursery.cancel_scope.cancel()


async def test_a_risen_timeline_is_written_to_the_state_file(tmp_path: Any) -> None:
    # Real time: the file is written from a thread, which a mock clock would not wait for.
    path = tmp_path / "state.json"
    script = {"a": Scripted(WRITER), "b": Scripted(REPLICA), "c": Scripted(REPLICA)}
    rt = ScriptedRuntime(config(), script, state=StateFile(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        script["a"].answer = ConnectionRefusedError(111, "refused")
        script["b"].answer = ProbeResult(False, timeline=2, current_lsn=200)
        while rt.topology.writer != "b":
            await trio.sleep(0.05)
        with trio.fail_after(5):
            while StateFile(path).load().get("c") != HighWater(2, "b"):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
