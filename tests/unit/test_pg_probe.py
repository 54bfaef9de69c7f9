"""The PostgreSQL probe's pure half: the probe's row as a ProbeResult, the function catalog's answer."""

from __future__ import annotations

import pytest

from endpoint_proxy.topology.pg_probe import parse_function_names, parse_probe_row
from endpoint_proxy.topology.state import ProbeResult

Row = tuple[str | None, ...]


@pytest.mark.parametrize(("row", "expected"), [
    # a primary: its WAL position and timeline
    (("f", "16777216", None, None, "0", "1"), ProbeResult(False, timeline=1, current_lsn=16777216)),
    # a promoted replica keeps its last receive/replay positions
    (("f", "50331648", "33554432", "33554432", "0", "2"),
     ProbeResult(False, timeline=2, current_lsn=50331648, receive_lsn=33554432, replay_lsn=33554432)),
    # a replica: positions, the age of its last replayed transaction
    (("t", None, "16777216", "16777000", "1.25", None),
     ProbeResult(True, receive_lsn=16777216, replay_lsn=16777000, replay_age_s=1.25)),
    # numeric columns come as "123.000000" from some servers
    (("t", None, "100.000000", "100", "0.000000", None), ProbeResult(True, receive_lsn=100, replay_lsn=100)),
    # a replica that never replayed anything: NULL positions and age
    (("t", None, None, None, None, None), ProbeResult(True)),
    # a replica whose clock runs behind the primary's: no negative age
    (("t", None, "1", "1", "-0.004", None), ProbeResult(True, receive_lsn=1, replay_lsn=1)),
])
def test_probe_rows(row: Row, expected: ProbeResult) -> None:
    assert parse_probe_row([row]) == expected


@pytest.mark.parametrize(("rows", "message"), [
    ([], "0 rows"),
    ([("f", "1", None, None, "0", "1")] * 2, "2 rows"),
    ([("f", "1", None, None, "0")], "5 columns"),
    ([("f", "1", None, None, "0", "1", "x")], "7 columns"),
    ([("x", "1", None, None, "0", "1")], "in_recovery"),
    ([(None, "1", None, None, "0", "1")], "in_recovery"),
    ([("true", "1", None, None, "0", "1")], "in_recovery"),
    ([("f", "abc", None, None, "0", "1")], "current_lsn"),
    ([("f", "-5", None, None, "0", "1")], "current_lsn"),
    ([("f", "1.5", None, None, "0", "1")], "current_lsn"),
    ([("f", "nan", None, None, "0", "1")], "current_lsn"),
    ([("f", "1e30", None, None, "0", "1")], "current_lsn"),
    ([("t", None, "inf", None, "0", None)], "receive_lsn"),
    ([("t", None, None, "\x00", "0", None)], "replay_lsn"),
    ([("t", None, None, None, "soon", None)], "replay_age_s"),
    ([("t", None, None, None, "nan", None)], "replay_age_s"),
    ([("f", "1", None, None, "0", "one")], "timeline"),
    ([("f", "1", None, None, "0", None)], "no timeline"),
])
def test_garbage_is_a_value_error_naming_the_column(rows: list[Row], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_probe_row(rows)


@pytest.mark.parametrize(("rows", "expected"), [
    ([("",)], frozenset()),
    ([(None,)], frozenset()),
    ([("app_bump",)], frozenset({"app_bump"})),
    ([("a\x1fb\x1f\x1fc",)], frozenset({"a", "b", "c"})),
    ([("caf\ufffd",)], frozenset({"caf\ufffd"})),  # a name that was not valid UTF-8, replaced
])
def test_function_names(rows: list[Row], expected: frozenset[str]) -> None:
    assert parse_function_names(rows) == expected


@pytest.mark.parametrize("rows", [[], [("a",), ("b",)], [("a", "b")]])
def test_function_catalog_garbage(rows: list[Row]) -> None:
    with pytest.raises(ValueError):
        parse_function_names(rows)
