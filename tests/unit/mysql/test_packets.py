"""OK, ERR and EOF packets and session state changes: hand-built vectors and hypothesis round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from endpoint_proxy.protocol.errors import LocalProtocolError
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.errors import MySQLProtocolError, access_denied

from .strategies import eof_packets, err_packets, h, hex_text, ok_packets

ROUND_TRIP = settings(max_examples=60, deadline=None)
TRACK = k.CLIENT_SESSION_TRACK


def test_ok_vector() -> None:
    ok = p.decode_ok(h("00 00 00 02 00 00 00"), 0)
    assert ok == p.OkPacket(0, 0, k.SERVER_STATUS_AUTOCOMMIT, 0)
    assert ok.autocommit and not ok.in_transaction and not ok.more_results
    assert ok.encode(0) == h("00 00 00 02 00 00 00")


def test_ok_with_counts_and_info_without_session_tracking() -> None:
    wire = h("00 fc e8 03 05 03 00 01 00", hex_text("Rows matched: 1000"))
    ok = p.decode_ok(wire, 0)
    assert (ok.affected_rows, ok.last_insert_id, ok.in_transaction, ok.warnings) == (1000, 5, True, 1)
    assert ok.status == k.SERVER_STATUS_IN_TRANS | k.SERVER_STATUS_AUTOCOMMIT
    assert ok.info == "Rows matched: 1000"
    assert ok.encode(0) == wire


# MariaDB after COMMIT with session_track_system_variables including last_gtid:
# status 0x4002 (autocommit, session state changed), empty info, one system variable entry.
MARIADB_LAST_GTID = h(
    "00 00 00 02 40 00 00",
    "00",  # info: empty lenenc string
    "13",  # session state info: 19 bytes
    "00 11",  # SESSION_TRACK_SYSTEM_VARIABLES, 17 bytes of data
    "09",
    hex_text("last_gtid"),
    "06",
    hex_text("0-1-42"),
)


def test_ok_with_mariadb_last_gtid() -> None:
    ok = p.decode_ok(MARIADB_LAST_GTID, TRACK)
    assert ok.status == k.SERVER_STATUS_AUTOCOMMIT | k.SERVER_SESSION_STATE_CHANGED
    assert ok.session_changes == (
        (k.SESSION_TRACK_SYSTEM_VARIABLES, h("09", hex_text("last_gtid"), "06", hex_text("0-1-42"))),
    )
    assert p.session_variables(ok.session_changes) == {"last_gtid": "0-1-42"}
    assert p.last_gtids(ok.session_changes) == "0-1-42"
    assert ok.encode(TRACK) == MARIADB_LAST_GTID


def test_ok_with_mysql_schema_gtids_and_transaction_state() -> None:
    state = (
        h("01 03 02", hex_text("db"))  # SESSION_TRACK_SCHEMA "db"
        + h("03 0c 00 0a", hex_text("uuid:1-100"))  # SESSION_TRACK_GTIDS, encoding 0
        + h("05 09 08", hex_text("T_______"))  # SESSION_TRACK_TRANSACTION_STATE
        + h("02 02 01 31")  # SESSION_TRACK_STATE_CHANGE "1"
    )
    wire = h("00 01 00 03 40 00 00 00") + bytes((len(state),)) + state
    ok = p.decode_ok(wire, TRACK)
    assert [t for t, _ in ok.session_changes] == [1, 3, 5, 2]
    assert p.last_schema(ok.session_changes) == "db"
    assert p.last_gtids(ok.session_changes) == "uuid:1-100"
    assert p.session_text(ok.session_changes[2][1]) == "T_______"
    assert p.session_text(ok.session_changes[3][1]) == "1"
    assert p.session_variables(ok.session_changes) == {}
    assert ok.encode(TRACK) == wire


def test_mariadb_login_ok_reports_the_schema() -> None:
    # MariaDB 10.11's OK after a login with schema "d" and CLIENT_SESSION_TRACK.
    wire = h("00 00 00 02 40 00 00 00 04 01 02 01 64")
    ok = p.decode_ok(wire, TRACK)
    assert ok.session_changes == ((k.SESSION_TRACK_SCHEMA, h("01 64")),)
    assert p.last_schema(ok.session_changes) == "d"
    assert ok.encode(TRACK) == wire
    # Without the capability the same bytes are only an info string.
    assert p.decode_ok(wire, 0).info == "\x00\x04\x01\x02\x01d"


def test_ok_with_session_tracking_may_leave_out_the_info() -> None:
    assert p.decode_ok(h("00 00 00 02 00 00 00"), TRACK) == p.OkPacket(status=2)
    assert p.OkPacket(status=2).encode(TRACK) == h("00 00 00 02 00 00 00")


def test_ok_refusals() -> None:
    with pytest.raises(MySQLProtocolError):
        p.decode_ok(h("00 00 00 02"), 0)  # truncated
    with pytest.raises(MySQLProtocolError):
        p.decode_ok(h("00 00 00 02 40 00 00 00 05 00 03 61"), TRACK)  # state info cut short
    with pytest.raises(MySQLProtocolError):
        p.decode_ok(h("00 00 00 02 00 00 00 ff"), TRACK)  # 0xFF is no lenenc length
    with pytest.raises(LocalProtocolError):
        p.OkPacket(session_changes=((0, b""),)).encode(TRACK)  # without SERVER_SESSION_STATE_CHANGED
    with pytest.raises(LocalProtocolError):
        p.OkPacket(status=0x10000).encode(0)


def test_err_vector_from_the_docs() -> None:
    wire = h("ff 48 04 23", hex_text("HY000"), hex_text("No tables used"))
    err = p.decode_err(wire)
    assert err == p.ErrPacket(1096, "HY000", "No tables used")
    assert err.encode() == wire
    assert p.err_packet(1096, "HY000", "No tables used") == wire
    assert err.to_error().errno == 1096


def test_err_without_sqlstate_marker() -> None:
    # Sent before the capabilities are agreed, e.g. "Host is blocked" (1129).
    wire = h("ff 69 04", hex_text("Host blocked"))
    assert p.decode_err(wire) == p.ErrPacket(1129, "HY000", "Host blocked")


def test_access_denied_packet() -> None:
    exc = access_denied("app", "10.0.0.1", using_password=True)
    assert (exc.errno, exc.sqlstate) == (1045, "28000")
    assert exc.message == "Access denied for user 'app'@'10.0.0.1' (using password: YES)"
    assert p.error_packet(exc) == h("ff 15 04 23", hex_text("28000"), hex_text(exc.message))


def test_err_refusals() -> None:
    with pytest.raises(MySQLProtocolError):
        p.decode_err(h("ff 01"))
    with pytest.raises(LocalProtocolError):
        p.err_packet(1, "HY00", "x")
    with pytest.raises(LocalProtocolError):
        p.err_packet(70000, "HY000", "x")


def test_eof_vector() -> None:
    wire = h("fe 00 00 02 00")
    assert p.decode_eof(wire) == p.EofPacket(0, k.SERVER_STATUS_AUTOCOMMIT)
    assert p.EofPacket(0, 2).encode() == wire
    assert p.is_eof(wire)
    assert p.decode_eof(h("fe")) == p.EofPacket()
    for bad in (h("fe 00 00"), h("00 00 00 02 00"), h("")):
        with pytest.raises(MySQLProtocolError):
            p.decode_eof(bad)


def test_terminator_is_ok_or_eof_by_capability_and_length() -> None:
    assert p.decode_terminator(h("fe 00 00 02 00"), 0) == p.EofPacket(0, 2)
    assert p.decode_terminator(h("fe 00 00 02 00"), k.CLIENT_DEPRECATE_EOF) == p.EofPacket(0, 2)
    assert p.decode_terminator(h("fe 00 00 22 00 00 00"), k.CLIENT_DEPRECATE_EOF) == p.OkPacket(
        status=0x22, header=0xFE
    )
    # A text row starting with 0xFE (a 16 MiB+ value) is never short enough to be an EOF.
    assert not p.is_eof(h("fe 00 00 00 01 00 00 00 00"))


@ROUND_TRIP
@given(packet=ok_packets())
def test_ok_round_trip(packet: tuple[p.OkPacket, int]) -> None:
    ok, caps = packet
    assert p.decode_ok(ok.encode(caps), caps) == ok


@ROUND_TRIP
@given(err=err_packets)
def test_err_round_trip(err: p.ErrPacket) -> None:
    assert p.decode_err(err.encode()) == err


@ROUND_TRIP
@given(eof=eof_packets)
def test_eof_round_trip(eof: p.EofPacket) -> None:
    assert p.decode_eof(eof.encode()) == eof
    assert p.decode_terminator(eof.encode(), k.CLIENT_DEPRECATE_EOF) == eof
