"""The text of the SQL promotion: literals, libpq conninfo rewriting, MariaDB CHANGE MASTER.

Rules of this file: pure string functions; the statements run in ``server.promotion``.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.,:/@+-]+")


def pg_literal(value: str) -> str:
    """A PostgreSQL string literal that means ``value`` whatever standard_conforming_strings says."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def mysql_literal(value: str) -> str:
    """A MariaDB string literal (backslash escapes are on by default: escape them too)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_conninfo(text: str) -> list[tuple[str, str]]:
    """libpq's ``key=value`` form (values unquoted or in single quotes, with backslash
    escapes) as pairs in order; ValueError on anything else."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return pairs
        m = _KEY.match(text, i)
        if m is None:
            raise ValueError(f"malformed conninfo near {text[i:i + 20]!r}")
        key = m.group()
        i = m.end()
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise ValueError(f"conninfo key {key!r} has no value")
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted value in conninfo")
                c = text[i]
                if c == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                else:
                    value.append(text[i])
                    i += 1
        pairs.append((key, "".join(value)))


def format_conninfo(pairs: list[tuple[str, str]]) -> str:
    def quote(value: str) -> str:
        if _PLAIN_VALUE.fullmatch(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{k}={quote(v)}" for k, v in pairs)


def rewrite_conninfo(conninfo: str, host: str, port: int, application_name: str | None = None) -> str:
    """``conninfo`` (key=value or a postgresql:// URI) pointed at ``host``:``port``, every
    other setting kept (user, password, sslmode...); ``application_name`` replaced when given."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return _rewrite_uri(conninfo, host, port, application_name)
    pairs = [(k, v) for k, v in parse_conninfo(conninfo) if k not in ("host", "hostaddr", "port")]
    if application_name is not None:
        pairs = [(k, v) for k, v in pairs if k != "application_name"] + [("application_name", application_name)]
    return format_conninfo([("host", host), ("port", str(port)), *pairs])


def _rewrite_uri(uri: str, host: str, port: int, application_name: str | None) -> str:
    parts = urlsplit(uri)
    userinfo, at, _ = parts.netloc.rpartition("@")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("host", "hostaddr", "port")]
    if application_name is not None:
        query = [(k, v) for k, v in query if k != "application_name"] + [("application_name", application_name)]
    return urlunsplit((parts.scheme, f"{userinfo}{at}{where}", parts.path, urlencode(query), parts.fragment))


def build_conninfo(host: str, port: int, user: str, password: str | None, application_name: str) -> str:
    pairs = [("host", host), ("port", str(port)), ("user", user)]
    if password:
        pairs.append(("password", password))
    pairs.append(("application_name", application_name))
    return format_conninfo(pairs)


def change_master_sql(host: str, port: int, user: str | None = None, password: str | None = None) -> str:
    """CHANGE MASTER to a new primary with GTID (``slave_pos``). Without ``user`` the server
    keeps the replication credentials it has."""
    parts = [f"MASTER_HOST={mysql_literal(host)}", f"MASTER_PORT={int(port)}"]
    if user is not None:
        parts.append(f"MASTER_USER={mysql_literal(user)}")
        parts.append(f"MASTER_PASSWORD={mysql_literal(password or '')}")
    parts.append("MASTER_USE_GTID=slave_pos")
    return "CHANGE MASTER TO " + ", ".join(parts)
