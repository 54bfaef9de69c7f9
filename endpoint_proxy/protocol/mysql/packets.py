"""The generic server responses: OK, ERR and EOF packets, and the session state changes an OK carries.

Rules of this file: payloads in and out, never framed (``framing.encode_packet`` adds the
header and sequence id). Only the 4.1 protocol (CLIENT_PROTOCOL_41) is spoken. Decoders
raise only ``MySQLProtocolError``; ``encode`` raises ``LocalProtocolError`` on a value
that does not fit.

Telling them apart needs the protocol state (``response.ResponseTracker`` has it):

- OK: header 0x00 (or 0xFE, as a result set's terminator under CLIENT_DEPRECATE_EOF);
- EOF: header 0xFE and a payload shorter than 9 bytes (5 bytes in 4.1);
- ERR: header 0xFF.

A text row may start with 0x00 (an empty string) or 0xFE (a value of 16 MiB or more, so the
payload is at least that long), a binary row always starts with 0x00.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..errors import LocalProtocolError
from .constants import (
    CLIENT_DEPRECATE_EOF,
    CLIENT_SESSION_TRACK,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_SESSION_STATE_CHANGED,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_IN_TRANS,
    SESSION_TRACK_GTIDS,
    SESSION_TRACK_SCHEMA,
    SESSION_TRACK_SYSTEM_VARIABLES,
)
from .errors import MySQLProtocolError
from .framing import Cursor, decode_text, encode_text, write_lenenc_int, write_lenenc_str

OK_HEADER: Final = 0x00
EOF_HEADER: Final = 0xFE
ERR_HEADER: Final = 0xFF
LOCAL_INFILE_HEADER: Final = 0xFB
# An EOF packet is shorter than this; an OK packet with a 0xFE header is at least 7 bytes.
EOF_MAX_LENGTH: Final = 9
_OK_MIN_LENGTH: Final = 7

SessionChange = tuple[int, bytes]  # (SESSION_TRACK_* type, that tracker's raw data)


@dataclass(frozen=True, slots=True)
class OkPacket:
    """A command succeeded; ``session_changes`` is set when SERVER_SESSION_STATE_CHANGED is."""

    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = 0
    warnings: int = 0
    info: str = ""
    session_changes: tuple[SessionChange, ...] = ()
    header: int = OK_HEADER

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & SERVER_STATUS_IN_TRANS)

    @property
    def autocommit(self) -> bool:
        return bool(self.status & SERVER_STATUS_AUTOCOMMIT)

    @property
    def more_results(self) -> bool:
        return bool(self.status & SERVER_MORE_RESULTS_EXISTS)

    def encode(self, capabilities: int) -> bytes:
        if self.header not in (OK_HEADER, EOF_HEADER):
            raise LocalProtocolError(f"an OK packet's header is 0x00 or 0xFE, not {self.header:#x}")
        if not (0 <= self.status <= 0xFFFF and 0 <= self.warnings <= 0xFFFF):
            raise LocalProtocolError("status flags and warning count are 16-bit")
        out = bytearray((self.header,))
        out += write_lenenc_int(self.affected_rows)
        out += write_lenenc_int(self.last_insert_id)
        out += self.status.to_bytes(2, "little") + self.warnings.to_bytes(2, "little")
        info = encode_text(self.info)
        changed = bool(self.status & SERVER_SESSION_STATE_CHANGED)
        if not capabilities & CLIENT_SESSION_TRACK:
            if self.session_changes:
                raise LocalProtocolError("session state changes need CLIENT_SESSION_TRACK")
            out += info
        else:
            if self.session_changes and not changed:
                raise LocalProtocolError("session state changes need SERVER_SESSION_STATE_CHANGED")
            if info or changed:
                out += write_lenenc_str(info)
            if changed:
                out += write_lenenc_str(encode_session_changes(self.session_changes))
        if self.header == EOF_HEADER and len(out) < _OK_MIN_LENGTH:
            raise LocalProtocolError("an OK packet with a 0xFE header must be at least 7 bytes")
        return bytes(out)


def decode_ok(payload: bytes, capabilities: int) -> OkPacket:
    """An OK packet (header 0x00 or 0xFE). ``capabilities`` are the negotiated ones."""
    cur = Cursor(payload, "OK packet")
    header = cur.u8()
    if header not in (OK_HEADER, EOF_HEADER):
        raise cur.fail(f"header {header:#x}")
    affected_rows = cur.lenenc_int()
    last_insert_id = cur.lenenc_int()
    status = cur.u16()
    warnings = cur.u16()
    changes: tuple[SessionChange, ...] = ()
    if not capabilities & CLIENT_SESSION_TRACK:
        info = decode_text(cur.rest())
    else:
        # The info string may be left out entirely when it is empty and no state changed.
        info = cur.lenenc_text() if cur.left else ""
        if status & SERVER_SESSION_STATE_CHANGED and cur.left:
            changes = decode_session_changes(cur.lenenc_bytes())
        cur.done()
    return OkPacket(affected_rows, last_insert_id, status, warnings, info, changes, header)


def encode_session_changes(changes: tuple[SessionChange, ...]) -> bytes:
    out = bytearray()
    for type_, data in changes:
        if not 0 <= type_ <= 0xFF:
            raise LocalProtocolError(f"a session tracker type is one byte: {type_}")
        out.append(type_)
        out += write_lenenc_str(data)
    return bytes(out)


def decode_session_changes(data: bytes) -> tuple[SessionChange, ...]:
    """The session state info of an OK packet: (tracker type, raw data) per entry, in order."""
    cur = Cursor(data, "session state info")
    out: list[SessionChange] = []
    while cur.left:
        type_ = cur.u8()
        out.append((type_, cur.lenenc_bytes()))
    return tuple(out)


def session_variable(data: bytes) -> tuple[str, str]:
    """A SESSION_TRACK_SYSTEM_VARIABLES entry: (name, value). MariaDB's ``last_gtid`` arrives this way."""
    cur = Cursor(data, "system variable tracker")
    name = cur.lenenc_text()
    value = cur.lenenc_text()
    cur.done()
    return name, value


def encode_session_variable(name: str, value: str) -> bytes:
    return write_lenenc_str(encode_text(name)) + write_lenenc_str(encode_text(value))


def session_schema(data: bytes) -> str:
    """A SESSION_TRACK_SCHEMA entry: the new default schema."""
    cur = Cursor(data, "schema tracker")
    schema = cur.lenenc_text()
    cur.done()
    return schema


def session_gtids(data: bytes) -> str:
    """A SESSION_TRACK_GTIDS entry (MySQL): the GTID set after its 1-byte encoding specification."""
    cur = Cursor(data, "GTID tracker")
    cur.u8()
    gtids = cur.lenenc_text()
    cur.done()
    return gtids


def session_text(data: bytes) -> str:
    """The other trackers (state change, transaction characteristics and state): one lenenc string."""
    cur = Cursor(data, "session tracker")
    text = cur.lenenc_text()
    cur.done()
    return text


def session_variables(changes: tuple[SessionChange, ...] | list[SessionChange]) -> dict[str, str]:
    """The system variables a list of session changes reports, later values winning."""
    out: dict[str, str] = {}
    for type_, data in changes:
        if type_ == SESSION_TRACK_SYSTEM_VARIABLES:
            name, value = session_variable(data)
            out[name] = value
    return out


def last_schema(changes: tuple[SessionChange, ...] | list[SessionChange]) -> str | None:
    """The schema the last SESSION_TRACK_SCHEMA entry names, if any."""
    schema = None
    for type_, data in changes:
        if type_ == SESSION_TRACK_SCHEMA:
            schema = session_schema(data)
    return schema


def last_gtids(changes: tuple[SessionChange, ...] | list[SessionChange]) -> str | None:
    """MySQL's SESSION_TRACK_GTIDS, else MariaDB's ``last_gtid`` system variable, from the last entry."""
    gtids = None
    for type_, data in changes:
        if type_ == SESSION_TRACK_GTIDS:
            gtids = session_gtids(data)
        elif type_ == SESSION_TRACK_SYSTEM_VARIABLES:
            name, value = session_variable(data)
            if name == "last_gtid":
                gtids = value
    return gtids


@dataclass(frozen=True, slots=True)
class ErrPacket:
    """A command failed (or, with errno 0xFFFF on MariaDB, a progress report)."""

    errno: int
    sqlstate: str = "HY000"
    message: str = ""

    def encode(self) -> bytes:
        return err_packet(self.errno, self.sqlstate, self.message)

    def to_error(self) -> MySQLProtocolError:
        return MySQLProtocolError(self.message, errno=self.errno, sqlstate=self.sqlstate)


def err_packet(errno: int, sqlstate: str, message: str) -> bytes:
    """An ERR packet payload in the 4.1 format: 0xFF, errno, '#', 5-character SQLSTATE, message."""
    if not 0 <= errno <= 0xFFFF:
        raise LocalProtocolError(f"an errno is 16-bit: {errno}")
    state = sqlstate.encode("ascii", "replace")
    if len(state) != 5:
        raise LocalProtocolError(f"a SQLSTATE is 5 characters: {sqlstate!r}")
    return bytes((ERR_HEADER,)) + errno.to_bytes(2, "little") + b"#" + state + encode_text(message)


def error_packet(exc: MySQLProtocolError) -> bytes:
    """The ERR packet payload that reports a protocol error to the peer."""
    return err_packet(exc.errno, exc.sqlstate, exc.message)


def decode_err(payload: bytes) -> ErrPacket:
    """An ERR packet; one without the '#' SQLSTATE marker (sent before capabilities are agreed) gets HY000."""
    cur = Cursor(payload, "ERR packet")
    header = cur.u8()
    if header != ERR_HEADER:
        raise cur.fail(f"header {header:#x}")
    errno = cur.u16()
    sqlstate = "HY000"
    if cur.left >= 6 and payload[cur.pos] == 0x23:  # '#'
        cur.pos += 1
        sqlstate = cur.take(5).decode("ascii", "replace")
    return ErrPacket(errno, sqlstate, decode_text(cur.rest()))


@dataclass(frozen=True, slots=True)
class EofPacket:
    """End of column definitions or rows (without CLIENT_DEPRECATE_EOF)."""

    warnings: int = 0
    status: int = 0

    def encode(self) -> bytes:
        if not (0 <= self.status <= 0xFFFF and 0 <= self.warnings <= 0xFFFF):
            raise LocalProtocolError("status flags and warning count are 16-bit")
        return bytes((EOF_HEADER,)) + self.warnings.to_bytes(2, "little") + self.status.to_bytes(2, "little")


def decode_eof(payload: bytes) -> EofPacket:
    """An EOF packet: 5 bytes in the 4.1 protocol (a bare 0xFE from older servers)."""
    if not payload or payload[0] != EOF_HEADER:
        raise MySQLProtocolError("Malformed communication packet (EOF packet): bad header")
    if len(payload) == 1:
        return EofPacket()
    if len(payload) != 5:
        raise MySQLProtocolError(f"Malformed communication packet (EOF packet): {len(payload)} bytes")
    return EofPacket(int.from_bytes(payload[1:3], "little"), int.from_bytes(payload[3:5], "little"))


def is_eof(payload: bytes | bytearray | memoryview) -> bool:
    """True for an EOF packet (not a text row that starts with 0xFE)."""
    return len(payload) < EOF_MAX_LENGTH and len(payload) > 0 and payload[0] == EOF_HEADER


def decode_terminator(payload: bytes, capabilities: int) -> OkPacket | EofPacket:
    """The 0xFE packet that ends a result set: an OK under CLIENT_DEPRECATE_EOF, else an EOF.

    The two are told apart by length too (an EOF is 5 bytes, an OK at least 7), so a server
    that sends the other kind is still understood.
    """
    if capabilities & CLIENT_DEPRECATE_EOF and len(payload) >= _OK_MIN_LENGTH:
        return decode_ok(payload, capabilities)
    return decode_eof(payload)
