"""Connection-phase packets: vectors from the protocol docs, fed whole and byte by byte, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from endpoint_proxy.protocol.errors import LocalProtocolError
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import handshake as hs
from endpoint_proxy.protocol.mysql.errors import ER_HANDSHAKE_ERROR, MySQLProtocolError
from endpoint_proxy.protocol.mysql.framing import PacketReader, encode_packet

from .strategies import h, handshake_responses, handshakes, hex_text

ROUND_TRIP = settings(max_examples=80, deadline=None)

# MySQL 5.5.2-m2's greeting, the example of the HandshakeV10 docs (no CLIENT_PLUGIN_AUTH).
GREETING_55 = h(
    "0a",
    hex_text("5.5.2-m2"),
    "00 0b000000",
    hex_text("dvH@I-CJ"),
    "00 fff7 08 0200 0000 00",
    "00000000000000000000",
    hex_text("*4d|cZwk4^]:"),
    "00",
)

# A MariaDB 11 greeting: CLIENT_MYSQL clear, extended capabilities in the reserved bytes.
MARIADB_CAPS = (
    k.CLIENT_PROTOCOL_41
    | k.CLIENT_SECURE_CONNECTION
    | k.CLIENT_PLUGIN_AUTH
    | k.CLIENT_SSL
    | k.CLIENT_DEPRECATE_EOF
    | k.CLIENT_SESSION_TRACK
    | k.MARIADB_CLIENT_PROGRESS
    | k.MARIADB_CLIENT_STMT_BULK_OPERATIONS
)
GREETING_MARIADB = h(
    "0a",
    hex_text("11.4.2-MariaDB"),
    "00 2a000000",
    hex_text("abcdefgh"),
    "00",
    (MARIADB_CAPS & 0xFFFF).to_bytes(2, "little").hex(),
    "2d 0200",
    ((MARIADB_CAPS >> 16) & 0xFFFF).to_bytes(2, "little").hex(),
    "15",
    "000000000000 05000000",  # 6 filler bytes, MariaDB capabilities (PROGRESS | BULK)
    hex_text("ijklmnopqrst"),
    "00",
    hex_text("mysql_native_password"),
    "00",
)

# The HandshakeResponse41 example of the docs: user "pam", 20-byte scramble, schema "test".
RESPONSE_41 = h(
    "8da60f00 00000001 08",
    "00" * 23,
    hex_text("pam"),
    "00 14 ab09eef6bcb1323e61143865c0991d957d75d447",
    hex_text("test"),
    "00",
    hex_text("mysql_native_password"),
    "00",
)


def read_one(payload: bytes, *, bytewise: bool) -> bytes:
    reader = PacketReader()
    stream = encode_packet(0, payload)
    got = None
    for chunk in [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]:
        reader.feed(chunk)
        packet = reader.next_packet()
        if packet is not None:
            got = packet
    assert got is not None and reader.buffered == 0
    return got[1]


@pytest.mark.parametrize("bytewise", [False, True])
def test_greeting_from_the_docs(bytewise: bool) -> None:
    greeting = hs.decode_handshake_v10(read_one(GREETING_55, bytewise=bytewise))
    assert greeting == hs.HandshakeV10("5.5.2-m2", 11, b"dvH@I-CJ*4d|cZwk4^]:", 0xF7FF, 8, 2, "")
    assert greeting.capabilities & k.CLIENT_MYSQL and not greeting.is_mariadb
    assert greeting.encode() == GREETING_55


@pytest.mark.parametrize("bytewise", [False, True])
def test_mariadb_greeting_with_extended_capabilities(bytewise: bool) -> None:
    greeting = hs.decode_handshake_v10(read_one(GREETING_MARIADB, bytewise=bytewise))
    assert greeting.capabilities == MARIADB_CAPS
    assert greeting.auth_plugin_data == b"abcdefghijklmnopqrst"
    assert greeting.auth_plugin_name == "mysql_native_password"
    assert greeting.is_mariadb and greeting.character_set == k.UTF8MB4_GENERAL_CI
    assert greeting.encode() == GREETING_MARIADB


def test_greeting_whose_plugin_name_lacks_its_nul() -> None:
    greeting = hs.decode_handshake_v10(GREETING_MARIADB[:-1])
    assert greeting.auth_plugin_name == "mysql_native_password"


def test_extended_capabilities_are_ignored_when_client_mysql_is_set() -> None:
    wire = bytearray(GREETING_55)
    wire[1 + 9 + 4 + 9 + 2 + 5 + 1 + 6] = 0x05  # a stray byte where MariaDB puts its capabilities
    assert hs.decode_handshake_v10(bytes(wire)).capabilities == 0xF7FF


@pytest.mark.parametrize(
    "payload",
    [
        h("09", hex_text("5.0"), "00"),  # protocol 9
        GREETING_55[:20],
        GREETING_55[: 1 + 9 + 4 + 9 + 2],  # pre-4.1: ends after the lower capabilities
        GREETING_55.replace(h("fff7"), h("fff5")),  # no CLIENT_PROTOCOL_41
    ],
)
def test_bad_greetings(payload: bytes) -> None:
    with pytest.raises(MySQLProtocolError) as info:
        hs.decode_handshake_v10(payload)
    assert info.value.errno == ER_HANDSHAKE_ERROR and info.value.sqlstate == "08S01"


@pytest.mark.parametrize("bytewise", [False, True])
def test_handshake_response_from_the_docs(bytewise: bool) -> None:
    response = hs.decode_handshake_response(read_one(RESPONSE_41, bytewise=bytewise))
    assert isinstance(response, hs.HandshakeResponse41)
    assert response.username == "pam"
    assert response.auth_response == h("ab09eef6bcb1323e61143865c0991d957d75d447")
    assert response.database == "test"
    assert response.auth_plugin_name == "mysql_native_password"
    assert response.connect_attrs is None
    assert response.max_packet_size == 1 << 24 and response.character_set == 8
    assert response.capabilities & k.CLIENT_CONNECT_WITH_DB
    assert response.encode() == RESPONSE_41


def test_handshake_response_with_lenenc_auth_and_attributes() -> None:
    caps = (
        k.CLIENT_PROTOCOL_41
        | k.CLIENT_SECURE_CONNECTION
        | k.CLIENT_PLUGIN_AUTH
        | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | k.CLIENT_CONNECT_ATTRS
    )
    wire = h(
        caps.to_bytes(4, "little").hex(),
        "00000040 2d",
        "00" * 23,
        hex_text("app"),
        "00 20",
        "11" * 32,
        hex_text("caching_sha2_password"),
        "00",
        "12 0c",
        hex_text("_client_name"),
        "04",
        hex_text("pymy"),
    )
    response = hs.decode_handshake_response(wire)
    assert response == hs.HandshakeResponse41(
        caps, "app", b"\x11" * 32, None, "caching_sha2_password", {"_client_name": "pymy"}, 1 << 30, 45
    )
    assert response.encode() == wire


def test_a_short_response_leaves_the_later_fields_out() -> None:
    # CLIENT_CONNECT_WITH_DB and CLIENT_PLUGIN_AUTH set, but the client stopped after the auth response.
    wire = RESPONSE_41[: RESPONSE_41.index(b"test")]
    response = hs.decode_handshake_response(wire)
    assert isinstance(response, hs.HandshakeResponse41)
    assert response.database is None and response.auth_plugin_name is None
    assert response.encode() == wire


def test_ssl_request() -> None:
    caps = k.CLIENT_PROTOCOL_41 | k.CLIENT_SSL | k.CLIENT_SECURE_CONNECTION
    wire = h(caps.to_bytes(4, "little").hex(), "00000001 21", "00" * 23)
    assert len(wire) == hs.SSL_REQUEST_LENGTH
    request = hs.decode_handshake_response(wire)
    assert request == hs.SSLRequest(caps, 1 << 24, 33)
    assert request.encode() == wire
    with pytest.raises(MySQLProtocolError):
        hs.decode_handshake_response(h((caps & ~k.CLIENT_SSL).to_bytes(4, "little").hex(), "00000001 21", "00" * 23))
    with pytest.raises(LocalProtocolError):
        hs.SSLRequest(k.CLIENT_PROTOCOL_41).encode()


def test_mariadb_client_capabilities_in_the_response_filler() -> None:
    caps = (k.CLIENT_PROTOCOL_41 | k.CLIENT_SSL) | k.MARIADB_CLIENT_PROGRESS
    request = hs.SSLRequest(caps)
    assert request.encode()[28:32] == h("01000000")
    assert hs.decode_handshake_response(request.encode()) == request
    with pytest.raises(LocalProtocolError):
        hs.SSLRequest(caps | k.CLIENT_MYSQL).encode()


def test_encode_refuses_fields_without_their_flags() -> None:
    with pytest.raises(LocalProtocolError):
        hs.HandshakeResponse41(k.CLIENT_PROTOCOL_41, "u", database="db").encode()
    with pytest.raises(LocalProtocolError):
        caps = k.CLIENT_PROTOCOL_41 | k.CLIENT_CONNECT_WITH_DB | k.CLIENT_PLUGIN_AUTH
        hs.HandshakeResponse41(caps, "u", auth_plugin_name="p").encode()  # database left out before it


def test_auth_switch_request_and_more_data() -> None:
    wire = h("fe", hex_text("mysql_native_password"), "00", hex_text("abcdefghijklmnopqrst"), "00")
    switch = hs.decode_auth_switch_request(wire)
    assert switch == hs.AuthSwitchRequest("mysql_native_password", b"abcdefghijklmnopqrst\0")
    assert switch.encode() == wire
    with pytest.raises(MySQLProtocolError):
        hs.decode_auth_switch_request(h("fe"))  # the pre-4.1 "old password" switch
    more = hs.decode_auth_more_data(h("01 03"))
    assert more == hs.AuthMoreData(b"\x03") and more.encode() == h("01 03")
    with pytest.raises(MySQLProtocolError):
        hs.decode_auth_more_data(h("02 03"))


@ROUND_TRIP
@given(greeting=handshakes())
def test_greeting_round_trip(greeting: hs.HandshakeV10) -> None:
    assert hs.decode_handshake_v10(greeting.encode()) == greeting


@ROUND_TRIP
@given(response=handshake_responses())
def test_handshake_response_round_trip(response: hs.HandshakeResponse41) -> None:
    assert hs.decode_handshake_response(response.encode()) == response
