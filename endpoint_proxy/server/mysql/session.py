"""A MySQL/MariaDB client session: login, the first backend, then the core's actions over the relay.

The decisions are ``sessioncore.mysql.MySessionCore``'s; this shell greets and authenticates
the client, opens and replays backends, runs KILL and COM_CHANGE_USER, asks the monitor for
verdicts, and moves bytes (``SessionShell``).
"""

from __future__ import annotations

import socket
import ssl

import structlog
import trio

from ...config import UserConfig
from ...protocol.errors import ProtocolError
from ...protocol.mysql import commands as c
from ...protocol.mysql import constants as k
from ...protocol.mysql.errors import MySQLProtocolError
from ...protocol.mysql.framing import PacketReader, encode_packet, read_row_value
from ...protocol.mysql.packets import OkPacket, err_packet
from ...protocol.mysql.response import ResponseTracker
from ...relay.net import Conn, RawConn, send_quietly
from ...sessioncore.actions import (
    MAIN,
    READER,
    WRITER,
    Attach,
    AttachError,
    BackendFacts,
    CatchUp,
    Detach,
    Lost,
)
from ...sessioncore.mysql import ChangeUser, DropParked, Kill, MySessionCore, Prepare
from ..session.backends import BackendSet
from ..session.context import SessionContext
from ..session.env import SessionEnv
from ..session.info import SessionInfo, session_state
from ..session.shell import NETWORK_ERRORS, SessionShell
from .backend import (
    MyBackendConnection,
    MyBackendError,
    MyGreeting,
    MyProbeConnection,
    greet_my_backend,
    login_my_backend,
)
from .login import PER_LEG, Fatal, MyLogin, change_user, login

log = structlog.get_logger("endpoint_proxy.mysql")

_QUIT = encode_packet(0, bytes((c.COM_QUIT,)))
ER_NO_ROUTE = 1105


class NoRoute(Exception):
    pass


class MySession(SessionShell):
    core: MySessionCore

    def __init__(self, ctx: SessionContext, sock: socket.socket | Conn, session_id: int) -> None:
        super().__init__(ctx.hub)
        self.ctx = ctx
        self.peer: str | None = None
        if isinstance(sock, Conn):
            self.client: Conn = sock  # a transport of a test's in-memory network
        else:
            self.client = RawConn(sock)
            try:
                host, port = sock.getpeername()[:2]
                self.peer = f"{host}:{port}"
            except OSError:
                pass
        self.connection_id = 1_000_000_000 + session_id  # until a server's thread id is known
        self.log = log.bind(conn=session_id, endpoint=ctx.endpoint.name)
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self.scope = trio.CancelScope()  # the proxy runs the session inside it
        self.draining = False
        self.user: UserConfig | None = None
        self.login: MyLogin | None = None
        self.backends: BackendSet[MyBackendConnection] = BackendSet(ctx.cluster)
        self.env = SessionEnv(ctx.cluster, ctx.endpoint, self.metrics)
        self._core: MySessionCore | None = None

    # --- what the proxy asks of a session -----------------------------------------------------

    def idle(self) -> bool:
        return self._core is not None and self._core.idle

    def drain(self) -> None:
        self.draining = True
        if self._core is not None and self._core.drain():
            self.wake()

    def session_info(self) -> SessionInfo:
        core = self._core
        backend = self.backends.active
        transaction = "I"
        if core is not None:
            transaction = "E" if core.failed_tx else ("T" if core.in_transaction else "I")
        return SessionInfo(
            cluster=self.ctx.cluster.config.name, endpoint=self.ctx.endpoint.name, id=self.connection_id,
            user=self.user.name if self.user is not None else None,
            database=core.state.schema if core is not None else None,
            instance=backend.instance if backend is not None else None,
            state=session_state(logged_in=core is not None, busy=core is not None and core.busy,
                                transaction=transaction),
            client=self.peer)

    def backend_conn(self) -> Conn | None:
        backend = self.backends.active
        return backend.conn if backend is not None else None

    def current_thread(self) -> tuple[str, int] | None:
        """(instance, server thread id) of the active backend: what a KILL of this session hits."""
        backend = self.backends.active
        return (backend.instance, backend.thread_id) if backend is not None else None

    # --- the session ---------------------------------------------------------------------------

    async def run(self) -> None:
        cluster = self.ctx.cluster
        err_seq = 0
        greeting: MyGreeting | None = None
        try:
            with trio.move_on_after(self.ctx.startup_timeout_s) as scope:
                greeting = await self._greet_first()
                if greeting is not None:
                    self.connection_id = greeting.hello.connection_id
                cluster.mysql_sessions[self.connection_id] = self
                result = await login(self.ctx, self, self.log, connection_id=self.connection_id,
                                     server_version=greeting.hello.server_version if greeting else None)
            if scope.cancelled_caught:
                cluster.metrics.error("startup_timeout")
                return
            self.login, self.user = result, result.user
            err_seq = result.ok_seq
            await self._attach_first(result, greeting)
            greeting = None
            await self.relay()
        except Fatal as e:
            cluster.metrics.error("auth_failed" if e.errno == 1045 else "session_fatal")
            await send_quietly(self.client, e.raw or encode_packet(e.seq or err_seq,
                                                                   err_packet(e.errno, e.sqlstate, str(e))))
        except MySQLProtocolError as e:
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message)
            await send_quietly(self.client, encode_packet(err_seq, err_packet(e.errno, e.sqlstate, e.message)))
        except ProtocolError as e:
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message)
        except NETWORK_ERRORS:
            pass
        finally:
            if greeting is not None and not greeting.conn.closed:
                await greeting.conn.aclose()  # greeted for a login that never came
            await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            self.ctx.cluster.mysql_sessions.pop(self.connection_id, None)
            if self._core is not None:
                self._core.end()
            await self.backends.close_all(_QUIT)
            await self.client.aclose()

    async def _greet_first(self) -> MyGreeting | None:
        """The first backend's greeting, if one can be had now: its thread id is the client's."""
        cluster = self.ctx.cluster
        role = WRITER if self.ctx.endpoint.kind == "readwrite" else MAIN
        decision = cluster.route(self.env.rule(role))
        if decision.instance is None:
            return None
        try:
            with trio.fail_after(self.ctx.connect_timeout_s):
                return await greet_my_backend(cluster.config.instance_named(decision.instance).address,
                                              dial=self.ctx.dial)
        except (MyBackendError, OSError, trio.TooSlowError, trio.BrokenResourceError):
            return None

    async def _attach_first(self, result: MyLogin, greeting: MyGreeting | None) -> None:
        ctx = self.ctx
        cluster = ctx.cluster
        readwrite = ctx.endpoint.kind == "readwrite"
        role = WRITER if readwrite else MAIN
        backend: MyBackendConnection | None = None
        if greeting is not None:
            name = self._instance_at(greeting)
            try:
                with trio.fail_after(ctx.connect_timeout_s):
                    backend = await self._login_backend(name, greeting, result.schema)
            except MyBackendError as e:
                if e.err_payload is not None and e.errno != 1043:
                    raw = encode_packet(result.ok_seq, e.err_payload)
                    raise Fatal(e.errno, e.sqlstate, e.message, raw=raw) from None
                backend = None  # the greeted connection went away meanwhile: open another
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError):
                backend = None
        if backend is None:
            try:
                backend = await self._open(role, cluster.config.failover_timeout_ms / 1000, schema=result.schema)
            except NoRoute as e:
                raise Fatal(ER_NO_ROUTE, "HY000", str(e), seq=result.ok_seq) from None
            except MyBackendError as e:
                refusal = encode_packet(result.ok_seq, e.err_payload) if e.err_payload else None
                raise Fatal(e.errno, e.sqlstate, e.message, seq=result.ok_seq, raw=refusal) from None
        self.backends.activate(role, backend)
        self._core = self.core = MySessionCore(
            self.env, self._facts(backend), capabilities=result.capabilities, status=backend.status,
            readwrite=readwrite, session_consistency=ctx.endpoint.consistency == "session",
            max_payload=ctx.max_message_bytes, allow_local_infile=cluster.config.allow_local_infile,
            schema=result.schema)
        if self.draining:
            self.core.drain()
        ok = OkPacket(status=backend.status or k.SERVER_STATUS_AUTOCOMMIT)
        await self.client.send_all(encode_packet(result.ok_seq, ok.encode(result.capabilities)))
        self.log.debug("session_attached", instance=backend.instance, thread=backend.thread_id)

    def _instance_at(self, greeting: MyGreeting) -> str:
        for inst in self.ctx.cluster.config.instances:
            if inst.address == greeting.address:
                return inst.name
        raise MyBackendError("the greeted instance left the configuration")

    @staticmethod
    def _facts(backend: MyBackendConnection) -> BackendFacts:
        return BackendFacts(backend.instance, backend.in_recovery)

    # --- backends ------------------------------------------------------------------------------

    async def _login_backend(self, name: str, greeting: MyGreeting, schema: str | None) -> MyBackendConnection:
        assert self.login is not None and self.user is not None
        cluster = self.ctx.cluster
        backend = await login_my_backend(
            name, greeting, user=self.user.name, database=schema,
            capabilities=(self.login.capabilities & ~PER_LEG) | k.CLIENT_CONNECT_WITH_DB,
            character_set=self.login.character_set, connect_attrs=self.login.attrs,
            credential=cluster.my_backend_credential(self.user.name, self.login.stage1),
            security=cluster.backend_security)
        backend.in_recovery = bool(cluster.topology.instances[name].in_recovery)
        return self.backends.count(backend)

    async def _open(self, role: str, timeout_s: float, exclude: frozenset[str] = frozenset(), *,
                    schema: str | None, held: bool = False) -> MyBackendConnection:
        """Route, connect and log in. Raises NoRoute, or MyBackendError with ``err_payload`` when
        the server refused the login (its ERR goes to the client)."""
        cluster = self.ctx.cluster
        rule = self.env.rule(role)
        attempts: dict[str, int] = {}
        deadline = trio.current_time() + timeout_s
        while True:
            decision = await cluster.wait_for_route(rule, max(0.0, deadline - trio.current_time()), held=held,
                                                    exclude=exclude)
            name = decision.instance
            if name is None or attempts.get(name, 0) >= 2:
                raise NoRoute(f"endpoint {self.ctx.endpoint.name}: {decision.reason or 'no instance is available'}")
            attempts[name] = attempts.get(name, 0) + 1
            try:
                with trio.fail_after(self.ctx.connect_timeout_s):
                    greeting = await greet_my_backend(cluster.config.instance_named(name).address, name,
                                                      dial=self.ctx.dial)
                    return await self._login_backend(name, greeting, schema)
            except MyBackendError as e:
                if e.err_payload is not None:
                    raise
                error = e.message
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
                error = str(e) or "connect timed out"
            cluster.backend_failed(name, error)
            if not (await cluster.verdict(name)).up:
                exclude = exclude | {name}

    async def handle(self, action: object) -> None:
        if isinstance(action, Attach):
            await self._attach(action)
        elif isinstance(action, Detach):
            if action.park:
                self.backends.park()
            else:
                await self.backends.close(self.backends.release_active(), _QUIT)
        elif isinstance(action, Lost):
            await self._lost(action.instance)
        elif isinstance(action, Prepare):
            await self._prepare(action)
        elif isinstance(action, Kill):
            await self._kill(action)
        elif isinstance(action, ChangeUser):
            await self._change_user(action.payload)
        elif isinstance(action, DropParked):
            for role in list(self.backends.parked):
                await self.backends.close(self.backends.take_parked(role), _QUIT)
        elif isinstance(action, CatchUp):
            self.core.caught_up(await self._caught_up())

    async def _lost(self, instance: str) -> None:
        backend = self.backends.release_active()
        await self.backends.close(backend)
        was_writer = backend is not None and not backend.in_recovery
        self.ctx.cluster.backend_failed(instance, "session backend connection lost")
        verdict = await self.ctx.cluster.verdict(instance)
        self.core.verdict(verdict.same_role(was_writer))
        outcome = self.core.loss_outcome
        self.log.info("session_backend_lost", instance=instance, outcome=outcome.value if outcome else None)

    async def _attach(self, action: Attach) -> None:
        core, role = self.core, action.role
        cluster = self.ctx.cluster
        backend = self.backends.take_parked(role)
        if backend is not None:
            if backend.conn.peer_closed() or not self.env.placement_ok(role, backend.instance):
                await self.backends.close(backend, _QUIT)
                backend = None
            else:
                try:
                    await self._replay(backend, role, fresh=False)
                except (*NETWORK_ERRORS, MyBackendError, MySQLProtocolError):
                    await self.backends.close(backend)
                    backend = None
        if backend is None:
            timeout = cluster.config.failover_timeout_ms / 1000
            try:
                backend = await self._open(role, timeout, action.exclude, schema=core.state.schema, held=True)
                await self._replay(backend, role, fresh=True)
            except NoRoute as e:
                core.attach_failed(AttachError("no_route", str(ER_NO_ROUTE), f"{e} (waited {timeout * 1000:.0f} ms)"))
                return
            except MyBackendError as e:
                core.attach_failed(AttachError("refused" if e.err_payload else "failed", str(e.errno), e.message,
                                               e.err_payload))
                return
            except (*NETWORK_ERRORS, MySQLProtocolError) as e:
                if backend is not None:
                    await self.backends.close(backend)
                core.attach_failed(AttachError("failed", "2013", f"could not re-attach the session: {e}"))
                return
            if action.reason != "readwrite":
                self.log.info("session_reattached", instance=backend.instance, thread=backend.thread_id,
                              reason=action.reason)
        self.backends.activate(role, backend)
        core.attached_backend(self._facts(backend), status=backend.status)

    async def _replay(self, backend: MyBackendConnection, role: str, *, fresh: bool) -> None:
        for command in self.core.replay_plan(role, fresh, schema_known=self.core.state.schema if fresh else None):
            if command[0] == c.COM_STMT_CLOSE:
                await backend.conn.send_all(encode_packet(0, command))  # no answer
                continue
            tracker, _ = await self._exchange(backend, command)
            if tracker.error is not None:
                self.log.info("session_replay_error", errno=tracker.error.errno, error=tracker.error.message)

    async def _exchange(self, backend: MyBackendConnection, command: bytes) -> tuple[ResponseTracker, bytes]:
        """Run one command of our own on an idle backend; returns its tracker and the raw response."""
        tracker = ResponseTracker(command[0], backend.capabilities)
        await backend.conn.send_all(encode_packet(0, command))
        raw = bytearray()
        reader = PacketReader()
        buf = bytearray(8192)
        while not tracker.done:
            n = await backend.conn.recv_into(buf)
            if n == 0:
                raise ConnectionResetError("the server closed the connection")
            reader.feed(memoryview(buf)[:n])
            while not tracker.done and (packet := reader.next_packet()) is not None:
                seq, payload = packet
                tracker.feed(payload)
                raw += encode_packet(seq, payload)
        if tracker.status is not None:
            backend.status = tracker.status
        return tracker, bytes(raw)

    async def _prepare(self, action: Prepare) -> None:
        backend = self.backends.active
        backend_id = None
        if backend is not None:
            try:
                tracker, _ = await self._exchange(
                    backend, bytes((c.COM_STMT_PREPARE,)) + action.sql.encode("utf-8", "surrogateescape"))
                if tracker.prepare_ok is not None:
                    backend_id = tracker.prepare_ok.statement_id
            except (*NETWORK_ERRORS, MySQLProtocolError):
                self.core.prepared(action.client_id, None)
                self.core.server_eof()
                return
        self.core.prepared(action.client_id, backend_id)

    async def _kill(self, action: Kill) -> None:
        """KILL [QUERY|CONNECTION] n: n is the id a client saw (its handshake's, CONNECTION_ID()).
        It is mapped to where that session runs now, and the server decides whether this user
        may kill it (1095 otherwise), as it would directly."""
        cluster = self.ctx.cluster
        target = action.target
        session = cluster.mysql_sessions.get(target)
        where = session.current_thread() if isinstance(session, MySession) else None
        if session is not None and where is None:
            # That session has no server connection right now: nothing runs to be killed.
            if action.what == "CONNECTION" and isinstance(session, MySession):
                session.core.closing = True
                session.wake_close()
            self.core.reply_ok(action.seq - 1)
            return
        instance, thread = where if where is not None else (self.backends.active.instance
                                                           if self.backends.active else None, target)
        sql = f"KILL {action.what} {int(thread)}"
        answer = await self._run_as_user(instance, sql, action.seq)
        await self._send_client(answer)

    def wake_close(self) -> None:
        self.closed = True
        self.wake()

    async def _run_as_user(self, instance: str | None, sql: str, seq: int) -> bytes:
        """Run a statement as this session's user on ``instance`` and return the answer for the
        client (OK or the server's ERR) at sequence ``seq``."""
        assert self.user is not None and self.login is not None
        if instance is None:
            return encode_packet(seq, err_packet(ER_NO_ROUTE, "HY000", "no instance is available"))
        active = self.backends.active
        try:
            if active is not None and active.instance == instance:
                tracker, raw = await self._exchange(active, bytes((c.COM_QUERY,)) + sql.encode())
                if tracker.error is not None:
                    return encode_packet(seq, err_packet(tracker.error.errno, tracker.error.sqlstate,
                                                         tracker.error.message))
                return encode_packet(seq, OkPacket(status=active.status).encode(self.login.capabilities))
            cluster = self.ctx.cluster
            with trio.fail_after(self.ctx.connect_timeout_s):
                probe = await MyProbeConnection.open(
                    instance, cluster.config.instance_named(instance).address, user=self.user.name, password=None,
                    credential=cluster.my_backend_credential(self.user.name, self.login.stage1),
                    security=cluster.backend_security)
            try:
                await probe.query(sql)
            finally:
                with trio.CancelScope(shield=True):
                    await probe.aclose()
        except MyBackendError as e:
            if e.err_payload is not None:
                return encode_packet(seq, e.err_payload)
            return encode_packet(seq, err_packet(1094, "HY000", f"{sql}: {e.message}"))
        except (*NETWORK_ERRORS, trio.TooSlowError) as e:
            return encode_packet(seq, err_packet(1094, "HY000", f"{sql}: {e}"))
        status = self.core.status if self._core is not None else k.SERVER_STATUS_AUTOCOMMIT
        return encode_packet(seq, OkPacket(status=status).encode(self.login.capabilities))

    async def _send_client(self, data: bytes) -> None:
        try:
            await self.client.send_all(data)
        except NETWORK_ERRORS:
            self.closed = True

    async def _change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER: authenticate the new user, then start the session over on a backend
        logged in as that user."""
        assert self.login is not None
        try:
            request, user, seq, stage1 = await change_user(self.ctx, self.client, payload,
                                                           self.login.capabilities, self.login.nonce, self.log)
        except Fatal as e:
            await send_quietly(self.client, encode_packet(e.seq, err_packet(e.errno, e.sqlstate, str(e))))
            self.closed = True
            return
        await self.backends.close_all(_QUIT)
        self.user = user
        self.login.stage1 = stage1
        if request.character_set:
            self.login.character_set = request.character_set
        if request.connect_attrs is not None:
            self.login.attrs = request.connect_attrs
        core = self.core
        core.user_changed()
        core.state.schema = request.database or None
        core.attached = False
        role = core.role
        try:
            backend = await self._open(role, self.ctx.cluster.config.failover_timeout_ms / 1000,
                                       schema=core.state.schema, held=True)
        except NoRoute as e:
            await self._send_client(encode_packet(seq, err_packet(ER_NO_ROUTE, "HY000", str(e))))
            return
        except MyBackendError as e:
            await self._send_client(encode_packet(seq, e.err_payload or err_packet(e.errno, e.sqlstate, e.message)))
            return
        self.backends.activate(role, backend)
        core.attached_backend(self._facts(backend), status=backend.status, role=role)
        await self._send_client(encode_packet(seq, OkPacket(status=backend.status).encode(self.login.capabilities)))

    async def _caught_up(self) -> bool:
        """Session consistency through GTIDs: the replica waits (MASTER_GTID_WAIT, bounded) for the
        writer's position after this session's writes; False reads on the writer."""
        writer = self.backends.parked.get(WRITER)
        if writer is None:
            return True
        try:
            _, raw = await self._exchange(writer, bytes((c.COM_QUERY,)) + b"SELECT @@gtid_binlog_pos")
            position = _first_text_value(raw)
            reader = self.backends.take_parked(READER)
            if reader is not None and (reader.conn.peer_closed() or not self.env.placement_ok(READER,
                                                                                               reader.instance)):
                await self.backends.close(reader, _QUIT)
                reader = None
            if reader is None:
                reader = await self._open(READER, 0.0, schema=self.core.state.schema)
                self.core.marks.pop(READER, None)
            self.backends.parked[READER] = reader
            if not reader.in_recovery:
                return True
            wait_s = self.ctx.endpoint.session_wait_ms / 1000
            query = f"SELECT MASTER_GTID_WAIT('{position}', {wait_s:.3f})"
            _, raw = await self._exchange(reader, bytes((c.COM_QUERY,)) + query.encode())
            return _first_text_value(raw) == "0"
        except (NoRoute, MyBackendError, MySQLProtocolError, *NETWORK_ERRORS):
            return False


def _first_text_value(raw: bytes) -> str | None:
    """The first column of the first row of a raw text result (column count, definitions, row)."""
    reader = PacketReader()
    reader.feed(raw)
    packets = []
    while (p := reader.next_packet()) is not None:
        packets.append(p[1])
    for payload in packets[2:]:
        if payload and payload[0] in (0xFE, 0xFF) and len(payload) < 9:
            continue
        value, _ = read_row_value(payload, 0)
        return None if value is None else value.decode()
    return None
