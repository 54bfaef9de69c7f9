"""PostgreSQL statement classification for the readwrite endpoint: read or write, transaction and session markers."""

# Rules of this file:
#
# - A real lexer runs over the SQL text first, the way the server's does (comments, nested block comments,
#   quoted identifiers with U& escapes, the kinds of string literal with their continuation across a newline,
#   dollar quotes, numbers, punctuation); the rules below look at tokens only, so a keyword inside a string, a
#   comment or a quoted identifier never counts.
# - The lexer depends on the session (PgDialect): with standard_conforming_strings off a backslash escapes in
#   '...' too. When that setting is unknown and the text holds a backslash, the query is read both ways and is
#   WRITE unless both readings agree. In a client-only multibyte encoding (SJIS, GBK, Big5, ...) a backslash
#   right after a non-ASCII character may be half of that character: WRITE.
# - Everything that is not known to be a read is a write. When in doubt (unterminated literal, unbalanced
#   parentheses, an unknown verb, an EXECUTE of a statement the caller does not know) the answer is WRITE.
# - Transaction control other than BEGIN (COMMIT, ROLLBACK, SAVEPOINT, SET LOCAL, ...) writes nothing by itself
#   and is READ: the caller sends it to whichever backend holds the open transaction. So a self-contained
#   `BEGIN READ ONLY; SELECT ...; COMMIT` is READ as a whole.
# - Session state is reported in `session_state` with the keys of session_kinds.PG_STATE_KINDS. A state that
#   pins the session makes its statement WRITE whatever the FunctionPolicy says (the pinned backend is the
#   writer). SET, RESET, DISCARD and set_config(..., false) go to the writer (the default for anything that is
#   not a read), and the caller replays them; `analyze` gives what to replay per statement.
# - Cursors (FETCH, MOVE, CLOSE) are WRITE: outside a transaction only WITH HOLD cursors exist, and those are
#   declared on the writer (DECLARE ... WITH HOLD is WRITE and pins the session).
# - Pure: no I/O, no clock, never raises (a last-resort guard turns an internal bug into a WRITE).

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from .dialect import PgDialect
from .session_kinds import PG_PINNING_STATES

__all__ = [
    "BUILTIN_WRITE_FUNCTIONS",
    "PINNING_STATES",
    "SESSION_ADVISORY_LOCK_FUNCTIONS",
    "Analysis",
    "Classification",
    "FunctionPolicy",
    "PgDialect",
    "Route",
    "StatementInfo",
    "analyze",
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
    # a key of session_kinds (PG_STATE_KINDS / MY_STATE_KINDS): state the caller must replay, or that pins the
    # session (a pinning one is reported first in a multi-statement query); None: no session state
    session_state: str | None = None
    statements: int = 1
    # the name in PREPARE name / EXECUTE name / DEALLOCATE name (as PostgreSQL folds it: lower-cased unless
    # quoted); None for DEALLOCATE ALL and for every other statement
    prepared_name: str | None = None


@dataclass(frozen=True)
class FunctionPolicy:
    """User knowledge about functions: names are lower-cased, optionally schema-qualified ("app.bump").

    A name in `write_functions` makes a query that calls it a write; a name in `read_functions` declares a
    function safe, overriding BUILTIN_WRITE_FUNCTIONS (but never `write_functions`, and never a function that
    pins the session). A bare entry matches a call in any schema; a qualified entry in `write_functions` also
    matches an unqualified call of that name (the search_path is unknown here, so the conservative reading wins).
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
    # session configuration: set_config(..., false) is replayed like SET (set_config(..., true) is a read)
    "set_config",
    # session state that cannot be copied (pins the session, see _PINNING_FUNCTIONS)
    "setseed", "dblink_connect", "dblink_connect_u",
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

# Functions whose effect stays in the session that ran them, with the state kind they pin the session with.
_PINNING_FUNCTIONS: dict[str, str] = {
    **dict.fromkeys(SESSION_ADVISORY_LOCK_FUNCTIONS, "advisory_lock"),
    "setseed": "setseed",
    "dblink_connect": "dblink_connection", "dblink_connect_u": "dblink_connection",
    "pg_replication_origin_session_setup": "replication_origin",
}

# session_state values that pin the session to its backend (reported first in a multi-statement query)
PINNING_STATES: frozenset[str] = PG_PINNING_STATES

_MAX_DEPTH = 16  # EXPLAIN ANALYZE / PREPARE / COPY (...) / DECLARE nest statements; deeper is refused as WRITE


# ---------------------------------------------------------------------------------------------------------------
# Lexer

# Token kinds: "w" bare word (lower-cased), "q" quoted identifier (its name: "" unescaped, U& escapes decoded),
# "s" string or dollar-quoted literal (its source text, prefix and quotes included; continued pieces included),
# "n" number, "p" parameter ($1), "o" any other single character (operators), and the punctuation
# "(", ")", ",", ";", "." as their own kinds.
_Token = tuple[str, str]

_IDENT_START = r"A-Za-z_\u0080-\U0010FFFF"
_IDENT_CONT = r"A-Za-z0-9_\u0080-\U0010FFFF"
_SPACE = r" \t\n\r\f\v"

_LEX = re.compile(
    rf"""
    (?P<space>[{_SPACE}]+)
  | (?P<word>(?![eEbBxXnN]'|[uU]&['"])[{_IDENT_START}][{_IDENT_CONT}$]*)
  | (?P<line>--)
  | (?P<block>/\*)
  | (?P<estring>[eE]')
  | (?P<bstring>[bBxX]')
  | (?P<ustring>[uU]&')
  | (?P<uident>[uU]&")
  | (?P<string>[nN]?')
  | (?P<ident>")
  | (?P<dollar>\$(?:[{_IDENT_START}][{_IDENT_CONT}]*)?\$)
  | (?P<param>\$[0-9]+)
  | (?P<number>[0-9][0-9A-Za-z_.]*|\.[0-9][0-9A-Za-z_.]*)
  | (?P<punct>[(),;.])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_EOL = re.compile(r"[\r\n]")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_ESCAPE_STOP = re.compile(r"[\\']")
_HINT = re.compile(r"\bendpoint\s*:\s*(writer|reader)\b", re.IGNORECASE)
# Between two pieces of one string literal: horizontal space or -- comments, a newline, then more space or
# comments each ending in a newline (scan.l's whitespace_with_newline); only then does a quote continue it.
_CONTINUATION = re.compile(r"(?:[ \t\f]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f\v]+|--[^\n\r]*[\n\r])*")
_UESCAPE = re.compile(rf"[{_SPACE}]*[uU][eE][sS][cC][aA][pP][eE][{_SPACE}]*'([^'])'")
_MULTIBYTE_BACKSLASH = re.compile(r"[^\x00-\x7f]\\")


@dataclass(slots=True)
class _Statement:
    tokens: list[_Token]
    start: int  # offsets of the statement's text in the SQL, without its terminating ';'
    end: int


@dataclass(slots=True)
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


def _scan_bits(sql: str, pos: int) -> int:
    """End of a B'...' or X'...' literal: no escapes at all, the first quote ends it; -1 if unterminated."""
    j = sql.find("'", pos)
    return j + 1 if j >= 0 else -1


def _scan_piece(sql: str, pos: int, style: str) -> int:
    if style == "e":
        return _scan_escaped(sql, pos)
    if style == "b":
        return _scan_bits(sql, pos)
    return _scan_doubled(sql, pos, "'")


def _scan_literal(sql: str, pos: int, style: str) -> int:
    """End of a string literal whose first piece starts at pos (after its opening quote), continuation pieces
    (a quote after whitespace holding a newline) included, each lexed like the first; -1 if unterminated."""
    n = len(sql)
    while True:
        stop = _scan_piece(sql, pos, style)
        if stop < 0:
            return -1
        gap = _CONTINUATION.match(sql, stop)
        if gap is None or gap.end() >= n or sql[gap.end()] != "'":
            return stop
        pos = gap.end() + 1


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


def _unicode_escapes(body: str, escape: str) -> str | None:
    """The text of a U&"..." body: `<escape>XXXX`, `<escape>+XXXXXX`, a doubled escape; None if malformed."""
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c != escape:
            out.append(c)
            i += 1
            continue
        if body.startswith(escape, i + 1):
            out.append(escape)
            i += 2
            continue
        plus = body.startswith("+", i + 1)
        digits = body[i + 2:i + 8] if plus else body[i + 1:i + 5]
        if len(digits) != (6 if plus else 4) or any(d not in "0123456789abcdefABCDEF" for d in digits):
            return None
        code = int(digits, 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            return None  # a surrogate pair written as two escapes: rare, and not needed to find a name
        out.append(chr(code))
        i += 8 if plus else 5
    return "".join(out)


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
    append = tokens.append
    start = 0
    paren = 0
    atomic = 0
    lead: list[str] = []
    pos = 0
    n = len(sql)
    error: str | None = None
    plain = "s" if standard_conforming_strings else "e"
    unicode_token = -1  # index of the last U& literal or identifier in tokens
    match = _LEX.match
    while pos < n:
        m = match(sql, pos)
        assert m is not None  # the last alternative matches any character
        kind = m.lastgroup
        end = m.end()
        if kind == "space":
            pos = end
            continue
        if kind == "word":
            pos = end
            word = m.group().lower()
            append(("w", word))
            if len(lead) < 4:
                lead.append(word)
            if paren == 0 and word in ("begin", "case", "end") and _is_routine(lead):
                if word == "begin" or (word == "case" and atomic > 0):
                    atomic += 1
                elif word == "end" and atomic > 0:
                    atomic -= 1
            elif word == "uescape" and unicode_token == len(tokens) - 2:
                error = "UESCAPE not right after its literal"  # only whitespace is understood in between
                break
            continue
        if kind == "punct":
            pos = end
            text = m.group()
            if text == ";" and paren == 0 and atomic == 0:
                if tokens:
                    statements.append(_Statement(tokens, start, m.start()))
                tokens = []
                append = tokens.append
                lead = []
                start = end
                continue
            append((text, text))
            if text == "(":
                paren += 1
            elif text == ")" and paren > 0:
                paren -= 1
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
        if kind in ("string", "estring", "bstring", "ustring"):
            style = {"string": plain, "estring": "e", "bstring": "b", "ustring": "s"}[kind]
            stop = _scan_literal(sql, end, style)
            if stop < 0:
                error = "unterminated string literal"
                break
            if kind == "ustring":
                escape = _UESCAPE.match(sql, stop)
                stop = escape.end() if escape is not None else stop
                unicode_token = len(tokens)
            append(("s", sql[pos:stop]))
            pos = stop
            continue
        if kind in ("ident", "uident"):
            stop = _scan_doubled(sql, end, '"')
            if stop < 0:
                error = "unterminated quoted identifier"
                break
            name = sql[end:stop - 1].replace('""', '"')
            if kind == "uident":
                escape = _UESCAPE.match(sql, stop)
                if escape is not None:
                    stop = escape.end()
                decoded = _unicode_escapes(name, escape.group(1) if escape else "\\")
                if decoded is None:
                    error = "invalid Unicode escape in an identifier"
                    break
                name = decoded
                unicode_token = len(tokens)
            append(("q", name))
            pos = stop
            continue
        if kind == "dollar":
            close = sql.find(m.group(), end)
            if close < 0:
                error = "unterminated dollar-quoted string"
                break
            stop = close + len(m.group())
            append(("s", sql[pos:stop]))
            pos = stop
            continue
        pos = end
        if kind == "number":
            append(("n", m.group()))
        elif kind == "param":
            append(("p", m.group()))
        else:
            append(("o", m.group()))
    if error is not None:
        tokens.append(("o", ""))  # the unterminated piece is a statement of its own, even if only a comment
    if tokens:
        statements.append(_Statement(tokens, start, n))
    return _Lexed(statements, hints, error)


def _literal_value(source: str, standard_conforming_strings: bool) -> str | None:
    """The value of a string token when it is plain enough to read here ('...', E'...' or $$...$$ without
    backslashes, one piece); None otherwise."""
    if source.startswith("$"):
        tag_end = source.index("$", 1) + 1
        return source[tag_end:len(source) - tag_end]
    if source[:1] in "eEnN":
        source = source[1:]
    if not source.startswith("'") or "\\" in source:
        return None
    body = source[1:-1]
    if "'" in body.replace("''", ""):
        return None  # continued over several pieces
    return body.replace("''", "'")


# ---------------------------------------------------------------------------------------------------------------
# Classification of one statement


@dataclass(slots=True)
class _Part:
    route: Route
    reason: str
    transaction: str | None = None
    session_state: str | None = None
    prepared_name: str | None = None
    serializable: bool = False  # a BEGIN asking for SERIALIZABLE, which a hot standby refuses
    replay: tuple[str, ...] = ()  # set_config: statements that set the same on another backend
    detail: str | None = None  # why the session state pins, when the kind's label does not say it all


@dataclass(slots=True)
class _Context:
    functions: FunctionPolicy | None
    prepared: Mapping[str, Route]
    standard_conforming_strings: bool = True


_Handler = Callable[[list[_Token], int, _Context, int], _Part]  # a verb's classifier: (tokens, verb index, ...)


def _write(reason: str, *, transaction: str | None = None, session_state: str | None = None,
           prepared_name: str | None = None, detail: str | None = None) -> _Part:
    return _Part(Route.WRITE, reason, transaction, session_state, prepared_name, detail=detail)


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


def _updates_pg_settings(toks: list[_Token], i: int) -> bool:
    """Whether the UPDATE at index i targets pg_settings (its rule calls set_config: session state)."""
    j = i + 1
    if _word(toks, j) == "only":
        j += 1
    if _name(toks, j) == "pg_catalog" and j + 1 < len(toks) and toks[j + 1][0] == ".":
        j += 2
    return _name(toks, j) == "pg_settings"


_BOOLEANS = {"true": True, "t": True, "yes": True, "y": True, "on": True, "1": True,
             "false": False, "f": False, "no": False, "n": False, "off": False, "0": False}
_MAX_ARGUMENT_TOKENS = 64  # set_config's arguments are read only when this short (they are literals or not)


def _call_arguments(toks: list[_Token], open_index: int) -> list[list[_Token]] | None:
    """The arguments of the call whose '(' is at open_index, split at its own commas; None if it does not close
    within _MAX_ARGUMENT_TOKENS tokens."""
    args: list[list[_Token]] = [[]]
    depth = 0
    for j in range(open_index, min(len(toks), open_index + _MAX_ARGUMENT_TOKENS)):
        kind = toks[j][0]
        if kind == "(":
            depth += 1
            if depth == 1:
                continue
        elif kind == ")":
            depth -= 1
            if depth == 0:
                return [] if args == [[]] else args
        elif kind == "," and depth == 1:
            args.append([])
            continue
        args[-1].append(toks[j])
    return None


def _set_config_call(toks: list[_Token], i: int, ctx: _Context) -> tuple[bool | None, str | None]:
    """A call of set_config(name, value, is_local) whose name is at i: (is_local when it is a literal, else
    None; the statement that sets the same on another backend when name and value are literals and is_local is
    false)."""
    args = _call_arguments(toks, i + 1)
    if args is None or len(args) != 3:
        return None, None
    local: bool | None = None
    if len(args[2]) == 1:
        kind, text = args[2][0]
        if kind == "w":
            local = {"true": True, "false": False, "null": False}.get(text)  # NULL: set_config takes it as false
        elif kind == "s":
            text_value = _literal_value(text, ctx.standard_conforming_strings)
            local = _BOOLEANS.get(text_value.strip().lower()) if text_value is not None else None
    name, value = args[0], args[1]
    if local is not False or len(name) != 1 or name[0][0] != "s" or len(value) != 1:
        return local, None
    if value[0][0] == "s":
        return False, f"SELECT pg_catalog.set_config({name[0][1]}, {value[0][1]}, false)"
    if value[0] == ("w", "null"):  # a NULL value resets the setting
        return False, f"SELECT pg_catalog.set_config({name[0][1]}, NULL, false)"
    return False, None


_NOT_AN_ALIAS = frozenset({"from", "where", "group", "having", "order", "limit", "offset", "union", "intersect",
                           "except", "into", "for", "window", "fetch"})


def _only_set_config_calls(toks: list[_Token]) -> bool:
    """SELECT [pg_catalog.]set_config(...) [[AS] alias] [, ...] and nothing else: each call runs exactly once."""
    n = len(toks)
    if _word(toks, 0) != "select":
        return False
    i = 1
    while True:
        if _name(toks, i) == "pg_catalog" and i + 1 < n and toks[i + 1][0] == ".":
            i += 2
        if _name(toks, i) != "set_config" or i + 1 >= n or toks[i + 1][0] != "(":
            return False
        i = _matching(toks, i + 1) + 1
        if _word(toks, i) == "as":
            i += 1
        if i < n and toks[i][0] in ("w", "q") and toks[i][1] not in _NOT_AN_ALIAS:
            i += 1
        if i >= n:
            return True
        if toks[i][0] != ",":
            return False
        i += 1


def _query(toks: list[_Token], start: int, ctx: _Context, top: bool = False) -> _Part:
    """SELECT, WITH, VALUES, TABLE (possibly parenthesized): a read unless something in it writes.

    One pass over the tokens: locking clauses at any depth, SELECT ... INTO, data-modifying statements in
    WITH (also nested, and the main statement after the CTE list), and calls of writing functions and of
    functions that set up session state. `top`: the tokens are a whole statement of the query, so that a
    statement made of set_config calls only can be replayed.
    """
    i = start
    while i < len(toks) and toks[i][0] == "(":
        i += 1
    verb = _word(toks, i)
    read_reason = verb if verb in ("values", "table") else "select"
    write_reason: str | None = None
    states: list[str] = []
    replay: list[str] = []
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
                    states.append("temp_table")
            elif text in _DML and _data_modifying(toks, i, text):
                found = "data-modifying cte"
            if found is not None:
                if found in ("update", "data-modifying cte") and text == "update" and _updates_pg_settings(toks, i):
                    states.append("pg_settings_update")
                if write_reason is None:
                    write_reason = found
        if kind in ("w", "q") and i + 1 < n and toks[i + 1][0] == "(":
            name = text.lower()
            qualified = i - 2 >= start and prev[0] == "." and toks[i - 2][0] in ("w", "q")
            schema = toks[i - 2][1].lower() if qualified else None
            writes = _function_writes(ctx, schema, name)
            if name == "set_config" and schema in (None, "pg_catalog"):
                local, statement = _set_config_call(toks, i, ctx)
                if local is True:  # like SET LOCAL: nothing outlives the transaction
                    writes = ctx.functions is not None and ctx.functions.writes(schema, name) is True
                elif statement is None:
                    states.append("set_config_computed")
                else:
                    states.append("set_config")
                    replay.append(statement)
            if writes and write_reason is None:
                write_reason = f"writing function {name}"
            pin = _PINNING_FUNCTIONS.get(name)
            if pin is not None:
                states.append(pin)
        prev = tok
    state = _pick_state(states)
    if state == "set_config" and not (top and _only_set_config_calls(toks)):
        state = "set_config_computed"  # it may run any number of times, or in another statement's time
    part = _Part(Route.WRITE if write_reason else Route.READ, write_reason or read_reason, session_state=state,
                 replay=tuple(replay) if state == "set_config" else ())
    return part


def _pick_state(states: list[str]) -> str | None:
    """The state to report among several: a pinning one first."""
    for state in states:
        if state in PINNING_STATES:
            return state
    return states[0] if states else None


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
    if inner.session_state in PINNING_STATES:  # what it sets up happens at each EXECUTE: pin now
        return _write(f"prepare {inner.reason}", session_state=inner.session_state, prepared_name=name,
                      detail=f"a prepared statement that sets up {inner.session_state}")
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
    state = scanned.session_state
    if toks[v][1] == "update" and state not in PINNING_STATES and _updates_pg_settings(toks, v):
        state = "pg_settings_update"
    return _write(toks[v][1], session_state=state)


def _query_verb(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _query(toks, 0, ctx, top=depth == 0)


_DO_STATEMENT_WORDS = frozenset({"set", "reset", "discard", "listen", "load", "prepare", "deallocate"})
_DO_STATEMENT_AFTER = frozenset({"begin", "then", "else", "loop", "exception"})


def _do_body(body: str, ctx: _Context) -> str | None:
    """Why a PL/pgSQL DO body may set up session state, or None. Dynamic SQL (EXECUTE) may do anything."""
    lexed = _lex(body, ctx.standard_conforming_strings)
    if lexed.error is not None:
        return "a DO block the proxy cannot read"
    for statement in lexed.statements:
        toks = statement.tokens
        prev: _Token = ("", "")
        for j, (kind, text) in enumerate(toks):
            if kind == "w":
                starts = j == 0 or (prev[0] == "w" and prev[1] in _DO_STATEMENT_AFTER) or prev == ("o", ">")
                if text == "execute" or (starts and text in _DO_STATEMENT_WORDS):
                    return f"a DO block that runs {text.upper()}"
                if text in ("temp", "temporary", "pg_temp"):
                    return "a DO block that may create a temporary table"
                if text == "pg_settings":
                    return "a DO block that may update pg_settings"
            if kind in ("w", "q") and j + 1 < len(toks) and toks[j + 1][0] == "(":
                name = text.lower()
                if name in _PINNING_FUNCTIONS:
                    return f"a DO block that calls {name}"
                if name == "set_config" and _set_config_call(toks, j, ctx)[0] is not True:
                    return "a DO block that calls set_config"
            prev = (kind, text)
    return None


def _do(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    # DO [LANGUAGE lang] code [LANGUAGE lang]: runs anything; a write, and it pins if it may set up state
    language = "plpgsql"
    body: str | None = None
    seen_body = False
    i = v + 1
    while i < len(toks):
        kind, text = toks[i]
        if kind == "w" and text == "language" and i + 1 < len(toks):
            lang_kind, lang = toks[i + 1]
            value = _literal_value(lang, ctx.standard_conforming_strings) if lang_kind == "s" else lang
            language = (value or "?").lower()
            i += 2
        elif kind == "s" and not seen_body:
            body = _literal_value(text, ctx.standard_conforming_strings)
            seen_body = True
            i += 1
        else:
            body = None
            break
    if language != "plpgsql":
        why: str | None = f"a DO block in {language}"
    elif body is None:
        why = "a DO block the proxy cannot read"
    else:
        why = _do_body(body, ctx)
    if why is not None:
        return _write("do", session_state="do_block", detail=why)
    return _write("do")


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
    "listen": _state_verb("listen"), "unlisten": _state_verb("unlisten"), "load": _state_verb("load"),
    "do": _do,
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
        part = _query(toks, 0, ctx) if verb in ("select", "values", "table", "with") else _write(verb)
    else:
        handler = _VERBS.get(verb)
        if handler is None:
            return _write(verb)  # ALTER, DROP, TRUNCATE, GRANT, VACUUM, ANALYZE, LOCK, CALL, FETCH, NOTIFY, ...
        part = handler(toks, v, ctx, depth)
    if part.route is Route.READ and part.session_state in PINNING_STATES:
        return replace(part, route=Route.WRITE)  # the session will be pinned to the writer: set it up there
    return part


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


def _verdict(lexed: _Lexed, parts: list[_Part], transaction: str | None) -> Classification:
    count = len(lexed.statements)
    if lexed.error is not None:
        return Classification(Route.WRITE, lexed.error, statements=count)
    hints = lexed.hints
    hint = "writer" if "writer" in hints else ("reader" if hints else None)
    if count == 0:
        route = Route.READ if hint != "writer" else Route.WRITE
        return Classification(route, "hint" if hint else "empty", hint=hint, statements=0)
    writes = [p for p in parts if p.route is Route.WRITE]
    route = Route.WRITE if writes else Route.READ
    reason = (writes or parts)[0].reason
    session_state = _pick_state([p.session_state for p in parts if p.session_state is not None])
    prepared_name = next((p.prepared_name for p in parts if p.prepared_name is not None), None)
    if hint is not None:
        route = Route.WRITE if hint == "writer" else Route.READ
        reason = "hint"
    return Classification(route, reason, hint=hint, transaction=transaction, session_state=session_state,
                          statements=count, prepared_name=prepared_name)


@dataclass(slots=True)
class _Reading:
    """The query read with one value of standard_conforming_strings."""

    lexed: _Lexed
    parts: list[_Part]  # one per statement (empty after a lexical error)
    verdict: Classification

    def key(self) -> tuple[object, ...]:
        """What must not differ between two readings for the query to be read for sure."""
        v = self.verdict
        return (v.route, v.hint, v.transaction, v.session_state, v.prepared_name,
                [(s.start, s.end) for s in self.lexed.statements], [(p.session_state, p.replay) for p in self.parts])


def _read_query(sql: str, ctx: _Context) -> _Reading:
    lexed = _lex(sql, ctx.standard_conforming_strings)
    if lexed.error is not None or not lexed.statements:
        return _Reading(lexed, [], _verdict(lexed, [], None))
    parts, transaction = _combine([_statement(s.tokens, ctx, 0) for s in lexed.statements])
    return _Reading(lexed, parts, _verdict(lexed, parts, transaction))


def _readings(sql: str, functions: FunctionPolicy | None, prepared: Mapping[str, Route] | None,
              dialect: PgDialect) -> tuple[list[_Reading], str | None]:
    """The readings of a query (two when standard_conforming_strings is unknown and it matters) and, when the
    query cannot be read for sure, why."""
    scs = dialect.standard_conforming_strings
    backslash = "\\" in sql
    choices = [True, False] if scs is None and backslash else [True if scs is None else scs]
    known = prepared if prepared is not None else {}
    readings = [_read_query(sql, _Context(functions, known, choice)) for choice in choices]
    if backslash and dialect.multibyte_risk and not sql.isascii() and _MULTIBYTE_BACKSLASH.search(sql):
        encoding = dialect.client_encoding or "unknown"
        return readings, f"a backslash after a non-ASCII character (client_encoding {encoding})"
    if len(readings) > 1 and readings[0].key() != readings[1].key():
        return readings, "standard_conforming_strings unknown: the query reads two ways"
    return readings, None


_UNKNOWN = PgDialect()


def _dialect(dialect: PgDialect | None, standard_conforming_strings: bool | None) -> PgDialect:
    dialect = dialect if dialect is not None else _UNKNOWN
    if standard_conforming_strings is not None:
        dialect = replace(dialect, standard_conforming_strings=standard_conforming_strings)
    return dialect


def classify(sql: str, functions: FunctionPolicy | None = None, prepared: Mapping[str, Route] | None = None, *,
             standard_conforming_strings: bool | None = None, dialect: PgDialect | None = None) -> Classification:
    """Classify the text of one simple Query (any number of statements), or of a Parse, for the readwrite endpoint.

    `dialect` is the session's lexical settings (from the server's ParameterStatus standard_conforming_strings and
    client_encoding); `standard_conforming_strings`, when given, overrides the dialect's. Unknown settings are
    read every way that matters (see the rules on top). `prepared` maps SQL-level prepared statement names (as
    `Classification.prepared_name` reports them) to the route their PREPARE had; EXECUTE of a name not in it is
    WRITE.

    Hints in comments (`/* endpoint: writer */`, `-- endpoint: reader`) anywhere in the query decide the
    route of the whole query (it goes to one backend); a writer hint wins over a reader hint. A query that
    does not lex (unterminated literal or comment) or cannot be read for sure is WRITE and ignores hints. For
    per-statement detail (several SET values to replay, say) see `analyze`.
    """
    try:
        readings, problem = _readings(sql, functions, prepared, _dialect(dialect, standard_conforming_strings))
        verdict = readings[0].verdict
        if problem is not None:
            return replace(verdict, route=Route.WRITE, reason=problem, hint=None)
        return verdict
    except Exception:  # a bug here must not break a session: send the query to the writer
        return Classification(Route.WRITE, "classifier error")


@dataclass(frozen=True)
class StatementInfo:
    """One statement of a query, as the session-state tracker needs it."""

    text: str  # the statement, its comments kept, its ';' and surrounding whitespace not
    route: Route
    reason: str
    session_state: str | None = None  # a key of session_kinds.PG_STATE_KINDS
    prepared_name: str | None = None
    replay: tuple[str, ...] = ()  # set_config: what to replay instead of the statement
    detail: str | None = None  # why it pins, when the kind's label does not say it all
    words: tuple[str, ...] = ()  # its first bare words, lower-cased (at most 4): ("reset", "all"), ...


@dataclass(frozen=True)
class Analysis:
    """A query statement by statement (the first reading when there are two)."""

    classification: Classification
    statements: tuple[StatementInfo, ...]
    # why the query cannot be read for sure (a lexical error, an unknown dialect the readings disagree on, a
    # multibyte encoding), or None
    problem: str | None = None
    # the problem is not a lexical error (which makes the server refuse the whole query) but a text the server
    # may well run, in a way not known here
    uncertain: bool = False
    # session states any reading of the query sets up (when uncertain, the reading may be the wrong one)
    states: frozenset[str] = frozenset()


def analyze(sql: str, functions: FunctionPolicy | None = None, prepared: Mapping[str, Route] | None = None, *,
            standard_conforming_strings: bool | None = None, dialect: PgDialect | None = None) -> Analysis:
    """`classify`, statement by statement. Never raises."""
    try:
        readings, problem = _readings(sql, functions, prepared, _dialect(dialect, standard_conforming_strings))
    except Exception:  # a bug here must not break a session
        return Analysis(Classification(Route.WRITE, "classifier error"), (), "classifier error", True)
    first = readings[0]
    verdict = first.verdict
    if problem is not None:
        verdict = replace(verdict, route=Route.WRITE, reason=problem, hint=None)
    statements: list[StatementInfo] = []
    for index, statement in enumerate(first.lexed.statements):
        text = sql[statement.start:statement.end].strip()
        words = tuple(t[1] for t in statement.tokens[:8] if t[0] == "w")[:4]
        if index >= len(first.parts):
            statements.append(StatementInfo(text, Route.WRITE, first.lexed.error or "unknown", words=words))
            continue
        p = first.parts[index]
        statements.append(StatementInfo(text, p.route, p.reason, p.session_state, p.prepared_name, p.replay,
                                        p.detail, words))
    states = frozenset(p.session_state for r in readings for p in r.parts if p.session_state is not None)
    return Analysis(verdict, tuple(statements), problem or first.lexed.error, problem is not None, states)


def split_statements(sql: str, *, standard_conforming_strings: bool = True) -> list[str]:
    """The statements of a simple Query, split on top-level ';' by the lexer; empty statements are dropped.

    Each statement keeps its comments and loses its terminating ';' and surrounding whitespace. When the
    text does not lex, the unterminated rest is the last statement.
    """
    lexed = _lex(sql, standard_conforming_strings)
    return [sql[s.start:s.end].strip() for s in lexed.statements]
