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
- Transaction mode (``pooled``): the session holds a server connection only while it must —
  from a command that needs one (``Attach``, reason "borrow") until the final answer that
  leaves it outside a transaction, unpinned, with no cursor, long data, XA transaction or
  queued command (``Release``). What the connection carries is its ``PooledMark``
  (my_pool_plan.py): the shell brings it to the session's state by ``pool_plan`` and reports
  with ``borrowed``. Prepared statements live per connection, by text: the client's ids map to
  whatever the connection at hand has (prepared there first if it lacks it), the client's
  COM_STMT_CLOSE only forgets the id, and each connection keeps at most ``max_prepared``.
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
from ..routing.my_classify import Classification, classify
from ..routing.my_session_state import MySessionState
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
    WaitGate,
)
from .loss import STATEMENT_LOST, TX_LOST, LossFacts, LossOutcome, on_loss
from .my_pool_plan import PARSE_KEYS, Plan, PooledMark, StatementKey, applied
from .my_pool_plan import plan as _pool_plan

Buffer = bytes | bytearray | memoryview

ER_TRANSACTION_LOST = 1927  # ER_CONNECTION_KILLED, sent with SQLSTATE 08007 (see loss.py)
ER_NO_ROUTE = 1105
ER_UNKNOWN_STMT_HANDLER = 1243
ER_NOT_ALLOWED_COMMAND = 1148
ER_CON_COUNT = 1040  # "Too many connections": no pooled server connection free in time (SQLSTATE 08004)
HOLD_LIMIT = 1 << 20  # commands held behind one in flight, at most (then the client is not read)
UNSOLICITED_LIMIT = 1 << 16  # what a server may say unasked before it closes

_KILL = re.compile(r"\A\s*KILL\s+(?:(QUERY|CONNECTION)\s+)?(\d+)\s*;?\s*\Z", re.I)
_ROLLBACK = re.compile(r"\A\s*ROLLBACK(\s+WORK)?\s*;?\s*\Z", re.I)
_NO_RESPONSE = frozenset((c.COM_STMT_CLOSE, c.COM_STMT_SEND_LONG_DATA))
_STMT_COMMANDS = frozenset((c.COM_STMT_EXECUTE, c.COM_STMT_SEND_LONG_DATA, c.COM_STMT_CLOSE, c.COM_STMT_RESET,
                            c.COM_STMT_FETCH, c.COM_STMT_BULK_EXECUTE))
_GATE = "gate"  # what _attaching holds while the session waits at the writer gate
_READ_COMMANDS = frozenset((c.COM_PING, c.COM_INIT_DB, c.COM_STMT_RESET, c.COM_STATISTICS, c.COM_FIELD_LIST))
_XA = re.compile(r"\A\s*XA\s+(START|BEGIN|COMMIT|ROLLBACK)\b", re.I)
BORROW = "borrow"  # the Attach reason of transaction mode: a connection of the pool, for one transaction


class MyEnv(Protocol):
    """What the core reads from, and reports to, the proxy around it (no I/O)."""

    @property
    def generation(self) -> int: ...

    def placement_ok(self, role: str, instance: str) -> bool: ...

    def function_policy(self) -> FunctionPolicy: ...

    def request_started(self, instance: str, in_recovery: bool) -> None: ...

    def request_ended(self, instance: str) -> None: ...

    def pinned(self, reason: str) -> None: ...

    def unpinned(self, reason: str) -> None: ...

    def error(self, kind: str) -> None: ...

    @property
    def gate_open(self) -> bool: ...

    def writer_begin(self) -> None: ...

    def writer_end(self) -> None: ...


# --- actions only MySQL sessions have -------------------------------------------------------------


@dataclass(slots=True)
class Prepare:
    """Prepare statement ``client_id`` (its ``sql``) on the active backend before the command
    that uses it; report with ``prepared``. ``schema``: the default database the client
    prepared it in, when the session has moved to another since (prepare it there)."""

    client_id: int
    sql: str
    schema: str | None = None


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


@dataclass(slots=True)
class Release:
    """Transaction mode: nothing ties the session to its server connection now: give it back to its
    pool (its mark is up to date). ``reusable`` False: close it instead, it may carry state that
    must not reach another client."""

    reusable: bool = True


MyAction = Action | Prepare | Kill | ChangeUser | DropParked | Release


@dataclass
class Statement:
    sql: str
    role: str
    schema: str | None = None  # the default database it was prepared in
    params: int = 0
    types: bytes | None = None  # its parameters' types, as the client last sent them with COM_STMT_EXECUTE


@dataclass(slots=True)
class BackendMark:
    """What of the session one backend already has: the session state's entries up to ``seq``
    (MySessionState.replay_after), its multi-statement option, its prepared statements."""

    statements: dict[int, int] = field(default_factory=dict)  # client statement id -> backend id
    pending_close: list[int] = field(default_factory=list)  # backend ids the client closed elsewhere
    multi_statements: bool | None = None  # its COM_SET_OPTION (None: the handshake's)
    seq: int = 0
    # Client statement ids whose parameter types this backend has (an execution carried them); a
    # statement prepared here again by the proxy has none until one does (made when first needed).
    typed: set[int] | None = None


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
    def __init__(self, env: MyEnv, facts: BackendFacts | None, *, capabilities: int, status: int,
                 readwrite: bool = False, session_consistency: bool = False, max_payload: int = 1 << 30,
                 allow_local_infile: bool = False, schema: str | None = None, charset: int | None = None,
                 pooled: bool = False, max_prepared: int = 200) -> None:
        """``facts``: the backend the session starts on (None in transaction mode, ``pooled``: it starts
        with none and borrows one per command)."""
        self.env = env
        self.caps = capabilities
        self.readwrite = readwrite
        self.session_consistency = session_consistency
        self.allow_local_infile = allow_local_infile
        self.state = MySessionState.start(status=status, schema=schema,
                                          charset=k.COLLATION_CHARSETS.get(charset) if charset else None)
        self._prepared_routes: dict[str, Route] = {}  # SQL PREPARE name -> its route
        self._creader = PacketReader(max_payload)
        self._actions: list[MyAction] = []
        self.role = WRITER if readwrite else MAIN
        self.attached = facts is not None
        self.instance: str | None = facts.instance if facts is not None else None
        self.in_recovery = facts.in_recovery if facts is not None else False
        self.status = status  # server status flags of the last OK/EOF
        self.marks: dict[str, BackendMark] = {} if pooled else {self.role: BackendMark()}
        # Transaction mode (see the rules above).
        self.pooled = pooled
        self.max_prepared = max_prepared
        self.conn: PooledMark | None = None  # what the borrowed connection carries (kept up to date)
        self._base_schema = schema  # the default database the state's entries start from
        self._cursors: set[int] = set()  # client statement ids with a cursor open on the borrowed connection
        self._long_data: set[int] = set()  # ... with COM_STMT_SEND_LONG_DATA sent and not executed yet
        self._xa = False  # an XA transaction is open (it may outlive SERVER_STATUS_IN_TRANS)
        self._to_close: list[int] = []  # server statement ids to close before the connection's next command
        self._xa_command: str | None = None  # an XA statement in flight
        self._parse_key: tuple[tuple[int, int, int], tuple[str, ...]] = ((-1, -1, -1), ())
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
        self._gated = False  # writer work begun at the writer gate and not ended
        self.requests = 0  # commands begun so far (the janitor's measure of activity)

    # --- what the shell reads ---------------------------------------------------------------

    def next_action(self) -> MyAction | None:
        actions = self._actions
        if not actions:
            return None
        action = actions.pop(0)
        kind = type(action)
        if actions and type(actions[0]) is kind and (kind is ToServer or kind is ToClient):
            # Sends in a row to the same side go as one (one system call, one wake-up of the peer).
            parts = [action.data]  # type: ignore[union-attr]
            while actions and type(actions[0]) is kind:
                parts.append(actions.pop(0).data)  # type: ignore[union-attr]
            action = kind(b"".join(parts))
        return action

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
            if self._dispatch(command, forwardable=True):
                if len(self._actions) == queued:
                    return FORWARD
                self._actions.append(ToServer(bytes(data)))  # (after what the command asked first)
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
        """Dispatch queued commands while nothing is in flight (transaction mode: then let go of the
        connection if nothing ties the session to it)."""
        while self._queue and self._cmd is None and not self._lost and self._attaching is None and not self.closing:
            command = self._queue.popleft()
            self._queued_bytes -= len(command.payload)
            self._dispatch(command, forwardable=False)
        if self.pooled and self._release_due():
            self._release()

    def _requeue(self, command: _Command) -> None:
        self._queue.appendleft(command)
        self._queued_bytes += len(command.payload)

    def _dispatch(self, command: _Command, *, forwardable: bool) -> bool:
        """Handle one whole command at a boundary. True when it went to the backend as it came
        (the caller may forward the client's bytes); otherwise everything needed is queued."""
        payload = command.payload
        if not payload:
            raise MySQLProtocolError("Malformed communication packet: an empty command", errno=1835)
        self.requests += 1
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
        if self.pooled and code == c.COM_STMT_CLOSE and self._forget_statement(payload):
            return False
        if self.draining and self.idle:
            self._shutdown()
            return False
        if self.failed_tx:
            self._answer_failed_tx(command, sql)
            return False
        if self.pooled and code == c.COM_RESET_CONNECTION and not self.attached:
            # Nothing of the session is on a server: it starts over here (its next borrow gets a
            # connection brought to the empty state), and no connection is taken for it.
            self._reset_state(self.state.schema)
            self.status = k.SERVER_STATUS_AUTOCOMMIT
            self.reply_ok(command.seq)
            return False
        role, self._decided = (self._decided, None) if self._decided else (self._role_for(code, payload, sql), None)
        if role is not None and role != self.role and not self.in_transaction:
            if role == READER and self.session_consistency and self.wrote:
                self._leave(park=True)
                self._attaching = READER
                self._actions.append(CatchUp())
            else:
                self._leave(park=True)
                self._attach(role, BORROW if self.pooled else "readwrite")
            self._requeue(command)
            return False
        if not self.attached:
            self._attach(self.role, BORROW if self.pooled else "session has no backend")
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
        if not self._gated and not self.in_transaction and not self.in_recovery and code not in _NO_RESPONSE:
            # New writer work: a switchover holds it here, at its boundary, until the gate opens.
            if not self.env.gate_open:
                self._requeue(command)
                self._attaching = _GATE
                self._actions.append(WaitGate())
                return False
            self._gated = True
            self.env.writer_begin()
        if self.readwrite and self.role == WRITER:
            self.wrote = True
        return self._send(command, code, sql, forwardable)

    def _send(self, command: _Command, code: int, sql: str | None, forwardable: bool) -> bool:
        payload = command.payload
        if code in _STMT_COMMANDS:
            client_id = self._client_statement_id(payload)
            backend_id = self._backend_statement(client_id)
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
                moved = self.pooled and statement.schema is not None and statement.schema != self.state.schema
                self._actions.append(Prepare(client_id, statement.sql, statement.schema if moved else None))
                return False
            if code == c.COM_STMT_CLOSE:
                self._close_statement(client_id)
            elif self.pooled:
                self._statement_used(code, client_id)
                if code == c.COM_STMT_EXECUTE:
                    payload = self._with_types(payload, self.statements[client_id])
                    forwardable = forwardable and payload is command.payload
            elif code == c.COM_STMT_EXECUTE:
                payload = self._typed_here(payload, client_id)
                forwardable = forwardable and payload is command.payload
            if backend_id != client_id or (payload[1:5] != client_id.to_bytes(4, "little")):
                payload = c.replace_statement_id(payload, backend_id)
                forwardable = False
        if self._to_close:
            self._flush_closes()  # (before the command: they have no answer)
        if self.pooled and code == c.COM_QUERY and sql is not None and sql[:8].lstrip()[:2].lower() == "xa":
            self._xa_command = sql
        self._track(code, command.payload, sql)  # (the client's statement ids)
        tracker = ResponseTracker(code, self.caps)
        self._cmd_in_tx = self.in_transaction
        if tracker.done:  # no response: COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA
            if forwardable and not self.pooled:
                return True
            self._actions.append(ToServer(encode_packet(command.seq, payload)))
            if self.pooled and self._release_due():
                self._release()  # (the statement closed had the last cursor or long data)
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

    def _backend_statement(self, client_id: int) -> int | None:
        """The id the active backend knows the client's statement by (None: it has none)."""
        if not self.pooled:
            return self.marks[self.role].statements.get(client_id)
        statement = self.statements.get(client_id)
        conn = self.conn
        if statement is None or conn is None:
            return None
        key = self._statement_key(statement)
        backend_id = conn.prepared.get(key)
        if backend_id is not None:
            conn.prepared.move_to_end(key)
        return backend_id

    def _close_statement(self, client_id: int) -> None:
        statement = self.statements.pop(client_id, None)
        if self.pooled:
            # A statement with this session's cursor or long data is closed on the server for real
            # (the command goes there); the connection forgets it.
            self._cursors.discard(client_id)
            self._long_data.discard(client_id)
            if statement is not None and self.conn is not None:
                self.conn.prepared.pop(self._statement_key(statement), None)
            return
        for role, mark in self.marks.items():
            backend_id = mark.statements.pop(client_id, None)
            if backend_id is not None and role != self.role:
                mark.pending_close.append(backend_id)

    # --- routing ----------------------------------------------------------------------------

    def _role_for(self, code: int, payload: bytes, sql: str | None) -> str | None:
        """readwrite: the role a command goes to (None: where the session is)."""
        if not self.readwrite:
            return None
        if self.in_transaction or self.state.pinned_by is not None or (self.attached and self._holding):
            return WRITER if not self.attached else None
        if code == c.COM_QUERY and sql is not None:
            cl = self._classify(sql)
            if cl.route is Route.READ and cl.transaction in ("commit", "rollback", "savepoint"):
                return None
            if cl.session_state == "use":
                return None
            return READER if cl.route is Route.READ and cl.transaction != "begin" else WRITER
        if code == c.COM_STMT_PREPARE:
            cl = self._classify(decode_text(payload[1:]), learn=False)
            return READER if cl.route is Route.READ else WRITER
        if code in (c.COM_STMT_EXECUTE, c.COM_STMT_FETCH):
            statement = self.statements.get(self._client_statement_id(payload))
            return statement.role if statement is not None else WRITER
        return None

    def _classify(self, sql: str, *, learn: bool = True) -> Classification:
        """readwrite: the route of a query in this session's dialect; SQL PREPAREs are learnt."""
        cl = classify(sql, self.env.function_policy(), self._prepared_routes, dialect=self.state.dialect)
        if learn and cl.session_state == "prepare" and cl.prepared_name:
            self._prepared_routes[cl.prepared_name] = cl.route
        return cl

    def _leave(self, *, park: bool) -> None:
        if self.pooled:
            if self.attached:  # (a role switch in a pipeline, or the instance left the endpoint)
                self._release(reusable=self.state.pinned_by is None and not self._holding)
            return
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
        """Feed a command to the session state before it is sent (its answer: ``_done``)."""
        state = self.state
        if sql is not None:
            state.on_query(sql)
        elif code == c.COM_INIT_DB:
            state.on_init_db(decode_text(payload[1:]))
        elif code == c.COM_SET_OPTION and len(payload) >= 3:
            state.on_set_option(int.from_bytes(payload[1:3], "little"))
        elif code == c.COM_STMT_EXECUTE:
            state.on_stmt_execute(self._client_statement_id(payload))
        elif code == c.COM_STMT_CLOSE:
            state.on_stmt_close(self._client_statement_id(payload))
        elif code == c.COM_RESET_CONNECTION:
            self._reset_state(state.schema)
        self._check_pinned()

    def _check_pinned(self) -> None:
        if not self._pinned_reported and self.state.pinned_by is not None:
            self._pinned_reported = True
            self.env.pinned(self.state.pinned_by)

    def _reset_state(self, schema: str | None) -> None:
        """COM_RESET_CONNECTION, COM_CHANGE_USER: the session starts over (and its parked backends are stale)."""
        pinned = self.state.pinned_by
        self.state.reset(schema=schema, charset=self.state.dialect.charset)
        if self.pooled:
            self._base_schema = schema
            self._cursors.clear()
            self._long_data.clear()
            self._xa = False
            self._to_close.clear()
            if self.conn is not None:
                self.conn.prepared.clear()  # COM_RESET_CONNECTION on it: the server drops them
            if pinned is not None:
                self._pinned_reported = False
                self.env.unpinned(pinned)
        self._prepared_routes.clear()
        self.statements.clear()
        self._last_statement = 0
        self.failed_tx = False
        for role in [r for r in self.marks if r != self.role]:
            del self.marks[role]
        if self.pooled:
            return
        self.marks[self.role] = BackendMark(seq=self.state.seq)
        self._actions.append(DropParked())

    def replay_plan(self, role: str, fresh: bool, schema_known: str | None = None) -> list[bytes]:
        """Commands (payloads) to bring a backend of ``role`` up to the session: statements closed
        meanwhile (no answer), the COM_SET_OPTION, the state entries it lacks (``schema_known``:
        a fresh backend logged in with the session's database, kept for the callers' sake)."""
        mark = self.marks.get(role) if not fresh else None
        state = self.state
        plan: list[bytes] = []
        if mark is None:
            mark = BackendMark()
        plan += [bytes((c.COM_STMT_CLOSE,)) + sid.to_bytes(4, "little") for sid in mark.pending_close]
        if state.multi_statements is not None and mark.multi_statements is not state.multi_statements:
            option = (k.MYSQL_OPTION_MULTI_STATEMENTS_ON if state.multi_statements
                      else k.MYSQL_OPTION_MULTI_STATEMENTS_OFF)
            plan.append(bytes((c.COM_SET_OPTION,)) + option.to_bytes(2, "little"))
        plan += [bytes((c.COM_QUERY,)) + entry.sql.encode("utf-8", "surrogateescape")
                 for entry in state.replay_after(mark.seq)]
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
                if self.pooled and self._release_due():
                    self._release()
                self._pump()  # the client may have sent its next command meanwhile
            return ATTEND
        if not tracker.done:
            return FORWARD if used == len(data) else self._extra(data, used)
        self._done(tracker)
        if used < len(data):
            return self._extra(data, used)
        release = self.pooled and self._release_due()
        if self._queue or self.draining or release:
            if release:
                self._release()  # first: a client slow to read its answer does not keep the connection
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
        state = self.state
        state.on_response(tracker.error is None, tracker.status)
        mark = self.marks.get(self.role)
        if mark is not None:
            mark.seq = state.seq  # what the command set up is on this backend now
            mark.multi_statements = state.multi_statements
        if self.pooled:
            self._pooled_done(tracker)
        self._check_pinned()
        self._cmd = None
        self._tracker = None
        self._end_request()
        if self._gated and not self.status & k.SERVER_STATUS_IN_TRANS:
            self._ungate()

    def _ungate(self) -> None:
        if self._gated:
            self._gated = False
            self.env.writer_end()

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
            role = WRITER
            if self.readwrite and self._classify(sql, learn=False).route is Route.READ:
                role = READER
            statement = self.statements[client_id] = Statement(sql, role, self.state.schema,
                                                               tracker.prepare_ok.num_params)
            self.state.on_stmt_prepare(client_id, sql)
            self._last_statement = client_id
            if self.pooled:
                self._remember(self._statement_key(statement), backend_id)
            else:
                self.marks[self.role].statements[client_id] = backend_id
            if client_id != backend_id:
                out = out[:5] + client_id.to_bytes(4, "little") + out[9:]
        if tracker.done:
            self._done(tracker)
            if self.pooled and self._release_due():
                self._release()  # (before the answer, as in server_data)
        self._actions.append(ToClient(out))
        if tracker.done:
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
        if not self.pooled:
            state = self.state
            mark = self.marks.get(role)
            if mark is None:
                mark = self.marks[role] = BackendMark()
            mark.pending_close.clear()
            mark.multi_statements = state.multi_statements
            mark.seq = state.seq
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
        if error.kind != "pool_timeout":  # (a pool's borrow timeout is counted by the pool)
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
            elif error.kind == "pool_timeout":
                self._reply_error(command.seq, ER_CON_COUNT, "08004", error.message)
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
        elif self.pooled:
            statement = self.statements.get(client_id)
            if statement is not None:
                self._remember(self._statement_key(statement), backend_id)
        else:
            self.marks[self.role].statements[client_id] = backend_id
        self._pump()

    def verdict(self, same_role_up: bool) -> None:
        self._lost = False
        self._ungate()
        lost_instance = self.instance
        self.attached = False
        self.instance = None
        self.marks.pop(self.role, None)
        if self.pooled:
            self.conn = None  # (the shell forgot it in its pool)
            self._cursors.clear()
            self._long_data.clear()
            self._to_close.clear()
            self._xa = False
        cmd, tracker = self._cmd, self._tracker
        self._cmd = self._tracker = None
        # The server's stream broke inside a packet the client has the first bytes of (bytes a
        # session holds back, it has not sent): nothing can follow them that the client could read.
        broken = not self._sscan.at_boundary and self._head is None and self._patch is None
        self._patch = self._head = None
        self._upload = self._swallow = False
        in_flight = 1 if cmd is not None else 0
        read_only = cmd is not None and self._is_read(cmd)
        facts = LossFacts(pinned=self.state.pinned_by, in_flight=in_flight,
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
                f"{self.state.pinned_by} cannot be moved to another server"))))
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
            sql = c.query_text(command.payload, self.caps)
            return classify(sql, self.env.function_policy(), dialect=self.state.dialect).route is Route.READ
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

    def user_changed(self, schema: str | None) -> None:
        """COM_CHANGE_USER went through: the session starts over (in ``schema``) on the shell's
        new backend."""
        self._reset_state(schema)

    def drain(self) -> bool:
        self.draining = True
        if self.idle and not self.closing:
            self.closing = True
            self._actions.append(Close())
            return True
        return False

    def end(self) -> None:
        """The session is over: stop counting a command in flight, or the session as pinned."""
        self._end_request()
        self._ungate()
        if self._pinned_reported and self.state.pinned_by is not None:
            self._pinned_reported = False
            self.env.unpinned(self.state.pinned_by)

    def expire(self, errno: int, sqlstate: str, message: str) -> None:
        """End the session now with an error (a timeout of the janitor's)."""
        if self.closing:
            return
        self.closing = True
        # Sequence 1: a client reads it as the answer to the command it sends next (as MySQL's own).
        self._actions.append(ToClient(encode_packet(1, err_packet(errno, sqlstate, message))))
        self._actions.append(Close())

    def gate_opened(self) -> None:
        """The writer gate is open again: the held command goes on (decided again: the writer
        may have changed meanwhile)."""
        self._attaching = None
        self._pump()

    # --- transaction mode: borrowing and giving back -------------------------------------------

    def pool_plan(self, mark: PooledMark, *, reset: bool = False) -> Plan | None:
        """What to run on a borrowed connection (``mark``) before the session's command: nothing when it
        carries what the session has. ``reset`` after a plan's command failed there. None: it cannot fit
        (give it back unused)."""
        return _pool_plan(mark, self.state.entries, self._base_schema, self._multi, reset=reset)

    def borrowed(self, facts: BackendFacts, mark: PooledMark, *, status: int | None, plan: Plan | None,
                 complete: bool = True) -> None:
        """The Attach (reason "borrow") succeeded: ``mark``'s connection ran ``plan`` (``complete``: every
        command of it succeeded; else what it carries is not known and the next borrower resets it)."""
        reset = plan is not None and plan.reset
        if complete:
            applied(mark, self.state.entries, self._base_schema, self.state.schema, self._multi, reset=reset)
            mark.unknown = False
        else:
            if reset:
                mark.prepared.clear()
            mark.unknown = True
        self.conn = mark
        self.attached_backend(facts, status=status)

    def let_go(self) -> None:
        """The shell closed the borrowed connection by itself (COM_CHANGE_USER)."""
        self.attached = False
        self.instance = None
        self.conn = None
        self._cursors.clear()
        self._long_data.clear()
        self._to_close.clear()
        self._xa = False

    def parting(self) -> bool:
        """The session ends: True when its borrowed connection may go back to the pool (brought up to
        date), False when it must be closed (a command in flight, a transaction or a pin on it)."""
        if not self.pooled or self.conn is None or not self.attached:
            return False
        clean = (self._cmd is None and not self._upload and not self.in_transaction and not self._lost
                 and self.state.pinned_by is None and not self._holding and not self._to_close)
        if clean:
            applied(self.conn, self.state.entries, self._base_schema, self.state.schema, self._multi)
        return clean

    @property
    def _multi(self) -> bool:
        """Multi-statements on for this session (COM_SET_OPTION's last word, else its login's)."""
        multi = self.state.multi_statements
        return multi if multi is not None else bool(self.caps & k.CLIENT_MULTI_STATEMENTS)

    @property
    def _holding(self) -> bool:
        """Server state of this session's on the borrowed connection that outlives its commands."""
        return bool(self._cursors or self._long_data or self._xa)

    def _release_due(self) -> bool:
        return (self.attached and self._cmd is None and not self._queue and self._attaching is None
                and not self.closing and not self._lost and not self._upload and not self.in_transaction
                and self.state.pinned_by is None and not self._holding)

    def _release(self, *, reusable: bool = True) -> None:
        conn = self.conn
        if conn is not None and reusable:
            applied(conn, self.state.entries, self._base_schema, self.state.schema, self._multi)
        if self._to_close:
            self._flush_closes()
        self._actions.append(Release(reusable))
        self.attached = False
        self.instance = None
        self.conn = None

    def _flush_closes(self) -> None:
        """COM_STMT_CLOSE (no answer) for the server statements the connection let go of."""
        closes = b"".join(encode_packet(0, bytes((c.COM_STMT_CLOSE,)) + sid.to_bytes(4, "little"))
                          for sid in self._to_close)
        self._to_close.clear()
        self._actions.append(ToServer(closes))

    def _statement_key(self, statement: Statement) -> StatementKey:
        return statement.sql, statement.schema, self._parse_context()

    def _parse_context(self) -> tuple[str, ...]:
        """The session's entries that change how a statement text parses (sql_mode, character set)."""
        state = self.state
        version = (state.version, state.seq, len(state.entries))
        if self._parse_key[0] != version:
            texts = tuple(e.sql for e in state.entries if any(key.lower() in PARSE_KEYS for key in e.sets))
            self._parse_key = (version, texts)
        return self._parse_key[1]

    def _remember(self, key: StatementKey, backend_id: int) -> None:
        """The borrowed connection has ``key`` prepared as ``backend_id`` now (the most recently used);
        past ``max_prepared`` the least recently used one is closed there."""
        conn = self.conn
        if conn is None:
            return
        old = conn.prepared.pop(key, None)
        if old is not None and old != backend_id:
            self._to_close.append(old)  # the same text twice: the newer serves every session
        conn.prepared[key] = backend_id
        if len(conn.prepared) <= self.max_prepared:
            return
        held = {self._backend_statement_quiet(cid) for cid in self._cursors | self._long_data}
        for victim, victim_id in list(conn.prepared.items()):
            if len(conn.prepared) <= self.max_prepared:
                break
            if victim_id in held or victim == key:
                continue
            del conn.prepared[victim]
            self._to_close.append(victim_id)

    def _backend_statement_quiet(self, client_id: int) -> int | None:
        statement = self.statements.get(client_id)
        if statement is None or self.conn is None:
            return None
        return self.conn.prepared.get(self._statement_key(statement))

    def _statement_used(self, code: int, client_id: int) -> None:
        """A statement command goes to the borrowed connection: what of it stays on the server."""
        if code == c.COM_STMT_SEND_LONG_DATA:
            self._long_data.add(client_id)  # the server keeps it for the statement's next execution
        elif code in (c.COM_STMT_EXECUTE, c.COM_STMT_RESET):
            self._long_data.discard(client_id)
            self._cursors.discard(client_id)  # (an execution that opens one again says so in its answer)

    def _typed_here(self, payload: bytes, client_id: int) -> bytes:
        """Session mode, COM_STMT_EXECUTE: a client sends its parameters' types with a statement's
        first execution only. On a backend where the proxy prepared the statement again (after a
        failover or a switchover), the first execution gets the client's last types added, as
        that server has none (it would answer 1210)."""
        statement = self.statements.get(client_id)
        if statement is None or not statement.params:
            return payload
        mark = self.marks[self.role]
        typed = mark.typed
        if typed is not None and client_id in typed:
            return self._with_types(payload, statement, add=False)  # (keeps the client's newest types)
        payload = self._with_types(payload, statement)
        flag = 10 + (statement.params + 7) // 8
        if len(payload) > flag and payload[flag] == 1:
            if typed is None:
                typed = mark.typed = set()
            typed.add(client_id)
        return payload

    @staticmethod
    def _with_types(payload: bytes, statement: Statement, *, add: bool = True) -> bytes:
        """COM_STMT_EXECUTE: a client sends its parameters' types once, and the server keeps them with
        the statement. Pooled server statements are shared, and met for the first time on other
        connections: each execution carries the types (the client's last) so the values read right."""
        params = statement.params
        if not params:
            return payload
        flag = 10 + (params + 7) // 8  # after the command, id, flags, iteration count and NULL bitmap
        if len(payload) <= flag:
            return payload
        if payload[flag] == 1:
            statement.types = payload[flag + 1: flag + 1 + 2 * params]
            return payload
        if payload[flag] != 0 or statement.types is None or not add:
            return payload
        return payload[:flag] + b"\x01" + statement.types + payload[flag + 1:]

    def _forget_statement(self, payload: bytes) -> bool:
        """COM_STMT_CLOSE: the session forgets its id; the server statement stays for whoever has the same
        text (the connection's LRU closes it). False when it must be closed on the server after all (it has
        the session's cursor or long data)."""
        client_id = self._client_statement_id(payload)
        if self.attached and (client_id in self._cursors or client_id in self._long_data):
            return False
        self.statements.pop(client_id, None)
        self.state.on_stmt_close(client_id)
        return True

    def _pooled_done(self, tracker: ResponseTracker) -> None:
        """A command's final answer: cursors, XA transactions and pins that end."""
        cmd = self._cmd
        status = tracker.status or 0
        if cmd is not None and tracker.error is None:
            code = cmd.payload[0]
            if code == c.COM_STMT_EXECUTE and status & k.SERVER_STATUS_CURSOR_EXISTS:
                self._cursors.add(self._client_statement_id(cmd.payload))
            elif code == c.COM_STMT_FETCH and status & k.SERVER_STATUS_LAST_ROW_SENT:
                self._cursors.discard(self._client_statement_id(cmd.payload))  # (the server closed it)
        xa, self._xa_command = self._xa_command, None
        if xa is not None and tracker.error is None:
            m = _XA.match(xa)
            if m is not None:
                self._xa = m.group(1).upper() in ("START", "BEGIN")
        pinned = self.state.pinned_by
        if pinned is not None and self.state.release_pin():
            self._pinned_reported = False
            self.env.unpinned(pinned)

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


