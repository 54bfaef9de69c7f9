"""What a server's SQL lexer depends on in one session: MySQL's sql_mode flags and client character set,
PostgreSQL's standard_conforming_strings and client_encoding. None means not known for sure."""

# Rules of this file:
#
# - A dialect is a frozen value the session tracker keeps and hands to the classifier with each query.
# - None is "unknown": the classifier then reads a query every way the unknown setting allows (only when the
#   text holds the character that setting changes) and sends it to the writer when the readings disagree.
# - Multibyte client character sets whose second byte may be an ASCII backslash or backtick (GBK, Big5,
#   Shift-JIS and kin) hide those characters inside a letter: the proxy reads text decoded as UTF-8, so after a
#   non-ASCII character such a byte is not known to be what it looks like. An unknown character set counts as
#   one of those.

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

__all__ = [
    "MY_MULTIBYTE_RISK_CHARSETS",
    "PG_MULTIBYTE_RISK_ENCODINGS",
    "MyDialect",
    "PgDialect",
    "sql_mode_flags",
]

# MySQL/MariaDB character sets whose multibyte characters may end in a byte below 0x80 (0x40..0x7e): a
# backslash or a backtick there is half a letter to the server. ujis, eucjpms, euckr and gb2312 keep both bytes
# of a character at 0xa1 and above; utf8/utf8mb4 never use bytes below 0x80 inside a character.
MY_MULTIBYTE_RISK_CHARSETS: frozenset[str] = frozenset({"big5", "cp932", "gbk", "sjis", "gb18030"})

# PostgreSQL's client-only encodings (the server converts them before lexing, so a trailing 0x5c is no backslash).
PG_MULTIBYTE_RISK_ENCODINGS: frozenset[str] = frozenset({"BIG5", "GB18030", "GBK", "JOHAB", "SJIS",
                                                         "SHIFT_JIS_2004", "UHC"})

# sql_mode names that switch ANSI_QUOTES on: itself and the combination modes that include it (MariaDB has all
# of them; MySQL 8 kept ANSI only)
_ANSI_QUOTES_MODES = frozenset({"ANSI_QUOTES", "ANSI", "DB2", "MAXDB", "MSSQL", "ORACLE", "POSTGRESQL"})
_MODE_NAME = re.compile(r"[A-Za-z_0-9]+")


def sql_mode_flags(sql_mode: str) -> tuple[bool, bool] | None:
    """(NO_BACKSLASH_ESCAPES, ANSI_QUOTES) of a sql_mode value as the server accepts it: a comma-separated list
    of mode names, any case, or the number 0. None when the value is not one the server is sure to accept as
    written (another number, an odd character): the caller then knows nothing."""
    text = sql_mode.strip()
    if text == "0":
        return False, False
    if text.isdigit():
        return None  # a bit mask: the bits differ between MySQL and MariaDB versions
    names = [n.strip().upper() for n in text.split(",")] if text else []
    if any(n and not _MODE_NAME.fullmatch(n) for n in names):
        return None
    return "NO_BACKSLASH_ESCAPES" in names, any(n in _ANSI_QUOTES_MODES for n in names)


@dataclass(frozen=True)
class MyDialect:
    """The lexical settings of one MySQL/MariaDB session.

    `no_backslash_escapes` is the NO_BACKSLASH_ESCAPES sql_mode flag (every OK and EOF packet reports it in its
    status flags, SERVER_STATUS_NO_BACKSLASH_ESCAPES); `ansi_quotes` the ANSI_QUOTES flag (no packet reports
    it: known from the server's @@sql_mode or from the session's own SET statements); `charset` is
    character_set_client, lower-case (from the handshake's collation id, then SET NAMES / SET CHARACTER SET).
    """

    no_backslash_escapes: bool | None = None
    ansi_quotes: bool | None = None
    charset: str | None = None

    @classmethod
    def from_sql_mode(cls, sql_mode: str | None, charset: str | None = None) -> MyDialect:
        """The dialect of a session whose @@sql_mode is `sql_mode` (None: unknown)."""
        flags = sql_mode_flags(sql_mode) if sql_mode is not None else None
        if flags is None:
            return cls(None, None, _charset(charset))
        return cls(flags[0], flags[1], _charset(charset))

    def with_sql_mode(self, sql_mode: str | None) -> MyDialect:
        """This dialect after `SET sql_mode = <sql_mode>` (None: a value that is not known)."""
        return MyDialect.from_sql_mode(sql_mode, self.charset)

    def with_charset(self, charset: str | None) -> MyDialect:
        return replace(self, charset=_charset(charset))

    @property
    def known(self) -> bool:
        return self.no_backslash_escapes is not None and self.ansi_quotes is not None and self.charset is not None

    @property
    def multibyte_risk(self) -> bool:
        """Whether a backslash or backtick right after a non-ASCII character may be half of that character."""
        return self.charset is None or self.charset in MY_MULTIBYTE_RISK_CHARSETS


def _charset(name: str | None) -> str | None:
    if name is None:
        return None
    return name.strip().strip("'\"`").lower() or None


@dataclass(frozen=True)
class PgDialect:
    """The lexical settings of one PostgreSQL session: standard_conforming_strings ("on"/"off") and
    client_encoding, both reported by the server in ParameterStatus at login and whenever they change."""

    standard_conforming_strings: bool | None = None
    client_encoding: str | None = None

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> PgDialect:
        """From the server's ParameterStatus values (name -> value) the session has seen so far."""
        scs = params.get("standard_conforming_strings")
        encoding = params.get("client_encoding")
        return cls({"on": True, "off": False}.get(scs.lower()) if scs is not None else None,
                   encoding.upper() if encoding else None)

    def with_parameter(self, name: str, value: str) -> PgDialect:
        """This dialect after a ParameterStatus(name, value) from the server."""
        if name == "standard_conforming_strings":
            return replace(self, standard_conforming_strings={"on": True, "off": False}.get(value.lower()))
        if name == "client_encoding":
            return replace(self, client_encoding=value.upper() or None)
        return self

    @property
    def multibyte_risk(self) -> bool:
        """Whether a backslash right after a non-ASCII character may be half of that character."""
        return self.client_encoding is None or self.client_encoding in PG_MULTIBYTE_RISK_ENCODINGS
