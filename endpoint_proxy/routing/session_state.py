"""What a client session has set up on its backend, so it can be rebuilt on another one.

Rules of this file: pure bookkeeping fed the client's messages as the relay sees them.
Replayable: SET/RESET/DISCARD (as SQL text, in order), SQL-level PREPARE, and named
prepared statements of the extended protocol (their Parse messages, verbatim). Not
replayable (the session is *pinned*): LISTEN, temporary tables, session advisory locks,
WITH HOLD cursors. Startup parameters are the caller's; they go into every new backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .pg_classify import split_statements

# Statement heads that change session state. A light lexical check: the statement's first
# words, after comments and whitespace. SET LOCAL and SET TRANSACTION only last a transaction.
_LEADING_NOISE = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)
_WORDS = re.compile(r"[A-Za-z_]+")

_STATEFUL_HEADS = ("set", "reset", "discard", "prepare", "deallocate", "listen", "create", "declare", "/*", "--",
                   "(")

_STATEFUL_HEADS_B = tuple(h.encode() for h in _STATEFUL_HEADS)

_PINNING_FUNCTIONS = re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.I)


def _head_words(sql: str, n: int = 4) -> list[str]:
    rest = sql[_LEADING_NOISE.match(sql).end():]  # type: ignore[union-attr]
    return [w.lower() for w in _WORDS.findall(rest[:200])[:n]]


@dataclass
class SessionState:
    set_statements: list[str] = field(default_factory=list)
    sql_prepared: dict[str, str] = field(default_factory=dict)
    parse_messages: dict[str, bytes] = field(default_factory=dict)  # statement name -> raw Parse
    pinned_by: str | None = None
    # Bumped when SET values or prepared statements are wiped (RESET ALL, DISCARD ALL,
    # DEALLOCATE ALL): a backend that saw an older version must be rebuilt from scratch.
    version: int = 0
    # SET/RESET run inside a transaction only last if it commits: they wait here until its end.
    staged: list[tuple[str, str]] = field(default_factory=list)  # (head word, statement)

    @property
    def replayable(self) -> bool:
        return self.pinned_by is None

    def on_query_bytes(self, payload: bytes, status: str = "I") -> None:
        """A Query message's payload (text and its NUL): decoded only when it may matter.
        ``status`` is the session's transaction status (I, T, E) when it was sent."""
        if self.staged or status != "I":
            self.on_query(payload.rstrip(b"\0").decode("utf-8", "surrogateescape"), status)
            return
        head = payload[:16].lstrip().lower()
        if not head.startswith(_STATEFUL_HEADS_B) and b"advisory" not in payload:
            semicolon = payload.find(b";")
            if semicolon < 0 or not payload[semicolon + 1:].strip(b" \t\r\n\0"):
                return
        self.on_query(payload.rstrip(b"\0").decode("utf-8", "surrogateescape"))

    def on_query(self, sql: str, status: str = "I") -> None:
        """A simple-protocol Query (possibly several statements) the client sent, with the
        session's transaction status (I, T, E) when it was sent."""
        if self.staged and status == "I":
            self._end_transaction(committed=True)  # it ended some other way (extended protocol)
        # The hot path: most statements are plain DML or SELECT; a glance at the head
        # (and for the rare multi-statement or commented query, the full split) decides.
        head = sql[:16].lstrip().lower()
        if status == "I" and not head.startswith(_STATEFUL_HEADS) and "advisory" not in sql:
            semicolon = sql.find(";")
            # one statement, at most closed by its own semicolon: nothing to track
            if semicolon < 0 or not sql[semicolon + 1:].strip():
                return
        for statement in split_statements(sql):
            self._on_statement(statement, status)

    def _end_transaction(self, *, committed: bool) -> None:
        staged, self.staged = self.staged, []
        if not committed:
            return
        for head, sql in staged:
            if head == "reset all":
                self.set_statements.clear()
                self.version += 1
            else:
                self.set_statements.append(sql)

    def _on_statement(self, sql: str, status: str = "I") -> None:
        words = _head_words(sql)
        if not words:
            return
        head = words[0]
        if status != "I" and head in ("commit", "end", "rollback", "abort"):
            if words[1:2] != ["to"] and words[1:2] != ["prepared"]:
                # COMMIT of a failed transaction rolls it back, as PostgreSQL does.
                self._end_transaction(committed=head in ("commit", "end") and status == "T")
            return
        if head == "set":
            if len(words) > 1 and words[1] in ("local", "transaction"):
                return
            if status != "I":
                self.staged.append(("set", sql.strip()))
            else:
                self.set_statements.append(sql.strip())
        elif head == "reset":
            kind = "reset all" if words[1:2] == ["all"] else "reset"
            if status != "I":
                self.staged.append((kind, sql.strip()))
            elif kind == "reset all":
                self.set_statements.clear()
                self.version += 1
            else:
                self.set_statements.append(sql.strip())
        elif head == "discard":
            if words[1:2] == ["all"]:
                self.set_statements.clear()
                self.sql_prepared.clear()
                self.parse_messages.clear()
                self.version += 1
        elif head == "prepare" and len(words) > 1 and words[1] != "transaction":
            self.sql_prepared[words[1]] = sql.strip()
        elif head == "deallocate":
            target = words[2] if words[1:2] == ["prepare"] and len(words) > 2 else (words[1] if len(words) > 1 else "")
            if target == "all":
                self.sql_prepared.clear()
                self.parse_messages.clear()
                self.version += 1
            else:
                self.sql_prepared.pop(target, None)
        elif head in ("listen",):
            self.pinned_by = self.pinned_by or "LISTEN"
        elif head == "create" and any(w in ("temp", "temporary") for w in words[1:3]):
            self.pinned_by = self.pinned_by or "temporary table"
        elif head == "declare" and "hold" in _WORDS.findall(sql.lower())[:12]:
            self.pinned_by = self.pinned_by or "WITH HOLD cursor"
        if _PINNING_FUNCTIONS.search(sql):
            self.pinned_by = self.pinned_by or "session advisory lock"

    def on_parse(self, name: str, raw_message: bytes) -> None:
        if name:
            self.parse_messages[name] = raw_message
        self._on_statement_text_for_pins(raw_message)

    def _on_statement_text_for_pins(self, raw_message: bytes) -> None:
        if b"advisory" in raw_message and _PINNING_FUNCTIONS.search(raw_message.decode("utf-8", "replace")):
            self.pinned_by = self.pinned_by or "session advisory lock"

    def on_close_statement(self, name: str) -> None:
        self.parse_messages.pop(name, None)

    def replay_sql(self) -> list[str]:
        """Statements to run, in order, on a fresh backend before the client's next request."""
        return [*self.set_statements, *self.sql_prepared.values()]


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
