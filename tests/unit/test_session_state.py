"""Session state bookkeeping: what is replayed on a new backend, and what pins a session."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.routing import session_state as state_module
from endpoint_proxy.routing.dialect import PgDialect
from endpoint_proxy.routing.pg_classify import analyze
from endpoint_proxy.routing.session_kinds import PG_PINNING_STATES, PG_STATE_KINDS
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


# --- function-made session state (defect 4) and the rest of the one list

KNOWN = PgDialect(standard_conforming_strings=True, client_encoding="UTF8")


def _state() -> SessionState:
    return SessionState(dialect=KNOWN)


def test_set_config_is_replayed_like_set() -> None:
    s = _state()
    s.on_query("select set_config('search_path', 'tenant1', false)")
    assert s.replay_sql() == ["SELECT pg_catalog.set_config('search_path', 'tenant1', false)"]
    assert s.replayable
    s.on_query_bytes(b"SELECT pg_catalog.set_config('app.user', E'o\\'brien', FALSE) AS x\0")
    assert s.replay_sql()[-1] == "SELECT pg_catalog.set_config('app.user', E'o\\'brien', false)"
    s.on_query("select set_config('search_path', 'x', true)")  # transaction-local: nothing to replay
    assert len(s.replay_sql()) == 2


def test_set_config_in_a_transaction_counts_once_it_commits() -> None:
    s = _state()
    s.on_query("select set_config('a.b', '1', false)", status="T")
    s.on_query("ROLLBACK", status="T")
    s.on_query("select set_config('a.b', '2', false)", status="T")
    s.on_query("COMMIT", status="T")
    assert s.replay_sql() == ["SELECT pg_catalog.set_config('a.b', '2', false)"]


@pytest.mark.parametrize(("sql", "label"), [
    ("select set_config('search_path', $1, false)", "set_config with a computed value"),
    ("select set_config('search_path', t.name, false) from tenants t where id = 1", "set_config with a computed value"),
    ("DO $$BEGIN PERFORM set_config('search_path', 'x', false); END$$", "DO block"),
    ("UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'", "UPDATE pg_settings"),
    ("SELECT setseed(0.5)", "random seed"),
    ("SELECT dblink_connect('c', 'dbname=x')", "dblink connection"),
    ("SELECT * INTO TEMP t FROM u", "temporary table"),  # missed before: the head is SELECT
    ("CREATE TABLE pg_temp.t (a int)", "temporary table"),
    ("select 1; create temporary view v as select 2", "temporary table"),
    ("select pg_try_advisory_lock_shared(1)", "session advisory lock"),
])
def test_what_cannot_be_replayed_pins(sql: str, label: str) -> None:
    s = _state()
    s.on_query(sql)
    assert s.pinned_by == label
    assert not s.replayable


def test_a_failed_transaction_sets_up_nothing() -> None:
    s = _state()
    s.on_query("LISTEN c", status="E")  # refused by the server: 25P02
    assert s.replayable


def test_the_extended_protocol_is_tracked_too() -> None:
    s = _state()
    s.on_parse("", m.Parse("", "SET search_path = tenant1", ()).encode())  # psycopg 3 sends SET like this
    s.on_parse("", b"\0select set_config('a.b', 'c', false)\0\0\0")  # a payload will do too
    assert s.replay_sql() == ["SET search_path = tenant1", "SELECT pg_catalog.set_config('a.b', 'c', false)"]
    assert s.replayable
    s.on_parse("", m.Parse("", "select set_config('search_path', $1, false)", (25,)).encode())
    assert s.pinned_by == "set_config with a computed value"  # the value comes with Bind
    s = _state()
    s.on_parse("S_1", m.Parse("S_1", "SET search_path = tenant1", ()).encode())  # runs at each Execute, unseen
    assert s.pinned_by == "state set up by a named prepared statement"
    s = _state()
    s.on_parse("", m.Parse("", "select pg_advisory_lock($1)", (20,)).encode(), query=None)
    assert s.pinned_by == "session advisory lock"


def test_the_dialect_decides_what_a_query_sets() -> None:
    sql = r"SET application_name = 'a\'; SET search_path = evil; -- '"
    on = SessionState(dialect=KNOWN)
    on.on_query(sql)
    assert on.replay_sql() == [r"SET application_name = 'a\'", "SET search_path = evil"]
    off = SessionState(dialect=KNOWN)
    off.on_parameter("standard_conforming_strings", "off")
    off.on_query(sql)
    assert off.replay_sql() == [r"SET application_name = 'a\'; SET search_path = evil; -- '"]
    unknown = SessionState()  # no ParameterStatus yet: the query reads two ways
    unknown.on_query(sql)
    assert unknown.pinned_by == "session state of an uncertain query"
    sjis = SessionState(dialect=PgDialect(True, "SJIS"))
    sjis.on_query("SET application_name = E'\udc83\\'; SET search_path = evil; -- '")
    assert sjis.pinned_by == "session state of an uncertain query"
    unknown = SessionState()
    unknown.on_query(r"SELECT E'a\'b' FROM t; SELECT 2")  # two readings, nothing set up either way
    assert unknown.replayable


def test_superseded_sets_are_dropped() -> None:
    s = _state()
    s.on_query("SET ROLE app")
    for i in range(300):
        s.on_query(f"SET search_path = tenant{i}")
        s.on_query(f"select set_config('app.tenant', '{i}', false)")
    assert len(s.set_statements) <= 65
    assert s.set_statements[0] == "SET ROLE app"  # who may set what: kept in place
    assert "SET search_path = tenant299" in s.set_statements
    assert "SELECT pg_catalog.set_config('app.tenant', '299', false)" in s.set_statements
    assert not any("tenant1 " in q or q.endswith("tenant1") for q in s.set_statements)
    assert s.version > 0  # backends that replayed the dropped ones are rebuilt
    assert s.replayable
    s = _state()
    for i in range(100):  # two settings of one namespace are two settings
        s.on_query(f"SET app.a = {i}")
        s.on_query(f"SET SESSION app.b TO {i}")
    assert s.set_statements[-2:] == ["SET app.a = 99", "SET SESSION app.b TO 99"]
    assert "SET app.a = 0" not in s.set_statements and len(s.set_statements) <= 65  # dropped now and then


def test_too_many_sets_pin() -> None:
    s = _state()
    for i in range(1100):
        s.on_query(f"SET app.v{i} = 1")
    assert s.pinned_by == "too much session state"


def test_the_hot_path_check_knows_every_word() -> None:
    for word in state_module._STATEFUL_WORDS:
        assert state_module._maybe_stateful(f"select {word.upper()}(1)"), word
    for head in state_module._STATEFUL_HEADS:
        assert state_module._maybe_stateful(f"  {head.upper()} x")
    assert not state_module._maybe_stateful("SELECT abalance FROM pgbench_accounts WHERE aid = 1")


def test_every_pinning_kind_has_a_label() -> None:
    labels = {k.key: k.label for k in PG_STATE_KINDS}
    for key in PG_PINNING_STATES:
        s = _state()
        s._pin(key)
        assert s.pinned_by == labels[key]


_FRAGMENTS = ["SET", "search_path", "set_config", "(", ")", "'a'", "false", "true", "$1", ",", "SELECT", "LISTEN",
              "CREATE", "TEMP", "TABLE", "DO", "$$", "BEGIN", "END", "PREPARE", "p", "AS", "DECLARE", "CURSOR", "WITH",
              "HOLD", "FOR", "INTO", "pg_advisory_lock", "setseed", "UPDATE", "pg_settings", 'U&"set_config"', "LOAD",
              "RESET", "DISCARD", "ALL", "/*", "*/", "--", "\n", "EXPLAIN", "ANALYZE", "COPY", "TO", "STDOUT",
              "pg_temp", ".", "x", ";", "dblink_connect", "LOCAL", "FROM", "t", "=", "E'\\\\'"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map(" ".join))
def test_the_hot_path_check_misses_nothing(sql: str) -> None:
    if state_module._maybe_stateful(sql) or not state_module._single(sql):
        return
    assert analyze(sql, dialect=KNOWN).states <= {"unlisten"}, sql


@pytest.mark.parametrize(("pin", "release", "key"), [
    ("LISTEN jobs", "UNLISTEN *", "listen"),
    ("CREATE TEMP TABLE scratch (a int)", "DISCARD TEMP", "temp_table"),
    ("SELECT pg_advisory_lock(42)", "SELECT pg_advisory_unlock_all()", "advisory_lock"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "CLOSE ALL", "cursor_with_hold"),
    ("LISTEN jobs", "DISCARD ALL", "listen"),
])
def test_a_pin_ends_when_its_state_is_gone(pin: str, release: str, key: str) -> None:
    s = SessionState()
    s.on_query(pin)
    assert key in s.pins and s.pinned_by is not None
    s.on_query(release)
    assert key not in s.pins and s.pinned_by is None


def test_only_the_released_pin_ends_and_not_inside_a_transaction() -> None:
    s = SessionState()
    s.on_query("LISTEN jobs")
    s.on_query("CREATE TEMP TABLE scratch (a int)")
    s.on_query("UNLISTEN jobs")  # one channel: others may be listened to still
    assert list(s.pins) == ["listen", "temp_table"]
    s.on_query("UNLISTEN *", status="T")  # takes effect only if the transaction commits
    assert "listen" in s.pins
    s.on_query("UNLISTEN *")
    assert list(s.pins) == ["temp_table"] and s.pinned_by == "temporary table"
