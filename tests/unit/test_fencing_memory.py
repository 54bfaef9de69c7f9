"""Fencing's memory: the state file's format, the file itself (atomic, merged, never a crash), verdicts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog.testing

from endpoint_proxy.config import ConfigError, parse_config
from endpoint_proxy.server.state_file import StateFile
from endpoint_proxy.topology.memory import decode_memory, encode_memory, merge_memory
from endpoint_proxy.topology.state import ClusterTopology, Health, HighWater, ProbeResult, Role
from endpoint_proxy.topology.verdict import Verdict, verdict_of


def test_round_trip() -> None:
    marks = {"app": HighWater(3, "b"), "other": HighWater(0, "x")}
    assert decode_memory(encode_memory(marks)) == marks
    assert json.loads(encode_memory(marks)) == {
        "version": 1, "clusters": {"app": {"timeline": 3, "instance": "b"}, "other": {"timeline": 0, "instance": "x"}}}


@pytest.mark.parametrize("text", [
    "",
    "{",
    "[]",
    "null",
    '{"version": 2, "clusters": {}}',
    '{"clusters": {}}',
    '{"version": 1}',
    '{"version": 1, "clusters": []}',
    '{"version": 1, "clusters": {"app": 3}}',
    '{"version": 1, "clusters": {"app": {"timeline": 3}}}',
    '{"version": 1, "clusters": {"app": {"timeline": "3", "instance": "b"}}}',
    '{"version": 1, "clusters": {"app": {"timeline": -1, "instance": "b"}}}',
    '{"version": 1, "clusters": {"app": {"timeline": 1.5, "instance": "b"}}}',
    '{"version": 1, "clusters": {"app": {"timeline": true, "instance": "b"}}}',
    '{"version": 1, "clusters": {"app": {"timeline": 3, "instance": null}}}',
    '{"version": 1, "clusters": {"app": {"timeline": 3, "instance": "b", "extra": 1}}}',
])
def test_anything_else_is_refused_whole(text: str) -> None:
    with pytest.raises(ValueError):
        decode_memory(text)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ({}, {"a": HighWater(2, "x")}, {"a": HighWater(2, "x")}),
    ({"a": HighWater(3, "y")}, {"a": HighWater(2, "x")}, {"a": HighWater(3, "y")}),
    ({"a": HighWater(2, "y")}, {"a": HighWater(3, "x")}, {"a": HighWater(3, "x")}),
    ({"a": HighWater(2, "y")}, {"a": HighWater(2, "x")}, {"a": HighWater(2, "x")}),
    ({"a": HighWater(2, "y")}, {"b": HighWater(1, "x")}, {"a": HighWater(2, "y"), "b": HighWater(1, "x")}),
])
def test_marks_only_rise(old: dict[str, HighWater], new: dict[str, HighWater], expected: dict[str, HighWater]) -> None:
    assert merge_memory(old, new) == expected


def test_the_file_is_written_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    assert state.load() == {}
    state.record("app", HighWater(2, "b"))
    state.record("other", HighWater(5, "z"))
    assert StateFile(path).load() == {"app": HighWater(2, "b"), "other": HighWater(5, "z")}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left behind


def test_writers_sharing_a_file_keep_the_highest_mark(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    first, second = StateFile(path), StateFile(path)
    first.load()
    second.load()
    first.record("app", HighWater(3, "c"))
    second.record("other", HighWater(1, "x"))  # knows nothing of app: must not erase it
    second.record("app", HighWater(2, "b"))  # older than what the file holds
    assert StateFile(path).load() == {"app": HighWater(3, "c"), "other": HighWater(1, "x")}


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b'{"version": 9}', b""])
def test_a_corrupt_file_is_a_log_line_and_is_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with structlog.testing.capture_logs() as logs:
        state = StateFile(path)
        assert state.load() == {}
    assert [e["log_level"] for e in logs if e["event"].startswith("state_file_")] == ["error"]
    state.record("app", HighWater(2, "b"))
    assert StateFile(path).load() == {"app": HighWater(2, "b")}


def test_an_unreadable_file_or_directory_is_a_log_line(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "state.json"
    state = StateFile(tmp_path)  # a directory: reading fails
    with structlog.testing.capture_logs() as logs:
        assert state.load() == {}
        state.record("app", HighWater(2, "b"))  # writing fails too: logged, kept in memory
    assert state.recorded("app") == HighWater(2, "b")
    events = [e["event"] for e in logs]
    assert "state_file_unreadable" in events and "state_file_write_failed" in events
    with structlog.testing.capture_logs():
        StateFile(path).record("app", HighWater(2, "b"))  # a missing directory: same


def test_no_path_keeps_marks_in_memory() -> None:
    state = StateFile(None)
    assert state.load() == {}
    state.record("app", HighWater(1, "a"))
    assert state.recorded("app") == HighWater(1, "a")


def test_the_config_key(tmp_path: Path) -> None:
    def server(section: dict[str, object]) -> dict[str, object]:
        return {"server": section, "clusters": [{
            "name": "c", "protocol": "postgresql", "instances": [{"name": "a", "host": "h", "port": 1}],
            "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer"}]}]}

    assert parse_config(server({})).server.state_file is None
    path = str(tmp_path / "state.json")
    assert parse_config(server({"state_file": path})).server.state_file == path
    for bad in (str(tmp_path / "missing" / "state.json"), str(tmp_path), 3):
        with pytest.raises(ConfigError) as info:
            parse_config(server({"state_file": bad}))
        assert info.value.path == "server.state_file"


# --- the state machine's memory -------------------------------------------------------------------


@pytest.mark.parametrize(("remembered", "probe", "writer", "role"), [
    (HighWater(2, "b"), ProbeResult(False, timeline=1), None, Role.FENCED),
    (HighWater(2, "b"), ProbeResult(False, timeline=2), "a", Role.WRITER),
    (HighWater(2, "b"), ProbeResult(False, timeline=3), "a", Role.WRITER),
    (HighWater(2, "b"), ProbeResult(True, replay_lsn=1), None, Role.READER),
    (None, ProbeResult(False, timeline=1), "a", Role.WRITER),
])
def test_a_remembered_mark_is_a_floor(remembered: HighWater | None, probe: ProbeResult, writer: str | None,
                                      role: Role) -> None:
    t = ClusterTopology(("a", "b"))
    if remembered is not None:
        t.remember(remembered)
    events = t.probe_succeeded("a", 1.0, result=probe)
    assert (t.writer, t.role("a")) == (writer, role)
    if role is Role.FENCED:
        fenced = [e for e in events if e.kind == "instance_fenced"]
        assert fenced and "timeline 2 was seen on b" in fenced[0].detail


def test_remembering_a_lower_mark_changes_nothing() -> None:
    t = ClusterTopology(("a",))
    t.probe_succeeded("a", 1.0, result=ProbeResult(False, timeline=4))
    t.remember(HighWater(3, "z"))
    assert t.high_water == HighWater(4, "a") and t.writer == "a"


def test_the_mark_rises_with_a_promotion() -> None:
    t = ClusterTopology(("a", "b"))
    t.probe_succeeded("a", 1.0, result=ProbeResult(False, timeline=1))
    assert t.high_water == HighWater(1, "a")
    events = t.probe_succeeded("b", 2.0, result=ProbeResult(False, timeline=2))
    assert t.high_water == HighWater(2, "b")
    assert ("timeline_advanced", "b") in [(e.kind, e.instance) for e in events]


# --- verdicts -------------------------------------------------------------------------------------


def _verdict(health: Health, role: Role, is_writer: bool) -> Verdict:
    return Verdict("x", health, role, role is Role.READER, is_writer, None, fresh=True)


@pytest.mark.parametrize(("verdict", "was_writer", "same"), [
    (_verdict(Health.UP, Role.WRITER, True), True, True),
    (_verdict(Health.UP, Role.WRITER, True), False, False),
    (_verdict(Health.UP, Role.READER, False), False, True),
    (_verdict(Health.UP, Role.READER, False), True, False),  # demoted
    (_verdict(Health.UP, Role.FENCED, False), True, False),
    (_verdict(Health.UP, Role.FENCED, False), False, False),
    (_verdict(Health.DOWN, Role.UNKNOWN, False), True, False),
    (_verdict(Health.DOWN, Role.READER, False), False, False),
    (_verdict(Health.UNKNOWN, Role.UNKNOWN, False), False, False),
    (_verdict(Health.UP, Role.UNKNOWN, False), False, False),  # writable but not the writer
])
def test_same_role(verdict: Verdict, was_writer: bool, same: bool) -> None:
    assert verdict.same_role(was_writer) is same


def test_verdict_of_the_topology() -> None:
    t = ClusterTopology(("a", "b"))
    t.probe_succeeded("a", 1.0, result=ProbeResult(False, timeline=1))
    t.probe_failed("b", 1.0, "connection refused")
    a, b = verdict_of(t, "a", fresh=True), verdict_of(t, "b", fresh=True)
    assert (a.up, a.is_writer, a.role, a.in_recovery, a.error) == (True, True, Role.WRITER, False, None)
    assert (b.up, b.health, b.error) == (False, Health.DOWN, "connection refused")
    gone = verdict_of(t, "zz", fresh=True)
    assert not gone.fresh and gone.health is Health.UNKNOWN
