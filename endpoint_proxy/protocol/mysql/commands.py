"""Command-phase client packets (COM_*) the proxy must understand, and COM_STMT_PREPARE_OK.

Rules of this file: a command payload is its command byte followed by its arguments
(one packet, sequence id 0). ``decode_command`` returns a frozen dataclass per command
the proxy reads and ``Command`` (byte + raw arguments) for the rest; ``encode()`` gives
the payload back. Decoders raise only ``MySQLProtocolError``. Text is UTF-8 with
surrogateescape (see ``framing``): whatever the connection's character set, a query
decodes and re-encodes to its own bytes, and ASCII keywords still match.

Statement ids are little-endian 32-bit right after the command byte in every COM_STMT_*
command but COM_STMT_PREPARE, so mapping a client's ids to a backend's is one splice
(``replace_statement_id``). MariaDB's id 0xFFFFFFFF means "the statement prepared last".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import LocalProtocolError
from .constants import (
    CLIENT_CONNECT_ATTRS,
    CLIENT_OPTIONAL_RESULTSET_METADATA,
    CLIENT_PLUGIN_AUTH,
    CLIENT_QUERY_ATTRIBUTES,
    CLIENT_SECURE_CONNECTION,
)
from .errors import ER_UNKNOWN_COM_ERROR, MySQLProtocolError
from .framing import Cursor, decode_text, encode_text, nul_str, write_lenenc_int, write_lenenc_str
from .handshake import decode_connect_attrs, encode_connect_attrs

COM_SLEEP: Final = 0x00
COM_QUIT: Final = 0x01
COM_INIT_DB: Final = 0x02
COM_QUERY: Final = 0x03
COM_FIELD_LIST: Final = 0x04
COM_CREATE_DB: Final = 0x05
COM_DROP_DB: Final = 0x06
COM_REFRESH: Final = 0x07
COM_SHUTDOWN: Final = 0x08
COM_STATISTICS: Final = 0x09
COM_PROCESS_INFO: Final = 0x0A
COM_CONNECT: Final = 0x0B
COM_PROCESS_KILL: Final = 0x0C
COM_DEBUG: Final = 0x0D
COM_PING: Final = 0x0E
COM_TIME: Final = 0x0F
COM_DELAYED_INSERT: Final = 0x10
COM_CHANGE_USER: Final = 0x11
COM_BINLOG_DUMP: Final = 0x12
COM_TABLE_DUMP: Final = 0x13
COM_CONNECT_OUT: Final = 0x14
COM_REGISTER_SLAVE: Final = 0x15
COM_STMT_PREPARE: Final = 0x16
COM_STMT_EXECUTE: Final = 0x17
COM_STMT_SEND_LONG_DATA: Final = 0x18
COM_STMT_CLOSE: Final = 0x19
COM_STMT_RESET: Final = 0x1A
COM_SET_OPTION: Final = 0x1B
COM_STMT_FETCH: Final = 0x1C
COM_DAEMON: Final = 0x1D
COM_BINLOG_DUMP_GTID: Final = 0x1E
COM_RESET_CONNECTION: Final = 0x1F
COM_CLONE: Final = 0x20
COM_SUBSCRIBE_GROUP_REPLICATION_STREAM: Final = 0x21
COM_STMT_BULK_EXECUTE: Final = 0xFA  # MariaDB, with MARIADB_CLIENT_STMT_BULK_OPERATIONS
COM_MULTI: Final = 0xFE  # MariaDB 10.2-10.5, never negotiated by this proxy

COMMAND_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in sorted(globals().items())
    if name.startswith("COM_") and isinstance(value, int) and not isinstance(value, bool)
}

# Commands that carry a statement id right after the command byte.
STATEMENT_ID_COMMANDS: Final = frozenset(
    {COM_STMT_EXECUTE, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE, COM_STMT_RESET, COM_STMT_FETCH, COM_STMT_BULK_EXECUTE}
)
# MariaDB: "the statement this connection prepared last".
LAST_STATEMENT_ID: Final = 0xFFFFFFFF
STMT_PREPARE_OK_HEADER: Final = 0x00


def command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"COM_{command:#04x}")


def _cursor(payload: bytes, command: int) -> Cursor:
    cur = Cursor(payload, command_name(command))
    cur.pos = 1
    return cur


# --- statement ids ---------------------------------------------------------------------------


def statement_id(payload: bytes | bytearray | memoryview) -> int:
    """The statement id of a COM_STMT_* command payload (not COM_STMT_PREPARE)."""
    if len(payload) < 5 or payload[0] not in STATEMENT_ID_COMMANDS:
        raise MySQLProtocolError("Malformed communication packet (statement command): no statement id")
    return int.from_bytes(payload[1:5], "little")


def replace_statement_id(payload: bytes | bytearray | memoryview, new_id: int) -> bytes:
    """The same COM_STMT_* command payload with its statement id replaced (client id -> backend id)."""
    if len(payload) < 5 or payload[0] not in STATEMENT_ID_COMMANDS:
        raise MySQLProtocolError("Malformed communication packet (statement command): no statement id")
    if not 0 <= new_id <= 0xFFFFFFFF:
        raise LocalProtocolError(f"a statement id is 32-bit: {new_id}")
    return bytes(payload[:1]) + new_id.to_bytes(4, "little") + bytes(payload[5:])


# --- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """Any command, undecoded: its byte and its raw arguments (COM_QUIT, COM_PING, COM_STATISTICS...)."""

    command: int
    data: bytes = b""

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((self.command,)) + self.data


@dataclass(frozen=True, slots=True)
class QueryAttribute:
    """One COM_QUERY attribute (CLIENT_QUERY_ATTRIBUTES): name, binary-protocol type and raw value."""

    name: str
    type: int
    flags: int = 0  # 0x80: unsigned
    value: bytes | None = None  # the binary protocol value's bytes as sent; None for NULL


@dataclass(frozen=True, slots=True)
class ComQuery:
    """COM_QUERY: a text query, with query attributes when CLIENT_QUERY_ATTRIBUTES is agreed."""

    query: str
    attributes: tuple[QueryAttribute, ...] = ()
    # Sent with CLIENT_QUERY_ATTRIBUTES; MySQL defines only 1 (kept for exact round trips).
    parameter_set_count: int = 1

    def encode(self, capabilities: int) -> bytes:
        out = bytearray((COM_QUERY,))
        if capabilities & CLIENT_QUERY_ATTRIBUTES:
            out += _encode_attributes(self.attributes, self.parameter_set_count)
        elif self.attributes:
            raise LocalProtocolError("query attributes need CLIENT_QUERY_ATTRIBUTES")
        out += encode_text(self.query)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class ComInitDb:
    """COM_INIT_DB: change the default schema (what USE does)."""

    schema: str

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_INIT_DB,)) + encode_text(self.schema)


@dataclass(frozen=True, slots=True)
class ComFieldList:
    """COM_FIELD_LIST (deprecated): the columns of a table, optionally filtered by a LIKE wildcard."""

    table: str
    wildcard: bytes = b""

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_FIELD_LIST,)) + nul_str(self.table) + self.wildcard


@dataclass(frozen=True, slots=True)
class ComStmtPrepare:
    """COM_STMT_PREPARE: the query text to prepare."""

    query: str

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_STMT_PREPARE,)) + encode_text(self.query)


@dataclass(frozen=True, slots=True)
class ComStmtExecute:
    """COM_STMT_EXECUTE: statement id, cursor flags, iteration count and the raw parameter block.

    The parameter block can only be parsed with the statement's parameter count (from its
    COM_STMT_PREPARE_OK), so it is kept as bytes.
    """

    statement_id: int
    flags: int = 0
    iteration_count: int = 1
    parameters: bytes = b""

    def encode(self, capabilities: int = 0) -> bytes:
        return (
            bytes((COM_STMT_EXECUTE,))
            + _u32(self.statement_id)
            + _u8(self.flags)
            + _u32(self.iteration_count)
            + self.parameters
        )


@dataclass(frozen=True, slots=True)
class ComStmtSendLongData:
    """COM_STMT_SEND_LONG_DATA: a chunk of one parameter's value (no response)."""

    statement_id: int
    param_id: int
    data: bytes = b""

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_STMT_SEND_LONG_DATA,)) + _u32(self.statement_id) + _u16(self.param_id) + self.data


@dataclass(frozen=True, slots=True)
class ComStmtClose:
    """COM_STMT_CLOSE: deallocate a prepared statement (no response)."""

    statement_id: int

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_STMT_CLOSE,)) + _u32(self.statement_id)


@dataclass(frozen=True, slots=True)
class ComStmtReset:
    """COM_STMT_RESET: drop long data and close the cursor of a prepared statement."""

    statement_id: int

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_STMT_RESET,)) + _u32(self.statement_id)


@dataclass(frozen=True, slots=True)
class ComStmtFetch:
    """COM_STMT_FETCH: rows from a cursor opened by COM_STMT_EXECUTE."""

    statement_id: int
    num_rows: int

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_STMT_FETCH,)) + _u32(self.statement_id) + _u32(self.num_rows)


@dataclass(frozen=True, slots=True)
class ComSetOption:
    """COM_SET_OPTION: turn multi-statements on (0) or off (1)."""

    option: int

    def encode(self, capabilities: int = 0) -> bytes:
        return bytes((COM_SET_OPTION,)) + _u16(self.option)


@dataclass(frozen=True, slots=True)
class ComChangeUser:
    """COM_CHANGE_USER: re-authenticate the connection as another user, then reset its session.

    Optional trailing fields follow the client's capabilities (the same as in
    HandshakeResponse41); a packet that ends early leaves the rest None.
    """

    user: str
    auth_response: bytes = b""
    database: str = ""
    character_set: int | None = None
    auth_plugin_name: str | None = None
    connect_attrs: dict[str, str] | None = None

    def encode(self, capabilities: int) -> bytes:
        out = bytearray((COM_CHANGE_USER,))
        out += nul_str(self.user)
        if capabilities & CLIENT_SECURE_CONNECTION:
            if len(self.auth_response) > 0xFF:
                raise LocalProtocolError("a COM_CHANGE_USER auth response is at most 255 bytes")
            out += _u8(len(self.auth_response)) + self.auth_response
        else:
            if b"\0" in self.auth_response:
                raise LocalProtocolError("a NUL-terminated auth response cannot contain NUL")
            out += self.auth_response + b"\0"
        out += nul_str(self.database)
        trailing: tuple[tuple[int, str, bytes | None], ...] = (
            (0, "character_set", None if self.character_set is None else _u16(self.character_set)),
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
        )
        left_out = None
        for flag, name, wire in trailing:
            if wire is None:
                left_out = left_out or name
                continue
            if flag and not capabilities & flag:
                raise LocalProtocolError(f"{name} is sent only with its capability flag")
            if left_out is not None:
                raise LocalProtocolError(f"{name} cannot follow a left-out {left_out}")
            out += wire
        return bytes(out)


def _u8(value: int) -> bytes:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"not an 8-bit value: {value}")
    return bytes((value,))


def _u16(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise LocalProtocolError(f"not a 16-bit value: {value}")
    return value.to_bytes(2, "little")


def _u32(value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise LocalProtocolError(f"not a 32-bit value: {value}")
    return value.to_bytes(4, "little")


ClientCommand = (
    Command
    | ComQuery
    | ComInitDb
    | ComFieldList
    | ComStmtPrepare
    | ComStmtExecute
    | ComStmtSendLongData
    | ComStmtClose
    | ComStmtReset
    | ComStmtFetch
    | ComSetOption
    | ComChangeUser
)


def decode_command(payload: bytes, capabilities: int) -> ClientCommand:
    """One command payload; ``capabilities`` are the ones agreed in the handshake."""
    if not payload:
        raise MySQLProtocolError("Malformed communication packet: an empty command", errno=ER_UNKNOWN_COM_ERROR)
    command = payload[0]
    decoder = _DECODERS.get(command)
    if decoder is None:
        return Command(command, payload[1:])
    return decoder(payload, capabilities)


def _decode_query(payload: bytes, capabilities: int) -> ComQuery:
    cur = _cursor(payload, COM_QUERY)
    attributes: tuple[QueryAttribute, ...] = ()
    set_count = 1
    if capabilities & CLIENT_QUERY_ATTRIBUTES:
        attributes, set_count = _decode_attributes(cur)
    return ComQuery(decode_text(cur.rest()), attributes, set_count)


def query_text(payload: bytes, capabilities: int) -> str:
    """The SQL text of a COM_QUERY payload, skipping any query attributes (the routing hot path)."""
    if not capabilities & CLIENT_QUERY_ATTRIBUTES:
        return decode_text(payload[1:])
    return _decode_query(payload, capabilities).query


def _decode_init_db(payload: bytes, capabilities: int) -> ComInitDb:
    return ComInitDb(decode_text(payload[1:]))


def _decode_field_list(payload: bytes, capabilities: int) -> ComFieldList:
    cur = _cursor(payload, COM_FIELD_LIST)
    table = cur.nul_text()
    return ComFieldList(table, cur.rest())


def _decode_prepare(payload: bytes, capabilities: int) -> ComStmtPrepare:
    return ComStmtPrepare(decode_text(payload[1:]))


def _decode_execute(payload: bytes, capabilities: int) -> ComStmtExecute:
    cur = _cursor(payload, COM_STMT_EXECUTE)
    stmt = cur.u32()
    flags = cur.u8()
    iterations = cur.u32()
    return ComStmtExecute(stmt, flags, iterations, cur.rest())


def _decode_long_data(payload: bytes, capabilities: int) -> ComStmtSendLongData:
    cur = _cursor(payload, COM_STMT_SEND_LONG_DATA)
    stmt = cur.u32()
    param = cur.u16()
    return ComStmtSendLongData(stmt, param, cur.rest())


def _decode_close(payload: bytes, capabilities: int) -> ComStmtClose:
    cur = _cursor(payload, COM_STMT_CLOSE)
    stmt = cur.u32()
    cur.done()
    return ComStmtClose(stmt)


def _decode_reset(payload: bytes, capabilities: int) -> ComStmtReset:
    cur = _cursor(payload, COM_STMT_RESET)
    stmt = cur.u32()
    cur.done()
    return ComStmtReset(stmt)


def _decode_fetch(payload: bytes, capabilities: int) -> ComStmtFetch:
    cur = _cursor(payload, COM_STMT_FETCH)
    stmt = cur.u32()
    rows = cur.u32()
    cur.done()
    return ComStmtFetch(stmt, rows)


def _decode_set_option(payload: bytes, capabilities: int) -> ComSetOption:
    cur = _cursor(payload, COM_SET_OPTION)
    option = cur.u16()
    cur.done()
    return ComSetOption(option)


def _decode_change_user(payload: bytes, capabilities: int) -> ComChangeUser:
    cur = _cursor(payload, COM_CHANGE_USER)
    user = cur.nul_text()
    if capabilities & CLIENT_SECURE_CONNECTION:
        auth = cur.take(cur.u8())
    else:
        auth = cur.nul_bytes()
    database = cur.nul_text(optional_nul=True)
    charset = plugin = None
    attrs = None
    if cur.left:
        charset = cur.u16()
    if capabilities & CLIENT_PLUGIN_AUTH and cur.left:
        plugin = cur.nul_text(optional_nul=True)
    if capabilities & CLIENT_CONNECT_ATTRS and cur.left:
        attrs = decode_connect_attrs(cur)
    return ComChangeUser(user, auth, database, charset, plugin, attrs)


_DECODERS: Final[dict[int, Callable[[bytes, int], ClientCommand]]] = {
    COM_QUERY: _decode_query,
    COM_INIT_DB: _decode_init_db,
    COM_FIELD_LIST: _decode_field_list,
    COM_STMT_PREPARE: _decode_prepare,
    COM_STMT_EXECUTE: _decode_execute,
    COM_STMT_SEND_LONG_DATA: _decode_long_data,
    COM_STMT_CLOSE: _decode_close,
    COM_STMT_RESET: _decode_reset,
    COM_STMT_FETCH: _decode_fetch,
    COM_SET_OPTION: _decode_set_option,
    COM_CHANGE_USER: _decode_change_user,
}


# --- query attributes: binary protocol values --------------------------------------------------

# Binary protocol value sizes by field type: fixed sizes; -1 = one length byte then that
# many bytes (dates and times); absent = a length-encoded string.
_FIXED_SIZES: Final[dict[int, int]] = {
    0x01: 1,  # TINY
    0x02: 2,  # SHORT
    0x03: 4,  # LONG
    0x04: 4,  # FLOAT
    0x05: 8,  # DOUBLE
    0x06: 0,  # NULL
    0x07: -1,  # TIMESTAMP
    0x08: 8,  # LONGLONG
    0x09: 4,  # INT24
    0x0A: -1,  # DATE
    0x0B: -1,  # TIME
    0x0C: -1,  # DATETIME
    0x0D: 2,  # YEAR
}


def _value_bytes(cur: Cursor, type_: int) -> bytes:
    """The raw bytes of one binary protocol value of this type (the value's own length prefix included)."""
    size = _FIXED_SIZES.get(type_)
    start = cur.pos
    if size is None:
        cur.lenenc_bytes()
    elif size < 0:
        cur.take(cur.u8())
    else:
        cur.take(size)
    return cur.buf[start : cur.pos]


def _decode_attributes(cur: Cursor) -> tuple[tuple[QueryAttribute, ...], int]:
    count = cur.lenenc_int()
    set_count = cur.lenenc_int()
    if not count:
        return (), set_count
    if set_count != 1:
        raise cur.fail(f"{set_count} parameter sets (only 1 is defined)")
    # Each attribute takes at least a type (2 bytes) and a name length (1 byte).
    if count * 3 > cur.left:
        raise cur.fail(f"{count} query attributes do not fit in {cur.left} bytes")
    bitmap = cur.take((count + 7) // 8)
    if cur.u8() != 1:
        raise cur.fail("new_params_bind_flag is not 1")
    kinds: list[tuple[str, int, int]] = []
    for _ in range(count):
        type_ = cur.u8()
        flags = cur.u8()
        kinds.append((cur.lenenc_text(), type_, flags))
    attrs: list[QueryAttribute] = []
    for i, (name, type_, flags) in enumerate(kinds):
        is_null = bitmap[i >> 3] & (1 << (i & 7))
        value = None if is_null else _value_bytes(cur, type_)
        attrs.append(QueryAttribute(name, type_, flags, value))
    return tuple(attrs), set_count


def _encode_attributes(attrs: tuple[QueryAttribute, ...], set_count: int) -> bytes:
    out = bytearray(write_lenenc_int(len(attrs)))
    out += write_lenenc_int(set_count)
    if not attrs:
        return bytes(out)
    if set_count != 1:
        raise LocalProtocolError("query attributes come in exactly one parameter set")
    bitmap = bytearray((len(attrs) + 7) // 8)
    for i, attr in enumerate(attrs):
        if attr.value is None:
            bitmap[i >> 3] |= 1 << (i & 7)
    out += bitmap
    out.append(1)  # new_params_bind_flag
    for attr in attrs:
        out += _u8(attr.type) + _u8(attr.flags) + write_lenenc_str(encode_text(attr.name))
    for attr in attrs:
        if attr.value is not None:
            # Check the value is one whole binary value of its type, so the query text stays findable.
            check = Cursor(attr.value, "query attribute value")
            _value_bytes(check, attr.type)
            if check.left:
                raise LocalProtocolError(f"query attribute {attr.name!r}: value is not one {attr.type:#x} value")
            out += attr.value
    return bytes(out)


# --- COM_STMT_PREPARE_OK ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StmtPrepareOk:
    """The first packet of a successful COM_STMT_PREPARE response.

    ``num_params`` parameter definitions and ``num_columns`` column definitions follow,
    each group closed by an EOF unless CLIENT_DEPRECATE_EOF (``response.ResponseTracker``
    counts them). ``metadata_follows`` is MySQL's CLIENT_OPTIONAL_RESULTSET_METADATA flag.
    """

    statement_id: int
    num_columns: int
    num_params: int
    warnings: int = 0
    metadata_follows: bool | None = None

    def encode(self, capabilities: int = 0) -> bytes:
        out = (
            bytes((STMT_PREPARE_OK_HEADER,))
            + _u32(self.statement_id)
            + _u16(self.num_columns)
            + _u16(self.num_params)
            + b"\0"
            + _u16(self.warnings)
        )
        if capabilities & CLIENT_OPTIONAL_RESULTSET_METADATA:
            out += bytes((1 if self.metadata_follows in (None, True) else 0,))
        return out


def decode_stmt_prepare_ok(payload: bytes, capabilities: int = 0) -> StmtPrepareOk:
    cur = Cursor(payload, "COM_STMT_PREPARE_OK")
    if cur.u8() != STMT_PREPARE_OK_HEADER:
        raise cur.fail("bad header")
    stmt = cur.u32()
    columns = cur.u16()
    params = cur.u16()
    warnings = 0
    metadata: bool | None = None
    if cur.left:
        cur.u8()  # reserved
        warnings = cur.u16()
        if capabilities & CLIENT_OPTIONAL_RESULTSET_METADATA and cur.left:
            metadata = cur.u8() != 0
    return StmtPrepareOk(stmt, columns, params, warnings, metadata)


def replace_prepare_ok_statement_id(payload: bytes | bytearray | memoryview, new_id: int) -> bytes:
    """A COM_STMT_PREPARE_OK payload carrying another statement id (backend id -> the client's)."""
    if len(payload) < 5 or payload[0] != STMT_PREPARE_OK_HEADER:
        raise MySQLProtocolError("Malformed communication packet (COM_STMT_PREPARE_OK): no statement id")
    return bytes(payload[:1]) + _u32(new_id) + bytes(payload[5:])
