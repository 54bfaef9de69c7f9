"""Client commands: vectors, query attributes, statement id mapping, COM_STMT_PREPARE_OK, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import LocalProtocolError
from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql.errors import MySQLProtocolError

from .strategies import COMMAND_CAPS, attribute, commands, h, hex_text, text

ROUND_TRIP = settings(max_examples=80, deadline=None)
QA = k.CLIENT_QUERY_ATTRIBUTES
SELECT = "select @@version_comment limit 1"

VECTORS: list[tuple[bytes, int, c.ClientCommand]] = [
    (h("03", hex_text(SELECT)), 0, c.ComQuery(SELECT)),
    (h("02", hex_text("shop")), 0, c.ComInitDb("shop")),
    (h("04", hex_text("t"), "00", hex_text("a%")), 0, c.ComFieldList("t", b"a%")),
    (h("16", hex_text("select ?")), 0, c.ComStmtPrepare("select ?")),
    (
        h("17 01000000 00 01000000 00 01 0300 2a000000"),
        0,
        c.ComStmtExecute(1, 0, 1, h("00 01 0300 2a000000")),
    ),
    (h("18 02000000 0100", hex_text("abc")), 0, c.ComStmtSendLongData(2, 1, b"abc")),
    (h("19 03000000"), 0, c.ComStmtClose(3)),
    (h("1a 04000000"), 0, c.ComStmtReset(4)),
    (h("1c 05000000 0a000000"), 0, c.ComStmtFetch(5, 10)),
    (h("1b 0100"), 0, c.ComSetOption(k.MYSQL_OPTION_MULTI_STATEMENTS_OFF)),
    (h("0e"), 0, c.Command(c.COM_PING)),
    (h("01"), 0, c.Command(c.COM_QUIT)),
    (h("1f"), 0, c.Command(c.COM_RESET_CONNECTION)),
    (
        h("11", hex_text("bob"), "00 03 010203", hex_text("db"), "00 2d00", hex_text("mysql_native_password"), "00"),
        COMMAND_CAPS,
        c.ComChangeUser("bob", b"\1\2\3", "db", 45, "mysql_native_password"),
    ),
    # With CLIENT_QUERY_ATTRIBUTES and no attributes: parameter_count 0, parameter_set_count 1.
    (h("03 00 01", hex_text(SELECT)), QA, c.ComQuery(SELECT)),
    # One string attribute a='1' (the docs' example, with its length corrected).
    (
        h("03 01 01 00 01 fe00 01 61 01 31", hex_text(SELECT)),
        QA,
        c.ComQuery(SELECT, (c.QueryAttribute("a", 0xFE, 0, h("01 31")),)),
    ),
    # A NULL attribute and a LONGLONG one: the NULL has no value bytes.
    (
        h("03 02 01 01 01 0300 01 6e 0880 01 69 0700000000000000", hex_text("select 1")),
        QA,
        c.ComQuery(
            "select 1",
            (c.QueryAttribute("n", 0x03, 0, None), c.QueryAttribute("i", 0x08, 0x80, h("0700000000000000"))),
        ),
    ),
]


@pytest.mark.parametrize(("wire", "caps", "command"), VECTORS)
def test_vectors(wire: bytes, caps: int, command: c.ClientCommand) -> None:
    assert c.decode_command(wire, caps) == command
    assert command.encode(caps) == wire


def test_query_text_skips_attributes() -> None:
    assert c.query_text(h("03 01 01 00 01 fe00 01 61 01 31", hex_text(SELECT)), QA) == SELECT
    assert c.query_text(h("03", hex_text(SELECT)), 0) == SELECT


def test_non_utf8_query_survives() -> None:
    wire = b"\x03select '\xe9t\xe9'"  # latin1
    query = c.decode_command(wire, 0)
    assert isinstance(query, c.ComQuery)
    assert query.query.startswith("select '")
    assert query.encode(0) == wire


@pytest.mark.parametrize(
    "wire",
    [
        h("03 05 01 00 01 fe00 01 61", hex_text("x")),  # 5 attributes announced, not there
        h("03 fe ffffffffffffff7f 01"),  # a huge parameter count
        h("03 01 02 00 01 fe00 01 61 01 31"),  # two parameter sets
        h("03 01 01 00 00 fe00 01 61 01 31"),  # new_params_bind_flag 0
        h("03 01 01 00 01 0c00 01 61 0b 01"),  # a DATETIME value cut short
    ],
)
def test_bad_query_attributes(wire: bytes) -> None:
    with pytest.raises(MySQLProtocolError):
        c.decode_command(wire, QA)


def test_statement_id_mapping() -> None:
    execute = c.ComStmtExecute(7, 1, 1, b"\x00\x01").encode()
    assert c.statement_id(execute) == 7
    mapped = c.replace_statement_id(execute, 0x01020304)
    assert mapped == h("17 04030201") + execute[5:]
    assert c.decode_command(mapped, 0) == c.ComStmtExecute(0x01020304, 1, 1, b"\x00\x01")
    for command in (c.ComStmtClose(7), c.ComStmtReset(7), c.ComStmtFetch(7, 1), c.ComStmtSendLongData(7, 0, b"x")):
        assert c.statement_id(c.replace_statement_id(command.encode(), 9)) == 9
    assert c.statement_id(c.ComStmtClose(c.LAST_STATEMENT_ID).encode()) == 0xFFFFFFFF
    with pytest.raises(MySQLProtocolError):
        c.replace_statement_id(c.ComStmtPrepare("x").encode(), 1)
    with pytest.raises(MySQLProtocolError):
        c.statement_id(h("19 0100"))
    with pytest.raises(LocalProtocolError):
        c.replace_statement_id(execute, 2**32)


def test_stmt_prepare_ok() -> None:
    wire = h("00 01000000 0200 0100 00 0000")
    ok = c.decode_stmt_prepare_ok(wire)
    assert ok == c.StmtPrepareOk(1, 2, 1, 0)
    assert ok.encode() == wire
    assert c.replace_prepare_ok_statement_id(wire, 5) == h("00 05000000 0200 0100 00 0000")
    meta = k.CLIENT_OPTIONAL_RESULTSET_METADATA
    assert c.decode_stmt_prepare_ok(wire + h("00"), meta).metadata_follows is False
    assert c.StmtPrepareOk(1, 2, 1, 0, False).encode(meta) == wire + h("00")
    # Servers before 4.1.? stop after the parameter count.
    assert c.decode_stmt_prepare_ok(wire[:9]) == c.StmtPrepareOk(1, 2, 1)
    with pytest.raises(MySQLProtocolError):
        c.decode_stmt_prepare_ok(h("ff 01000000 0200 0100 00 0000"))


def test_decode_refusals() -> None:
    for wire in (h(""), h("19 01"), h("1c 01000000"), h("1b 01"), h("19 0100000000"), h("11", hex_text("u"))):
        with pytest.raises(MySQLProtocolError):
            c.decode_command(wire, COMMAND_CAPS)


def test_command_names() -> None:
    assert c.command_name(c.COM_QUERY) == "COM_QUERY"
    assert c.command_name(c.COM_STMT_BULK_EXECUTE) == "COM_STMT_BULK_EXECUTE"
    assert c.command_name(0x77) == "COM_0x77"


@ROUND_TRIP
@given(command=commands)
def test_command_round_trip(command: c.ClientCommand) -> None:
    assert c.decode_command(command.encode(COMMAND_CAPS), COMMAND_CAPS) == command


@ROUND_TRIP
@given(query=text, attrs=st.lists(attribute, max_size=4).map(tuple))
def test_query_attributes_round_trip(query: str, attrs: tuple[c.QueryAttribute, ...]) -> None:
    command = c.ComQuery(query, attrs)
    wire = command.encode(QA)
    assert c.decode_command(wire, QA) == command
    assert c.query_text(wire, QA) == query


@ROUND_TRIP
@given(
    ok=st.builds(
        c.StmtPrepareOk,
        st.integers(0, 2**32 - 1),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.booleans(),
    )
)
def test_prepare_ok_round_trip(ok: c.StmtPrepareOk) -> None:
    meta = k.CLIENT_OPTIONAL_RESULTSET_METADATA
    assert c.decode_stmt_prepare_ok(ok.encode(meta), meta) == ok
