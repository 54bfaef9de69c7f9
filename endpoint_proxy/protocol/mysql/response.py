"""Where a command's response ends: ResponseTracker, a state machine fed the server's packets for one command.

Rules of this file: the tracker sees each server->client packet of one command's response,
in order, and says when the response is complete (``done``), with what it must know
from it: the final status flags (transaction, autocommit), the ERR if any, the OK's
counts and session state changes, the COM_STMT_PREPARE_OK. It never builds an object per
row. Two ways to feed it, equivalent by construction:

- ``feed(payload)``: one whole logical payload at a time (``framing.PacketReader``);
- as the ``PacketSink`` of ``framing.PacketScanner`` (the relay's hot path): ``want()``
  sees each packet's first byte and first-fragment length and returns True only for the
  few packets whose payload it must read (OK, ERR, EOF, column count, prepare OK...);
  every other packet (column definitions, rows) is counted right there and skipped.

Telling packets apart takes the protocol state, not the first byte alone:

- in the first packet of a result: 0x00 OK, 0xFF ERR, 0xFB LOCAL INFILE request,
  anything else a column count;
- among text rows: 0xFF is ERR; 0xFE is the terminator only when the packet is short (under
  9 bytes for an EOF, under 0xFFFFFF for CLIENT_DEPRECATE_EOF's OK), since a row whose first
  value is 16 MiB or longer starts with 0xFE too (the 8-byte length prefix) and so fills
  a whole 0xFFFFFF-byte first fragment; 0x00 (an empty string) and 0xFB (NULL) are rows;
- among binary rows (COM_STMT_EXECUTE, COM_STMT_FETCH): every row starts with 0x00, so
  0xFE is always the terminator;
- column and parameter definitions are counted (their count came before them); the last
  one of each group is read, so ``done`` only turns True at the end of a packet.

Status flags: a terminator with SERVER_MORE_RESULTS_EXISTS means another result follows.
A binary result whose metadata EOF (or, under CLIENT_DEPRECATE_EOF, whose OK right after
the column definitions) has SERVER_STATUS_CURSOR_EXISTS opened a cursor: the response ends
there and the rows come with COM_STMT_FETCH. An ERR ends any response; it carries no
status flags, so ``status`` keeps the last flags seen (a deadlock, errno 1213, has rolled
the transaction back all the same). MariaDB's progress reports (ERR with errno 0xFFFF)
are skipped.
"""

from __future__ import annotations

from typing import Final

from .commands import (
    COM_BINLOG_DUMP,
    COM_BINLOG_DUMP_GTID,
    COM_CHANGE_USER,
    COM_CLONE,
    COM_FIELD_LIST,
    COM_MULTI,
    COM_PROCESS_INFO,
    COM_QUERY,
    COM_QUIT,
    COM_STATISTICS,
    COM_STMT_BULK_EXECUTE,
    COM_STMT_CLOSE,
    COM_STMT_EXECUTE,
    COM_STMT_FETCH,
    COM_STMT_PREPARE,
    COM_STMT_SEND_LONG_DATA,
    COM_SUBSCRIBE_GROUP_REPLICATION_STREAM,
    COM_TABLE_DUMP,
    StmtPrepareOk,
    command_name,
    decode_stmt_prepare_ok,
)
from .constants import (
    CLIENT_DEPRECATE_EOF,
    CLIENT_OPTIONAL_RESULTSET_METADATA,
    MARIADB_CLIENT_CACHE_METADATA,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_CURSOR_EXISTS,
    SERVER_STATUS_IN_TRANS,
)
from .errors import ER_UNKNOWN_COM_ERROR, PROGRESS_REPORT_ERRNO, MySQLProtocolError
from .framing import MAX_PACKET_LENGTH, Cursor, decode_text
from .handshake import AUTH_MORE_DATA, AUTH_SWITCH_REQUEST
from .packets import (
    EOF_HEADER,
    EOF_MAX_LENGTH,
    ERR_HEADER,
    LOCAL_INFILE_HEADER,
    OK_HEADER,
    EofPacket,
    ErrPacket,
    OkPacket,
    SessionChange,
    decode_eof,
    decode_err,
    decode_ok,
    decode_terminator,
)

# States. Only ROWS and the three definition-counting states see skipped packets.
_DONE: Final = 0
_RESULT: Final = 1  # the first packet of a result: OK, ERR, LOCAL INFILE or a column count
_COLUMNS: Final = 2  # column definitions, counted
_COLUMNS_EOF: Final = 3  # the EOF after the column definitions
_ROWS: Final = 4  # rows until the terminator
_PREPARE: Final = 5  # COM_STMT_PREPARE_OK or ERR
_PREP_PARAMS: Final = 6  # parameter definitions, counted
_PREP_PARAMS_EOF: Final = 7
_PREP_COLUMNS: Final = 8  # the prepared statement's column definitions, counted
_PREP_COLUMNS_EOF: Final = 9
_SIMPLE: Final = 10  # OK, ERR or EOF (COM_PING, COM_INIT_DB, COM_SET_OPTION...)
_RAW: Final = 11  # COM_STATISTICS: one string packet
_FIELDS: Final = 12  # COM_FIELD_LIST: column definitions until EOF/OK or ERR
_AUTH: Final = 13  # COM_CHANGE_USER: an authentication exchange until OK or ERR

_STATE_NAMES: Final = {
    _DONE: "done",
    _RESULT: "result header",
    _COLUMNS: "column definitions",
    _COLUMNS_EOF: "end of column definitions",
    _ROWS: "rows",
    _PREPARE: "COM_STMT_PREPARE_OK",
    _PREP_PARAMS: "parameter definitions",
    _PREP_PARAMS_EOF: "end of parameter definitions",
    _PREP_COLUMNS: "prepared column definitions",
    _PREP_COLUMNS_EOF: "end of prepared column definitions",
    _SIMPLE: "OK",
    _RAW: "statistics",
    _FIELDS: "field list",
    _AUTH: "authentication",
}

# Commands the server answers with no packet at all.
NO_RESPONSE_COMMANDS: Final = frozenset({COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA})
# Commands whose responses are open-ended streams (replication, cloning): not relayable per command.
UNTRACKABLE_COMMANDS: Final = frozenset(
    {
        COM_BINLOG_DUMP,
        COM_BINLOG_DUMP_GTID,
        COM_TABLE_DUMP,
        COM_CLONE,
        COM_SUBSCRIBE_GROUP_REPLICATION_STREAM,
        COM_MULTI,
    }
)
# A column count above this is not a real result (MySQL and MariaDB stop at 4096 columns).
MAX_COLUMNS: Final = 0xFFFF
# Longer than any terminator: a binary row never starts with 0xFE, so every 0xFE ends the rows.
_ANY_LENGTH: Final = 1 << 62


class ResponseTracker:
    """Follows the server's response to one command until it is complete.

    ``capabilities`` are the ones agreed in the handshake (CLIENT_DEPRECATE_EOF,
    CLIENT_SESSION_TRACK and the metadata-skipping flags change the packet sequence).
    Raises ``MySQLProtocolError`` for a command whose response cannot be tracked
    (replication streams) and for a packet that does not fit the response.

    After each packet: ``done``; ``awaiting_client`` (the server now waits for the client:
    LOCAL INFILE data, whose file name is ``local_infile``, or an authentication reply
    during COM_CHANGE_USER); and, as they arrive, ``status``, ``ok``, ``error``,
    ``session_changes`` (from every OK, in order), ``prepare_ok``, ``result_sets``,
    ``columns`` (of the last result set) and ``rows`` (counted, never decoded).
    """

    __slots__ = (
        "command",
        "capabilities",
        "binary",
        "done",
        "status",
        "ok",
        "error",
        "session_changes",
        "prepare_ok",
        "local_infile",
        "awaiting_client",
        "result_sets",
        "columns",
        "rows",
        "_state",
        "_count",
        "_then_columns",
        "_deprecate_eof",
        "_metadata_flag",
        "_text_eof_limit",
        "_eof_limit",
    )

    def __init__(self, command: int, capabilities: int) -> None:
        if command in UNTRACKABLE_COMMANDS:
            raise MySQLProtocolError(
                f"Unknown command: {command_name(command)} is not supported through this proxy",
                errno=ER_UNKNOWN_COM_ERROR,
                sqlstate="08S01",
            )
        self.command = command
        self.capabilities = capabilities
        self.binary = command in (COM_STMT_EXECUTE, COM_STMT_FETCH, COM_STMT_BULK_EXECUTE)
        self.done = False
        self.status: int | None = None
        self.ok: OkPacket | None = None
        self.error: ErrPacket | None = None
        self.session_changes: list[SessionChange] = []
        self.prepare_ok: StmtPrepareOk | None = None
        self.local_infile: str | None = None
        self.awaiting_client = False
        self.result_sets = 0
        self.columns = 0
        self.rows = 0
        self._count = 0
        self._then_columns = 0
        self._deprecate_eof = bool(capabilities & CLIENT_DEPRECATE_EOF)
        self._metadata_flag = bool(capabilities & (CLIENT_OPTIONAL_RESULTSET_METADATA | MARIADB_CLIENT_CACHE_METADATA))
        # A text row may start with 0xFE; a terminator is shorter than any such row.
        self._text_eof_limit = MAX_PACKET_LENGTH if self._deprecate_eof else EOF_MAX_LENGTH
        self._eof_limit = _ANY_LENGTH if self.binary else self._text_eof_limit
        self._state = self._initial_state(command)
        if self._state == _DONE:
            self.done = True

    @staticmethod
    def _initial_state(command: int) -> int:
        if command in NO_RESPONSE_COMMANDS:
            return _DONE
        if command in (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE, COM_PROCESS_INFO):
            return _RESULT
        if command == COM_STMT_FETCH:
            return _ROWS
        if command == COM_STMT_PREPARE:
            return _PREPARE
        if command == COM_FIELD_LIST:
            return _FIELDS
        if command == COM_STATISTICS:
            return _RAW
        if command == COM_CHANGE_USER:
            return _AUTH
        # COM_PING, COM_INIT_DB, COM_RESET_CONNECTION, COM_STMT_RESET, COM_SET_OPTION, and
        # whatever else: an OK, an EOF or (for a command the server does not know) an ERR.
        return _SIMPLE

    # --- derived state -------------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool | None:
        """SERVER_STATUS_IN_TRANS of the last status flags seen; None before any."""
        return None if self.status is None else bool(self.status & SERVER_STATUS_IN_TRANS)

    @property
    def autocommit(self) -> bool | None:
        return None if self.status is None else bool(self.status & SERVER_STATUS_AUTOCOMMIT)

    @property
    def affected_rows(self) -> int | None:
        return None if self.ok is None else self.ok.affected_rows

    @property
    def last_insert_id(self) -> int | None:
        return None if self.ok is None else self.ok.last_insert_id

    @property
    def state(self) -> str:
        return _STATE_NAMES[self._state]

    # --- feeding -------------------------------------------------------------------------------

    def feed(self, payload: bytes) -> None:
        """One whole logical payload from the server."""
        if self.want(payload[0] if payload else -1, len(payload)):
            self.packet(payload)

    def want(self, first: int, length: int) -> bool:
        """``PacketSink.want``: True for the packets whose payload this tracker reads; the rest are counted now."""
        state = self._state
        if state == _ROWS:
            if first == ERR_HEADER or (first == EOF_HEADER and length < self._eof_limit):
                return True
            self.rows += 1
            return False
        if state == _COLUMNS or state == _PREP_PARAMS or state == _PREP_COLUMNS:
            # The last definition of a group is read, so that ``done`` only ever turns True
            # at the end of a packet (a prepare response under CLIENT_DEPRECATE_EOF ends on one).
            if first == ERR_HEADER or self._count == 1:
                return True
            self._count -= 1
            return False
        if state == _FIELDS:
            return first == ERR_HEADER or (first == EOF_HEADER and length < self._text_eof_limit)
        if state == _DONE:
            raise MySQLProtocolError(
                f"Malformed communication packet: a packet after the end of the {command_name(self.command)} response"
            )
        return True

    def packet(self, payload: bytes) -> None:
        """``PacketSink.packet``: the payload of a packet ``want`` asked for."""
        self.awaiting_client = False
        if not payload:
            raise self._unexpected("an empty packet")
        first = payload[0]
        if first == ERR_HEADER:
            err = decode_err(payload)
            if err.errno != PROGRESS_REPORT_ERRNO:
                self.error = err
                self._finish()
            return
        state = self._state
        if state == _ROWS:
            self._result_end(decode_terminator(payload, self.capabilities))
        elif state == _RESULT:
            self._result_header(payload)
        elif state == _COLUMNS_EOF:
            self._columns_eof(payload)
        elif state == _PREPARE:
            self._prepare_ok(payload)
        elif state == _PREP_PARAMS_EOF or state == _PREP_COLUMNS_EOF:
            self.status = self._eof(payload).status
            self._after_prepare_group(state)
        elif state == _SIMPLE:
            if first == OK_HEADER:
                self._ok(decode_ok(payload, self.capabilities))
            elif first == EOF_HEADER:
                self._terminator(decode_terminator(payload, self.capabilities))
            else:
                raise self._unexpected(f"a packet starting with {first:#04x}")
            self._finish()
        elif state == _RAW:
            self._finish()
        elif state == _FIELDS:
            # want() asked only for ERR (handled above) and the short 0xFE terminator.
            self._terminator(decode_terminator(payload, self.capabilities))
            self._finish()
        elif state == _AUTH:
            self._auth_packet(payload)
        else:  # _COLUMNS, _PREP_PARAMS, _PREP_COLUMNS: the last definition of the group
            self._count -= 1
            if not self._count:
                self._group_counted()

    # --- transitions ---------------------------------------------------------------------------

    def _unexpected(self, what: str) -> MySQLProtocolError:
        return MySQLProtocolError(
            f"Malformed communication packet: {what} in the {command_name(self.command)} response "
            f"(expecting {self.state})"
        )

    def _finish(self) -> None:
        self._state = _DONE
        self.done = True

    def _ok(self, ok: OkPacket) -> None:
        self.ok = ok
        self.status = ok.status
        if ok.session_changes:
            self.session_changes.extend(ok.session_changes)

    def _terminator(self, packet: OkPacket | EofPacket) -> None:
        if isinstance(packet, OkPacket):
            self._ok(packet)
        else:
            self.status = packet.status

    def _next_result_or_finish(self) -> None:
        if self.status is not None and self.status & SERVER_MORE_RESULTS_EXISTS:
            self._state = _RESULT
        else:
            self._finish()

    def _result_header(self, payload: bytes) -> None:
        first = payload[0]
        if first == OK_HEADER:
            self._ok(decode_ok(payload, self.capabilities))
            self._next_result_or_finish()
            return
        if first == LOCAL_INFILE_HEADER:
            # The client now sends the file's contents (then an empty packet); OK or ERR follows.
            self.local_infile = decode_text(payload[1:])
            self.awaiting_client = True
            return
        if first == EOF_HEADER and len(payload) < EOF_MAX_LENGTH:
            self._terminator(decode_terminator(payload, self.capabilities))
            self._next_result_or_finish()
            return
        cur = Cursor(payload, "column count")
        count = cur.lenenc_int()
        metadata_follows = True
        if self._metadata_flag:
            metadata_follows = cur.u8() != 0
        cur.done()
        if not 0 < count <= MAX_COLUMNS:
            raise cur.fail(f"{count} columns")
        self.result_sets += 1
        self.columns = count
        if metadata_follows:
            self._state = _COLUMNS
            self._count = count
        else:
            # No column definitions (the client cached them); the EOF after them is still sent.
            self._state = _ROWS if self._deprecate_eof else _COLUMNS_EOF

    def _columns_eof(self, payload: bytes) -> None:
        self.status = self._eof(payload).status
        if self.binary and self.status & SERVER_STATUS_CURSOR_EXISTS:
            # A cursor was opened: the rows come with COM_STMT_FETCH.
            self._finish()
        else:
            self._state = _ROWS

    def _result_end(self, packet: OkPacket | EofPacket) -> None:
        self._terminator(packet)
        self._next_result_or_finish()

    def _eof(self, payload: bytes) -> EofPacket:
        if payload[0] != EOF_HEADER or len(payload) >= EOF_MAX_LENGTH:
            raise self._unexpected(f"a packet starting with {payload[0]:#04x}")
        return decode_eof(payload)

    def _group_counted(self) -> None:
        """The last definition of a group has passed."""
        state = self._state
        if state == _COLUMNS:
            self._state = _ROWS if self._deprecate_eof else _COLUMNS_EOF
        elif self._deprecate_eof:
            self._after_prepare_group(state)
        else:
            self._state = _PREP_PARAMS_EOF if state == _PREP_PARAMS else _PREP_COLUMNS_EOF

    def _after_prepare_group(self, state: int) -> None:
        """The parameter definitions are followed by the column definitions, if any; those end the response."""
        if state in (_PREP_PARAMS, _PREP_PARAMS_EOF) and self._then_columns:
            self._state = _PREP_COLUMNS
            self._count = self._then_columns
            self._then_columns = 0
        else:
            self._finish()

    def _prepare_ok(self, payload: bytes) -> None:
        if payload[0] != OK_HEADER:
            raise self._unexpected(f"a packet starting with {payload[0]:#04x}")
        ok = decode_stmt_prepare_ok(payload, self.capabilities)
        self.prepare_ok = ok
        self.columns = ok.num_columns
        if ok.metadata_follows is False or not (ok.num_params or ok.num_columns):
            self._finish()
        elif ok.num_params:
            self._state = _PREP_PARAMS
            self._count = ok.num_params
            self._then_columns = ok.num_columns
        else:
            self._state = _PREP_COLUMNS
            self._count = ok.num_columns

    def _auth_packet(self, payload: bytes) -> None:
        first = payload[0]
        if first == OK_HEADER:
            self._ok(decode_ok(payload, self.capabilities))
            self._finish()
        elif first == AUTH_SWITCH_REQUEST:
            self.awaiting_client = True
        elif first == AUTH_MORE_DATA:
            # caching_sha2_password's "fast auth success" (0x01 0x03) is followed by the OK directly.
            self.awaiting_client = payload[1:] != b"\x03"
        else:
            raise self._unexpected(f"a packet starting with {first:#04x}")
