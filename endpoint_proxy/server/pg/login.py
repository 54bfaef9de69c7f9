"""PostgreSQL client login: the startup packet, TLS, GSSENC and cancel requests, authentication.

Everything before the first backend: the client is authenticated here against the cluster's
users (SCRAM-SHA-256, md5, or cleartext over TLS); an unknown user gets the same exchange and
error as a wrong password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from ...config import UserConfig
from ...protocol.errors import AuthenticationError, ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import ServerAuth
from ...protocol.pg.framing import FrameReader
from ...protocol.pg.startup import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage, parse_startup_packet
from ...relay.net import Conn, start_tls_server
from ..admission import PG_TOO_MANY, Refusal, Ticket
from ..cluster import AuthQueryError
from ..session.context import CONSOLE_DATABASE, SessionContext

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

log = structlog.get_logger("endpoint_proxy.session")

STARTUP_BUFFER = 8192


class Fatal(Exception):
    """End the session with a FATAL ErrorResponse to the client (``raw``: the server's own)."""

    def __init__(self, sqlstate: str, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.raw = raw


@dataclass
class Login:
    """How a client's startup ended: a logged-in user, a console request, or nothing (a cancel)."""

    client: Conn  # TLS may have replaced the raw connection
    startup: StartupMessage | None = None  # logged in (or asking for the console)
    console: tuple[FrameReader, bytearray] | None = None  # the console was asked for
    leftover: bytes = b""  # what the client sent right behind its last authentication message
    user: UserConfig | None = None  # who logged in
    auth: ServerAuth | None = None  # the finished exchange (its SCRAM keys log in to servers)


async def _read_into(client: Conn, reader: FrameReader, buf: bytearray) -> None:
    n = await client.recv_into(buf)
    if n == 0:
        raise ConnectionResetError("client closed the connection")
    reader.feed(memoryview(buf)[:n])


class HasClient(Protocol):
    client: Conn
    ticket: Ticket | None  # counts the session against the connection limits (server/admission.py)


def _refused(ctx: SessionContext, refusal: Refusal | None) -> None:
    """Over a connection limit: FATAL 53300, as PostgreSQL and PgBouncer answer."""
    if refusal is not None:
        ctx.cluster.metrics.error("connection_limit")
        raise Fatal(PG_TOO_MANY, refusal.pg_message)


async def login(ctx: SessionContext, holder: HasClient, logger: FilteringBoundLogger) -> Login:
    """Run the startup phase; raises Fatal, ProtocolError or a network error. A TLS upgrade
    replaces ``holder.client`` at once, so an error after it goes over TLS too. The session's
    ``holder.ticket`` is admitted after the StartupMessage and for its user after authentication
    (over a limit: Fatal 53300)."""
    client = holder.client
    reader = FrameReader(max_length=ctx.max_startup_bytes)
    buf = bytearray(STARTUP_BUFFER)
    while True:
        payload = reader.next_startup()
        if payload is None:
            await _read_into(client, reader, buf)
            continue
        packet = parse_startup_packet(payload)
        if isinstance(packet, SSLRequest):
            if reader.buffered:
                # Bytes sent before the TLS handshake would be read as if they came over
                # TLS (CVE-2021-23214): refuse.
                raise ProtocolError("received unencrypted data after SSL request")
            if client.is_tls:
                raise ProtocolError("SSLRequest on a connection that already uses TLS")
            if ctx.tls_context is None or ctx.endpoint.tls == "off":
                await client.send_all(b"N")
                continue
            await client.send_all(b"S")
            client = holder.client = await start_tls_server(client, ctx.tls_context)
            continue
        if isinstance(packet, GSSENCRequest):
            if reader.buffered:
                raise ProtocolError("received unencrypted data after GSSENC request")
            await client.send_all(b"N")
            continue
        if isinstance(packet, CancelRequest):
            # Like PostgreSQL, close the connection only once the cancel is delivered: a client
            # waits for that before its next statement, which the cancel must miss.
            if ctx.cancel_handler is not None:
                if not await ctx.cancel_handler(packet, _source_address(client)):
                    ctx.cluster.metrics.error("cancel_unknown")
            return Login(client)
        assert isinstance(packet, StartupMessage)
        if ctx.endpoint.tls == "required" and not client.is_tls:
            raise Fatal("28000", f"endpoint {ctx.endpoint.name} requires TLS")
        if packet.minor > 0 or packet.protocol_options:
            npv = m.NegotiateProtocolVersion(0, tuple(packet.protocol_options))
            await client.send_all(npv.encode())
        if packet.database == CONSOLE_DATABASE and ctx.console is not None:
            return Login(client, packet, console=(reader, buf))  # never counted: an operator gets in
        ticket = holder.ticket
        if ticket is not None:
            _refused(ctx, ticket.admit(ctx.endpoint))
        replication = packet.parameters.get("replication", "false").lower() not in ("false", "off", "no", "0")
        if replication and not ctx.endpoint.allow_replication:
            raise Fatal("08P01", f"endpoint {ctx.endpoint.name} does not allow replication connections "
                                 "(allow_replication)")
        user, auth = await _authenticate(ctx, client, packet, reader, buf, logger)
        if ticket is not None:
            _refused(ctx, ticket.admit_user(user))  # like PostgreSQL's role limit: after authentication
        return Login(client, packet, leftover=reader.take_buffered(), user=user, auth=auth)


async def _authenticate(ctx: SessionContext, client: Conn, startup: StartupMessage, reader: FrameReader,
                        buf: bytearray, logger: FilteringBoundLogger) -> tuple[UserConfig, ServerAuth]:
    """Check the client's password; returns its user (configured, or found by auth_query) and the
    finished exchange (whose SCRAM keys log in to the servers for it, see pg_backend_credential)."""
    cluster = ctx.cluster
    try:
        user = await cluster.find_user(startup.user)
    except AuthQueryError as e:
        raise Fatal("08006", f"cannot check the login now: {e}") from None
    method = cluster.client_method(user)
    if method == "password" and not client.is_tls:
        raise Fatal("28000", "cleartext password authentication requires TLS")
    auth = cluster.pg_server_auth(startup.user, user, method)
    await client.send_all(auth.start())
    while True:
        # Judge the type byte before waiting for the body: a second StartupMessage would
        # otherwise read as a long message and stall until the timeout.
        type_ = reader.peek_type()
        if type_ is not None and type_ != ord("p"):
            raise ProtocolError(f"expected a password response, got message type {type_!r}")
        msg = reader.next_message()
        if msg is None:
            await _read_into(client, reader, buf)
            continue
        _type, payload = msg
        try:
            reply, done = auth.step(payload)
        except AuthenticationError as e:
            logger.info("client_auth_failed", user=startup.user)
            raise Fatal(e.sqlstate, e.message) from None
        if done and user is None:
            # Only reachable if a method accepted an unknown user: never let one in.
            raise Fatal("28P01", f'password authentication failed for user "{startup.user}"')
        if reply:
            await client.send_all(reply)
        if done:
            assert user is not None
            return user, auth


def _source_address(client: Conn) -> str | None:
    """The client's IP address (None when the transport does not say)."""
    sock = getattr(client, "sock", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else None
    except (OSError, IndexError, TypeError):
        return None
