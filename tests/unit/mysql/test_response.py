"""ResponseTracker tables: each response fed packet by packet and through PacketScanner in every chunking.

Every case is checked four ways that must agree: ``feed()`` per payload, and the scanner
over the framed stream whole, one byte at a time, and in 7-byte chunks; the response must
end exactly at its last byte (extra bytes after it are left unconsumed) and not before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.errors import MySQLProtocolError
from endpoint_proxy.protocol.mysql.framing import PacketScanner, encode_packet, write_lenenc_int
from endpoint_proxy.protocol.mysql.response import ResponseTracker

from .strategies import binary_row, column_def, eof, err, h, ok, ok_fe, text_row, wire

DEP = k.CLIENT_DEPRECATE_EOF
TRACK = k.CLIENT_SESSION_TRACK
AUTOCOMMIT = k.SERVER_STATUS_AUTOCOMMIT
IN_TRANS = k.SERVER_STATUS_IN_TRANS
MORE = k.SERVER_MORE_RESULTS_EXISTS
CURSOR = k.SERVER_STATUS_CURSOR_EXISTS


@dataclass
class Case:
    name: str
    command: int
    caps: int
    payloads: list[bytes]
    status: int | None = AUTOCOMMIT
    rows: int = 0
    result_sets: int = 0
    errno: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


def col_count(n: int, meta: bytes = b"") -> bytes:
    return write_lenenc_int(n) + meta


CASES = [
    Case(
        "text result set with EOFs",
        c.COM_QUERY,
        0,
        [col_count(2), column_def("id"), column_def("name"), eof(), text_row(b"1", b"a"), text_row(None, b""), eof()],
        rows=2,
        result_sets=1,
    ),
    Case(
        "text result set with CLIENT_DEPRECATE_EOF",
        c.COM_QUERY,
        DEP,
        [col_count(2), column_def("id"), column_def("name"), text_row(b"1", b"a"), ok_fe(AUTOCOMMIT | IN_TRANS)],
        status=AUTOCOMMIT | IN_TRANS,
        rows=1,
        result_sets=1,
        extra={"in_transaction": True, "autocommit": True},
    ),
    Case(
        "text rows starting with 0x00 (empty string) and 0xFB (NULL) are rows, not OK or LOCAL INFILE",
        c.COM_QUERY,
        DEP,
        [col_count(2), column_def("a"), column_def("b"), text_row(b"", b"x"), text_row(None, None), ok_fe()],
        rows=2,
        result_sets=1,
    ),
    Case(
        "an empty result set",
        c.COM_QUERY,
        0,
        [col_count(1), column_def("a"), eof(), eof()],
        result_sets=1,
    ),
    Case(
        "an OK and nothing else",
        c.COM_QUERY,
        0,
        [p.OkPacket(3, 42, AUTOCOMMIT).encode(0)],
        extra={"affected_rows": 3, "last_insert_id": 42},
    ),
    Case(
        "ERR right away",
        c.COM_QUERY,
        DEP,
        [err(1146, "42S02", "Table 'db.t' doesn't exist")],
        status=None,
        errno=1146,
    ),
    Case(
        "ERR mid-stream after some rows",
        c.COM_QUERY,
        0,
        [col_count(1), column_def("a"), eof(AUTOCOMMIT | IN_TRANS), text_row(b"1"), err(1317, "70100", "cancelled")],
        status=AUTOCOMMIT | IN_TRANS,
        rows=1,
        result_sets=1,
        errno=1317,
    ),
    Case(
        "multi-statement: OK, result set, OK",
        c.COM_QUERY,
        0,
        [
            ok(IN_TRANS | MORE),
            col_count(1),
            column_def("a"),
            eof(IN_TRANS | MORE),
            text_row(b"1"),
            eof(IN_TRANS | MORE),
            ok(AUTOCOMMIT),
        ],
        rows=1,
        result_sets=1,
    ),
    Case(
        "multi-results with CLIENT_DEPRECATE_EOF: two result sets",
        c.COM_QUERY,
        DEP,
        [
            col_count(1),
            column_def("a"),
            text_row(b"1"),
            ok_fe(AUTOCOMMIT | MORE),
            col_count(1),
            column_def("b"),
            text_row(b"2"),
            text_row(b"3"),
            ok_fe(AUTOCOMMIT),
        ],
        rows=3,
        result_sets=2,
    ),
    Case(
        "multi-statement stopped by an ERR",
        c.COM_QUERY,
        0,
        [ok(IN_TRANS | AUTOCOMMIT | MORE), err(1062, "23000", "Duplicate entry")],
        status=IN_TRANS | AUTOCOMMIT | MORE,
        errno=1062,
    ),
    Case(
        "LOCAL INFILE request, then the OK",
        c.COM_QUERY,
        0,
        [b"\xfb/tmp/data.csv", p.OkPacket(10, 0, AUTOCOMMIT).encode(0)],
        extra={"local_infile": "/tmp/data.csv", "affected_rows": 10},
    ),
    Case(
        "MariaDB progress report before the OK",
        c.COM_QUERY,
        k.MARIADB_CLIENT_PROGRESS,
        [h("ff ffff 01 01 00 32 00 00 00"), ok()],
    ),
    Case(
        "final OK with MariaDB's last_gtid",
        c.COM_QUERY,
        TRACK,
        [
            p.OkPacket(
                1,
                0,
                AUTOCOMMIT | k.SERVER_SESSION_STATE_CHANGED,
                0,
                "",
                ((k.SESSION_TRACK_SYSTEM_VARIABLES, p.encode_session_variable("last_gtid", "0-1-7")),),
            ).encode(TRACK)
        ],
        status=AUTOCOMMIT | k.SERVER_SESSION_STATE_CHANGED,
        extra={"gtid": "0-1-7"},
    ),
    Case(
        "MariaDB metadata skipped (MARIADB_CLIENT_CACHE_METADATA), EOF still sent",
        c.COM_STMT_EXECUTE,
        k.MARIADB_CLIENT_CACHE_METADATA,
        [col_count(1, b"\x00"), eof(), binary_row(b"\1\0\0\0"), eof()],
        rows=1,
        result_sets=1,
    ),
    Case(
        "metadata sent though MARIADB_CLIENT_CACHE_METADATA is on",
        c.COM_STMT_EXECUTE,
        k.MARIADB_CLIENT_CACHE_METADATA | DEP,
        [col_count(1, b"\x01"), column_def("a"), binary_row(b"\1\0\0\0"), ok_fe()],
        rows=1,
        result_sets=1,
    ),
    Case(
        "binary rows start with 0x00 and are not OK packets",
        c.COM_STMT_EXECUTE,
        0,
        [
            col_count(2),
            column_def("a", 3),
            column_def("b", 3),
            eof(),
            binary_row(b"\0\0\0\0", b"\2\0\0\0"),  # 00 00 00000000 02000000: shaped like an OK
            binary_row(None, None),
            eof(),
        ],
        rows=2,
        result_sets=1,
    ),
    Case(
        "binary rows with CLIENT_DEPRECATE_EOF",
        c.COM_STMT_EXECUTE,
        DEP,
        [col_count(1), column_def("a", 3), binary_row(b"\0\0\2\0"), ok_fe(AUTOCOMMIT)],
        rows=1,
        result_sets=1,
    ),
    Case(
        "COM_STMT_EXECUTE answered with an OK",
        c.COM_STMT_EXECUTE,
        0,
        [p.OkPacket(1, 9, AUTOCOMMIT).encode(0)],
        extra={"last_insert_id": 9},
    ),
    Case(
        "COM_STMT_EXECUTE opening a cursor: the metadata EOF ends the response",
        c.COM_STMT_EXECUTE,
        0,
        [col_count(1), column_def("a", 3), eof(AUTOCOMMIT | CURSOR)],
        status=AUTOCOMMIT | CURSOR,
        result_sets=1,
    ),
    Case(
        "COM_STMT_EXECUTE opening a cursor with CLIENT_DEPRECATE_EOF",
        c.COM_STMT_EXECUTE,
        DEP,
        [col_count(1), column_def("a", 3), ok_fe(AUTOCOMMIT | CURSOR)],
        status=AUTOCOMMIT | CURSOR,
        result_sets=1,
    ),
    Case(
        "COM_STMT_FETCH: rows then EOF with LAST_ROW_SENT",
        c.COM_STMT_FETCH,
        0,
        [binary_row(b"\1\0\0\0"), binary_row(b"\2\0\0\0"), eof(AUTOCOMMIT | CURSOR | k.SERVER_STATUS_LAST_ROW_SENT)],
        status=AUTOCOMMIT | CURSOR | k.SERVER_STATUS_LAST_ROW_SENT,
        rows=2,
    ),
    Case(
        "stored procedure through COM_STMT_EXECUTE: result set, then the final OK",
        c.COM_STMT_EXECUTE,
        k.CLIENT_PS_MULTI_RESULTS,
        [col_count(1), column_def("a", 3), eof(MORE), binary_row(b"\1\0\0\0"), eof(MORE), ok(AUTOCOMMIT)],
        rows=1,
        result_sets=1,
    ),
    Case(
        "COM_STMT_PREPARE with EOFs",
        c.COM_STMT_PREPARE,
        0,
        [
            c.StmtPrepareOk(1, 2, 1).encode(),
            column_def("?"),
            eof(),
            column_def("a"),
            column_def("b"),
            eof(),
        ],
        extra={"prepare_ok": c.StmtPrepareOk(1, 2, 1)},
    ),
    Case(
        "COM_STMT_PREPARE with CLIENT_DEPRECATE_EOF ends at the last definition",
        c.COM_STMT_PREPARE,
        DEP,
        [c.StmtPrepareOk(2, 1, 2).encode(), column_def("?"), column_def("?"), column_def("a")],
        status=None,
        extra={"prepare_ok": c.StmtPrepareOk(2, 1, 2)},
    ),
    Case(
        "COM_STMT_PREPARE with columns only",
        c.COM_STMT_PREPARE,
        0,
        [c.StmtPrepareOk(3, 1, 0).encode(), column_def("a"), eof()],
    ),
    Case(
        "COM_STMT_PREPARE with parameters only",
        c.COM_STMT_PREPARE,
        DEP,
        [c.StmtPrepareOk(4, 0, 1).encode(), column_def("?")],
        status=None,
    ),
    Case(
        "COM_STMT_PREPARE of a statement with neither",
        c.COM_STMT_PREPARE,
        0,
        [c.StmtPrepareOk(5, 0, 0).encode()],
        status=None,
    ),
    Case(
        "COM_STMT_PREPARE refused",
        c.COM_STMT_PREPARE,
        0,
        [err(1064, "42000", "syntax")],
        status=None,
        errno=1064,
    ),
    Case(
        "COM_STMT_PREPARE with CLIENT_OPTIONAL_RESULTSET_METADATA and none sent",
        c.COM_STMT_PREPARE,
        k.CLIENT_OPTIONAL_RESULTSET_METADATA,
        [c.StmtPrepareOk(6, 3, 3, 0, False).encode(k.CLIENT_OPTIONAL_RESULTSET_METADATA)],
        status=None,
    ),
    Case(
        "COM_FIELD_LIST",
        c.COM_FIELD_LIST,
        0,
        [column_def("a"), column_def("b"), eof()],
    ),
    Case("COM_STATISTICS: one string", c.COM_STATISTICS, 0, [b"Uptime: 5  Threads: 1  Questions: 2"], status=None),
    Case("COM_PING", c.COM_PING, 0, [ok()]),
    Case(
        "COM_INIT_DB refused", c.COM_INIT_DB, 0, [err(1049, "42000", "Unknown database 'x'")], status=None, errno=1049
    ),
    Case("COM_SET_OPTION answered with EOF", c.COM_SET_OPTION, 0, [eof()]),
    Case("COM_RESET_CONNECTION", c.COM_RESET_CONNECTION, DEP, [ok()]),
    Case("COM_STMT_RESET", c.COM_STMT_RESET, 0, [ok()]),
    Case(
        "COM_CHANGE_USER with an auth switch",
        c.COM_CHANGE_USER,
        0,
        [h("fe", "6d7973716c5f6e61746976655f70617373776f726400", "61" * 20, "00"), ok()],
    ),
    Case(
        "COM_CHANGE_USER with caching_sha2 fast auth",
        c.COM_CHANGE_USER,
        0,
        [h("01 03"), ok()],
    ),
]


def scan(case: Case, stream: bytes, chunk: int) -> tuple[ResponseTracker, int]:
    tracker = ResponseTracker(case.command, case.caps)
    scanner = PacketScanner()
    consumed = 0
    for i in range(0, len(stream), chunk):
        piece = stream[i : i + chunk]
        n = scanner.scan(piece, tracker)
        consumed += n
        if tracker.done:
            break
        assert n == len(piece)
    return tracker, consumed


def check(case: Case, tracker: ResponseTracker) -> None:
    assert tracker.done
    assert tracker.status == case.status
    assert tracker.rows == case.rows
    assert tracker.result_sets == case.result_sets
    assert (tracker.error.errno if tracker.error else None) == case.errno
    for key, value in case.extra.items():
        if key == "gtid":
            assert p.last_gtids(tracker.session_changes) == value
        else:
            assert getattr(tracker, key) == value


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fed_packet_by_packet(case: Case) -> None:
    tracker = ResponseTracker(case.command, case.caps)
    for i, payload in enumerate(case.payloads):
        assert not tracker.done, f"done before packet {i}"
        tracker.feed(payload)
    check(case, tracker)
    with pytest.raises(MySQLProtocolError):
        tracker.feed(ok())


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_scanned_in_chunks(case: Case, chunk: int) -> None:
    stream = wire(case.payloads)
    tracker, consumed = scan(case, stream + b"\x05\x00\x00\x00trail", chunk)
    assert consumed == len(stream)
    check(case, tracker)
    # One byte short, the response is not complete.
    tracker, consumed = scan(case, stream[:-1], chunk)
    assert not tracker.done and consumed == len(stream) - 1


def test_awaiting_client_during_local_infile() -> None:
    tracker = ResponseTracker(c.COM_QUERY, 0)
    tracker.feed(b"\xfbdata.csv")
    assert tracker.awaiting_client and not tracker.done and tracker.local_infile == "data.csv"
    tracker.feed(err(2, "HY000", "File not found"))
    assert tracker.done and not tracker.awaiting_client


def test_awaiting_client_during_change_user() -> None:
    tracker = ResponseTracker(c.COM_CHANGE_USER, 0)
    tracker.feed(h("01 04"))  # perform full authentication: the client answers
    assert tracker.awaiting_client
    tracker.feed(h("01 03"))  # fast auth success: the OK follows without a client packet
    assert not tracker.awaiting_client and not tracker.done


@pytest.mark.parametrize("command", [c.COM_STMT_CLOSE, c.COM_STMT_SEND_LONG_DATA, c.COM_QUIT])
def test_commands_without_response_are_done_at_once(command: int) -> None:
    tracker = ResponseTracker(command, 0)
    assert tracker.done
    assert PacketScanner().scan(encode_packet(0, b"\x0e"), tracker) == 0


@pytest.mark.parametrize("command", [c.COM_BINLOG_DUMP, c.COM_BINLOG_DUMP_GTID, c.COM_CLONE])
def test_replication_streams_are_refused(command: int) -> None:
    with pytest.raises(MySQLProtocolError) as info:
        ResponseTracker(command, 0)
    assert info.value.errno == 1047


# --- 0xFE rows: a text row whose first value is 16 MiB or longer ---------------------------------

BIG = 0xFFFFFF + 100


@pytest.mark.parametrize("caps", [0, DEP])
def test_a_row_starting_with_0xfe_is_not_a_terminator(caps: int) -> None:
    big_row = text_row(b"x" * BIG, b"y")
    assert big_row[0] == 0xFE and big_row[1:9] == BIG.to_bytes(8, "little")
    end = ok_fe() if caps & DEP else eof()
    payloads = [col_count(2), column_def("blob"), column_def("y")]
    if not caps & DEP:
        payloads.append(eof())
    payloads += [big_row, text_row(b"1", b"2"), end]
    stream = wire(payloads)
    case = Case("big", c.COM_QUERY, caps, payloads, rows=2, result_sets=1)
    tracker, consumed = scan(case, stream, 4_000_037)
    assert consumed == len(stream)
    check(case, tracker)
    fed = ResponseTracker(c.COM_QUERY, caps)
    for payload in payloads:
        fed.feed(payload)
    check(case, fed)


def test_a_short_0xfe_text_row_cannot_exist_so_it_is_the_terminator() -> None:
    # Without CLIENT_DEPRECATE_EOF a 0xFE packet of 9 bytes or more is a row (an 8-byte length).
    tracker = ResponseTracker(c.COM_QUERY, 0)
    for payload in (col_count(1), column_def("a"), eof()):
        tracker.feed(payload)
    assert tracker.want(0xFE, 9) is False and tracker.rows == 1
    assert tracker.want(0xFE, 5) is True


def test_packet_that_does_not_fit_the_state() -> None:
    tracker = ResponseTracker(c.COM_QUERY, 0)
    for payload in (col_count(1), column_def("a")):
        tracker.feed(payload)
    with pytest.raises(MySQLProtocolError):
        tracker.feed(text_row(b"1"))  # the EOF after the column definitions is missing
    prepare = ResponseTracker(c.COM_STMT_PREPARE, 0)
    with pytest.raises(MySQLProtocolError):
        prepare.feed(col_count(1))
    query = ResponseTracker(c.COM_QUERY, 0)
    with pytest.raises(MySQLProtocolError):
        query.feed(b"")
    with pytest.raises(MySQLProtocolError):
        ResponseTracker(c.COM_QUERY, 0).feed(h("fc 00 00"))  # zero columns
