"""PostgreSQL v3 typed messages, frontend (F) and backend (B): a frozen dataclass each, codecs.

Rules of this file:

- ``decode_backend``/``decode_frontend`` take what ``FrameReader.next_message`` returns and
  raise only ``ProtocolError`` (SQLSTATE 08P01): never IndexError, struct.error or a
  Unicode error. A count field is checked against the bytes left before anything is built
  from it, so a lying count costs nothing.
- ``Message.encode()`` returns the whole framed message; a value that cannot be encoded
  (NUL inside a string, an integer out of range) raises ``LocalProtocolError``.
- Strings after startup are in the session's client_encoding, which need not be UTF-8.
  They are decoded as UTF-8 with ``surrogateescape``, so any bytes decode and re-encode to
  exactly themselves: a LATIN1 query is relayed intact, and ASCII keywords still match.
- Integers: counts are unsigned 16-bit (as PostgreSQL reads them); OIDs, process ids and
  secret keys are unsigned 32-bit; lengths, format codes, type sizes and modifiers are signed.
- The hot path does not come through here: the relay scans headers (framing.MessageScanner)
  and only decodes the few messages it must understand.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, TypeAlias

from ..errors import LocalProtocolError, ProtocolError
from .framing import frame

ENCODING: Final = "utf-8"
TEXT_ERRORS: Final = "surrogateescape"

_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

# Authentication request codes (B 'R').
AUTH_OK: Final = 0
AUTH_KERBEROS_V5: Final = 2
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_SCM_CREDENTIAL: Final = 6
AUTH_GSS: Final = 7
AUTH_GSS_CONTINUE: Final = 8
AUTH_SSPI: Final = 9
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
# The codes carried by AuthenticationOther (methods this proxy does not speak).
AUTH_OTHER_CODES: Final = frozenset({AUTH_KERBEROS_V5, AUTH_SCM_CREDENTIAL, AUTH_GSS, AUTH_GSS_CONTINUE, AUTH_SSPI})

# Error and notice field codes, by the names error_response() accepts as keywords.
FIELD_CODES: Final[dict[str, str]] = {
    "severity": "S",
    "severity_nonlocalized": "V",
    "sqlstate": "C",
    "message": "M",
    "detail": "D",
    "hint": "H",
    "position": "P",
    "internal_position": "p",
    "internal_query": "q",
    "where": "W",
    "schema_name": "s",
    "table_name": "t",
    "column_name": "c",
    "data_type_name": "d",
    "constraint_name": "n",
    "file": "F",
    "line": "L",
    "routine": "R",
}


# --- decoding helpers ---------------------------------------------------------------------


class _Cursor:
    """Reads a payload front to back; every read checks the bytes left first."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def fail(self, reason: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.what} message: {reason}")

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def _need(self, n: int) -> None:
        if len(self.buf) - self.pos < n:
            raise self.fail("truncated")

    def u8(self) -> int:
        self._need(1)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def i16(self) -> int:
        self._need(2)
        (value,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def u16(self) -> int:
        self._need(2)
        (value,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def i32(self) -> int:
        self._need(4)
        (value,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u32(self) -> int:
        self._need(4)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def count(self, min_item_size: int) -> int:
        """An unsigned 16-bit count, refused if the items cannot fit in what is left."""
        n = self.u16()
        if n * min_item_size > self.left:
            raise self.fail(f"count {n} does not fit in the {self.left} bytes left")
        return n

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        text = self.buf[self.pos : end].decode(ENCODING, TEXT_ERRORS)
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        self._need(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def value(self) -> bytes | None:
        """An Int32 length (-1 for NULL) and that many bytes."""
        n = self.i32()
        if n == -1:
            return None
        if n < 0:
            raise self.fail(f"invalid value length {n}")
        return self.take(n)

    def rest(self) -> bytes:
        data = self.buf[self.pos :]
        self.pos = len(self.buf)
        return data

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} unexpected trailing bytes")


def _cstr(text: str) -> bytes:
    if "\0" in text:
        raise LocalProtocolError("a protocol string cannot contain NUL")
    return text.encode(ENCODING, TEXT_ERRORS) + b"\0"


def _value(data: bytes | None) -> bytes:
    if data is None:
        return _I32.pack(-1)
    return _I32.pack(len(data)) + data


def _i16_list(values: tuple[int, ...]) -> bytes:
    return _U16.pack(len(values)) + b"".join(_I16.pack(v) for v in values)


def _u32_list(values: tuple[int, ...]) -> bytes:
    return _U16.pack(len(values)) + b"".join(_U32.pack(v) for v in values)


def _values(values: tuple[bytes | None, ...]) -> bytes:
    return _U16.pack(len(values)) + b"".join(_value(v) for v in values)


# --- the message base ---------------------------------------------------------------------


class Message:
    """Base of every typed message: ``TYPE`` is the type byte, ``encode()`` frames it."""

    __slots__ = ()
    TYPE: ClassVar[int]

    def body(self) -> bytes:
        """The message body, without type byte and length."""
        return b""

    def encode(self) -> bytes:
        try:
            body = self.body()
        except (struct.error, OverflowError, ValueError) as exc:
            # ValueError covers UnicodeEncodeError (a lone surrogate outside surrogateescape's).
            raise LocalProtocolError(f"cannot encode {type(self).__name__}: {exc}") from None
        return frame(self.TYPE, body)


def _empty(payload: bytes, what: str) -> None:
    if payload:
        raise ProtocolError(f"malformed {what} message: {len(payload)} unexpected bytes")


# --- backend: authentication (B 'R') ----------------------------------------------------


class Authentication(Message):
    """Base of the authentication requests; ``CODE`` is the Int32 after the header."""

    __slots__ = ()
    TYPE: ClassVar[int] = ord("R")
    CODE: ClassVar[int]

    def body(self) -> bytes:
        return _I32.pack(self.CODE) + self.data_bytes()

    def data_bytes(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class AuthenticationOk(Authentication):
    """(B) Authentication succeeded."""

    CODE: ClassVar[int] = AUTH_OK


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(Authentication):
    """(B) Send the password in clear."""

    CODE: ClassVar[int] = AUTH_CLEARTEXT_PASSWORD


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Authentication):
    """(B) Send the md5-hashed password, salted with these 4 bytes."""

    CODE: ClassVar[int] = AUTH_MD5_PASSWORD
    salt: bytes

    def data_bytes(self) -> bytes:
        if len(self.salt) != 4:
            raise ValueError("the MD5 salt is 4 bytes")
        return self.salt


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Authentication):
    """(B) Start SASL with one of these mechanisms."""

    CODE: ClassVar[int] = AUTH_SASL
    mechanisms: tuple[str, ...]

    def data_bytes(self) -> bytes:
        for name in self.mechanisms:
            if not name:
                raise ValueError("a SASL mechanism name cannot be empty")
        return b"".join(_cstr(m) for m in self.mechanisms) + b"\0"


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(Authentication):
    """(B) A SASL challenge (SCRAM: the server-first-message)."""

    CODE: ClassVar[int] = AUTH_SASL_CONTINUE
    data: bytes

    def data_bytes(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(Authentication):
    """(B) SASL outcome data (SCRAM: the server-final-message)."""

    CODE: ClassVar[int] = AUTH_SASL_FINAL
    data: bytes

    def data_bytes(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class AuthenticationOther(Authentication):
    """(B) KerberosV5, SCMCredential, GSS, GSSContinue or SSPI: methods the proxy does not speak."""

    CODE: ClassVar[int] = -1  # unused: the instance's ``code`` is written instead
    code: int
    data: bytes = b""

    def body(self) -> bytes:
        return _I32.pack(self.code) + self.data


AuthenticationMessage: TypeAlias = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
)


def _decode_authentication(payload: bytes) -> AuthenticationMessage:
    c = _Cursor(payload, "Authentication")
    code = c.i32()
    if code == AUTH_OK:
        c.done()
        return AuthenticationOk()
    if code == AUTH_CLEARTEXT_PASSWORD:
        c.done()
        return AuthenticationCleartextPassword()
    if code == AUTH_MD5_PASSWORD:
        salt = c.take(4)
        c.done()
        return AuthenticationMD5Password(salt)
    if code == AUTH_SASL:
        mechanisms: list[str] = []
        while True:
            name = c.cstring()
            if not name:
                break
            mechanisms.append(name)
        c.done()
        return AuthenticationSASL(tuple(mechanisms))
    if code == AUTH_SASL_CONTINUE:
        return AuthenticationSASLContinue(c.rest())
    if code == AUTH_SASL_FINAL:
        return AuthenticationSASLFinal(c.rest())
    if code in AUTH_OTHER_CODES:
        return AuthenticationOther(code, c.rest())
    raise c.fail(f"unknown authentication request code {code}")


# --- backend: everything else -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    """(B) The keys a CancelRequest must quote to cancel this session's queries."""

    TYPE: ClassVar[int] = ord("K")
    process_id: int
    secret_key: int

    def body(self) -> bytes:
        return _U32.pack(self.process_id) + _U32.pack(self.secret_key)

    @classmethod
    def decode(cls, payload: bytes) -> BackendKeyData:
        c = _Cursor(payload, "BackendKeyData")
        message = cls(c.u32(), c.u32())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class BindComplete(Message):
    """(B) The Bind succeeded."""

    TYPE: ClassVar[int] = ord("2")

    @classmethod
    def decode(cls, payload: bytes) -> BindComplete:
        _empty(payload, "BindComplete")
        return cls()


@dataclass(frozen=True, slots=True)
class CloseComplete(Message):
    """(B) The Close succeeded."""

    TYPE: ClassVar[int] = ord("3")

    @classmethod
    def decode(cls, payload: bytes) -> CloseComplete:
        _empty(payload, "CloseComplete")
        return cls()


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    """(B) A command finished; ``tag`` is e.g. ``SELECT 3`` or ``INSERT 0 1``."""

    TYPE: ClassVar[int] = ord("C")
    tag: str

    def body(self) -> bytes:
        return _cstr(self.tag)

    @classmethod
    def decode(cls, payload: bytes) -> CommandComplete:
        c = _Cursor(payload, "CommandComplete")
        message = cls(c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    """(F & B) A chunk of COPY data."""

    TYPE: ClassVar[int] = ord("d")
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, payload: bytes) -> CopyData:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class CopyDone(Message):
    """(F & B) The end of COPY data."""

    TYPE: ClassVar[int] = ord("c")

    @classmethod
    def decode(cls, payload: bytes) -> CopyDone:
        _empty(payload, "CopyDone")
        return cls()


class _CopyResponse(Message):
    """Shared shape of CopyInResponse, CopyOutResponse, CopyBothResponse."""

    __slots__ = ()
    format: int
    column_formats: tuple[int, ...]

    def body(self) -> bytes:
        return _U8.pack(self.format) + _i16_list(self.column_formats)


def _decode_copy_response(payload: bytes, what: str) -> tuple[int, tuple[int, ...]]:
    c = _Cursor(payload, what)
    fmt = c.u8()
    n = c.count(2)
    formats = tuple(c.i16() for _ in range(n))
    c.done()
    return fmt, formats


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    """(B) COPY FROM STDIN started; send CopyData."""

    TYPE: ClassVar[int] = ord("G")
    format: int
    column_formats: tuple[int, ...]

    @classmethod
    def decode(cls, payload: bytes) -> CopyInResponse:
        return cls(*_decode_copy_response(payload, "CopyInResponse"))


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    """(B) COPY TO STDOUT started; CopyData follows."""

    TYPE: ClassVar[int] = ord("H")
    format: int
    column_formats: tuple[int, ...]

    @classmethod
    def decode(cls, payload: bytes) -> CopyOutResponse:
        return cls(*_decode_copy_response(payload, "CopyOutResponse"))


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    """(B) Copy-both mode started (streaming replication)."""

    TYPE: ClassVar[int] = ord("W")
    format: int
    column_formats: tuple[int, ...]

    @classmethod
    def decode(cls, payload: bytes) -> CopyBothResponse:
        return cls(*_decode_copy_response(payload, "CopyBothResponse"))


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    """(B) One result row; None is SQL NULL. Decode these in tests and tools, not on the relay."""

    TYPE: ClassVar[int] = ord("D")
    values: tuple[bytes | None, ...]

    def body(self) -> bytes:
        return _values(self.values)

    @classmethod
    def decode(cls, payload: bytes) -> DataRow:
        c = _Cursor(payload, "DataRow")
        n = c.count(4)
        values = tuple(c.value() for _ in range(n))
        c.done()
        return cls(values)


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(Message):
    """(B) The query string was empty."""

    TYPE: ClassVar[int] = ord("I")

    @classmethod
    def decode(cls, payload: bytes) -> EmptyQueryResponse:
        _empty(payload, "EmptyQueryResponse")
        return cls()


class _Fields(Message):
    """Shared shape of ErrorResponse and NoticeResponse: one-character code -> text."""

    __slots__ = ()
    fields: dict[str, str]

    @property
    def severity(self) -> str:
        """The non-localized severity (V) when sent, else the localized one (S)."""
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    def body(self) -> bytes:
        parts = []
        for code, value in self.fields.items():
            if len(code) != 1 or not 0 < ord(code) < 256:
                raise ValueError(f"invalid field code {code!r}")
            parts.append(bytes((ord(code),)) + _cstr(value))
        parts.append(b"\0")
        return b"".join(parts)


def _decode_fields(payload: bytes, what: str) -> dict[str, str]:
    c = _Cursor(payload, what)
    fields: dict[str, str] = {}
    while True:
        code = c.u8()
        if code == 0:
            break
        fields[chr(code)] = c.cstring()
    c.done()
    return fields


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    """(B) An error; fields keyed by their one-character code (S, V, C, M, D, H, P, ...)."""

    TYPE: ClassVar[int] = ord("E")
    fields: dict[str, str]

    @classmethod
    def decode(cls, payload: bytes) -> ErrorResponse:
        return cls(_decode_fields(payload, "ErrorResponse"))


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    """(B) A notice; same fields as ErrorResponse."""

    TYPE: ClassVar[int] = ord("N")
    fields: dict[str, str]

    @classmethod
    def decode(cls, payload: bytes) -> NoticeResponse:
        return cls(_decode_fields(payload, "NoticeResponse"))


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    """(B) The result of a FunctionCall; None is NULL."""

    TYPE: ClassVar[int] = ord("V")
    result: bytes | None

    def body(self) -> bytes:
        return _value(self.result)

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCallResponse:
        c = _Cursor(payload, "FunctionCallResponse")
        message = cls(c.value())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    """(B) The newest minor version the server speaks and the ``_pq_`` options it ignored."""

    TYPE: ClassVar[int] = ord("v")
    newest_minor: int
    unrecognized: tuple[str, ...]

    def body(self) -> bytes:
        names = b"".join(_cstr(name) for name in self.unrecognized)
        return _I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized)) + names

    @classmethod
    def decode(cls, payload: bytes) -> NegotiateProtocolVersion:
        c = _Cursor(payload, "NegotiateProtocolVersion")
        newest_minor = c.i32()
        n = c.i32()
        if n < 0 or n > c.left:  # each name takes at least its terminator
            raise c.fail(f"option count {n} does not fit in the {c.left} bytes left")
        names = tuple(c.cstring() for _ in range(n))
        c.done()
        return cls(newest_minor, names)


@dataclass(frozen=True, slots=True)
class NoData(Message):
    """(B) The described statement or portal returns no rows."""

    TYPE: ClassVar[int] = ord("n")

    @classmethod
    def decode(cls, payload: bytes) -> NoData:
        _empty(payload, "NoData")
        return cls()


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    """(B) A NOTIFY on a channel this session listens to, from ``process_id``."""

    TYPE: ClassVar[int] = ord("A")
    process_id: int
    channel: str
    payload: str

    def body(self) -> bytes:
        return _U32.pack(self.process_id) + _cstr(self.channel) + _cstr(self.payload)

    @classmethod
    def decode(cls, payload: bytes) -> NotificationResponse:
        c = _Cursor(payload, "NotificationResponse")
        message = cls(c.u32(), c.cstring(), c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    """(B) The type OIDs of a prepared statement's parameters."""

    TYPE: ClassVar[int] = ord("t")
    type_oids: tuple[int, ...]

    def body(self) -> bytes:
        return _u32_list(self.type_oids)

    @classmethod
    def decode(cls, payload: bytes) -> ParameterDescription:
        c = _Cursor(payload, "ParameterDescription")
        n = c.count(4)
        oids = tuple(c.u32() for _ in range(n))
        c.done()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    """(B) A run-time parameter's current value (server_version, TimeZone, ...)."""

    TYPE: ClassVar[int] = ord("S")
    name: str
    value: str

    def body(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)

    @classmethod
    def decode(cls, payload: bytes) -> ParameterStatus:
        c = _Cursor(payload, "ParameterStatus")
        message = cls(c.cstring(), c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class ParseComplete(Message):
    """(B) The Parse succeeded."""

    TYPE: ClassVar[int] = ord("1")

    @classmethod
    def decode(cls, payload: bytes) -> ParseComplete:
        _empty(payload, "ParseComplete")
        return cls()


@dataclass(frozen=True, slots=True)
class PortalSuspended(Message):
    """(B) Execute's row limit was reached; the portal has more rows."""

    TYPE: ClassVar[int] = ord("s")

    @classmethod
    def decode(cls, payload: bytes) -> PortalSuspended:
        _empty(payload, "PortalSuspended")
        return cls()


TRANSACTION_STATUSES: Final = frozenset("ITE")


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    """(B) Ready for a query; status I (idle), T (in a transaction), E (failed transaction)."""

    TYPE: ClassVar[int] = ord("Z")
    status: str

    def body(self) -> bytes:
        if self.status not in TRANSACTION_STATUSES:
            raise ValueError(f"invalid transaction status {self.status!r}")
        return self.status.encode("ascii")

    @classmethod
    def decode(cls, payload: bytes) -> ReadyForQuery:
        if len(payload) != 1 or payload not in (b"I", b"T", b"E"):
            raise ProtocolError(f"malformed ReadyForQuery message: {payload[:8]!r}")
        return cls(chr(payload[0]))


@dataclass(frozen=True, slots=True)
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0

    def encode_field(self) -> bytes:
        return (
            _cstr(self.name)
            + _U32.pack(self.table_oid)
            + _I16.pack(self.column_number)
            + _U32.pack(self.type_oid)
            + _I16.pack(self.type_size)
            + _I32.pack(self.type_modifier)
            + _I16.pack(self.format)
        )


# A field is at least: empty name (1) + table oid (4) + column (2) + type oid (4)
# + size (2) + modifier (4) + format (2).
_MIN_FIELD_SIZE = 19


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    """(B) The columns of the rows to come."""

    TYPE: ClassVar[int] = ord("T")
    fields: tuple[Field, ...]

    def body(self) -> bytes:
        return _U16.pack(len(self.fields)) + b"".join(f.encode_field() for f in self.fields)

    @classmethod
    def decode(cls, payload: bytes) -> RowDescription:
        c = _Cursor(payload, "RowDescription")
        n = c.count(_MIN_FIELD_SIZE)
        fields = tuple(Field(c.cstring(), c.u32(), c.i16(), c.u32(), c.i16(), c.i32(), c.i16()) for _ in range(n))
        c.done()
        return cls(fields)


# --- frontend -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bind(Message):
    """(F) Bind parameters to a prepared statement, making a portal."""

    TYPE: ClassVar[int] = ord("B")
    portal: str
    statement: str
    parameter_formats: tuple[int, ...]
    parameters: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def body(self) -> bytes:
        return (
            _cstr(self.portal)
            + _cstr(self.statement)
            + _i16_list(self.parameter_formats)
            + _values(self.parameters)
            + _i16_list(self.result_formats)
        )

    @classmethod
    def decode(cls, payload: bytes) -> Bind:
        c = _Cursor(payload, "Bind")
        portal = c.cstring()
        statement = c.cstring()
        n = c.count(2)
        parameter_formats = tuple(c.i16() for _ in range(n))
        n = c.count(4)
        parameters = tuple(c.value() for _ in range(n))
        n = c.count(2)
        result_formats = tuple(c.i16() for _ in range(n))
        c.done()
        return cls(portal, statement, parameter_formats, parameters, result_formats)


def _kind(c: _Cursor) -> str:
    kind = c.u8()
    if kind not in (ord("S"), ord("P")):
        raise c.fail(f"invalid subtype {kind}")
    return chr(kind)


def _kind_byte(kind: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError(f"kind is 'S' (statement) or 'P' (portal), not {kind!r}")
    return kind.encode("ascii")


@dataclass(frozen=True, slots=True)
class Close(Message):
    """(F) Close a prepared statement (kind 'S') or a portal ('P'); '' is the unnamed one."""

    TYPE: ClassVar[int] = ord("C")
    kind: str
    name: str

    def body(self) -> bytes:
        return _kind_byte(self.kind) + _cstr(self.name)

    @classmethod
    def decode(cls, payload: bytes) -> Close:
        c = _Cursor(payload, "Close")
        message = cls(_kind(c), c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    """(F) Abort COPY FROM STDIN with this message."""

    TYPE: ClassVar[int] = ord("f")
    message: str

    def body(self) -> bytes:
        return _cstr(self.message)

    @classmethod
    def decode(cls, payload: bytes) -> CopyFail:
        c = _Cursor(payload, "CopyFail")
        message = cls(c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class Describe(Message):
    """(F) Describe a prepared statement (kind 'S') or a portal ('P')."""

    TYPE: ClassVar[int] = ord("D")
    kind: str
    name: str

    def body(self) -> bytes:
        return _kind_byte(self.kind) + _cstr(self.name)

    @classmethod
    def decode(cls, payload: bytes) -> Describe:
        c = _Cursor(payload, "Describe")
        message = cls(_kind(c), c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class Execute(Message):
    """(F) Run a portal; ``max_rows`` 0 means all rows."""

    TYPE: ClassVar[int] = ord("E")
    portal: str
    max_rows: int = 0

    def body(self) -> bytes:
        return _cstr(self.portal) + _I32.pack(self.max_rows)

    @classmethod
    def decode(cls, payload: bytes) -> Execute:
        c = _Cursor(payload, "Execute")
        message = cls(c.cstring(), c.i32())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class Flush(Message):
    """(F) Send whatever output is pending."""

    TYPE: ClassVar[int] = ord("H")

    @classmethod
    def decode(cls, payload: bytes) -> Flush:
        _empty(payload, "Flush")
        return cls()


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    """(F) Call a function by OID (the legacy fast-path interface)."""

    TYPE: ClassVar[int] = ord("F")
    function_oid: int
    argument_formats: tuple[int, ...]
    arguments: tuple[bytes | None, ...]
    result_format: int = 0

    def body(self) -> bytes:
        return (
            _U32.pack(self.function_oid)
            + _i16_list(self.argument_formats)
            + _values(self.arguments)
            + _I16.pack(self.result_format)
        )

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCall:
        c = _Cursor(payload, "FunctionCall")
        oid = c.u32()
        n = c.count(2)
        formats = tuple(c.i16() for _ in range(n))
        n = c.count(4)
        arguments = tuple(c.value() for _ in range(n))
        message = cls(oid, formats, arguments, c.i16())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class Parse(Message):
    """(F) Prepare a statement; parameter type OID 0 leaves the type to the server."""

    TYPE: ClassVar[int] = ord("P")
    name: str
    query: str
    parameter_types: tuple[int, ...] = ()

    def body(self) -> bytes:
        return _cstr(self.name) + _cstr(self.query) + _u32_list(self.parameter_types)

    @classmethod
    def decode(cls, payload: bytes) -> Parse:
        c = _Cursor(payload, "Parse")
        name = c.cstring()
        query = c.cstring()
        n = c.count(4)
        types = tuple(c.u32() for _ in range(n))
        c.done()
        return cls(name, query, types)


@dataclass(frozen=True, slots=True)
class PasswordPacket(Message):
    """(F 'p') PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse, undecoded.

    Which one it is depends on the authentication request it answers; see
    ``decode_password_message`` and ``decode_sasl_initial_response``.
    """

    TYPE: ClassVar[int] = ord("p")
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, payload: bytes) -> PasswordPacket:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """(F 'p') A password, clear or md5-hashed."""

    TYPE: ClassVar[int] = ord("p")
    password: str

    def body(self) -> bytes:
        return _cstr(self.password)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    """(F 'p') The chosen SASL mechanism and the first client message (None: none sent)."""

    TYPE: ClassVar[int] = ord("p")
    mechanism: str
    data: bytes | None

    def body(self) -> bytes:
        return _cstr(self.mechanism) + _value(self.data)


@dataclass(frozen=True, slots=True)
class SASLResponse(Message):
    """(F 'p') A later SASL client message (SCRAM: the client-final-message)."""

    TYPE: ClassVar[int] = ord("p")
    data: bytes

    def body(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class GSSResponse(Message):
    """(F 'p') A GSSAPI or SSPI token."""

    TYPE: ClassVar[int] = ord("p")
    data: bytes

    def body(self) -> bytes:
        return self.data


def decode_password_message(data: bytes) -> str:
    """The password of a PasswordMessage payload: one NUL-terminated string, nothing after."""
    end = data.find(b"\0")
    if end < 0 or end != len(data) - 1:
        raise ProtocolError("invalid password packet size")
    return data[:end].decode(ENCODING, TEXT_ERRORS)


def decode_sasl_initial_response(data: bytes) -> tuple[str, bytes | None]:
    """(mechanism, initial client message) of a SASLInitialResponse payload; None when absent."""
    c = _Cursor(data, "SASLInitialResponse")
    mechanism = c.cstring()
    response = c.value()
    c.done()
    return mechanism, response


@dataclass(frozen=True, slots=True)
class Query(Message):
    """(F) A simple-protocol query: one or more statements."""

    TYPE: ClassVar[int] = ord("Q")
    sql: str

    def body(self) -> bytes:
        return _cstr(self.sql)

    @classmethod
    def decode(cls, payload: bytes) -> Query:
        c = _Cursor(payload, "Query")
        message = cls(c.cstring())
        c.done()
        return message


@dataclass(frozen=True, slots=True)
class Sync(Message):
    """(F) End of an extended-protocol batch: commit or roll back, then ReadyForQuery."""

    TYPE: ClassVar[int] = ord("S")

    @classmethod
    def decode(cls, payload: bytes) -> Sync:
        _empty(payload, "Sync")
        return cls()


@dataclass(frozen=True, slots=True)
class Terminate(Message):
    """(F) The client is closing the session."""

    TYPE: ClassVar[int] = ord("X")

    @classmethod
    def decode(cls, payload: bytes) -> Terminate:
        _empty(payload, "Terminate")
        return cls()


# --- dispatch -----------------------------------------------------------------------------

BackendMessage: TypeAlias = (
    AuthenticationMessage
    | BackendKeyData
    | BindComplete
    | CloseComplete
    | CommandComplete
    | CopyData
    | CopyDone
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | DataRow
    | EmptyQueryResponse
    | ErrorResponse
    | NoticeResponse
    | FunctionCallResponse
    | NegotiateProtocolVersion
    | NoData
    | NotificationResponse
    | ParameterDescription
    | ParameterStatus
    | ParseComplete
    | PortalSuspended
    | ReadyForQuery
    | RowDescription
)

FrontendMessage: TypeAlias = (
    Bind
    | Close
    | CopyData
    | CopyDone
    | CopyFail
    | Describe
    | Execute
    | Flush
    | FunctionCall
    | Parse
    | PasswordPacket
    | Query
    | Sync
    | Terminate
)

_BACKEND_DECODERS: Final[dict[int, Callable[[bytes], BackendMessage]]] = {
    Authentication.TYPE: _decode_authentication,
    BackendKeyData.TYPE: BackendKeyData.decode,
    BindComplete.TYPE: BindComplete.decode,
    CloseComplete.TYPE: CloseComplete.decode,
    CommandComplete.TYPE: CommandComplete.decode,
    CopyData.TYPE: CopyData.decode,
    CopyDone.TYPE: CopyDone.decode,
    CopyInResponse.TYPE: CopyInResponse.decode,
    CopyOutResponse.TYPE: CopyOutResponse.decode,
    CopyBothResponse.TYPE: CopyBothResponse.decode,
    DataRow.TYPE: DataRow.decode,
    EmptyQueryResponse.TYPE: EmptyQueryResponse.decode,
    ErrorResponse.TYPE: ErrorResponse.decode,
    NoticeResponse.TYPE: NoticeResponse.decode,
    FunctionCallResponse.TYPE: FunctionCallResponse.decode,
    NegotiateProtocolVersion.TYPE: NegotiateProtocolVersion.decode,
    NoData.TYPE: NoData.decode,
    NotificationResponse.TYPE: NotificationResponse.decode,
    ParameterDescription.TYPE: ParameterDescription.decode,
    ParameterStatus.TYPE: ParameterStatus.decode,
    ParseComplete.TYPE: ParseComplete.decode,
    PortalSuspended.TYPE: PortalSuspended.decode,
    ReadyForQuery.TYPE: ReadyForQuery.decode,
    RowDescription.TYPE: RowDescription.decode,
}

_FRONTEND_DECODERS: Final[dict[int, Callable[[bytes], FrontendMessage]]] = {
    Bind.TYPE: Bind.decode,
    Close.TYPE: Close.decode,
    CopyData.TYPE: CopyData.decode,
    CopyDone.TYPE: CopyDone.decode,
    CopyFail.TYPE: CopyFail.decode,
    Describe.TYPE: Describe.decode,
    Execute.TYPE: Execute.decode,
    Flush.TYPE: Flush.decode,
    FunctionCall.TYPE: FunctionCall.decode,
    Parse.TYPE: Parse.decode,
    PasswordPacket.TYPE: PasswordPacket.decode,
    Query.TYPE: Query.decode,
    Sync.TYPE: Sync.decode,
    Terminate.TYPE: Terminate.decode,
}

BACKEND_TYPE_BYTES: Final = bytes(sorted(_BACKEND_DECODERS))
FRONTEND_TYPE_BYTES: Final = bytes(sorted(_FRONTEND_DECODERS))


def decode_backend(type_: int, payload: bytes) -> BackendMessage:
    """Decode a server message from (type byte, payload); raises ProtocolError (08P01)."""
    decoder = _BACKEND_DECODERS.get(type_)
    if decoder is None:
        raise ProtocolError(f"unknown backend message type {_show_type(type_)}")
    return decoder(payload)


def decode_frontend(type_: int, payload: bytes) -> FrontendMessage:
    """Decode a client message from (type byte, payload); raises ProtocolError (08P01)."""
    decoder = _FRONTEND_DECODERS.get(type_)
    if decoder is None:
        raise ProtocolError(f"invalid frontend message type {_show_type(type_)}")
    return decoder(payload)


def _show_type(type_: int) -> str:
    return repr(chr(type_)) if 32 <= type_ < 127 else str(type_)


# --- errors and notices to send -----------------------------------------------------------


def _field_dict(severity: str, sqlstate: str, message: str, extra: dict[str, str]) -> dict[str, str]:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    for name, value in extra.items():
        code = FIELD_CODES.get(name, name if len(name) == 1 else None)
        if code is None:
            raise TypeError(f"unknown error field {name!r}")
        fields[code] = value
    return fields


def error_response(severity: str, sqlstate: str, message: str, **extra: str) -> bytes:
    """A framed ErrorResponse with S, V, C, M and any of ``FIELD_CODES`` (detail=, hint=, ...).

    Keywords may also be the one-character codes themselves (``D="..."``).
    """
    return ErrorResponse(_field_dict(severity, sqlstate, message, extra)).encode()


def notice_response(severity: str, sqlstate: str, message: str, **extra: str) -> bytes:
    """A framed NoticeResponse, fields as in ``error_response``."""
    return NoticeResponse(_field_dict(severity, sqlstate, message, extra)).encode()
