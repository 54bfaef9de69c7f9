"""The one list per protocol of the session state a client can set up, and what the proxy does with each kind."""

# Rules of this file:
#
# - Every kind of session state the proxy knows of is one row here, for PostgreSQL (PG_STATE_KINDS) and for
#   MySQL/MariaDB (MY_STATE_KINDS). The classifiers report a row's key in Classification.session_state, the
#   trackers (session_state.py, my_session_state.py) act on the row's action, and README.md's "Session state"
#   table is these rows (tests/unit/test_session_kinds.py checks all three agree).
# - REPLAYED: the tracker keeps what re-creates the state, and the session gives it to every other backend it
#   uses before that backend's next request (after a failover too). PINNED: the state lives on one server and
#   cannot be copied: the statement goes to the writer, and the session stays there (reads included) and
#   cannot move; if that server is lost the session is closed with an error. NOT_TRACKED: transaction-scoped or
#   not session state; listed so that the list says so.
# - Pins are sticky: they end with the session (or, for MySQL, COM_RESET_CONNECTION / COM_CHANGE_USER).

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "pooled_how",
    "MY_PINNING_STATES",
    "MY_STATE_KINDS",
    "PG_PINNING_STATES",
    "PG_STATE_KINDS",
    "Action",
    "StateKind",
    "label_of",
]


class Action(StrEnum):
    REPLAYED = "replayed"
    PINNED = "pinned"
    NOT_TRACKED = "not tracked"


@dataclass(frozen=True)
class StateKind:
    key: str  # Classification.session_state value, or a tracker's own key (the same namespace)
    label: str  # what it is, in the words an error message or pinned_by uses
    set_up_by: str  # README: the statements or messages that create it
    action: Action
    how: str  # README: what exactly the proxy does


_R, _P, _N = Action.REPLAYED, Action.PINNED, Action.NOT_TRACKED

PG_STATE_KINDS: tuple[StateKind, ...] = (
    StateKind("startup", "startup parameters", "StartupMessage: user, database, options, application_name, ...",
              _R, "sent in the StartupMessage of every backend the session opens"),
    StateKind("set", "SET value", "`SET`, `SET SESSION`, `SET ROLE`, `SET SESSION AUTHORIZATION`, `SET TIME ZONE`, "
              "`SET SESSION CHARACTERISTICS`", _R, "the statement, in order (inside a transaction: once it commits)"),
    StateKind("reset", "RESET", "`RESET name`, `RESET ALL`", _R,
              "`RESET name` like a SET; `RESET ALL` forgets every SET value and other backends are rebuilt"),
    StateKind("set_config", "set_config value", "`SELECT set_config('name', 'value', false)`: literal arguments, "
              "a statement of set_config calls only", _R, "`SELECT pg_catalog.set_config(...)` with the same literals"),
    StateKind("load", "loaded library", "`LOAD 'library'`", _R, "the statement, in order"),
    StateKind("prepare", "SQL prepared statement", "`PREPARE name AS ...`", _R,
              "the statement; `DEALLOCATE` forgets it"),
    StateKind("deallocate", "DEALLOCATE", "`DEALLOCATE name`, `DEALLOCATE ALL`", _R,
              "forgets the prepared statement(s); other backends are rebuilt after ALL"),
    StateKind("parse", "named prepared statement", "Parse with a statement name (extended protocol)", _R,
              "the Parse message, verbatim; Close forgets it"),
    StateKind("discard", "DISCARD", "`DISCARD ALL`, `DISCARD PLANS`, `DISCARD SEQUENCES`, `DISCARD TEMP`", _R,
              "`DISCARD ALL` forgets SET values and prepared statements and other backends are rebuilt; "
              "the others leave nothing to replay"),
    StateKind("listen", "LISTEN", "`LISTEN channel`", _P, "the session stays on the writer"),
    StateKind("temp_table", "temporary table", "`CREATE TEMP TABLE` (or VIEW, SEQUENCE), `SELECT ... INTO TEMP`, "
              "`CREATE TABLE pg_temp.t`", _P, "the session stays on the writer"),
    StateKind("advisory_lock", "session advisory lock", "`pg_advisory_lock()`, `pg_advisory_lock_shared()`, "
              "`pg_try_advisory_lock()`, `pg_try_advisory_lock_shared()`", _P, "the session stays on the writer"),
    StateKind("cursor_with_hold", "WITH HOLD cursor", "`DECLARE c CURSOR WITH HOLD FOR ...`", _P,
              "the session stays on the writer"),
    StateKind("set_config_computed", "set_config with a computed value", "set_config(..., false) with a "
              "parameter ($1), a column or an expression, with FROM/WHERE around it, in PREPARE, EXPLAIN ANALYZE, "
              "COPY or DECLARE, or with is_local not a literal", _P,
              "the session stays on the writer (what it set cannot be known)"),
    StateKind("do_block", "DO block", "`DO` whose body may set session state (SET, RESET, set_config, EXECUTE, "
              "LISTEN, temporary tables, advisory locks, setseed) or in a language other than plpgsql", _P,
              "the session stays on the writer"),
    StateKind("setseed", "random seed", "`setseed()`", _P, "the session stays on the writer"),
    StateKind("pg_settings_update", "UPDATE pg_settings", "`UPDATE pg_settings SET setting = ...`", _P,
              "the session stays on the writer"),
    StateKind("dblink_connection", "dblink connection", "`dblink_connect()`, `dblink_connect_u()`", _P,
              "the session stays on the writer"),
    StateKind("replication_origin", "replication origin session", "`pg_replication_origin_session_setup()`", _P,
              "the session stays on the writer"),
    StateKind("parse_state", "state set up by a named prepared statement", "Parse with a statement name whose "
              "statement is SET, RESET, set_config, LOAD or DISCARD (its executions are not seen)", _P,
              "the session stays on the writer"),
    StateKind("uncertain", "session state of an uncertain query", "a query that may set up state and reads two "
              "ways (standard_conforming_strings unknown), or has a backslash after a non-ASCII character in a "
              "client-only multibyte encoding", _P, "the session stays on the writer"),
    StateKind("replay_limit", "too much session state", "more than 1000 SET statements to replay, after "
              "superseded ones are dropped", _P, "the session stays on the writer"),
    StateKind("transaction_local", "transaction-local setting", "`SET LOCAL`, `set_config(..., true)`, "
              "`SET TRANSACTION`, `SET CONSTRAINTS`", _N, "ends with its transaction"),
    StateKind("xact_advisory_lock", "transaction advisory lock", "`pg_advisory_xact_lock()` and the "
              "`_shared`/`try_` variants", _N, "ends with its transaction (on the writer)"),
    StateKind("unlisten", "UNLISTEN", "`UNLISTEN`", _N, "a session pinned by LISTEN stays pinned"),
    StateKind("sequence_position", "currval/lastval", "`nextval()`", _N,
              "nextval, currval and lastval all run on the writer; after a failover currval starts over"),
    StateKind("prepared_transaction", "prepared transaction", "`PREPARE TRANSACTION`", _N,
              "a cluster-wide object on the writer: `COMMIT PREPARED` and `ROLLBACK PREPARED` go there"),
)

MY_STATE_KINDS: tuple[StateKind, ...] = (
    StateKind("handshake", "login settings", "handshake: user, database, character set, capabilities", _R,
              "used to log every backend in"),
    StateKind("set", "session variable", "`SET [SESSION] var = value` (`sql_mode`, `time_zone`, ...), "
              "`SET NAMES`, `SET CHARACTER SET`, `SET SESSION TRANSACTION`, `SET ROLE`", _R,
              "the statement, in order; the value may use literals, @variables, @@variables and functions "
              "that give the same result on any server"),
    StateKind("autocommit_off", "autocommit off", "`SET autocommit = 0`", _R,
              "the statement, in order; every statement up to COMMIT/ROLLBACK is a transaction on the writer"),
    StateKind("autocommit_on", "autocommit on", "`SET autocommit = 1`", _R, "the statement, in order"),
    StateKind("user_variable", "user variable", "`SET @a = value`, same values as above", _R,
              "the statement, in order"),
    StateKind("use", "default database", "`USE db`, COM_INIT_DB", _R, "a `USE` statement, in order"),
    StateKind("prepare", "SQL prepared statement", "`PREPARE s FROM 'text'` or `FROM @var`", _R,
              "the statement, in order; `DEALLOCATE PREPARE` forgets it"),
    StateKind("deallocate", "DEALLOCATE PREPARE", "`DEALLOCATE PREPARE s`, `DROP PREPARE s`", _R,
              "forgets the prepared statement"),
    StateKind("stmt_prepare", "binary prepared statement", "COM_STMT_PREPARE", _R,
              "re-prepared under the statement id the client knows"),
    StateKind("set_option", "multi-statement option", "COM_SET_OPTION", _R, "the command"),
    StateKind("user_variable_computed", "user variable with a computed value", "`SELECT ... INTO @a`, `@a := ...`, "
              "`SET @a = (SELECT ...)`, `SET @a = UUID()`, `CALL p(@out)`, `EXPLAIN ... INTO @a`, "
              "`GET DIAGNOSTICS @a`", _P, "the session stays on the writer"),
    StateKind("set_computed", "session variable with a computed value", "`SET var = (SELECT ...)`, "
              "`SET var = RAND()`, any function not known to give the same result on every server; a SET of "
              "session and GLOBAL variables in one statement", _P,
              "the session stays on the writer"),
    StateKind("temp_table", "temporary table", "`CREATE TEMPORARY TABLE`, `CREATE TEMPORARY SEQUENCE`", _P,
              "the session stays on the writer"),
    StateKind("named_lock", "named lock", "`GET_LOCK()`", _P, "the session stays on the writer"),
    StateKind("lock_tables", "table lock", "`LOCK TABLES`, `LOCK INSTANCE FOR BACKUP`, `FLUSH TABLES ... WITH "
              "READ LOCK`, `FLUSH TABLES ... FOR EXPORT`, `BACKUP STAGE`, `BACKUP LOCK`", _P,
              "the session stays on the writer"),
    StateKind("handler", "HANDLER", "`HANDLER t OPEN`", _P, "the session stays on the writer"),
    StateKind("executed_state", "state set up by a prepared statement", "`EXECUTE s` of a `PREPARE s FROM 'SET ...'` "
              "(or of an unknown text), `EXECUTE IMMEDIATE` of such a text, COM_STMT_EXECUTE of a statement that "
              "sets state", _P, "the session stays on the writer"),
    StateKind("uncertain", "session state of an uncertain query", "a state-changing query that fails part-way "
              "(several statements), or that reads two ways under an unknown sql_mode", _P,
              "the session stays on the writer"),
    StateKind("replay_limit", "too much session state", "more than 1000 statements to replay, after superseded "
              "ones are dropped", _P, "the session stays on the writer"),
    StateKind("user_variable_read", "user variable read", "`SELECT @a`", _N,
              "every backend the session uses has its variables (or the session is pinned)"),
    StateKind("next_transaction", "next-transaction characteristics", "`SET TRANSACTION ...` without a scope", _N,
              "lasts until the next transaction"),
    StateKind("unlock_tables", "UNLOCK TABLES", "`UNLOCK TABLES`, `RELEASE_LOCK()`, `HANDLER t CLOSE`", _N,
              "a pinned session stays pinned"),
    StateKind("xa", "XA transaction", "`XA START` ... `XA COMMIT`", _N, "a transaction: runs on the writer"),
    StateKind("set_statement", "SET STATEMENT", "`SET STATEMENT var = value FOR ...`", _N, "one statement"),
)

PG_PINNING_STATES: frozenset[str] = frozenset(k.key for k in PG_STATE_KINDS if k.action is Action.PINNED)
MY_PINNING_STATES: frozenset[str] = frozenset(k.key for k in MY_STATE_KINDS if k.action is Action.PINNED)

_LABELS = {**{("postgresql", k.key): k.label for k in PG_STATE_KINDS},
           **{("mysql", k.key): k.label for k in MY_STATE_KINDS}}


def label_of(protocol: str, key: str) -> str:
    """The label of a state kind ("postgresql" or "mysql"); the key itself if the list has no such row."""
    return _LABELS.get((protocol, key), key)


# What transaction pool mode does with each kind (README's last column): by action, unless a row says more.
_POOLED_DEFAULT = {
    Action.REPLAYED: "applied to each borrowed server connection by difference (nothing sent when it has it)",
    Action.PINNED: "pinned: the client keeps its server connection until it disconnects",
    Action.NOT_TRACKED: "as in session mode",
}
_UNTIL = "pinned: the client keeps its server connection until "
_POOLED: dict[tuple[str, str], str] = {
    ("postgresql", "startup"): "pooled connections log in with user and database only; the rest are settings, "
                               "applied by difference",
    ("postgresql", "reset"): "`RESET name` returns to the client's startup value; after `RESET ALL` the settings "
                             "are rebuilt on the next connection",
    ("postgresql", "load"): "pinned: the client keeps its server connection (a library cannot be unloaded)",
    ("postgresql", "prepare"): "applied by difference: `PREPARE` where the connection lacks it, `DEALLOCATE` of "
                               "another client's statement of the same name",
    ("postgresql", "parse"): "prepared on each connection at its first use there, under a proxy-wide name that "
                             "every client with the same statement shares; a client's `Close` is answered by the "
                             "proxy; the least recently used close past `max_prepared_statements`",
    ("postgresql", "discard"): "`DISCARD ALL` forgets settings and prepared statements and ends every pin; "
                               "`DISCARD TEMP` ends a temporary-table pin",
    ("postgresql", "listen"): _UNTIL + "`UNLISTEN *` or `DISCARD ALL`",
    ("postgresql", "temp_table"): _UNTIL + "`DISCARD TEMP` or `DISCARD ALL`",
    ("postgresql", "advisory_lock"): _UNTIL + "`pg_advisory_unlock_all()` or `DISCARD ALL`",
    ("postgresql", "cursor_with_hold"): _UNTIL + "`CLOSE ALL` or `DISCARD ALL`",
    ("mysql", "handshake"): "pooled connections log in as the user to the login's database; schema and options "
                            "are applied by difference",
    ("mysql", "autocommit_off"): "the connection stays borrowed while autocommit is off (a transaction)",
    ("mysql", "stmt_prepare"): "prepared on each connection at its first use there (by text); statement ids stay "
                               "the client's; the least recently used close past `max_prepared_statements`",
    ("mysql", "temp_table"): _UNTIL + "COM_RESET_CONNECTION or it disconnects (then the connection is closed)",
    ("mysql", "named_lock"): _UNTIL + "`RELEASE_ALL_LOCKS()` or COM_RESET_CONNECTION",
    ("mysql", "lock_tables"): _UNTIL + "`UNLOCK TABLES` or COM_RESET_CONNECTION",
    ("mysql", "handler"): _UNTIL + "COM_RESET_CONNECTION or it disconnects",
}


def pooled_how(protocol: str, kind: StateKind) -> str:
    """What transaction pool mode does with state of ``kind`` ("postgresql" or "mysql")."""
    return _POOLED.get((protocol, kind.key), _POOLED_DEFAULT[kind.action])
