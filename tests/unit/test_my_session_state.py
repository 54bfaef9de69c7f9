"""MySQL session state: what is replayed on another backend, what pins the session, and the session's dialect."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.routing import my_session_state as my_state_module
from endpoint_proxy.routing.dialect import MyDialect
from endpoint_proxy.routing.my_classify import Route, analyze, classify
from endpoint_proxy.routing.my_session_state import MySessionState
from endpoint_proxy.routing.session_kinds import MY_PINNING_STATES, MY_STATE_KINDS

OK = k.SERVER_STATUS_AUTOCOMMIT
OK_NBE = OK | k.SERVER_STATUS_NO_BACKSLASH_ESCAPES
DEFECT_7 = r"select 'a\'; delete from t where id = 3; -- '"


def _state(sql_mode: str | None = "STRICT_TRANS_TABLES") -> MySessionState:
    return MySessionState.start(sql_mode=sql_mode, status=OK, charset="utf8mb4", schema="app")


def _run(s: MySessionState, *queries: str, status: int = OK) -> None:
    for sql in queries:
        s.on_query(sql)
        s.on_response(True, status)


def test_defect_7_the_session_knows_no_backslash_escapes() -> None:
    s = _state()
    assert classify(DEFECT_7, dialect=s.dialect).route is Route.READ  # escapes on: one string
    s.on_query("SET sql_mode = 'NO_BACKSLASH_ESCAPES'")
    s.on_response(True, OK_NBE)
    assert s.dialect == MyDialect(True, False, "utf8mb4")
    c = classify(DEFECT_7, dialect=s.dialect)
    assert (c.route, c.reason, c.statements) == (Route.WRITE, "delete", 2)
    assert s.replay_sql() == ["SET sql_mode = 'NO_BACKSLASH_ESCAPES'"]


def test_the_status_flag_is_the_truth_for_backslashes() -> None:
    s = MySessionState.start()  # nothing known
    assert s.dialect == MyDialect()
    s.on_status(OK_NBE)  # e.g. the login OK
    assert s.dialect.no_backslash_escapes is True
    _run(s, "SELECT 1", status=OK)
    assert s.dialect.no_backslash_escapes is False
    assert MySessionState.start(status=OK_NBE).dialect.no_backslash_escapes is True


@pytest.mark.parametrize(("sql", "nbe", "ansi"), [
    ("SET sql_mode = 'ANSI'", False, True),
    ("SET SESSION sql_mode = 'ansi_quotes,no_backslash_escapes'", True, True),
    ("SET @@sql_mode = 'TRADITIONAL'", False, False),
    ("SET @@SESSION.sql_mode := 'ORACLE'", False, True),
    ("SET LOCAL sql_mode = ''", False, False),
    ("SET sql_mode = 0", False, False),
    ("SET sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES')", None, None),
    ("SET sql_mode = @saved", None, None),
    ("SET @@SESSION.sql_mode = REPLACE(@@SESSION.sql_mode, 'ONLY_FULL_GROUP_BY', '')", None, None),
    ("SET sql_mode = DEFAULT", None, None),
    ("SET GLOBAL sql_mode = 'ANSI_QUOTES'", None, None),
    ("SET @@global.sql_mode = ''", None, None),
    ("SET STATEMENT sql_mode = 'ANSI' FOR SELECT 1", False, False),  # one statement only
    ("SET @sql_mode = 'ANSI'", False, False),  # a user variable
])
def test_sql_mode_is_tracked_from_literal_sets(sql: str, nbe: bool | None, ansi: bool | None) -> None:
    s = _state("")
    s.on_query(sql)
    s.on_response(True)  # no status flags: the SET alone decides
    assert (s.dialect.no_backslash_escapes, s.dialect.ansi_quotes) == (nbe, ansi)


def test_a_failed_set_changes_nothing() -> None:
    s = _state()
    s.on_query("SET sql_mode = 'ANSI_QUOTES,NO_SUCH_MODE'")
    s.on_response(False)
    assert s.dialect == MyDialect(False, False, "utf8mb4")
    assert s.replay_sql() == []
    assert s.replayable


def test_a_failed_query_of_several_statements_pins_if_it_changed_state() -> None:
    s = _state()
    s.on_query("SET @a = 1; SELECT * FROM missing; SET @b = 2")
    s.on_response(False)
    assert s.pinned_by == "session state of an uncertain query"
    assert s.dialect == MyDialect()  # a SET sql_mode may or may not have run: nothing is known
    s = _state()
    s.on_query("SELECT 1; SELECT * FROM missing")
    s.on_response(False)
    assert s.replayable


def test_an_unanswered_command_counts_as_done() -> None:
    s = _state()
    s.on_query("SET NAMES gbk")
    s.on_query("SELECT 1")  # the session did not feed the answer: the SET counts
    assert s.dialect.charset == "gbk"


def test_replay_keeps_order_and_drops_what_is_superseded() -> None:
    s = _state()
    _run(s, "SET @a = 1", "SET @b = @a", "SET @a = 2", "SET time_zone = '+00:00'", "SET time_zone = '+02:00'",
         "SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci", "SET character_set_client = latin1", "SET NAMES utf8mb4",
         "USE Reports", "SET autocommit = 0", "SET autocommit = 1",
         "SET @OLD_SQL_MODE = @@SQL_MODE, SQL_MODE = 'NO_AUTO_VALUE_ON_ZERO'")
    assert s.replay_sql() == [
        "SET @a = 1", "SET @b = @a",  # @b was computed from the first @a: both stay
        "SET @a = 2", "SET time_zone = '+02:00'", "SET NAMES utf8mb4", "USE `Reports`", "SET autocommit = 1",
        "SET @OLD_SQL_MODE = @@SQL_MODE, SQL_MODE = 'NO_AUTO_VALUE_ON_ZERO'"]
    assert s.schema == "Reports"
    for i in range(2000):  # a tenant per request: one entry
        _run(s, f"SET @tenant = {i}")
    assert s.replay_sql()[-1] == "SET @tenant = 1999" and len(s.entries) == 9
    assert s.replayable


def test_replay_after_a_sequence_number() -> None:
    s = _state()
    _run(s, "SET @a = 1", "SET @b = 2")
    seen = s.seq
    _run(s, "SET @c = 3", "SET @a = 4")
    assert [e.sql for e in s.replay_after(seen)] == ["SET @c = 3", "SET @a = 4"]
    assert [e.sql for e in s.replay_after(0)] == ["SET @b = 2", "SET @c = 3", "SET @a = 4"]
    assert s.replay_after(s.seq) == []


def test_commands_other_than_queries() -> None:
    s = _state()
    s.on_init_db("Other")
    s.on_response(True, OK)
    s.on_set_option(k.MYSQL_OPTION_MULTI_STATEMENTS_OFF)
    s.on_response(True, OK)
    assert (s.schema, s.multi_statements, s.replay_sql()) == ("Other", False, ["USE `Other`"])
    s.on_init_db("missing")
    s.on_response(False)
    assert s.schema == "Other"
    s.on_stmt_prepare(7, "SET @a = ?")
    s.on_stmt_prepare(8, "SELECT ?")
    s.on_stmt_execute(8)
    assert s.replayable
    s.on_stmt_execute(7)
    assert s.pinned_by == "state set up by a prepared statement"
    s.reset(schema="app")
    assert (s.replayable, s.entries, s.schema, s.version) == (True, [], "app", 1)


def test_prepared_sql_is_replayed_and_deallocate_forgets_it() -> None:
    s = _state()
    _run(s, "PREPARE p FROM 'SELECT * FROM t WHERE id = ?'", "SET @sql = 'SELECT 2'", "PREPARE q FROM @sql",
         "EXECUTE p USING @a", "DEALLOCATE PREPARE p")
    assert s.replay_sql() == ["SET @sql = 'SELECT 2'", "PREPARE q FROM @sql"]
    _run(s, "SET @sql = 'SELECT 3'")  # PREPARE q read the old value: both stay
    assert len(s.entries) == 3
    assert s.replayable
    _run(s, "EXECUTE q")  # its text came from a variable: it may set anything
    assert s.pinned_by == "state set up by a prepared statement"


@pytest.mark.parametrize(("sql", "label"), [
    ("CREATE TEMPORARY TABLE t (a int)", "temporary table"),
    ("SELECT GET_LOCK('job', 10)", "named lock"),
    ("LOCK TABLES t WRITE", "table lock"),
    ("FLUSH TABLES WITH READ LOCK", "table lock"),
    ("HANDLER t OPEN", "HANDLER"),  # was in none of the session's lists
    ("SELECT 1 INTO @a", "user variable with a computed value"),
    ("SELECT @a := count(*) FROM t", "user variable with a computed value"),
    ("CALL p(@out)", "user variable with a computed value"),
    ("SET @x = UUID()", "user variable with a computed value"),
    ("SET @x = (SELECT max(id) FROM t)", "user variable with a computed value"),
    ("SET @id = LAST_INSERT_ID()", "user variable with a computed value"),
    ("SET @id = @@identity", "user variable with a computed value"),
    ("SET time_zone = (SELECT tz FROM settings)", "session variable with a computed value"),
    ("SET SESSION rand_seed1 = RAND()", "session variable with a computed value"),
    ("SET @a = 1, GLOBAL max_connections = 10", "session variable with a computed value"),
    ("PREPARE s FROM 'SET @a = ?'; EXECUTE s USING @b", "state set up by a prepared statement"),
    ("EXECUTE IMMEDIATE 'SET @a = 1'", "state set up by a prepared statement"),
    ("EXECUTE IMMEDIATE @sql", "state set up by a prepared statement"),
    ("SET NAMES gbk; SELECT '\udc95\\'; DELETE FROM t; -- '", "session state of an uncertain query"),
])
def test_what_cannot_be_replayed_pins(sql: str, label: str) -> None:
    s = _state()
    _run(s, sql)
    assert s.pinned_by == label


@pytest.mark.parametrize("sql", [
    "SELECT @a", "SELECT * FROM t WHERE id = @id", "UNLOCK TABLES", "SELECT RELEASE_LOCK('job')", "HANDLER t CLOSE",
    "SET @x = CONCAT(@a, '-', @@sql_mode)", "SET @x = IF(@a > 1, 'y', 'n')", "SET @x = DATABASE()",
    "SET NAMES utf8mb4", "SET GLOBAL max_connections = 10", "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET TRANSACTION READ ONLY", "XA START 'x'", "SET STATEMENT max_statement_time = 1 FOR SELECT 1",
    "EXECUTE IMMEDIATE 'SELECT 1'", "SELECT * FROM users",
])
def test_what_is_replayed_or_not_tracked_does_not_pin(sql: str) -> None:
    s = _state()
    _run(s, sql)
    assert s.replayable, s.pinned_detail


def test_every_pinning_kind_has_a_label() -> None:
    labels = {kind.key: kind.label for kind in MY_STATE_KINDS}
    for key in MY_PINNING_STATES:
        s = _state()
        s._pin(key)
        assert s.pinned_by == labels[key]


def test_the_replay_list_is_bounded() -> None:
    s = _state()
    for _ in range(1100):
        _run(s, "SET @a = @a + 1")  # each reads the one before: none can go
    assert s.pinned_by == "too much session state"


_FRAGMENTS = ["SET", "sql_mode", "=", "'ANSI'", "NAMES", "gbk", "USE", "db", "@a", "LOCK", "TABLES", "CREATE",
              "TEMPORARY", "TABLE", "t", "HANDLER", "OPEN", "GET_LOCK", "(", ")", "'x'", ";", "SELECT", "INTO", "BEGIN",
              "NOT", "ATOMIC", "END", "IF", "THEN", "/*!", "/*!50000", "*/", "-- ", "\n", "#", "PREPARE", "s", "FROM",
              "EXECUTE", "IMMEDIATE", "CALL", "p", "lbl:", "x", "UPDATE", "INSERT", "VALUES", "FLUSH", "WITH", "READ",
              "autocommit", "0", "SESSION", "CHARACTER", "DEALLOCATE", "DROP", "BACKUP", "STAGE", "1", ",", "`a`"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map(" ".join))
def test_the_hot_path_check_misses_nothing(sql: str) -> None:
    if my_state_module._maybe_stateful(sql):
        return
    dialect = MyDialect(False, False, "utf8mb4")
    a = analyze(sql, dialect=dialect)
    assert a.states <= {"user_variable_read", "unlock_tables"}, (sql, a.states)
    assert a.dialect in (dialect, MyDialect()), sql  # unknown only after a lexical error


def test_the_session_may_ask_the_server_for_sql_mode() -> None:
    s = _state()
    _run(s, "SET @@SESSION.sql_mode = REPLACE(@@SESSION.sql_mode, 'ONLY_FULL_GROUP_BY', '')", status=OK)
    assert (s.dialect.no_backslash_escapes, s.dialect.ansi_quotes) == (False, None)  # the status flag says one
    assert s.replayable and len(s.entries) == 1  # deterministic given the replayed sql_mode
    s.on_sql_mode("STRICT_TRANS_TABLES,ANSI_QUOTES")
    assert s.dialect == MyDialect(False, True, "utf8mb4")
