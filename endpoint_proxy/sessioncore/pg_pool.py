"""PostgreSQL transaction pooling, sans-IO: what a pooled server connection carries, and what a
session must send it to make it its own.

Rules of this file:
- A pooled connection's ``PooledMark`` is the truth the pool keeps about it: the settings it has
  (by GUC name, each with the statement that set it), its SQL-level prepared statements, and its
  protocol-level prepared statements under proxy-wide names (``server_statement_name``: the same
  statement text and parameter types get the same name on every connection, whoever parsed it).
- A session brings a borrowed connection to its own state by the difference: nothing is sent
  when nothing differs (the common case); a setting the connection has and the session does not
  is RESET; statements that cannot be undone one by one (SET ROLE, SET SESSION AUTHORIZATION,
  a changed order of those) rebuild the settings from scratch.
- Startup parameters are settings too: a pooled connection is opened with the user and database
  only, and a client's own startup values (application_name, TimeZone, options -c ...) are SETs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..protocol.pg import messages as m
from ..routing.session_state import SessionState

__all__ = ["PooledMark", "StartupError", "diff_statements", "server_statement_name", "startup_settings",
           "desired_settings", "SETTINGS_REBUILD"]

# Startup parameters that are not settings: who logs in where, and protocol options.
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})
# Resets everything a session may have set (role and session authorization included); the desired
# settings follow. Not DISCARD ALL: that would drop the connection's prepared statements too.
SETTINGS_REBUILD = ("SET SESSION AUTHORIZATION DEFAULT", "RESET ROLE", "RESET ALL")


class StartupError(ValueError):
    """A startup parameter a transaction-mode endpoint cannot turn into a setting."""


def server_statement_name(body: bytes) -> bytes:
    """The proxy-wide name of a prepared statement: ``body`` is a Parse payload after the
    statement name (the query, its NUL, the parameter types)."""
    return b"ep_" + hashlib.blake2b(body, digest_size=10).hexdigest().encode()


# Statements seen lately, shared by the sessions that prepare them (body -> (server name, body)):
# thousands of clients of one application prepare the same few statements, and each session's
# record of one is then a reference, not copies of its text and name. Bounded: past the limit a
# statement is simply not shared.
class Statement(NamedTuple):
    """A prepared statement as the server connections know it. A class, not a bare tuple type:
    compiled code (mypyc) copies a fixed tuple type by value, so the record would not be shared."""

    server: bytes  # the proxy-wide name
    body: bytes  # the Parse body after the client's name


_STATEMENTS: dict[bytes, Statement] = {}
_STATEMENTS_LIMIT = 4096


def shared_statement(body: bytes) -> Statement:
    """(server name, body) of a Parse body, the same object for every session that has it."""
    known = _STATEMENTS.get(body)
    if known is None:
        known = Statement(server_statement_name(body), body)
        if len(_STATEMENTS) < _STATEMENTS_LIMIT:
            _STATEMENTS[body] = known
    return known


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _set_config(name: str, value: str) -> str:
    return f"SELECT pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"


# Settings dicts are never changed once made: clients that log in with the same parameters
# share one (an idle pooled session costs no copy of them).
_SHARED: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}


def shared(settings: dict[str, str]) -> dict[str, str]:
    """The one copy of these settings (the caller's if it is the first); not to be changed."""
    key = tuple(settings.items())
    known = _SHARED.get(key)
    if known is not None:
        return known
    if len(_SHARED) >= 1024:
        _SHARED.clear()
    _SHARED[key] = settings
    return settings


def startup_settings(params: Mapping[str, str]) -> dict[str, str]:
    """A client's startup parameters as settings (GUC name -> the statement that sets it).
    ``options`` may carry ``-c name=value`` / ``--name=value`` items (spaces escaped with a
    backslash, as libpq does); any other option is refused with StartupError. The result is
    shared between sessions: not to be changed."""
    out: dict[str, str] = {}
    for name, value in params.items():
        if name in _NOT_SETTINGS or name.startswith("_pq_."):
            continue
        out[name.lower()] = _set_config(name.lower(), value)
    options = params.get("options")
    if options:
        for name, value in _parse_options(options):
            out[name.lower()] = _set_config(name.lower(), value)
    return shared(out)


def _split_options(options: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                items.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        items.append("".join(current))
    return items


def _parse_options(options: str) -> Iterable[tuple[str, str]]:
    items = _split_options(options)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "-c" and i + 1 < len(items):
            setting, i = items[i + 1], i + 2
        elif item.startswith("-c") and len(item) > 2:
            setting, i = item[2:], i + 1
        elif item.startswith("--") and "=" in item:
            setting, i = item[2:], i + 1
        else:
            raise StartupError(f"startup option {item!r} is not supported on a transaction-mode endpoint "
                               "(only -c name=value)")
        name, eq, value = setting.partition("=")
        if not eq or not name:
            raise StartupError(f"startup option {setting!r} is not name=value")
        yield name.replace("-", "_"), value


def desired_settings(startup: Mapping[str, str], state: SessionState) -> dict[str, str]:
    """The settings a session wants on its server: its startup settings, then its SET, RESET and
    set_config statements. Keys are GUC names; a statement whose target is not one setting
    (SET ROLE, SET SESSION AUTHORIZATION, SET SESSION CHARACTERISTICS) is keyed by its own text
    and kept in order. RESET name returns to the startup value, or to the server default.
    The result is not to be changed (with nothing set, it is ``startup`` itself)."""
    statements = state.settings()
    if not statements:
        return dict(startup) if not isinstance(startup, dict) else startup
    out = dict(startup)
    for target, sql in statements:
        if target is None:
            out.pop(sql, None)
            out[sql] = sql
        elif _is_reset(sql):
            out.pop(target, None)
            if target in startup:
                out[target] = startup[target]
        else:
            out.pop(target, None)
            out[target] = sql
    return shared(out)


def _is_reset(sql: str) -> bool:
    return sql.lstrip().lower().startswith("reset")


def _is_key(key: str) -> bool:
    """A GUC name (not a statement's text)."""
    return " " not in key


def diff_statements(have: Mapping[str, str] | None, want: Mapping[str, str]) -> list[str]:
    """What to run on a connection whose settings are ``have`` (None: not known) so that they are
    ``want``. Empty when they are the same."""
    if have is not None and have == want:
        return []
    raw_have = [k for k in have if not _is_key(k)] if have is not None else None
    raw_want = [k for k in want if not _is_key(k)]
    if have is None or raw_have != raw_want:
        return [*SETTINGS_REBUILD, *want.values()]
    out = [f"RESET {name}" for name in have if _is_key(name) and name not in want]
    out += [sql for name, sql in want.items() if have.get(name) != sql]
    return out


@dataclass(slots=True)
class PooledMark:
    """What one pooled server connection carries."""

    settings: dict[str, str] | None = field(default_factory=dict)  # None: not known (rebuild)
    sql_prepared: dict[str, str] = field(default_factory=dict)  # SQL PREPARE name -> statement
    statements: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # server names, LRU last
    # the session that last gave it back (Any, not object: mypyc cannot build a dataclass field of type object)
    owner: Any = None
    # That session's state (version, changes) then: the same owner and state need nothing.
    stamp_version: int = -1
    stamp_changes: int = -1

    def touch(self, name: bytes) -> None:
        self.statements.move_to_end(name)

    def evict(self, limit: int, keep: Iterable[bytes] = ()) -> list[bytes]:
        """Names to close so that at most ``limit`` stay (least recently used first; ``keep``
        are about to be used)."""
        if len(self.statements) <= limit:
            return []
        keep = set(keep)
        out: list[bytes] = []
        for name in list(self.statements):
            if len(self.statements) <= limit:
                break
            if name in keep:
                continue
            del self.statements[name]
            out.append(name)
        return out


def close_statement(name: bytes) -> bytes:
    return m.Close("S", name.decode()).encode()


# --- a session's prepared statements over pooled connections ------------------------------------
#
# The client's statement names are its own; on the server each statement has its proxy-wide name.
# A client Parse of a statement the borrowed connection has already is not sent (its ParseComplete
# is ours); a Bind or Describe of one it lacks is prepared there first (a Parse and Flush of our
# own, answered before the client's message goes); a client Close of a statement is ours to answer
# (other sessions may use the server's). Answers of ours must come in order: only once every message
# sent before has been answered (the ledger is empty), else the session holds the client's bytes,
# flushes the server, and waits.

# What the server owes for each message sent (the ledger's entries).
K_PARSE, K_BIND, K_CLOSE, K_DESCRIBE, K_EXECUTE, K_SYNC, K_QUERY = range(7)
_EXTENDED = frozenset((K_PARSE, K_BIND, K_CLOSE, K_DESCRIBE, K_EXECUTE))
# Server messages that end an answer, per entry kind.
_ENDS = {K_PARSE: b"1", K_BIND: b"2", K_CLOSE: b"3", K_DESCRIBE: b"Tn", K_EXECUTE: b"CIs",
         K_SYNC: b"Z", K_QUERY: b"Z"}
_END_TABLE = {kind: frozenset(ends) for kind, ends in _ENDS.items()}
LEDGER_SERVER_TYPES = b"123TnCIs"  # what the server side must scan for, besides ZSEGW

# Verdicts on a client message (StatementMap.client_message).
SEND, REWRITE, ANSWER, DRAIN, PREPARE = range(5)

_PARSE_COMPLETE = m.ParseComplete().encode()
_CLOSE_COMPLETE = m.CloseComplete().encode()
FLUSH = m.Flush().encode()


def _frame(type_: int, payload: bytes) -> bytes:
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + payload


class StatementMap:
    """One pooled session's prepared statements and the ledger of answers owed on its borrowed
    connection. Fed every client message sent there (``client_message``) and every server message
    of the ledger's types (``server_message``)."""

    __slots__ = ("statements", "mark", "ledger", "skipping", "out", "wanted")

    def __init__(self) -> None:
        self.statements: dict[bytes, Statement] = {}  # client name -> (server name, Parse body)
        self.mark: PooledMark | None = None  # the borrowed connection's
        self.ledger: list[object] = []  # entry kinds, or (K_PARSE, server name, client name)
        self.skipping = False  # the server skips extended messages until the next Sync (an error)
        self.out = b""  # REWRITE: the message to send; ANSWER: our answer to the client
        self.wanted: Sequence[Statement] = ()  # PREPARE: (server name, body) to prepare first

    @property
    def drained(self) -> bool:
        return not self.ledger

    def client_message(self, type_: int, payload: bytes) -> int:
        """What to do with a client message bound for the borrowed connection."""
        if type_ == 69:  # E (first: the most common message of a request)
            self._expect(K_EXECUTE)
            return SEND
        if type_ == 66:  # B
            cut = payload.find(b"\0") + 1
            return self._use(K_BIND, payload, cut, 66)
        if type_ == 80:  # P
            return self._parse(payload)
        if type_ == 68:  # D
            if payload[:1] == b"S" and len(payload) > 2:
                return self._use(K_DESCRIBE, payload, 1, 68)
            self._expect(K_DESCRIBE)
            return SEND
        if type_ == 67:  # C
            if payload[:1] == b"S" and len(payload) > 2:
                return self._close(payload[1:-1])
            self._expect(K_CLOSE)
            return SEND
        if type_ == 83:  # S
            self.ledger.append(K_SYNC)
            self.skipping = False
        elif type_ == 81 or type_ == 70:  # Q, F: answered up to ReadyForQuery
            self.ledger.append(K_QUERY)
        return SEND

    def _expect(self, kind: int, entry: object = None) -> None:
        if not self.skipping:
            self.ledger.append(kind if entry is None else entry)

    def _parse(self, payload: bytes) -> int:
        cut = payload.find(b"\0")
        if cut <= 0:  # the unnamed statement: the client's own, on this connection
            self._expect(K_PARSE)
            return SEND
        if self.skipping:
            return SEND  # the server skips it: nothing is created
        name = payload[:cut]
        self.statements[name] = known = shared_statement(payload[cut + 1:])
        server, body = known
        mark = self.mark
        assert mark is not None
        if server in mark.statements:
            if self.ledger:
                return DRAIN
            mark.touch(server)
            self.out = _PARSE_COMPLETE
            return ANSWER
        mark.statements[server] = None
        self.ledger.append((K_PARSE, server, name))
        self.out = _frame(80, server + b"\0" + body)
        return REWRITE

    def _use(self, kind: int, payload: bytes, at: int, type_: int) -> int:
        """Bind or Describe of a statement: ``payload[at:]`` starts with its name."""
        end = payload.find(b"\0", at)
        name = payload[at:end]
        known = self.statements.get(name) if name else None
        if known is None or self.skipping:
            self._expect(kind)
            return SEND
        server, body = known
        mark = self.mark
        assert mark is not None
        if server not in mark.statements:
            if self.ledger:
                return DRAIN
            self.wanted = [known]
            return PREPARE
        mark.touch(server)
        self.ledger.append(kind)
        self.out = _frame(type_, payload[:at] + server + payload[end:])
        return REWRITE

    def _close(self, name: bytes) -> int:
        if self.skipping:
            return SEND  # the server skips it; nothing closes
        if self.ledger:
            return DRAIN
        self.statements.pop(name, None)
        self.out = _CLOSE_COMPLETE
        return ANSWER

    def prepared(self, server: bytes, ok: bool) -> None:
        """Our own Parse of ``server`` on the borrowed connection was answered."""
        mark = self.mark
        assert mark is not None
        if ok:
            mark.statements[server] = None

    def server_message(self, type_: int) -> None:
        """A server message of LEDGER_SERVER_TYPES, E or Z, in order."""
        ledger = self.ledger
        if not ledger:
            return
        head = ledger[0]
        kind = head if isinstance(head, int) else head[0]  # type: ignore[index]
        if type_ == 69:  # ErrorResponse
            if kind not in _EXTENDED:
                return  # a simple query's error: ReadyForQuery ends it
            self._failed(ledger.pop(0))
            # The server skips every extended message up to the next Sync.
            while ledger and ledger[0] != K_SYNC:
                self._failed(ledger.pop(0))
            self.skipping = not ledger
            return
        if type_ in _END_TABLE[kind]:
            ledger.pop(0)

    def server_messages(self, msgs: Iterable[tuple[int, bytes, int]]) -> None:
        """``server_message`` for each of a chunk's scanned messages, in order."""
        ledger = self.ledger
        for type_, _, _ in msgs:
            if not ledger:
                return
            head = ledger[0]
            if type_ == 69 or type(head) is not int:
                self.server_message(type_)  # an error, or the answer to a Parse of ours
            elif type_ in _END_TABLE[head]:
                ledger.pop(0)

    def _failed(self, entry: object) -> None:
        """An entry the server answered with an error, or skipped: what it would have made is not there."""
        if isinstance(entry, tuple):
            _, server, name = entry
            mark = self.mark
            if mark is not None:
                mark.statements.pop(server, None)
            if self.statements.get(name, (None,))[0] == server:
                del self.statements[name]

    def detached(self) -> None:
        """The connection goes (back to its pool, or lost): nothing more is owed here."""
        self.mark = None
        self.ledger.clear()
        self.skipping = False
