"""The lexical settings of a session: sql_mode flags, character sets, standard_conforming_strings."""

from __future__ import annotations

import pytest

from endpoint_proxy.routing.dialect import MyDialect, PgDialect, sql_mode_flags


@pytest.mark.parametrize(("sql_mode", "flags"), [
    ("", (False, False)),
    ("0", (False, False)),
    ("STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION", (False, False)),
    ("NO_BACKSLASH_ESCAPES", (True, False)),
    ("ansi_quotes", (False, True)),
    ("ANSI", (False, True)),  # combination modes that include ANSI_QUOTES
    ("TRADITIONAL", (False, False)),
    ("ORACLE", (False, True)),
    ("MSSQL,NO_BACKSLASH_ESCAPES", (True, True)),
    ("DB2", (False, True)),
    ("MAXDB", (False, True)),
    ("POSTGRESQL", (False, True)),
    (" ANSI_QUOTES , STRICT_ALL_TABLES ", (False, True)),
    ("4", None),  # a bit mask: not worked out here
    ("ANSI QUOTES", None),
])
def test_sql_mode_flags(sql_mode: str, flags: tuple[bool, bool] | None) -> None:
    assert sql_mode_flags(sql_mode) == flags


def test_my_dialect() -> None:
    d = MyDialect.from_sql_mode("ANSI", "UTF8MB4")
    assert d == MyDialect(False, True, "utf8mb4") and d.known and not d.multibyte_risk
    assert d.with_sql_mode(None) == MyDialect(None, None, "utf8mb4")
    assert d.with_sql_mode("NO_BACKSLASH_ESCAPES") == MyDialect(True, False, "utf8mb4")
    assert d.with_charset("'gbk'").multibyte_risk
    assert MyDialect().multibyte_risk and not MyDialect().known
    for charset in ("big5", "cp932", "gbk", "sjis", "gb18030"):
        assert MyDialect(charset=charset).multibyte_risk
    for charset in ("utf8", "utf8mb4", "latin1", "ujis", "euckr", "gb2312", "binary"):
        assert not MyDialect(charset=charset).multibyte_risk


def test_pg_dialect() -> None:
    d = PgDialect.from_parameters({"standard_conforming_strings": "on", "client_encoding": "UTF8"})
    assert d == PgDialect(True, "UTF8") and not d.multibyte_risk
    assert d.with_parameter("standard_conforming_strings", "off").standard_conforming_strings is False
    assert d.with_parameter("client_encoding", "sjis") == PgDialect(True, "SJIS")
    assert d.with_parameter("client_encoding", "SJIS").multibyte_risk
    assert d.with_parameter("TimeZone", "UTC") == d
    assert PgDialect.from_parameters({}) == PgDialect() and PgDialect().multibyte_risk
