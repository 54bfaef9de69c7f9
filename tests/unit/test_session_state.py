"""Session state bookkeeping: what is replayed on a new backend, and what pins a session."""

from __future__ import annotations

import pytest

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.routing.session_state import SessionState, ends_transaction, is_rollback


def test_set_reset_discard_and_prepare_are_replayed_in_order() -> None:
    s = SessionState()
    s.on_query("SET search_path = app, public")
    s.on_query("set local work_mem = '1MB'")  # transaction-scoped: not replayed
    s.on_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    s.on_query("  /* c */ SET application_name = 'x'; select 1")
    s.on_query("RESET search_path")
    s.on_query("PREPARE q(int) AS SELECT $1")
    s.on_query("select 'set x = 1'")
    assert s.replay_sql() == [
        "SET search_path = app, public",
        "/* c */ SET application_name = 'x'",
        "RESET search_path",
        "PREPARE q(int) AS SELECT $1",
    ]
    s.on_query("DEALLOCATE q")
    s.on_query("RESET ALL")
    assert s.replay_sql() == []
    assert s.replayable


def test_named_parse_messages_are_kept_until_closed() -> None:
    s = SessionState()
    raw = m.Parse("s1", "select $1", (23,)).encode()
    s.on_parse("s1", raw)
    s.on_parse("", m.Parse("", "select 2", ()).encode())
    assert list(s.parse_messages.values()) == [raw]
    s.on_close_statement("s1")
    assert s.parse_messages == {}
    s.on_parse("s2", raw)
    s.on_query("DISCARD ALL")
    assert s.parse_messages == {}


@pytest.mark.parametrize(("sql", "why"), [
    ("LISTEN chan", "LISTEN"),
    ("create temp table t (a int)", "temporary table"),
    ("CREATE TEMPORARY TABLE t (a int)", "temporary table"),
    ("select pg_advisory_lock(1)", "session advisory lock"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD cursor"),
])
def test_unreplayable_state_pins(sql: str, why: str) -> None:
    s = SessionState()
    s.on_query(sql)
    assert s.pinned_by == why
    assert not s.replayable


def test_transaction_scoped_locks_do_not_pin() -> None:
    s = SessionState()
    s.on_query("select pg_advisory_xact_lock(1)")
    s.on_parse("", m.Parse("", "select pg_try_advisory_xact_lock(1)", ()).encode())
    assert s.replayable
    s.on_parse("", m.Parse("", "select pg_advisory_lock($1)", ()).encode())
    assert s.pinned_by == "session advisory lock"


@pytest.mark.parametrize(("sql", "rollback", "ends"), [
    ("ROLLBACK", True, True), ("abort", True, True), ("rollback to savepoint a", False, False),
    ("ROLLBACK PREPARED 'x'", False, False), ("COMMIT", False, True), ("end", False, True),
    ("select 1", False, False), ("/* x */ rollback;", True, True),
])
def test_transaction_end_detection(sql: str, rollback: bool, ends: bool) -> None:
    assert is_rollback(sql) is rollback
    assert ends_transaction(sql) is ends


def test_query_payloads_are_tracked_like_their_text() -> None:
    for sql in ("SET a = 1", "select 1; set b = 2", "select pg_advisory_lock(1)", "select 1;", "LISTEN x"):
        by_text, by_bytes = SessionState(), SessionState()
        by_text.on_query(sql)
        by_bytes.on_query_bytes(sql.encode() + b"\0")
        assert (by_text.replay_sql(), by_text.pinned_by) == (by_bytes.replay_sql(), by_bytes.pinned_by)


def test_sets_in_a_transaction_count_only_if_it_commits() -> None:
    s = SessionState()
    s.on_query("SET a = 1")
    s.on_query("SET b = 2", status="T")
    s.on_query("ROLLBACK", status="T")
    s.on_query("SET c = 3", status="T")
    s.on_query("RESET a", status="T")
    s.on_query("COMMIT", status="T")
    s.on_query("SET d = 4", status="T")
    s.on_query("COMMIT", status="E")  # a failed transaction: COMMIT rolls back
    assert s.replay_sql() == ["SET a = 1", "SET c = 3", "RESET a"]
    s.on_query("SET e = 5", status="T")
    s.on_query("select 1", status="I")  # ended without a COMMIT we saw (extended protocol): kept
    assert s.replay_sql()[-1] == "SET e = 5"
