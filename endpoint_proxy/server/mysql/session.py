"""A MySQL/MariaDB client session: handshake, authentication, routing, the relay and failover.

MySQL is strictly request/response (the server never speaks unasked), so one task per
session alternates: read a command from the client, pick (or keep) a backend, forward the
command, relay the response until the ResponseTracker says it is complete. Headers only:
rows and column definitions are skipped by the scanner, never decoded.

Failover follows DESIGN.md: an idle session whose backend died is re-attached at its next
command with its state replayed (schema, SET statements and user variables, character
set; prepared statements are re-prepared on demand under the same client-visible ids); a
command arriving while no writer is known waits up to failover_timeout_ms; a transaction
whose server died gets errno 1927 with SQLSTATE 08007 (transaction resolution unknown)
until the client rolls back; a read outside a transaction is retried elsewhere.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from ...config import EndpointConfig, UserConfig
from ...protocol.errors import ProtocolError
from ...protocol.mysql import commands as c
from ...protocol.mysql import constants as k
from ...protocol.mysql.auth import (
    CACHING_SHA2_PASSWORD,
    CachingSha2ServerAuth,
    NativePasswordServerAuth,
    ServerAuth,
    make_nonce,
)
from ...protocol.mysql.errors import MySQLAuthenticationError, MySQLProtocolError
from ...protocol.mysql.framing import PacketReader, PacketScanner, encode_packet, read_row_value
from ...protocol.mysql.handshake import HandshakeResponse41, HandshakeV10, SSLRequest, decode_handshake_response
from ...protocol.mysql.packets import OkPacket, err_packet
from ...protocol.mysql.response import ResponseTracker
from ...relay.net import Conn, RawConn, send_quietly, start_tls_server
from ...routing.endpoints import members
from ...routing.my_classify import classify
from ...routing.pg_classify import Route
from ..session.info import SessionInfo, session_state
from .backend import MyBackendConnection, MyBackendError, kill_query, open_my_backend

if TYPE_CHECKING:
    from ..session.context import SessionContext

log = structlog.get_logger("endpoint_proxy.mysql")

RELAY_BUFFER = 64 * 1024
HANDSHAKE_MAX = 64 * 1024
SERVER_VERSION = "5.5.5-10.11.0-MariaDB-endpoint_proxy"

# What the proxy offers its clients; each backend is asked for the same (minus per-leg bits).
OFFERED = (k.CLIENT_LONG_PASSWORD | k.CLIENT_FOUND_ROWS | k.CLIENT_LONG_FLAG | k.CLIENT_CONNECT_WITH_DB
           | k.CLIENT_ODBC | k.CLIENT_IGNORE_SPACE | k.CLIENT_PROTOCOL_41 | k.CLIENT_INTERACTIVE
           | k.CLIENT_IGNORE_SIGPIPE | k.CLIENT_TRANSACTIONS | k.CLIENT_SECURE_CONNECTION
           | k.CLIENT_MULTI_STATEMENTS | k.CLIENT_MULTI_RESULTS | k.CLIENT_PS_MULTI_RESULTS
           | k.CLIENT_PLUGIN_AUTH | k.CLIENT_CONNECT_ATTRS | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
           | k.CLIENT_SESSION_TRACK | k.CLIENT_DEPRECATE_EOF)
PER_LEG = k.CLIENT_SSL | k.CLIENT_CONNECT_WITH_DB | k.CLIENT_CONNECT_ATTRS

ER_TRANSACTION_LOST = 1927  # ER_CONNECTION_KILLED, with SQLSTATE 08007: see the module docstring
ER_NO_ROUTE = 1105
_TX_LOST = ("endpoint_proxy: the server connection was lost during the transaction "
            "(transaction resolution unknown); ROLLBACK to continue")

_KILL = re.compile(r"\A\s*KILL\s+(?:(QUERY|CONNECTION)\s+)?(\d+)\s*;?\s*\Z", re.I)
_USE = re.compile(r"\A\s*USE\s+`?([^`;\s]+)`?\s*;?\s*\Z", re.I)
# Statements that may carry session state (SET, USE, user variables, locks, temporary
# tables, handlers, prepared SQL): only these are classified for tracking.
_MAYBE_STATEFUL = re.compile(r"@|\b(?:set|use|lock|temporary|handler|prepare|deallocate)\b|_lock\s*\(", re.I)
_ROLLBACK = re.compile(r"\A\s*ROLLBACK(\s+WORK)?\s*;?\s*\Z", re.I)
_STMT_COMMANDS = frozenset((c.COM_STMT_EXECUTE, c.COM_STMT_SEND_LONG_DATA, c.COM_STMT_CLOSE, c.COM_STMT_RESET,
                            c.COM_STMT_FETCH))
_PINNING_STATES = frozenset(("temp_table", "named_lock", "lock_tables", "user_variable", "user_variable_read"))
_UNREPLAYABLE_STATES = frozenset(("temp_table", "named_lock", "lock_tables"))
_REPLAYED_STATES = frozenset(("set", "user_variable", "autocommit_off", "autocommit_on"))


class _Lost(Exception):
    """The backend died under a command."""


class _Fatal(Exception):
    def __init__(self, errno: int, sqlstate: str, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.sqlstate = sqlstate
        self.raw = raw


@dataclass
class _Backend:
    """A backend and what of the session it already has."""

    b: MyBackendConnection
    scanner: PacketScanner = field(default_factory=PacketScanner)
    statements: dict[int, int] = field(default_factory=dict)  # client statement id -> backend id
    pending_close: list[int] = field(default_factory=list)  # backend ids the client closed elsewhere
    set_option: bytes | None = None  # the COM_SET_OPTION this backend was last given
    sets_applied: int = 0
    schema: str | None = None


@dataclass
class _Statement:
    sql: str
    role: str
    params: int = 0


class MySession:
    def __init__(self, ctx: SessionContext, sock: socket.socket, session_id: int) -> None:
        self.ctx = ctx
        self.client: Conn = RawConn(sock)
        try:
            host, port = sock.getpeername()[:2]
            self.peer: str | None = f"{host}:{port}"
        except OSError:
            self.peer = None
        self.connection_id = 1_000_000_000 + session_id  # never a server's thread id
        self.log = log.bind(conn=session_id, endpoint=ctx.endpoint.name)
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self.reader = PacketReader(HANDSHAKE_MAX)
        self.buf = bytearray(RELAY_BUFFER)
        self.user: UserConfig
        self.caps = 0
        self.charset: int = k.UTF8MB4_GENERAL_CI
        self.schema: str | None = None
        self.attrs: dict[str, str] | None = None
        self.set_statements: list[str] = []
        self.set_option: bytes | None = None  # the client's last COM_SET_OPTION (multi-statements on/off)
        self.statements: dict[int, _Statement] = {}
        self.next_statement_id = 1
        self.last_statement_id = 0
        self.pinned_by: str | None = None  # readwrite: state only the writer session has
        self.unreplayable: str | None = None  # state a failover would lose (temporary tables, locks)
        self.readwrite = ctx.endpoint.kind == "readwrite"
        self.role = "writer" if self.readwrite else "main"
        self.role_endpoints = {"writer": dataclasses.replace(ctx.endpoint, kind="writer"),
                               "reader": dataclasses.replace(ctx.endpoint, kind="reader")}
        self.active: _Backend | None = None
        self.parked: dict[str, _Backend] = {}
        self.failed_tx = False
        self.wrote = False
        self.nonce = b""
        self.scope = trio.CancelScope()  # the proxy runs the session inside it
        self.draining = False
        self._busy = False
        self._checked_generation = -1

    # --- lifecycle ----------------------------------------------------------------------------

    def session_info(self) -> SessionInfo:
        """This session for the admin console's SHOW SESSIONS."""
        user = getattr(self, "user", None)
        be = self.active
        transaction = "E" if self.failed_tx else ("T" if self._in_transaction() else "I")
        return SessionInfo(
            cluster=self.ctx.cluster.config.name, endpoint=self.ctx.endpoint.name, id=self.connection_id,
            user=user.name if user is not None else None, database=self.schema,
            instance=be.b.instance if be is not None else None,
            state=session_state(logged_in=user is not None, busy=self._busy, transaction=transaction),
            client=self.peer)

    def idle(self) -> bool:
        return not self._busy and not self.failed_tx and not self._in_transaction()

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else when the command or transaction ends."""
        self.draining = True
        if self.active is not None and self.idle():
            self.scope.cancel()

    async def run(self) -> None:
        self.ctx.cluster.mysql_sessions[self.connection_id] = self
        try:
            with trio.move_on_after(self.ctx.startup_timeout_s) as scope:
                seq = await self._login()
            if scope.cancelled_caught:
                self.ctx.cluster.metrics.error("startup_timeout")
                return
            await self._attach_first(seq)
            await self._relay()
        except _Fatal as e:
            self.ctx.cluster.metrics.error("auth_failed" if e.errno == 1045 else "session_fatal")
            await self._send_quietly(e.raw or encode_packet(self._err_seq, err_packet(e.errno, e.sqlstate, str(e))))
        except MySQLProtocolError as e:
            self.ctx.cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message)
            await self._send_quietly(encode_packet(self._err_seq, err_packet(e.errno, e.sqlstate, e.message)))
        except ProtocolError as e:
            self.ctx.cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            await self._close()

    _err_seq = 0

    async def _send_quietly(self, data: bytes) -> None:
        await send_quietly(self.client, data)

    async def _close(self) -> None:
        self.ctx.cluster.mysql_sessions.pop(self.connection_id, None)
        with trio.CancelScope(shield=True):
            for be in [*([self.active] if self.active else []), *self.parked.values()]:
                self.ctx.cluster.connections[be.b.instance] -= 1
                await be.b.conn.aclose()
            self.active = None
            self.parked.clear()
            if self.pinned_by is not None:
                self.metrics.session_unpinned()
            await self.client.aclose()

    # --- client packets -----------------------------------------------------------------------

    async def _read_packet(self) -> tuple[int, bytes] | None:
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            # Nothing buffered: the client has not spoken yet (it waits for each answer), so
            # wait for readiness instead of trying a recv that would fail.
            n = await self.client.recv_into_after_wait(self.buf)
            if n == 0:
                return None
            self.reader.feed(memoryview(self.buf)[:n])

    # --- login --------------------------------------------------------------------------------

    def _server_auth(self, user_name: str, tls: bool, nonce: bytes) -> ServerAuth:
        cluster = self.ctx.cluster
        user = cluster.config.user(user_name)
        method = (user.auth if user and user.auth else None) or cluster.config.client_auth
        native_hash, sha2_digest = cluster.mysql_secrets(user)
        if method == CACHING_SHA2_PASSWORD:
            return CachingSha2ServerAuth(user_name, "%", sha2_digest, tls=tls, private_key=cluster.rsa_key(),
                                         nonce=nonce)
        return NativePasswordServerAuth(user_name, "%", native_hash, nonce=nonce)

    async def _login(self) -> int:
        """Greeting, optional TLS, authentication; returns the sequence id of the OK to send."""
        ctx = self.ctx
        tls_ok = ctx.tls_context is not None and ctx.endpoint.tls != "off"
        offered = OFFERED | (k.CLIENT_SSL if tls_ok else 0)
        if ctx.cluster.config.allow_local_infile:
            offered |= k.CLIENT_LOCAL_FILES
        nonce = self.nonce = make_nonce()
        greeting = HandshakeV10(
            server_version=ctx.cluster.mysql_server_version or SERVER_VERSION,
            connection_id=self.connection_id & 0xFFFFFFFF, auth_plugin_data=nonce, capabilities=offered,
            character_set=self.charset, status=k.SERVER_STATUS_AUTOCOMMIT,
            auth_plugin_name=ctx.cluster.config.client_auth)
        await self.client.send_all(encode_packet(0, greeting.encode()))
        packet = await self._read_packet()
        if packet is None:
            raise ConnectionResetError("client left during the handshake")
        seq, payload = packet
        response = decode_handshake_response(payload)
        if isinstance(response, SSLRequest):
            if not tls_ok:
                raise MySQLProtocolError("Bad handshake: TLS is not offered here", errno=1043, sqlstate="08S01")
            assert isinstance(self.client, RawConn) and ctx.tls_context is not None
            # The client does not wait for an answer: what followed the SSLRequest is its
            # TLS ClientHello, and goes to the TLS layer.
            self.client = await start_tls_server(self.client, ctx.tls_context, self.reader.take_buffered())
            packet = await self._read_packet()
            if packet is None:
                raise ConnectionResetError("client left during the handshake")
            seq, payload = packet
            response = decode_handshake_response(payload)
            if isinstance(response, SSLRequest):
                raise MySQLProtocolError("Bad handshake: a second SSL request", errno=1043, sqlstate="08S01")
        elif ctx.endpoint.tls == "required":
            self._err_seq = seq + 1
            raise _Fatal(1045, "28000", f"endpoint {ctx.endpoint.name} requires TLS")
        assert isinstance(response, HandshakeResponse41)
        self.caps = response.capabilities & offered
        self.charset = response.character_set or self.charset
        self.schema = response.database or None
        self.attrs = response.connect_attrs
        user = ctx.cluster.config.user(response.username)
        # The greeting announced the cluster's method with this nonce; a user whose method
        # differs is asked to switch (the step sees the client's plugin and says so).
        auth = self._server_auth(response.username, self.client.is_tls, nonce)
        auth.start()
        data, plugin = response.auth_response, response.auth_plugin_name
        if plugin is None and response.capabilities & k.CLIENT_PLUGIN_AUTH:
            plugin = ctx.cluster.config.client_auth
        while True:
            self._err_seq = seq + 1
            try:
                reply, done = auth.step(data, plugin)
            except MySQLAuthenticationError as e:
                self.log.info("client_auth_failed", user=response.username)
                raise _Fatal(e.errno, e.sqlstate, e.message) from None
            plugin = None
            if reply is not None:
                seq += 1
                await self.client.send_all(encode_packet(seq, reply))
            if done:
                if user is None:
                    raise _Fatal(1045, "28000", f"Access denied for user '{response.username}'@'%'")
                self.user = user
                return seq + 1
            packet = await self._read_packet()
            if packet is None:
                raise ConnectionResetError("client left during authentication")
            seq, data = packet

    async def _attach_first(self, ok_seq: int) -> None:
        self._err_seq = ok_seq
        try:
            be = await self._open(self.role)
        except _NoRoute as e:
            raise _Fatal(ER_NO_ROUTE, "HY000", str(e)) from None
        except MyBackendError as e:
            raise _Fatal(e.errno, e.sqlstate, e.message,
                         raw=encode_packet(ok_seq, e.err_payload) if e.err_payload else None) from None
        self.active = be
        self.reader.max_payload = self.ctx.max_message_bytes
        ok = OkPacket(status=be.b.status or k.SERVER_STATUS_AUTOCOMMIT)
        await self.client.send_all(encode_packet(ok_seq, ok.encode(self.caps)))
        self.log.debug("session_attached", instance=be.b.instance, thread=be.b.thread_id)

    # --- backends -----------------------------------------------------------------------------

    def _endpoint(self, role: str) -> EndpointConfig:
        return self.ctx.endpoint if role == "main" else self.role_endpoints[role]

    async def _open(self, role: str, timeout_s: float | None = None) -> _Backend:
        cluster = self.ctx.cluster
        endpoint = self._endpoint(role)
        if timeout_s is None:
            timeout_s = cluster.config.failover_timeout_ms / 1000
        deadline = trio.current_time() + timeout_s
        attempts: dict[str, int] = {}
        while True:
            decision = await cluster.wait_for_route(endpoint, max(0.0, deadline - trio.current_time()), held=True)
            name = decision.instance
            if name is None or attempts.get(name, 0) >= 2:
                raise _NoRoute(f"endpoint {self.ctx.endpoint.name}: {decision.reason or 'no instance is available'}")
            attempts[name] = attempts.get(name, 0) + 1
            inst = cluster.config.instance_named(name)
            cluster.connections[name] += 1
            try:
                with trio.fail_after(self.ctx.connect_timeout_s):
                    b = await open_my_backend(
                        name, inst.address, user=self.user.name, password=self.user.password,
                        database=self.schema, capabilities=(self.caps & ~PER_LEG) | k.CLIENT_CONNECT_WITH_DB,
                        character_set=self.charset, connect_attrs=self.attrs,
                        tls_mode=cluster.config.backend_tls)
                b.in_recovery = bool(cluster.topology.instances[name].in_recovery)
                be = _Backend(b, schema=self.schema)
                await self._replay(be)
                return be
            except MyBackendError as e:
                cluster.connections[name] -= 1
                if e.err_payload is not None:
                    raise
                cluster.backend_failed(name, e.message)
            except (OSError, trio.TooSlowError) as e:
                cluster.connections[name] -= 1
                cluster.backend_failed(name, str(e) or "connect timed out")

    async def _exchange(self, be: _Backend, command: bytes) -> tuple[ResponseTracker, bytes]:
        """Run one command of our own on an idle backend; returns its tracker and the raw response."""
        tracker = ResponseTracker(command[0], be.b.capabilities)
        await be.b.conn.send_all(encode_packet(0, command))
        raw = bytearray()
        buf = bytearray(65536)
        while not tracker.done:
            n = await be.b.conn.recv_into(buf)
            if n == 0:
                raise _Lost("the server closed the connection")
            used = be.scanner.scan(memoryview(buf)[:n], tracker)
            raw += buf[:used]
        return tracker, bytes(raw)

    async def _replay(self, be: _Backend) -> None:
        """Bring a backend up to the session: statements closed meanwhile, schema, SET statements."""
        if be.pending_close:
            await be.b.conn.send_all(b"".join(
                encode_packet(0, bytes((c.COM_STMT_CLOSE,)) + sid.to_bytes(4, "little")) for sid in be.pending_close))
            be.pending_close.clear()
        if self.set_option is not None and be.set_option != self.set_option:
            await self._exchange(be, self.set_option)
            be.set_option = self.set_option
        if self.schema and be.schema != self.schema:
            await self._exchange(be, bytes((c.COM_INIT_DB,)) + self.schema.encode())
            be.schema = self.schema
        for sql in self.set_statements[be.sets_applied:]:
            tracker, _ = await self._exchange(be, bytes((c.COM_QUERY,)) + sql.encode("utf-8", "surrogateescape"))
            if tracker.error is not None:
                self.log.info("session_replay_error", errno=tracker.error.errno, error=tracker.error.message)
        be.sets_applied = len(self.set_statements)

    async def _backend_statement_id(self, be: _Backend, client_id: int) -> int | None:
        """The backend's id for a client statement, preparing it there first if needed."""
        sid = be.statements.get(client_id)
        if sid is not None:
            return sid
        stmt = self.statements.get(client_id)
        if stmt is None:
            return None
        command = bytes((c.COM_STMT_PREPARE,)) + stmt.sql.encode("utf-8", "surrogateescape")
        tracker, _ = await self._exchange(be, command)
        if tracker.prepare_ok is None:
            return None
        be.statements[client_id] = tracker.prepare_ok.statement_id
        return tracker.prepare_ok.statement_id

    def _drop(self, be: _Backend) -> None:
        self.ctx.cluster.connections[be.b.instance] -= 1
        conn = be.b.conn
        if isinstance(conn, RawConn):
            conn.sock.close()
            conn.closed = True

    def _placement_ok(self, be: _Backend, role: str) -> bool:
        cluster = self.ctx.cluster
        endpoint = self._endpoint(role)
        eligible = members(endpoint, cluster.topology)
        return be.b.instance in eligible or (not eligible and cluster.route(endpoint).instance == be.b.instance)

    async def _activate(self, role: str) -> None:
        """Make ``role``'s backend the active one: park the current one, reuse or open another.
        Raises _NoRoute or MyBackendError when no backend can be had."""
        if self.active is not None and self.role != role:
            self.parked[self.role] = self.active
            self.active = None
        self.role = role
        if self.active is None:
            be = self.parked.pop(role, None)
            if be is not None and (be.b.conn.peer_closed() or not self._placement_ok(be, role)):
                self._drop(be)
                be = None
            if be is not None:
                try:
                    await self._replay(be)
                except (_Lost, OSError, MySQLProtocolError):
                    self._drop(be)
                    be = None
            if be is None:
                be = await self._open(role)
                self.log.info("session_reattached", instance=be.b.instance, thread=be.b.thread_id)
            self.active = be
        self._checked_generation = self.ctx.cluster.topology.generation

    # --- the relay ----------------------------------------------------------------------------

    async def _relay(self) -> None:
        while True:
            packet = await self._read_packet()
            if packet is None:
                return
            seq, payload = packet
            if not payload:
                raise MySQLProtocolError("Malformed communication packet: an empty command", errno=1835)
            command = payload[0]
            if command == c.COM_QUIT:
                return
            self._err_seq = seq + 1
            self._busy = True
            try:
                await self._command(command, payload)
            finally:
                self._busy = False
            if self.draining and self.idle():
                return

    def _in_transaction(self) -> bool:
        be = self.active
        return be is not None and bool(be.b.status & k.SERVER_STATUS_IN_TRANS)

    def _autocommit(self) -> bool:
        be = self.active
        return be is None or bool(be.b.status & k.SERVER_STATUS_AUTOCOMMIT)

    async def _reply_error(self, errno: int, sqlstate: str, message: str) -> None:
        await self.client.send_all(encode_packet(self._err_seq, err_packet(errno, sqlstate, message)))

    async def _reply_ok(self, status: int = k.SERVER_STATUS_AUTOCOMMIT) -> None:
        await self.client.send_all(encode_packet(self._err_seq, OkPacket(status=status).encode(self.caps)))

    async def _command(self, command: int, payload: bytes) -> None:
        sql: str | None = None
        if command == c.COM_QUERY:
            sql = c.query_text(payload, self.caps)
            kill = _KILL.match(sql) if "kill" in sql[:16].lower() else None
            if kill:
                await self._kill(kill.group(1) or "CONNECTION", int(kill.group(2)))
                return
        if command == c.COM_CHANGE_USER:
            await self._change_user(payload)
            return
        if command == c.COM_RESET_CONNECTION:
            self._reset_session_state()
        if self.failed_tx:
            if sql is not None and _ROLLBACK.match(sql):
                self.failed_tx = False
                await self._reply_ok()
            elif command == c.COM_PING:
                await self._reply_ok(k.SERVER_STATUS_AUTOCOMMIT | k.SERVER_STATUS_IN_TRANS)
            elif command not in (c.COM_STMT_CLOSE, c.COM_STMT_SEND_LONG_DATA):
                await self._reply_error(ER_TRANSACTION_LOST, "08007", _TX_LOST)
            return
        role = self._route(command, payload, sql)
        try:
            if role is not None and (role != self.role or self.active is None):
                if role == "reader" and self.readwrite and self.wrote and self.ctx.endpoint.consistency == "session":
                    if not await self._reader_caught_up():
                        role = "writer"
                await self._activate(role)
            elif self.active is None or self._moved():
                await self._activate(self.role)
        except _NoRoute as e:
            self.ctx.cluster.metrics.error("no_route")
            waited = self.ctx.cluster.config.failover_timeout_ms
            await self._reply_error(ER_NO_ROUTE, "HY000", f"{e} (waited {waited} ms)")
            return
        except MyBackendError as e:
            await self._reply_error(e.errno, e.sqlstate, e.message)
            return
        be = self.active
        assert be is not None
        if self.readwrite and self.role == "writer":
            self.wrote = True
        self.metrics.statement("reader" if be.b.in_recovery else "writer")
        self._track(command, payload, sql)
        in_tx = self._in_transaction() or not self._autocommit()
        inflight = self.ctx.cluster.inflight
        inflight[be.b.instance] += 1
        try:
            await self._forward(be, command, payload)
        except _Lost:
            await self._lost(be, command, payload, sql, in_tx)
        finally:
            inflight[be.b.instance] -= 1

    def _moved(self) -> bool:
        """At an idle point: has the active backend's instance left the endpoint?"""
        gen = self.ctx.cluster.topology.generation
        if gen == self._checked_generation or self._in_transaction() or self.active is None:
            return False
        self._checked_generation = gen
        if self._placement_ok(self.active, self.role):
            return False
        self.log.info("session_moving", instance=self.active.b.instance, reason="left the endpoint")
        self._drop(self.active)
        self.active = None
        return True

    def _route(self, command: int, payload: bytes, sql: str | None) -> str | None:
        if not self.readwrite:
            return None
        if self._in_transaction() or not self._autocommit() or self.pinned_by is not None:
            return "writer" if self.active is None else None
        if command == c.COM_QUERY and sql is not None:
            cl = classify(sql)
            if cl.route is Route.READ and cl.transaction in ("commit", "rollback", "savepoint"):
                return None
            if cl.session_state == "use":
                return None
            return "reader" if cl.route is Route.READ and cl.transaction != "begin" else "writer"
        if command == c.COM_STMT_PREPARE:
            cl = classify(payload[1:].decode("utf-8", "surrogateescape"))
            return "reader" if cl.route is Route.READ else "writer"
        if command in (c.COM_STMT_EXECUTE, c.COM_STMT_FETCH):
            stmt = self.statements.get(self._client_statement_id(payload))
            return stmt.role if stmt is not None else "writer"
        return None

    def _client_statement_id(self, payload: bytes) -> int:
        sid = int.from_bytes(payload[1:5], "little")
        return self.last_statement_id if sid == c.LAST_STATEMENT_ID else sid

    def _track(self, command: int, payload: bytes, sql: str | None) -> None:
        """Session state the next backend must be given."""
        if command == c.COM_SET_OPTION:
            self.set_option = payload
            if self.active is not None:
                self.active.set_option = payload
            return
        if command == c.COM_INIT_DB:
            self.schema = payload[1:].decode("utf-8", "surrogateescape")
            if self.active is not None:
                self.active.schema = self.schema
            return
        if sql is None:
            return
        use = _USE.match(sql)
        if use:
            self.schema = use.group(1)
            if self.active is not None:
                self.active.schema = self.schema
            return
        if not _MAYBE_STATEFUL.search(sql):
            return
        cl = classify(sql)
        if cl.session_state in _REPLAYED_STATES:
            self.set_statements.append(sql)
            if self.active is not None:
                self.active.sets_applied = len(self.set_statements)
        if cl.session_state in _PINNING_STATES and self.readwrite and self.pinned_by is None:
            self.pinned_by = cl.session_state
            self.metrics.session_pinned()
        if cl.session_state in _UNREPLAYABLE_STATES and self.unreplayable is None:
            self.unreplayable = cl.session_state

    async def _forward(self, be: _Backend, command: int, payload: bytes) -> None:
        """Send one command and relay its response; raises _Lost if the backend dies."""
        conn = be.b.conn
        if command == c.COM_STMT_PREPARE:
            await self._prepare(be, payload)
            return
        if command in _STMT_COMMANDS:
            client_id = self._client_statement_id(payload)
            try:
                backend_id = await self._backend_statement_id(be, client_id)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise _Lost(str(e)) from None
            if backend_id is None:
                if command not in (c.COM_STMT_CLOSE, c.COM_STMT_SEND_LONG_DATA):
                    await self._reply_error(1243, "HY000", f"Unknown prepared statement handler ({client_id}) "
                                                           f"given to {c.command_name(command)}")
                return
            payload = c.replace_statement_id(payload, backend_id)
            if command == c.COM_STMT_CLOSE:
                self.statements.pop(client_id, None)
                be.statements.pop(client_id, None)
                for other in self.parked.values():
                    bid = other.statements.pop(client_id, None)
                    if bid is not None:
                        other.pending_close.append(bid)
        tracker = ResponseTracker(command, be.b.capabilities)
        try:
            await conn.send_all(encode_packet(0, payload))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as e:
            raise _Lost(str(e)) from None
        if tracker.done:
            return
        forwarded = False
        buf = self.buf
        view = memoryview(buf)
        scanner = be.scanner
        first = True
        while True:
            if tracker.awaiting_client:
                await self._relay_client_upload(be)
                tracker.awaiting_client = False
            try:
                # The server cannot have answered a command just sent: wait, then read.
                n = await (conn.recv_into_after_wait(buf) if first else conn.recv_into(buf))
                first = False
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                n = 0
            if n == 0:
                raise _Lost("the server closed the connection" + (" mid-response" if forwarded else ""))
            used = scanner.scan(view[:n], tracker)
            if used:
                await self.client.send_all(view[:used])
                forwarded = True
            if tracker.done:
                if tracker.status is not None:
                    be.b.status = tracker.status
                return

    async def _relay_client_upload(self, be: _Backend) -> None:
        """LOAD DATA LOCAL INFILE: pass the client's packets through until the empty one."""
        while True:
            packet = await self._read_packet()
            if packet is None:
                raise ConnectionResetError("client left during LOAD DATA LOCAL")
            seq, payload = packet
            await be.b.conn.send_all(encode_packet(seq, payload))
            if not payload:
                return

    async def _prepare(self, be: _Backend, payload: bytes) -> None:
        """COM_STMT_PREPARE: the client sees its own statement id, stable across backends."""
        try:
            tracker, raw = await self._exchange(be, payload)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise _Lost(str(e)) from None
        if tracker.prepare_ok is not None:
            client_id = self.next_statement_id
            self.next_statement_id += 1
            sql = payload[1:].decode("utf-8", "surrogateescape")
            cl = classify(sql)
            role = "reader" if cl.route is Route.READ else "writer"
            self.statements[client_id] = _Statement(sql, role, tracker.prepare_ok.num_params)
            self.last_statement_id = client_id
            be.statements[client_id] = tracker.prepare_ok.statement_id
            # The first packet is the PREPARE_OK: header (4), status (1), statement id (4).
            raw = raw[:5] + client_id.to_bytes(4, "little") + raw[9:]
        await self.client.send_all(raw)

    async def _lost(self, be: _Backend, command: int, payload: bytes, sql: str | None, in_tx: bool) -> None:
        """The active backend died under a command: retry it, or report it, and move on."""
        cluster = self.ctx.cluster
        cluster.backend_failed(be.b.instance, "session backend connection lost")
        self._drop(be)
        self.active = None
        if self.unreplayable is not None:
            raise _Fatal(ER_TRANSACTION_LOST, "08S01", "endpoint_proxy: the server connection was lost and the "
                         f"session's {self.unreplayable.replace('_', ' ')} cannot be moved to another server")
        if not in_tx:
            read_only = be.b.in_recovery or (sql is not None and classify(sql).route is Route.READ) or command in (
                c.COM_PING, c.COM_INIT_DB, c.COM_STMT_CLOSE, c.COM_STMT_RESET)
            if read_only and command != c.COM_STMT_PREPARE:
                try:
                    await self._activate(self.role)
                    assert self.active is not None
                    await self._forward(self.active, command, payload)
                    self.log.info("request_retried", lost=be.b.instance, instance=self.active.b.instance)
                    return
                except (_NoRoute, MyBackendError, _Lost):
                    pass
            cluster.metrics.error("statement_lost")
            await self._reply_error(ER_TRANSACTION_LOST, "08007",
                                    "endpoint_proxy: the server connection was lost while the statement ran; "
                                    "its outcome is unknown")
            return
        cluster.metrics.error("transaction_lost")
        self.failed_tx = True
        self.log.info("session_backend_lost", instance=be.b.instance, in_transaction=True)
        await self._reply_error(ER_TRANSACTION_LOST, "08007", _TX_LOST)

    async def _reader_caught_up(self) -> bool:
        """Session consistency through GTIDs: the replica waits (MASTER_GTID_WAIT, bounded)
        for the writer's position after this session's writes; False reads on the writer."""
        writer = self.active if self.role == "writer" else self.parked.get("writer")
        if writer is None:
            return True
        try:
            tracker, raw = await self._exchange(writer, bytes((c.COM_QUERY,)) + b"SELECT @@gtid_binlog_pos")
            position = _first_text_value(raw)
            if self.role != "reader":
                if self.active is not None:
                    self.parked[self.role] = self.active
                self.active = None
                self.role = "reader"
            reader = self.parked.pop("reader", None)
            if reader is None or reader.b.conn.peer_closed() or not self._placement_ok(reader, "reader"):
                if reader is not None:
                    self._drop(reader)
                reader = await self._open("reader", 0.0)
            self.parked["reader"] = reader
            if not reader.b.in_recovery:
                self.wrote = False
                return True
            wait_s = self.ctx.endpoint.session_wait_ms / 1000
            query = f"SELECT MASTER_GTID_WAIT('{position}', {wait_s:.3f})"
            tracker, raw = await self._exchange(reader, bytes((c.COM_QUERY,)) + query.encode())
            if _first_text_value(raw) == "0":
                self.wrote = False
                return True
            return False
        except (_NoRoute, MyBackendError, _Lost, OSError, MySQLProtocolError):
            return False

    def _reset_session_state(self) -> None:
        """COM_RESET_CONNECTION / COM_CHANGE_USER: the session starts over; idle backends that
        still carry the old state are let go."""
        self.set_statements.clear()
        self.set_option = None
        self.statements.clear()
        self.last_statement_id = 0
        self.failed_tx = False
        if self.pinned_by is not None:
            self.pinned_by = None
            self.metrics.session_unpinned()
        self.unreplayable = None
        for be in self.parked.values():
            self._drop(be)
        self.parked.clear()
        if self.active is not None:
            self.active.statements.clear()
            self.active.sets_applied = 0

    async def _change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER: authenticate the new user here (the client answers our nonce, not a
        server's), then start the session over on a backend logged in as that user."""
        request = c.decode_command(payload, self.caps)
        assert isinstance(request, c.ComChangeUser)
        auth = self._server_auth(request.user, self.client.is_tls, self.nonce)
        auth.start()
        data, plugin = request.auth_response, request.auth_plugin_name
        seq = 0
        while True:
            try:
                reply, done = auth.step(data, plugin)
            except MySQLAuthenticationError as e:
                self._err_seq = seq + 1
                raise _Fatal(e.errno, e.sqlstate, e.message) from None
            plugin = None
            if reply is not None:
                seq += 1
                await self.client.send_all(encode_packet(seq, reply))
            if done:
                break
            packet = await self._read_packet()
            if packet is None:
                raise ConnectionResetError("client left during COM_CHANGE_USER")
            seq, data = packet
        user = self.ctx.cluster.config.user(request.user)
        self._err_seq = seq + 1
        if user is None:
            raise _Fatal(1045, "28000", f"Access denied for user '{request.user}'@'%'")
        self._reset_session_state()
        if self.active is not None:
            self._drop(self.active)
            self.active = None
        self.user = user
        self.schema = request.database or None
        if request.character_set:
            self.charset = request.character_set
        if request.connect_attrs is not None:
            self.attrs = request.connect_attrs
        try:
            await self._activate(self.role)
        except _NoRoute as e:
            await self._reply_error(ER_NO_ROUTE, "HY000", str(e))
            return
        except MyBackendError as e:
            await self._reply_error(e.errno, e.sqlstate, e.message)
            return
        await self._reply_ok()

    async def _kill(self, what: str, target: int) -> None:
        """KILL [QUERY|CONNECTION] n, where n is a proxy connection id or a server thread id."""
        session = self.ctx.cluster.mysql_sessions.get(target)
        be = session.active if session is not None else None
        if session is None:
            for s in self.ctx.cluster.mysql_sessions.values():
                if s.active is not None and s.active.b.thread_id == target:
                    session, be = s, s.active
                    break
        if session is None:
            await self._reply_error(1094, "HY000", f"Unknown thread id: {target}")
            return
        if what.upper() == "CONNECTION" and session is not self:
            if not session.client.closed:
                await session.client.aclose()
        elif be is not None:
            try:
                with trio.fail_after(5):
                    await kill_query(be.b.address, user=self.user.name, password=self.user.password,
                                     thread_id=be.b.thread_id)
            except (MyBackendError, OSError, trio.TooSlowError) as e:
                await self._reply_error(1094, "HY000", f"could not kill query {target}: {e}")
                return
        await self._reply_ok(self.active.b.status if self.active else k.SERVER_STATUS_AUTOCOMMIT)


class _NoRoute(Exception):
    pass


def _first_text_value(raw: bytes) -> str | None:
    """The first column of the first row of a raw text result (column count, definitions, row)."""
    reader = PacketReader()
    reader.feed(raw)
    packets = []
    while (p := reader.next_packet()) is not None:
        packets.append(p[1])
    # column count (1), one definition, [EOF], the row
    for payload in packets[2:]:
        if payload and payload[0] in (0xFE, 0xFF) and len(payload) < 9:
            continue
        value, _ = read_row_value(payload, 0)
        return None if value is None else value.decode()
    return None
