"""MySQL/MariaDB statement classification for the readwrite endpoint: read or write, transaction and session markers."""

# Rules of this file (the PostgreSQL twin is pg_classify.py; Route, Classification and FunctionPolicy come from it):
#
# - A real lexer runs over the SQL text first: `-- ` (dash-dash and a space or control character), `#` and `/* */`
#   comments (not nested), executable comments (`/*! ... */`, `/*!50708 ... */`, MariaDB `/*M! ... */`) whose
#   content is code, optimizer hints (`/*+ ... */`, ignored), backtick identifiers, '...' and "..." strings
#   (double quotes quote identifiers under ANSI_QUOTES; backslash escapes unless NO_BACKSLASH_ESCAPES), hex and
#   bit literals, user (@a) and system (@@a) variables. The rules look at tokens only, so a keyword inside a
#   string, a comment or a quoted identifier never counts.
# - The lexer depends on the session (MyDialect): NO_BACKSLASH_ESCAPES, ANSI_QUOTES, character_set_client. An
#   unknown flag is read both ways when the text holds its character (a backslash, a double quote), and the query
#   is WRITE unless the readings agree on statement boundaries, route and state. The server lexes each statement
#   of a query after the previous one ran, so a `SET sql_mode` / `SET NAMES` with a literal value changes how
#   the statements after it are read (a value not known here makes the flags unknown from there on). In a
#   multibyte character set whose second bytes include `\` and `` ` `` (GBK, Big5, Shift-JIS, ...), one of
#   those right after a non-ASCII character cannot be read for sure: WRITE.
# - A versioned executable comment (`/*!NNNNN`) runs only on servers at least that new, and `/*M!` only on
#   MariaDB. The server is unknown here, so such a query is read both ways (content as code, content skipped)
#   and is WRITE if either reading writes. An executable comment inside another, or a statement boundary inside
#   one, is a lexical error here (WRITE): the server does not read them the way the nesting suggests.
# - Everything that is not known to be a read is a write. When in doubt (unterminated literal or comment,
#   unbalanced parentheses, an unknown verb, an EXECUTE of a statement the caller does not know) the answer is
#   WRITE.
# - Transaction control other than BEGIN (COMMIT, ROLLBACK, SAVEPOINT, ...) is READ: the caller sends it to
#   whichever backend holds the open transaction. XA statements are WRITE.
# - `SET TRANSACTION ...` (no GLOBAL/SESSION) sets the characteristics of the *next* transaction, so it comes
#   before START TRANSACTION. READ ONLY is READ with transaction "set_transaction_read_only": the caller keeps
#   it for the next BEGIN (which it may then treat as read-only, sending both where that transaction runs);
#   in one multi-statement query the following BEGIN is turned into "begin_read_only" here. Other
#   SET TRANSACTION statements are WRITE with no session state (they do not outlive the next transaction).
# - Session state is reported in `session_state` with the keys of session_kinds.MY_STATE_KINDS; a pinning one
#   (PINNING_STATES) makes its statement WRITE whatever the FunctionPolicy says. Assignments of user variables
#   are "user_variable" (the tracker tells a replayable `SET @a = 1` from `SELECT ... INTO @a`, which pins).
#   Reading a user variable (`SELECT @a`) is READ ("user_variable_read"): every backend the session uses has
#   its variables, or the session is pinned. `SET autocommit = 0` ("autocommit_off") makes every later
#   statement part of a transaction: the caller treats everything up to COMMIT/ROLLBACK (or
#   `SET autocommit = 1`) as a transaction on the writer. `USE db` ("use") is READ and must be replayed on
#   every backend.
# - Statements about the previous statement on the same connection (LAST_INSERT_ID(), FOUND_ROWS(),
#   ROW_COUNT(), SHOW WARNINGS, ...) are WRITE: that statement most likely ran on the writer. For the same
#   reason `SELECT SQL_CALC_FOUND_ROWS` is WRITE, so that its FOUND_ROWS() finds it.
# - Pure: no I/O, no clock, never raises (a last-resort guard turns an internal bug into a WRITE).

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from .dialect import MyDialect
from .pg_classify import Classification, FunctionPolicy, Route
from .session_kinds import MY_PINNING_STATES

__all__ = [
    "BUILTIN_WRITE_FUNCTIONS",
    "NAMED_LOCK_FUNCTIONS",
    "PINNING_STATES",
    "WRITER_SESSION_FUNCTIONS",
    "Analysis",
    "Assignment",
    "Classification",
    "FunctionPolicy",
    "MyDialect",
    "Route",
    "StatementInfo",
    "analyze",
    "classify",
    "literal_text",
    "set_assignments",
    "split_statements",
]

# Functions whose result belongs to the session that ran the previous statements: the writer's.
WRITER_SESSION_FUNCTIONS: frozenset[str] = frozenset({"last_insert_id", "found_rows", "row_count"})

# Named (user-level) locks are held by a session: taking or releasing one pins the session to the writer.
NAMED_LOCK_FUNCTIONS: frozenset[str] = frozenset({"get_lock", "release_lock", "release_all_locks"})

# Everything a replica cannot answer for the writer. Matched by bare name, in any schema. IS_USED_LOCK and
# IS_FREE_LOCK inspect the writer's locks but hold none (WRITE without pinning); NEXTVAL/SETVAL/LASTVAL are
# MariaDB sequences (LASTVAL reads this session's sequence state, which lives where NEXTVAL ran).
BUILTIN_WRITE_FUNCTIONS: frozenset[str] = WRITER_SESSION_FUNCTIONS | NAMED_LOCK_FUNCTIONS | frozenset({
    "is_used_lock", "is_free_lock", "nextval", "setval", "lastval",
})

# session_state values that pin the session to its backend (session_kinds.MY_STATE_KINDS): their statements go to
# the writer whatever the FunctionPolicy says
PINNING_STATES: frozenset[str] = MY_PINNING_STATES
# reported first in a multi-statement query: the pinning ones, and user variables (the tracker decides whether
# an assignment can be replayed)
_REPORT_FIRST = PINNING_STATES | {"user_variable"}

# System variables that read the previous statement's session
_WRITER_SESSION_VARIABLES = frozenset({"identity", "last_insert_id"})
_DIAGNOSTICS_VARIABLES = frozenset({"warning_count", "error_count"})
_DIAGNOSTICS = "previous statement diagnostics"
_WRITER_SESSION = "needs the writer's session"

_MAX_DEPTH = 16  # EXPLAIN ANALYZE / PREPARE / SET STATEMENT nest statements; deeper is refused as WRITE


# ---------------------------------------------------------------------------------------------------------------
# Lexer

# Token kinds: "w" bare word (lower-cased), "q" quoted identifier (backticks, or double quotes under ANSI_QUOTES;
# as written, doubled quotes unescaped), "s" string literal (its source text, quotes included), "n" number or
# hex/bit literal, "u" user variable (@name, lower-cased), "v" system variable (@@[scope.]name, lower-cased),
# "o" any other operator (":=" is one), and the punctuation "(", ")", ",", ";", "." as their own kinds.
_Token = tuple[str, str]

_WORD_CHARS = r"0-9A-Za-z_$\u0080-\U0010FFFF"

_LEX = re.compile(
    rf"""
    (?P<space>[ \t\n\r\x0b\x0c]+)
  | (?P<word>(?![xXbB]')[A-Za-z_$\u0080-\U0010FFFF][{_WORD_CHARS}]*)
  | (?P<line>--(?=[\x00-\x20\x7f]|\Z)|\#)
  | (?P<block>/\*)
  | (?P<close>\*/)
  | (?P<bits>[xXbB]')
  | (?P<quote>['"`])
  | (?P<sysvar>@@)
  | (?P<uservar>@)
  | (?P<assign>:=)
  | (?P<number>[0-9][{_WORD_CHARS}]*)
  | (?P<punct>[(),;.])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_VARIABLE_NAME = re.compile(r"[0-9A-Za-z_$.\u0080-\U0010FFFF]*")
_VERSION = re.compile(r"[0-9]{5}(?:[0-9](?![0-9]))?")  # MySQL reads 5 digits, MariaDB also 6
_COMMENT_MARK = re.compile(r"/\*|\*/")
_STRING_STOP = {"'": re.compile(r"[\\']"), '"': re.compile(r'[\\"]')}
_HINT = re.compile(r"\bendpoint\s*:\s*(writer|reader)\b", re.IGNORECASE)
_UNESCAPE = re.compile(r"\\(.)|''|\"\"", re.DOTALL)
_ESCAPES = {"0": "\0", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "Z": "\x1a", "%": "\\%", "_": "\\_"}


@dataclass(slots=True)
class _Lexed:
    tokens: list[_Token]  # all statements' tokens, every ';' included
    # (token index, offset, parenthesis depth, inside an executable comment) of each ';'
    semicolons: list[tuple[int, int, int, bool]]
    hints: list[tuple[int, str]]  # (offset, "writer" | "reader")
    error: str | None
    conditional: bool  # a versioned or MariaDB-only executable comment was seen


@dataclass(slots=True)
class _Statement:
    tokens: list[_Token]
    start: int  # offsets of the statement's text in the SQL, without its terminating ';'
    end: int


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


def _scan_string(sql: str, pos: int, quote: str, no_backslash_escapes: bool) -> int:
    """End of a '...' or "..." string literal (backslash escapes and doubled quotes); -1 if unterminated."""
    if no_backslash_escapes:
        return _scan_doubled(sql, pos, quote)
    stop = _STRING_STOP[quote]
    while True:
        m = stop.search(sql, pos)
        if m is None:
            return -1
        j = m.start()
        if sql[j] == "\\" or sql.startswith(quote, j + 1):
            pos = j + 2
            continue
        return j + 1


def _skip_conditional(sql: str, pos: int) -> int:
    """End of an executable comment read as a comment (the server allows one nested comment in it); -1 if
    unterminated."""
    depth = 1
    while True:
        m = _COMMENT_MARK.search(sql, pos)
        if m is None:
            return -1
        pos = m.end()
        if m.group() == "/*":
            depth = 2
        else:
            depth -= 1
            if depth == 0:
                return pos


def _string_value(raw: str, no_backslash_escapes: bool) -> str:
    """The value of a string token (its source text, quotes included)."""
    quote = raw[0]
    body = raw[1:-1]
    if no_backslash_escapes:
        return body.replace(quote + quote, quote)

    def unescape(m: re.Match[str]) -> str:
        escaped = m.group(1)
        if escaped is None:
            return quote if m.group() == quote + quote else m.group()
        return _ESCAPES.get(escaped, escaped)

    return _UNESCAPE.sub(unescape, body)


def _lex(sql: str, ansi_quotes: bool, no_backslash_escapes: bool, as_code: bool, offset: int = 0) -> _Lexed:
    """Tokens from `offset` on, the comment hints, and the first lexical error; after an error the rest is
    one last token.

    `as_code` says how to read versioned and MariaDB-only executable comments: their content as code, or as a
    comment. An executable comment inside another one is an error here: the server ends both at the first `*/`,
    which this lexer does not follow.
    """
    tokens: list[_Token] = []
    semicolons: list[tuple[int, int, int, bool]] = []
    hints: list[tuple[int, str]] = []
    paren = 0
    in_executable = 0
    conditional = False
    last_end = -1
    pos = offset
    n = len(sql)
    error: str | None = None
    match = _LEX.match
    append = tokens.append
    while pos < n:
        m = match(sql, pos)
        assert m is not None  # the last alternative matches any character
        kind = m.lastgroup
        start = pos
        end = m.end()
        if kind == "space":
            pos = end
            continue
        if kind == "word":  # the commonest token first
            append(("w", m.group().lower()))
            last_end = pos = end
            continue
        if kind == "punct":
            text = m.group()
            if text == ";":
                semicolons.append((len(tokens), start, paren, in_executable > 0))
            elif text == "(":
                paren += 1
            elif text == ")" and paren > 0:
                paren -= 1
            append((text, text))
            last_end = pos = end
            continue
        if kind == "line":
            stop = sql.find("\n", end)
            stop = n if stop < 0 else stop
            hints.extend((end, h.lower()) for h in _HINT.findall(sql, end, stop))
            pos = stop
            continue
        if kind == "block":
            if sql.startswith("!", end) or sql.startswith("M!", end):
                mariadb = sql[end] == "M"
                j = end + (2 if mariadb else 1)
                version = _VERSION.match(sql, j)
                if version is not None:
                    j = version.end()
                if mariadb or version is not None:
                    conditional = True
                    if not as_code:
                        stop = _skip_conditional(sql, j)
                        if stop < 0:
                            error = "unterminated comment"
                            break
                        pos = stop
                        continue
                if in_executable:
                    error = "an executable comment inside another one"
                    break
                in_executable += 1
                pos = j
                continue
            stop = sql.find("*/", end)
            if stop < 0:
                error = "unterminated comment"
                break
            hints.extend((end, h.lower()) for h in _HINT.findall(sql, end, stop))
            pos = stop + 2
            continue
        tok: _Token
        if kind == "close":
            if in_executable:
                in_executable -= 1
                pos = end
                continue
            tok = ("o", "*")
            end = start + 1
        elif kind == "bits":
            stop = sql.find("'", end)
            if stop < 0:
                error = "unterminated string literal"
                break
            tok = ("n", "")
            end = stop + 1
        elif kind == "quote":
            quote = m.group()
            if quote == "`" or (quote == '"' and ansi_quotes):
                stop = _scan_doubled(sql, end, quote)
                if stop < 0:
                    error = "unterminated quoted identifier"
                    break
                tok = ("q", sql[end:stop - 1].replace(quote + quote, quote))
            else:
                stop = _scan_string(sql, end, quote, no_backslash_escapes)
                if stop < 0:
                    error = "unterminated string literal"
                    break
                tok = ("s", sql[start:stop])
            end = stop
        elif kind == "sysvar":
            name = _VARIABLE_NAME.match(sql, end)
            assert name is not None  # matches the empty string
            tok = ("v", name.group().lower())
            end = name.end()
        elif kind == "uservar":
            if last_end == start and tokens[-1][0] in ("s", "q", "w"):
                tok = ("o", "@")  # 'user'@'host', app@localhost: not a variable
            elif end < n and sql[end] in "'\"`":
                quote = sql[end]
                if quote == "`":
                    stop = _scan_doubled(sql, end + 1, quote)
                else:
                    stop = _scan_string(sql, end + 1, quote, no_backslash_escapes)
                if stop < 0:
                    error = "unterminated quoted identifier" if quote == "`" else "unterminated string literal"
                    break
                tok = ("u", sql[end + 1:stop - 1].lower())
                end = stop
            else:
                name = _VARIABLE_NAME.match(sql, end)
                assert name is not None
                tok = ("u", name.group().lower())
                end = name.end()
        elif kind == "number":
            tok = ("n", m.group())
        elif kind == "assign":
            tok = ("o", ":=")
        else:
            tok = ("o", m.group())
        append(tok)
        last_end = pos = end
    if error is None and in_executable:
        error = "unterminated comment"
    if error is not None:
        tokens.append(("o", ""))  # the unterminated piece is a statement of its own, even if only a comment
    return _Lexed(tokens, semicolons, hints, error, conditional)


# ---------------------------------------------------------------------------------------------------------------
# Statement boundaries: ';' outside parentheses and outside the BEGIN ... END body of a stored program

_ROUTINES = frozenset({"procedure", "function", "trigger", "event"})
_BODY_START_AFTER = frozenset({"begin", "then", "else", "do", "loop", "repeat", "atomic"})
_END_KINDS = frozenset({"if", "loop", "while", "repeat", "case"})


def _word(toks: list[_Token], i: int) -> str | None:
    """The bare word at index i, or None (out of range, or another kind of token)."""
    if 0 <= i < len(toks) and toks[i][0] == "w":
        return toks[i][1]
    return None


def _is_compound(toks: list[_Token], start: int, stop: int) -> bool:
    """Whether the statement starting at start may hold ';' in a body: CREATE/ALTER of a stored program, or a
    compound statement outside one (MariaDB: BEGIN NOT ATOMIC, IF, CASE, LOOP, WHILE, REPEAT, a label)."""
    words = [t[1] for t in toks[start:min(stop, start + 40)] if t[0] == "w"]
    if not words:
        return False
    if words[0] in ("create", "alter") and any(w in _ROUTINES for w in words[1:12]):
        return True
    if words[0] == "begin":
        return words[1:2] == ["not"]
    if words[0] in ("if", "case", "loop", "while", "repeat"):
        return True
    return toks[start][0] in ("w", "q") and start + 1 < stop and toks[start + 1] == ("o", ":")


def _is_call(toks: list[_Token], i: int) -> bool:
    """Whether the '(' at i opens an argument list with several arguments: IF(a, b, c), not IF (a) THEN."""
    depth = 0
    for j in range(i, min(len(toks), i + 256)):
        kind = toks[j][0]
        if kind == "(":
            depth += 1
        elif kind == ")":
            depth -= 1
            if depth == 0:
                return False
        elif kind == "," and depth == 1:
            return True
    return False


class _Blocks:
    """BEGIN/CASE/IF/LOOP/WHILE/REPEAT ... END nesting of one compound statement, advanced token by token."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.pos = start
        self.depth = 0
        self.skip = -1  # the IF of END IF, ...

    def advance(self, toks: list[_Token], stop: int) -> int:
        depth = self.depth
        for j in range(self.pos, stop):
            kind, text = toks[j]
            if kind != "w" or j == self.skip:
                continue
            prev = toks[j - 1] if j > self.start else None
            if prev is not None and prev[0] == ".":  # t.end: a column
                continue
            if text in ("begin", "case"):
                depth += 1
            elif text == "end":
                depth = max(depth - 1, 0)
                if _word(toks, j + 1) in _END_KINDS:
                    self.skip = j + 1
            elif text in ("if", "loop", "while", "repeat") and (
                    prev is None or prev[0] == ";" or prev == ("o", ":")
                    or (prev[0] == "w" and prev[1] in _BODY_START_AFTER)):
                nxt = toks[j + 1][0] if j + 1 < len(toks) else ""
                if nxt == "(" and (text == "repeat" or (text == "if" and _is_call(toks, j + 1))):
                    continue  # the functions IF(a, b, c) and REPEAT(s, n)
                depth += 1
        self.pos = stop
        self.depth = depth
        return depth


def _split(lexed: _Lexed, n: int, start: int = 0) -> list[_Statement]:
    """The statements of a lexed text (that began at offset `start`). A statement boundary inside an executable
    comment becomes the lexing error: the server would start the next statement outside the comment."""
    toks = lexed.tokens
    statements: list[_Statement] = []
    first = 0
    compound: bool | None = None
    blocks = _Blocks(0)
    for index, offset, paren, executable in lexed.semicolons:
        if paren != 0:
            continue
        if index > first:
            if compound is None:
                compound = _is_compound(toks, first, index)
            if compound and blocks.advance(toks, index) > 0:
                continue
            if executable and lexed.error is None:
                lexed.error = "a statement boundary inside an executable comment"
            statements.append(_Statement(toks[first:index], start, offset))
        first = index + 1
        start = offset + 1
        compound = None
        blocks = _Blocks(first)
    if first < len(toks):
        statements.append(_Statement(toks[first:], start, n))
    return statements


# ---------------------------------------------------------------------------------------------------------------
# Classification of one statement


@dataclass(slots=True)
class _Part:
    route: Route
    reason: str
    transaction: str | None = None
    session_state: str | None = None
    prepared_name: str | None = None
    explicit: bool = False  # a BEGIN whose mode is set (READ WRITE, XA): a SET TRANSACTION READ ONLY before it
    # does not make it read-only


@dataclass(slots=True)
class _Context:
    functions: FunctionPolicy | None
    prepared: Mapping[str, Route]
    ansi_quotes: bool
    no_backslash_escapes: bool


_Handler = Callable[[list[_Token], int, _Context, int], _Part]  # a verb's classifier: (tokens, verb index, ...)


def _write(reason: str, *, transaction: str | None = None, session_state: str | None = None,
           prepared_name: str | None = None, explicit: bool = False) -> _Part:
    return _Part(Route.WRITE, reason, transaction, session_state, prepared_name, explicit)


def _read(reason: str, *, transaction: str | None = None, session_state: str | None = None,
          prepared_name: str | None = None) -> _Part:
    return _Part(Route.READ, reason, transaction, session_state, prepared_name)


def _name(toks: list[_Token], i: int) -> str | None:
    """A prepared statement name: MySQL compares them case-insensitively, quoted or not."""
    if 0 <= i < len(toks) and toks[i][0] in ("w", "q"):
        return toks[i][1].lower()
    return None


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


def _pick_state(states: list[str]) -> str | None:
    """The state to report among several: a pinning one first."""
    for state in states:
        if state in _REPORT_FIRST:
            return state
    return states[0] if states else None


def _call(ctx: _Context, schema: str | None, name: str, states: list[str]) -> str | None:
    """The write reason of a call of schema.name (None for a read); records the state it sets up."""
    if name == "get_lock":  # releasing holds nothing: a session that took a lock is pinned already
        states.append("named_lock")
    decided = ctx.functions.writes(schema, name) if ctx.functions is not None else None
    if decided is not None:
        return f"writing function {name}" if decided else None
    if name in WRITER_SESSION_FUNCTIONS:
        return _WRITER_SESSION
    if name in NAMED_LOCK_FUNCTIONS or name in ("is_used_lock", "is_free_lock"):
        return "named lock"
    if name in BUILTIN_WRITE_FUNCTIONS:
        return f"writing function {name}"
    return None


_DML = frozenset({"insert", "replace", "update", "delete"})
_MAIN_VERBS = _DML | {"select", "values", "table"}


def _query(toks: list[_Token], start: int, ctx: _Context) -> _Part:
    """SELECT, WITH, VALUES, TABLE (possibly parenthesized): a read unless something in it writes.

    One pass over the tokens: locking clauses at any depth, SELECT ... INTO, SQL_CALC_FOUND_ROWS, the statement
    after WITH's common table expressions, sequences, calls of writing functions, user variables and the
    system variables of the previous statement. Also used on other statements for the state they set up.
    """
    i = start
    while i < len(toks) and toks[i][0] == "(":
        i += 1
    verb = _word(toks, i)
    read_reason = verb if verb in ("values", "table") else "select"
    write_reason: str | None = None
    states: list[str] = []
    main_found = verb != "with"
    into_list = False
    depth = 0
    prev: _Token = ("", "")
    n = len(toks)
    for i in range(start, n):
        tok = toks[i]
        kind, text = tok
        found: str | None = None
        call = i + 1 < n and toks[i + 1][0] == "("
        if kind == "(":
            depth += 1
        elif kind == ")":
            depth -= 1
        elif kind == "w":
            if prev[0] == ".":  # a qualified name: t.update is a column; s.nextval a sequence (Oracle mode)
                if text in ("nextval", "currval") and not call:
                    found = f"sequence {text}"
            elif (not main_found and depth == 0 and text in _MAIN_VERBS
                    and prev[0] != "," and prev not in (("w", "with"), ("w", "recursive"))):
                main_found = True  # the statement after WITH's list of common table expressions
                if text in _DML:
                    found = text
            elif text == "for":
                nxt = _word(toks, i + 1)
                if nxt in ("update", "share"):
                    found = f"for {nxt}"
            elif text == "lock":
                if [_word(toks, i + 1), _word(toks, i + 2), _word(toks, i + 3)] == ["in", "share", "mode"]:
                    found = "lock in share mode"
            elif text == "into":
                into_list = True
                nxt = _word(toks, i + 1)
                found = f"select into {nxt}" if nxt in ("outfile", "dumpfile") else "select into"
                if i + 1 < n and toks[i + 1][0] == "u":
                    states.append("user_variable")
            elif text == "sql_calc_found_rows":
                found = "sql_calc_found_rows"
            elif text in ("next", "previous") and _word(toks, i + 1) == "value" and _word(toks, i + 2) == "for":
                found = f"{text} value for"
        elif kind == "u":
            if i + 1 < n and toks[i + 1] == ("o", ":="):
                found = "user variable assignment"
                states.append("user_variable")
            elif not into_list:  # a read: every backend the session uses has its variables, or it is pinned
                states.append("user_variable_read")
        elif kind == "v":
            name = text.rsplit(".", 1)[-1]
            if name in _WRITER_SESSION_VARIABLES:
                found = _WRITER_SESSION
            elif name in _DIAGNOSTICS_VARIABLES:
                found = _DIAGNOSTICS
        if into_list and kind not in ("u", ",") and text != "into":
            into_list = False
        if call and kind in ("w", "q"):
            qualified = prev[0] == "." and i - 2 >= start and toks[i - 2][0] in ("w", "q")
            schema = toks[i - 2][1].lower() if qualified else None
            found = _call(ctx, schema, text.lower(), states) or found
        if found is not None and write_reason is None:
            write_reason = found
        prev = tok
    state = _pick_state(states)
    if write_reason is not None:
        return _write(write_reason, session_state=state)
    return _read(read_reason, session_state=state)


def _query_verb(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _query(toks, 0, ctx)


def _dml(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    scanned = _query(toks, v, ctx)  # only for the session state of what it calls and reads
    return _write(toks[v][1], session_state=scanned.session_state)


def _show(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    what = _word(toks, v + 1)
    if what in ("warnings", "errors", "profile", "profiles"):
        return _write(_DIAGNOSTICS)
    if what == "count" and any(t[1] in ("warnings", "errors") for t in toks[v + 2:] if t[0] == "w"):
        return _write(_DIAGNOSTICS)  # SHOW COUNT(*) WARNINGS
    if what in ("master", "binary", "binlog"):  # the writer's binary log, not a replica's
        return _write(f"show {what}")
    return _read("show")


def _skip_format(toks: list[_Token], i: int) -> int:
    """Index after an optional FORMAT = name."""
    if _word(toks, i) == "format" and i + 1 < len(toks) and toks[i + 1] == ("o", "="):
        return i + 3
    return i


def _explain(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    # EXPLAIN | DESCRIBE | DESC [EXTENDED | PARTITIONS | ANALYZE | FORMAT = x | INTO @var] {statement | table}
    i = v + 1
    analyze = into_variable = False
    while True:
        word = _word(toks, i)
        if word in ("extended", "partitions", "analyze"):
            analyze = analyze or word == "analyze"
            i += 1
        elif word == "format" and _skip_format(toks, i) != i:
            i = _skip_format(toks, i)
        elif word == "into" and i + 1 < len(toks) and toks[i + 1][0] == "u":
            into_variable = True
            i += 2
        elif word == "for" and _word(toks, i + 1) == "connection":
            return _write("explain for connection")  # a statement running on some connection of the writer
        else:
            break
    if into_variable:
        return _write("explain into", session_state="user_variable")
    if not analyze:
        return _read("explain")
    part = _statement(toks[i:], ctx, depth + 1)  # EXPLAIN ANALYZE runs the statement
    return replace(part, reason=f"explain analyze {part.reason}", transaction=None, prepared_name=None)


def _analyze(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    # ANALYZE [NO_WRITE_TO_BINLOG | LOCAL] TABLE t (statistics: written, replicated); MariaDB: ANALYZE
    # [FORMAT = JSON] statement runs the statement
    i = _skip_format(toks, v + 1)
    word = _word(toks, i)
    if (i < len(toks) and toks[i][0] == "(") or word in ("select", "with", "values") or word in _DML:
        part = _statement(toks[i:], ctx, depth + 1)
        return replace(part, reason=f"analyze {part.reason}", transaction=None, prepared_name=None)
    return _write("analyze table")


def _use(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if len(toks) == v + 2 and toks[v + 1][0] in ("w", "q"):
        return _read("use", session_state="use")
    return _write("use")


def _transaction_modes(toks: list[_Token], start: int) -> tuple[bool, bool]:
    """(READ ONLY, READ WRITE) among the transaction modes after start."""
    words = [t[1] for t in toks[start:] if t[0] == "w"]
    read_only = read_write = False
    for a, b in zip(words, words[1:], strict=False):
        if a == "read" and b == "only":
            read_only = True
        elif a == "read" and b == "write":
            read_write = True
    return read_only, read_write


def _begin(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "not":  # MariaDB BEGIN NOT ATOMIC ... END: a compound statement
        return _write("compound statement")
    return _write("begin", transaction="begin")


def _start(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) != "transaction":
        return _write("start")  # START SLAVE, START REPLICA, START GROUP_REPLICATION
    read_only, read_write = _transaction_modes(toks, v + 2)
    if read_only and not read_write:
        return _read("begin read only", transaction="begin_read_only")
    return _write("begin", transaction="begin", explicit=read_write)


def _ending(toks: list[_Token], v: int, marker: str) -> _Part:
    words = [t[1] for t in toks[v + 1:] if t[0] == "w"]
    reason = marker
    if "chain" in words and "no" not in words[:words.index("chain")]:
        reason = f"{marker} and chain"
    elif "release" in words and (words.index("release") == 0 or words[words.index("release") - 1] != "no"):
        reason = f"{marker} release"  # the server closes the connection afterwards
    return _read(reason, transaction=marker)


def _commit(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _ending(toks, v, "commit")


def _rollback(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if any(t == ("w", "to") for t in toks[v + 1:]):
        return _read("rollback to savepoint", transaction="savepoint")
    return _ending(toks, v, "rollback")


def _savepoint(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    return _read("savepoint", transaction="savepoint")


def _release(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "savepoint":
        return _read("release savepoint", transaction="savepoint")
    return _write("release")


def _xa(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    action = _word(toks, v + 1) or ""
    if action in ("start", "begin"):
        return _write("xa start", transaction="begin", explicit=True)
    if action in ("commit", "rollback"):
        return _write(f"xa {action}", transaction=action)
    return _write(f"xa {action}".strip())


def _assignments(toks: list[_Token], start: int) -> list[tuple[int, int]]:
    """The (start, stop) index ranges of the comma-separated items after start, at parenthesis depth 0."""
    ranges: list[tuple[int, int]] = []
    depth = 0
    first = start
    for i in range(start, len(toks)):
        kind = toks[i][0]
        if kind == "(":
            depth += 1
        elif kind == ")":
            depth -= 1
        elif kind == "," and depth == 0:
            ranges.append((first, i))
            first = i + 1
    ranges.append((first, len(toks)))
    return ranges


_SCOPES = frozenset({"global", "session", "local", "persist", "persist_only"})
_GLOBAL_SCOPES = frozenset({"global", "persist", "persist_only"})


@dataclass(frozen=True)
class Assignment:
    """One item of a SET statement."""

    # "u" user variable, "v" system variable, "names" (SET NAMES / SET CHARACTER SET / SET CHARSET),
    # "?" something else
    target: str
    # lower-case: "a" for @a; "sql_mode" for sql_mode, @@sql_mode, @@session.sql_mode; "names" or "character_set"
    name: str
    is_global: bool  # GLOBAL, PERSIST, PERSIST_ONLY, @@global.: the server's setting, not the session's
    value: tuple[tuple[str, str], ...]  # the value's tokens, after = or := (after NAMES / CHARACTER SET)


def set_assignments(toks: Sequence[tuple[str, str]]) -> list[Assignment] | None:
    """The items of a SET statement (its tokens, SET first). None for SET statements that assign no variable:
    SET TRANSACTION (the next transaction), SET STATEMENT ... FOR, SET PASSWORD, SET DEFAULT ROLE. SET SESSION
    TRANSACTION is one item named "transaction"."""
    toks = list(toks)
    first = _word(toks, 1)
    if _word(toks, 0) != "set" or first in ("statement", "transaction", "password") or (
            first == "default" and _word(toks, 2) == "role"):
        return None
    if first in _SCOPES and _word(toks, 2) == "transaction":
        return [Assignment("v", "transaction", first in _GLOBAL_SCOPES, tuple(toks[3:]))]
    items: list[Assignment] = []
    scope_global = False  # a GLOBAL/SESSION keyword holds for the assignments after it
    for a, b in _assignments(toks, 1):
        if _word(toks, a) in _SCOPES:
            scope_global = toks[a][1] in _GLOBAL_SCOPES
            a += 1
        if a >= b:
            items.append(Assignment("?", "", scope_global, ()))
            continue
        kind, text = toks[a]
        is_global = scope_global
        if kind == "w" and text == "names":
            items.append(Assignment("names", "names", False, tuple(toks[a + 1:b])))
            continue
        if kind == "w" and (text == "charset" or (text == "character" and _word(toks, a + 1) == "set")):
            j = a + 1 if text == "charset" else a + 2
            items.append(Assignment("names", "character_set", False, tuple(toks[j:b])))
            continue
        if kind == "u":
            target, name = "u", text
        elif kind == "v":
            prefix, _, name = text.rpartition(".")
            if prefix in _SCOPES:
                is_global = prefix in _GLOBAL_SCOPES
            target = "v"
        elif kind in ("w", "q"):
            target, name = "v", text.lower()
        else:
            items.append(Assignment("?", "", is_global, tuple(toks[a:b])))
            continue
        j = a + 1
        if j < b and toks[j] in (("o", "="), ("o", ":=")):
            j += 1
        items.append(Assignment(target, name, is_global, tuple(toks[j:b])))
    return items


def _autocommit(value: tuple[_Token, ...], ctx: _Context) -> str:
    """The state set by `autocommit = <value>`; a value not known to be on counts as off."""
    if len(value) == 1:
        kind, text = value[0]
        text = _string_value(text, ctx.no_backslash_escapes) if kind == "s" else text
        if text.lower() in ("1", "on", "true"):
            return "autocommit_on"
    return "autocommit_off"


def _set(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    first = _word(toks, v + 1)
    if first == "statement":  # MariaDB SET STATEMENT var = value [, ...] FOR statement
        return _set_statement(toks, v, ctx, depth)
    if first == "transaction":  # the next transaction only
        read_only, read_write = _transaction_modes(toks, v + 2)
        if read_only and not read_write:
            return _read("set transaction read only", transaction="set_transaction_read_only")
        return _write("set transaction")
    if first in _SCOPES and _word(toks, v + 2) == "transaction":
        if first in _GLOBAL_SCOPES:
            return _write(f"set {first} transaction")
        return _write("set session transaction", session_state="set")
    if first == "password" or (first == "default" and _word(toks, v + 2) == "role"):
        return _write(f"set {first}")  # account changes, not session state
    scanned = _query(toks, v + 1, ctx)  # the values may call functions that pin the session
    items = set_assignments(toks[v:]) or []
    user_variable = any(item.target == "u" for item in items)
    session = any(item.target != "u" and not item.is_global for item in items)
    autocommit: str | None = None
    for item in items:
        if item.target == "v" and item.name == "autocommit" and not item.is_global:
            autocommit = _autocommit(item.value, ctx)
    if scanned.session_state in PINNING_STATES:
        state: str | None = scanned.session_state
    elif user_variable:
        state = "user_variable"
    elif autocommit is not None:
        state = autocommit
    else:
        state = "set" if session else None
    return _write("set", session_state=state)


def _set_statement(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    depth_paren = 0
    for i in range(v + 2, len(toks)):
        kind = toks[i][0]
        if kind == "(":
            depth_paren += 1
        elif kind == ")":
            depth_paren -= 1
        elif toks[i] == ("w", "for") and depth_paren == 0:
            values = _query(toks[:i], v + 2, ctx)
            if values.route is Route.WRITE:
                return _write(f"set statement {values.reason}", session_state=values.session_state)
            part = _statement(toks[i + 1:], ctx, depth + 1)
            return replace(part, reason=f"set statement {part.reason}")
    return _write("set statement")


def _literal_text(toks: list[_Token], i: int, ctx: _Context) -> tuple[str | None, int]:
    """The text of a string literal at i ([_charset | N] 'a' 'b' ... [COLLATE c]) and the index after it."""
    return _literal_at(toks, i, ctx.no_backslash_escapes)


def _literal_at(toks: Sequence[_Token], i: int, no_backslash_escapes: bool) -> tuple[str | None, int]:
    word = _word(list(toks[i:i + 1]), 0)
    if word is not None and (word.startswith("_") or word == "n") and i + 1 < len(toks) and toks[i + 1][0] == "s":
        i += 1
    pieces: list[str] = []
    while i < len(toks) and toks[i][0] == "s":
        pieces.append(_string_value(toks[i][1], no_backslash_escapes))
        i += 1
    if pieces and i < len(toks) and toks[i] == ("w", "collate"):
        i += 2
    return ("".join(pieces) if pieces else None), i


def literal_text(value: Sequence[tuple[str, str]], no_backslash_escapes: bool) -> str | None:
    """The text of a value that is one literal: a string ([_charset | N] 'a' 'b' ... [COLLATE c]), a bare word
    (lower-case) or a number; None for anything else (an expression, a variable, a function call)."""
    text, end = _literal_at(value, 0, no_backslash_escapes)
    if text is not None and end == len(value):
        return text
    if len(value) == 1 and value[0][0] in ("w", "n"):
        return value[0][1]
    return None


def _prepare(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    name = _name(toks, v + 1)
    if _word(toks, v + 2) != "from":
        return _write("prepare", session_state="prepare", prepared_name=name)
    text, end = _literal_text(toks, v + 3, ctx)
    if text is None or end != len(toks):  # PREPARE s FROM @sql: unknown text
        return _write("prepare from variable", session_state="prepare", prepared_name=name)
    inner = _evaluate(text, ctx, depth + 1, use_hints=False)
    return _Part(inner.route, f"prepare {inner.reason}", session_state="prepare", prepared_name=name)


def _execute(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "immediate":  # MariaDB EXECUTE IMMEDIATE 'text' [USING ...]
        text, end = _literal_text(toks, v + 2, ctx)
        if text is None:
            return _write("execute immediate")
        args = _query(toks, end, ctx)
        if args.route is Route.WRITE:
            return _write(args.reason, session_state=args.session_state)
        inner = _evaluate(text, ctx, depth + 1, use_hints=False)
        return _Part(inner.route, f"execute immediate {inner.reason}", session_state=inner.session_state)
    name = _name(toks, v + 1)
    known = ctx.prepared.get(name) if name is not None else None
    if known is None:
        return _write("execute unknown prepared statement", prepared_name=name)
    if known is Route.WRITE:
        return _write("execute", prepared_name=name)
    args = _query(toks, v + 2, ctx)  # USING 1, @a: the arguments may call writing functions
    if args.route is Route.WRITE:
        return _write(args.reason, session_state=args.session_state, prepared_name=name)
    return _read("execute", session_state=args.session_state, prepared_name=name)


def _deallocate(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    i = v + 2 if _word(toks, v + 1) == "prepare" else v + 1
    return _write("deallocate", session_state="deallocate", prepared_name=_name(toks, i))


def _drop(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if _word(toks, v + 1) == "prepare":
        return _deallocate(toks, v, ctx, depth)
    return _write("drop")


def _create(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    i = v + 1
    if _word(toks, i) == "or" and _word(toks, i + 1) == "replace":
        i += 2
    if _word(toks, i) == "temporary":  # TABLE, or a MariaDB SEQUENCE
        return _write("create temporary", session_state="temp_table")
    return _write("create")


def _lock(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    what = _word(toks, v + 1)
    if what in ("table", "tables", "instance"):  # held by the session until UNLOCK
        return _write(f"lock {what}", session_state="lock_tables")
    return _write("lock")


def _unlock(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    what = _word(toks, v + 1)
    if what in ("table", "tables", "instance"):
        return _write(f"unlock {what}", session_state="unlock_tables")
    return _write("unlock")


def _flush(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    words = [t[1] for t in toks[v + 1:] if t[0] == "w"]
    locks = any(a == "read" and b == "lock" for a, b in zip(words, words[1:], strict=False))
    if locks or words[-2:] == ["for", "export"]:  # FLUSH TABLES ... WITH READ LOCK | FOR EXPORT
        return _write("flush with lock", session_state="lock_tables")
    return _write("flush")


def _backup(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    # MariaDB backup locks: BACKUP STAGE START ... BACKUP STAGE END, BACKUP LOCK t ... BACKUP UNLOCK
    words = [t[1] for t in toks[v + 1:v + 3] if t[0] == "w"]
    if words in (["stage", "end"], ["unlock"]):
        return _write("backup", session_state="unlock_tables")
    return _write("backup", session_state="lock_tables")


def _handler(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if ("w", "open") in toks[v + 2:v + 5]:  # HANDLER [db.]t OPEN: a cursor held by the session
        return _write("handler", session_state="handler")
    return _write("handler")


def _call_verb(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    # CALL [db.]p(...): a write unless the FunctionPolicy declares the procedure a read
    i = v + 1
    schema: str | None = None
    if i + 2 < len(toks) and toks[i][0] in ("w", "q") and toks[i + 1][0] == ".":
        schema = toks[i][1].lower()
        i += 2
    args = _query(toks, i, ctx)
    state = args.session_state
    if state is None or state == "user_variable_read":
        if any(t[0] == "u" for t in toks[i:]):  # CALL p(@out): an OUT parameter sets the variable
            state = "user_variable"
    name = toks[i][1].lower() if i < len(toks) and toks[i][0] in ("w", "q") else None
    if name is not None and ctx.functions is not None and ctx.functions.writes(schema, name) is False:
        if args.route is Route.WRITE:
            return _write(args.reason, session_state=state)
        if state == "user_variable":  # an OUT parameter: a variable set by the procedure, on the writer
            return _write("call with a user variable", session_state=state)
        return _read("call", session_state=state)
    return _write("call", session_state=state)


def _get(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
    if ("w", "diagnostics") in toks[v + 1:v + 3]:  # GET [CURRENT | STACKED] DIAGNOSTICS @a = ...
        state = "user_variable" if any(t[0] == "u" for t in toks) else None
        return _write(_DIAGNOSTICS, session_state=state)
    return _write("get")


def _constant(route: Route, reason: str) -> _Handler:
    def handler(toks: list[_Token], v: int, ctx: _Context, depth: int) -> _Part:
        return _Part(route, reason)
    return handler


_VERBS: dict[str, _Handler] = {
    "select": _query_verb, "with": _query_verb, "values": _query_verb, "table": _query_verb,
    "show": _show, "explain": _explain, "describe": _explain, "desc": _explain, "analyze": _analyze,
    "help": _constant(Route.READ, "help"), "use": _use,
    "insert": _dml, "replace": _dml, "update": _dml, "delete": _dml, "load": _dml, "do": _dml,
    "call": _call_verb, "create": _create, "drop": _drop,
    "lock": _lock, "unlock": _unlock, "flush": _flush, "backup": _backup, "handler": _handler,
    "prepare": _prepare, "execute": _execute, "deallocate": _deallocate,
    "begin": _begin, "start": _start, "commit": _commit, "rollback": _rollback,
    "savepoint": _savepoint, "release": _release, "xa": _xa,
    "set": _set, "get": _get,
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
    if v > 0:  # (SELECT ...) UNION (SELECT ...)
        part = _query(toks, 0, ctx) if verb in ("select", "values", "table", "with") else _write(verb)
    else:
        handler = _VERBS.get(verb)
        if handler is None:
            return _write(verb)  # ALTER, TRUNCATE, RENAME, GRANT, OPTIMIZE, REPAIR, KILL, CHANGE, PURGE, DELIMITER ...
        part = handler(toks, v, ctx, depth)
    if part.route is Route.READ and part.session_state in PINNING_STATES:
        return replace(part, route=Route.WRITE)  # the session will be pinned to the writer: set it up there
    return part


# ---------------------------------------------------------------------------------------------------------------
# A whole query (COM_QUERY text, possibly several statements)


def _combine(parts: list[_Part]) -> tuple[list[_Part], str | None]:
    """The parts (a BEGIN after SET TRANSACTION READ ONLY becomes a read-only BEGIN) and the query's transaction
    marker.

    The marker says what the query leaves behind: a BEGIN not closed in the same query is reported ("begin"
    or "begin_read_only"); a BEGIN ... COMMIT pair inside the query is self-contained and reports nothing;
    a COMMIT/ROLLBACK that closes a transaction opened before this query is reported; SAVEPOINT and a
    SET TRANSACTION READ ONLY still waiting for its transaction are reported only when nothing else is.
    """
    parts = list(parts)
    open_idx: int | None = None
    saw_begin = False
    pending_read_only = False
    closed: str | None = None
    other: str | None = None
    for idx, part in enumerate(parts):
        marker = part.transaction
        if marker in ("begin", "begin_read_only"):
            if pending_read_only and marker == "begin" and not part.explicit:
                parts[idx] = replace(part, route=Route.READ, reason="begin read only", transaction="begin_read_only")
            if other == "set_transaction_read_only":
                other = None  # used up by this transaction
            pending_read_only = False
            open_idx = idx
            saw_begin = True
        elif marker in ("commit", "rollback"):
            if open_idx is None:
                closed = marker
            open_idx = None
        elif marker == "set_transaction_read_only" and open_idx is None:
            pending_read_only = True
            if other is None:
                other = marker
        elif marker is not None and not saw_begin and other is None:
            other = marker
    if open_idx is not None:
        return parts, parts[open_idx].transaction
    return parts, closed or other


_MULTIBYTE_RISK = re.compile(r"[^\x00-\x7f][\\`]")
_MAX_RELEXES = 8  # sql_mode changes followed by more statements in one query; more is read as uncertain


def _dialect_after(toks: list[_Token], dialect: MyDialect, no_backslash_escapes: bool) -> MyDialect:
    """The lexical settings after a statement ran: SET sql_mode, SET NAMES, SET character_set_client change them;
    an EXECUTE may run any text."""
    verb = _word(toks, 0)
    if verb == "execute":
        return MyDialect()
    if verb != "set":
        return dialect
    for item in set_assignments(toks) or []:
        if item.target == "names" or (item.target == "v" and item.name == "character_set_client"):
            if not item.is_global:
                value = literal_text(item.value[:1], no_backslash_escapes)
                dialect = dialect.with_charset(None if value in (None, "default") else value)
        elif item.target == "v" and item.name == "sql_mode":
            if item.is_global:  # the session's value stays, but what the server starts others with is unknown
                dialect = MyDialect(None, None, dialect.charset)
            else:
                value = literal_text(item.value, no_backslash_escapes)
                dialect = dialect.with_sql_mode(None if value in (None, "default") else value)
    return dialect


def _lexes_alike(a: MyDialect, b: MyDialect) -> bool:
    return (a.no_backslash_escapes == b.no_backslash_escapes and a.ansi_quotes == b.ansi_quotes
            and a.multibyte_risk == b.multibyte_risk)


@dataclass(slots=True)
class _Reading:
    """The query read one way: with known sql_mode flags, executable comments as code or as comments."""

    statements: list[_Statement]
    parts: list[_Part]  # one per statement; empty after a lexical error
    dialects: list[MyDialect]  # the settings each statement was read with
    hints: list[tuple[int, str]]
    error: str | None  # a lexical error: the server refuses the query from that statement on
    uncertain: str | None  # the text cannot be read for sure here
    dialect_after: MyDialect
    verdict: Classification | None = None

    def key(self) -> tuple[object, ...]:
        """What must not differ between two readings for the query to be read for sure."""
        v = self.verdict
        assert v is not None
        return (v.route, v.hint, v.transaction, v.session_state, v.prepared_name,
                [(s.start, s.end) for s in self.statements], [p.session_state for p in self.parts])


def _choices(dialect: MyDialect, sql: str, offset: int) -> list[MyDialect]:
    """Concrete settings to read sql[offset:] with: both values of an unknown flag whose character is there."""
    fork_nbe = dialect.no_backslash_escapes is None and sql.find("\\", offset) >= 0
    fork_ansi = dialect.ansi_quotes is None and sql.find('"', offset) >= 0
    if not fork_nbe and not fork_ansi:
        return [dialect]  # an unknown flag that cannot matter is read as off
    nbe = [False, True] if fork_nbe else [dialect.no_backslash_escapes]
    ansi = [False, True] if fork_ansi else [dialect.ansi_quotes]
    return [MyDialect(a, b, dialect.charset) for a in nbe for b in ansi]


def _readings(sql: str, functions: FunctionPolicy | None, prepared: Mapping[str, Route], dialect: MyDialect,
              as_code: bool, offset: int, depth: int, budget: list[int], track: bool = False) -> list[_Reading]:
    """The readings of sql[offset:]. A statement that changes how the rest lexes (SET sql_mode, SET NAMES) is
    followed by a new reading of the rest, as the server lexes each statement of a query once the previous one
    has run. `track`: work out the settings after the last statement too (for the session's tracker)."""
    readings: list[_Reading] = []
    n = len(sql)
    for settings in _choices(dialect, sql, offset):
        nbe, ansi = bool(settings.no_backslash_escapes), bool(settings.ansi_quotes)
        ctx = _Context(functions, prepared, ansi, nbe)
        lexed = _lex(sql, ansi, nbe, as_code, offset)
        statements = _split(lexed, n, offset)
        uncertain = None
        if settings.multibyte_risk and not sql.isascii() and _MULTIBYTE_RISK.search(sql, offset):
            uncertain = (f"a backslash or backtick after a non-ASCII character "
                         f"(character_set_client {settings.charset or 'unknown'})")
        if lexed.error is not None:
            readings.append(_Reading(statements, [], [settings] * len(statements), lexed.hints, lexed.error,
                                     uncertain, MyDialect()))
            continue
        parts: list[_Part] = []
        current = dialect  # what is known of the settings (lexing goes on with the concrete `settings`)
        forked = False
        for k, statement in enumerate(statements):
            parts.append(_statement(statement.tokens, ctx, depth))
            last = k + 1 == len(statements)
            if last and not track:
                break
            after = _dialect_after(statement.tokens, current, nbe)
            if not last and not _lexes_alike(after, current):
                budget[0] -= 1
                if budget[0] >= 0:
                    head = [settings] * (k + 1)  # this segment was read with one setting
                    head_hints = [h for h in lexed.hints if h[0] < statement.end]
                    for rest in _readings(sql, functions, prepared, after, as_code, statement.end + 1, depth, budget,
                                          track):
                        readings.append(_Reading(statements[:k + 1] + rest.statements, parts + rest.parts,
                                                 head + rest.dialects, head_hints + rest.hints, rest.error,
                                                 uncertain or rest.uncertain, rest.dialect_after))
                    forked = True
                    break
                uncertain = uncertain or "too many sql_mode changes in one query"
            current = after
        if not forked:
            readings.append(_Reading(statements, parts, [settings] * len(statements), lexed.hints, None, uncertain,
                                     MyDialect() if uncertain else current))
    return readings


def _verdict(reading: _Reading, use_hints: bool) -> Classification:
    count = len(reading.statements)
    if reading.error is not None:
        return Classification(Route.WRITE, reading.error, statements=count)
    hints = [h for _, h in reading.hints] if use_hints else []
    hint = "writer" if "writer" in hints else ("reader" if hints else None)
    if count == 0:
        route = Route.READ if hint != "writer" else Route.WRITE
        return Classification(route, "hint" if hint else "empty", hint=hint, statements=0)
    parts, transaction = _combine(reading.parts)
    reading.parts = parts
    writes = [p for p in parts if p.route is Route.WRITE]
    route = Route.WRITE if writes else Route.READ
    reason = (writes or parts)[0].reason
    states = [p.session_state for p in parts if p.session_state is not None]
    autocommit = [s for s in states if s.startswith("autocommit_")]
    pinning = [s for s in states if s in _REPORT_FIRST]
    session_state = pinning[0] if pinning else (autocommit[-1] if autocommit else _pick_state(states))
    prepared_name = next((p.prepared_name for p in parts if p.prepared_name is not None), None)
    if hint is not None:
        route = Route.WRITE if hint == "writer" else Route.READ
        reason = "hint"
    return Classification(route, reason, hint=hint, transaction=transaction, session_state=session_state,
                          statements=count, prepared_name=prepared_name)


def _agree(readings: list[_Reading], use_hints: bool) -> tuple[Classification, str | None]:
    """The verdict on readings that differ only in unknown sql_mode flags: the first one if they all agree,
    else WRITE (with why)."""
    for r in readings:
        r.verdict = _verdict(r, use_hints)
    first = readings[0].verdict
    assert first is not None
    uncertain = next((r.uncertain for r in readings if r.uncertain is not None), None)
    if uncertain is not None:
        return replace(first, route=Route.WRITE, reason=uncertain, hint=None), uncertain
    key = readings[0].key()
    if any(r.key() != key for r in readings[1:]):
        problem = "sql_mode unknown: the query reads several ways"
        return replace(first, route=Route.WRITE, reason=problem, hint=None), problem
    return first, None


@dataclass(slots=True)
class _Outcome:
    classification: Classification
    problem: str | None  # why the query cannot be read for sure (not a lexical error), or None
    readings: list[_Reading]  # the first is the code reading the classification stands on


def _evaluate_text(sql: str, functions: FunctionPolicy | None, prepared: Mapping[str, Route], dialect: MyDialect,
                   depth: int, use_hints: bool, track: bool = False) -> _Outcome:
    """All readings of a query: every value of an unknown sql_mode flag that matters, and executable comments
    that may or may not run (versioned, MariaDB-only) as code and as comments."""
    if depth > _MAX_DEPTH:
        return _Outcome(Classification(Route.WRITE, "nested too deeply"), None, [])
    budget = [_MAX_RELEXES]
    code = _readings(sql, functions, prepared, dialect, True, 0, depth, budget, track)
    verdict, problem = _agree(code, use_hints)
    readings = list(code)
    if problem is None and verdict.route is Route.READ and verdict.hint is None and _has_conditional(sql):
        other_readings = _readings(sql, functions, prepared, dialect, False, 0, depth, budget)
        other, other_problem = _agree(other_readings, use_hints)
        readings += other_readings
        if other_problem is not None:
            return _Outcome(replace(other, statements=verdict.statements), other_problem, readings)
        if other.route is Route.WRITE:
            return _Outcome(replace(other, statements=verdict.statements), None, readings)
    return _Outcome(verdict, problem, readings)


_CONDITIONAL = re.compile(r"/\*(?:M!|![0-9]{5})")


def _has_conditional(sql: str) -> bool:
    """Whether the text may hold a versioned or MariaDB-only executable comment (a cheap over-approximation)."""
    return "/*" in sql and _CONDITIONAL.search(sql) is not None


def _evaluate(sql: str, ctx: _Context, depth: int, use_hints: bool) -> Classification:
    """A text inside a statement (PREPARE ... FROM '...', EXECUTE IMMEDIATE '...'): read with the settings of
    the statement that holds it (its bytes were checked with it)."""
    dialect = MyDialect(ctx.no_backslash_escapes, ctx.ansi_quotes, "binary")
    return _evaluate_text(sql, ctx.functions, ctx.prepared, dialect, depth, use_hints).classification


_UNKNOWN = MyDialect()


def _dialect(dialect: MyDialect | None, ansi_quotes: bool | None, no_backslash_escapes: bool | None) -> MyDialect:
    dialect = dialect if dialect is not None else _UNKNOWN
    if ansi_quotes is not None:
        dialect = replace(dialect, ansi_quotes=ansi_quotes)
    if no_backslash_escapes is not None:
        dialect = replace(dialect, no_backslash_escapes=no_backslash_escapes)
    return dialect


def classify(sql: str, functions: FunctionPolicy | None = None, prepared: Mapping[str, Route] | None = None, *,
             dialect: MyDialect | None = None, ansi_quotes: bool | None = None,
             no_backslash_escapes: bool | None = None) -> Classification:
    """Classify the text of one COM_QUERY (any number of statements) or COM_STMT_PREPARE for the readwrite
    endpoint.

    `dialect` is the session's lexical settings (MySessionState.dialect); `ansi_quotes` and
    `no_backslash_escapes`, when given, override its flags. An unknown flag is read both ways when the text holds
    its character (a backslash, a double quote), and the query is WRITE unless the readings agree; a SET sql_mode
    in the query changes how the statements after it are read. `prepared` maps SQL-level prepared statement names
    (lower-cased, as `Classification.prepared_name` reports them) to the route their PREPARE had; EXECUTE of a
    name not in it is WRITE. `functions` is the cluster's read_functions/write_functions (a SELECT calling a
    write function is a write; a function or procedure named in read_functions is a read).

    Hints in comments (`/* endpoint: writer */`, `-- endpoint: reader`, `# endpoint: writer`) anywhere in the
    query decide the route of the whole query; a writer hint wins over a reader hint. A query that does not lex
    (unterminated literal or comment) or cannot be read for sure is WRITE and ignores hints. For per-statement
    detail see `analyze`.
    """
    try:
        known = prepared if prepared is not None else {}
        d = _dialect(dialect, ansi_quotes, no_backslash_escapes)
        return _evaluate_text(sql, functions, known, d, 0, True).classification
    except Exception:  # a bug here must not break a session: send the query to the writer
        return Classification(Route.WRITE, "classifier error")


@dataclass(frozen=True)
class StatementInfo:
    """One statement of a query, as the session-state tracker needs it."""

    text: str  # the statement, its comments kept, its ';' and surrounding whitespace not
    route: Route
    reason: str
    session_state: str | None = None  # a key of session_kinds.MY_STATE_KINDS
    prepared_name: str | None = None
    tokens: tuple[tuple[str, str], ...] = ()  # the lexer's tokens (kinds: see the Lexer section of this file)
    dialect: MyDialect = MyDialect()  # the settings it was read with (a SET before it may have changed them)


@dataclass(frozen=True)
class Analysis:
    """A query statement by statement (its first reading when there are several)."""

    classification: Classification
    statements: tuple[StatementInfo, ...]
    dialect: MyDialect  # the settings after the query, if all of it ran
    # why the query cannot be read for sure (a lexical error, an unknown flag the readings disagree on, a
    # multibyte character set), or None
    problem: str | None = None
    uncertain: bool = False  # the problem is not a lexical error: the server may well run the text
    states: frozenset[str] = frozenset()  # session states any reading sets up


def analyze(sql: str, functions: FunctionPolicy | None = None, prepared: Mapping[str, Route] | None = None, *,
            dialect: MyDialect | None = None) -> Analysis:
    """`classify`, statement by statement. Never raises."""
    d = _dialect(dialect, None, None)
    try:
        outcome = _evaluate_text(sql, functions, prepared if prepared is not None else {}, d, 0, True, track=True)
    except Exception:  # a bug here must not break a session
        return Analysis(Classification(Route.WRITE, "classifier error"), (), MyDialect(), "classifier error", True)
    if not outcome.readings:
        return Analysis(outcome.classification, (), MyDialect(), outcome.classification.reason, True)
    first = outcome.readings[0]
    statements: list[StatementInfo] = []
    for index, statement in enumerate(first.statements):
        text = sql[statement.start:statement.end].strip()
        tokens = tuple(statement.tokens)
        used = first.dialects[index] if index < len(first.dialects) else d
        if index >= len(first.parts):
            statements.append(StatementInfo(text, Route.WRITE, first.error or "unread", tokens=tokens, dialect=used))
            continue
        p = first.parts[index]
        statements.append(StatementInfo(text, p.route, p.reason, p.session_state, p.prepared_name, tokens, used))
    states = frozenset(p.session_state for r in outcome.readings for p in r.parts if p.session_state is not None)
    problem = outcome.problem or first.error
    return Analysis(outcome.classification, tuple(statements), first.dialect_after, problem,
                    outcome.problem is not None, states)


def split_statements(sql: str, *, ansi_quotes: bool = False, no_backslash_escapes: bool = False) -> list[str]:
    """The statements of a COM_QUERY, split on ';' by the lexer; empty statements are dropped.

    A ';' inside parentheses or inside the BEGIN ... END body of a stored program (CREATE PROCEDURE, FUNCTION,
    TRIGGER, EVENT; MariaDB's compound statements) does not split. Executable comments count as code. Each
    statement keeps its comments and loses its terminating ';' and surrounding whitespace. When the text does
    not lex, the unterminated rest is the last statement. The settings hold for the whole text (see `analyze`
    for a query that changes them).
    """
    lexed = _lex(sql, ansi_quotes, no_backslash_escapes, True)
    return [sql[s.start:s.end].strip() for s in _split(lexed, len(sql))]
