"""Connection-phase packets: HandshakeV10, SSLRequest, HandshakeResponse41, AuthSwitchRequest, AuthMoreData.

Rules of this file: payloads in and out (``framing`` adds headers; the server's greeting
is sequence 0, the client's answer 1, and so on). Capabilities are the 64-bit form of
``constants``: MariaDB's extended flags travel in the 4 reserved bytes that follow the
standard ones, and are read only when ``CLIENT_MYSQL`` is clear (the MariaDB convention).
Decoders raise ``MySQLProtocolError`` with errno 1043 (ER_HANDSHAKE_ERROR, 08S01), the
error a server reports for a bad handshake. Names are decoded as UTF-8 with
surrogateescape, so any bytes survive a decode/encode round trip.

The OK, ERR and EOF packets live in ``packets``, capability and status flags in ``constants``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..errors import LocalProtocolError
from .constants import (
    CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_MYSQL,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
    CLIENT_ZSTD_COMPRESSION_ALGORITHM,
)
from .errors import ER_HANDSHAKE_ERROR, MySQLProtocolError
from .framing import Cursor, encode_text, nul_str, write_lenenc_int, write_lenenc_str

PROTOCOL_VERSION: Final = 10
SSL_REQUEST_LENGTH: Final = 32
AUTH_SWITCH_REQUEST: Final = 0xFE
AUTH_MORE_DATA: Final = 0x01
# The default max_packet_size a client announces (libmysqlclient's): 16 MiB.
DEFAULT_MAX_PACKET_SIZE: Final = 1 << 24
# The part of the scramble carried in HandshakeV10 before the capability flags.
_SCRAMBLE_PART1: Final = 8
# The old protocol's fixed scramble length (used when CLIENT_PLUGIN_AUTH gives no length).
_SCRAMBLE_LENGTH: Final = 20
_RESERVED: Final = 10
_FILLER: Final = 19  # the handshake response's filler before the MariaDB capabilities


class _HandshakeCursor(Cursor):
    def fail(self, reason: str) -> MySQLProtocolError:
        return MySQLProtocolError(f"Bad handshake ({self.what}): {reason}", errno=ER_HANDSHAKE_ERROR, sqlstate="08S01")


def _split_caps(capabilities: int) -> tuple[int, int]:
    if not 0 <= capabilities < 1 << 64:
        raise LocalProtocolError(f"capabilities are 64-bit: {capabilities:#x}")
    low = capabilities & 0xFFFFFFFF
    high = capabilities >> 32
    if high and low & CLIENT_MYSQL:
        raise LocalProtocolError("MariaDB extended capabilities are only sent with CLIENT_MYSQL clear")
    return low, high


def _join_caps(low: int, reserved: bytes) -> int:
    if low & CLIENT_MYSQL:
        return low
    return low | int.from_bytes(reserved, "little") << 32


@dataclass(frozen=True, slots=True)
class HandshakeV10:
    """The server's greeting: version, connection id, capabilities and the authentication nonce."""

    server_version: str
    connection_id: int
    auth_plugin_data: bytes
    capabilities: int
    character_set: int
    status: int = 0
    auth_plugin_name: str = ""

    @property
    def is_mariadb(self) -> bool:
        """A MariaDB server clears CLIENT_MYSQL (and its version says so)."""
        return not self.capabilities & CLIENT_MYSQL or "MariaDB" in self.server_version

    def encode(self) -> bytes:
        low, high = _split_caps(self.capabilities)
        data = self.auth_plugin_data
        if len(data) < _SCRAMBLE_PART1 or len(data) > 0xFE:
            raise LocalProtocolError("the handshake's auth plugin data is 8 to 254 bytes")
        if not low & CLIENT_PLUGIN_AUTH and len(data) != _SCRAMBLE_LENGTH:
            raise LocalProtocolError("without CLIENT_PLUGIN_AUTH the auth plugin data is 20 bytes")
        if not (0 <= self.connection_id <= 0xFFFFFFFF and 0 <= self.character_set <= 0xFF):
            raise LocalProtocolError("connection id is 32-bit, character set 8-bit")
        if not 0 <= self.status <= 0xFFFF:
            raise LocalProtocolError("status flags are 16-bit")
        out = bytearray((PROTOCOL_VERSION,))
        out += nul_str(self.server_version)
        out += self.connection_id.to_bytes(4, "little")
        out += data[:_SCRAMBLE_PART1] + b"\0"
        out += (low & 0xFFFF).to_bytes(2, "little")
        out.append(self.character_set)
        out += self.status.to_bytes(2, "little")
        out += (low >> 16).to_bytes(2, "little")
        out.append(len(data) + 1 if low & CLIENT_PLUGIN_AUTH else 0)
        out += bytes(6) + high.to_bytes(4, "little")
        part2 = data[_SCRAMBLE_PART1:] + b"\0"
        out += part2.ljust(13, b"\0")
        if low & CLIENT_PLUGIN_AUTH:
            out += nul_str(self.auth_plugin_name)
        return bytes(out)


def decode_handshake_v10(payload: bytes) -> HandshakeV10:
    """The server's greeting (protocol 10 with CLIENT_PROTOCOL_41 and CLIENT_SECURE_CONNECTION)."""
    cur = _HandshakeCursor(payload, "HandshakeV10")
    version = cur.u8()
    if version != PROTOCOL_VERSION:
        raise cur.fail(f"protocol version {version}")
    server_version = cur.nul_text()
    connection_id = cur.u32()
    part1 = cur.take(_SCRAMBLE_PART1)
    cur.u8()  # filler
    low = cur.u16()
    if not cur.left:
        raise cur.fail("a pre-4.1 server (no character set, status or upper capabilities)")
    character_set = cur.u8()
    status = cur.u16()
    low |= cur.u16() << 16
    auth_len = cur.u8()
    reserved = cur.take(_RESERVED)
    capabilities = _join_caps(low, reserved[6:])
    if not low & CLIENT_PROTOCOL_41 or not low & CLIENT_SECURE_CONNECTION:
        raise cur.fail("the server speaks neither the 4.1 protocol nor its authentication")
    if low & CLIENT_PLUGIN_AUTH:
        if auth_len < _SCRAMBLE_PART1 + 1:
            raise cur.fail(f"auth plugin data length {auth_len}")
        part2 = cur.take(max(13, auth_len - _SCRAMBLE_PART1))
        data = part1 + part2[: auth_len - _SCRAMBLE_PART1 - 1]
        # Some servers leave out the NUL after the plugin name.
        plugin = cur.nul_text(optional_nul=True)
    else:
        part2 = cur.take(13)
        data = part1 + part2[:12]
        plugin = ""
    return HandshakeV10(server_version, connection_id, data, capabilities, character_set, status, plugin)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client's short handshake response with CLIENT_SSL: switch to TLS, then send the full response."""

    capabilities: int
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    character_set: int = 0

    def encode(self) -> bytes:
        if not self.capabilities & CLIENT_SSL:
            raise LocalProtocolError("an SSLRequest carries CLIENT_SSL")
        return _response_prefix(self.capabilities, self.max_packet_size, self.character_set)


def _response_prefix(capabilities: int, max_packet_size: int, character_set: int) -> bytes:
    low, high = _split_caps(capabilities)
    if not (0 <= max_packet_size <= 0xFFFFFFFF and 0 <= character_set <= 0xFF):
        raise LocalProtocolError("max packet size is 32-bit, character set 8-bit")
    return (
        low.to_bytes(4, "little")
        + max_packet_size.to_bytes(4, "little")
        + bytes((character_set,))
        + bytes(_FILLER)
        + high.to_bytes(4, "little")
    )


@dataclass(frozen=True, slots=True)
class HandshakeResponse41:
    """The client's answer to the greeting: its capabilities, user, auth response, schema, plugin, attributes.

    ``database`` is set iff CLIENT_CONNECT_WITH_DB is, ``auth_plugin_name`` iff
    CLIENT_PLUGIN_AUTH is, ``connect_attrs`` iff CLIENT_CONNECT_ATTRS is (as far as the
    client actually sent them: decoding accepts a packet that ends early, as servers do).
    """

    capabilities: int
    username: str
    auth_response: bytes = b""
    database: str | None = None
    auth_plugin_name: str | None = None
    connect_attrs: dict[str, str] | None = None
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    character_set: int = 0
    zstd_compression_level: int | None = None

    def encode(self) -> bytes:
        caps = self.capabilities
        out = bytearray(_response_prefix(caps, self.max_packet_size, self.character_set))
        out += nul_str(self.username)
        auth = self.auth_response
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out += write_lenenc_str(auth)
        elif caps & CLIENT_SECURE_CONNECTION:
            if len(auth) > 0xFF:
                raise LocalProtocolError("an auth response over 255 bytes needs CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
            out.append(len(auth))
            out += auth
        else:
            if b"\0" in auth:
                raise LocalProtocolError("a NUL-terminated auth response cannot contain NUL")
            out += auth + b"\0"
        level = self.zstd_compression_level
        if level is not None and not 0 <= level <= 0xFF:
            raise LocalProtocolError(f"a zstd compression level is one byte: {level}")
        # Each optional field is sent only with its flag; one left out ends the packet there.
        optional: tuple[tuple[int, str, bytes | None], ...] = (
            (CLIENT_CONNECT_WITH_DB, "database", None if self.database is None else nul_str(self.database)),
            (
                CLIENT_PLUGIN_AUTH,
                "auth_plugin_name",
                None if self.auth_plugin_name is None else nul_str(self.auth_plugin_name),
            ),
            (
                CLIENT_CONNECT_ATTRS,
                "connect_attrs",
                None if self.connect_attrs is None else encode_connect_attrs(self.connect_attrs),
            ),
            (CLIENT_ZSTD_COMPRESSION_ALGORITHM, "zstd_compression_level", None if level is None else bytes((level,))),
        )
        left_out = None
        for flag, name, wire in optional:
            if wire is None:
                if caps & flag and left_out is None:
                    left_out = name
                continue
            if not caps & flag:
                raise LocalProtocolError(f"{name} is sent only with its capability flag")
            if left_out is not None:
                raise LocalProtocolError(f"{name} cannot follow a left-out {left_out}")
            out += wire
        return bytes(out)


def encode_connect_attrs(attrs: dict[str, str]) -> bytes:
    """Connection attributes as HandshakeResponse41 and COM_CHANGE_USER carry them."""
    body = b"".join(write_lenenc_str(encode_text(k)) + write_lenenc_str(encode_text(v)) for k, v in attrs.items())
    return write_lenenc_int(len(body)) + body


def decode_connect_attrs(cur: Cursor) -> dict[str, str]:
    """Length-encoded total length, then key and value length-encoded strings, read from ``cur``."""
    body = _HandshakeCursor(cur.lenenc_bytes(), "connection attributes")
    attrs: dict[str, str] = {}
    while body.left:
        key = body.lenenc_text()
        attrs[key] = body.lenenc_text()
    return attrs


def decode_handshake_response(payload: bytes) -> SSLRequest | HandshakeResponse41:
    """The client's first packet: an SSLRequest (32 bytes, CLIENT_SSL) or a HandshakeResponse41."""
    cur = _HandshakeCursor(payload, "HandshakeResponse41")
    if len(payload) < SSL_REQUEST_LENGTH:
        raise cur.fail(f"{len(payload)} bytes")
    low = cur.u32()
    if not low & CLIENT_PROTOCOL_41:
        raise cur.fail("the client does not speak the 4.1 protocol")
    max_packet_size = cur.u32()
    character_set = cur.u8()
    cur.take(_FILLER)
    capabilities = _join_caps(low, cur.take(4))
    if len(payload) == SSL_REQUEST_LENGTH:
        if not low & CLIENT_SSL:
            raise cur.fail("a 32-byte response without CLIENT_SSL")
        return SSLRequest(capabilities, max_packet_size, character_set)
    username = cur.nul_text()
    if low & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth = cur.lenenc_bytes()
    elif low & CLIENT_SECURE_CONNECTION:
        auth = cur.take(cur.u8())
    else:
        auth = cur.nul_bytes()
    database = plugin = None
    attrs = None
    zstd = None
    if low & CLIENT_CONNECT_WITH_DB and cur.left:
        database = cur.nul_text()
    if low & CLIENT_PLUGIN_AUTH and cur.left:
        plugin = cur.nul_text(optional_nul=True)
    if low & CLIENT_CONNECT_ATTRS and cur.left:
        attrs = decode_connect_attrs(cur)
    if low & CLIENT_ZSTD_COMPRESSION_ALGORITHM and cur.left:
        zstd = cur.u8()
    return HandshakeResponse41(
        capabilities, username, auth, database, plugin, attrs, max_packet_size, character_set, zstd
    )


@dataclass(frozen=True, slots=True)
class AuthSwitchRequest:
    """The server asks the client to authenticate with another plugin, with that plugin's data (nonce + NUL)."""

    plugin_name: str
    data: bytes = b""

    def encode(self) -> bytes:
        return bytes((AUTH_SWITCH_REQUEST,)) + nul_str(self.plugin_name) + self.data


def decode_auth_switch_request(payload: bytes) -> AuthSwitchRequest:
    """0xFE, plugin name, data. A bare 0xFE (the pre-4.1 "old password" switch) is refused."""
    cur = _HandshakeCursor(payload, "AuthSwitchRequest")
    if cur.u8() != AUTH_SWITCH_REQUEST:
        raise cur.fail("bad header")
    if not cur.left:
        raise cur.fail("a switch to the pre-4.1 password method")
    plugin = cur.nul_text()
    return AuthSwitchRequest(plugin, cur.rest())


@dataclass(frozen=True, slots=True)
class AuthMoreData:
    """Extra authentication data from the server (caching_sha2_password's status byte or public key)."""

    data: bytes

    def encode(self) -> bytes:
        return bytes((AUTH_MORE_DATA,)) + self.data


def decode_auth_more_data(payload: bytes) -> AuthMoreData:
    if not payload or payload[0] != AUTH_MORE_DATA:
        raise _HandshakeCursor(payload, "AuthMoreData").fail("bad header")
    return AuthMoreData(payload[1:])
