"""The decisions of one PostgreSQL client session after login, sans-IO.

Rules of this file:
- Fed the client's bytes (``client_data``), the server's (``server_data``) and what the shell
  learned (``attached``, ``attach_failed``, ``verdict``, ``caught_up``); returns FORWARD (send
  what was fed to the other side as is: the hot path) or ATTEND (take ``next_action()`` until
  None). Never sees a socket, a clock or a log.
- A routing decision is taken only at a request boundary: before the first byte of a request
  (everything up to its Sync, or one Query/FunctionCall; COPY data belongs to the COPY). Bytes
  of one request all go to one backend, whatever the read sizes; bytes that cannot go anywhere
  yet are held (copied) until they can.
- The server side is scanned for ReadyForQuery (answers owed), ParameterStatus (what the client
  was told), CopyInResponse and FATAL errors (the server is about to close: the FATAL is held
  back until the monitor's verdict says whether this is a failover or the server's own doing).
- Session state (SET, prepared statements, ...) is tracked in ``SessionState``; what each
  backend already has is its ``BackendMark``, so a backend is brought up to date by the
  difference (``replay_plan``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol.pg import messages as m
from ..protocol.pg.framing import MessageScanner
from ..routing.dialect import PgDialect
from ..routing.pg_classify import FunctionPolicy
from ..routing.session_state import SessionState
from .actions import (
    ATTEND,
    FORWARD,
    FORWARD_FIRST,
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
    PrepareStatements,
    Release,
    ToClient,
    ToServer,
    WaitGate,
)
from .loss import STATEMENT_LOST, TX_LOST, LossFacts, LossOutcome, on_loss
from .pg_emulate import Emulation
from .pg_pool import (
    ANSWER,
    DRAIN,
    FLUSH,
    LEDGER_SERVER_TYPES,
    REWRITE,
    SEND,
    PooledMark,
    StatementMap,
    desired_settings,
    diff_statements,
    shared,
)
from .pg_route import STAY, UNIT_ENDS, PgReadWriteDecider

Buffer = bytes | bytearray | memoryview
Msg = tuple[int, bytes, int]  # (type, payload, end offset in the chunk)

_Q, _P, _C, _S, _F, _X, _Z, _E, _B, _H, _G, _W = (ord(c) for c in "QPCSFXZEBHGW")
_COPY_END = (ord("c"), ord("f"))  # CopyDone, CopyFail
_COPY_TYPES = frozenset((ord("d"), *_COPY_END))
_DIALECTS: dict[tuple[str | None, str | None], PgDialect] = {}


def dialect_of(params: dict[str, str]) -> PgDialect:
    """The lexical dialect the server's ParameterStatus values describe; one shared object per kind
    (sessions of a cluster nearly always share one)."""
    key = (params.get("standard_conforming_strings"), params.get("client_encoding"))
    found = _DIALECTS.get(key)
    if found is None:
        found = _DIALECTS.setdefault(key, PgDialect.from_parameters(params)) if len(_DIALECTS) < 256 \
            else PgDialect.from_parameters(params)
    return found


_REQUEST_ENDS = frozenset((_Q, _S, _F, _X))
_UNIT_OR_END = UNIT_ENDS | {_X}
_SIMPLE_STARTS = frozenset((_Q, _S, _F, _X, _H))
CLIENT_TYPES = b"QPCSFXHcf"  # what the client side must see (readwrite adds B)
SERVER_TYPES = b"ZSEGW"
# Client bytes a session holds while it cannot forward them yet (a decision waits for the
# rest of a flush unit, a backend is being found); past this it stops reading the client, and
# a flush unit this large is decided on what has arrived.
HOLD_LIMIT = 1 << 20
RETRY_LIMIT = 1 << 20  # a read outside a transaction is kept (for a retry elsewhere) up to this size

SHUTDOWN_MESSAGE = "terminating connection due to administrator command"
_SYNC = b"S\0\0\0\4"


class PgEnv(Protocol):
    """What the core reads from, and reports to, the proxy around it (no I/O)."""

    @property
    def generation(self) -> int:
        """The topology's generation: bumped whenever anything routing depends on changed."""
        ...

    def placement_ok(self, role: str, instance: str) -> bool:
        """May a backend on ``instance`` keep serving ``role`` (the endpoint's rule)?"""
        ...

    def function_policy(self) -> FunctionPolicy: ...

    def request_started(self, instance: str, in_recovery: bool) -> None: ...

    def request_ended(self, instance: str) -> None: ...

    def pinned(self, reason: str) -> None:
        """The session became tied to its server (``reason``: the pinning state's label)."""
        ...

    def unpinned(self, reason: str) -> None:
        """The session's pinning state is gone (UNLISTEN *, DISCARD ALL, ...)."""
        ...

    def error(self, kind: str) -> None:
        """Count an error of a kind of server.metrics.ERROR_KINDS."""
        ...

    @property
    def gate_open(self) -> bool:
        """Is the writer gate open (no switchover holding new writer work)?"""
        ...

    def writer_begin(self) -> None:
        """Writer work of this session begins (a request outside a transaction, or the first
        of one): a switchover waits until it ends."""
        ...

    def writer_end(self) -> None:
        """This session is back to idle on the writer."""
        ...


@dataclass(slots=True)
class BackendMark:
    """What of the session's state one backend already has."""

    version: int
    sets_applied: int = 0
    statements: set[str] = field(default_factory=set)  # named prepared statements (protocol level)
    sql_prepared: set[str] = field(default_factory=set)  # SQL PREPARE names
    pending: list[bytes] = field(default_factory=list)  # Close messages owed before its next use


@dataclass(frozen=True)
class ReplayPlan:
    """Our own requests to bring a backend up to date, and how many ReadyForQuery they end with."""

    batch: bytes
    expected_ready: int


_NOTHING_TO_REPLAY = ReplayPlan(b"", 0)
_NO_MARKS: dict[str, BackendMark] = {}
_RELEASE = Release()  # (actions are never changed: one for every session)
# A pooled connection's record of SQL prepared statements when it has none (shared: records are
# replaced, never changed in place).
_NO_SQL: dict[str, str] = {}


def frame(type_: int, payload: bytes) -> bytes:
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + payload


def is_fatal(error_payload: bytes) -> bool:
    """Whether an ErrorResponse payload has severity FATAL or PANIC (its S field comes first)."""
    if error_payload.startswith((b"SFATAL\0", b"SPANIC\0")):
        return True
    return b"\0VFATAL\0" in error_payload or b"\0VPANIC\0" in error_payload


def _start(msg: Msg) -> int:
    return msg[2] - 5 - len(msg[1])


class PgSessionCore:
    __slots__ = ("_actions", "_answered", "_attaching", "_awaiting_flush", "_busy_on", "_checked_generation",
                 "_copy_in", "_cscan", "_fatal", "_gated", "_held", "_held_msgs", "_hold_reason", "_lost",
                 "_pending_role", "_pinned_reported", "_request_status", "_resend", "_retry", "_retry_started",
                 "_sscan", "_swallow", "_unit_left", "attached", "batch_open", "client_params", "closing", "decider",
                 "draining", "env", "in_recovery", "in_unit", "inflight", "instance", "loss_outcome", "marks",
                 "mode", "readwrite", "role", "session_consistency", "state", "status", "wrote", "smap", "_cpart",
                 "_conn_params", "_desired", "_desired_version", "_desired_changes", "_startup", "max_prepared",
                 "_borrowed_version", "_borrowed_changes", "_borrowed_dropped", "requests", "_fatal_begun")

    def __init__(self, env: PgEnv, facts: BackendFacts, *, readwrite: bool = False,
                 session_consistency: bool = False, max_message_bytes: int = 0x3FFFFFFF,
                 state: SessionState | None = None, client_params: dict[str, str] | None = None,
                 pooled: bool = False, startup: dict[str, str] | None = None, max_prepared: int = 200) -> None:
        self.env = env
        self.readwrite = readwrite
        self.session_consistency = session_consistency
        # Transaction pooling: the backend is borrowed per request or transaction (pg_pool.py);
        # the client's statements are mapped to proxy-wide names; whole messages only.
        self.smap: StatementMap | None = StatementMap() if pooled else None
        self._cpart: bytearray | None = None  # pooled: the start of a client message still arriving
        self._conn_params: dict[str, str] | None = None  # pooled: the borrowed connection's ParameterStatus
        # _settings()'s last answer, and the state's (version, changes) it is for. (Plain fields, not
        # tuples, here and below: every idle session would keep its own tuple.)
        self._desired: dict[str, str] | None = None
        self._desired_version = self._desired_changes = 0
        self._startup = startup or {}
        self.max_prepared = max_prepared
        # The state's version, changes and statements_dropped when the connection was borrowed.
        self._borrowed_version = self._borrowed_changes = self._borrowed_dropped = 0
        wanted = CLIENT_TYPES + (b"B" if readwrite or pooled else b"") + (b"DE" if pooled else b"")
        self._cscan = MessageScanner(wanted, max_length=max_message_bytes)
        self._sscan = MessageScanner(SERVER_TYPES + (LEDGER_SERVER_TYPES if pooled else b""))
        self.state = state if state is not None else SessionState()
        # What the client was told (ParameterStatus); shared with the first backend's own record
        # (it is the same until a server says otherwise), so an idle session keeps one copy.
        self.client_params: dict[str, str] = client_params if client_params is not None else dict(facts.parameters)
        self.state.dialect = dialect_of(self.client_params)
        self._actions: list[Action] = []  # (a list: an idle session keeps an empty one, a deque costs 600 B)
        # The active backend.
        self.role = WRITER if readwrite else MAIN
        self.attached = not pooled  # pooled: a backend is borrowed for the first request
        self.instance: str | None = facts.instance if not pooled else None
        self.in_recovery = facts.in_recovery
        self.status = facts.status  # transaction status of its last ReadyForQuery
        # Pooled: a shared empty dict, never written (a borrowed connection's record is its PooledMark).
        self.marks: dict[str, BackendMark] = _NO_MARKS if pooled else {self.role: BackendMark(self.state.version)}
        self._checked_generation = env.generation
        # The request ledger.
        self.inflight = 0  # ReadyForQuery messages the client still waits for
        self.in_unit = False  # a unit has begun and its last message has not been seen (see _account)
        self.batch_open = False  # extended-protocol messages were sent since the last Sync
        self._swallow = 0  # ReadyForQuery answers to our own Syncs, not to be forwarded
        self._awaiting_flush = False  # a Flush went out and the server has said nothing since
        self._copy_in = False  # the server asked for COPY data: client bytes are data until ReadyForQuery
        self._busy_on: str | None = None  # the instance counted as running a request of ours
        self._request_status = "I"  # transaction status when the request in flight began
        self._retry: bytearray | None = None  # the request in flight, while it may be retried
        self._retry_started = False  # _retry was begun by the current _feed call
        self._answered = False  # some of the answer to the request in flight reached the client
        self._resend: bytes | None = None  # a request to run again once a backend is attached
        # Bytes that could not be forwarded yet (always from a request boundary).
        self._held: bytearray | None = None
        self._held_msgs: list[Msg] = []
        self._hold_reason = _UNIT  # what the held bytes wait for (see _UNIT, _IDLE, _BACKEND)
        self._pending_role: str | None = None  # the decision already taken for the held request
        self._attaching: str | None = None  # the role of the Attach under way
        self._unit_left = 0  # readwrite: messages of the decided flush unit not yet accounted
        self.mode: Emulation | None = None  # answering by ourselves (no backend to answer)
        self._lost = False  # waiting for the monitor's verdict on the lost backend
        self._fatal: bytes | None = None  # the FATAL error the server sent before closing
        self._fatal_begun = False  # _fatal is the rest of a message the client has the start of
        self.loss_outcome: LossOutcome | None = None  # the last loss's outcome (for the shell's log)
        self.draining = False
        self.closing = False
        self.wrote = False  # readwrite, session consistency: a write since the last verified read
        self.decider = PgReadWriteDecider() if readwrite else None
        self.requests = 0  # requests begun so far (the janitor's measure of activity)
        self._pinned_reported: str | None = None  # the pin reason the environment was told of
        self._gated = False  # writer work begun at the writer gate and not ended

    # --- what the shell reads -------------------------------------------------------------

    def next_action(self) -> Action | None:
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
    def idle(self) -> bool:
        """No request in flight, none begun, no transaction open: closing now loses nothing."""
        return (self.inflight == 0 and not self.in_unit and self.mode is None and self.status == "I"
                and self._held is None and not self._lost)

    @property
    def wants_client(self) -> bool:
        """Whether the shell should read the client now (False: too much is held already)."""
        return not self.closing and (self._held is None or len(self._held) < HOLD_LIMIT)

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.in_unit

    # --- client bytes ---------------------------------------------------------------------

    def client_data(self, data: Buffer) -> int:
        if self.closing:
            return ATTEND
        if self.smap is not None:
            return self._client_whole(data)
        return self._client_data(data)

    def _client_whole(self, data: Buffer) -> int:
        """Pooled: only whole messages go on (a message may be rewritten: it must not have gone in part)."""
        part = self._cpart
        if part is not None:
            part += data
            data = part
            self._cpart = None
        msgs, cut = self._cscan.scan_whole(data)  # (one pass: the scanner is always at a boundary here)
        if cut < len(data):
            self._cpart = bytearray(data[cut:])
            data = data[:cut]
            if not cut:
                return ATTEND
        elif part is None:
            return self._client_data(data, msgs)
        if self._client_data(data, msgs) == FORWARD:
            self._actions.append(ToServer(bytes(data)))
        return ATTEND

    def _client_data(self, data: Buffer, msgs: list[Msg] | None = None) -> int:
        if msgs is None:
            msgs = self._cscan.scan(data)
        held = self._held
        if held is None:
            if not self.attached and self.smap is not None and self._borrow_first(data, msgs):
                return ATTEND
            return self._feed(data, msgs)
        base = len(held)
        held += data
        self._held_msgs.extend((t, p, e + base) for t, p, e in msgs)
        if self._hold_reason == _UNIT and (len(held) >= HOLD_LIMIT or any(t in _UNIT_OR_END for t, _, _ in msgs)):
            # The flush unit is whole now (or so large it is decided as it is), or a Terminate
            # that came in pieces is: it needs no decision.
            self._release()
        return ATTEND

    def _borrow_first(self, data: Buffer, msgs: list[Msg]) -> bool:
        """Pooled, with no connection, a request begins here (the usual case in transaction
        mode): hold it and borrow one, as _boundary would decide, without the general walk.
        False for anything else (readwrite, a drain, COPY, Terminate, answering by ourselves...)."""
        if (self.in_unit or self._copy_in or self.mode is not None or self.readwrite or self.draining
                or self._attaching is not None or self.closing or not msgs):
            return False
        type_, payload, end = msgs[0]
        if end != 5 + len(payload) or type_ == _X or data[0] in _COPY_TYPES:
            return False  # (the first message is not one the scanner wants, or needs more than a borrow)
        self._attach(self.role, "borrow")
        self._hold_reason = _BACKEND
        self._held = bytearray(data)
        self._held_msgs = msgs
        return True

    def client_eof(self) -> None:
        self.closing = True
        self._actions.append(Close())

    def _feed(self, data: Buffer, msgs: list[Msg]) -> int:
        """Dispatch client bytes that start where the last call stopped. Returns FORWARD when
        all of ``data`` goes to the active backend and nothing else is to be done."""
        n = len(data)
        queued = len(self._actions)
        run = 0  # start of the bytes not yet dispatched: they go to the active backend
        pos = 0  # where processing stands (a message boundary while not in a request)
        i = 0
        nm = len(msgs)
        while True:
            if not self.in_unit and not self._copy_in:
                if pos >= n:
                    break
                if data[pos] in _COPY_TYPES and self.mode is None:
                    # COPY data belongs to the COPY before it, even when it arrives ahead of the
                    # server's CopyInResponse (asyncpg sends it without waiting). While the
                    # session answers by itself, it skips COPY messages on its own, and a chunk
                    # may begin inside a message begun in the last one: no type byte there.
                    self._copy_in = True
                    continue
                before = len(self._actions)
                stop = self._boundary(data, msgs, i, pos)
                if stop == _GO:
                    self._request_begins(data, pos)
                else:
                    # What came before the boundary goes first, ahead of what the decision queued.
                    if pos > run:
                        self._actions.insert(before, ToServer(bytes(data[run:pos])))
                    run = pos
                    if stop == _HOLD:
                        self._hold(data, msgs, i, pos)
                        return ATTEND
                    if stop == _DROP:  # the session is closing
                        return ATTEND
                    pos, i = self._emulate(msgs, i, n)  # _EMULATE
                    run = pos
                    continue
            elif self._copy_in and not self.attached:
                # COPY data for a backend that is gone (its error was sent): drop up to CopyDone/Fail.
                self._flush(data, run, pos)
                while i < nm and msgs[i][0] not in _COPY_END:
                    i += 1
                if i == nm:
                    return ATTEND
                self._copy_in = False
                pos = run = msgs[i][2]
                i += 1
                continue
            # Inside a request: account for its messages until it ends or the bytes run out.
            smap = self.smap if self.attached else None
            while i < nm:
                type_, payload, end = msgs[i]
                i += 1
                if smap is not None and (verdict := smap.client_message(type_, payload)) != SEND:
                    start = end - 5 - len(payload)
                    if start > run:
                        self._actions.append(ToServer(bytes(data[run:start])))
                    run = end
                    if verdict == REWRITE:
                        self._actions.append(ToServer(smap.out))
                    elif verdict == ANSWER:
                        self._actions.append(ToClient(smap.out))
                    else:
                        # Answers of ours wait for the server's to everything sent before (DRAIN: make it
                        # answer now), or a statement must be prepared on this connection first (PREPARE).
                        self._hold(data, msgs, i - 1, start)
                        if verdict == DRAIN:
                            self._hold_reason = _DRAIN
                            self._actions.append(ToServer(FLUSH))
                        else:
                            self._hold_reason = _PREPARE
                            self._actions.append(PrepareStatements(list(smap.wanted)))
                        return ATTEND
                if self._account(type_, payload):
                    self.in_unit = False
                    pos = end
                    break
            else:
                pos = n
                break
        if self._retry is not None:
            self._keep_for_retry(data)
        if self.closing:
            self._flush(data, run, n)
            self._actions.append(Close())
            return ATTEND
        if len(self._actions) == queued and run == 0:
            return FORWARD
        self._flush(data, run, n)
        return ATTEND

    def _flush(self, data: Buffer, start: int, end: int) -> None:
        if end > start:
            self._actions.append(ToServer(bytes(data[start:end])))

    def _hold(self, data: Buffer, msgs: list[Msg], i: int, pos: int) -> None:
        if pos == 0:
            if isinstance(data, bytearray):
                self._held = data  # held already (a release that stopped where it began)
            else:
                self._held = bytearray(data)
            self._held_msgs = msgs[i:] if i else msgs
            return
        self._held = bytearray(data[pos:])
        self._held_msgs = [(t, p, e - pos) for t, p, e in msgs[i:]]

    def _release(self) -> None:
        """Dispatch the held bytes (they start at a request boundary)."""
        held, msgs = self._held, self._held_msgs
        assert held is not None
        self._held, self._held_msgs = None, []
        if self._feed(held, msgs) == FORWARD:
            self._actions.append(ToServer(bytes(held)))

    # --- request boundaries ---------------------------------------------------------------

    def _boundary(self, data: Buffer, msgs: list[Msg], i: int, pos: int) -> int:
        """Decide before the first byte of a request at ``pos``."""
        first = msgs[i] if i < len(msgs) and msgs[i][2] - 5 - len(msgs[i][1]) == pos else None
        if first is not None and first[0] == _X:
            return self._terminate(data, pos)
        if self.mode is not None:
            return _EMULATE
        if self.draining and self.inflight == 0 and self.status == "I":
            self._shutdown()
            return _DROP
        role = self.role
        if self.readwrite:
            decided = self._decide(msgs, i, len(data) - pos)
            if decided is None:
                self._hold_reason = _UNIT  # the flush unit has not arrived whole
                return _HOLD
            if self.state.pinned_by is not None:
                decided = WRITER
            if decided != STAY and decided != role and self.status == "I":
                if self.inflight or self.batch_open:
                    if decided == WRITER or not self.inflight:
                        # A write behind reads in flight on a replica, or a unit for another backend
                        # behind an unsynced batch (asyncpg's Parse/Describe/Flush): wait until this
                        # backend has answered everything (our own Sync closes the batch), then switch.
                        if not self.inflight:
                            self._sync_ourselves()
                        self._pending_role = decided
                        self._hold_reason = _IDLE
                        return _HOLD
                else:
                    self._switch(decided)
                    self._hold_reason = _BACKEND
                    return _HOLD
            elif not self.attached and decided != STAY:
                role = decided
        if not self.attached:
            self._attach(role, "borrow" if self.smap is not None else "session has no backend")
            self._hold_reason = _BACKEND
            return _HOLD
        if self.inflight == 0 and not self.batch_open:
            gen = self.env.generation
            if gen != self._checked_generation:
                self._checked_generation = gen
                assert self.instance is not None
                if not self.env.placement_ok(self.role, self.instance):
                    self._detach(park=False)
                    self._attach(role, "left the endpoint")
                    self._hold_reason = _BACKEND
                    return _HOLD
        if not self._gated and self.inflight == 0 and self.status == "I" and not self.in_recovery:
            # New writer work: a switchover holds it here, at its boundary, until the gate opens.
            if not self.env.gate_open:
                self._hold_reason = _BACKEND
                self._attaching = _GATE
                self._actions.append(WaitGate())
                return _HOLD
            self._gated = True
            self.env.writer_begin()
        return _GO

    def _decide(self, msgs: list[Msg], i: int, available: int) -> str | None:
        """readwrite: the role for the request whose first flush unit starts at ``msgs[i]``;
        None while the unit is incomplete."""
        if self._pending_role is not None:
            role, self._pending_role = self._pending_role, None
            return role
        assert self.decider is not None
        unit_end = None
        for k in range(i, len(msgs)):
            if msgs[k][0] in UNIT_ENDS:
                unit_end = k
                break
        if unit_end is None and available < HOLD_LIMIT:
            return None
        unit = msgs[i: len(msgs) if unit_end is None else unit_end + 1]
        self._unit_left = len(unit)
        if self.state.pinned_by is not None:
            return WRITER
        role = self.decider.decide(unit, self.env.function_policy(), self.state.dialect)
        if unit_end is None and role == STAY:
            role = WRITER  # a huge unit that says nothing: the safe side
        if role == WRITER:
            self.wrote = True
        return role

    def _sync_ourselves(self) -> None:
        """Close the open extended-protocol batch with a Sync of ours; its ReadyForQuery is ours too."""
        if self.smap is not None:
            self.smap.client_message(_S, b"")
        self._actions.append(ToServer(_SYNC))
        self.inflight += 1
        self._swallow += 1
        self.batch_open = False

    def _switch(self, role: str) -> None:
        if self.attached:
            self._detach(park=True)
        if role == READER and self.session_consistency and self.wrote:
            self._attaching = READER
            self._actions.append(CatchUp())
            return
        self._attach(role, "readwrite")

    def _attach(self, role: str, reason: str, exclude: frozenset[str] = frozenset()) -> None:
        self._attaching = role
        self._actions.append(Attach(role, reason, exclude))

    def _detach(self, *, park: bool) -> None:
        if self.smap is not None:
            self._give_back()
            return
        self._actions.append(Detach(park=park))
        self.attached = False
        self.instance = None
        if not park:
            self.marks.pop(self.role, None)

    def _terminate(self, data: Buffer, pos: int) -> int:
        """Terminate: the client's last message. The backend gets it too, then the session ends."""
        if self.attached and not self._lost and self.smap is None:
            self._actions.append(ToServer(bytes(data[pos:pos + 5])))
        self.closing = True
        self._actions.append(Close())
        return _DROP

    def _shutdown(self) -> None:
        self.closing = True
        self._actions.append(ToClient(m.error_response("FATAL", "57P01", SHUTDOWN_MESSAGE)))
        self._actions.append(Close())

    def _request_begins(self, data: Buffer, pos: int) -> None:
        self.in_unit = True
        self.requests += 1
        if data[pos] not in _SIMPLE_STARTS:
            self.batch_open = True  # Bind, Execute, Describe... (not all of them are scanned for)
        if self.inflight == 0:
            assert self.instance is not None
            if self._busy_on is None:
                self._busy_on = self.instance
                self.env.request_started(self.instance, self.in_recovery)
            self._request_status = self.status
            self._answered = False
            # A read outside a transaction on a replica may be run again elsewhere if the
            # replica dies before answering: keep its bytes.
            self._retry = bytearray(data[pos:]) if self.in_recovery and self.status == "I" else None
            self._retry_started = True
        elif self._retry is not None:
            self._retry = None  # a pipeline: no retry

    def _keep_for_retry(self, data: Buffer) -> None:
        retry = self._retry
        assert retry is not None
        if self._retry_started:
            self._retry_started = False  # the bytes from the request's start are in already
        else:
            retry += data
        if self.inflight > 1 or len(retry) > RETRY_LIMIT:
            self._retry = None

    # --- accounting of forwarded messages ---------------------------------------------------

    def _account(self, type_: int, payload: bytes) -> bool:
        """Book one client message that goes to the active backend; True if it ends the request."""
        if self._unit_left:
            self._unit_left -= 1
        if type_ == _E or type_ == _B:
            return False  # (the usual messages inside a request: nothing to book)
        if type_ == _Q:
            self.inflight += 1
            self.batch_open = False
            self._track_query(payload)
            return True
        if type_ == _S:
            self.inflight += 1
            self.batch_open = False
            return True
        if type_ == _F:
            self.inflight += 1
            return True
        if type_ == _H:
            self._awaiting_flush = True
            return True  # a Flush: the client may now wait for answers; the batch stays open
        if type_ == _P:
            self.batch_open = True
            self._track_parse(payload)
        elif type_ == _C:
            self.batch_open = True
            if payload[:1] == b"S":
                self._track_close(payload[1:-1])
        elif type_ == _X:
            self.closing = True  # _feed closes once the Terminate itself is on its way
            return True
        elif type_ in _COPY_END:
            self._copy_in = False  # the client ended its COPY data
            return True
        return False

    def _track_query(self, payload: bytes) -> None:
        state = self.state
        version, pinned, changes = state.version, state.pinned_by, state.changes
        state.on_query_bytes(payload, self.status)
        if self.smap is not None and state.changes != changes and "load" not in state.pins and any(
                sql.lstrip()[:4].lower() == "load" for sql in state.set_statements):
            state.pin("load", "a loaded library stays on its server connection")  # it cannot be unloaded
        mark = self.marks.get(self.role)
        if mark is None:
            pass  # pooled: the borrowed connection's record is brought up to date when it goes back
        elif state.version != version or mark.version != state.version:
            # RESET ALL / DISCARD ALL / DEALLOCATE ALL ran here; other backends are rebuilt when next used.
            mark.version = state.version
            mark.statements = set(state.parse_messages)
            mark.sql_prepared = set(state.sql_prepared)
        else:
            mark.sql_prepared.update(state.sql_prepared)
        if mark is not None:
            mark.sets_applied = len(state.set_statements)
        if state.pinned_by != pinned:
            self._report_pinned()

    def _track_parse(self, payload: bytes) -> None:
        if payload[0]:  # a named statement: kept for replay on other backends
            name = payload[: payload.find(b"\0")].decode("utf-8", "surrogateescape")
            if self.smap is not None:  # pooled: the StatementMap is the record (no copy per session)
                self.state.on_parse(name, payload, status=self.status, keep=False)
            else:
                self.state.on_parse(name, frame(_P, payload), status=self.status)
            mark = self.marks.get(self.role)
            if mark is not None:
                mark.statements.add(name)
        else:  # the unnamed statement: what it sets up counts as done (it is run right away, as a rule)
            self.state.on_parse("", payload, status=self.status)
        if self.state.pinned_by is not None:
            self._report_pinned()
        if self.decider is not None and not self._unit_left:
            # A Parse outside the request's decided unit: learn its role for later Binds.
            self.decider.decide(((_P, payload, 0),), self.env.function_policy(), self.state.dialect)

    def _track_close(self, name_bytes: bytes) -> None:
        name = name_bytes.decode("utf-8", "surrogateescape")
        self.state.on_close_statement(name)
        for role, mark in self.marks.items():
            if role == self.role and self.attached:
                mark.statements.discard(name)
            elif name in mark.statements:
                mark.statements.discard(name)
                mark.pending.append(m.Close("S", name).encode())
        if self.decider is not None:
            self.decider.forget(name_bytes)

    def _report_pinned(self) -> None:
        """Tell the environment when the session becomes pinned, and when it no longer is."""
        now = self.state.pinned_by
        if now != self._pinned_reported:
            if self._pinned_reported is not None:
                self.env.unpinned(self._pinned_reported)
            if now is not None:
                self.env.pinned(now)
            self._pinned_reported = now

    # --- answering by ourselves -------------------------------------------------------------

    def _emulate(self, msgs: list[Msg], i: int, n: int) -> tuple[int, int]:
        """Answer messages from ``msgs[i]`` while the mode lasts; returns (position, index)
        where dispatching goes on (``n`` when everything was consumed)."""
        mode = self.mode
        assert mode is not None
        out = bytearray()
        pos = n
        while i < len(msgs):
            type_, payload, end = msgs[i]
            answer, over, to_backend = mode.answer(type_, payload)
            out += answer
            if over:
                self.mode = None
                self.status = "I"
                pos = _start(msgs[i]) if to_backend else end
                if not to_backend:
                    i += 1
                break
            i += 1
        if out:
            self._actions.append(ToClient(bytes(out)))
        return pos, i

    # --- server bytes -----------------------------------------------------------------------

    def server_data(self, data: Buffer) -> int:
        if self._lost:
            return ATTEND  # nothing after a FATAL matters
        msgs = self._sscan.scan(data)
        flushed, self._awaiting_flush = self._awaiting_flush, False
        if self.inflight:
            self._answered = True
        if not msgs:
            return FORWARD
        idle_now = False
        strip: tuple[int, int] | None = None
        smap = self.smap
        if smap is not None:
            # The ledger first, for the whole chunk: nothing below reads it before the loop ends,
            # and a FATAL below ends it anyway (_lose).
            smap.server_messages(msgs)
        for type_, payload, end in msgs:
            if type_ == _Z:
                if payload:
                    self.status = chr(payload[0])
                self._copy_in = False
                if self.inflight:
                    self.inflight -= 1
                    if not self.inflight:
                        self._request_ends()
                        idle_now = True
                        if self._gated and self.status == "I":
                            self._gated = False
                            self.env.writer_end()
                        if self._swallow:
                            self._swallow -= 1
                            strip = (end - 6, end)  # the answer to our own Sync
            elif type_ == _S:
                name, _, rest = payload.partition(b"\0")
                key, value = name.decode("utf-8", "replace"), rest.rstrip(b"\0").decode("utf-8", "replace")
                if self.smap is not None:
                    self.client_params = {**self.client_params, key: value}  # pooled: a shared dict until now
                else:
                    self.client_params[key] = value
                self.state.on_parameter(key, value)  # standard_conforming_strings, client_encoding: how SQL lexes
                if self._conn_params is not None:
                    self._conn_params[key] = value
            elif type_ == _G:
                self._copy_in = True
            elif type_ == _W:
                if self.state.pinned_by is None:
                    self.state.pin("COPY BOTH (replication)")
                    self._report_pinned()
            elif type_ == _E and is_fatal(payload):
                start = end - 5 - len(payload)
                if start > 0:
                    self._actions.append(ToClient(bytes(data[:start])))
                else:
                    self._awaiting_flush = flushed  # a FATAL is no answer to what the client waits for
                # Held back until the verdict; if it began in an earlier read, its first bytes
                # went to the client already, and only its rest can follow them.
                self._fatal = bytes(data[max(start, 0):end])
                self._fatal_begun = start < 0
                self._lose()
                return ATTEND
        give_back = smap is not None and idle_now and self._releasable()
        if strip is not None:
            data = bytes(data[: strip[0]]) + bytes(data[strip[1]:])
            if not (idle_now and self._held is not None) and not give_back:
                self._actions.append(ToClient(data))
                return ATTEND
        if smap is not None and (give_back or (self._held is not None and self._hold_reason == _DRAIN
                                               and smap.drained)):
            if give_back and strip is None and not self._actions:
                self._give_back()
                return FORWARD_FIRST  # (the answer as it came, no copy; then the Release)
            self._actions.append(ToClient(bytes(data)))
            if give_back:
                self._give_back()
            else:
                self._release()  # every answer owed came: ours can follow now
            return ATTEND
        if idle_now and ((self._held is not None and self._hold_reason == _IDLE) or (self.draining and self.idle)):
            self._actions.append(ToClient(bytes(data)))
            if self._held is not None:
                self._release()
            else:
                self._shutdown()
            return ATTEND
        return FORWARD

    def server_eof(self) -> None:
        if not self._lost:
            self._fatal = None
            self._lose()

    def _request_ends(self) -> None:
        self._retry = None
        if self._busy_on is not None:
            self.env.request_ended(self._busy_on)
            self._busy_on = None

    def _ungate(self) -> None:
        if self._gated:
            self._gated = False
            self.env.writer_end()

    def _lose(self) -> None:
        self._lost = True
        if self.smap is not None:
            self.smap.detached()
        assert self.instance is not None
        self._actions.append(Lost(self.instance))

    # --- transaction pooling ------------------------------------------------------------------

    def _releasable(self) -> bool:
        """Pooled: may the borrowed backend go back now? Nothing owed, nothing open, no state
        that lives only there."""
        smap = self.smap
        return (smap is not None and self.attached and smap.drained and self.inflight == 0 and self.status == "I"
                and not self.batch_open and not self.in_unit and not self._copy_in and self._held is None
                and self.state.pinned_by is None and self.mode is None and self._attaching is None
                and not self._lost and not self.closing and not self._awaiting_flush)

    def _give_back(self) -> None:
        """Pooled: the borrowed backend goes back to its pool, with what it now carries."""
        smap = self.smap
        assert smap is not None
        mark = smap.mark
        cleanup = b""
        if mark is not None:
            state = self.state
            version, changes, dropped = self._borrowed_version, self._borrowed_changes, self._borrowed_dropped
            if state.statements_dropped != dropped:
                mark.statements.clear()  # DISCARD ALL / DEALLOCATE ALL ran there: every name is gone
            if state.version != version:
                mark.settings = None  # RESET ALL or DISCARD ALL: rebuilt by the next borrower
            elif state.changes != changes:
                mark.settings = self._settings()
            if state.changes != changes or state.statements_dropped != dropped:
                mark.sql_prepared = dict(state.sql_prepared) if state.sql_prepared else _NO_SQL
            mark.owner = self
            mark.stamp_version, mark.stamp_changes = state.version, state.changes
            evicted = mark.evict(self.max_prepared)
            if evicted:
                cleanup = b"".join(m.Close("S", name.decode()).encode() for name in evicted) + _SYNC
        smap.detached()
        self._actions.append(Release(cleanup, 1) if cleanup else _RELEASE)
        self.attached = False
        self.instance = None
        self._conn_params = None

    def release_now(self) -> None:
        """Pooled: give the borrowed backend back now if nothing needs it (after the login)."""
        if self._releasable():
            self._give_back()

    def _settings(self) -> dict[str, str]:
        """The settings this session wants on its server (cached until its state changes)."""
        state = self.state
        cached = self._desired
        if cached is not None and self._desired_version == state.version and self._desired_changes == state.changes:
            return cached
        settings = self._desired = desired_settings(self._startup, state)
        self._desired_version, self._desired_changes = state.version, state.changes
        return settings

    def pooled_plan(self, mark: PooledMark) -> ReplayPlan:
        """Pooled: what to send a borrowed backend before this session's request there: the
        difference between its settings and SQL prepared statements and the session's (nothing,
        usually). Each statement is its own Query, so one failure spoils no other."""
        state = self.state
        if mark.owner is self and mark.stamp_version == state.version and mark.stamp_changes == state.changes:
            return _NOTHING_TO_REPLAY
        settings = self._settings()
        if not state.sql_prepared and not mark.sql_prepared and (mark.settings is settings
                                                                 or mark.settings == settings):
            return _NOTHING_TO_REPLAY  # another session's, in the same state (the usual case)
        sqls = diff_statements(mark.settings, settings)
        for name, text in mark.sql_prepared.items():
            if state.sql_prepared.get(name) != text:
                sqls.append('DEALLOCATE "' + name.replace('"', '""') + '"')
        sqls += [text for name, text in state.sql_prepared.items() if mark.sql_prepared.get(name) != text]
        return ReplayPlan(b"".join(m.Query(q).encode() for q in sqls), len(sqls))

    def prepared(self, results: Sequence[tuple[bytes, bool]], error: bytes = b"") -> None:
        """Pooled: the statements of PrepareStatements were prepared on the borrowed backend; or
        the server refused one with ``error`` (its ErrorResponse): the client gets it in place of
        the answer to its message, and the server skips the rest up to the client's Sync."""
        smap = self.smap
        assert smap is not None
        for name, ok in results:
            smap.prepared(name, ok)
        if error:
            self._actions.append(ToClient(error))
            smap.skipping = True
        if self._held is not None:
            self._release()

    # --- what the shell reports -------------------------------------------------------------

    def replay_plan(self, role: str, fresh: bool) -> ReplayPlan:
        """What to send a backend of ``role`` (``fresh``: just opened) before the client's next
        request there: the Close messages it owes, then what it lacks of the SET/PREPARE
        statements and named prepared statements (each Parse with its own Sync, so one
        failure spoils no other)."""
        state = self.state
        mark = self.marks.get(role) if not fresh else None
        sqls: list[str] = []
        pending = b""
        if mark is None:
            mark = BackendMark(state.version)
        elif mark.version != state.version:
            sqls.append("DISCARD ALL")
            mark = BackendMark(state.version)
        else:
            pending = b"".join(mark.pending)
        sqls += state.set_statements[mark.sets_applied:]
        sqls += [text for name, text in state.sql_prepared.items() if name not in mark.sql_prepared]
        parses = [raw for name, raw in state.parse_messages.items() if name not in mark.statements]
        sync = m.Sync().encode()
        batch = (pending + sync if pending else b"") + b"".join(m.Query(q).encode() for q in sqls)
        batch += b"".join(p + sync for p in parses)
        return ReplayPlan(batch, (1 if pending else 0) + len(sqls) + len(parses))

    def attached_backend(self, facts: BackendFacts, *, mark: PooledMark | None = None,
                         conn_params: dict[str, str] | None = None) -> None:
        """The Attach under way succeeded (the backend was brought up to date by replay_plan; pooled:
        a borrowed one, by pooled_plan, whose record is ``mark`` and ParameterStatus values ``conn_params``)."""
        role = self._attaching or self.role
        self._attaching = None
        self.role = role
        self.attached = True
        self.instance = facts.instance
        self.in_recovery = facts.in_recovery
        self.status = facts.status
        self._checked_generation = self.env.generation
        state = self.state
        if self.smap is not None:
            assert mark is not None
            self.smap.mark = mark
            self._conn_params = conn_params
            mark.settings = self._settings()
            mark.sql_prepared = dict(state.sql_prepared) if state.sql_prepared or mark.sql_prepared else _NO_SQL
            mark.owner, mark.stamp_version, mark.stamp_changes = self, state.version, state.changes
            self._borrowed_version, self._borrowed_changes = state.version, state.changes
            self._borrowed_dropped = state.statements_dropped
        else:
            self.marks[role] = BackendMark(state.version, len(state.set_statements), set(state.parse_messages),
                                           set(state.sql_prepared))
        # Pooled: the borrowed connection's own record (``facts`` carries none).
        parameters = conn_params.items() if conn_params is not None else facts.parameters
        if conn_params is not None and conn_params == self.client_params:
            changed = b""  # a connection that says what the client was told (the usual case)
        else:
            changed = b"".join(m.ParameterStatus(k, v).encode() for k, v in parameters
                               if self.client_params.get(k) != v)
        if changed:
            if self.smap is not None:
                self.client_params = shared({**self.client_params, **dict(parameters)})
            else:
                self.client_params.update(facts.parameters)
            self._actions.append(ToClient(changed))
        if self._resend is not None:
            request, self._resend = self._resend, None
            self._busy_on = facts.instance
            self.env.request_started(facts.instance, facts.in_recovery)
            self._actions.append(ToServer(request))
        if self._held is not None:
            if self.readwrite:
                self._pending_role = role  # decided already: the held request runs here
            self._release()

    def attach_failed(self, error: AttachError) -> None:
        """No backend could be had: the request waiting for one fails; the session stays usable."""
        self._attaching = None
        self._pending_role = None
        if error.kind != "busy":  # (a pool's borrow timeout is counted by the pool)
            self.env.error("no_route" if error.kind == "no_route" else "backend_failed")
        if self._resend is not None:
            self._resend = None
            self._fail_in_flight(in_transaction=False)
        mode = Emulation("error", error.code, error.message)
        if self._held is None:
            # Nothing is waiting (a retry that failed): nothing to answer.
            return
        self.mode = mode
        self._release()

    def verdict(self, same_role_up: bool) -> None:
        """The monitor's verdict on the instance of the lost backend."""
        self._lost = False
        self._ungate()  # whatever happened to it, no writer work of ours runs there any more
        lost_instance = self.instance
        self.attached = False
        self.instance = None
        self.marks.pop(self.role, None)
        in_tx = (self._request_status if self.inflight else self.status) in ("T", "E")
        # A batch that ended with Flush (asyncpg's Parse/Describe/Flush) and got no answer yet:
        # the client waits for one, like a request in flight.
        waiting = self._awaiting_flush and not self.inflight
        self._awaiting_flush = False
        facts = LossFacts(pinned=self.state.pinned_by, in_flight=self.inflight, in_transaction=in_tx,
                          retryable=self._retry is not None and not self._answered,
                          partial=self.in_unit or waiting)
        outcome = self.loss_outcome = on_loss(facts, same_role_up=same_role_up)
        fatal, self._fatal = self._fatal, None
        if not self._sscan.at_boundary or self._fatal_begun:
            # The server's stream broke inside a message whose first bytes went to the client:
            # nothing but its rest can follow them. Close, as the crash would.
            self._request_ends()
            self.closing = True
            if fatal and self._fatal_begun:
                self._actions.append(ToClient(fatal))
            self._fatal_begun = False
            self._actions.append(Close())
        elif outcome is LossOutcome.PASS_THROUGH:
            self._request_ends()
            self.closing = True
            if fatal:
                self._actions.append(ToClient(fatal))
            self._actions.append(Close())
        elif outcome is LossOutcome.CANNOT_MOVE:
            self._request_ends()
            self.closing = True
            self._actions.append(ToClient(m.error_response(
                "FATAL", "08006", "the server connection was lost and the session's "
                f"{self.state.pinned_by} cannot be moved to another server")))
            self._actions.append(Close())
        elif outcome is LossOutcome.RETRY:
            assert self._retry is not None and lost_instance is not None
            self._resend = bytes(self._retry)
            self._request_ends()
            self._attach(self.role, "retry a read", frozenset((lost_instance,)))
        elif outcome is LossOutcome.REATTACH_LATER:
            self.status = "I"
        else:
            in_tx = outcome is LossOutcome.FAIL_TRANSACTION
            if self.inflight:
                self._fail_in_flight(in_transaction=in_tx)
            if waiting:
                # Answer the flushed batch now; the rest of it is skipped up to its Sync.
                self._actions.append(ToClient(m.error_response("ERROR", "08007", TX_LOST if in_tx else STATEMENT_LOST)))
                self.env.error("transaction_lost" if in_tx else "statement_lost")
                self.mode = Emulation("failed_tx" if in_tx else "error", "08007", TX_LOST if in_tx else STATEMENT_LOST,
                                      reported=True, skipping=True)
            elif in_tx:
                self.mode = Emulation("failed_tx", "08007", TX_LOST, reported=facts.in_flight > 0)
            elif self.in_unit:
                self.mode = Emulation("error", "08007", STATEMENT_LOST)
            self.in_unit = False
            self.status = "I"

    def _fail_in_flight(self, *, in_transaction: bool) -> None:
        status = "E" if in_transaction else "I"
        message = TX_LOST if in_transaction else STATEMENT_LOST
        answer = m.error_response("ERROR", "08007", message) + m.ReadyForQuery(status).encode()
        self._actions.append(ToClient(answer * self.inflight))
        self.env.error("transaction_lost" if in_transaction else "statement_lost")
        self.inflight = 0
        self._request_ends()

    def caught_up(self, ok: bool) -> None:
        """Session consistency: whether the reader has what this session wrote."""
        if ok:
            self.wrote = False
            self._attach(READER, "readwrite")
        else:
            self._attach(WRITER, "reader behind the session's writes")

    def end(self) -> None:
        """The session is over: stop counting a request still in flight, or it as pinned."""
        self._request_ends()
        self._ungate()
        if self._pinned_reported is not None:
            self.env.unpinned(self._pinned_reported)
            self._pinned_reported = None

    def gate_opened(self) -> None:
        """The writer gate is open again: the held request goes on (its boundary is decided
        again: the writer may have changed meanwhile)."""
        self._attaching = None
        if self.readwrite:
            self._pending_role = self.role
        if self._held is not None:
            self._release()

    def expire(self, sqlstate: str, message: str) -> None:
        """End the session now with a FATAL error (a timeout of the janitor's)."""
        if self.closing:
            return
        self.closing = True
        self._actions.append(ToClient(m.error_response("FATAL", sqlstate, message)))
        self._actions.append(Close())

    def drain(self) -> bool:
        """Graceful shutdown: close at the next idle point. True if there are actions to run now."""
        self.draining = True
        if self.idle and not self.closing:
            self._shutdown()
            return True
        return False


# Boundary decisions.
_GO, _HOLD, _EMULATE, _DROP = range(4)
# What held bytes wait for: the rest of a flush unit; the requests in flight to be answered; a backend.
_UNIT, _IDLE, _BACKEND = range(3)
# Pooled: held until the server answered everything sent before (_DRAIN), or until statements are
# prepared on the borrowed connection (_PREPARE).
_DRAIN, _PREPARE = 3, 4
_GATE = "gate"  # what _attaching holds while the session waits at the writer gate


def parameters_of(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    return dict(params)
