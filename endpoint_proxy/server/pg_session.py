"""A PostgreSQL client session: startup, TLS, authentication, routing to a backend, and the relay."""

from __future__ import annotations

import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import trio

from ..config import Address, ClusterConfig, EndpointConfig
from ..protocol.errors import AuthenticationError, FrameError, ProtocolError
from ..protocol.pg import messages as m
from ..protocol.pg.auth import CleartextServerAuth, Md5ServerAuth, ScramServerAuth, ServerAuth
from ..protocol.pg.framing import FrameReader, MessageScanner
from ..protocol.pg.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)
from .net import Conn, RawConn, start_tls_server
from .pg_backend import BackendConnection, BackendError, open_backend

if TYPE_CHECKING:
    from .cluster import ClusterRuntime

log = structlog.get_logger("endpoint_proxy.session")

RELAY_BUFFER = 256 * 1024

# Startup parameters that belong to the connection, not to the backend session.
_NOT_FORWARDED = frozenset({"user"})


@dataclass(frozen=True)
class CancelTarget:
    address: Address
    process_id: int
    secret_key: int


class CancelRegistry:
    """Maps the (pid, secret) pairs the proxy handed to clients to the backends they name.

    The secret's low bits carry the worker index, so a cancel that lands on another worker
    process can be forwarded to the worker that owns the session.
    """

    def __init__(self, worker_index: int = 0, worker_bits: int = 6) -> None:
        self.worker_index = worker_index
        self.worker_bits = worker_bits
        self._targets: dict[tuple[int, int], CancelTarget] = {}

    def issue(self, process_id: int, target: CancelTarget) -> int:
        while True:
            secret = (secrets.randbits(32 - self.worker_bits) << self.worker_bits) | self.worker_index
            if (process_id, secret) not in self._targets:
                self._targets[(process_id, secret)] = target
                return secret

    def withdraw(self, process_id: int, secret: int) -> None:
        self._targets.pop((process_id, secret), None)

    def lookup(self, process_id: int, secret: int) -> CancelTarget | None:
        return self._targets.get((process_id, secret))

    def owner_of(self, secret: int) -> int:
        return secret & ((1 << self.worker_bits) - 1)


class SessionContext:
    """What a session needs from the process around it."""

    def __init__(self, *, cluster: ClusterRuntime, endpoint: EndpointConfig,
                 tls_context: ssl.SSLContext | None, cancels: CancelRegistry,
                 startup_timeout_s: float, max_startup_bytes: int, max_message_bytes: int,
                 connect_timeout_s: float,
                 cancel_handler: Callable[[CancelRequest], object] | None = None) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.tls_context = tls_context
        self.cancels = cancels
        self.startup_timeout_s = startup_timeout_s
        self.max_startup_bytes = max_startup_bytes
        self.max_message_bytes = max_message_bytes
        self.connect_timeout_s = connect_timeout_s
        self.cancel_handler = cancel_handler


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
        self.session_id = session_id
        self.log = log.bind(conn=session_id, endpoint=ctx.endpoint.name)
        self.backend: BackendConnection | None = None
        self.cancel_key: tuple[int, int] | None = None

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
            if startup is None:
                return
            await self._attach(startup)
            await self._relay(leftover)
        except _Fatal as e:
            await self._send_quietly(e.raw or fatal_bytes(e.sqlstate, str(e)))
        except FrameError as e:
            # An impossible length: close at once, allocate nothing, say nothing more.
            self.log.info("client_protocol_error", error=e.message)
        except ProtocolError as e:
            self.log.info("client_protocol_error", error=e.message, sqlstate=e.sqlstate)
            await self._send_quietly(fatal_bytes(e.sqlstate, e.message))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            await self._close()

    async def _send_quietly(self, data: bytes) -> None:
        with trio.move_on_after(1):
            try:
                await self.client.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                pass

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if self.cancel_key is not None:
                self.ctx.cancels.withdraw(*self.cancel_key)
            if self.backend is not None:
                self.ctx.cluster.connections[self.backend.instance] -= 1
                await self.backend.conn.aclose()
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
                if ctx.cancel_handler is not None:
                    ctx.cancel_handler(packet)
                return None
            assert isinstance(packet, StartupMessage)
            if ctx.endpoint.tls == "required" and not self.client.is_tls:
                raise _Fatal("28000", f"endpoint {ctx.endpoint.name} requires TLS")
            if packet.minor > 0 or packet.protocol_options:
                npv = m.NegotiateProtocolVersion(0, tuple(packet.protocol_options))
                await self.client.send_all(npv.encode())
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

    async def _attach(self, startup: StartupMessage) -> None:
        ctx = self.ctx
        cluster = ctx.cluster
        user = cluster.config.user(startup.user)
        assert user is not None
        params = {k: v for k, v in startup.parameters.items()
                  if k not in _NOT_FORWARDED and not k.startswith("_pq_.")}
        params.setdefault("database", startup.user)
        tried: set[str] = set()
        deadline = trio.current_time() + cluster.config.failover_timeout_ms / 1000
        while True:
            remaining = max(0.0, deadline - trio.current_time())
            decision = await cluster.wait_for_route(ctx.endpoint, remaining)
            name = decision.instance
            if name is None or name in tried:
                reason = decision.reason or "no instance is available"
                raise _Fatal("08006", f"endpoint {ctx.endpoint.name}: {reason}")
            address = cluster.config.instance_named(name).address
            cluster.connections[name] += 1
            try:
                with trio.fail_after(ctx.connect_timeout_s):
                    self.backend = await open_backend(
                        name, address, params, user=user.name, password=user.password,
                        tls_mode=cluster.config.backend_tls)
                break
            except BackendError as e:
                cluster.connections[name] -= 1
                if e.raw_error is not None:
                    # The server's own refusal (unknown database, too many connections):
                    # hand it to the client exactly as sent.
                    raise _Fatal(e.sqlstate, str(e), raw=e.raw_error) from None
                cluster.backend_failed(name, str(e))
                tried.add(name)
            except (OSError, trio.TooSlowError) as e:
                cluster.connections[name] -= 1
                cluster.backend_failed(name, str(e) or "connect timed out")
                tried.add(name)
            if ctx.endpoint.kind == "instance":
                raise _Fatal("08006", f"could not connect to instance {name}")
        backend = self.backend
        secret = ctx.cancels.issue(backend.process_id,
                                   CancelTarget(address, backend.process_id, backend.secret_key))
        self.cancel_key = (backend.process_id, secret)
        hello = (backend.startup_messages
                 + m.BackendKeyData(backend.process_id, secret).encode()
                 + m.ReadyForQuery(backend.status).encode())
        await self.client.send_all(hello)
        self.log.debug("session_attached", instance=backend.instance, pid=backend.process_id)

    # --- the relay ----------------------------------------------------------------------------

    async def _relay(self, leftover: bytes) -> None:
        backend = self.backend
        assert backend is not None
        client_scanner = MessageScanner(b"X", max_length=self.ctx.max_message_bytes)
        if leftover:
            client_scanner.scan(leftover)
            await backend.conn.send_all(leftover)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_client, client_scanner, nursery.cancel_scope)
            nursery.start_soon(self._pump_server, nursery.cancel_scope)

    async def _pump_client(self, scanner: MessageScanner, scope: trio.CancelScope) -> None:
        backend = self.backend
        assert backend is not None
        src, dst = self.client, backend.conn
        buf = bytearray(RELAY_BUFFER)
        view = memoryview(buf)
        idle = False
        try:
            while True:
                # A chunk that ended on a message boundary was most likely a whole request:
                # the client now waits for the answer, so wait before trying to read.
                n = await (src.recv_into_after_wait(buf) if idle else src.recv_into(buf))
                if n == 0:
                    return
                chunk = view[:n]
                try:
                    scanner.scan(chunk)
                except FrameError as e:
                    self.log.info("client_protocol_error", error=e.message)
                    return
                await dst.send_all(chunk)
                idle = scanner.at_boundary
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            return
        finally:
            scope.cancel()

    async def _pump_server(self, scope: trio.CancelScope) -> None:
        backend = self.backend
        assert backend is not None
        src, dst = backend.conn, self.client
        scanner = MessageScanner(b"Z")
        buf = bytearray(RELAY_BUFFER)
        view = memoryview(buf)
        idle = False
        try:
            while True:
                # After a ReadyForQuery that ended the chunk the server has nothing more to
                # say until the client asks again: wait before trying to read.
                n = await (src.recv_into_after_wait(buf) if idle else src.recv_into(buf))
                if n == 0:
                    return
                chunk = view[:n]
                ready = scanner.scan(chunk)
                for _type, payload in ready:
                    backend.status = chr(payload[0]) if payload else backend.status
                await dst.send_all(chunk)
                idle = bool(ready) and scanner.at_boundary
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                ProtocolError):
            return
        finally:
            scope.cancel()
