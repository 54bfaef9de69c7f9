"""PostgreSQL startup-phase packets (F): StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.

Rules of this file: payloads come from ``FrameReader.next_startup`` (the packet without its
4-byte length); every refusal is a ``StartupError`` carrying the SQLSTATE PostgreSQL itself
would report. Text here is strict UTF-8: the startup packet is where names are matched
against configuration, and there is no client_encoding yet to say otherwise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..errors import LocalProtocolError, StartupError
from .framing import frame_untyped

PROTOCOL_VERSION_3: Final = 196608  # 3.0: major 3 in the high 16 bits, minor 0
SSL_REQUEST_CODE: Final = 80877103  # 1234.5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234.5680
CANCEL_REQUEST_CODE: Final = 80877102  # 1234.5678
# NAMEDATALEN - 1: the longest user or database name PostgreSQL stores.
MAX_NAME_BYTES: Final = 63
# Startup parameters whose name starts with this are protocol options, not GUCs.
PROTOCOL_OPTION_PREFIX: Final = "_pq_."

_UINT32 = struct.Struct("!I")
_CANCEL = struct.Struct("!III")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """(F) Asks the server to switch to TLS before the startup message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """(F) Asks the server to switch to GSSAPI encryption before the startup message."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """(F) Cancels the query running on the session these keys identify.

    Both keys are treated as opaque unsigned 32-bit numbers, as in ``BackendKeyData``.
    """

    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """(F) Opens a session: protocol version and the parameters (user, database, GUCs...)."""

    protocol_version: int
    parameters: dict[str, str]

    @property
    def major(self) -> int:
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        return self.protocol_version & 0xFFFF

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        """The database name; PostgreSQL uses the user name when none (or an empty one) is given."""
        return self.parameters.get("database") or self.user

    @property
    def protocol_options(self) -> dict[str, str]:
        """The ``_pq_.*`` parameters (protocol extensions the client asks for)."""
        return {k: v for k, v in self.parameters.items() if k.startswith(PROTOCOL_OPTION_PREFIX)}


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(payload: bytes) -> StartupPacket:
    """Decode one startup-phase packet (without its length); raises ``StartupError``."""
    if len(payload) < 4:
        raise StartupError("invalid length of startup packet")
    (code,) = _UINT32.unpack_from(payload, 0)
    if code == SSL_REQUEST_CODE:
        _expect_bare(payload, "SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        _expect_bare(payload, "GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(payload) != _CANCEL.size:
            raise StartupError(f"invalid length of CancelRequest packet: {len(payload) + 4}")
        _, process_id, secret_key = _CANCEL.unpack(payload)
        return CancelRequest(process_id, secret_key)
    if code >> 16 != 3:
        raise StartupError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 to 3.0",
            sqlstate="0A000",  # feature_not_supported
        )
    message = StartupMessage(code, _parse_parameters(payload))
    _check_names(message)
    return message


def _expect_bare(payload: bytes, name: str) -> None:
    if len(payload) != 4:
        raise StartupError(f"invalid length of {name} packet: {len(payload) + 4}")


def _parse_parameters(payload: bytes) -> dict[str, str]:
    """name\\0value\\0 ... \\0 — the final empty name is the terminator and the last byte."""
    params: dict[str, str] = {}
    pos = 4
    end = len(payload)
    while True:
        if pos >= end:
            raise StartupError("invalid startup packet layout: expected terminator as last byte")
        name_end = payload.find(b"\0", pos)
        if name_end < 0:
            raise StartupError("invalid startup packet layout: unterminated parameter name")
        if name_end == pos:  # the empty name: terminator
            if pos + 1 != end:
                raise StartupError("invalid startup packet layout: expected terminator as last byte")
            return params
        value_end = payload.find(b"\0", name_end + 1)
        if value_end < 0:
            raise StartupError("invalid startup packet layout: parameter without a value")
        name = _text(payload[pos:name_end])
        params[name] = _text(payload[name_end + 1 : value_end])
        pos = value_end + 1


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StartupError("invalid UTF-8 in startup packet") from None


def _check_names(message: StartupMessage) -> None:
    user = message.user
    if not user:
        raise StartupError(
            "no PostgreSQL user name specified in startup packet",
            sqlstate="28000",  # invalid_authorization_specification
        )
    for what, name in (("user", user), ("database", message.database)):
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise StartupError(
                f"{what} name is too long (more than {MAX_NAME_BYTES} bytes)",
                sqlstate="42622",  # name_too_long
            )


def encode_startup_message(parameters: dict[str, str], protocol_version: int = PROTOCOL_VERSION_3) -> bytes:
    """The whole StartupMessage packet, length included, parameters in dict order."""
    if not 0 <= protocol_version <= 0xFFFFFFFF:
        raise LocalProtocolError(f"invalid protocol version {protocol_version}")
    parts = [_UINT32.pack(protocol_version)]
    for name, value in parameters.items():
        if not name:
            raise LocalProtocolError("a startup parameter name cannot be empty")
        parts.append(_cstring(name))
        parts.append(_cstring(value))
    parts.append(b"\0")
    return frame_untyped(b"".join(parts))


def encode_ssl_request() -> bytes:
    return frame_untyped(_UINT32.pack(SSL_REQUEST_CODE))


def encode_gssenc_request() -> bytes:
    return frame_untyped(_UINT32.pack(GSSENC_REQUEST_CODE))


def encode_cancel_request(process_id: int, secret_key: int) -> bytes:
    try:
        return frame_untyped(_CANCEL.pack(CANCEL_REQUEST_CODE, process_id, secret_key))
    except struct.error as exc:
        raise LocalProtocolError(f"cancel keys must be unsigned 32-bit: {exc}") from None


def _cstring(text: str) -> bytes:
    if "\0" in text:
        raise LocalProtocolError("a startup parameter cannot contain NUL")
    try:
        return text.encode("utf-8") + b"\0"
    except UnicodeEncodeError:
        raise LocalProtocolError("a startup parameter is not encodable as UTF-8") from None
