"""What a MySQL/MariaDB client session has set up on its backend, and the session's lexical dialect.

Rules of this file: pure bookkeeping fed the client's commands and the server's answers, acting on the one
list of session state (session_kinds.MY_STATE_KINDS). A command's effects wait in `_pending` until its answer:
an OK (or EOF) applies them, an ERR of a one-statement command drops them (a failed SET changes nothing), an ERR
of a several-statement query that changed state pins the session (which statements ran is not known). REPLAYED
kinds become ReplayEntry rows, in order, each with a sequence number: a backend that has applied up to seq N
gets `replay_after(N)` before its next request. A row a later one supersedes is dropped (unless something in
between read it), so a session that sets the same variables over and over keeps a short list. PINNED kinds set
`pinned_by` (sticky until `reset`). The dialect (sql_mode flags, character_set_client) follows SET statements
with literal values and the NO_BACKSLASH_ESCAPES status flag of every OK/EOF packet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..protocol.mysql.constants import MYSQL_OPTION_MULTI_STATEMENTS_ON, SERVER_STATUS_NO_BACKSLASH_ESCAPES
from .dialect import MyDialect
from .my_classify import Assignment, StatementInfo, analyze, literal_text, set_assignments
from .session_kinds import MY_PINNING_STATES, label_of

__all__ = ["MySessionState", "ReplayEntry"]

# Functions that give the same result on any server, given the session's replayed variables: a SET value that
# calls only these (with literals and variables) can be replayed. Anything else (RAND, UUID, NOW, CONNECTION_ID,
# LAST_INSERT_ID, a subquery, a stored function) cannot.
_DETERMINISTIC_FUNCTIONS = frozenset({
    "concat", "concat_ws", "replace", "lower", "upper", "lcase", "ucase", "trim", "ltrim", "rtrim", "substring",
    "substr", "mid", "left", "right", "length", "char_length", "character_length", "if", "ifnull", "coalesce",
    "nullif", "cast", "convert", "greatest", "least", "find_in_set", "locate", "instr", "position", "lpad", "rpad",
    "repeat", "reverse", "abs", "floor", "ceil", "ceiling", "round", "truncate", "mod", "hex", "unhex", "md5",
    "sha1", "sha2", "crc32", "conv", "bin", "oct", "ascii", "char", "date", "time", "datetime", "decimal",
    "database", "schema",
})
# System variables whose value belongs to one server or to the previous statement: not the same elsewhere.
_SERVER_VARIABLES = frozenset({
    "identity", "last_insert_id", "insert_id", "warning_count", "error_count", "timestamp", "rand_seed1",
    "rand_seed2", "server_id", "hostname", "port", "pseudo_thread_id", "read_only", "server_uuid", "last_gtid",
})
_MAX_ENTRIES = 1000  # after compaction; past it the session is pinned rather than replay without end
_CHARSET_KEYS = frozenset({"character_set_client", "character_set_results", "character_set_connection",
                           "collation_connection"})


@dataclass(frozen=True)
class ReplayEntry:
    """A statement that re-creates part of the session's state on another backend (sent as COM_QUERY)."""

    seq: int
    sql: str
    kind: str  # its key in session_kinds.MY_STATE_KINDS
    sets: frozenset[str] = frozenset()  # what it sets: "@a", "sql_mode", "schema", "prepare:s", ...
    reads: frozenset[str] = frozenset()  # what its value depends on: "@b", "sql_mode" (@@sql_mode), "schema"


@dataclass
class _Pending:
    """What one command will have changed once the server says OK."""

    entries: list[tuple[str, str, frozenset[str], frozenset[str]]] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)  # keys whose rows go (DEALLOCATE PREPARE)
    pins: list[tuple[str, str | None]] = field(default_factory=list)
    dialect: MyDialect | None = None
    schema: str | None = None
    multi_statements: bool | None = None
    stateful_prepared: dict[str, bool] = field(default_factory=dict)  # name -> its EXECUTE sets state
    statements: int = 1
    holds: list[str] = field(default_factory=list)  # what holds the connection besides the pins' kinds
    releases: list[str] = field(default_factory=list)  # holds it lets go of (UNLOCK TABLES, RELEASE_ALL_LOCKS())

    def changes(self) -> bool:
        return bool(self.entries or self.forget or self.pins or self.schema is not None
                    or self.multi_statements is not None or self.stateful_prepared)


@dataclass
class MySessionState:
    """One MySQL session's replayable state, pins and dialect. Feed it every command before it is sent and the
    command's final answer; read `dialect` for the classifier and `replay_after` for the other backends."""

    dialect: MyDialect = field(default_factory=MyDialect)
    schema: str | None = None  # the default database now (handshake, USE, COM_INIT_DB)
    multi_statements: bool | None = None  # COM_SET_OPTION's last word (None: the handshake's capability)
    pinned_by: str | None = None  # the label of the first pinning state (session_kinds), or None
    pinned_detail: str | None = None
    version: int = 0  # bumped by reset(): a backend that saw an older version must be reset itself
    entries: list[ReplayEntry] = field(default_factory=list)
    seq: int = 0  # the sequence number of the last entry ever added
    _pending: _Pending | None = field(default=None, repr=False)
    _stateful_prepared: dict[str, bool] = field(default_factory=dict, repr=False)
    _stateful_statements: set[int] = field(default_factory=set, repr=False)
    # What holds the session to its server connection, by kind: each pin's key, and "backup_lock" for the
    # backup locks UNLOCK TABLES does not end. Transaction-mode pooling (`release_pin`) lets go of the pin when
    # the last hold goes; "lock_tables" (LOCK TABLES, FLUSH TABLES ... WITH READ LOCK) goes with UNLOCK TABLES,
    # "named_lock" with RELEASE_ALL_LOCKS(); nothing here ends the others (temporary tables, HANDLER, values
    # only that server has...).
    holds: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, *, sql_mode: str | None = None, status: int | None = None, charset: str | None = None,
              schema: str | None = None) -> MySessionState:
        """The state of a session that logged in: the server's @@sql_mode if known, the status flags of its
        login OK, the character set of the handshake's collation, the database it asked for."""
        dialect = MyDialect.from_sql_mode(sql_mode, charset)
        if status is not None:
            dialect = MyDialect(bool(status & SERVER_STATUS_NO_BACKSLASH_ESCAPES), dialect.ansi_quotes,
                                dialect.charset)
        return cls(dialect=dialect, schema=schema)

    @property
    def replayable(self) -> bool:
        return self.pinned_by is None

    # --- what the session feeds

    def on_query(self, sql: str) -> None:
        """A COM_QUERY text, before it is sent."""
        self._settle()
        if not _maybe_stateful(sql):
            return
        self._pending = self._read(sql)

    def on_init_db(self, schema: str) -> None:
        """COM_INIT_DB."""
        self._settle()
        self._pending = _Pending(entries=[_use_entry(schema)], schema=schema)

    def on_set_option(self, option: int) -> None:
        """COM_SET_OPTION (MYSQL_OPTION_MULTI_STATEMENTS_ON or _OFF)."""
        self._settle()
        self._pending = _Pending(multi_statements=option == MYSQL_OPTION_MULTI_STATEMENTS_ON)

    def on_stmt_prepare(self, statement_id: int, sql: str) -> None:
        """A COM_STMT_PREPARE the server answered with PREPARE_OK (the client's statement id): its executions
        set up state if its text does."""
        if _maybe_stateful(sql) and _sets_up_state(sql, self.dialect):
            self._stateful_statements.add(statement_id)

    def on_stmt_execute(self, statement_id: int) -> None:
        """A COM_STMT_EXECUTE, before it is sent."""
        self._settle()
        if statement_id in self._stateful_statements:
            self._pin("executed_state", f"COM_STMT_EXECUTE of statement {statement_id}, which sets up state")

    def on_stmt_close(self, statement_id: int) -> None:
        self._stateful_statements.discard(statement_id)

    def on_response(self, ok: bool, status: int | None = None) -> None:
        """The final answer to the command last fed: OK/EOF (`ok`, with its status flags) or ERR."""
        pending, self._pending = self._pending, None
        if pending is not None:
            if ok:
                self._apply(pending)
            elif pending.statements > 1 and pending.changes():
                self._pin("uncertain", "a query that changes session state failed part-way")
                self.dialect = MyDialect()
            elif pending.statements > 1 and pending.dialect is not None:
                self.dialect = MyDialect()  # a SET sql_mode may or may not have run
        if status is not None:
            self.on_status(status)

    def on_sql_mode(self, sql_mode: str) -> None:
        """The session's @@sql_mode, when the session asked its backend (say, after a SET sql_mode with a value
        not known here left ANSI_QUOTES unknown)."""
        self.dialect = self.dialect.with_sql_mode(sql_mode)

    def on_status(self, status: int) -> None:
        """Status flags of any OK or EOF packet from the session's backend: NO_BACKSLASH_ESCAPES is the truth."""
        nbe = bool(status & SERVER_STATUS_NO_BACKSLASH_ESCAPES)
        if self.dialect.no_backslash_escapes is not nbe:
            self.dialect = MyDialect(nbe, self.dialect.ansi_quotes, self.dialect.charset)

    def reset(self, *, schema: str | None, sql_mode: str | None = None, charset: str | None = None) -> None:
        """COM_RESET_CONNECTION or COM_CHANGE_USER: the session starts over (backends that carry the old state
        must be reset or dropped: `version` changes)."""
        self.entries.clear()
        self._pending = None
        self._stateful_prepared.clear()
        self._stateful_statements.clear()
        self.pinned_by = self.pinned_detail = None
        self.holds.clear()
        self.multi_statements = None
        self.schema = schema
        self.dialect = MyDialect.from_sql_mode(sql_mode, charset)
        self.version += 1

    # --- what the session reads

    def release_pin(self) -> bool:
        """Transaction-mode pooling: end the pin if nothing holds the session to its server connection any
        more (what pinned it was let go of); True when it did. Session mode never calls it (a pin is for
        the session's life there)."""
        if self.pinned_by is None or self.holds:
            return False
        self.pinned_by = self.pinned_detail = None
        return True

    def replay_after(self, seq: int) -> list[ReplayEntry]:
        """The entries a backend that has applied everything up to `seq` (0: a fresh one) still needs, in order."""
        return [e for e in self.entries if e.seq > seq]

    def replay_sql(self) -> list[str]:
        return [e.sql for e in self.entries]

    # --- internals

    def _settle(self) -> None:
        """A command whose answer was not fed: count it as done (the safe side for the dialect: its SETs ran)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply(pending)

    def _pin(self, key: str, detail: str | None = None) -> None:
        self.holds.add(key)
        if self.pinned_by is None:
            self.pinned_by = label_of("mysql", key)
            self.pinned_detail = detail

    def _apply(self, pending: _Pending) -> None:
        self.holds.difference_update(pending.releases)
        self.holds.update(pending.holds)
        for key, detail in pending.pins:
            self._pin(key, detail)
        for key in pending.forget:
            self.entries[:] = [e for e in self.entries if key not in e.sets]
        for kind, sql, sets, reads in pending.entries:
            self._append(kind, sql, sets, reads)
        if pending.dialect is not None:
            self.dialect = pending.dialect
        if pending.schema is not None:
            self.schema = pending.schema
        if pending.multi_statements is not None:
            self.multi_statements = pending.multi_statements
        self._stateful_prepared.update(pending.stateful_prepared)

    def _append(self, kind: str, sql: str, sets: frozenset[str], reads: frozenset[str]) -> None:
        """Add an entry, dropping the earlier ones it supersedes: what they set it sets too, and nothing after
        them (itself included) reads it."""
        if sets:
            kept: list[ReplayEntry] = []
            reads_after = set(reads)
            for entry in reversed(self.entries):
                if entry.sets and entry.sets <= sets and not entry.sets & reads_after:
                    continue
                kept.append(entry)
                reads_after |= entry.reads
            kept.reverse()
            self.entries[:] = kept
        self.seq += 1
        self.entries.append(ReplayEntry(self.seq, sql, kind, sets, reads))
        if len(self.entries) > _MAX_ENTRIES:
            self._pin("replay_limit", f"more than {_MAX_ENTRIES} statements to replay")

    def _read(self, sql: str) -> _Pending:
        analysis = analyze(sql, dialect=self.dialect)
        pending = _Pending(statements=max(len(analysis.statements), 1), dialect=analysis.dialect)
        if analysis.uncertain:
            pending.pins.append(("uncertain", analysis.problem))
            pending.dialect = MyDialect()
            return pending
        for statement in analysis.statements:
            self._statement(statement, pending)
        if pending.dialect == self.dialect:
            pending.dialect = None
        return pending

    def _statement(self, statement: StatementInfo, pending: _Pending) -> None:
        state = statement.session_state
        toks = statement.tokens
        verb = toks[0][1] if toks and toks[0][0] == "w" else ""
        if verb == "execute":
            self._execute(statement, pending)
            return
        _note_holds(statement, verb, pending)
        if state is None or state in ("user_variable_read", "unlock_tables"):
            return
        if state in MY_PINNING_STATES:
            pending.pins.append((state, None))
        elif verb == "set":
            self._set(statement, pending)
        elif state == "user_variable":  # SELECT ... INTO @a, @a := ..., CALL p(@out), GET DIAGNOSTICS @a
            pending.pins.append(("user_variable_computed", None))
        elif state == "use":
            name = _use_name(statement)
            if name is not None:
                pending.entries.append(_use_entry(name))
                pending.schema = name
        elif state == "prepare" and statement.prepared_name is not None:
            self._prepare(statement, pending)
        elif state == "deallocate" and statement.prepared_name is not None:
            pending.forget.append(f"prepare:{statement.prepared_name}")
            pending.stateful_prepared[statement.prepared_name] = False

    def _set(self, statement: StatementInfo, pending: _Pending) -> None:
        items = set_assignments(statement.tokens)
        if items is None:  # SET STATEMENT ... FOR a statement that set a user variable
            if statement.session_state == "user_variable":
                pending.pins.append(("user_variable_computed", None))
            return
        if any(item.is_global for item in items) and not all(item.is_global for item in items):
            # replayed whole, it would set the other server's GLOBAL value too
            pending.pins.append(("set_computed", "a SET of session and GLOBAL variables in one statement"))
            return
        sets: set[str] = set()
        reads: set[str] = set()
        for item in items:
            if item.is_global:
                continue
            if item.target == "?":
                pending.pins.append(("set_computed", f"SET item not understood: {statement.text[:80]}"))
                return
            if not _replayable(item.value):
                kind = "user_variable_computed" if item.target == "u" else "set_computed"
                pending.pins.append((kind, f"{_item_name(item)} = a value another server may not give"))
                return
            sets |= _keys(item)
            reads |= _reads(item.value)
        if not sets:
            return  # only GLOBAL settings: the server's, not the session's
        kind = statement.session_state or "set"
        pending.entries.append((kind, statement.text, frozenset(sets), frozenset(reads)))

    def _prepare(self, statement: StatementInfo, pending: _Pending) -> None:
        name = statement.prepared_name
        assert name is not None
        toks = statement.tokens
        try:
            source = toks.index(("w", "from")) + 1
        except ValueError:
            return
        value = toks[source:]
        reads = {"schema"} | _reads(value)
        text = literal_text(value, bool(statement.dialect.no_backslash_escapes))
        # a PREPARE of a text that sets up state, or of a text not known here (FROM @sql): each EXECUTE may
        stateful = text is None or _sets_up_state(text, statement.dialect)
        pending.stateful_prepared[name] = stateful
        pending.entries.append(("prepare", statement.text, frozenset({f"prepare:{name}"}), frozenset(reads)))

    def _execute(self, statement: StatementInfo, pending: _Pending) -> None:
        toks = statement.tokens
        if len(toks) > 1 and toks[1] == ("w", "immediate"):
            literal = len(toks) > 2 and (toks[2][0] == "s" or (toks[2][1].startswith("_") and len(toks) > 3
                                                                and toks[3][0] == "s"))
            if not literal or statement.session_state is not None:
                pending.pins.append(("executed_state", "EXECUTE IMMEDIATE of a text that may set up state"))
            return
        name = statement.prepared_name
        stateful = pending.stateful_prepared.get(name or "", self._stateful_prepared.get(name or "", False))
        if stateful:
            pending.pins.append(("executed_state", f"EXECUTE {name}, whose text may set up state"))
        elif statement.session_state == "user_variable":  # EXECUTE ... USING is a read; anything else is not
            pending.pins.append(("user_variable_computed", None))


# Statements that may set up state or change the dialect begin with these (compound statements may hold a SET),
# or hold one of _STATEFUL_WORDS, or a user variable (@).
_STATEFUL_HEADS = ("set", "use", "begin", "if", "case", "loop", "while", "repeat", "/*", "--", "#", "(")
_STATEFUL_WORDS = ("lock", "temporary", "handler", "prepare", "deallocate", "drop", "execute", "flush", "backup")
_LABEL = re.compile(r"\s*[a-z_][a-z0-9_]*\s*:(?!=)")


def _maybe_stateful(sql: str) -> bool:
    """Whether a query may change session state or the dialect (a light check: false positives only cost a
    full read). Written out for speed: it runs on every query."""
    if "@" in sql:
        return True
    t = sql.lower()
    if t.lstrip().startswith(_STATEFUL_HEADS) or _LABEL.match(t):
        return True
    semicolon = t.find(";")
    if semicolon >= 0 and t[semicolon + 1:].strip(" \t\r\n\0"):
        return True  # several statements: any of them may
    return ("lock" in t or "temporary" in t or "handler" in t or "prepare" in t or "deallocate" in t
            or "drop" in t or "execute" in t or "flush" in t or "backup" in t)


def _sets_up_state(sql: str, dialect: MyDialect) -> bool:
    """Whether running a statement text (a prepared one) would set up any session state."""
    analysis = analyze(sql, dialect=dialect)
    if analysis.uncertain or (analysis.problem is not None and not analysis.statements):
        return True
    return any(s not in ("user_variable_read", "unlock_tables") for s in analysis.states)


def _note_holds(statement: StatementInfo, verb: str, pending: _Pending) -> None:
    """What a statement takes or lets go of that holds a session to its server connection (see `holds`)."""
    toks = statement.tokens
    state = statement.session_state
    second = toks[1][1] if len(toks) > 1 and toks[1][0] == "w" else ""
    if state == "lock_tables" and (verb == "backup" or (verb == "lock" and second == "instance")):
        pending.holds.append("backup_lock")  # BACKUP STAGE/LOCK, LOCK INSTANCE FOR BACKUP: not UNLOCK TABLES'
    elif state == "unlock_tables" and verb == "unlock" and second in ("table", "tables"):
        pending.releases.append("lock_tables")
    if ("w", "release_all_locks") in toks:
        pending.releases.append("named_lock")


def _use_name(statement: StatementInfo) -> str | None:
    toks = statement.tokens
    if len(toks) < 2:
        return None
    kind, text = toks[1]
    if kind == "q":
        return text
    m = re.search(r"\buse\s+([^\s;`]+)", statement.text, re.IGNORECASE)  # the name as written: case matters
    return m.group(1) if m else text


def _use_entry(schema: str) -> tuple[str, str, frozenset[str], frozenset[str]]:
    return "use", "USE `" + schema.replace("`", "``") + "`", frozenset({"schema"}), frozenset()


def _item_name(item: Assignment) -> str:
    return f"@{item.name}" if item.target == "u" else item.name


def _keys(item: Assignment) -> set[str]:
    if item.target == "u":
        return {f"@{item.name}"}
    if item.target == "names":
        return {item.name} | _CHARSET_KEYS
    if item.name == "character_set_client":
        return {"character_set_client"}
    return {item.name}


def _reads(value: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> set[str]:
    reads: set[str] = set()
    for kind, text in value:
        if kind == "u":
            reads.add(f"@{text}")
        elif kind == "v":
            reads.add(text.rpartition(".")[2])
    return reads


def _replayable(value: tuple[tuple[str, str], ...]) -> bool:
    """Whether a SET value gives the same on another backend that has the session's replayed variables."""
    for i, (kind, text) in enumerate(value):
        call = i + 1 < len(value) and value[i + 1][0] == "("
        if kind == "w":
            if text in ("select", "with", "values", "table"):
                return False  # a subquery: another server's data
            if call and text not in _DETERMINISTIC_FUNCTIONS:
                return False
        elif kind == "q" and call:
            return False  # a stored function
        elif kind == "v":
            name = text.rpartition(".")[2]
            if name in _SERVER_VARIABLES or name.startswith("gtid"):
                return False
        elif kind == "o" and text == ":=":
            return False
    return True
