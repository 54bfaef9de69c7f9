"""PostgreSQL statement classification for the readwrite endpoint, as tables; plus a never-raises fuzz."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.routing.dialect import PgDialect
from endpoint_proxy.routing.pg_classify import (
    BUILTIN_WRITE_FUNCTIONS,
    Classification,
    FunctionPolicy,
    Route,
    analyze,
    classify,
    split_statements,
)

R, W = "read", "write"
KNOWN = PgDialect(standard_conforming_strings=True, client_encoding="UTF8")  # PostgreSQL's defaults

# (sql, route, transaction, session_state)
ROWS: list[tuple[str, str, str | None, str | None]] = [
    # --- plain reads
    ("SELECT 1", R, None, None),
    ("select * from t where a = 1", R, None, None),
    ("  \n\t SeLeCt 1", R, None, None),
    ("(SELECT 1)", R, None, None),
    ("((SELECT 1)) UNION (SELECT 2)", R, None, None),
    ("VALUES (1), (2)", R, None, None),
    ("TABLE t", R, None, None),
    ("SHOW search_path", R, None, None),
    ("SELECT count(*) FROM t JOIN u USING (id) WHERE t.x IN (SELECT y FROM v)", R, None, None),
    ("WITH x AS (SELECT 1) SELECT * FROM x", R, None, None),
    ("WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", R, None, None),
    ("WITH x AS (SELECT 1) (SELECT * FROM x)", R, None, None),
    ("SELECT substring('abc' FROM 1 FOR 2)", R, None, None),
    ("SELECT txid_current_if_assigned()", R, None, None),
    ("SELECT nextval FROM t", R, None, None),  # a column named nextval: no call
    ("SELECT update, delete FROM t", R, None, None),  # unreserved keywords as column names
    ("SELECT max(delete) FROM t", R, None, None),
    ("WITH update AS (SELECT 1) SELECT * FROM update", R, None, None),  # a CTE named update
    # --- EXPLAIN
    ("EXPLAIN SELECT * FROM t", R, None, None),
    ("EXPLAIN DELETE FROM t", R, None, None),
    ("EXPLAIN VERBOSE DELETE FROM t", R, None, None),
    ("EXPLAIN ANALYZE SELECT * FROM t", R, None, None),
    ("explain analyse select 1", R, None, None),
    ("EXPLAIN ANALYZE DELETE FROM t", W, None, None),
    ("EXPLAIN ANALYZE VERBOSE DELETE FROM t", W, None, None),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", W, None, None),
    ("EXPLAIN (FORMAT JSON, ANALYZE 1) MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", W, None, None),
    ("EXPLAIN (ANALYZE false) INSERT INTO t VALUES (1)", R, None, None),
    ("EXPLAIN (COSTS false, ANALYZE off) DELETE FROM t", R, None, None),
    ("EXPLAIN (ANALYZE true) SELECT 1", R, None, None),
    ("EXPLAIN ANALYZE SELECT nextval('s')", W, None, None),
    ("EXPLAIN SELECT nextval('s')", R, None, None),
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", W, None, None),
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", W, None, "advisory_lock"),
    # --- locking clauses, at any depth
    ("SELECT * FROM t FOR UPDATE", W, None, None),
    ("SELECT * FROM t FOR NO KEY UPDATE", W, None, None),
    ("SELECT * FROM t FOR SHARE", W, None, None),
    ("SELECT * FROM t FOR KEY SHARE", W, None, None),
    ("select * from t for update of t skip locked", W, None, None),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", W, None, None),
    ("WITH x AS (SELECT * FROM t FOR SHARE) SELECT * FROM x", W, None, None),
    # --- keywords hidden in literals, comments and quoted identifiers
    ("SELECT 'FOR UPDATE'", R, None, None),
    ("SELECT 1 -- FOR UPDATE", R, None, None),
    ("SELECT 1 /* FOR UPDATE */", R, None, None),
    ('SELECT 1 AS "for update"', R, None, None),
    ('SELECT "a""b FOR UPDATE" FROM t', R, None, None),
    ("SELECT $$INSERT INTO t VALUES (1)$$", R, None, None),
    ("SELECT $body$ FOR UPDATE $body$", R, None, None),
    ("SELECT $a$ $b$ FOR UPDATE $b$ $a$", R, None, None),
    ("SELECT $a$ ; DELETE FROM t; $a$", R, None, None),
    ("/* /* */ INSERT */ SELECT 1", R, None, None),
    ("/* outer /* inner */ still; DELETE FROM t */ SELECT 1", R, None, None),
    (r"SELECT E'\' FOR UPDATE'", R, None, None),  # \' is an escaped quote in E''
    (r"SELECT e'\\' FOR UPDATE", W, None, None),  # \\ is one backslash: the string ends before FOR
    (r"SELECT E'\'' FOR UPDATE", W, None, None),
    (r"SELECT '\' FOR UPDATE", W, None, None),  # standard strings: a backslash is just a character
    ("SELECT 'it''s FOR UPDATE'", R, None, None),
    (r"SELECT U&'d\0061t FOR UPDATE'", R, None, None),
    (r'SELECT U&"d\0061t" FROM t', R, None, None),
    ("SELECT 'INTO x' FROM t", R, None, None),
    ("SELECT 'nextval(1)'", R, None, None),
    ("SELECT $1::int FROM t", R, None, None),
    # --- data-modifying statements in WITH
    ("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", W, None, None),
    ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x", W, None, None),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT 1", W, None, None),
    ("WITH x AS MATERIALIZED (delete from t returning *) SELECT 1", W, None, None),
    ("WITH x AS (MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE RETURNING *) SELECT 1", W, None, None),
    ("WITH a AS (SELECT 1), b AS (WITH c AS (SELECT 2) DELETE FROM t RETURNING *) SELECT 1", W, None, None),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", W, None, None),
    ("WITH x AS (SELECT 1) UPDATE t SET a = 1", W, None, None),
    ("WITH x AS (SELECT 1) DELETE FROM t", W, None, None),
    # --- SELECT INTO
    ("SELECT 1 INTO newtable", W, None, None),
    ("SELECT * INTO TEMP t2 FROM t", W, None, "temp_table"),
    ("SELECT * INTO TEMPORARY TABLE t2 FROM t", W, None, "temp_table"),
    ("SELECT * INTO LOCAL TEMP t2 FROM t", W, None, "temp_table"),
    ("SELECT * INTO UNLOGGED t2 FROM t", W, None, None),
    # --- writing functions
    ("SELECT nextval('s')", W, None, None),
    ("SELECT NEXTVAL('s')", W, None, None),
    ("SELECT pg_catalog.nextval('s')", W, None, None),
    ('SELECT "nextval"(\'s\')', W, None, None),
    ('SELECT "pg_catalog"."setval"(\'s\', 1)', W, None, None),
    ("SELECT nextval /* gap */ ('s')", W, None, None),
    ("SELECT currval('s')", W, None, None),
    ("SELECT lastval()", W, None, None),
    ("SELECT txid_current()", W, None, None),
    ("SELECT pg_notify('c', 'x')", W, None, None),
    ("SELECT pg_advisory_lock(1)", W, None, "advisory_lock"),
    ("SELECT pg_try_advisory_lock(1, 2)", W, None, "advisory_lock"),
    ("SELECT pg_advisory_xact_lock(1)", W, None, None),
    ("SELECT pg_advisory_unlock(1)", W, None, None),
    ("SELECT set_config('app.user', 'x', false)", W, None, "set_config"),
    ("SELECT lo_import('/tmp/x')", W, None, None),
    ("SELECT * FROM t WHERE id = (SELECT nextval('s'))", W, None, None),
    ("VALUES (nextval('s'))", W, None, None),
    # --- DML, DDL and other writes
    ("INSERT INTO t VALUES (1)", W, None, None),
    ("insert into t select * from u", W, None, None),
    ("UPDATE t SET a = 1", W, None, None),
    ("DELETE FROM t", W, None, None),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", W, None, None),
    ("INSERT INTO t SELECT pg_advisory_lock(1)", W, None, "advisory_lock"),
    ("CREATE TABLE t (a int)", W, None, None),
    ("ALTER TABLE t ADD COLUMN c int", W, None, None),
    ("DROP TABLE t", W, None, None),
    ("TRUNCATE t", W, None, None),
    ("GRANT SELECT ON t TO u", W, None, None),
    ("VACUUM t", W, None, None),
    ("ANALYZE t", W, None, None),
    ("LOCK TABLE t IN ACCESS SHARE MODE", W, None, None),
    ("DO $$BEGIN PERFORM 1; END$$", W, None, None),
    ("CALL p(1)", W, None, None),
    ("REFRESH MATERIALIZED VIEW v", W, None, None),
    ("NOTIFY c, 'x'", W, None, None),
    ("CHECKPOINT", W, None, None),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END", W, None, None),
    # --- COPY
    ("COPY t FROM STDIN", W, None, None),
    ("COPY t (a, b) FROM '/tmp/x' WITH (FORMAT csv)", W, None, None),
    ("COPY t TO STDOUT", R, None, None),
    ('COPY public."T" (a) TO STDOUT WITH (FORMAT csv)', R, None, None),
    ("COPY (SELECT * FROM t) TO STDOUT", R, None, None),
    ("COPY (SELECT nextval('s')) TO STDOUT", W, None, None),
    ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", W, None, None),
    # --- temporary objects
    ("CREATE TEMP TABLE t (a int)", W, None, "temp_table"),
    ("create global temporary table t (a int)", W, None, "temp_table"),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", W, None, "temp_table"),
    ("CREATE TABLE pg_temp.t (a int)", W, None, "temp_table"),
    ("CREATE TEMP TABLE t AS SELECT 1", W, None, "temp_table"),
    # --- cursors
    ("DECLARE c CURSOR FOR SELECT 1", R, None, None),
    ("DECLARE cursor CURSOR FOR SELECT 1", R, None, None),
    ("DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT * FROM t FOR UPDATE", W, None, None),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", W, None, "cursor_with_hold"),
    ("FETCH 10 FROM c", W, None, None),
    ("MOVE NEXT IN c", W, None, None),
    ("CLOSE c", W, None, None),
    # --- transaction control
    ("BEGIN", W, "begin", None),
    ("begin transaction isolation level repeatable read", W, "begin", None),
    ("BEGIN READ WRITE", W, "begin", None),
    ("BEGIN ISOLATION LEVEL READ COMMITTED", W, "begin", None),
    ("START TRANSACTION", W, "begin", None),
    ("BEGIN READ ONLY", R, "begin_read_only", None),
    ("BEGIN WORK READ ONLY", R, "begin_read_only", None),
    ("START TRANSACTION READ ONLY", R, "begin_read_only", None),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", R, "begin_read_only", None),
    ("BEGIN READ ONLY ISOLATION LEVEL READ COMMITTED NOT DEFERRABLE", R, "begin_read_only", None),
    # a hot standby refuses SERIALIZABLE
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", W, "begin", None),
    ("COMMIT", R, "commit", None),
    ("commit work", R, "commit", None),
    ("END", R, "commit", None),
    ("COMMIT AND CHAIN", R, "commit", None),
    ("ROLLBACK", R, "rollback", None),
    ("ABORT", R, "rollback", None),
    ("ROLLBACK TO SAVEPOINT a", R, "savepoint", None),
    ("ROLLBACK WORK TO a", R, "savepoint", None),
    ("SAVEPOINT a", R, "savepoint", None),
    ("RELEASE SAVEPOINT a", R, "savepoint", None),
    ("RELEASE a", R, "savepoint", None),
    ("PREPARE TRANSACTION 'x'", W, None, None),
    ("COMMIT PREPARED 'x'", W, None, None),
    ("ROLLBACK PREPARED 'x'", W, None, None),
    ("SET TRANSACTION READ ONLY", R, "set_transaction_read_only", None),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", R, None, None),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", W, None, None),
    ("SET TRANSACTION READ WRITE", W, None, None),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", W, None, None),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", W, None, "set"),
    # --- session state
    ("SET search_path = app, public", W, None, "set"),
    ("SET SESSION statement_timeout = 0", W, None, "set"),
    ("set role app", W, None, "set"),
    ("SET LOCAL statement_timeout = 0", R, None, None),
    ("SET CONSTRAINTS ALL DEFERRED", R, None, None),
    ("RESET ALL", W, None, "reset"),
    ("DISCARD ALL", W, None, "discard"),
    ("LISTEN c", W, None, "listen"),
    ("UNLISTEN *", W, None, "unlisten"),
    ("PREPARE p AS SELECT 1", R, None, "prepare"),
    ("PREPARE p (int, text) AS SELECT $1, $2", R, None, "prepare"),
    ("PREPARE p AS INSERT INTO t VALUES (1)", W, None, "prepare"),
    ("PREPARE p AS SELECT nextval('s')", W, None, "prepare"),
    ("EXECUTE p", W, None, None),  # unknown to the caller
    ("DEALLOCATE p", W, None, "deallocate"),
    ("DEALLOCATE PREPARE ALL", W, None, "deallocate"),
    # --- several statements in one Query
    ("SELECT 1; SELECT 2", R, None, None),
    ("SELECT 1; INSERT INTO t VALUES (1)", W, None, None),
    ("SELECT ';'; SELECT 2;", R, None, None),
    ("BEGIN; SELECT 1", W, "begin", None),
    ("BEGIN READ ONLY; SELECT 1", R, "begin_read_only", None),
    ("BEGIN READ ONLY; SELECT 1; COMMIT", R, None, None),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT", W, None, None),
    ("BEGIN; SET TRANSACTION READ ONLY; SELECT 1", R, "begin_read_only", None),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE; SET TRANSACTION READ ONLY", W, "begin", None),
    ("SELECT 1; COMMIT", R, "commit", None),
    ("COMMIT; BEGIN", W, "begin", None),
    ("BEGIN; SAVEPOINT a; SELECT 1", W, "begin", None),
    ("SET a.b = 1; LISTEN c; SET a.c = 2", W, None, "listen"),
    ("SET a.b = 1; SELECT 1", W, None, "set"),
    # --- comment hints
    ("/* endpoint: reader */ INSERT INTO t VALUES (1)", R, None, None),
    ("SELECT 1 /*ENDPOINT:WRITER*/", W, None, None),
    ("/* endpoint :  Writer */ SELECT 1", W, None, None),
    ("-- endpoint: reader\nUPDATE t SET a = 1", R, None, None),
    ("SELECT '/* endpoint: writer */'", R, None, None),
    ("/* endpoint: reader */ SELECT 1; /* endpoint: writer */ SELECT 2", W, None, None),
    ("/* endpoint: reader */ BEGIN", R, "begin", None),
    # --- empty, malformed
    ("", R, None, None),
    ("  ;  ; ", R, None, None),
    ("-- only a comment", R, None, None),
    ("/* only */", R, None, None),
    ("SELECT 'abc", W, None, None),
    ('SELECT "abc', W, None, None),
    ("SELECT $$abc", W, None, None),
    ("SELECT $x$abc$y$", W, None, None),
    ("/* abc", W, None, None),
    ("/* /* */ SELECT 1", W, None, None),
    (r"SELECT E'\'", W, None, None),
    ("SELECT (1", W, None, None),
    ("SELECT 1)", W, None, None),
    ("42", W, None, None),
    ("FROBNICATE everything", W, None, None),
]


@pytest.mark.parametrize(("sql", "route", "transaction", "session_state"), ROWS, ids=[r[0][:60] for r in ROWS])
def test_classify(sql: str, route: str, transaction: str | None, session_state: str | None) -> None:
    c = classify(sql, dialect=KNOWN)
    assert (c.route, c.transaction, c.session_state) == (route, transaction, session_state), c


def test_the_table_is_large_and_unambiguous() -> None:
    assert len(ROWS) >= 80
    assert len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("sql", "reason"), [
    ("SELECT 1", "select"),
    ("VALUES (1)", "values"),
    ("TABLE t", "table"),
    ("SHOW x", "show"),
    ("SELECT * FROM t FOR UPDATE", "for update"),
    ("SELECT * FROM t FOR NO KEY UPDATE", "for no key update"),
    ("SELECT * FROM t FOR KEY SHARE", "for key share"),
    ("SELECT pg_catalog.nextval('s')", "writing function nextval"),
    ("SELECT 1 INTO t", "select into"),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT 1", "data-modifying cte"),
    ("WITH x AS (SELECT 1) UPDATE t SET a = 1", "update"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("EXPLAIN ANALYZE DELETE FROM t", "explain analyze delete"),
    ("EXPLAIN DELETE FROM t", "explain"),
    ("COPY t FROM STDIN", "copy from"),
    ("COPY t TO STDOUT", "copy to"),
    ("PREPARE p AS SELECT 1", "prepare select"),
    ("EXECUTE p", "execute unknown prepared statement"),
    ("BEGIN READ ONLY", "begin read only"),
    ("SELECT 1; DROP TABLE t; INSERT INTO t VALUES (1)", "drop"),
    ("/* endpoint: writer */ SELECT 1", "hint"),
    ("", "empty"),
    ("SELECT 'abc", "unterminated string literal"),
    ('SELECT "abc', "unterminated quoted identifier"),
    ("SELECT $$abc", "unterminated dollar-quoted string"),
    ("/* abc", "unterminated comment"),
    ("SELECT (1", "unbalanced parentheses"),
])
def test_reason(sql: str, reason: str) -> None:
    assert classify(sql, dialect=KNOWN).reason == reason


def test_hint_is_recorded_and_wins() -> None:
    c = classify("/* endpoint: reader */ SELECT * FROM t FOR UPDATE")
    assert (c.route, c.hint, c.reason) == (Route.READ, "reader", "hint")
    c = classify("SELECT 1 -- endpoint: writer")
    assert (c.route, c.hint) == (Route.WRITE, "writer")
    assert classify("SELECT 1").hint is None
    # a query that does not lex ignores hints: it goes to the writer
    c = classify("/* endpoint: reader */ SELECT 'abc")
    assert (c.route, c.hint) == (Route.WRITE, None)


def test_statement_count() -> None:
    assert classify("SELECT 1; SELECT 2;; ;SELECT 3 -- x").statements == 3
    assert classify("").statements == 0
    assert classify("SELECT 1").statements == 1
    assert classify("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; "
                    "SELECT 3").statements == 2
    assert classify("CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); "
                    "INSERT INTO b VALUES (2))").statements == 1


def test_standard_conforming_strings_off() -> None:
    sql = r"SELECT '\' FOR UPDATE'"
    assert classify(sql, dialect=KNOWN).route is Route.WRITE  # on: the string is '\', then FOR UPDATE, then an open '
    assert classify(sql, dialect=KNOWN).reason == "unterminated string literal"
    assert classify(sql, standard_conforming_strings=False).route is Route.READ
    assert split_statements(r"SELECT 'a\';b'; SELECT 2", standard_conforming_strings=False) == [
        r"SELECT 'a\';b'", "SELECT 2"]


def test_function_policy() -> None:
    user = FunctionPolicy(write_functions=frozenset({"App.Bump", "touch"}),
                          read_functions=frozenset({"nextval", "app.safe", "touch"}))
    assert classify("SELECT app.bump(1)", user).reason == "writing function bump"
    assert classify("SELECT bump(1)", user).route is Route.WRITE  # search_path may resolve it to app.bump
    assert classify("SELECT other.bump(1)", user).route is Route.READ
    assert classify("SELECT x.touch()", user).route is Route.WRITE  # a bare entry matches any schema
    assert classify("SELECT touch()", user).route is Route.WRITE  # write_functions beats read_functions
    assert classify("SELECT nextval('s')", user).route is Route.READ  # declared safe overrides the builtin
    assert classify("SELECT pg_catalog.nextval('s')", user).route is Route.READ
    assert classify("SELECT setval('s', 1)", user).route is Route.WRITE
    assert classify("SELECT app.safe()", user).route is Route.READ
    assert classify("SELECT nextval('s')").route is Route.WRITE
    assert classify("EXPLAIN SELECT bump(1)", user).route is Route.READ


def test_builtin_write_functions() -> None:
    for name in ("nextval", "setval", "currval", "lastval", "txid_current", "pg_current_xact_id", "pg_notify",
                 "pg_advisory_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_lock", "pg_advisory_unlock",
                 "set_config", "pg_switch_wal", "pg_terminate_backend", "lo_unlink", "dblink_exec",
                 "pg_logical_emit_message"):
        assert name in BUILTIN_WRITE_FUNCTIONS
        assert classify(f"SELECT {name}(1)").reason == f"writing function {name}"
    for name in ("txid_current_if_assigned", "now", "lo_get", "pg_is_in_recovery", "count"):
        assert name not in BUILTIN_WRITE_FUNCTIONS


def test_execute_follows_the_prepared_route() -> None:
    prepared = {"p": Route.READ, "w": Route.WRITE, "MixedCase": Route.READ}
    assert classify("EXECUTE p", prepared=prepared).route is Route.READ
    assert classify("execute P", prepared=prepared).route is Route.READ  # folded like PostgreSQL does
    assert classify("EXECUTE p(1, 'x')", prepared=prepared).route is Route.READ
    assert classify("EXECUTE p(nextval('s'))", prepared=prepared).route is Route.WRITE
    assert classify("EXECUTE w", prepared=prepared).route is Route.WRITE
    assert classify('EXECUTE "MixedCase"', prepared=prepared).route is Route.READ
    assert classify("EXECUTE MixedCase", prepared=prepared).route is Route.WRITE
    assert classify("EXECUTE nope", prepared=prepared).route is Route.WRITE
    assert classify("EXPLAIN EXECUTE p", prepared=prepared).route is Route.READ
    assert classify("EXPLAIN EXECUTE nope", prepared=prepared).route is Route.WRITE
    assert classify("EXPLAIN ANALYZE EXECUTE p", prepared=prepared).route is Route.READ
    assert classify("EXPLAIN ANALYZE EXECUTE w", prepared=prepared).route is Route.WRITE


@pytest.mark.parametrize(("sql", "name"), [
    ("PREPARE MyPlan AS SELECT 1", "myplan"),
    ('PREPARE "MyPlan" (int) AS SELECT $1', "MyPlan"),
    ("EXECUTE p(1)", "p"),
    ("DEALLOCATE PREPARE p", "p"),
    ("DEALLOCATE p", "p"),
    ("DEALLOCATE ALL", None),
    ("SELECT 1", None),
    ("SELECT 1; PREPARE q AS SELECT 2", "q"),
])
def test_prepared_name(sql: str, name: str | None) -> None:
    assert classify(sql).prepared_name == name


def test_classification_is_a_value() -> None:
    c = classify("SELECT 1")
    assert c == Classification(Route.READ, "select")
    assert c.route == "read"  # a StrEnum compares with its value
    with pytest.raises(AttributeError):
        c.route = Route.WRITE  # type: ignore[misc]


@pytest.mark.parametrize(("sql", "statements"), [
    ("", []),
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 1;", ["SELECT 1"]),
    ("  SELECT 1 ;\n SELECT 2 ;; ; ", ["SELECT 1", "SELECT 2"]),
    ("SELECT ';'; SELECT \"a;b\"", ["SELECT ';'", 'SELECT "a;b"']),
    ("SELECT $$a;b$$; SELECT $t$;$t$", ["SELECT $$a;b$$", "SELECT $t$;$t$"]),
    ("SELECT 1 -- a; comment\n; SELECT 2", ["SELECT 1 -- a; comment", "SELECT 2"]),
    ("/* a; /* b; */ c; */ SELECT 1; SELECT 2", ["/* a; /* b; */ c; */ SELECT 1", "SELECT 2"]),
    (r"SELECT E'\';'; SELECT 2", [r"SELECT E'\';'", "SELECT 2"]),
    ("SELECT 1; -- trailing comment", ["SELECT 1"]),
    ("CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)); SELECT 1",
     ["CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2))", "SELECT 1"]),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (CASE WHEN true THEN 1 END); "
     "SELECT 1; END; BEGIN; COMMIT",
     ["CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (CASE WHEN true THEN 1 END); "
      "SELECT 1; END", "BEGIN", "COMMIT"]),
    ("SELECT 1; SELECT 'open", ["SELECT 1", "SELECT 'open"]),
    ("SELECT 1; /* open", ["SELECT 1", "/* open"]),
])
def test_split_statements(sql: str, statements: list[str]) -> None:
    assert split_statements(sql) == statements


# --- fuzz: classify never raises, agrees with split_statements, and stays linear

_FRAGMENTS = ["SELECT", "select", "INSERT", "INTO", "FOR", "UPDATE", "WITH", "AS", "EXPLAIN", "ANALYZE", "BEGIN",
              "READ", "ONLY", "COMMIT", "PREPARE", "EXECUTE", "DECLARE", "CURSOR", "COPY", "TO", "FROM", "SET",
              "nextval", "pg_catalog", "(", ")", ";", ",", ".", "'", "''", '"', "E'", "U&'", "\\", "$$", "$a$", "$1",
              "--", "\n", "/*", "*/", " ", "1", "1.5e3", "t", "endpoint: writer", "CREATE", "FUNCTION", "ATOMIC",
              "END", "CASE", "TEMP", "TABLE", "::", "é", "\x00"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map(" ".join),
                 st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)))
def test_classify_never_raises(sql: str) -> None:
    c = classify(sql)
    assert c.reason != "classifier error"
    assert c.route in (Route.READ, Route.WRITE)
    assert c.statements == len(split_statements(sql))
    assert classify(sql, standard_conforming_strings=False).reason != "classifier error"


@pytest.mark.parametrize("sql", [
    "(" * 50_000,
    ")" * 50_000,
    "SELECT (" * 10_000 + "1" + ")" * 10_000,
    "SELECT 1;" * 10_000,
    "/*" * 20_000,
    "/* */" * 20_000,
    "$a$" * 20_000,
    "'" * 50_001,
    "E'\\" * 20_000,
    "EXPLAIN ANALYZE " * 10_000 + "SELECT 1",
    "PREPARE p AS " * 10_000 + "SELECT 1",
    "COPY (" * 5_000 + "SELECT 1" + ") TO STDOUT" * 5_000,
    "SELECT " + "set_config(" * 10_000,
    "WITH a AS (" * 5_000 + "DELETE FROM t" + ")" * 5_000,
    "SELECT " + "nextval(1), " * 10_000 + "1",
    "DECLARE c CURSOR FOR " * 5_000 + "SELECT 1",
])
def test_classify_is_fast_on_pathological_input(sql: str) -> None:
    # This thread's CPU time, not the clock: a guard against blow-ups (quadratic or worse) that
    # other processes on a shared machine cannot trip.
    started = time.thread_time()
    c = classify(sql)
    split_statements(sql)
    assert c.reason != "classifier error"
    assert time.thread_time() - started < 2.0



# --- lexing as the server will: the session's dialect (defect 7, PostgreSQL side)

SCS_OFF = PgDialect(standard_conforming_strings=False, client_encoding="UTF8")
UNKNOWN = PgDialect()


@pytest.mark.parametrize(("sql", "on", "off"), [
    # on: the backslash is a letter and '' a quote: one string; off: \' is the quote, then a DELETE
    (r"select 'x\'' ; delete from t where id = 3; --'", R, W),
    # on: the string is 'a\', then a DELETE; off: \' escapes, one string
    (r"select 'a\'; delete from t where id = 3; -- '", W, R),
])
def test_standard_conforming_strings_decides_where_a_string_ends(sql: str, on: str, off: str) -> None:
    assert classify(sql, dialect=KNOWN).route == on
    assert classify(sql, dialect=SCS_OFF).route == off
    assert classify(sql, standard_conforming_strings=False).route == off  # the keyword overrides the dialect
    c = classify(sql, dialect=UNKNOWN)
    assert (c.route, c.reason) == (Route.WRITE, "standard_conforming_strings unknown: the query reads two ways")
    assert classify(sql).route is Route.WRITE  # nothing passed (today's Parse path): unknown


def test_an_unknown_setting_costs_nothing_when_it_cannot_matter() -> None:
    assert classify("SELECT 'a' FROM t", dialect=UNKNOWN).route is Route.READ  # no backslash
    assert classify(r"SELECT E'a\'b', $$c\$$ FROM t", dialect=UNKNOWN).route is Route.READ  # readings agree
    assert classify(r"SELECT '\' FROM t", dialect=UNKNOWN).route is Route.WRITE  # on: unterminated


@pytest.mark.parametrize(("sql", "statements"), [
    # B'' and X'' strings have no escapes at all, whatever standard_conforming_strings says
    (r"SELECT b'1\' ; DELETE FROM t; --'", [r"SELECT b'1\'", "DELETE FROM t"]),
    (r"SELECT X'1\' ; DELETE FROM t; --'", [r"SELECT X'1\'", "DELETE FROM t"]),
    # a literal continued over a newline keeps its own rules: E'' goes on escaping
    ("SELECT E'a'\n'\\'; DELETE FROM t; --'", ["SELECT E'a'\n'\\'; DELETE FROM t; --'"]),
    ("SELECT 'a' -- comment\n  'b'; SELECT 2", ["SELECT 'a' -- comment\n  'b'", "SELECT 2"]),
    # dollar quotes with tags, nested comments
    ("SELECT $a$ $b$; DELETE FROM t; $b$ $a$; SELECT 2", ["SELECT $a$ $b$; DELETE FROM t; $b$ $a$", "SELECT 2"]),
    ("SELECT 1 /* a /* b */ ; DELETE FROM t; */; SELECT 2", ["SELECT 1 /* a /* b */ ; DELETE FROM t; */",
                                                             "SELECT 2"]),
    ("SELECT U&'d\\0061t' UESCAPE '!'; SELECT 2", ["SELECT U&'d\\0061t' UESCAPE '!'", "SELECT 2"]),
    ('SELECT "a"";b"; SELECT 2', ['SELECT "a"";b"', "SELECT 2"]),
])
def test_split_like_the_server(sql: str, statements: list[str]) -> None:
    assert split_statements(sql, standard_conforming_strings=False) == statements \
        or split_statements(sql, standard_conforming_strings=True) == statements
    assert [s.text for s in analyze(sql, dialect=SCS_OFF).statements] == statements


def test_bit_strings_do_not_hide_statements() -> None:
    c = classify(r"SELECT b'1\' ; DELETE FROM t; --'", dialect=SCS_OFF)
    assert (c.route, c.reason, c.statements) == (Route.WRITE, "delete", 2)


def test_unicode_identifiers_are_decoded() -> None:
    c = classify(r"""SELECT U&"\0073et\005fconfig"('search_path', 'x', false)""", dialect=KNOWN)
    assert (c.route, c.session_state) == (Route.WRITE, "set_config")
    c = classify("SELECT U&\"set!005fconfig\" UESCAPE '!' ('search_path', 'x', false)", dialect=KNOWN)
    assert (c.route, c.session_state) == (Route.WRITE, "set_config")
    c = classify("SELECT U&\"nextval\" /* c */ UESCAPE '!' ('s')", dialect=KNOWN)
    assert (c.route, c.reason) == (Route.WRITE, "UESCAPE not right after its literal")
    assert classify(r'SELECT U&"\zzzz"', dialect=KNOWN).reason == "invalid Unicode escape in an identifier"
    assert classify('SELECT "nextval"(\'s\')', dialect=KNOWN).route is Route.WRITE


def test_a_backslash_in_a_multibyte_encoding_goes_to_the_writer() -> None:
    # Shift-JIS 0x83 0x5c is one letter (so): the server sees E'<so>' and then a DELETE
    sql = "SELECT E'\udc83\\'; DELETE FROM t; -- '"
    c = classify(sql, dialect=PgDialect(True, "SJIS"))
    assert (c.route, c.reason) == (Route.WRITE, "a backslash after a non-ASCII character (client_encoding SJIS)")
    assert classify(sql, dialect=PgDialect(True, None)).route is Route.WRITE  # unknown encoding
    assert classify(sql, dialect=KNOWN).route is Route.READ  # UTF8: 0x5c is always a backslash
    assert classify("SELECT 'é' FROM t", dialect=PgDialect(True, "SJIS")).route is Route.READ


# --- function-made session state (defect 4)

_PIN = "set_config_computed"


@pytest.mark.parametrize(("sql", "state", "replay"), [
    ("select set_config('search_path', 'tenant1', false)", "set_config",
     ("SELECT pg_catalog.set_config('search_path', 'tenant1', false)",)),
    ("SELECT pg_catalog.set_config('search_path', 'tenant1', FALSE) AS s", "set_config",
     ("SELECT pg_catalog.set_config('search_path', 'tenant1', false)",)),
    (r"SELECT set_config('a.b', E'x\'y', 'off'), set_config('c.d', NULL, NULL)", "set_config",
     (r"SELECT pg_catalog.set_config('a.b', E'x\'y', false)", "SELECT pg_catalog.set_config('c.d', NULL, false)")),
    ("SELECT set_config('a.b', $$x$$, false)", "set_config", ("SELECT pg_catalog.set_config('a.b', $$x$$, false)",)),
    # the value is not known here: the session is pinned
    ("select set_config('search_path', $1, false)", _PIN, ()),
    ("select set_config('search_path', name, false) from tenants where id = 1", _PIN, ()),
    ("select set_config('search_path', 'a' || 'b', false)", _PIN, ()),
    ("select set_config('search_path', 'x'::text, false)", _PIN, ()),
    ("select set_config('search_path', 't1', $1)", _PIN, ()),  # is_local unknown
    ("select set_config(setting_name => 'a', new_value => 'b', is_local => false)", _PIN, ()),
    # literal, but it runs once per row, or not at all, or later
    ("select set_config('search_path', 't1', false) from t", _PIN, ()),
    ("select set_config('search_path', 't1', false) where false", _PIN, ()),
    ("select case when x then set_config('a.b', 'c', false) end", _PIN, ()),
    ("select * from t where set_config('a.b', 'c', false) is not null", _PIN, ()),
    ("insert into log select set_config('a.b', 'c', false)", _PIN, ()),
    ("explain analyze select set_config('a.b', 'c', false)", _PIN, ()),
    ("prepare p as select set_config('a.b', 'c', false)", _PIN, ()),
    ("copy (select set_config('a.b', 'c', false)) to stdout", _PIN, ()),
    ("declare c cursor for select set_config('a.b', 'c', false)", _PIN, ()),
    # transaction-local, like SET LOCAL: nothing outlives the transaction
    ("select set_config('search_path', 'x', true)", None, ()),
    ("select set_config('search_path', $1, 'on')", None, ()),
])
def test_set_config(sql: str, state: str | None, replay: tuple[str, ...]) -> None:
    a = analyze(sql, dialect=KNOWN)
    assert len(a.statements) == 1
    statement = a.statements[0]
    assert (statement.session_state, statement.replay) == (state, replay)
    assert a.classification.route is (Route.READ if state is None else Route.WRITE)


def test_set_config_goes_to_the_writer_and_pins_whatever_the_policy() -> None:
    safe = FunctionPolicy(read_functions=frozenset({"set_config", "pg_advisory_lock", "setseed"}))
    # replayable: it may run anywhere, the tracker replays it on the others
    assert classify("select set_config('a.b', 'c', false)", safe, dialect=KNOWN).route is Route.READ
    # pinning: the session stays on the writer, so its state must be made there
    for sql in ("select set_config('a.b', $1, false)", "select pg_advisory_lock(1)", "select setseed(0.5)"):
        assert classify(sql, safe, dialect=KNOWN).route is Route.WRITE, sql
    assert classify("select app.set_config('a', 'b', false)", dialect=KNOWN).session_state is None  # not ours


@pytest.mark.parametrize(("sql", "pins"), [
    ("DO $$BEGIN PERFORM set_config('search_path', 'x', false); END$$", "a DO block that calls set_config"),
    ("DO $$BEGIN SET search_path = x; END$$", "a DO block that runs SET"),
    ("DO $$DECLARE x int; BEGIN IF true THEN RESET search_path; END IF; END$$", "a DO block that runs RESET"),
    ("DO $$BEGIN EXECUTE 'select 1'; END$$", "a DO block that runs EXECUTE"),
    ("DO 'BEGIN PERFORM pg_advisory_lock(1); END'", "a DO block that calls pg_advisory_lock"),
    ("DO $$BEGIN CREATE TEMP TABLE t (a int); END$$", "a DO block that may create a temporary table"),
    ("DO LANGUAGE plpython3u $$plpy.execute('SET search_path = x')$$", "a DO block in plpython3u"),
    ("DO $$BEGIN LISTEN c; END$$ LANGUAGE plpgsql", "a DO block that runs LISTEN"),
    ("DO $$BEGIN UPDATE pg_settings SET setting = 'x' WHERE name = 'a'; END$$",
     "a DO block that may update pg_settings"),
    ("DO $$BEGIN UPDATE t SET a = 1; END$$", None),  # UPDATE ... SET is no SET statement
    ("DO $$BEGIN PERFORM set_config('a.b', 'c', true); END$$", None),
    ("DO $$BEGIN INSERT INTO t VALUES (1); END$$", None),
])
def test_do_blocks_are_writes_and_pin_when_they_may_set_up_state(sql: str, pins: str | None) -> None:
    a = analyze(sql, dialect=KNOWN)
    statement = a.statements[0]
    assert statement.route is Route.WRITE
    assert statement.session_state == ("do_block" if pins else None)
    assert statement.detail == pins


@pytest.mark.parametrize(("sql", "state"), [
    ("SELECT setseed(0.5)", "setseed"),
    ("UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'", "pg_settings_update"),
    ("UPDATE ONLY pg_catalog.pg_settings SET setting = 'x' WHERE name = 'search_path'", "pg_settings_update"),
    ("WITH u AS (UPDATE pg_settings SET setting = 'x' WHERE name = 'a' RETURNING 1) SELECT * FROM u",
     "pg_settings_update"),
    ("SELECT dblink_connect('c', 'dbname=x')", "dblink_connection"),
    ("SELECT pg_replication_origin_session_setup('o')", "replication_origin"),
    ("SELECT * INTO TEMP t FROM u", "temp_table"),
    ("CREATE TEMP VIEW v AS SELECT 1", "temp_table"),
    ("LOAD 'auto_explain'", "load"),
    ("SELECT pg_advisory_xact_lock(1)", None),
    ("SELECT random()", None),
])
def test_other_function_and_statement_state(sql: str, state: str | None) -> None:
    c = classify(sql, dialect=KNOWN)
    assert c.session_state == state
    if state is not None:
        assert c.route is Route.WRITE


def test_analyze_gives_each_statement() -> None:
    a = analyze("SET a = 1; select set_config('b.c', 'd', false); RESET ALL; SELECT 1", dialect=KNOWN)
    assert [(s.text, s.session_state, s.words[:2]) for s in a.statements] == [
        ("SET a = 1", "set", ("set", "a")),
        ("select set_config('b.c', 'd', false)", "set_config", ("select", "set_config")),
        ("RESET ALL", "reset", ("reset", "all")),
        ("SELECT 1", None, ("select",)),
    ]
    assert a.problem is None and not a.uncertain
    a = analyze(r"SET a = 'x\'; SET b = 2; -- '", dialect=UNKNOWN)
    assert a.uncertain and a.classification.route is Route.WRITE
    assert a.states == {"set"}
    a = analyze("SELECT 'open", dialect=KNOWN)
    assert (a.problem, a.uncertain) == ("unterminated string literal", False)


_DIALECTS = [KNOWN, SCS_OFF, UNKNOWN, PgDialect(True, "SJIS")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=30).map(" ".join))
def test_an_unknown_setting_reads_only_when_every_setting_does(sql: str) -> None:
    c = classify(sql, dialect=UNKNOWN)
    if c.route is Route.READ:
        assert classify(sql, dialect=KNOWN).route is Route.READ
        assert classify(sql, dialect=SCS_OFF).route is Route.READ
    for dialect in _DIALECTS:
        a = analyze(sql, dialect=dialect)
        assert a.classification == classify(sql, dialect=dialect)
        assert a.classification.reason != "classifier error"
