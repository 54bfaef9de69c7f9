"""What a pooled MySQL/MariaDB server connection carries, and the commands that bring it to a session's state.

Rules of this file: pure. A pooled connection's ``PooledMark`` says what it carries whoever used it last: the
session-state entries it applied (MySessionState's ReplayEntry rows, in order, on top of the default database
it started from), its default database and multi-statement option now, and its prepared statements by text.
``plan`` compares that with a session's state and returns the commands that make them the same: none when
nothing differs (the common case: each borrow would otherwise cost round trips), else the undoing of what only
the connection has, by key (``SET @a = NULL``, ``SET SESSION x = DEFAULT``, ``DEALLOCATE PREPARE s``,
``USE db``), then the session's entries it lacks, in order. What cannot be undone by key (character-set
settings come from the handshake, SET ROLE, SET SESSION TRANSACTION, ...) falls back to COM_RESET_CONNECTION
(which keeps the handshake's character set and the default database) and the session's whole state.

Why entries may be applied by the difference: the same entries applied in the same order from the same start
give the same values (entries are replayable only when their values are; MySessionState pins otherwise). So
where the two lists share a prefix, the connection already holds what that prefix set; what its own tail set is
undone — unless the shared prefix set it too (then the prefix is shortened: undoing would give the default,
not the prefix's value) — and the session's tail runs on top.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..protocol.mysql import commands as c
from ..protocol.mysql import constants as k
from ..routing.my_session_state import ReplayEntry

# (SQL text, the default database it was prepared in, the settings that change how it parses: the texts of the
# session's sql_mode and character-set entries). Two sessions share a server statement only when all agree.
StatementKey = tuple[str, str | None, tuple[str, ...]]

# Settings whose DEFAULT is not what a fresh login has (the handshake sets the character set; an interactive
# client's wait_timeout is interactive_timeout; the database's character set follows the database) or that
# cannot be set back by name: these go by COM_RESET_CONNECTION.
_NOT_BY_DEFAULT = frozenset({
    "names", "character_set", "character_set_client", "character_set_results", "character_set_connection",
    "collation_connection", "character_set_database", "collation_database", "transaction", "role", "wait_timeout",
})
_VARIABLE = re.compile(r"[a-z_][a-z0-9_]*\Z")
# What changes how a statement text parses: part of a prepared statement's key.
PARSE_KEYS = frozenset({"sql_mode", "names", "character_set", "character_set_client", "character_set_connection",
                        "collation_connection"})


@dataclass(eq=False, slots=True)
class PooledMark:
    """What one pooled server connection carries (the session core keeps it up to date while it holds it)."""

    variant: tuple[int, int]  # (capabilities asked at login, character set): only such sessions may use it
    base_schema: str | None  # the default database its entries start from (its login's, or at its last reset)
    login_multi: bool  # multi-statements as its login's capabilities set them
    schema: str | None = None  # its default database now
    multi_statements: bool = False  # its multi-statement option now
    entries: tuple[ReplayEntry, ...] = ()  # the session-state entries it applied, in order
    prepared: OrderedDict[StatementKey, int] = field(default_factory=OrderedDict)  # least recently used first
    unknown: bool = False  # what it carries is not known (a replay failed there): reset it before use

    @classmethod
    def fresh(cls, variant: tuple[int, int], schema: str | None) -> PooledMark:
        """A connection just logged in with ``variant`` (capabilities, character set) into ``schema``."""
        multi = bool(variant[0] & k.CLIENT_MULTI_STATEMENTS)
        return cls(variant, schema, multi, schema, multi)


@dataclass(frozen=True, slots=True)
class Plan:
    """Commands (payloads, each answered) to run on a borrowed connection before the session's own."""

    commands: tuple[bytes, ...]
    reset: bool  # it starts with COM_RESET_CONNECTION (the connection's prepared statements are gone after it)


def plan(mark: PooledMark, entries: Sequence[ReplayEntry], base_schema: str | None, multi: bool, *,
         reset: bool = False) -> Plan | None:
    """Bring ``mark``'s connection to a session whose state is ``entries`` on top of ``base_schema``, with
    multi-statements ``multi`` (the same entries from the same base end in the same database). ``reset``: by
    COM_RESET_CONNECTION and the whole state (after an undo failed). None: this connection cannot be made to fit
    (it is in a database and the session in none)."""
    if reset or mark.unknown or mark.base_schema != base_schema:
        return _reset_plan(mark, entries, base_schema, multi)
    commands: list[bytes] = []
    if mark.multi_statements != multi:
        commands.append(set_option(multi))
    if not _same(mark.entries, entries):
        steps = _difference(mark.entries, entries, base_schema)
        if steps is None:
            return _reset_plan(mark, entries, base_schema, multi)
        commands += steps
    return Plan(tuple(commands), reset=False)


def applied(mark: PooledMark, entries: Sequence[ReplayEntry], base_schema: str | None, schema: str | None,
            multi: bool, *, reset: bool = False) -> None:
    """The connection now carries the session's state (a plan ran, or the session let go of it)."""
    if reset:
        mark.prepared.clear()  # COM_RESET_CONNECTION closed them
    mark.entries = tuple(entries)
    mark.base_schema = base_schema
    mark.schema = schema
    mark.multi_statements = multi
    mark.unknown = False


def set_option(multi: bool) -> bytes:
    option = k.MYSQL_OPTION_MULTI_STATEMENTS_ON if multi else k.MYSQL_OPTION_MULTI_STATEMENTS_OFF
    return bytes((c.COM_SET_OPTION,)) + option.to_bytes(2, "little")


def query(sql: str) -> bytes:
    return bytes((c.COM_QUERY,)) + sql.encode("utf-8", "surrogateescape")


def ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _same(a: Sequence[ReplayEntry], b: Sequence[ReplayEntry]) -> bool:
    return len(a) == len(b) and all(x is y or x.sql == y.sql for x, y in zip(a, b, strict=True))


def _keys(entries: Sequence[ReplayEntry]) -> set[str]:
    return {key.lower() for e in entries for key in e.sets}


def _difference(have: Sequence[ReplayEntry], want: Sequence[ReplayEntry],
                base_schema: str | None) -> list[bytes] | None:
    p = 0
    while p < len(have) and p < len(want) and (have[p] is want[p] or have[p].sql == want[p].sql):
        p += 1
    while True:
        undo = _keys(have[p:])
        if not undo & _keys(want[:p]):
            break
        p -= 1  # the shared prefix set something the connection's tail changed: apply it again
    tail = want[p:]
    undo = {key for key in undo if not _set_before_read(key, tail)}
    steps = _undo(undo, base_schema)
    if steps is None:
        return None
    return steps + [query(e.sql) for e in tail]


def _set_before_read(key: str, tail: Sequence[ReplayEntry]) -> bool:
    """Whether the session's tail sets ``key`` before anything reads it (then undoing it first is wasted)."""
    for e in tail:
        if key in {r.lower() for r in e.reads}:
            return False
        if key in {s.lower() for s in e.sets}:
            return True
    return False


def _undo(keys: set[str], base_schema: str | None) -> list[bytes] | None:
    """Statements that give ``keys`` back the value a fresh login has; None if one cannot be."""
    assignments: list[str] = []
    steps: list[bytes] = []
    for key in sorted(keys):
        if key.startswith("@"):
            assignments.append(f"@{ident(key[1:])} = NULL")  # a variable never set is NULL
        elif key.startswith("prepare:"):
            steps.append(query(f"DEALLOCATE PREPARE {ident(key[len('prepare:'):])}"))
        elif key == "schema":
            if base_schema is None:
                return None  # no statement leaves a database for none
            steps.append(query(f"USE {ident(base_schema)}"))
        elif key in _NOT_BY_DEFAULT or not _VARIABLE.match(key):
            return None
        else:
            assignments.append(f"SESSION {key} = DEFAULT")
    if assignments:
        steps.insert(0, query("SET " + ", ".join(assignments)))
    return steps


def _reset_plan(mark: PooledMark, entries: Sequence[ReplayEntry], base_schema: str | None,
                multi: bool) -> Plan | None:
    commands = [bytes((c.COM_RESET_CONNECTION,))]
    # COM_RESET_CONNECTION keeps the default database: go back to the session's base, unless its entries set
    # the database before anything reads it.
    if (mark.unknown or mark.schema != base_schema) and not _set_before_read("schema", entries):
        if base_schema is None:
            return None
        commands.append(query(f"USE {ident(base_schema)}"))
    if multi != mark.login_multi or mark.multi_statements != mark.login_multi or mark.unknown:
        commands.append(set_option(multi))  # (whether a reset restores the login's option is not relied on)
    commands += [query(e.sql) for e in entries]
    return Plan(tuple(commands), reset=True)
