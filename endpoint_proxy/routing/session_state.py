"""What a PostgreSQL client session has set up on its backend, so it can be rebuilt on another one.

Rules of this file: pure bookkeeping fed the client's messages as the relay sees them, acting on the one
list of session state (session_kinds.PG_STATE_KINDS): REPLAYED kinds are kept as SQL text in order
(`set_statements`, `sql_prepared`) or as Parse messages (`parse_messages`), PINNED kinds set `pinned_by`
(sticky). Statements are read by pg_classify's lexer with the session's dialect (ParameterStatus
standard_conforming_strings and client_encoding, fed through `on_parameter`). SET, RESET and set_config run
inside a transaction only count once it commits. Startup parameters are the caller's; they go into every
new backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .dialect import PgDialect
from .pg_classify import StatementInfo, analyze
from .session_kinds import PG_PINNING_STATES, label_of

__all__ = ["SessionState", "ends_transaction", "is_rollback"]

# Statement heads that may change session state, and words anywhere in a query that may: a light check on the
# hot path (false positives only cost a full read). SET LOCAL and SET TRANSACTION are sorted out by the lexer.
_LEADING_NOISE = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)
_WORDS = re.compile(r"[A-Za-z_]+")

_STATEFUL_HEADS = ("set", "reset", "discard", "prepare", "deallocate", "listen", "create", "declare", "do", "load",
                   "unlisten", "close", "/*", "--", "(")
# Anywhere in a statement (lower-cased): advisory locks, set_config, setseed, pg_settings, dblink_connect,
# replication origin sessions, temporary tables (SELECT INTO TEMP, pg_temp), U& identifiers (a function name
# may hide behind escapes). Substring tests: much cheaper than a regular expression on the hot path.
_STATEFUL_WORDS = ("advisory", "config", "seed", "settings", "connect", "origin", "temp", "&")
_ANY_STATEFUL = re.compile(r"\b(?:set|reset|discard|prepare|deallocate|listen|create|declare|do|load)\b|"
                           + "|".join(_STATEFUL_WORDS), re.I)


def _maybe_stateful(text: str) -> bool:
    """Whether one statement's text may set up session state (a light check: false positives only cost a full
    read). Written out for speed: it runs on every query."""
    t = text.lower()
    return (t[:16].lstrip().startswith(_STATEFUL_HEADS) or "advisory" in t or "config" in t or "seed" in t
            or "settings" in t or "connect" in t or "origin" in t or "temp" in t or "&" in t)


def _single(text: str) -> bool:
    """Whether a text holds at most one statement: no ';', or only its own at the end."""
    semicolon = text.find(";")
    return semicolon < 0 or not text[semicolon + 1:].strip(" \t\r\n\0")

# Past this many SET statements, superseded ones are dropped (and backends rebuilt); past the cap the session
# is pinned rather than replay without end.
_COMPACT_AT = 64
_MAX_SET_STATEMENTS = 1000
# SET targets whose order against other SETs matters (who may set what): never dropped as superseded
_KEEP_ALWAYS = frozenset({"role", "session_authorization"})


def _head_words(sql: str, n: int = 4) -> list[str]:
    rest = sql[_LEADING_NOISE.match(sql).end():]  # type: ignore[union-attr]
    return [w.lower() for w in _WORDS.findall(rest[:200])[:n]]


_SET_NAME = re.compile(r"(?:set|reset)\s+(?:session\s+)?([a-z_][a-z0-9_$]*(?:\s*\.\s*[a-z_][a-z0-9_$]*)?)"
                       r"\s*(?:=|to\b|;|\Z)", re.IGNORECASE)
_SET_CONFIG_NAME = re.compile(r"SELECT pg_catalog\.set_config\('([A-Za-z0-9_.]+)', ")


def _set_target(statement: StatementInfo) -> str | None:
    """The setting a SET/RESET/set_config statement changes, when it is one that a later one supersedes."""
    if statement.replay:
        m = _SET_CONFIG_NAME.match(statement.replay[0]) if len(statement.replay) == 1 else None
        return m.group(1).lower() if m else None
    words = list(statement.words[1:])
    if words[:1] == ["session"]:
        words = words[1:]
    if words[:2] == ["time", "zone"]:
        return "timezone"
    if words[:1] == ["names"]:
        return "client_encoding"
    if words[:1] == ["schema"]:
        return "search_path"
    if words[:1] in (["role"], ["authorization"], ["characteristics"], ["all"]):
        return None  # who may set what, or several settings at once: kept where they are
    text = statement.text[_LEADING_NOISE.match(statement.text).end():]  # type: ignore[union-attr]
    m = _SET_NAME.match(text)
    return re.sub(r"\s+", "", m.group(1)).lower() if m else None


@dataclass(slots=True)
class SessionState:
    set_statements: list[str] = field(default_factory=list)
    sql_prepared: dict[str, str] = field(default_factory=dict)
    parse_messages: dict[str, bytes] = field(default_factory=dict)  # statement name -> raw Parse
    pinned_by: str | None = None  # the label of the first pinning state still there (session_kinds), or None
    pinned_detail: str | None = None  # what exactly pinned it, in words
    # Every pinning state still there, by key (session_kinds), with its detail. A pin ends when its state
    # is gone: UNLISTEN *, DISCARD TEMP, pg_advisory_unlock_all(), CLOSE ALL, DISCARD ALL.
    pins: dict[str, str | None] = field(default_factory=dict)
    # Bumped when SET values or prepared statements are wiped or compacted (RESET ALL, DISCARD ALL, DEALLOCATE
    # ALL, superseded SETs dropped): a backend that saw an older version must be rebuilt from scratch.
    version: int = 0
    # Bumped at every change of SET values or SQL prepared statements (a pooled connection that got the
    # session's state at an older count must be brought up to date); DISCARD ALL / DEALLOCATE ALL bump
    # ``statements_dropped`` (they drop every prepared statement of the server connection, any name).
    changes: int = 0
    statements_dropped: int = 0
    # SET/RESET/set_config run inside a transaction only last if it commits: they wait here until its end.
    staged: list[tuple[str, str]] = field(default_factory=list)  # (kind, statement)
    dialect: PgDialect = field(default_factory=PgDialect)
    _set_targets: list[str | None] = field(default_factory=list, repr=False)
    _staged_targets: list[str | None] = field(default_factory=list, repr=False)

    @property
    def replayable(self) -> bool:
        return self.pinned_by is None

    def on_parameter(self, name: str, value: str) -> None:
        """A ParameterStatus from the server: standard_conforming_strings and client_encoding change how the
        session's SQL is lexed."""
        self.dialect = self.dialect.with_parameter(name, value)

    def on_query_bytes(self, payload: bytes, status: str = "I") -> None:
        """A Query message's payload (text and its NUL): decoded only when it may matter.
        ``status`` is the session's transaction status (I, T, E) when it was sent."""
        if self.staged or status != "I":
            self.on_query(payload.rstrip(b"\0").decode("utf-8", "surrogateescape"), status)
            return
        glance = payload.decode("latin-1")  # only ASCII matters to the check: cheaper than UTF-8
        if _maybe_stateful(glance) or not _single(glance):
            self._read(payload.rstrip(b"\0").decode("utf-8", "surrogateescape"), "I")

    def on_query(self, sql: str, status: str = "I") -> None:
        """A simple-protocol Query (possibly several statements) the client sent, with the
        session's transaction status (I, T, E) when it was sent."""
        if self.staged and status == "I":
            self._end_transaction(committed=True)  # it ended some other way (extended protocol)
        # The hot path: most statements are plain DML or SELECT; a glance decides (and for the rare
        # multi-statement query, the full read).
        if status != "I" or _maybe_stateful(sql) or not _single(sql):
            self._read(sql, status)

    def _read(self, sql: str, status: str) -> None:
        analysis = analyze(sql, dialect=self.dialect)
        if analysis.uncertain:
            self._uncertain(sql, analysis.states, analysis.problem or "")
            return
        if analysis.problem is not None:
            return  # it does not lex: the server rejects the whole query, and nothing of it runs
        for statement in analysis.statements:
            self._on_statement(statement, status)

    def on_parse(self, name: str, raw_message: bytes, *, query: str | None = None, status: str = "I",
                 keep: bool = True) -> None:
        """A Parse message: `raw_message` is the whole message (kept for replay when the statement is named)
        or its payload; `query` its text when the caller has it decoded. A named statement that changes session
        state pins the session (its Executes are not seen); an unnamed one counts as run right away.
        ``keep`` False: the statement is not kept for replay (transaction pooling keeps its own record)."""
        if name and keep:
            self.parse_messages[name] = raw_message
        if query is None:
            query = _parse_query(raw_message)
        if not _maybe_stateful(query):
            return
        analysis = analyze(query, dialect=self.dialect)
        if analysis.uncertain:
            self._uncertain(query, analysis.states, analysis.problem or "")
            return
        if analysis.problem is not None:
            return  # it does not lex: the server refuses it
        for statement in analysis.statements:
            state = statement.session_state
            if name and state is not None and state not in PG_PINNING_STATES:
                self._pin("parse_state", f"the named prepared statement {name!r} sets up "
                                         f"{label_of('postgresql', state)}")
                continue
            self._on_statement(statement, status)

    def on_close_statement(self, name: str) -> None:
        self.parse_messages.pop(name, None)

    def replay_sql(self) -> list[str]:
        """Statements to run, in order, on a fresh backend before the client's next request."""
        return [*self.set_statements, *self.sql_prepared.values()]

    def settings(self) -> list[tuple[str | None, str]]:
        """The SET, RESET and set_config statements to replay, each with the setting it changes (None:
        a statement that is not about one setting, as SET ROLE)."""
        return list(zip(self._set_targets, self.set_statements, strict=True))

    # --- internals

    def pin(self, key: str, detail: str | None = None) -> None:
        """State that cannot be replayed elsewhere is on the session's server now."""
        self.pins.setdefault(key, detail)
        if self.pinned_by is None:
            self.pinned_by = label_of("postgresql", key)
            self.pinned_detail = detail

    _pin = pin

    def _unpin(self, *keys: str) -> None:
        for key in keys or tuple(self.pins):
            self.pins.pop(key, None)
        first = next(iter(self.pins), None)
        self.pinned_by = label_of("postgresql", first) if first is not None else None
        self.pinned_detail = self.pins[first] if first is not None else None

    def _uncertain(self, sql: str, states: frozenset[str], problem: str) -> None:
        """A query that cannot be read for sure (an unknown dialect, a multibyte encoding): if it may set
        anything up, nothing is known of the session any more."""
        if states or _ANY_STATEFUL.search(sql):
            self._pin("uncertain", problem)

    def _end_transaction(self, *, committed: bool) -> None:
        staged, self.staged = self.staged, []
        targets, self._staged_targets = self._staged_targets, []
        if not committed:
            return
        for (kind, sql), target in zip(staged, targets, strict=True):
            if kind == "reset all":
                self._clear_sets()
            else:
                self._append_set(sql, target)

    def _clear_sets(self) -> None:
        self.set_statements.clear()
        self._set_targets.clear()
        self.version += 1
        self.changes += 1

    def _append_set(self, sql: str, target: str | None) -> None:
        self.set_statements.append(sql)
        self._set_targets.append(target)
        self.changes += 1
        if len(self.set_statements) > _COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        """Drop SET statements a later one supersedes; past the cap, pin instead of growing further."""
        last: dict[str, int] = {}
        for i, target in enumerate(self._set_targets):
            if target is not None and target not in _KEEP_ALWAYS:
                last[target] = i
        keep = [i for i, target in enumerate(self._set_targets)
                if target is None or target in _KEEP_ALWAYS or last[target] == i]
        if len(keep) < len(self.set_statements):
            self.set_statements[:] = [self.set_statements[i] for i in keep]
            self._set_targets[:] = [self._set_targets[i] for i in keep]
            self.version += 1
        if len(self.set_statements) > _MAX_SET_STATEMENTS:
            self._pin("replay_limit", f"more than {_MAX_SET_STATEMENTS} SET statements to replay")

    def _stage_or_apply(self, kind: str, sql: str, status: str, target: str | None) -> None:
        if status != "I":
            self.staged.append((kind, sql))
            self._staged_targets.append(target)
        elif kind == "reset all":
            self._clear_sets()
        else:
            self._append_set(sql, target)

    def _on_statement(self, statement: StatementInfo, status: str = "I") -> None:
        words = statement.words
        head = words[0] if words else ""
        if status != "I" and head in ("commit", "end", "rollback", "abort"):
            if words[1:2] != ("to",) and words[1:2] != ("prepared",):
                # COMMIT of a failed transaction rolls it back, as PostgreSQL does.
                self._end_transaction(committed=head in ("commit", "end") and status == "T")
            return
        if self.pins and status != "E":
            self._release_pins(statement, status)
        state = statement.session_state
        if state is None or status == "E":  # a failed transaction runs nothing until it ends
            return
        if state in PG_PINNING_STATES:
            self._pin(state, statement.detail)
        elif state in ("set", "load"):
            self._stage_or_apply(state, statement.text, "I" if state == "load" else status, _set_target(statement))
        elif state == "set_config":
            for replay in statement.replay:
                single = StatementInfo(replay, statement.route, statement.reason, replay=(replay,))
                self._stage_or_apply("set", replay, status, _set_target(single))
        elif state == "reset":
            all_ = words[1:2] == ("all",)
            self._stage_or_apply("reset all" if all_ else "set", statement.text, status,
                                 None if all_ else _set_target(statement))
        elif state == "discard":
            if words[1:2] == ("all",):
                self._clear_sets()
                self.sql_prepared.clear()
                self.parse_messages.clear()
                self.statements_dropped += 1
        elif state == "prepare" and statement.prepared_name is not None:
            self.sql_prepared[statement.prepared_name] = statement.text
            self.changes += 1
        elif state == "deallocate":
            if statement.prepared_name is None:  # DEALLOCATE ALL
                self.sql_prepared.clear()
                self.parse_messages.clear()
                self.version += 1
                self.statements_dropped += 1
            else:
                self.sql_prepared.pop(statement.prepared_name, None)
            self.changes += 1


    def _release_pins(self, statement: StatementInfo, status: str) -> None:
        """A statement that makes pinning state go away. LISTEN/UNLISTEN and DISCARD take effect only
        outside a transaction block (or at its commit): inside one, the pin stays (the safe side)."""
        words = statement.words
        head = words[0] if words else ""
        if head == "discard" and status == "I":
            if words[1:2] == ("all",):
                self._unpin()
            elif words[1:2] in (("temp",), ("temporary",)):
                self._unpin("temp_table")
        elif head == "unlisten" and status == "I" and statement.text.rstrip(" \t\r\n;").endswith("*"):
            self._unpin("listen")
        elif head == "close" and words[1:2] == ("all",):
            self._unpin("cursor_with_hold")
        elif head == "select" and "pg_advisory_unlock_all" in words:
            self._unpin("advisory_lock")


def _parse_query(raw: bytes) -> str:
    """The query text of a Parse message, given whole (type byte and length) or as its payload."""
    if raw[:1] == b"P" and len(raw) >= 5 and int.from_bytes(raw[1:5], "big") == len(raw) - 1:
        raw = raw[5:]
    _name, _, rest = raw.partition(b"\0")
    return rest[: rest.find(b"\0")].decode("utf-8", "surrogateescape") if b"\0" in rest else ""


def is_rollback(sql: str) -> bool:
    """True for ROLLBACK / ABORT (not ROLLBACK TO SAVEPOINT, not ROLLBACK PREPARED)."""
    words = _head_words(sql, 3)
    if not words or words[0] not in ("rollback", "abort"):
        return False
    return not (len(words) > 1 and words[1] in ("to", "prepared"))


def ends_transaction(sql: str) -> bool:
    words = _head_words(sql, 2)
    return bool(words) and words[0] in ("commit", "end", "rollback", "abort") and not (
        len(words) > 1 and words[1] in ("to", "prepared"))
