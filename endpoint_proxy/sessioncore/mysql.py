"""The decisions of one MySQL/MariaDB client session after login, sans-IO.

Rules of this file:
- MySQL is request/response: a command is one logical packet from the client; its response
  is followed by a ``ResponseTracker``. A command is dispatched only when it has arrived whole
  and the previous one is answered (a client that pipelines is served in order; its later
  commands wait, copied). Routing decisions are taken there, at command boundaries.
- Fed the client's and the server's bytes and what the shell learned; returns FORWARD (send
  what was fed as is) or ATTEND (take ``next_action()`` until None). No sockets, clock or log.
- A lost backend is decided by the monitor's verdict (``loss.on_loss``): the server's own
  termination (KILL, wait_timeout) reaches the client as it would directly.
- Statement ids the client sees are the session's own, stable across backends; where a
  backend's id is free it is used as is, so the common case needs no rewriting.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol.mysql import commands as c
from ..protocol.mysql import constants as k
from ..protocol.mysql.errors import MySQLProtocolError
from ..protocol.mysql.framing import PacketReader, PacketScanner, decode_text, encode_packet
from ..protocol.mysql.packets import OkPacket, err_packet
from ..protocol.mysql.response import ResponseTracker
from ..routing.my_classify import classify
from ..routing.pg_classify import FunctionPolicy, Route
from .actions import (
    ATTEND,
    FORWARD,
    MAIN,
    READER,
    WRITER,
    Action,
    Attach,
    AttachError,
    BackendFacts,
    CatchUp,
    Close,
    Detach,
    Lost,
    ToClient,
    ToServer,
)
from .loss import STATEMENT_LOST, TX_LOST, LossFacts, LossOutcome, on_loss

Buffer = bytes | bytearray | memoryview

ER_TRANSACTION_LOST = 1927  # ER_CONNECTION_KILLED, sent with SQLSTATE 08007 (see loss.py)
ER_NO_ROUTE = 1105
ER_UNKNOWN_STMT_HANDLER = 1243
ER_NOT_ALLOWED_COMMAND = 1148
HOLD_LIMIT = 1 << 20  # commands held behind one in flight, at most (then the client is not read)
UNSOLICITED_LIMIT = 1 << 16  # what a server may say unasked before it closes

_KILL = re.compile(r"\A\s*KILL\s+(?:(QUERY|CONNECTION)\s+)?(\d+)\s*;?\s*\Z", re.I)
_USE = re.compile(r"\A\s*USE\s+`?([^`;\s]+)`?\s*;?\s*\Z", re.I)
_ROLLBACK = re.compile(r"\A\s*ROLLBACK(\s+WORK)?\s*;?\s*\Z", re.I)
# Statements that may carry session state (SET, USE, user variables, locks, temporary tables,
# handlers, prepared SQL): only these are classified for tracking.
_MAYBE_STATEFUL = re.compile(r"@|\b(?:set|use|lock|temporary|handler|prepare|deallocate)\b|_lock\s*\(", re.I)
# One list of what state does (README "Session state"): replayed on another backend; pins
# the session to its writer (readwrite); cannot be moved at all (a failover ends the session).
_REPLAYED = frozenset(("set", "user_variable", "autocommit_off", "autocommit_on"))
_PINNING = frozenset(("temp_table", "named_lock", "lock_tables", "handler", "user_variable", "user_variable_read"))
_UNMOVABLE = frozenset(("temp_table", "named_lock", "lock_tables", "handler"))
_NO_RESPONSE = frozenset((c.COM_STMT_CLOSE, c.COM_STMT_SEND_LONG_DATA))
_STMT_COMMANDS = frozenset((c.COM_STMT_EXECUTE, c.COM_STMT_SEND_LONG_DATA, c.COM_STMT_CLOSE, c.COM_STMT_RESET,
                            c.COM_STMT_FETCH, c.COM_STMT_BULK_EXECUTE))
_READ_COMMANDS = frozenset((c.COM_PING, c.COM_INIT_DB, c.COM_STMT_RESET, c.COM_STATISTICS, c.COM_FIELD_LIST))


class MyEnv(Protocol):
    """What the core reads from, and reports to, the proxy around it (no I/O)."""

    @property
    def generation(self) -> int: ...

    def placement_ok(self, role: str, instance: str) -> bool: ...

    def function_policy(self) -> FunctionPolicy: ...

    def request_started(self, instance: str, in_recovery: bool) -> None: ...

    def request_ended(self, instance: str) -> None: ...

    def pinned(self, reason: str) -> None: ...

    def error(self, kind: str) -> None: ...


# --- actions only MySQL sessions have -------------------------------------------------------------


@dataclass(slots=True)
class Prepare:
    """Prepare statement ``client_id`` (its ``sql``) on the active backend before the command
    that uses it; report with ``prepared``."""

    client_id: int
    sql: str


@dataclass(slots=True)
class Kill:
    """KILL [QUERY|CONNECTION] ``target`` (a thread id a client saw): the shell maps it to the
    session's current backend and lets the server decide; it answers the client itself."""

    what: str  # "QUERY" or "CONNECTION"
    target: int
    seq: int  # the sequence id for the answer


@dataclass(slots=True)
class ChangeUser:
    """COM_CHANGE_USER: the shell authenticates the client again and calls ``user_changed``."""

    payload: bytes


@dataclass(slots=True)
class DropParked:
    """COM_RESET_CONNECTION / COM_CHANGE_USER: backends parked with the old state must go."""


MyAction = Action | Prepare | Kill | ChangeUser | DropParked


@dataclass
class Statement:
    sql: str
    role: str


@dataclass
class BackendMark:
    """What of the session one backend already has."""

    statements: dict[int, int] = field(default_factory=dict)  # client statement id -> backend id
    pending_close: list[int] = field(default_factory=list)  # backend ids the client closed elsewhere
    set_option: bytes | None = None
    schema: str | None = None
    sets_applied: int = 0


@dataclass
class MyState:
    """The session state to rebuild on another backend."""

    set_statements: list[str] = field(default_factory=list)
    set_option: bytes | None = None  # the client's last COM_SET_OPTION payload
    schema: str | None = None
    pinned_by: str | None = None  # readwrite: state only the writer has
    unmovable: str | None = None  # state a failover would lose


@dataclass
class _Command:
    seq: int
    payload: bytes
    raw: bytes  # as it came from the client (its packets)


def _whole_packets(data: Buffer) -> int:
    """How many bytes at the start of ``data`` are whole packets."""
    pos, n = 0, len(data)
    while pos + 4 <= n:
        end = pos + 4 + int.from_bytes(data[pos: pos + 3], "little")
        if end > n:
            break
        pos = end
    return pos


class MySessionCore:
    def __init__(self, env: MyEnv, facts: BackendFacts, *, capabilities: int, status: int,
                 readwrite: bool = False, session_consistency: bool = False, max_payload: int = 1 << 30,
                 allow_local_infile: bool = False, schema: str | None = None) -> None:
        self.env = env
        self.caps = capabilities
        self.readwrite = readwrite
        self.session_consistency = session_consistency
        self.allow_local_infile = allow_local_infile
        self.state = MyState(schema=schema)
        self._creader = PacketReader(max_payload)
        self._actions: deque[MyAction] = deque()
        self.role = WRITER if readwrite else MAIN
        self.attached = True
        self.instance: str | None = facts.instance
        self.in_recovery = facts.in_recovery
        self.status = status  # server status flags of the last OK/EOF
        self.marks: dict[str, BackendMark] = {self.role: BackendMark(schema=schema)}
        self._checked_generation = env.generation
        self.statements: dict[int, Statement] = {}
        self._last_statement = 0
        self._next_statement = 1
        self._queue: deque[_Command] = deque()  # whole commands not dispatched yet
        self._queued_bytes = 0
        self._cmd: _Command | None = None  # the command whose response is in flight
        self._tracker: ResponseTracker | None = None
        self._sscan = PacketScanner()
        self._busy_on: str | None = None
        self._forwarded = False  # some of the response reached the client
        self._cmd_in_tx = False
        self._patch: bytearray | None = None  # the start of a PREPARE response, until its id is rewritten
        self._head: bytearray | None = None  # the start of a COM_QUERY response, until its first packet is whole
        self._prepare_sql: str | None = None
        self._upload = False  # LOAD DATA LOCAL INFILE: client packets go to the server as they are
        self._swallow = False  # drop the rest of this response (a LOCAL INFILE request we refused)
        self._unsolicited = bytearray()  # what the server said unasked (it is about to close)
        self._lost = False
        self.loss_outcome: LossOutcome | None = None
        self._resend: _Command | None = None
        self._attaching: str | None = None
        self._decided: str | None = None  # the role already decided for the next command
        self.failed_tx = False
        self.closing = False
        self.draining = False
        self.wrote = False
        self._pinned_reported = False

    # --- what the shell reads ---------------------------------------------------------------

    def next_action(self) -> MyAction | None:
        return self._actions.popleft() if self._actions else None

    @property
    def busy(self) -> bool:
        return self._cmd is not None or bool(self._queue)

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & k.SERVER_STATUS_IN_TRANS) or not self.status & k.SERVER_STATUS_AUTOCOMMIT

    @property
    def idle(self) -> bool:
        return not self.busy and not self.failed_tx and not self.in_transaction and not self._lost

    @property
    def wants_client(self) -> bool:
        return not self.closing and self._queued_bytes < HOLD_LIMIT

    # --- client bytes -----------------------------------------------------------------------

    def client_data(self, data: Buffer) -> int:
        if self.closing:
            return ATTEND
        reader = self._creader
        was_empty = not reader.buffered
        reader.feed(data)
        if self._upload:
            return self._upload_packets(data, was_empty)
        queued = len(self._actions)
        whole = was_empty
        while (packet := reader.next_packet()) is not None:
            seq, payload = packet
            self._queue.append(_Command(seq, payload, b""))
            self._queued_bytes += len(payload)
        if reader.buffered:
            whole = False  # a command is still arriving
        if whole and len(self._queue) == 1 and self._cmd is None and not self._lost and self._attaching is None:
            command = self._queue.popleft()
            self._queued_bytes -= len(command.payload)
            if self._dispatch(command, forwardable=True) and len(self._actions) == queued:
                return FORWARD
            return ATTEND
        self._pump()
        return ATTEND

    def client_eof(self) -> None:
        self.closing = True
        self._actions.append(Close())

    def _upload_packets(self, data: Buffer, was_empty: bool) -> int:
        """LOAD DATA LOCAL INFILE: the client's file packets, up to the empty one, go as they are."""
        reader = self._creader
        out = bytearray()
        while (packet := reader.next_packet()) is not None:
            seq, payload = packet
            out += encode_packet(seq, payload)
            if not payload:
                self._upload = False
                break
        if self._upload or reader.buffered:
            if out:
                self._actions.append(ToServer(bytes(out)))
            if not self._upload:
                self._pump()
            return ATTEND
        if was_empty and len(out) == len(data):
            return FORWARD
        self._actions.append(ToServer(bytes(out)))
        return ATTEND

    def _pump(self) -> None:
        """Dispatch queued commands while nothing is in flight."""
        while self._queue and self._cmd is None and not self._lost and self._attaching is None and not self.closing:
            command = self._queue.popleft()
            self._queued_bytes -= len(command.payload)
            self._dispatch(command, forwardable=False)

    def _requeue(self, command: _Command) -> None:
        self._queue.appendleft(command)
        self._queued_bytes += len(command.payload)

    def _dispatch(self, command: _Command, *, forwardable: bool) -> bool:
        """Handle one whole command at a boundary. True when it went to the backend as it came
        (the caller may forward the client's bytes); otherwise everything needed is queued."""
        payload = command.payload
        if not payload:
            raise MySQLProtocolError("Malformed communication packet: an empty command", errno=1835)
        code = payload[0]
        if code == c.COM_QUIT:
            self.closing = True
            self._actions.append(Close())
            return False
        sql = c.query_text(payload, self.caps) if code == c.COM_QUERY else None
        if sql is not None and "kill" in sql[:16].lower():
            kill = _KILL.match(sql)
            if kill:
                self._actions.append(Kill((kill.group(1) or "CONNECTION").upper(), int(kill.group(2)),
                                          (command.seq + 1) & 0xFF))
                return False
        if code == c.COM_PROCESS_KILL and len(payload) >= 5:
            self._actions.append(Kill("CONNECTION", int.from_bytes(payload[1:5], "little"), (command.seq + 1) & 0xFF))
            return False
        if code == c.COM_CHANGE_USER:
            self._actions.append(ChangeUser(payload))
            return False
        if self.draining and self.idle:
            self._shutdown()
            return False
        if self.failed_tx:
            self._answer_failed_tx(command, sql)
            return False
        role, self._decided = (self._decided, None) if self._decided else (self._role_for(code, payload, sql), None)
        if role is not None and role != self.role and not self.in_transaction:
            if role == READER and self.session_consistency and self.wrote:
                self._leave(park=True)
                self._attaching = READER
                self._actions.append(CatchUp())
            else:
                self._leave(park=True)
                self._attach(role, "readwrite")
            self._requeue(command)
            return False
        if not self.attached:
            self._attach(self.role, "session has no backend")
            self._requeue(command)
            return False
        if not self.in_transaction:
            gen = self.env.generation
            if gen != self._checked_generation:
                self._checked_generation = gen
                assert self.instance is not None
                if not self.env.placement_ok(self.role, self.instance):
                    self._leave(park=False)
                    self._attach(self.role, "left the endpoint")
                    self._requeue(command)
                    return False
        if self.readwrite and self.role == WRITER:
            self.wrote = True
        return self._send(command, code, sql, forwardable)

    def _send(self, command: _Command, code: int, sql: str | None, forwardable: bool) -> bool:
        payload = command.payload
        mark = self.marks[self.role]
        if code in _STMT_COMMANDS:
            client_id = self._client_statement_id(payload)
            backend_id = mark.statements.get(client_id)
            if backend_id is None:
                statement = self.statements.get(client_id)
                if statement is None:
                    if code not in _NO_RESPONSE:
                        self._reply_error(command.seq, ER_UNKNOWN_STMT_HANDLER, "HY000",
                                          f"Unknown prepared statement handler ({client_id}) given to "
                                          f"{c.command_name(code)}")
                    return False
                self._requeue(command)
                self._attaching = self.role  # nothing else moves until it is prepared
                self._actions.append(Prepare(client_id, statement.sql))
                return False
            if code == c.COM_STMT_CLOSE:
                self._close_statement(client_id)
            if backend_id != client_id or (payload[1:5] != client_id.to_bytes(4, "little")):
                payload = c.replace_statement_id(payload, backend_id)
                forwardable = False
        self._track(code, payload, sql)
        tracker = ResponseTracker(code, self.caps)
        self._cmd_in_tx = self.in_transaction
        if tracker.done:  # no response: COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA
            if forwardable:
                return True
            self._actions.append(ToServer(encode_packet(command.seq, payload)))
            return False
        self._cmd = command
        self._tracker = tracker
        self._forwarded = False
        if code == c.COM_STMT_PREPARE:
            self._patch = bytearray()
            self._prepare_sql = decode_text(payload[1:])
        elif code == c.COM_QUERY and not self.allow_local_infile:
            self._head = bytearray()
        assert self.instance is not None
        self._busy_on = self.instance
        self.env.request_started(self.instance, self.in_recovery)
        if forwardable:
            return True
        self._actions.append(ToServer(encode_packet(command.seq, payload)))
        return False

    def _client_statement_id(self, payload: bytes) -> int:
        sid = int.from_bytes(payload[1:5], "little")
        return self._last_statement if sid == c.LAST_STATEMENT_ID else sid

    def _close_statement(self, client_id: int) -> None:
        self.statements.pop(client_id, None)
        for role, mark in self.marks.items():
            backend_id = mark.statements.pop(client_id, None)
            if backend_id is not None and role != self.role:
                mark.pending_close.append(backend_id)

    # --- routing ----------------------------------------------------------------------------

    def _role_for(self, code: int, payload: bytes, sql: str | None) -> str | None:
        """readwrite: the role a command goes to (None: where the session is)."""
        if not self.readwrite:
            return None
        if self.in_transaction or self.state.pinned_by is not None:
            return WRITER if not self.attached else None
        if code == c.COM_QUERY and sql is not None:
            cl = classify(sql)
            if cl.route is Route.READ and cl.transaction in ("commit", "rollback", "savepoint"):
                return None
            if cl.session_state == "use":
                return None
            return READER if cl.route is Route.READ and cl.transaction != "begin" else WRITER
        if code == c.COM_STMT_PREPARE:
            cl = classify(decode_text(payload[1:]))
            return READER if cl.route is Route.READ else WRITER
        if code in (c.COM_STMT_EXECUTE, c.COM_STMT_FETCH):
            statement = self.statements.get(self._client_statement_id(payload))
            return statement.role if statement is not None else WRITER
        return None

    def _leave(self, *, park: bool) -> None:
        if self.attached:
            self._actions.append(Detach(park=park))
        self.attached = False
        self.instance = None
        if not park:
            self.marks.pop(self.role, None)

    def _attach(self, role: str, reason: str, exclude: frozenset[str] = frozenset()) -> None:
        self._attaching = role
        self._actions.append(Attach(role, reason, exclude))

    # --- session state ------------------------------------------------------------------------

    def _track(self, code: int, payload: bytes, sql: str | None) -> None:
        state, mark = self.state, self.marks[self.role]
        if code == c.COM_SET_OPTION:
            state.set_option = mark.set_option = payload
            return
        if code == c.COM_INIT_DB:
            state.schema = mark.schema = decode_text(payload[1:])
            return
        if code == c.COM_RESET_CONNECTION:
            self._reset_state()
            return
        if sql is None:
            return
        use = _USE.match(sql)
        if use:
            state.schema = mark.schema = use.group(1)
            return
        if not _MAYBE_STATEFUL.search(sql):
            return
        kind = classify(sql).session_state
        if kind in _REPLAYED:
            state.set_statements.append(sql)
            mark.sets_applied = len(state.set_statements)
        if kind in _PINNING and self.readwrite and state.pinned_by is None:
            state.pinned_by = kind
            self._report_pinned(kind)
        if kind in _UNMOVABLE and state.unmovable is None:
            state.unmovable = kind
            if not self.readwrite:
                self._report_pinned(kind)

    def _report_pinned(self, reason: str) -> None:
        if not self._pinned_reported:
            self._pinned_reported = True
            self.env.pinned(reason)

    def _reset_state(self) -> None:
        """COM_RESET_CONNECTION: the session starts over (and its parked backends are stale)."""
        self.state = MyState()
        self.statements.clear()
        self._last_statement = 0
        self.failed_tx = False
        for role in [r for r in self.marks if r != self.role]:
            del self.marks[role]
        self.marks[self.role] = BackendMark()
        if self.readwrite:
            self._actions.append(DropParked())

    def replay_plan(self, role: str, fresh: bool, schema_known: str | None = None) -> list[bytes]:
        """Commands (payloads) to bring a backend of ``role`` up to the session: statements closed
        meanwhile (no answer), the COM_SET_OPTION, the schema, the SET statements it lacks."""
        mark = self.marks.get(role) if not fresh else None
        state = self.state
        plan: list[bytes] = []
        if mark is None:
            mark = BackendMark(schema=schema_known)
        plan += [bytes((c.COM_STMT_CLOSE,)) + sid.to_bytes(4, "little") for sid in mark.pending_close]
        if state.set_option is not None and mark.set_option != state.set_option:
            plan.append(state.set_option)
        if state.schema and mark.schema != state.schema:
            plan.append(bytes((c.COM_INIT_DB,)) + state.schema.encode("utf-8", "surrogateescape"))
        plan += [bytes((c.COM_QUERY,)) + sql.encode("utf-8", "surrogateescape")
                 for sql in state.set_statements[mark.sets_applied:]]
        return plan

    # --- server bytes -------------------------------------------------------------------------

    def server_data(self, data: Buffer) -> int:
        if self._lost:
            return ATTEND
        tracker = self._tracker
        if tracker is None:
            # The server speaks unasked: it is about to close (an error first, sometimes).
            self._speaks_unasked(data)
            return ATTEND
        try:
            used = self._sscan.scan(data, tracker)
        except MySQLProtocolError:
            self._unsolicited.clear()
            self._lose()
            return ATTEND
        if self._head is not None:
            held = self._first_packet(data, used, tracker)
            if held is not None:
                return held
        if used:
            self._forwarded = True
        if self._patch is not None:
            return self._patch_prepare(data, used, tracker)
        if tracker.awaiting_client:
            return self._local_infile(data, used, tracker)
        if self._swallow:
            if tracker.done:
                self._swallow = False
                self._done(tracker)
                self._pump()  # the client may have sent its next command meanwhile
            return ATTEND
        if not tracker.done:
            return FORWARD if used == len(data) else self._extra(data, used)
        self._done(tracker)
        if used < len(data):
            return self._extra(data, used)
        if self._queue or self.draining:
            self._actions.append(ToClient(bytes(data)))
            self._pump()
            if self.draining and self.idle and not self.closing:
                self._shutdown()
            return ATTEND
        return FORWARD

    def _first_packet(self, data: Buffer, used: int, tracker: ResponseTracker) -> int | None:
        """Without LOCAL INFILE, the first packet of a COM_QUERY answer is held until it is whole:
        it may be a file request the session refuses, of which the client must see nothing.
        None: it came whole in this read (the usual case), go on as usual."""
        head = self._head
        assert head is not None
        if not head and (tracker.awaiting_client or tracker.done or _whole_packets(data[:used])):
            self._head = None
            return None
        head += data[:used]
        if not (tracker.awaiting_client or tracker.done or _whole_packets(head)):
            return ATTEND
        self._head = None
        if tracker.awaiting_client:
            return self._local_infile(head, len(head), tracker)
        self._forwarded = True
        self._actions.append(ToClient(bytes(head)))
        if tracker.done:
            self._done(tracker)
            if used < len(data):
                self._speaks_unasked(data[used:])
                return ATTEND
            self._pump()
            if self.draining and self.idle and not self.closing:
                self._shutdown()
        return ATTEND

    def _extra(self, data: Buffer, used: int) -> int:
        """Bytes beyond the end of a response: the server speaks unasked (about to close)."""
        self._actions.append(ToClient(bytes(data[:used])))
        self._speaks_unasked(data[used:])
        return ATTEND

    def _speaks_unasked(self, data: Buffer) -> None:
        """Keep what the server says unasked (for the client, if the verdict passes it through)
        and take the backend as lost once a whole packet of it is in: a packet can come in
        pieces, and the client must get all of it or nothing."""
        said = self._unsolicited
        said += data[: UNSOLICITED_LIMIT - len(said)]
        if _whole_packets(said) or len(said) >= UNSOLICITED_LIMIT:
            self._lose()

    def _done(self, tracker: ResponseTracker) -> None:
        if tracker.status is not None:
            self.status = tracker.status
        self._cmd = None
        self._tracker = None
        self._end_request()

    def _end_request(self) -> None:
        if self._busy_on is not None:
            self.env.request_ended(self._busy_on)
            self._busy_on = None

    def _patch_prepare(self, data: Buffer, used: int, tracker: ResponseTracker) -> int:
        """COM_STMT_PREPARE: the client sees the session's statement id, not the server's."""
        patch = self._patch
        assert patch is not None
        patch += data
        if tracker.prepare_ok is None and not tracker.done:
            return ATTEND  # the first packet, with the id, has not arrived whole yet
        self._patch = None
        out = bytes(patch)
        if tracker.prepare_ok is not None and patch[4] == 0:
            backend_id = tracker.prepare_ok.statement_id
            client_id = backend_id
            if client_id in self.statements or client_id == 0:
                client_id = self._next_statement
                while client_id in self.statements:
                    client_id += 1
            self._next_statement = max(self._next_statement, client_id + 1)
            sql = self._prepare_sql or ""
            cl = classify(sql)
            self.statements[client_id] = Statement(sql, READER if cl.route is Route.READ else WRITER)
            self._last_statement = client_id
            self.marks[self.role].statements[client_id] = backend_id
            if client_id != backend_id:
                out = out[:5] + client_id.to_bytes(4, "little") + out[9:]
        self._actions.append(ToClient(out))
        if tracker.done:
            self._done(tracker)
            self._pump()
        return ATTEND

    def _local_infile(self, data: Buffer, used: int, tracker: ResponseTracker) -> int:
        """The server asks for a client file (LOAD DATA LOCAL INFILE)."""
        # Asked once: the flag would otherwise stay up until the server's next packet is whole,
        # and the first bytes of its answer to the upload would read as a second request.
        tracker.awaiting_client = False
        if self.allow_local_infile:
            self._upload = True
            self._actions.append(ToClient(bytes(data)))
            return ATTEND
        # Not offered to the client, so a server that asks anyway gets no file, and the client
        # an error of ours instead of the server's request.
        seq = (self._sscan.seq + 1) & 0xFF
        self._actions.append(ToServer(encode_packet(seq, b"")))
        self._swallow = True
        cmd = self._cmd
        assert cmd is not None
        self._reply_error(cmd.seq, ER_NOT_ALLOWED_COMMAND, "42000",
                          "LOAD DATA LOCAL INFILE is not allowed through this endpoint")
        return ATTEND

    def server_eof(self) -> None:
        if not self._lost:
            self._lose()

    def _lose(self) -> None:
        self._lost = True
        assert self.instance is not None
        self._actions.append(Lost(self.instance))

    # --- what the shell reports -------------------------------------------------------------

    def attached_backend(self, facts: BackendFacts, *, status: int | None = None, role: str | None = None) -> None:
        """The Attach under way succeeded (or, with ``role``, the shell gave the session a backend
        of its own accord: COM_CHANGE_USER)."""
        role = role or self._attaching or self.role
        self._attaching = None
        self.role = role
        self.attached = True
        self.instance = facts.instance
        self.in_recovery = facts.in_recovery
        if status is not None:
            self.status = status
        self._checked_generation = self.env.generation
        self._sscan = PacketScanner()
        state = self.state
        mark = self.marks.get(role)
        if mark is None:
            mark = self.marks[role] = BackendMark()
        mark.pending_close.clear()
        mark.set_option = state.set_option
        mark.schema = state.schema
        mark.sets_applied = len(state.set_statements)
        if self.readwrite:
            self._decided = role  # the command that asked for this backend runs here
        if self._resend is not None:
            command, self._resend = self._resend, None
            self._dispatch(command, forwardable=False)
        self._pump()

    def attach_failed(self, error: AttachError) -> None:
        """No backend: the command waiting for one fails; the session stays usable."""
        self._attaching = None
        self._decided = None
        self.env.error("no_route" if error.kind == "no_route" else "backend_failed")
        command = self._resend
        self._resend = None
        if command is None and self._queue:
            command = self._queue.popleft()
            self._queued_bytes -= len(command.payload)
        if command is not None:
            raw = None
            if error.raw is not None:
                raw = encode_packet((command.seq + 1) & 0xFF, error.raw)
            if raw is not None:
                self._actions.append(ToClient(raw))
            else:
                errno = int(error.code) if error.code.isdigit() else ER_NO_ROUTE
                self._reply_error(command.seq, errno, "HY000" if errno == ER_NO_ROUTE else "08S01", error.message)
        self._pump()

    def prepared(self, client_id: int, backend_id: int | None) -> None:
        """The Prepare under way finished (None: the server refused the statement here)."""
        self._attaching = None
        if backend_id is None:
            command = self._queue.popleft()
            self._queued_bytes -= len(command.payload)
            if command.payload[0] not in _NO_RESPONSE:
                self._reply_error(command.seq, ER_UNKNOWN_STMT_HANDLER, "HY000",
                                  f"could not prepare statement {client_id} on {self.instance}")
        else:
            self.marks[self.role].statements[client_id] = backend_id
        self._pump()

    def verdict(self, same_role_up: bool) -> None:
        self._lost = False
        lost_instance = self.instance
        self.attached = False
        self.instance = None
        self.marks.pop(self.role, None)
        cmd, tracker = self._cmd, self._tracker
        self._cmd = self._tracker = None
        # The server's stream broke inside a packet the client has the first bytes of (bytes a
        # session holds back, it has not sent): nothing can follow them that the client could read.
        broken = not self._sscan.at_boundary and self._head is None and self._patch is None
        self._patch = self._head = None
        self._upload = self._swallow = False
        in_flight = 1 if cmd is not None else 0
        read_only = cmd is not None and self._is_read(cmd)
        facts = LossFacts(pinned=self.state.unmovable, in_flight=in_flight,
                          in_transaction=self._cmd_in_tx if cmd is not None else self.in_transaction,
                          retryable=read_only and not self._forwarded)
        outcome = self.loss_outcome = on_loss(facts, same_role_up=same_role_up)
        said, self._unsolicited = bytes(self._unsolicited[: _whole_packets(self._unsolicited)]), bytearray()
        self._end_request()
        if broken:
            self.closing = True
            self._actions.append(Close())
        elif outcome is LossOutcome.PASS_THROUGH:
            self.closing = True
            if said:
                self._actions.append(ToClient(said))
            self._actions.append(Close())
        elif outcome is LossOutcome.CANNOT_MOVE:
            self.closing = True
            seq = (cmd.seq + 1) & 0xFF if cmd is not None else 0
            self._actions.append(ToClient(encode_packet(seq, err_packet(
                ER_TRANSACTION_LOST, "08S01", "endpoint_proxy: the server connection was lost and the session's "
                f"{self.state.unmovable} cannot be moved to another server"))))
            self._actions.append(Close())
        elif outcome is LossOutcome.RETRY:
            assert cmd is not None and lost_instance is not None
            self._resend = cmd
            self._attach(self.role, "retry a read", frozenset((lost_instance,)))
        elif outcome is LossOutcome.REATTACH_LATER:
            self.status = k.SERVER_STATUS_AUTOCOMMIT
        else:
            in_tx = outcome is LossOutcome.FAIL_TRANSACTION
            if cmd is not None:
                self.env.error("transaction_lost" if in_tx else "statement_lost")
                self._reply_error(cmd.seq, ER_TRANSACTION_LOST, "08007",
                                  "endpoint_proxy: " + (TX_LOST if in_tx else STATEMENT_LOST))
            self.failed_tx = in_tx
            self.status = k.SERVER_STATUS_AUTOCOMMIT
            self._pump()
        del tracker

    def _is_read(self, command: _Command) -> bool:
        code = command.payload[0]
        if code in _READ_COMMANDS:
            return True
        if code == c.COM_QUERY:
            return classify(c.query_text(command.payload, self.caps)).route is Route.READ
        if code in (c.COM_STMT_EXECUTE, c.COM_STMT_FETCH):
            statement = self.statements.get(self._client_statement_id(command.payload))
            return statement is not None and statement.role == READER
        return False

    def caught_up(self, ok: bool) -> None:
        self._attaching = None
        if ok:
            self.wrote = False
            self._attach(READER, "readwrite")
        else:
            self._attach(WRITER, "reader behind the session's writes")

    def user_changed(self) -> None:
        """COM_CHANGE_USER went through: the session starts over on the shell's new backend."""
        self._reset_state()

    def drain(self) -> bool:
        self.draining = True
        if self.idle and not self.closing:
            self.closing = True
            self._actions.append(Close())
            return True
        return False

    def end(self) -> None:
        self._end_request()

    # --- answering by ourselves ---------------------------------------------------------------

    def _reply_error(self, seq: int, errno: int, sqlstate: str, message: str) -> None:
        self._actions.append(ToClient(encode_packet((seq + 1) & 0xFF, err_packet(errno, sqlstate, message))))

    def reply_ok(self, seq: int, status: int | None = None) -> None:
        ok = OkPacket(status=self.status if status is None else status)
        self._actions.append(ToClient(encode_packet((seq + 1) & 0xFF, ok.encode(self.caps))))

    def _answer_failed_tx(self, command: _Command, sql: str | None) -> None:
        code = command.payload[0]
        if sql is not None and _ROLLBACK.match(sql):
            self.failed_tx = False
            self.reply_ok(command.seq, k.SERVER_STATUS_AUTOCOMMIT)
        elif code == c.COM_PING:
            self.reply_ok(command.seq, k.SERVER_STATUS_AUTOCOMMIT | k.SERVER_STATUS_IN_TRANS)
        elif code not in _NO_RESPONSE:
            self._reply_error(command.seq, ER_TRANSACTION_LOST, "08007", "endpoint_proxy: " + TX_LOST)

    def _shutdown(self) -> None:
        self.closing = True
        self._actions.append(Close())


