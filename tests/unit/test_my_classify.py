"""MySQL/MariaDB statement classification for the readwrite endpoint, as tables; plus a never-raises fuzz."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.routing import pg_classify
from endpoint_proxy.routing.dialect import MyDialect
from endpoint_proxy.routing.my_classify import (
    BUILTIN_WRITE_FUNCTIONS,
    NAMED_LOCK_FUNCTIONS,
    PINNING_STATES,
    WRITER_SESSION_FUNCTIONS,
    Classification,
    FunctionPolicy,
    Route,
    analyze,
    classify,
    literal_text,
    set_assignments,
    split_statements,
)
from endpoint_proxy.routing.session_kinds import MY_PINNING_STATES

R, W = "read", "write"
KNOWN = MyDialect(no_backslash_escapes=False, ansi_quotes=False, charset="utf8mb4")  # MariaDB's defaults

# (sql, route, transaction, session_state)
ROWS: list[tuple[str, str, str | None, str | None]] = [
    # --- plain reads
    ("SELECT 1", R, None, None),
    ("select * from t where a = 1", R, None, None),
    ("  \n\t SeLeCt 1", R, None, None),
    ("(SELECT 1)", R, None, None),
    ("((SELECT 1)) UNION (SELECT 2)", R, None, None),
    ("SELECT a FROM t UNION ALL SELECT b FROM u", R, None, None),
    ("SELECT SQL_NO_CACHE HIGH_PRIORITY STRAIGHT_JOIN * FROM t", R, None, None),
    ("SELECT count(*) FROM t JOIN u USING (id) WHERE t.x IN (SELECT y FROM v)", R, None, None),
    ("WITH x AS (SELECT 1) SELECT * FROM x", R, None, None),
    ("WITH RECURSIVE r (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", R, None, None),
    ("TABLE t", R, None, None),
    ("VALUES ROW(1, 2), ROW(3, 4)", R, None, None),
    ("SHOW TABLES", R, None, None),
    ("SHOW FULL PROCESSLIST", R, None, None),
    ("SHOW CREATE TABLE t", R, None, None),
    ("HELP 'contents'", R, None, None),
    ("SELECT @@version, @@session.autocommit, @@global.read_only", R, None, None),
    ("SELECT * FROM t FOR SYSTEM_TIME ALL", R, None, None),
    ("SELECT SUBSTRING('abc' FROM 1 FOR 2)", R, None, None),
    ("SELECT * FROM t FORCE INDEX FOR JOIN (i)", R, None, None),
    ("SELECT t.update, t.`delete` FROM t", R, None, None),
    ("SELECT nextval FROM t", R, None, None),  # a column named nextval: no call
    ("SELECT REPLACE(a, 'x', 'y') FROM t", R, None, None),
    ("SELECT IF(a, 1, 2) FROM t", R, None, None),
    # functions that stay reads
    ("SELECT SLEEP(1)", R, None, None),
    ("SELECT UUID_SHORT(), UUID(), RAND(), SYSDATE()", R, None, None),
    ("SELECT BENCHMARK(10, MD5('a'))", R, None, None),
    ("SELECT MASTER_POS_WAIT('bin.000001', 4)", R, None, None),
    ("SELECT MASTER_GTID_WAIT('0-1-10', 1)", R, None, None),
    ("SELECT CONNECTION_ID(), DATABASE()", R, None, None),
    # --- EXPLAIN, DESCRIBE, ANALYZE
    ("EXPLAIN SELECT * FROM t", R, None, None),
    ("EXPLAIN DELETE FROM t", R, None, None),
    ("EXPLAIN FORMAT=JSON UPDATE t SET a = 1", R, None, None),
    ("EXPLAIN EXTENDED SELECT 1", R, None, None),
    ("DESCRIBE t", R, None, None),
    ("DESC t a", R, None, None),
    ("DESC SELECT LAST_INSERT_ID()", R, None, None),
    ("EXPLAIN ANALYZE SELECT * FROM t", R, None, None),
    ("EXPLAIN ANALYZE FORMAT=TREE SELECT 1", R, None, None),
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", W, None, None),
    ("EXPLAIN ANALYZE UPDATE t SET a = 1", W, None, None),
    ("EXPLAIN ANALYZE SELECT GET_LOCK('a', 1)", W, None, "named_lock"),
    ("EXPLAIN FORMAT=JSON INTO @plan SELECT 1", W, None, "user_variable"),
    ("EXPLAIN FOR CONNECTION 12", W, None, None),
    ("ANALYZE SELECT * FROM t", R, None, None),
    ("ANALYZE FORMAT=JSON SELECT 1", R, None, None),
    ("ANALYZE DELETE FROM t", W, None, None),
    ("ANALYZE TABLE t", W, None, None),
    ("ANALYZE NO_WRITE_TO_BINLOG TABLE t", W, None, None),
    # --- locking reads, at any depth
    ("SELECT * FROM t FOR UPDATE", W, None, None),
    ("select * from t for update of t skip locked", W, None, None),
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT", W, None, None),
    ("SELECT * FROM t FOR SHARE", W, None, None),
    ("SELECT * FROM t LOCK IN SHARE MODE", W, None, None),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", W, None, None),
    ("(SELECT a FROM t) UNION (SELECT b FROM u LOCK IN SHARE MODE)", W, None, None),
    ("WITH x AS (SELECT * FROM t FOR SHARE) SELECT * FROM x", W, None, None),
    ("SELECT * FROM t /*!40001 FOR UPDATE */", W, None, None),
    ("SELECT * FROM t /*! FOR UPDATE */", W, None, None),
    ("SELECT * FROM t /*M!100000 LOCK IN SHARE MODE */", W, None, None),
    # --- keywords hidden in literals, comments and quoted identifiers
    ("SELECT 'FOR UPDATE'", R, None, None),
    ('SELECT "FOR UPDATE"', R, None, None),
    ("SELECT 'it''s FOR UPDATE'", R, None, None),
    ('SELECT "a""b FOR UPDATE"', R, None, None),
    (r"SELECT 'it\'s FOR UPDATE'", R, None, None),
    (r'SELECT "a\" FOR UPDATE"', R, None, None),
    (r"SELECT 'a\\' FOR UPDATE", W, None, None),  # \\ is one backslash: the string ends before FOR
    ("SELECT 1 AS `for update`", R, None, None),
    ("SELECT `a``b FOR UPDATE` FROM t", R, None, None),
    ("SELECT 1 -- FOR UPDATE", R, None, None),
    ("SELECT 1 --\tFOR UPDATE", R, None, None),
    ("SELECT 1 --FOR UPDATE", W, None, None),  # no space: 1 - -FOR, not a comment
    ("SELECT 1 --x", R, None, None),  # 1 minus minus x
    ("SELECT 1 # FOR UPDATE", R, None, None),
    ("SELECT 1 # x\nFOR UPDATE", W, None, None),
    ("SELECT 1 /* FOR UPDATE */", R, None, None),
    ("SELECT /*+ MAX_EXECUTION_TIME(1000) */ * FROM t", R, None, None),
    ("/* /* */ SELECT 1", R, None, None),  # comments do not nest
    ("/* /* */ INSERT */ SELECT 1", W, None, None),
    ("SELECT 2*/*x*/3", R, None, None),
    ("SELECT 'INTO @a' FROM t", R, None, None),
    ("SELECT `into` FROM t", R, None, None),
    ("SELECT 'LAST_INSERT_ID()'", R, None, None),
    ("SELECT x'41', b'01', 0x41, _utf8mb4'FOR UPDATE', N'FOR UPDATE'", R, None, None),
    ("SELECT 'a;b'; SELECT \"a;b\"", R, None, None),
    ("/*!99999 SELECT */ DELETE FROM t", W, None, None),  # older servers skip the comment
    ("/*!50708 SELECT 1 */", R, None, None),
    # --- SELECT INTO
    ("SELECT 1 INTO @a", W, None, "user_variable"),
    ("SELECT a, b INTO @x, @y FROM t WHERE id = 1", W, None, "user_variable"),
    ("SELECT * FROM t INTO OUTFILE '/tmp/t.csv'", W, None, None),
    ("SELECT a FROM t INTO DUMPFILE '/tmp/a'", W, None, None),
    ("TABLE t INTO @a", W, None, "user_variable"),
    # --- functions and variables of the writer's session
    ("SELECT LAST_INSERT_ID()", W, None, None),
    ("select last_insert_id(42)", W, None, None),
    ("SELECT FOUND_ROWS()", W, None, None),
    ("SELECT ROW_COUNT()", W, None, None),
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 10", W, None, None),
    ("SELECT @@identity", W, None, None),
    ("SELECT @@last_insert_id", W, None, None),
    ("SELECT @@warning_count", W, None, None),
    ("SELECT * FROM t WHERE id = (SELECT LAST_INSERT_ID())", W, None, None),
    # named locks
    ("SELECT GET_LOCK('a', 10)", W, None, "named_lock"),
    ("SELECT RELEASE_LOCK('a')", W, None, None),  # releasing holds nothing: GET_LOCK pinned already
    ("SELECT RELEASE_ALL_LOCKS()", W, None, None),
    ("SELECT IS_USED_LOCK('a')", W, None, None),
    ("SELECT IS_FREE_LOCK('a')", W, None, None),
    ("DO GET_LOCK('a', 1)", W, None, "named_lock"),
    # MariaDB sequences
    ("SELECT NEXTVAL(s)", W, None, None),
    ("SELECT NEXT VALUE FOR s", W, None, None),
    ("SELECT PREVIOUS VALUE FOR s", W, None, None),
    ("SELECT SETVAL(s, 100)", W, None, None),
    ("SELECT LASTVAL(s)", W, None, None),
    ("SELECT s.nextval", W, None, None),
    ("SELECT db.nextval(s)", W, None, None),
    ("SELECT * FROM s", R, None, None),
    # user variables
    ("SELECT @a := 1", W, None, "user_variable"),
    ("SELECT @a := a, @b FROM t", W, None, "user_variable"),
    # reading a user variable: every backend the session uses has its variables (replayed), or it is pinned
    ("SELECT @a", R, None, "user_variable_read"),
    ("SELECT * FROM t WHERE id = @id", R, None, "user_variable_read"),
    ("SELECT @`a b`, @'c', @\"d\"", R, None, "user_variable_read"),
    ("SELECT @a = 1", R, None, "user_variable_read"),  # a comparison
    # --- DML, DDL and other writes
    ("INSERT INTO t VALUES (1)", W, None, None),
    ("INSERT IGNORE INTO t SELECT * FROM u", W, None, None),
    ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = VALUES(a)", W, None, None),
    ("REPLACE INTO t VALUES (1)", W, None, None),
    ("UPDATE t SET a = 1", W, None, None),
    ("UPDATE t SET a = (@x := a + 1)", W, None, "user_variable"),
    ("DELETE FROM t", W, None, None),
    ("INSERT INTO t VALUES (@a)", W, None, "user_variable_read"),
    ("WITH x AS (SELECT 1) UPDATE t SET a = 1", W, None, None),
    ("WITH x AS (SELECT id FROM u) DELETE FROM t WHERE id IN (SELECT id FROM x)", W, None, None),
    ("LOAD DATA LOCAL INFILE '/tmp/x' INTO TABLE t", W, None, None),
    ("CREATE TABLE t (a int)", W, None, None),
    ("ALTER TABLE t ADD COLUMN c int", W, None, None),
    ("DROP TABLE t", W, None, None),
    ("DROP TEMPORARY TABLE IF EXISTS t", W, None, None),
    ("TRUNCATE TABLE t", W, None, None),
    ("RENAME TABLE t TO u", W, None, None),
    ("GRANT SELECT ON db.* TO 'app'@'%'", W, None, None),
    ("GRANT SELECT ON db.* TO app@localhost", W, None, None),
    ("CREATE USER 'app'@'%' IDENTIFIED BY 'x'", W, None, None),
    ("REVOKE ALL ON *.* FROM app", W, None, None),
    ("CALL p(1)", W, None, None),
    ("CALL p(@out)", W, None, "user_variable"),  # an OUT parameter sets the variable
    ("DO 1", W, None, None),
    ("DO @a := 1", W, None, "user_variable"),
    ("HANDLER t READ FIRST", W, None, None),
    ("HANDLER db.t OPEN AS h", W, None, "handler"),
    ("OPTIMIZE TABLE t", W, None, None),
    ("REPAIR TABLE t", W, None, None),
    ("FLUSH PRIVILEGES", W, None, None),
    ("KILL QUERY 12", W, None, None),
    ("START SLAVE", W, None, None),
    ("SHOW WARNINGS", W, None, None),
    ("SHOW COUNT(*) ERRORS", W, None, None),
    ("SHOW MASTER STATUS", W, None, None),
    ("GET DIAGNOSTICS @n = NUMBER", W, None, "user_variable"),
    ("DELIMITER //", W, None, None),
    ("CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END", W, None, None),
    ("BEGIN NOT ATOMIC SELECT 1; END", W, None, None),
    # --- temporary tables and locks
    ("CREATE TEMPORARY TABLE t (a int)", W, None, "temp_table"),
    ("create temporary table if not exists t select * from u", W, None, "temp_table"),
    ("CREATE OR REPLACE TEMPORARY TABLE t (a int)", W, None, "temp_table"),
    ("LOCK TABLES t READ, u WRITE", W, None, "lock_tables"),
    ("LOCK TABLE t WRITE", W, None, "lock_tables"),
    ("UNLOCK TABLES", W, None, "unlock_tables"),
    ("FLUSH TABLES WITH READ LOCK", W, None, "lock_tables"),
    ("FLUSH TABLES t FOR EXPORT", W, None, "lock_tables"),
    ("LOCK INSTANCE FOR BACKUP", W, None, "lock_tables"),
    # --- transaction control
    ("BEGIN", W, "begin", None),
    ("BEGIN WORK", W, "begin", None),
    ("START TRANSACTION", W, "begin", None),
    ("START TRANSACTION WITH CONSISTENT SNAPSHOT", W, "begin", None),
    ("START TRANSACTION READ WRITE", W, "begin", None),
    ("START TRANSACTION READ ONLY", R, "begin_read_only", None),
    ("start transaction with consistent snapshot, read only", R, "begin_read_only", None),
    ("START TRANSACTION READ ONLY, WITH CONSISTENT SNAPSHOT", R, "begin_read_only", None),
    ("COMMIT", R, "commit", None),
    ("COMMIT WORK", R, "commit", None),
    ("COMMIT AND CHAIN", R, "commit", None),
    ("COMMIT AND NO CHAIN NO RELEASE", R, "commit", None),
    ("ROLLBACK", R, "rollback", None),
    ("ROLLBACK WORK RELEASE", R, "rollback", None),
    ("ROLLBACK TO SAVEPOINT a", R, "savepoint", None),
    ("ROLLBACK WORK TO a", R, "savepoint", None),
    ("SAVEPOINT a", R, "savepoint", None),
    ("RELEASE SAVEPOINT a", R, "savepoint", None),
    ("XA START 'x'", W, "begin", None),
    ("XA END 'x'", W, None, None),
    ("XA PREPARE 'x'", W, None, None),
    ("XA COMMIT 'x'", W, "commit", None),
    ("XA ROLLBACK 'x'", W, "rollback", None),
    ("XA RECOVER", W, None, None),
    ("SET TRANSACTION READ ONLY", R, "set_transaction_read_only", None),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", R, "set_transaction_read_only", None),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", W, None, None),
    ("SET TRANSACTION READ WRITE", W, None, None),
    ("SET SESSION TRANSACTION READ ONLY", W, None, "set"),
    ("SET GLOBAL TRANSACTION ISOLATION LEVEL READ COMMITTED", W, None, None),
    # --- autocommit
    ("SET autocommit = 0", W, None, "autocommit_off"),
    ("SET AUTOCOMMIT=1", W, None, "autocommit_on"),
    ("set @@autocommit = OFF", W, None, "autocommit_off"),
    ("SET SESSION autocommit = ON", W, None, "autocommit_on"),
    ("SET @@session.autocommit = 'ON'", W, None, "autocommit_on"),
    ("SET LOCAL autocommit = true", W, None, "autocommit_on"),
    ("SET autocommit = @saved", W, None, "autocommit_off"),  # unknown: assume the worst
    ("SET GLOBAL autocommit = 0", W, None, None),  # the server's default, not this session's
    ("SET autocommit = 0, sql_mode = ''", W, None, "autocommit_off"),
    # --- other session state
    ("USE db", R, None, "use"),
    ("USE `my db`", R, None, "use"),
    ("SET NAMES utf8mb4", W, None, "set"),
    ("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_bin'", W, None, "set"),
    ("SET CHARACTER SET utf8", W, None, "set"),
    ("SET sql_mode = 'ANSI_QUOTES'", W, None, "set"),
    ("SET SESSION sql_mode = '', @@session.time_zone = '+00:00'", W, None, "set"),
    ("SET GLOBAL max_connections = 100", W, None, None),
    ("SET GLOBAL a = 1, b = 2", W, None, None),  # the modifier holds for the assignments after it
    ("SET PERSIST max_connections = 100", W, None, None),
    ("SET @@global.max_connections = 100, wait_timeout = 10", W, None, "set"),
    ("SET ROLE app_reader", W, None, "set"),
    ("SET PASSWORD = 'x'", W, None, None),
    ("SET @a = 1", W, None, "user_variable"),
    ("SET @a := 1, autocommit = 0", W, None, "user_variable"),
    ("SET @lock = GET_LOCK('a', 1)", W, None, "named_lock"),
    ("SET STATEMENT max_statement_time = 1 FOR SELECT * FROM t", R, None, None),
    ("SET STATEMENT max_statement_time = 1 FOR UPDATE t SET a = 1", W, None, None),
    ("PREPARE s FROM 'SELECT * FROM t WHERE a = ?'", R, None, "prepare"),
    ("PREPARE s FROM 'INSERT INTO t VALUES (?)'", W, None, "prepare"),
    ("PREPARE s FROM \"SELECT 'FOR UPDATE'\"", R, None, "prepare"),
    (r"PREPARE s FROM 'SELECT \'x\' FOR UPDATE'", W, None, "prepare"),
    ("PREPARE s FROM 'SELECT * ' 'FROM t FOR UPDATE'", W, None, "prepare"),
    ("PREPARE s FROM _utf8mb4'SELECT 1'", R, None, "prepare"),
    ("PREPARE s FROM @sql", W, None, "prepare"),
    ("PREPARE s FROM 'SELECT '''", W, None, "prepare"),  # the text does not lex
    ("EXECUTE s", W, None, None),  # unknown to the caller
    ("DEALLOCATE PREPARE s", W, None, "deallocate"),
    ("DROP PREPARE s", W, None, "deallocate"),
    ("EXECUTE IMMEDIATE 'SELECT 1'", R, None, None),
    ("EXECUTE IMMEDIATE 'DELETE FROM t'", W, None, None),
    # --- several statements in one query
    ("SELECT 1; SELECT 2", R, None, None),
    ("SELECT 1; INSERT INTO t VALUES (1)", W, None, None),
    ("SELECT ';'; SELECT 2;", R, None, None),
    ("BEGIN; SELECT 1", W, "begin", None),
    ("START TRANSACTION READ ONLY; SELECT 1", R, "begin_read_only", None),
    ("START TRANSACTION READ ONLY; SELECT 1; COMMIT", R, None, None),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT", W, None, None),
    ("SET TRANSACTION READ ONLY; START TRANSACTION; SELECT 1", R, "begin_read_only", None),
    ("SET TRANSACTION READ ONLY; START TRANSACTION; SELECT 1; COMMIT", R, None, None),
    ("SET TRANSACTION READ ONLY; START TRANSACTION READ WRITE", W, "begin", None),
    ("SELECT 1; COMMIT", R, "commit", None),
    ("COMMIT; BEGIN", W, "begin", None),
    ("BEGIN; SAVEPOINT a; SELECT 1", W, "begin", None),
    ("SET NAMES utf8; SET @a = 1; SET sql_mode = ''", W, None, "user_variable"),
    ("SET NAMES utf8; SET autocommit = 0", W, None, "autocommit_off"),
    ("SET autocommit = 0; SELECT 1; SET autocommit = 1", W, None, "autocommit_on"),
    ("USE db; SELECT 1", R, None, "use"),
    ("SELECT 1; /* endpoint: writer */", W, None, None),
    ("/*!40101 SET NAMES utf8 */; SELECT 1", W, None, "set"),
    # --- comment hints
    ("/* endpoint: reader */ INSERT INTO t VALUES (1)", R, None, None),
    ("SELECT 1 /*ENDPOINT:WRITER*/", W, None, None),
    ("-- endpoint: reader\nUPDATE t SET a = 1", R, None, None),
    ("# endpoint: writer\nSELECT 1", W, None, None),
    ("SELECT 1 /*+ endpoint: writer */", W, None, None),
    ("SELECT 1 --endpoint: writer", R, None, None),  # not a comment
    ("SELECT 1 /*! , 'endpoint: writer' */", R, None, None),  # code, not a comment
    ("SELECT '/* endpoint: writer */'", R, None, None),
    ("/* endpoint: reader */ SELECT 1; /* endpoint: writer */ SELECT 2", W, None, None),
    # --- empty, malformed
    ("", R, None, None),
    ("  ;  ; ", R, None, None),
    ("-- only a comment", R, None, None),
    ("# only a comment", R, None, None),
    ("/* only */", R, None, None),
    ("SELECT 'abc", W, None, None),
    ('SELECT "abc', W, None, None),
    ("SELECT `abc", W, None, None),
    ("SELECT x'41", W, None, None),
    (r"SELECT 'abc\'", W, None, None),
    ("SELECT @'abc", W, None, None),
    ("/* abc", W, None, None),
    ("SELECT 1 /*!50000 FOR UPDATE", W, None, None),
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


def test_shares_the_types_of_pg_classify() -> None:
    assert Route is pg_classify.Route
    assert Classification is pg_classify.Classification
    assert FunctionPolicy is pg_classify.FunctionPolicy


@pytest.mark.parametrize(("sql", "reason"), [
    ("SELECT 1", "select"),
    ("VALUES ROW(1)", "values"),
    ("TABLE t", "table"),
    ("SHOW TABLES", "show"),
    ("SELECT * FROM t FOR UPDATE", "for update"),
    ("SELECT * FROM t FOR SHARE", "for share"),
    ("SELECT * FROM t LOCK IN SHARE MODE", "lock in share mode"),
    ("SELECT 1 INTO @a", "select into"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "select into outfile"),
    ("SELECT LAST_INSERT_ID()", "needs the writer's session"),
    ("SELECT FOUND_ROWS()", "needs the writer's session"),
    ("SELECT ROW_COUNT()", "needs the writer's session"),
    ("SELECT @@identity", "needs the writer's session"),
    ("SELECT SQL_CALC_FOUND_ROWS a FROM t", "sql_calc_found_rows"),
    ("SHOW WARNINGS", "previous statement diagnostics"),
    ("SELECT GET_LOCK('a', 1)", "named lock"),
    ("SELECT NEXTVAL(s)", "writing function nextval"),
    ("SELECT NEXT VALUE FOR s", "next value for"),
    ("SELECT @a := 1", "user variable assignment"),
    ("SELECT @a", "select"),
    ("WITH x AS (SELECT 1) UPDATE t SET a = 1", "update"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("EXPLAIN ANALYZE DELETE FROM t", "explain analyze delete"),
    ("ANALYZE SELECT 1", "analyze select"),
    ("EXPLAIN DELETE FROM t", "explain"),
    ("ANALYZE TABLE t", "analyze table"),
    ("PREPARE s FROM 'SELECT 1'", "prepare select"),
    ("PREPARE s FROM @q", "prepare from variable"),
    ("EXECUTE s", "execute unknown prepared statement"),
    ("START TRANSACTION READ ONLY", "begin read only"),
    ("COMMIT AND CHAIN", "commit and chain"),
    ("COMMIT RELEASE", "commit release"),
    ("BEGIN NOT ATOMIC SELECT 1; END", "compound statement"),
    ("SELECT 1; DROP TABLE t; INSERT INTO t VALUES (1)", "drop"),
    ("/* endpoint: writer */ SELECT 1", "hint"),
    ("", "empty"),
    ("SELECT 'abc", "unterminated string literal"),
    ("SELECT `abc", "unterminated quoted identifier"),
    ("/* abc", "unterminated comment"),
    ("/*! SELECT 1", "unterminated comment"),
    ("SELECT (1", "unbalanced parentheses"),
])
def test_reason(sql: str, reason: str) -> None:
    assert classify(sql, dialect=KNOWN).reason == reason


def test_hint_is_recorded_and_wins() -> None:
    c = classify("/* endpoint: reader */ SELECT * FROM t FOR UPDATE")
    assert (c.route, c.hint, c.reason) == (Route.READ, "reader", "hint")
    c = classify("SELECT 1 # endpoint: writer")
    assert (c.route, c.hint) == (Route.WRITE, "writer")
    assert classify("SELECT 1").hint is None
    # a query that does not lex ignores hints: it goes to the writer
    c = classify("/* endpoint: reader */ SELECT 'abc")
    assert (c.route, c.hint) == (Route.WRITE, None)


def test_statement_count() -> None:
    assert classify("SELECT 1; SELECT 2;; ;SELECT 3 -- x").statements == 3
    assert classify("").statements == 0
    assert classify("SELECT 1").statements == 1
    assert classify("CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END; SELECT 3").statements == 2
    # read both ways, the count is the one of the code reading
    assert classify("/*!99999 SELECT 1; */ DELETE FROM t").statements == 2


def test_versioned_comments_are_read_both_ways() -> None:
    assert classify("/*!50000 SELECT 1 */").route is Route.READ
    assert classify("SELECT 1 /*!99999 FOR UPDATE */").route is Route.WRITE  # code on a new enough server
    assert classify("SELECT /*M!100000 1, */ 2").route is Route.READ
    assert classify("/*M!100000 SELECT */ DELETE FROM t").route is Route.WRITE  # MySQL skips /*M! comments
    assert classify("/*!99999 SELECT 1 /* nested */ */ DELETE FROM t").route is Route.WRITE
    assert classify("/*!50000 SELECT 1 /* nested */ */").route is Route.READ


def test_sql_mode_flags() -> None:
    sql = r"SELECT 'a\' FOR UPDATE -- '"
    assert classify(sql, no_backslash_escapes=False).route is Route.READ  # \' escapes the quote: one string
    c = classify(sql, no_backslash_escapes=True)  # the string is 'a\', then FOR UPDATE and a comment
    assert (c.route, c.reason) == (Route.WRITE, "for update")
    assert split_statements(r"SELECT 'a\';b'; SELECT 2") == [r"SELECT 'a\';b'", "SELECT 2"]
    assert split_statements(r"SELECT 'a\'; SELECT 2", no_backslash_escapes=True) == [r"SELECT 'a\'", "SELECT 2"]
    sql = 'SELECT "it\\"s FOR UPDATE"'
    assert classify(sql, dialect=KNOWN).route is Route.READ  # a string with an escaped quote
    assert classify(sql, ansi_quotes=True).reason == "unterminated quoted identifier"
    assert classify('SELECT "for update" FROM t', ansi_quotes=True).route is Route.READ
    assert classify('SELECT "a""b" FROM t', ansi_quotes=True).route is Route.READ
    assert classify('PREPARE s FROM "SELECT 1"', ansi_quotes=True).reason == "prepare from variable"
    assert classify(r"PREPARE s FROM 'SELECT ''x'' FOR UPDATE'", no_backslash_escapes=True).route is Route.WRITE


def test_function_policy() -> None:
    user = FunctionPolicy(write_functions=frozenset({"App.Bump", "touch"}),
                          read_functions=frozenset({"nextval", "app.safe", "touch", "app.report", "get_lock"}))
    assert classify("SELECT app.bump(1)", user).reason == "writing function bump"
    assert classify("SELECT bump(1)", user).route is Route.WRITE  # the current database may be app
    assert classify("SELECT other.bump(1)", user).route is Route.READ
    assert classify("SELECT `app`.`bump`(1)", user).route is Route.WRITE
    assert classify("SELECT x.touch()", user).route is Route.WRITE  # a bare entry matches any schema
    assert classify("SELECT touch()", user).route is Route.WRITE  # write_functions beats read_functions
    assert classify("SELECT nextval(s)", user).route is Route.READ  # declared safe overrides the builtin
    assert classify("SELECT setval(s, 1)", user).route is Route.WRITE
    assert classify("SELECT app.safe()", user).route is Route.READ
    c = classify("SELECT get_lock('a', 1)", user)
    assert (c.route, c.session_state) == (Route.WRITE, "named_lock")  # it pins: to the writer, whatever the policy
    assert classify("SELECT nextval(s)").route is Route.WRITE
    assert classify("EXPLAIN SELECT bump(1)", user).route is Route.READ
    assert classify("UPDATE t SET a = bump(a)", user).route is Route.WRITE
    # CALL of a procedure declared a read
    assert classify("CALL app.report(1)", user).route is Route.READ
    assert classify("CALL report(1)", user).route is Route.WRITE  # the entry is qualified
    assert classify("CALL app.report(@x)", user).route is Route.WRITE
    assert classify("CALL app.report(LAST_INSERT_ID())", user).route is Route.WRITE
    assert classify("CALL app.bump()", user).route is Route.WRITE


def test_builtin_function_sets() -> None:
    assert WRITER_SESSION_FUNCTIONS == {"last_insert_id", "found_rows", "row_count"}
    assert NAMED_LOCK_FUNCTIONS <= BUILTIN_WRITE_FUNCTIONS
    assert WRITER_SESSION_FUNCTIONS <= BUILTIN_WRITE_FUNCTIONS
    for name in ("nextval", "setval", "lastval", "is_used_lock", "is_free_lock"):
        assert name in BUILTIN_WRITE_FUNCTIONS
        assert classify(f"SELECT {name}(1)").route is Route.WRITE
    for name in ("sleep", "rand", "uuid_short", "benchmark", "sysdate", "master_pos_wait", "master_gtid_wait",
                 "connection_id", "now", "count"):
        assert name not in BUILTIN_WRITE_FUNCTIONS
        assert classify(f"SELECT {name}(1)").route is Route.READ
    assert {"named_lock", "temp_table", "lock_tables", "handler"} <= PINNING_STATES
    assert PINNING_STATES == MY_PINNING_STATES
    assert "user_variable" not in PINNING_STATES  # SET @a = 1 is replayed; the tracker pins computed ones


def test_execute_follows_the_prepared_route() -> None:
    prepared = {"p": Route.READ, "w": Route.WRITE}
    assert classify("EXECUTE p", prepared=prepared).route is Route.READ
    assert classify("execute P", prepared=prepared).route is Route.READ  # names are case-insensitive
    assert classify("EXECUTE `P`", prepared=prepared).route is Route.READ
    c = classify("EXECUTE p USING @a, @b", prepared=prepared)  # the variables are wherever it runs
    assert (c.route, c.session_state, c.prepared_name) == (Route.READ, "user_variable_read", "p")
    assert classify("EXECUTE p USING 1, 'x'", prepared=prepared).route is Route.READ  # MariaDB: expressions
    assert classify("EXECUTE w", prepared=prepared).route is Route.WRITE
    assert classify("EXECUTE nope", prepared=prepared).route is Route.WRITE


@pytest.mark.parametrize(("sql", "name"), [
    ("PREPARE MyPlan FROM 'SELECT 1'", "myplan"),
    ("PREPARE `MyPlan` FROM 'SELECT 1'", "myplan"),
    ("EXECUTE p USING @a", "p"),
    ("DEALLOCATE PREPARE P", "p"),
    ("DROP PREPARE p", "p"),
    ("SELECT 1", None),
    ("EXECUTE IMMEDIATE 'SELECT 1'", None),
    ("SELECT 1; PREPARE q FROM 'SELECT 2'", "q"),
])
def test_prepared_name(sql: str, name: str | None) -> None:
    assert classify(sql).prepared_name == name


def test_classification_is_a_value() -> None:
    c = classify("SELECT 1")
    assert c == Classification(Route.READ, "select")
    assert c.route == "read"
    with pytest.raises(AttributeError):
        c.route = Route.WRITE  # type: ignore[misc]


@pytest.mark.parametrize(("sql", "statements"), [
    ("", []),
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 1;", ["SELECT 1"]),
    ("  SELECT 1 ;\n SELECT 2 ;; ; ", ["SELECT 1", "SELECT 2"]),
    ("SELECT ';'; SELECT \"a;b\"; SELECT `c;d`", ["SELECT ';'", 'SELECT "a;b"', "SELECT `c;d`"]),
    ("SELECT 1 -- a; comment\n; SELECT 2", ["SELECT 1 -- a; comment", "SELECT 2"]),
    ("SELECT 1 # a; comment\n; SELECT 2", ["SELECT 1 # a; comment", "SELECT 2"]),
    ("SELECT 1 --x; SELECT 2", ["SELECT 1 --x", "SELECT 2"]),
    ("/* a; */ SELECT 1; SELECT 2", ["/* a; */ SELECT 1", "SELECT 2"]),
    ("/*!40101 SET NAMES utf8 */; SELECT 1", ["/*!40101 SET NAMES utf8 */", "SELECT 1"]),
    (r"SELECT 'a\';'; SELECT 2", [r"SELECT 'a\';'", "SELECT 2"]),
    ("SELECT 1; -- trailing comment", ["SELECT 1"]),
    ("SELECT 1; # trailing comment", ["SELECT 1"]),
    ("CREATE PROCEDURE p() BEGIN SELECT 1; IF a THEN SELECT 2; ELSE SELECT 3; END IF; END; CALL p()",
     ["CREATE PROCEDURE p() BEGIN SELECT 1; IF a THEN SELECT 2; ELSE SELECT 3; END IF; END", "CALL p()"]),
    ("CREATE DEFINER=`root`@`%` FUNCTION f(x INT) RETURNS INT DETERMINISTIC BEGIN DECLARE y INT; "
     "SET y = IF(x > 1, CASE WHEN x > 2 THEN 3 ELSE 2 END, 1); lbl: LOOP LEAVE lbl; END LOOP lbl; "
     "WHILE y < 3 DO SET y = y + 1; END WHILE; REPEAT SET y = REPEAT('a', 1); UNTIL 1 END REPEAT; "
     "CASE y WHEN 1 THEN SET y = 2; ELSE BEGIN END; END CASE; RETURN y; END; SELECT f(1)",
     ["CREATE DEFINER=`root`@`%` FUNCTION f(x INT) RETURNS INT DETERMINISTIC BEGIN DECLARE y INT; "
      "SET y = IF(x > 1, CASE WHEN x > 2 THEN 3 ELSE 2 END, 1); lbl: LOOP LEAVE lbl; END LOOP lbl; "
      "WHILE y < 3 DO SET y = y + 1; END WHILE; REPEAT SET y = REPEAT('a', 1); UNTIL 1 END REPEAT; "
      "CASE y WHEN 1 THEN SET y = 2; ELSE BEGIN END; END CASE; RETURN y; END", "SELECT f(1)"]),
    ("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET NEW.a = 1; SELECT 1",
     ["CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET NEW.a = 1", "SELECT 1"]),
    ("CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW BEGIN SET NEW.end = 1; END; SELECT 1",
     ["CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW BEGIN SET NEW.end = 1; END", "SELECT 1"]),
    ("CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO BEGIN DELETE FROM t; END; SELECT 1",
     ["CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO BEGIN DELETE FROM t; END", "SELECT 1"]),
    ("BEGIN NOT ATOMIC SELECT 1; SELECT 2; END; BEGIN; COMMIT",
     ["BEGIN NOT ATOMIC SELECT 1; SELECT 2; END", "BEGIN", "COMMIT"]),
    ("IF 1 THEN SELECT 1; END IF; SELECT 2", ["IF 1 THEN SELECT 1; END IF", "SELECT 2"]),
    ("SELECT CASE WHEN a THEN 1 END FROM t; SELECT 2", ["SELECT CASE WHEN a THEN 1 END FROM t", "SELECT 2"]),
    ("SELECT 1; SELECT 'open", ["SELECT 1", "SELECT 'open"]),
    ("SELECT 1; /* open", ["SELECT 1", "/* open"]),
])
def test_split_statements(sql: str, statements: list[str]) -> None:
    assert split_statements(sql) == statements


# --- fuzz: classify never raises, agrees with split_statements, and stays linear

_FRAGMENTS = ["SELECT", "select", "INSERT", "INTO", "FOR", "UPDATE", "SHARE", "LOCK", "IN", "MODE", "WITH", "AS",
              "EXPLAIN", "ANALYZE", "BEGIN", "START", "TRANSACTION", "READ", "ONLY", "COMMIT", "PREPARE", "FROM",
              "EXECUTE", "USING", "SET", "autocommit", "=", ":=", "@a", "@", "@@identity", "@@", "GLOBAL", "USE",
              "LAST_INSERT_ID", "GET_LOCK", "NEXT", "VALUE", "(", ")", ";", ",", ".", "'", "''", '"', "`", "x'",
              "\\", "--", "-- ", "#", "\n", "/*", "*/", "/*!", "/*!50000", "/*M!", "/*+", " ", "1", "0x1F", "t",
              "endpoint: writer", "CREATE", "PROCEDURE", "TEMPORARY", "TABLE", "END", "IF", "CASE", "LOOP", "é",
              "\x00"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map(" ".join),
                 st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)))
def test_classify_never_raises(sql: str) -> None:
    c = classify(sql)
    assert c.reason != "classifier error"
    assert c.route in (Route.READ, Route.WRITE)
    assert c.statements == len(split_statements(sql))
    for ansi, nbe in ((True, False), (False, True)):
        c = classify(sql, ansi_quotes=ansi, no_backslash_escapes=nbe)
        assert c.reason != "classifier error"
        assert c.statements == len(split_statements(sql, ansi_quotes=ansi, no_backslash_escapes=nbe))


@pytest.mark.parametrize("sql", [
    "(" * 50_000,
    ")" * 50_000,
    "SELECT (" * 10_000 + "1" + ")" * 10_000,
    "SELECT 1;" * 10_000,
    "/*" * 20_000,
    "/* */" * 20_000,
    "/*!" * 20_000,
    "/*!50000 " * 10_000 + "*/" * 10_000,
    "'" * 50_001,
    "'\\" * 20_000,
    "@" * 50_000,
    "EXPLAIN ANALYZE " * 10_000 + "SELECT 1",
    "SET STATEMENT a = 1 FOR " * 5_000 + "SELECT 1",
    "PREPARE s FROM '" + "PREPARE s FROM ''" * 2_000 + "SELECT 1'",
    "SELECT " + "GET_LOCK(" * 10_000,
    "SELECT " + "@a := " * 10_000 + "1",
    "SET " + "a = 1, " * 10_000 + "b = 2",
    "CREATE PROCEDURE p() BEGIN " + "SELECT 1; " * 10_000 + "END",
    "CREATE PROCEDURE p() BEGIN " + "IF (THEN IF (" * 5_000,
    "BEGIN NOT ATOMIC " + "BEGIN; " * 10_000,
    "SET sql_mode = 'ANSI'; SET sql_mode = ''; " * 1_000 + 'SELECT "x"',  # each changes how the rest lexes
    "SET sql_mode = @a; SELECT '\\\\', \"a\"; " * 1_000,  # unknown flags: several readings of everything
])
def test_classify_is_fast_on_pathological_input(sql: str) -> None:
    # This thread's CPU time, not the clock: a guard against blow-ups (quadratic or worse) that
    # other processes on a shared machine cannot trip.
    started = time.thread_time()
    c = classify(sql)
    split_statements(sql)
    assert c.reason != "classifier error"
    assert time.thread_time() - started < 2.0



# --- lexing as the server will: the session's sql_mode and character set (defect 7)

DEFECT_7 = r"select 'a\'; delete from t where id = 3; -- '"
NBE = MyDialect(no_backslash_escapes=True, ansi_quotes=False, charset="utf8mb4")
ANSI = MyDialect(no_backslash_escapes=False, ansi_quotes=True, charset="utf8mb4")
UNKNOWN = MyDialect()


def test_defect_7_no_backslash_escapes_hides_a_delete() -> None:
    # SET sql_mode = 'NO_BACKSLASH_ESCAPES': the backslash is a letter, the string is 'a\\', then a DELETE
    c = classify(DEFECT_7, dialect=NBE)
    assert (c.route, c.reason, c.statements) == (Route.WRITE, "delete", 2)
    assert classify(DEFECT_7, dialect=KNOWN).route is Route.READ  # with escapes: one string, one read
    # not known (what today's session passes: nothing): read both ways, they disagree: the writer
    c = classify(DEFECT_7, dialect=UNKNOWN)
    assert (c.route, c.reason) == (Route.WRITE, "sql_mode unknown: the query reads several ways")
    assert classify(DEFECT_7).route is Route.WRITE


def test_ansi_quotes_hides_a_delete() -> None:
    sql = r'SELECT "a\"; DELETE FROM t; -- "'  # a string with an escaped quote, or the identifier "a\" and a DELETE
    assert classify(sql, dialect=KNOWN).route is Route.READ
    assert classify(sql, dialect=ANSI).reason == "delete"
    assert classify(sql, dialect=MyDialect(False, None, "utf8mb4")).route is Route.WRITE
    assert classify(sql, ansi_quotes=True, no_backslash_escapes=False).reason == "delete"  # keywords override
    assert classify('SELECT "a" FROM t', dialect=UNKNOWN).route is Route.READ  # the readings agree


def test_sql_mode_set_in_the_query_changes_how_the_rest_lexes() -> None:
    sql = "SET sql_mode = 'NO_BACKSLASH_ESCAPES'; " + DEFECT_7
    a = analyze(sql, dialect=KNOWN)
    assert [s.text for s in a.statements] == ["SET sql_mode = 'NO_BACKSLASH_ESCAPES'", r"select 'a\'",
                                              "delete from t where id = 3"]
    assert [s.dialect.no_backslash_escapes for s in a.statements] == [False, True, True]
    assert a.dialect == NBE
    assert classify(sql, dialect=KNOWN).statements == 3
    for first in ("SET SESSION sql_mode = 'ANSI'", "SET @@sql_mode = 'ansi_quotes'", "SET @@SESSION.sql_mode := ANSI",
                  "SET LOCAL sql_mode = 'DB2,STRICT_ALL_TABLES'", "SET @@local.sql_mode = 'ORACLE'"):
        a = analyze(first + r'; SELECT "a\"; DELETE FROM t; -- "', dialect=KNOWN)
        assert len(a.statements) == 3 and a.dialect.ansi_quotes, first
    a = analyze("SET sql_mode = ''; " + DEFECT_7, dialect=NBE)  # back to escapes: one string
    assert len(a.statements) == 2 and a.dialect == KNOWN


@pytest.mark.parametrize("first", [
    "SET sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')",
    "SET sql_mode = @saved",
    "SET sql_mode = DEFAULT",
    "SET GLOBAL sql_mode = ''",
    "EXECUTE s",
])
def test_an_unknown_sql_mode_in_the_query_reads_the_rest_both_ways(first: str) -> None:
    a = analyze(first + "; " + DEFECT_7, dialect=KNOWN)
    assert a.uncertain and a.problem == "sql_mode unknown: the query reads several ways"
    assert a.classification.route is Route.WRITE
    assert a.dialect.no_backslash_escapes is None


def test_set_names_in_the_query_changes_the_charset() -> None:
    sql = "SET NAMES gbk; SELECT '\udc95\\'; DELETE FROM t; -- '"
    a = analyze(sql, dialect=KNOWN)
    assert a.uncertain and a.problem == "a backslash or backtick after a non-ASCII character (character_set_client gbk)"
    assert analyze("SET NAMES 'sjis' COLLATE sjis_bin; SELECT 1", dialect=KNOWN).dialect.charset == "sjis"
    assert analyze("SET CHARACTER SET big5", dialect=KNOWN).dialect.charset == "big5"
    assert analyze("SET character_set_client = utf8mb4", dialect=UNKNOWN).dialect.charset == "utf8mb4"


@pytest.mark.parametrize("sql", [
    "SELECT '\udc95\\'; DELETE FROM t; -- '",  # Shift-JIS 0x95 0x5c is one letter: the string ends at the '
    "SELECT \udc81`; DELETE FROM t; -- `",  # 0x81 0x60: one letter, then a DELETE
])
def test_a_multibyte_character_may_end_in_a_backslash_or_backtick(sql: str) -> None:
    c = classify(sql, dialect=MyDialect(False, False, "sjis"))
    assert c.route is Route.WRITE and c.reason.startswith("a backslash or backtick after a non-ASCII character")
    assert classify(sql, dialect=MyDialect(False, False, None)).route is Route.WRITE  # charset unknown
    assert classify(sql, dialect=KNOWN).route is Route.READ  # utf8mb4 never hides one


@pytest.mark.parametrize(("sql", "route", "statements"), [
    # comments
    ("SELECT 1 # ; DELETE FROM t", R, 1),
    ("SELECT 1 -- ; DELETE FROM t", R, 1),
    ("SELECT 1 --\t; DELETE FROM t", R, 1),
    ("SELECT 1 --1; DELETE FROM t", W, 2),  # no space: 1 - -1, then a DELETE
    ("SELECT 1 /* ; DELETE FROM t */", R, 1),
    ("SELECT 1 /* /* */ ; DELETE FROM t", W, 2),  # comments do not nest
    ("SELECT /*+ MAX_EXECUTION_TIME(1000) */ * FROM t", R, 1),
    # executable comments: MariaDB runs their content
    ("SELECT 1 /*! , 2 */", R, 1),
    ("/*!50100 DELETE FROM t */", W, 1),
    ("SELECT 1 /*M!100000 FOR UPDATE */", W, 1),
    ("SELECT 1 /*!; DELETE FROM t */", W, 2),  # a statement boundary inside: the writer
    ("SELECT 1 /*! /*! DELETE FROM t */ */", W, 1),  # one inside another: the writer
    ("SELECT 1 /*!99999 /* ; */ FOR UPDATE */", W, 1),
    # quotes
    ("SELECT `a``; DELETE FROM t; -- `", R, 1),
    ("SELECT 'a''; DELETE FROM t; -- '", R, 1),
    ('SELECT "a""; DELETE FROM t; -- "', R, 1),
    ("SELECT X'41', B'01', 0x41 FROM t", R, 1),
    ("SELECT _utf8mb4 'x', N'y', _binary'z' FROM t", R, 1),
    # DELIMITER belongs to the mysql client: the server does not know it
    ("DELIMITER //", W, 1),
    ("DELIMITER ;;\nSELECT 1;;", W, 2),
])
def test_lexical_traps(sql: str, route: str, statements: int) -> None:
    c = classify(sql, dialect=KNOWN)
    assert (c.route, c.statements) == (route, statements), c


def test_charset_introducers_follow_the_sql_mode() -> None:
    sql = r"SELECT _utf8mb4'a\'; DELETE FROM t; -- '"
    assert classify(sql, dialect=KNOWN).route is Route.READ
    assert classify(sql, dialect=NBE).route is Route.WRITE
    assert classify(sql, dialect=UNKNOWN).route is Route.WRITE


def test_set_assignments() -> None:
    toks = tuple(analyze("SET GLOBAL a = 1, b = 2, SESSION @@c := 'x', @@global.d = 3, @e = @f, NAMES utf8mb4 "
                         "COLLATE utf8mb4_bin, CHARACTER SET latin1", dialect=KNOWN).statements[0].tokens)
    items = set_assignments(toks)
    assert items is not None
    assert [(i.target, i.name, i.is_global) for i in items] == [
        ("v", "a", True), ("v", "b", True), ("v", "c", False), ("v", "d", True), ("u", "e", False),
        ("names", "names", False), ("names", "character_set", False)]
    assert literal_text(items[2].value, False) == "x"
    assert literal_text(items[5].value, False) is None  # utf8mb4 COLLATE utf8mb4_bin: not one literal
    assert literal_text(items[5].value[:1], False) == "utf8mb4"
    for sql in ("SET TRANSACTION READ ONLY", "SET STATEMENT a = 1 FOR SELECT 1", "SET PASSWORD = 'x'", "SELECT 1"):
        assert set_assignments(analyze(sql, dialect=KNOWN).statements[0].tokens) is None
    items = set_assignments(analyze("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                                    dialect=KNOWN).statements[0].tokens)
    assert items is not None and [(i.name, i.is_global) for i in items] == [("transaction", False)]


def test_the_function_policy_applies_under_every_reading() -> None:
    user = FunctionPolicy(write_functions=frozenset({"app.bump"}), read_functions=frozenset({"report"}))
    assert classify('SELECT app.bump("x")', user, dialect=UNKNOWN).route is Route.WRITE
    assert classify('SELECT report("x")', user, dialect=UNKNOWN).route is Route.READ
    assert classify("SELECT bump(1)", user).route is Route.WRITE
    assert classify("CALL report()", user, dialect=KNOWN).route is Route.READ
    assert classify("CALL report(@out)", user, dialect=KNOWN).route is Route.WRITE  # sets a user variable
    assert classify("SELECT report(1)", dialect=KNOWN).route is Route.READ  # no policy: an unknown function reads


_DIALECTS = [KNOWN, NBE, ANSI, UNKNOWN, MyDialect(False, False, "gbk")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*_FRAGMENTS, "sql_mode", "'ANSI_QUOTES'", "'NO_BACKSLASH_ESCAPES'", "NAMES",
                                 "gbk", "\udc95"]), max_size=30).map(" ".join))
def test_an_unknown_sql_mode_reads_only_when_every_sql_mode_does(sql: str) -> None:
    c = classify(sql, dialect=UNKNOWN)
    if c.route is Route.READ:
        for nbe in (False, True):
            for ansi in (False, True):
                assert classify(sql, dialect=MyDialect(nbe, ansi, None)).route is Route.READ, (nbe, ansi)
    for dialect in _DIALECTS:
        a = analyze(sql, dialect=dialect)
        assert a.classification == classify(sql, dialect=dialect)
        assert a.classification.reason != "classifier error"
