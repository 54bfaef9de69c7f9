"""PostgreSQL statement classification for the readwrite endpoint: read or write, transaction and session markers."""

# Rules of this file:
#
# - A real lexer runs over the SQL text first (comments, quoted identifiers, the four kinds of string literal,
#   dollar quotes, numbers, punctuation); the rules below look at tokens only, so a keyword inside a string,
#   a comment or a quoted identifier never counts.
# - Everything that is not known to be a read is a write. When in doubt (unterminated literal, unbalanced
#   parentheses, an unknown verb, an EXECUTE of a statement the caller does not know) the answer is WRITE.
# - Transaction control other than BEGIN (COMMIT, ROLLBACK, SAVEPOINT, SET LOCAL, ...) writes nothing by itself
#   and is READ: the caller sends it to whichever backend holds the open transaction. So a self-contained
#   `BEGIN READ ONLY; SELECT ...; COMMIT` is READ as a whole.
# - Session state (SET, PREPARE, LISTEN, temporary tables, ...) is reported in `session_state`; SET, RESET and
#   DISCARD are routed to the writer (the default for anything that is not a read), and the caller replays them.
# - Cursors (FETCH, MOVE, CLOSE) are WRITE: outside a transaction only WITH HOLD cursors exist, and those are
#   declared on the writer (DECLARE ... WITH HOLD is WRITE and pins the session).
# - Pure: no I/O, no clock, never raises (a last-resort guard turns an internal bug into a WRITE).

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

__all__ = [
    "BUILTIN_WRITE_FUNCTIONS",
    "SESSION_ADVISORY_LOCK_FUNCTIONS",
    "Classification",
    "FunctionPolicy",
    "Route",
    "classify",
    "split_statements",
]


class Route(StrEnum):
    """Where a statement may run: any replica (READ) or only the writer (WRITE)."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Classification:
    """The verdict on one simple Query (one or more statements)."""

    route: Route
    reason: str  # short: "select", "for update", "writing function nextval", "hint", "unterminated ..."
    hint: str | None = None  # "writer" / "reader" when a comment hint decided the route
    # "begin" | "begin_read_only" | "commit" | "rollback" | "set_transaction_read_only" | "savepoint" | None
    transaction: str | None = None
    # "set" | "reset" | "discard" | "prepare" | "deallocate" | "listen" | "unlisten" | "temp_table"
    # | "advisory_lock" | "cursor_with_hold" | None: state the caller must replay, or that pins the session
    session_state: str | None = None
    statements: int = 1
    # the name in PREPARE name / EXECUTE name / DEALLOCATE name (as PostgreSQL folds it: lower-cased unless
    # quoted); None for DEALLOCATE ALL and for every other statement
    prepared_name: str | None = None


@dataclass(frozen=True)
class FunctionPolicy:
    """User knowledge about functions: names are lower-cased, optionally schema-qualified ("app.bump").

    A name in `write_functions` makes a query that calls it a write; a name in `read_functions` declares a
    function safe, overriding BUILTIN_WRITE_FUNCTIONS (but never `write_functions`). A bare entry matches a call
    in any schema; a qualified entry in `write_functions` also matches an unqualified call of that name (the
    search_path is unknown here, so the conservative reading wins).
    """

    read_functions: frozenset[str] = frozenset()
    write_functions: frozenset[str] = frozenset()
    _write_bare: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        reads = frozenset(n.lower() for n in self.read_functions)
        writes = frozenset(n.lower() for n in self.write_functions)
        object.__setattr__(self, "read_functions", reads)
        object.__setattr__(self, "write_functions", writes)
        object.__setattr__(self, "_write_bare", frozenset(n.rsplit(".", 1)[1] for n in writes if "." in n))

    def writes(self, schema: str | None, name: str) -> bool | None:
        """True or False when the policy decides for a call of schema.name, None when it has no opinion."""
        qualified = f"{schema}.{name}" if schema else name
        w = self.write_functions
        if qualified in w or name in w or (schema is None and name in self._write_bare):
            return True
        r = self.read_functions
        if qualified in r or name in r:
            return False
        return None


# Functions a replica cannot run, or whose effect belongs on the writer. Matched by bare name in any schema.
BUILTIN_WRITE_FUNCTIONS: frozenset[str] = frozenset({
    # sequences: nextval/setval write; currval/lastval read this session's sequence state, which lives on
    # the backend that ran nextval, i.e. the writer
    "nextval", "setval", "currval", "lastval",
    # assign a transaction id (impossible on a hot standby); the *_if_assigned variants are reads
    "txid_current", "pg_current_xact_id",
    # notifications and advisory locks (session-level ones also pin the session, see below)
    "pg_notify",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    # session configuration (reported as session_state "set")
    "set_config",
    # WAL position and control: these fail during recovery or act on the primary
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
    "pg_walfile_name", "pg_walfile_name_offset", "pg_switch_wal", "pg_create_restore_point",
    # server administration: aimed at the instance the application thinks it talks to, the writer
    "pg_reload_conf", "pg_rotate_logfile", "pg_terminate_backend", "pg_cancel_backend",
    # replication slots, origins and logical messages
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot", "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot", "pg_replication_slot_advance",
    "pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes", "pg_logical_emit_message",
    "pg_replication_origin_create", "pg_replication_origin_drop", "pg_replication_origin_advance",
    "pg_replication_origin_session_setup", "pg_replication_origin_session_reset",
    "pg_replication_origin_xact_setup", "pg_replication_origin_xact_reset",
    # large objects that create, change or remove data (lo_get, loread, lo_lseek... are reads)
    "lo_creat", "lo_create", "lo_import", "lo_export", "lo_unlink", "lo_from_bytea", "lo_put", "lo_open",
    "lowrite", "lo_truncate", "lo_truncate64",
    # index and catalog maintenance
    "brin_summarize_new_values", "brin_summarize_range", "brin_desummarize_range", "gin_clean_pending_list",
    "pg_import_system_collations",
    # server-side files (adminpack) and remote statements (dblink)
    "pg_file_write", "pg_file_rename", "pg_file_unlink", "dblink_exec",
})

# Session-level advisory locks outlive the transaction: the session is pinned to its backend.
SESSION_ADVISORY_LOCK_FUNCTIONS: frozenset[str] = frozenset({
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
})

# session_state values that pin the session to its backend (reported first in a multi-statement query)
_PINNING_STATES = frozenset({"listen", "temp_table", "advisory_lock", "cursor_with_hold"})

_MAX_DEPTH = 16  # EXPLAIN ANALYZE / PREPARE / COPY (...) / DECLARE nest statements; deeper is refused as WRITE


# ---------------------------------------------------------------------------------------------------------------
# Lexer

# Token kinds: "w" bare word (lower-cased), "q" quoted identifier (as written, "" unescaped), "s" string or
# dollar-quoted literal (text dropped), "n" number, "p" parameter ($1), "o" any other single character
# (operators), and the punctuation "(", ")", ",", ";", "." as their own kinds.
_Token = tuple[str, str]

_IDENT_START = r"A-Za-z_\u0080-\U0010FFFF"
_IDENT_CONT = r"A-Za-z0-9_\u0080-\U0010FFFF"

_LEX = re.compile(
    rf"""
    (?P<space>\s+)
  | (?P<line>--)
  | (?P<block>/\*)
  | (?P<estring>[eE]')
  | (?P<ustring>[uU]&')
  | (?P<uident>[uU]&")
  | (?P<string>')
  | (?P<ident>")
  | (?P<dollar>\$(?:[{_IDENT_START}][{_IDENT_CONT}]*)?\$)
  | (?P<param>\$[0-9]+)
  | (?P<number>[0-9][0-9A-Za-z_.]*|\.[0-9][0-9A-Za-z_.]*)
  | (?P<word>[{_IDENT_START}][{_IDENT_CONT}$]*)
  | (?P<punct>[(),;.])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_EOL = re.compile(r"[\r\n]")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_ESCAPE_STOP = re.compile(r"[\\']")
_HINT = re.compile(r"\bendpoint\s*:\s*(writer|reader)\b", re.IGNORECASE)


@dataclass
class _Statement:
    tokens: list[_Token]
    start: int  # offsets of the statement's text in the SQL, without its terminating ';'
    end: int


@dataclass
class _Lexed:
    statements: list[_Statement]
    hints: list[str]
    error: str | None = None


def _scan_doubled(sql: str, pos: int, quote: str) -> int:
    """End (after the closing quote) of a literal whose only escape is a doubled quote; -1 if unterminated."""
    while True:
        j = sql.find(quote, pos)
        if j < 0:
            return -1
        if sql.startswith(quote, j + 1):
            pos = j + 2
            continue
        return j + 1


def _scan_escaped(sql: str, pos: int) -> int:
    """End of an E'...' literal (backslash escapes and doubled quotes); -1 if unterminated."""
    while True:
        m = _ESCAPE_STOP.search(sql, pos)
        if m is None:
            return -1
        j = m.start()
        if sql[j] == "\\" or sql.startswith("'", j + 1):
            pos = j + 2
            continue
        return j + 1


def _scan_block_comment(sql: str, pos: int) -> int:
    """End of a block comment whose opener ends at pos; comments nest. -1 if unterminated."""
    depth = 1
    while True:
        m = _COMMENT_MARK.search(sql, pos)
        if m is None:
            return -1
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
        if depth == 0:
            return pos


def _is_routine(lead: list[str]) -> bool:
    """Whether a statement's first words are CREATE [OR REPLACE] FUNCTION|PROCEDURE."""
    if len(lead) >= 2 and lead[0] == "create" and lead[1] in ("function", "procedure"):
        return True
    return len(lead) >= 4 and lead[:3] == ["create", "or", "replace"] and lead[3] in ("function", "procedure")


def _lex(sql: str, standard_conforming_strings: bool) -> _Lexed:
    """Tokens per statement, the comment hints, and the first lexical error.

    A ';' ends a statement only outside parentheses (CREATE RULE ... DO (a; b)) and outside the BEGIN ... END
    body of a CREATE FUNCTION/PROCEDURE ... BEGIN ATOMIC (the same heuristic psql uses: count BEGIN, CASE and
    END at parenthesis depth 0 in such a statement). On an error the rest of the text is one last statement.
    """
    statements: list[_Statement] = []
    hints: list[str] = []
    tokens: list[_Token] = []
    start = 0
    paren = 0
    atomic = 0
    lead: list[str] = []
    pos = 0
    n = len(sql)
    error: str | None = None
    while pos < n:
        m = _LEX.match(sql, pos)
        assert m is not None  # the last alternative matches any character
        kind = m.lastgroup
        end = m.end()
        if kind == "space":
            pos = end
            continue
        if kind == "line":
            eol = _EOL.search(sql, end)
            stop = eol.start() if eol else n
            hints.extend(h.lower() for h in _HINT.findall(sql, end, stop))
            pos = stop
            continue
        if kind == "block":
            stop = _scan_block_comment(sql, end)
            if stop < 0:
                error = "unterminated comment"
                break
            hints.extend(h.lower() for h in _HINT.findall(sql, end, stop - 2))
            pos = stop
            continue
        if kind in ("string", "estring", "ustring"):
            if kind == "estring" or (kind == "string" and not standard_conforming_strings):
                stop = _scan_escaped(sql, end)
            else:
                stop = _scan_doubled(sql, end, "'")
            if stop < 0:
                error = "unterminated string literal"
                break
            tokens.append(("s", ""))
            pos = stop
            continue
        if kind in ("ident", "uident"):
            stop = _scan_doubled(sql, end, '"')
            if stop < 0:
                error = "unterminated quoted identifier"
                break
            tokens.append(("q", sql[end:stop - 1].replace('""', '"')))
            pos = stop
            continue
        if kind == "dollar":
            close = sql.find(m.group(), end)
            if close < 0:
                error = "unterminated dollar-quoted string"
                break
            tokens.append(("s", ""))
            pos = close + len(m.group())
            continue
        pos = end
        text = m.group()
        if kind == "word":
            word = text.lower()
            tokens.append(("w", word))
            if len(lead) < 4:
                lead.append(word)
            if paren == 0 and word in ("begin", "case", "end") and _is_routine(lead):
                if word == "begin" or (word == "case" and atomic > 0):
                    atomic += 1
                elif word == "end" and atomic > 0:
                    atomic -= 1
        elif kind == "punct":
            if text == ";" and paren == 0 and atomic == 0:
                if tokens:
                    statements.append(_Statement(tokens, start, m.start()))
                tokens = []
                lead = []
                start = end
                continue
            tokens.append((text, text))
            if text == "(":
                paren += 1
            elif text == ")" and paren > 0:
                paren -= 1
        elif kind == "number":
            tokens.append(("n", text))
        elif kind == "param":
            tokens.append(("p", text))
        else:
            tokens.append(("o", text))
    if error is not None:
        tokens.append(("o", ""))  # the unterminated piece is a statement of its own, even if only a comment
    if tokens:
        statements.append(_Statement(tokens, start, n))
    return _Lexed(statements, hints, error)


# ---------------------------------------------------------------------------------------------------------------
# Classification of one statement


@dataclass(frozen=True)
class _Part:
    route: Route
    reason: str
    transaction: str | None = None
    session_state: str | None = None
    prepared_name: str | None = None
    serializable: bool = False  # a BEGIN asking for SERIALIZABLE, which a hot standby refuses


@dataclass(frozen=True)
class _Context:
    functions: FunctionPolicy | None
    prepared: Mapping[str, Route]


_Handler = Callable[[list[_Token], int, _Context, int], _Part]  # a verb's classifier: (tokens, verb index, ...)


def _write(reason: str, *, transaction: str | None = None, session_state: str | None = None,
           prepared_name: str | None = None) -> _Part:
    return _Part(Route.WRITE, reason, transaction, session_state, prepared_name)


def _read(reason: str, *, transaction: str | None = None, session_state: str | None = None,
          prepared_name: str | None = None) -> _Part:
    return _Part(Route.READ, reason, transaction, session_state, prepared_name)


def _word(toks: list[_Token], i: int) -> str | None:
    """The bare word at index i, or None (out of range, or another kind of token)."""
    if 0 <= i < len(toks) and toks[i][0] == "w":
        return toks[i][1]
    return None


def _name(toks: list[_Token], i: int) -> str | None:
    """An identifier as PostgreSQL folds it: a bare word lower-cased, a quoted one as written."""
    if 0 <= i < len(toks) and toks[i][0] in ("w", "q"):
        return toks[i][1]
    return None


def _matching(toks: list[_Token], i: int) -> int:
    """Index of the ')' closing the '(' at i, or len(toks)."""
    depth = 0
    for j in range(i, len(toks)):
        kind = toks[j][0]
        if kind == "(":
            depth += 1
        elif kind == ")":
            depth -= 1
            if depth == 0:
                return j
    return len(toks)


def _balanced(toks: list[_Token]) -> bool:
    depth = 0
    for kind, _ in toks:
        if kind == "(":
            depth += 1
        elif kind == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _function_writes(ctx: _Context, schema: str | None, name: str) -> bool:
    if ctx.functions is not None:
        decided = ctx.functions.writes(schema, name)
        if decided is not None:
            return decided
    return name in BUILTIN_WRITE_FUNCTIONS


def _lock_clause(toks: list[_Token], i: int) -> str | None:
    """The locking clause starting at the word FOR at index i, if it is one."""
    nxt = _word(toks, i + 1)
    if nxt in ("update", "share"):
        return f"for {nxt}"
    if nxt == "no" and _word(toks, i + 2) == "key" and _word(toks, i + 3) == "update":
        return "for no key update"
    if nxt == "key" and _word(toks, i + 2) == "share":
        return "for key share"
    return None


def _into_is_temp(toks: list[_Token], i: int) -> bool:
    """Whether SELECT ... INTO at index i creates a temporary table."""
    j = i + 1
    if _word(toks, j) in ("global", "local"):
        j += 1
    if _word(toks, j) in ("temp", "temporary"):
        return True
    return _name(toks, j) == "pg_temp" and j + 1 < len(toks) and toks[j + 1][0] == "."


_DML = frozenset({"insert", "update", "delete", "merge"})
_QUERY_VERBS = _DML | {"select", "values", "table"}


def _data_modifying(toks: list[_Token], i: int, word: str) -> bool:
    """Whether the DML word at index i starts a data-modifying statement nested in a query."""
    nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
    if word in ("insert", "merge"):
        return nxt == ("w", "into")  # nothing else in a query has INSERT INTO / MERGE INTO
    if i == 0 or toks[i - 1][0] not in ("(", ")"):
        return False  # UPDATE and DELETE are also plain column names: only right after a parenthesis
    if word == "delete":
        return nxt == ("w", "from")
    return nxt[0] in ("w", "q")  # UPDATE [ONLY] table


def _query(toks: list[_Token], start: int, ctx: _Context) -> _Part:
    """SELECT, WITH, VALUES, TABLE (possibly parenthesized): a read unless something in it writes.

    One pass over the tokens: locking clauses at any depth, SELECT ... INTO, data-modifying statements in
    WITH (also nested, and the main statement after the CTE list), and calls of writing functions.
    """
    i = start
    while i < len(toks) and toks[i][0] == "(":
        i += 1
    verb = _word(toks, i)
    read_reason = verb if verb in ("values", "table") else "select"
    write_reason: str | None = None
    state: str | None = None
    main_found = verb != "with"
    depth = 0
    prev: _Token = ("", "")
    n = len(toks)
    for i in range(start, n):
        tok = toks[i]
        kind, text = tok
        if kind == "(":
            depth += 1
        elif kind == ")":
            depth -= 1
        elif kind == "w":
            found: str | None = None
            if (not main_found and depth == 0 and text in _QUERY_VERBS
                    and prev[0] != "," and prev not in (("w", "with"), ("w", "recursive"))):
                main_found = True  # the statement after WITH's list of common table expressions
                if text in _DML:
                    found = text
            elif text == "for":
                found = _lock_clause(toks, i)
            elif text == "into" and prev not in (("w", "insert"), ("w", "merge")):
                found = "select into"
                if _into_is_temp(toks, i):
                    state = state or "temp_table"
            elif text in _DML and _data_modifying(toks, i, text):
                found = "data-modifying cte"
            if found is not None and write_reason is None:
                write_reason = found
        if kind in ("w", "q") and i + 1 < n and toks[i + 1][0] == "(":
            name = text.lower()
            qualified = i - 2 >= start and prev[0] == "." and toks[i - 2][0] in ("w", "q")
            schema = toks[i - 2][1].lower() if qualified else None
            if _function_writes(ctx, schema, name) and write_reason is None:
                write_reason = f"writing function {name}"
            if name in SESSION_ADVISORY_LOCK_FUNCTIONS:
                state = state or "advisory_lock"
            elif name == "set_config":
                state = state or "set"
        prev = tok
    if write_reason is not None:
        return _write(write_reason, session_state=state)
    return _read(read_reason, session_state=state)


def _transaction_modes(toks: list[_Token], start: int) -> tuple[bool, bool, bool]:
    """(READ ONLY, READ WRITE, ISOLATION LEVEL SERIALIZABLE) among the transaction modes after start."""
    words = [t[1] for t in toks[start:] if t[0] == "w"]
    read_only = read_write = serializable = False
    for a, b in zip(words, words[1:], strict=False):
        if a == "read" and b == "only":
            read_only = True
        elif a == "read" and b == "write":
            read_write = True
        elif a == "level" and b == "serializable":
            serializable = True
    return read_only, read_write, serializable


def _begin(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if toks[v][1] == "start":
        if _word(toks, v + 1) != "transaction":
            return _write("start")
    read_only, read_write, serializable = _transaction_modes(toks, v + 1)
    if read_only and not read_write:
        if serializable:  # a hot standby refuses SERIALIZABLE: a read-only transaction, but on the writer
            return _write("begin serializable read only", transaction="begin")
        return _read("begin read only", transaction="begin_read_only")
    return _Part(Route.WRITE, "begin", transaction="begin", serializable=serializable)


def _commit(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "prepared":
        return _write("commit prepared")
    words = {t[1] for t in toks[v + 1:] if t[0] == "w"}
    if "chain" in words and "no" not in words:
        return _read("commit and chain", transaction="commit")
    return _read("commit", transaction="commit")


def _rollback(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "prepared":
        return _write("rollback prepared")
    if any(t == ("w", "to") for t in toks[v + 1:]):
        return _read("rollback to savepoint", transaction="savepoint")
    return _read("rollback", transaction="rollback")


def _savepoint(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _read(toks[v][1], transaction="savepoint")


def _set(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    scope = _word(toks, v + 1)
    if scope == "local":
        return _read("set local")  # transaction-scoped
    if scope == "constraints":
        return _read("set constraints")  # transaction-scoped
    if scope == "transaction":
        read_only, read_write, serializable = _transaction_modes(toks, v + 2)
        if read_write or serializable or _word(toks, v + 2) == "snapshot":
            return _write("set transaction")
        if read_only:
            return _read("set transaction read only", transaction="set_transaction_read_only")
        return _read("set transaction")
    if scope == "session" and _word(toks, v + 2) == "characteristics":
        return _write("set session characteristics", session_state="set")
    return _write("set", session_state="set")


def _create(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    i = v + 1
    if _word(toks, i) == "or" and _word(toks, i + 1) == "replace":
        i += 2
    if _word(toks, i) in ("global", "local"):
        i += 1
    temp = _word(toks, i) in ("temp", "temporary")
    if not temp:  # CREATE TABLE pg_temp.name
        temp = any(toks[j] == ("w", "pg_temp") and toks[j + 1][0] == "." for j in range(v + 1, len(toks) - 1))
    return _write("create", session_state="temp_table" if temp else None)


def _copy(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    i = v + 1
    if _word(toks, i) == "binary":  # pre-7.3 syntax, still accepted
        i += 1
    inner: _Part | None = None
    if i < len(toks) and toks[i][0] == "(":
        close = _matching(toks, i)
        inner = _statement(toks[i + 1:close], ctx, depth + 1)
        i = close + 1
    else:
        while i < len(toks) and (toks[i][0] in ("q", ".") or (toks[i][0] == "w" and toks[i][1] not in ("from", "to"))):
            i += 1
        if i < len(toks) and toks[i][0] == "(":
            i = _matching(toks, i) + 1
    direction = _word(toks, i)
    if direction == "from":
        return _write("copy from")
    if direction != "to":
        return _write("copy")
    if inner is not None and inner.route is Route.WRITE:
        return replace(inner, reason=f"copy {inner.reason}")
    return _read("copy to", session_state=inner.session_state if inner else None)


def _explain(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    i = v + 1
    analyze = False
    if i < len(toks) and toks[i][0] == "(":
        close = _matching(toks, i)
        option: list[_Token] = []
        for tok in [*toks[i + 1:close], (",", ",")]:
            if tok[0] != ",":
                option.append(tok)
                continue
            if option and option[0][0] == "w" and option[0][1] in ("analyze", "analyse"):
                value = option[1][1].lower() if len(option) == 2 else ""
                analyze = value not in ("false", "off", "no", "n", "f", "0")
            option = []
        i = close + 1
    else:
        while _word(toks, i) in ("analyze", "analyse", "verbose"):
            analyze = analyze or _word(toks, i) != "verbose"
            i += 1
    inner_toks = toks[i:]
    if not analyze:
        if _word(inner_toks, 0) == "execute":  # plans a prepared statement: it must exist where this runs
            part = _execute(inner_toks, 0, ctx, depth + 1)
            return replace(part, reason="explain execute", prepared_name=None)
        return _read("explain")
    part = _statement(inner_toks, ctx, depth + 1)
    return replace(part, reason=f"explain analyze {part.reason}", transaction=None, prepared_name=None)


def _prepare(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "transaction" and v + 2 < len(toks) and toks[v + 2][0] == "s":
        return _write("prepare transaction")
    name = _name(toks, v + 1)
    i = v + 2
    if i < len(toks) and toks[i][0] == "(":  # parameter types
        i = _matching(toks, i) + 1
    if _word(toks, i) != "as":
        return _write("prepare", session_state="prepare", prepared_name=name)
    inner = _statement(toks[i + 1:], ctx, depth + 1)
    return _Part(inner.route, f"prepare {inner.reason}", session_state="prepare", prepared_name=name)


def _execute(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    name = _name(toks, v + 1)
    known = ctx.prepared.get(name) if name is not None else None
    if known is None:
        return _write("execute unknown prepared statement", prepared_name=name)
    if known is Route.WRITE:
        return _write("execute", prepared_name=name)
    args = _query(toks, v + 2, ctx)  # the arguments may call writing functions
    if args.route is Route.WRITE:
        return _write(args.reason, prepared_name=name)
    return _read("execute", prepared_name=name)


def _deallocate(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    i = v + 2 if _word(toks, v + 1) == "prepare" else v + 1
    name = None if _word(toks, i) == "all" else _name(toks, i)
    return _write("deallocate", session_state="deallocate", prepared_name=name)


def _declare(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    # DECLARE name [BINARY] [ASENSITIVE | INSENSITIVE] [[NO] SCROLL] CURSOR [{WITH | WITHOUT} HOLD] FOR query
    i = v + 2  # the name may itself be the word "cursor"
    while i < len(toks) and toks[i] != ("w", "cursor"):
        i += 1
    i += 1
    hold = _word(toks, i) == "with" and _word(toks, i + 1) == "hold"
    while i < len(toks) and toks[i] != ("w", "for"):
        i += 1
    if hold:  # outlives the transaction; FETCH/MOVE/CLOSE are WRITE, so declare it on the writer too
        return _write("declare with hold", session_state="cursor_with_hold")
    inner = _statement(toks[i + 1:], ctx, depth + 1)
    return replace(inner, reason=f"declare {inner.reason}", transaction=None, prepared_name=None)


def _dml(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    scanned = _query(toks, v, ctx)  # only for the session state of functions it calls
    return _write(toks[v][1], session_state=scanned.session_state)


def _query_verb(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _query(toks, 0, ctx)


def _show(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _read("show")


def _state_verb(state: str) -> _Handler:
    def handler(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
        return _write(toks[v][1], session_state=state)
    return handler

_VERBS: dict[str, _Handler] = {
    "select": _query_verb, "with": _query_verb, "values": _query_verb, "table": _query_verb,
    "show": _show, "explain": _explain,
    "insert": _dml, "update": _dml, "delete": _dml, "merge": _dml,
    "copy": _copy, "create": _create, "declare": _declare,
    "prepare": _prepare, "execute": _execute, "deallocate": _deallocate,
    "begin": _begin, "start": _begin,
    "commit": _commit, "end": _commit, "rollback": _rollback, "abort": _rollback,
    "savepoint": _savepoint, "release": _savepoint,
    "set": _set, "reset": _state_verb("reset"), "discard": _state_verb("discard"),
    "listen": _state_verb("listen"), "unlisten": _state_verb("unlisten"),
}


def _statement(toks: list[_Token], ctx: _Context, depth: int) -> _Part:
    """Classify one statement's tokens."""
    if depth > _MAX_DEPTH:
        return _write("nested too deeply")
    if not toks:
        return _write("incomplete statement")
    if not _balanced(toks):
        return _write("unbalanced parentheses")
    v = 0
    while v < len(toks) and toks[v][0] == "(":
        v += 1
    verb = _word(toks, v)
    if verb is None:
        return _write("unknown")
    if v > 0:  # (SELECT ...) UNION (SELECT ...), ((VALUES (1)))
        return _query(toks, 0, ctx) if verb in ("select", "values", "table", "with") else _write(verb)
    handler = _VERBS.get(verb)
    if handler is None:
        return _write(verb)  # ALTER, DROP, TRUNCATE, GRANT, VACUUM, ANALYZE, LOCK, DO, CALL, FETCH, NOTIFY, ...
    return handler(toks, v, ctx, depth)


# ---------------------------------------------------------------------------------------------------------------
# A whole simple Query


def _combine(parts: list[_Part]) -> tuple[list[_Part], str | None]:
    """The parts (a BEGIN followed by SET TRANSACTION READ ONLY becomes a read-only BEGIN) and the query's
    transaction marker.

    The marker says what the query leaves behind: a BEGIN not closed in the same query is reported ("begin"
    or "begin_read_only"); a BEGIN ... COMMIT pair inside the query is self-contained and reports nothing;
    a COMMIT/ROLLBACK that closes a transaction opened before this query is reported; SAVEPOINT and
    SET TRANSACTION READ ONLY are reported only when nothing else is.
    """
    parts = list(parts)
    open_idx: int | None = None
    saw_begin = False
    closed: str | None = None
    other: str | None = None
    for idx, part in enumerate(parts):
        marker = part.transaction
        if marker in ("begin", "begin_read_only"):
            open_idx = idx
            saw_begin = True
        elif marker in ("commit", "rollback"):
            if open_idx is None:
                closed = marker
            open_idx = None
        elif marker == "set_transaction_read_only" and open_idx is not None:
            began = parts[open_idx]
            if began.transaction == "begin" and not began.serializable:
                parts[open_idx] = replace(began, route=Route.READ, reason="begin read only",
                                          transaction="begin_read_only")
        elif marker is not None and not saw_begin and other is None:
            other = marker
    if open_idx is not None:
        return parts, parts[open_idx].transaction
    return parts, closed or other


def _classify(sql: str, functions: FunctionPolicy | None, prepared: Mapping[str, Route] | None,
              standard_conforming_strings: bool) -> Classification:
    lexed = _lex(sql, standard_conforming_strings)
    count = len(lexed.statements)
    if lexed.error is not None:
        return Classification(Route.WRITE, lexed.error, statements=count)
    hint = "writer" if "writer" in lexed.hints else ("reader" if lexed.hints else None)
    if count == 0:
        route = Route.READ if hint != "writer" else Route.WRITE
        return Classification(route, "hint" if hint else "empty", hint=hint, statements=0)
    ctx = _Context(functions, prepared if prepared is not None else {})
    parts, transaction = _combine([_statement(s.tokens, ctx, 0) for s in lexed.statements])
    writes = [p for p in parts if p.route is Route.WRITE]
    route = Route.WRITE if writes else Route.READ
    reason = (writes or parts)[0].reason
    states = [p.session_state for p in parts if p.session_state is not None]
    pinning = [s for s in states if s in _PINNING_STATES]
    session_state = (pinning or states)[0] if states else None
    prepared_name = next((p.prepared_name for p in parts if p.prepared_name is not None), None)
    if hint is not None:
        route = Route.WRITE if hint == "writer" else Route.READ
        reason = "hint"
    return Classification(route, reason, hint=hint, transaction=transaction, session_state=session_state,
                          statements=count, prepared_name=prepared_name)


def classify(sql: str, functions: FunctionPolicy | None = None, prepared: Mapping[str, Route] | None = None, *,
             standard_conforming_strings: bool = True) -> Classification:
    """Classify the text of one simple Query (any number of statements) for the readwrite endpoint.

    `prepared` maps SQL-level prepared statement names (as `Classification.prepared_name` reports them) to the
    route their PREPARE had; EXECUTE of a name not in it is WRITE. `standard_conforming_strings` is the
    session's setting (ParameterStatus): when off, backslash escapes in ordinary '...' literals too.

    Hints in comments (`/* endpoint: writer */`, `-- endpoint: reader`) anywhere in the query decide the
    route of the whole query (it goes to one backend); a writer hint wins over a reader hint. A query that
    does not lex (unterminated literal or comment) is WRITE and ignores hints. For per-statement detail
    (several SET values to replay, say) classify each of `split_statements(sql)`.
    """
    try:
        return _classify(sql, functions, prepared, standard_conforming_strings)
    except Exception:  # a bug here must not break a session: send the query to the writer
        return Classification(Route.WRITE, "classifier error")


def split_statements(sql: str, *, standard_conforming_strings: bool = True) -> list[str]:
    """The statements of a simple Query, split on top-level ';' by the lexer; empty statements are dropped.

    Each statement keeps its comments and loses its terminating ';' and surrounding whitespace. When the
    text does not lex, the unterminated rest is the last statement.
    """
    lexed = _lex(sql, standard_conforming_strings)
    return [sql[s.start:s.end].strip() for s in lexed.statements]
