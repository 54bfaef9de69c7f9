"""A PostgreSQL client session: startup, TLS, authentication, routing to a backend, and the relay."""

from __future__ import annotations

import dataclasses
import functools
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import trio

from ...config import Address, ClusterConfig, EndpointConfig, UserConfig
from ...protocol.errors import AuthenticationError, FrameError, ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import CleartextServerAuth, Md5ServerAuth, ScramServerAuth, ServerAuth
from ...protocol.pg.framing import FrameReader, MessageScanner
from ...protocol.pg.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)
from ...relay.hub import READ, HandBack
from ...relay.net import Conn, RawConn, send_quietly, start_tls_server
from ...routing.endpoints import members
from ...routing.pg_classify import FunctionPolicy, Route, classify
from ...routing.session_state import SessionState, ends_transaction, is_rollback
from ..session.context import CONSOLE_DATABASE, CancelTarget, SessionContext
from ..session.info import SessionInfo, session_state
from .backend import BackendConnection, BackendError, open_backend

if TYPE_CHECKING:
    pass

log = structlog.get_logger("endpoint_proxy.session")

RELAY_BUFFER = 64 * 1024

# Startup parameters that belong to the connection, not to the backend session.
_NOT_FORWARDED = frozenset({"user"})


class _Fatal(Exception):
    """End the session with a FATAL ErrorResponse to the client."""

    def __init__(self, sqlstate: str, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.raw = raw


def fatal_bytes(sqlstate: str, message: str) -> bytes:
    return m.error_response("FATAL", sqlstate, message)


class PgSession:
    def __init__(self, ctx: SessionContext, sock: socket.socket, session_id: int) -> None:
        self.ctx = ctx
        self.client: Conn = RawConn(sock)
        try:
            host, port = sock.getpeername()[:2]
            self.peer: str | None = str(Address(host, port))
        except OSError:
            self.peer = None
        # (startup, reader, buf) of a client that asked for the admin console database.
        self._console: tuple[StartupMessage, FrameReader, bytearray] | None = None
        self.session_id = session_id
        self.log = log.bind(conn=session_id, endpoint=ctx.endpoint.name)
        self.backend: BackendConnection | None = None
        self.cancel_key: tuple[int, int] | None = None
        self.user: UserConfig
        self.backend_params: dict[str, str] = {}
        self.client_params: dict[str, str] = {}
        self.client_pid = 0
        self.state = SessionState()
        self.scope = trio.CancelScope()  # the proxy runs the session inside it
        self.draining = False
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self._pinned_counted = False
        self._busy_on: str | None = None  # the instance running this session's request
        self._topology = ctx.cluster.topology
        self._nursery: trio.Nursery | None = None
        self._att: _Attachment | None = None
        self._mode: _Mode | None = None
        self._checked_generation = -1
        # Read/write splitting (readwrite endpoints): the backend in use serves ``_role``;
        # the other one waits, idle, in ``_parked``.
        self._readwrite = ctx.endpoint.kind == "readwrite"
        self._role = "writer" if self._readwrite else "main"
        self._role_endpoints = {
            "writer": dataclasses.replace(ctx.endpoint, kind="writer"),
            "reader": dataclasses.replace(ctx.endpoint, kind="reader"),
        }
        self._parked: dict[str, BackendConnection] = {}
        self._partial_request = False
        self._stmt_roles: dict[str, str] = {}  # prepared statement name -> role of its query
        self._sql_prepared_routes: dict[str, Route] = {}
        self._functions = FunctionPolicy()
        self._wrote = False  # session consistency: a write since the last verified read
        # The client side of the relay: its scanner and buffer (the hub's callback uses them too).
        self._scanner: MessageScanner
        self._buf: bytearray
        self._view: memoryview
        self._state_applied = False  # the chunk's queries are already in self.state
        self._csock: socket.socket  # the client's socket, when it is a raw one
        # The request in flight (since the session was last idle): what a retry needs.
        self.inflight = 0  # ReadyForQuery messages still owed to the client
        self.request_buf = bytearray()
        self.request_retryable = False
        self.request_forwarded = False
        self.request_status = "I"

    def idle(self) -> bool:
        """No request in flight and no transaction open: closing now loses nothing."""
        backend = self.backend
        return (self.inflight == 0 and not self._partial_request and self._mode is None
                and (backend is None or backend.status == "I"))

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else as soon as the session becomes idle."""
        self.draining = True
        if (self._att is not None and self.idle()) or self._console is not None:
            self.scope.cancel()

    def session_info(self) -> SessionInfo | None:
        """This session for the admin console's SHOW SESSIONS (None for a console session)."""
        if self._console is not None:
            return None
        user = getattr(self, "user", None)
        backend = self.backend
        return SessionInfo(
            cluster=self.ctx.cluster.config.name, endpoint=self.ctx.endpoint.name, id=self.session_id,
            user=user.name if user is not None else None, database=self.backend_params.get("database"),
            instance=backend.instance if backend is not None else None,
            state=session_state(logged_in=user is not None, busy=self.inflight > 0,
                                transaction=backend.status if backend is not None else "I"),
            client=self.peer)

    @property
    def cluster_config(self) -> ClusterConfig:
        return self.ctx.cluster.config

    async def run(self) -> None:
        try:
            startup: StartupMessage | None = None
            leftover = b""
            with trio.move_on_after(self.ctx.startup_timeout_s):
                result = await self._startup()
                if result is not None:
                    startup, leftover = result
            if self._console is not None and self.ctx.console is not None:
                # Outside the startup deadline: the console applies it to its login only.
                console_startup, reader, buf = self._console
                await self.ctx.console(self.client, console_startup, reader, buf, self.ctx.startup_timeout_s)
                return
            if startup is None:
                return
            await self._attach(startup)
            await self._relay(leftover)
        except _Fatal as e:
            self.ctx.cluster.metrics.error("auth_failed" if e.sqlstate.startswith("28") else "session_fatal")
            await self._send_quietly(e.raw or fatal_bytes(e.sqlstate, str(e)))
        except FrameError as e:
            # An impossible length: close at once, allocate nothing, say nothing more.
            self.ctx.cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message)
        except ProtocolError as e:
            self.ctx.cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message, sqlstate=e.sqlstate)
            await self._send_quietly(fatal_bytes(e.sqlstate, e.message))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            await self._close()

    async def _send_quietly(self, data: bytes) -> None:
        await send_quietly(self.client, data)

    async def _close(self) -> None:
        self._request_done()
        if self._pinned_counted:
            self.metrics.session_unpinned()
        with trio.CancelScope(shield=True):
            if self.cancel_key is not None:
                self.ctx.cancels.withdraw(*self.cancel_key)
            att = self._att
            if att is not None and not att.released:
                att.released = True
                self.ctx.cluster.connections[att.backend.instance] -= 1
                await att.backend.conn.aclose()
            elif att is None and self.backend is not None:
                self.ctx.cluster.connections[self.backend.instance] -= 1
                await self.backend.conn.aclose()
            for parked in self._parked.values():
                self.ctx.cluster.connections[parked.instance] -= 1
                await parked.conn.aclose()
            self._parked.clear()
            self.backend = None
            await self.client.aclose()

    # --- startup and authentication ----------------------------------------------------------

    async def _read_into(self, reader: FrameReader, buf: bytearray) -> None:
        n = await self.client.recv_into(buf)
        if n == 0:
            raise ConnectionResetError("client closed the connection")
        reader.feed(memoryview(buf)[:n])

    async def _startup(self) -> tuple[StartupMessage, bytes] | None:
        ctx = self.ctx
        reader = FrameReader(max_length=ctx.max_startup_bytes)
        buf = bytearray(8192)
        while True:
            payload = reader.next_startup()
            if payload is None:
                await self._read_into(reader, buf)
                continue
            packet = parse_startup_packet(payload)
            if isinstance(packet, SSLRequest):
                if reader.buffered:
                    # Bytes sent before the TLS handshake would be read as if they came
                    # over TLS (CVE-2021-23214): refuse.
                    raise ProtocolError("received unencrypted data after SSL request")
                if self.client.is_tls:
                    raise ProtocolError("SSLRequest on a connection that already uses TLS")
                if ctx.tls_context is None or ctx.endpoint.tls == "off":
                    await self.client.send_all(b"N")
                    continue
                await self.client.send_all(b"S")
                assert isinstance(self.client, RawConn)
                self.client = await start_tls_server(self.client, ctx.tls_context)
                continue
            if isinstance(packet, GSSENCRequest):
                if reader.buffered:
                    raise ProtocolError("received unencrypted data after GSSENC request")
                await self.client.send_all(b"N")
                continue
            if isinstance(packet, CancelRequest):
                # Like PostgreSQL, close the connection only once the cancel is delivered: a
                # client waits for that before its next statement, which the cancel must miss.
                if ctx.cancel_handler is not None:
                    await ctx.cancel_handler(packet)
                return None
            assert isinstance(packet, StartupMessage)
            if ctx.endpoint.tls == "required" and not self.client.is_tls:
                raise _Fatal("28000", f"endpoint {ctx.endpoint.name} requires TLS")
            if packet.minor > 0 or packet.protocol_options:
                npv = m.NegotiateProtocolVersion(0, tuple(packet.protocol_options))
                await self.client.send_all(npv.encode())
            if packet.database == CONSOLE_DATABASE and ctx.console is not None:
                self._console = (packet, reader, buf)  # served by run(), outside the startup deadline
                return None
            await self._authenticate(packet, reader, buf)
            return packet, reader.take_buffered()

    def _server_auth(self, user_name: str) -> ServerAuth:
        cluster = self.ctx.cluster
        user = cluster.config.user(user_name)
        method = (user.auth if user and user.auth else None) or cluster.config.client_auth
        if method == "password":
            if not self.client.is_tls:
                raise _Fatal("28000", "cleartext password authentication requires TLS")
            return CleartextServerAuth(user_name, user.password if user else secrets.token_hex(16))
        if method == "md5":
            return Md5ServerAuth(user_name, user.password if user else secrets.token_hex(16))
        return ScramServerAuth(user_name, cluster.scram_secret(user))

    async def _authenticate(self, startup: StartupMessage, reader: FrameReader, buf: bytearray) -> None:
        auth = self._server_auth(startup.user)
        await self.client.send_all(auth.start())
        while True:
            # Judge the type byte before waiting for the body: a second StartupMessage
            # would otherwise read as a long message and stall until the timeout.
            type_ = reader.peek_type()
            if type_ is not None and type_ != ord("p"):
                raise ProtocolError(f"expected a password response, got message type {type_!r}")
            msg = reader.next_message()
            if msg is None:
                await self._read_into(reader, buf)
                continue
            type_, payload = msg
            try:
                reply, done = auth.step(payload)
            except AuthenticationError as e:
                self.log.info("client_auth_failed", user=startup.user)
                raise _Fatal(e.sqlstate, e.message) from None
            if done and self.cluster_config.user(startup.user) is None:
                # Only reachable if a method accepted an unknown user: never let one in.
                raise _Fatal("28P01", f'password authentication failed for user "{startup.user}"')
            if reply:
                await self.client.send_all(reply)
            if done:
                return

    # --- the backend --------------------------------------------------------------------------

    def _role_endpoint(self, role: str) -> EndpointConfig:
        """The routing rule of a role: the endpoint's own, or for readwrite its writer/reader halves."""
        if role == "main":
            return self.ctx.endpoint
        return self._role_endpoints[role]

    async def _open_routed_backend(self, timeout_s: float, role: str | None = None) -> BackendConnection:
        """Route and connect. Raises _NoRoute when nothing qualified in time, _ServerRefused
        when the server itself said no (its ErrorResponse is in the exception)."""
        ctx = self.ctx
        cluster = ctx.cluster
        user = self.user
        endpoint = self._role_endpoint(role or self._role)
        attempts: dict[str, int] = {}
        deadline = trio.current_time() + timeout_s
        while True:
            remaining = max(0.0, deadline - trio.current_time())
            decision = await cluster.wait_for_route(endpoint, remaining)
            name = decision.instance
            if name is None or attempts.get(name, 0) >= 2:
                reason = decision.reason or "no instance is available"
                raise _NoRoute(f"endpoint {ctx.endpoint.name}: {reason}")
            attempts[name] = attempts.get(name, 0) + 1
            address = cluster.config.instance_named(name).address
            cluster.connections[name] += 1
            try:
                with trio.fail_after(ctx.connect_timeout_s):
                    backend = await open_backend(
                        name, address, self.backend_params, user=user.name, password=user.password,
                        tls_mode=cluster.config.backend_tls)
                backend.address = address
                backend.in_recovery = bool(cluster.topology.instances[name].in_recovery)
                backend.set_version = self.state.version
                return backend
            except BackendError as e:
                cluster.connections[name] -= 1
                if e.raw_error is not None:
                    raise _ServerRefused(e.sqlstate, str(e), e.raw_error) from None
                cluster.backend_failed(name, str(e))
            except (OSError, trio.TooSlowError) as e:
                cluster.connections[name] -= 1
                cluster.backend_failed(name, str(e) or "connect timed out")

    async def _attach(self, startup: StartupMessage) -> None:
        """The first backend, during startup: any failure is FATAL, as a server's would be."""
        ctx = self.ctx
        user = ctx.cluster.config.user(startup.user)
        assert user is not None
        self.user = user
        params = {k: v for k, v in startup.parameters.items()
                  if k not in _NOT_FORWARDED and not k.startswith("_pq_.")}
        params.setdefault("database", startup.user)
        self.backend_params = params
        try:
            backend = await self._open_routed_backend(ctx.cluster.config.failover_timeout_ms / 1000)
        except _NoRoute as e:
            raise _Fatal("08006", str(e)) from None
        except _ServerRefused as e:
            raise _Fatal(e.sqlstate, str(e), raw=e.raw) from None
        self.backend = backend
        if self._readwrite:
            await ctx.cluster.ensure_functions(params["database"])
        self.client_params = dict(backend.parameters)
        self.client_pid = backend.process_id
        secret = ctx.cancels.issue(backend.process_id, self._cancel_target(backend))
        self.cancel_key = (backend.process_id, secret)
        hello = (backend.startup_messages
                 + m.BackendKeyData(backend.process_id, secret).encode()
                 + m.ReadyForQuery(backend.status).encode())
        await self.client.send_all(hello)
        self.log.debug("session_attached", instance=backend.instance, pid=backend.process_id)

    @staticmethod
    def _cancel_target(backend: BackendConnection) -> CancelTarget:
        assert backend.address is not None
        return CancelTarget(backend.address, backend.process_id, backend.secret_key)

    async def _replay(self, backend: BackendConnection) -> None:
        """Bring a backend up to the session's state: what it lacks of the SET/PREPARE statements
        and of the named prepared statements (each Parse with its own Sync, so one failure
        spoils no other), after any Close it owes. A fresh backend gets everything."""
        state = self.state
        sqls: list[str] = []
        if backend.set_version != state.version:
            sqls.append("DISCARD ALL")
            backend.statements.clear()
            backend.sql_prepared.clear()
            backend.sets_applied = 0
            backend.pending.clear()
        sqls += state.set_statements[backend.sets_applied:]
        sqls += [text for name, text in state.sql_prepared.items() if name not in backend.sql_prepared]
        parses = [raw for name, raw in state.parse_messages.items() if name not in backend.statements]
        sync = m.Sync().encode()
        pending = b"".join(backend.pending)
        if not sqls and not parses and not pending:
            return
        batch = (pending + sync if pending else b"") + b"".join(m.Query(q).encode() for q in sqls)
        batch += b"".join(p + sync for p in parses)
        await self._exchange(backend, batch, (1 if pending else 0) + len(sqls) + len(parses))
        backend.pending.clear()
        backend.sets_applied = len(state.set_statements)
        backend.set_version = state.version
        backend.sql_prepared.update(state.sql_prepared)
        backend.statements.update(state.parse_messages)

    async def _exchange(self, backend: BackendConnection, batch: bytes, expected_ready: int,
                        collect: list[tuple[str | None, ...]] | None = None) -> None:
        """Send our own requests to an idle backend that no pump is reading, and consume the
        answers up to ``expected_ready`` ReadyForQuery messages; errors are logged, rows kept
        in ``collect`` when given."""
        await backend.conn.send_all(batch)
        reader = FrameReader()
        buf = bytearray(65536)
        while expected_ready:
            msg = reader.next_message()
            if msg is None:
                n = await backend.conn.recv_into(buf)
                if n == 0:
                    raise ConnectionResetError("the server closed the connection")
                reader.feed(memoryview(buf)[:n])
                continue
            type_, payload = msg
            if type_ == ord("Z"):
                expected_ready -= 1
                backend.status = chr(payload[0])
            elif type_ == ord("S"):
                ps = m.decode_backend(type_, payload)
                assert isinstance(ps, m.ParameterStatus)
                backend.parameters[ps.name] = ps.value
            elif type_ == ord("D") and collect is not None:
                row = m.decode_backend(type_, payload)
                assert isinstance(row, m.DataRow)
                collect.append(tuple(v.decode() if v is not None else None for v in row.values))
            elif type_ == ord("E"):
                err = m.decode_backend(type_, payload)
                assert isinstance(err, m.ErrorResponse)
                if _is_fatal(payload):
                    raise ConnectionResetError(err.message)
                self.log.info("session_replay_error", sqlstate=err.sqlstate, error=err.message)

    # --- the relay ----------------------------------------------------------------------------

    async def _relay(self, leftover: bytes) -> None:
        backend = self.backend
        assert backend is not None
        self.backend = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_attachment(backend)
            try:
                await self._client_loop(leftover)
            finally:
                nursery.cancel_scope.cancel()

    def _start_attachment(self, backend: BackendConnection) -> None:
        att = _Attachment(backend, self._hub_answer)
        self.backend = backend
        self._att = att
        assert self._nursery is not None
        self._nursery.start_soon(self._server_pump, att)

    async def _detach(self, att: _Attachment, *, terminate: bool) -> None:
        """Let go of a backend on purpose (it left the endpoint, or the session is moving)."""
        att.closing = True
        att.scope.cancel()
        await att.done.wait()
        if terminate:
            with trio.move_on_after(0.5):
                try:
                    await att.backend.conn.send_all(m.Terminate().encode())
                except OSError:
                    pass
        self._release(att)

    def _release(self, att: _Attachment) -> None:
        if att.released:
            return
        att.released = True
        self.ctx.cluster.connections[att.backend.instance] -= 1
        if self.backend is att.backend:
            self.backend = None
        # Closing a raw socket never blocks; a TLS close is bounded inside aclose().
        if self._nursery is not None and not att.backend.conn.closed:
            self._nursery.start_soon(att.backend.conn.aclose)

    def _request_done(self) -> None:
        if self._busy_on is not None:
            self.ctx.cluster.inflight[self._busy_on] -= 1
            self._busy_on = None

    def _placement_ok(self, name: str, role: str | None = None) -> bool:
        cluster = self.ctx.cluster
        endpoint = self._role_endpoint(role or self._role)
        eligible = members(endpoint, cluster.topology)
        if name in eligible:
            return True
        return not eligible and cluster.route(endpoint).instance == name

    async def _client_loop(self, leftover: bytes) -> None:
        wanted = b"QPCSFXB" if self._readwrite else b"QPCSFX"
        scanner = self._scanner = MessageScanner(wanted, max_length=self.ctx.max_message_bytes)
        buf = self._buf = bytearray(RELAY_BUFFER)
        view = self._view = memoryview(buf)
        client = self.client
        wait_first = False
        # The hub relays the session's requests while it stays on the fast path below; for
        # readwrite every request needs a routing decision, which this task makes.
        hub = None
        if isinstance(client, RawConn) and not self._readwrite:
            hub = self.ctx.hub
            self._csock = client.sock
        pending: memoryview | None = memoryview(leftover) if leftover else None
        while True:
            if pending is not None:
                chunk, pending = pending, None
            else:
                if wait_first and hub is not None and self._att is not None and type(self._att.backend.conn) is RawConn:
                    try:
                        got = await hub.wait(self._csock.fileno(), self._hub_request)
                    except FrameError as e:
                        self.log.info("client_protocol_error", error=e.message)
                        return
                    assert isinstance(got, HandBack)
                    if got.kind == _HB_CHUNK:
                        if not await self._client_chunk(view[: got.data], got.extra):
                            return
                        wait_first = scanner.at_boundary
                        continue
                    if got.kind == _HB_SEND:  # the rest of a request the backend did not take at once
                        await self._send_request(got.extra, got.data)
                        continue
                    if got.kind == _HB_LOST:  # the backend refused the request
                        await got.extra.done.wait()
                        continue
                    wait_first = False  # READ: the socket is ours again
                # A chunk that ended on a message boundary was most likely a whole request:
                # the client now waits for the answer, so wait before trying to read.
                n = await (client.recv_into_after_wait(buf) if wait_first else client.recv_into(buf))
                if n == 0:
                    return
                chunk = view[:n]
            try:
                msgs = scanner.scan(chunk)
            except FrameError as e:
                self.log.info("client_protocol_error", error=e.message)
                return
            wait_first = scanner.at_boundary
            if wait_first and not self._readwrite:
                att = self._att
                if att is not None and self._start_plain(att, msgs, chunk):
                    await self._send_request(att, chunk)
                    continue
            if not await self._client_chunk(chunk, msgs):
                return

    def _start_plain(self, att: _Attachment, msgs: list[tuple[int, bytes]], chunk: memoryview) -> bool:
        """The common case, kept lean: whole requests made of simple Queries, Parses and
        Syncs (and what the scanner does not report: Bind, Execute, Describe, Flush, COPY
        data) on a settled topology that change nothing but what is cheap to track. Do the
        bookkeeping of sending ``chunk`` (which ends on a message boundary) and return True;
        False leaves everything to ``_client_chunk``."""
        if self._mode is not None or self.draining or self._topology.generation != self._checked_generation:
            return False
        ends = 0
        for type_, _payload in msgs:
            if type_ == _Q or type_ == _S:
                ends += 1
            elif type_ != _P:
                return False
        starts = self.inflight == 0 and not self._partial_request
        if starts and (not ends or msgs[-1][0] == _P):
            return False  # not a whole request
        state = self.state
        backend = att.backend
        status = backend.status
        version = state.version
        pinned = state.pinned_by
        for type_, payload in msgs:
            if type_ == _Q:
                state.on_query_bytes(payload, status)
            elif type_ == _P:
                self._track_parse(backend, payload)
        if state.version != version or state.pinned_by != pinned or version != backend.set_version:
            self._state_applied = True  # _client_chunk must not apply these queries again
            return False
        if msgs:
            self._partial_request = msgs[-1][0] == _P
        backend.sets_applied = len(state.set_statements)
        if starts:
            self.inflight = ends
            self._busy_on = backend.instance
            self.ctx.cluster.inflight[backend.instance] += 1
            self.metrics.statement("reader" if backend.in_recovery else "writer")
            self.request_status = status
            self.request_forwarded = False
            self.request_retryable = ends == 1 and len(chunk) <= _RETRY_BUFFER_LIMIT
            self.request_buf[:] = chunk if self.request_retryable else b""
        else:  # more of a request, or a pipelined one
            self.inflight += ends
            if self.request_retryable:
                if self.inflight > 1 or len(self.request_buf) + len(chunk) > _RETRY_BUFFER_LIMIT:
                    self.request_retryable = False
                    self.request_buf.clear()
                else:
                    self.request_buf += chunk
        return True

    def _track_parse(self, backend: BackendConnection, payload: bytes) -> None:
        if payload[0]:  # a named statement: kept for replay on other backends
            name = payload[: payload.find(b"\0")].decode("utf-8", "surrogateescape")
            self.state.on_parse(name, _frame_bytes(_P, payload))
            backend.statements.add(name)
        elif b"advisory" in payload:
            self.state.on_parse("", payload)

    async def _send_request(self, att: _Attachment, data: bytes | memoryview) -> None:
        try:
            await att.backend.conn.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            await att.done.wait()  # the server pump sees the loss too and deals with what is in flight

    def _hub_request(self) -> HandBack | None:
        """Run by the hub when the client's socket is readable: relay a plain request to the
        backend, or hand the bytes back to the session's task."""
        try:
            n = self._csock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return READ
        if n == 0:
            return READ
        chunk = self._view[:n]
        scanner = self._scanner
        msgs = scanner.scan(chunk)
        att = self._att
        if not (scanner.at_boundary and att is not None and att.sock is not None
                and self._start_plain(att, msgs, chunk)):
            return HandBack(_HB_CHUNK, n, msgs)
        sock = att.sock
        try:
            sent = sock.send(chunk)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return HandBack(_HB_LOST, None, att)
        if sent == n:
            return None
        return HandBack(_HB_SEND, bytes(chunk[sent:]), att)

    async def _client_chunk(self, chunk: memoryview, msgs: list[tuple[int, bytes]]) -> bool:
        """Handle one chunk of client bytes; False ends the session."""
        applied, self._state_applied = self._state_applied, False
        if self.draining and self.idle():
            await self._send_quietly(fatal_bytes("57P01", "terminating connection due to administrator command"))
            return False
        if self._mode is not None and not await self._emulate(msgs):
            return True
        terminate = bool(msgs) and msgs[-1][0] == _X  # Terminate is a client's last message
        att = self._att
        if att is not None and self.backend is not None and self.inflight == 0 and self.backend.status == "I":
            gen = self._topology.generation
            if gen != self._checked_generation:
                self._checked_generation = gen
                if not self._placement_ok(self.backend.instance):
                    self.log.info("session_moving", instance=self.backend.instance, reason="left the endpoint")
                    await self._detach(att, terminate=True)
                    att = self._att = None
        starts_request = self.inflight == 0 and not self._partial_request
        if (self._readwrite and starts_request and msgs and not terminate
                and (self.backend is None or self.backend.status == "I")):
            role = self._decide(msgs)
            if role is not None and role != self._role:
                if not await self._switch(role):
                    await self._emulate(msgs)
                    return True
                att = self._att
            if self._role == "writer":
                self._wrote = True
        if att is None or self.backend is None:
            if terminate:
                return False
            if not await self._reattach():
                await self._emulate(msgs)
                return True
            att = self._att
            assert att is not None
        backend = att.backend
        for type_, payload in msgs:
            if type_ in _REQUEST_ENDS:
                self.inflight += 1
            if type_ == _Q:
                if not applied:
                    self.state.on_query_bytes(payload, backend.status)
            elif type_ == _P:
                self._track_parse(backend, payload)
            elif type_ == _C and payload[:1] == b"S":
                name = payload[1:-1].decode("utf-8", "surrogateescape")
                self.state.on_close_statement(name)
                backend.statements.discard(name)
                for other in self._parked.values():
                    if name in other.statements:
                        other.statements.discard(name)
                        other.pending.append(m.Close("S", name).encode())
        if msgs:
            self._partial_request = msgs[-1][0] not in _REQUEST_ENDS
        if self.state.version != backend.set_version:
            # RESET ALL / DISCARD ALL / DEALLOCATE ALL run here; idle backends elsewhere
            # are rebuilt when next used.
            backend.set_version = self.state.version
            backend.statements = set(self.state.parse_messages)
            backend.sql_prepared = set(self.state.sql_prepared)
        backend.sets_applied = len(self.state.set_statements)
        if starts_request:
            self._request_done()
            self._busy_on = backend.instance
            self.ctx.cluster.inflight[backend.instance] += 1
            self.metrics.statement("reader" if backend.in_recovery else "writer")
            if not self._pinned_counted and self.state.pinned_by is not None:
                self._pinned_counted = True
                self.metrics.session_pinned()
            self.request_buf.clear()
            self.request_retryable = True
            self.request_forwarded = False
            self.request_status = att.backend.status
        if self.request_retryable:
            if self.inflight > 1 or len(self.request_buf) + len(chunk) > _RETRY_BUFFER_LIMIT:
                self.request_retryable = False
                self.request_buf.clear()
            else:
                self.request_buf += chunk
        await self._send_request(att, chunk)
        return not terminate

    def _decide(self, msgs: list[tuple[int, bytes]]) -> str | None:
        """readwrite: the role the request starting with ``msgs`` goes to (None: where it is)."""
        if self.state.pinned_by is not None:
            return "writer"
        self._functions = self.ctx.cluster.function_policy(self.backend_params.get("database", ""))
        decided: str | None = None
        for type_, payload in msgs:
            if type_ == _Q:
                c = classify(_text(payload), self._functions, self._sql_prepared_routes,
                             standard_conforming_strings=self.client_params.get(
                                 "standard_conforming_strings", "on") == "on")
                if c.session_state == "prepare" and c.prepared_name:
                    self._sql_prepared_routes[c.prepared_name] = c.route
                role = "reader" if c.route is Route.READ and c.transaction != "begin" else "writer"
                if c.route is Route.READ and c.reason.startswith(("transaction", "empty")) and c.hint is None:
                    role = ""  # COMMIT, ROLLBACK, an empty query: wherever the session is
            elif type_ == _P:
                name, _, rest = payload.partition(b"\0")
                query = rest[: rest.find(b"\0")].decode("utf-8", "surrogateescape")
                c = classify(query, self._functions, self._sql_prepared_routes)
                role = "reader" if c.route is Route.READ and c.transaction != "begin" else "writer"
                self._stmt_roles[name.decode("utf-8", "surrogateescape")] = role
            elif type_ == _B:
                _portal, _, rest = payload.partition(b"\0")
                statement = rest[: rest.find(b"\0")].decode("utf-8", "surrogateescape")
                role = self._stmt_roles.get(statement, "writer")
            else:
                continue
            if role == "writer":
                return "writer"
            decided = decided or role or None
        return decided

    async def _park(self, att: _Attachment) -> None:
        """Stop pumping an idle backend but keep it open for the session's next switch back."""
        att.closing = True
        att.scope.cancel()
        await att.done.wait()
        att.released = True  # the connection now belongs to _parked
        self._parked[self._role] = att.backend
        self.backend = None
        self._att = None

    async def _switch(self, role: str) -> bool:
        """readwrite: make ``role``'s backend the active one (opening it if needed)."""
        old_role = self._role
        if self._att is not None:
            await self._park(self._att)
        self._role = role
        if role == "reader" and self.ctx.endpoint.consistency == "session" and self._wrote:
            if not await self._reader_caught_up():
                self._role = old_role
                role = old_role
        backend = self._parked.pop(role, None)
        if backend is not None:
            if backend.conn.peer_closed():
                self.ctx.cluster.backend_failed(backend.instance, "idle session backend lost")
            elif self._placement_ok(backend.instance, role):
                try:
                    await self._replay(backend)
                    self._activate(backend)
                    return True
                except (OSError, BackendError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                    self.ctx.cluster.backend_failed(backend.instance, "idle session backend lost")
            self.ctx.cluster.connections[backend.instance] -= 1
            if self._nursery is not None:
                self._nursery.start_soon(backend.conn.aclose)
        return await self._reattach()

    def _activate(self, backend: BackendConnection) -> None:
        if self.cancel_key is not None:
            self.ctx.cancels.retarget(*self.cancel_key, self._cancel_target(backend))
        self._start_attachment(backend)
        self._checked_generation = self.ctx.cluster.topology.generation

    async def _reader_caught_up(self) -> bool:
        """Session consistency: does a replica have everything this session wrote? Asks the
        writer backend for its WAL position, then the replica backend for its replay position,
        waiting up to the endpoint's session_wait_ms. False sends the read to the writer."""
        writer = self._parked.get("writer")
        if writer is None:
            return True  # no writer connection (failover): nothing of ours to wait for
        rows: list[tuple[str | None, ...]] = []
        try:
            await self._exchange(writer, m.Query("select pg_current_wal_insert_lsn() - '0/0'").encode(), 1, rows)
        except (OSError, BackendError):
            return True
        target = int(float(rows[0][0] or 0)) if rows else 0
        reader = self._parked.get("reader")
        if reader is None or not self._placement_ok(reader.instance, "reader"):
            if reader is not None:
                self._parked.pop("reader")
                self.ctx.cluster.connections[reader.instance] -= 1
                if self._nursery is not None:
                    self._nursery.start_soon(reader.conn.aclose)
            try:
                reader = await self._open_routed_backend(0.0, "reader")
            except (_NoRoute, _ServerRefused):
                return False
            self._parked["reader"] = reader
        if reader.in_recovery is False:
            self._wrote = False
            return True  # the "reader" is the writer itself (fallback)
        deadline = trio.current_time() + self.ctx.endpoint.session_wait_ms / 1000
        while True:
            if reader.lsn_reached >= target:
                self._wrote = False
                return True
            rows = []
            try:
                await self._exchange(reader, m.Query("select pg_last_wal_replay_lsn() - '0/0'").encode(), 1, rows)
            except (OSError, BackendError):
                return False
            reader.lsn_reached = int(float(rows[0][0] or 0)) if rows and rows[0][0] else 0
            if reader.lsn_reached >= target:
                continue
            if trio.current_time() >= deadline:
                self.log.debug("session_read_on_writer", lsn=target, replayed=reader.lsn_reached)
                return False
            await trio.sleep(0.002)

    async def _reattach(self) -> bool:
        """Find a backend for the session's next request and rebuild its state there."""
        if not self.state.replayable:
            raise _Fatal("08006", f"the server connection was lost and the session's {self.state.pinned_by} "
                                  "cannot be moved to another server")
        timeout = self.ctx.cluster.config.failover_timeout_ms / 1000
        try:
            with self.ctx.cluster.metrics.holding():
                backend = await self._open_routed_backend(timeout)
            await self._replay(backend)
        except _NoRoute as e:
            self.ctx.cluster.metrics.error("no_route")
            self._mode = _Mode("error", "57P03", f"{e} (waited {timeout * 1000:.0f} ms)", "I")
            return False
        except _ServerRefused as e:
            self._mode = _Mode("error", e.sqlstate, str(e), "I")
            return False
        except (OSError, BackendError) as e:
            self._mode = _Mode("error", "08006", f"could not re-attach the session: {e}", "I")
            return False
        changed = b"".join(m.ParameterStatus(k, v).encode() for k, v in backend.parameters.items()
                           if self.client_params.get(k) != v)
        self.client_params.update(backend.parameters)
        if changed:
            await self.client.send_all(changed)
        self._activate(backend)
        self.log.info("session_reattached", instance=backend.instance, pid=backend.process_id)
        return True

    async def _emulate(self, msgs: list[tuple[int, bytes]]) -> bool:
        """Answer the client ourselves while there is no backend to answer: a failed
        transaction waiting for ROLLBACK, or an error to report up to the next Sync.
        Returns True when the chunk should go on to a backend after all."""
        mode = self._mode
        if mode is None:
            return True
        out = bytearray()
        for type_, payload in msgs:
            mode = self._mode
            if mode is None:
                break
            if type_ == _X:
                break
            if mode.kind == "failed_tx":
                if type_ == _Q:
                    sql = _text(payload)
                    if is_rollback(sql) or (mode.reported and ends_transaction(sql)):
                        out += m.CommandComplete("ROLLBACK").encode() + m.ReadyForQuery("I").encode()
                        self._mode = None
                    else:
                        out += self._mode_error(mode) + m.ReadyForQuery("E").encode()
                    continue
                if type_ == _P and is_rollback(_parse_query(payload)):
                    # An extended-protocol ROLLBACK: a fresh backend runs it (outside any
                    # transaction it only warns), and the session is whole again.
                    self._mode = None
                    if out:
                        await self.client.send_all(out)
                    return True
            if type_ in (_Q, _F):
                out += self._mode_error(mode) + m.ReadyForQuery(mode.status).encode()
                mode.batch_error_sent = False
                if mode.kind == "error":
                    self._mode = None
            elif type_ == _S:
                if not mode.batch_error_sent:
                    out += self._mode_error(mode)
                out += m.ReadyForQuery(mode.status).encode()
                mode.batch_error_sent = False
                if mode.kind == "error":
                    self._mode = None
            elif not mode.batch_error_sent:
                out += self._mode_error(mode)
                mode.batch_error_sent = True
        if out:
            await self.client.send_all(out)
        return False

    def _mode_error(self, mode: _Mode) -> bytes:
        if mode.kind == "failed_tx":
            if mode.reported:
                return m.error_response("ERROR", "25P02", "current transaction is aborted, commands ignored "
                                        "until end of transaction block")
            mode.reported = True
        return m.error_response("ERROR", mode.sqlstate, mode.message)

    async def _server_pump(self, att: _Attachment) -> None:
        backend = att.backend
        src, dst = backend.conn, self.client
        scanner = att.scanner
        view = att.view
        hub = None
        if isinstance(src, RawConn) and isinstance(dst, RawConn):
            hub = self.ctx.hub
            self._csock = dst.sock
        idle = False
        lost = False
        try:
            with att.scope:
                while True:
                    if idle and hub is not None:
                        got = await hub.wait(src.sock.fileno(), att.on_readable)  # type: ignore[attr-defined]
                        assert isinstance(got, HandBack)
                        if got.kind == _HB_GONE:  # the client went away
                            self._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
                            return
                        if got.kind != READ.kind:  # bytes the hub could not forward at once
                            if got.data and not await self._send_answer(got.data):
                                return
                            if got.kind == _HB_LOST:
                                lost = True
                                break
                            idle = got.extra
                            if idle and self.draining and self.idle():
                                self.scope.cancel()
                            continue
                        idle = False  # READ: the socket is ours again
                    try:
                        # After a ReadyForQuery that ended the chunk the server has nothing to
                        # say until the client asks again: wait before trying to read.
                        n = await (src.recv_into_after_wait(att.buf) if idle else src.recv_into(att.buf))
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                        n = 0
                    if n == 0:
                        lost = True
                        break
                    try:
                        chunk, ready, lost = self._server_chunk(backend, view[:n], scanner.scan(view[:n]))
                    except ProtocolError:
                        lost = True
                        break
                    if chunk and not await self._send_answer(chunk):
                        return
                    if lost:
                        break
                    idle = ready and scanner.at_boundary
                    if idle and self.draining and self.idle():
                        self.scope.cancel()  # the transaction or statement finished: close now
            if lost and not att.closing:
                await self._backend_lost(att)
        finally:
            att.done.set()

    async def _send_answer(self, data: bytes | memoryview) -> bool:
        """Forward server bytes to the client; False (and the session ends) when it is gone."""
        self.request_forwarded = True
        try:
            await self.client.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            self._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
            return False
        return True

    def _server_chunk(self, backend: BackendConnection, chunk: memoryview,
                      found: list[tuple[int, bytes]]) -> tuple[memoryview, bool, bool]:
        """Account for the messages of a chunk of server bytes. Returns what to forward to
        the client, whether a ReadyForQuery came, and whether the backend is lost."""
        ready = False
        lost = False
        for type_, payload in found:
            if type_ == _Z:
                ready = True
                if payload:
                    backend.status = chr(payload[0])
                if self.inflight:
                    self.inflight -= 1
                    if not self.inflight:
                        self._request_done()
            elif type_ == _S:
                self._note_parameter(payload)
            elif _is_fatal(payload):
                # The server is about to close (shutdown, crash of a sibling, terminate):
                # the session survives it, so the client must not see the FATAL. It is the
                # last message the server sends.
                size = len(payload) + 5
                n = len(chunk)
                if chunk[n - size:n] == _frame_bytes(_E, payload):
                    chunk = chunk[: n - size]
                lost = True
        return chunk, ready, lost

    def _hub_answer(self, att: _Attachment) -> HandBack | None:
        """Run by the hub when the backend's socket is readable: relay the answer to the client."""
        sock = att.sock
        assert sock is not None
        try:
            n = sock.recv_into(att.buf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return READ
        if n == 0:
            return READ
        scanner = att.scanner
        try:
            chunk, ready, lost = self._server_chunk(att.backend, att.view[:n], scanner.scan(att.view[:n]))
        except ProtocolError:
            return HandBack(_HB_LOST, b"")
        if lost:
            return HandBack(_HB_LOST, bytes(chunk))
        self.request_forwarded = True
        try:
            sent = self._csock.send(chunk)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return HandBack(_HB_GONE)
        idle = ready and scanner.at_boundary
        if sent < len(chunk):
            return HandBack(_HB_SEND, bytes(chunk[sent:]), idle)
        if idle and self.draining and self.idle():
            self.scope.cancel()  # the transaction or statement finished: close now
        return None

    def _note_parameter(self, payload: bytes) -> None:
        name, _, rest = payload.partition(b"\0")
        self.client_params[name.decode("utf-8", "replace")] = rest.rstrip(b"\0").decode("utf-8", "replace")

    async def _backend_lost(self, att: _Attachment) -> None:
        self._request_done()
        backend = att.backend
        cluster = self.ctx.cluster
        cluster.backend_failed(backend.instance, "session backend connection lost")
        self._release(att)
        self._att = None
        if not self.state.replayable:
            await self._send_quietly(fatal_bytes("08006", "the server connection was lost and the session's "
                                                 f"{self.state.pinned_by} cannot be moved to another server"))
            self._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
            return
        if self.inflight == 0:
            self.log.info("session_backend_lost", instance=backend.instance, status=backend.status)
            if backend.status in ("T", "E"):
                self._mode = _Mode("failed_tx", "08007", _TX_LOST, "E")
            return
        in_tx = self.request_status in ("T", "E")
        if (self.request_retryable and not in_tx and backend.in_recovery and not self.request_forwarded
                and self.inflight == 1):
            # A read outside a transaction that lost its replica: run it elsewhere.
            request = bytes(self.request_buf)
            if await self._reattach():
                assert self._att is not None
                self.log.info("request_retried", lost=backend.instance, instance=self._att.backend.instance)
                try:
                    await self._att.backend.conn.send_all(request)
                    return
                except OSError:
                    return  # the new pump sees this loss in turn
            self._mode = None
        status = "E" if in_tx else "I"
        message = _TX_LOST if in_tx else ("the server connection was lost while the statement ran; "
                                          "its outcome is unknown")
        out = b"".join(m.error_response("ERROR", "08007", message) + m.ReadyForQuery(status).encode()
                       for _ in range(self.inflight))
        self.ctx.cluster.metrics.error("transaction_lost" if in_tx else "statement_lost")
        self.inflight = 0
        if in_tx:
            self._mode = _Mode("failed_tx", "08007", _TX_LOST, "E", reported=True)
        self.log.info("session_backend_lost", instance=backend.instance, in_flight=True, in_transaction=in_tx)
        await self.client.send_all(out)


_TX_LOST = ("the server connection was lost during the transaction; its outcome is unknown. "
            "Roll back to continue")
_RETRY_BUFFER_LIMIT = 1 << 20
_Q, _P, _C, _S, _F, _X, _Z, _E, _B = (ord(c) for c in "QPCSFXZEB")
_REQUEST_ENDS = frozenset((_Q, _S, _F))
# What a hub callback hands back to the session's task (besides hub.READ): the chunk for
# the general path, bytes still to send, a lost backend, a client gone.
_HB_CHUNK, _HB_SEND, _HB_LOST, _HB_GONE = 1, 2, 3, 4


def _is_fatal(error_payload: bytes) -> bool:
    """Whether an ErrorResponse payload has severity FATAL or PANIC (its S field comes first)."""
    if error_payload.startswith((b"SFATAL\0", b"SPANIC\0")):
        return True
    return b"\0VFATAL\0" in error_payload or b"\0VPANIC\0" in error_payload


def _frame_bytes(type_: int, payload: bytes) -> bytes:
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + payload


def _text(payload: bytes) -> str:
    return payload.rstrip(b"\0").decode("utf-8", "surrogateescape")


def _parse_query(payload: bytes) -> str:
    _name, _, rest = payload.partition(b"\0")
    return rest[: rest.find(b"\0")].decode("utf-8", "surrogateescape")


class _NoRoute(Exception):
    pass


class _ServerRefused(Exception):
    def __init__(self, sqlstate: str, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.raw = raw


class _Attachment:
    """One backend connection of a session and the task pumping its answers to the client."""

    def __init__(self, backend: BackendConnection, on_readable: Callable[[_Attachment], HandBack | None]) -> None:
        self.backend = backend
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.closing = False
        self.released = False
        self.scanner = MessageScanner(b"ZSE")
        self.buf = bytearray(RELAY_BUFFER)
        self.view = memoryview(self.buf)
        conn = backend.conn
        self.sock: socket.socket | None = conn.sock if isinstance(conn, RawConn) else None
        self.on_readable: Callable[[], HandBack | None] = functools.partial(on_readable, self)


@dataclass
class _Mode:
    """The session answers by itself: ``failed_tx`` until ROLLBACK, or ``error`` until Sync."""

    kind: str
    sqlstate: str
    message: str
    status: str  # transaction status for our ReadyForQuery
    reported: bool = False
    batch_error_sent: bool = False
