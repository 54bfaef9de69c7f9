"""MySQL/MariaDB client login: the greeting, the TLS upgrade, authentication, COM_CHANGE_USER's.

The greeting carries the thread id of the session's first server connection when one could
be greeted in time, so that the id a client sees in its handshake, in CONNECTION_ID() and in
SHOW PROCESSLIST agree (and a client can KILL its own sessions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ...config import UserConfig
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
from ...protocol.mysql.framing import PacketReader, encode_packet
from ...protocol.mysql.handshake import HandshakeResponse41, HandshakeV10, SSLRequest, decode_handshake_response
from ...protocol.mysql.packets import err_packet
from ...relay.net import Conn, send_quietly, start_tls_server
from ..admission import Refusal, Ticket
from ..session.context import SessionContext

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

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


class Fatal(Exception):
    """End the session with an ERR packet (``raw``: a server's own, whole) at sequence ``seq``."""

    def __init__(self, errno: int, sqlstate: str, message: str, *, seq: int = 0, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.sqlstate = sqlstate
        self.seq = seq
        self.raw = raw


@dataclass
class MyLogin:
    client: Conn
    user: UserConfig
    capabilities: int
    character_set: int
    schema: str | None
    attrs: dict[str, str] | None
    ok_seq: int  # the sequence id of the OK that ends the login
    nonce: bytes
    stage1: bytes | None = None  # SHA1(password), recovered from a mysql_native_password login


class ClientPackets:
    """Whole client packets, read as the login needs them (no buffer kept afterwards)."""

    def __init__(self, client: Conn, max_payload: int = HANDSHAKE_MAX) -> None:
        self.client = client
        self.reader = PacketReader(max_payload)

    async def next(self) -> tuple[int, bytes]:
        buf = bytearray(8192)
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            n = await self.client.recv_into_after_wait(buf)
            if n == 0:
                raise ConnectionResetError("client left during the handshake")
            self.reader.feed(memoryview(buf)[:n])


def server_auth(ctx: SessionContext, user_name: str, tls: bool, nonce: bytes) -> ServerAuth:
    cluster = ctx.cluster
    user = cluster.config.user(user_name)
    method = (user.auth if user and user.auth else None) or cluster.config.client_auth
    native_hash, sha2_digest = cluster.mysql_secrets(user)
    if method == CACHING_SHA2_PASSWORD:
        return CachingSha2ServerAuth(user_name, "%", sha2_digest, tls=tls, private_key=cluster.rsa_key(), nonce=nonce)
    return NativePasswordServerAuth(user_name, "%", native_hash, nonce=nonce)


class HasClient(Protocol):
    client: Conn
    ticket: Ticket | None  # counts the session against the connection limits (server/admission.py)


def refusal_fatal(ctx: SessionContext, refusal: Refusal, seq: int) -> Fatal:
    """Over a connection limit: ERR 1040 (1203 for a user's limit), as MySQL answers."""
    ctx.cluster.metrics.error("connection_limit")
    errno, sqlstate, message = refusal.mysql_error
    return Fatal(errno, sqlstate, message, seq=seq)


async def refuse(client: Conn, refusal: Refusal) -> None:
    """Answer a connection over the endpoint's or the process's limit with ERR 1040 in place of
    the greeting, as MySQL does, and close it (no server is contacted)."""
    errno, sqlstate, message = refusal.mysql_error
    try:
        await send_quietly(client, encode_packet(0, err_packet(errno, sqlstate, message)))
    finally:
        await client.aclose()


async def login(ctx: SessionContext, holder: HasClient, logger: FilteringBoundLogger, *, connection_id: int,
                server_version: str | None) -> MyLogin:
    """Greet, upgrade to TLS if asked, authenticate. Raises Fatal or MySQLProtocolError. A TLS
    upgrade replaces ``holder.client`` at once, so an error after it goes over TLS too. The
    session's ``holder.ticket`` is admitted before the greeting (over the endpoint's or the
    process's limit: ERR 1040 in its place) and for its user after authentication (ERR 1203)."""
    client = holder.client
    ticket = holder.ticket
    if ticket is not None:
        refusal = ticket.admit(ctx.endpoint)  # admitted at accept already (the proxy): a no-op then
        if refusal is not None:
            raise refusal_fatal(ctx, refusal, 0)
    tls_ok = ctx.tls_context is not None and ctx.endpoint.tls != "off"
    offered = OFFERED | (k.CLIENT_SSL if tls_ok else 0)
    if ctx.cluster.config.allow_local_infile:
        offered |= k.CLIENT_LOCAL_FILES
    nonce = make_nonce()
    charset = k.UTF8MB4_GENERAL_CI
    greeting = HandshakeV10(
        server_version=server_version or ctx.cluster.mysql_server_version or SERVER_VERSION,
        connection_id=connection_id & 0xFFFFFFFF, auth_plugin_data=nonce, capabilities=offered,
        character_set=charset, status=k.SERVER_STATUS_AUTOCOMMIT,
        auth_plugin_name=ctx.cluster.config.client_auth)
    await client.send_all(encode_packet(0, greeting.encode()))
    packets = ClientPackets(client)
    seq, payload = await packets.next()
    response = decode_handshake_response(payload)
    if isinstance(response, SSLRequest):
        if not tls_ok:
            raise MySQLProtocolError("Bad handshake: TLS is not offered here", errno=1043, sqlstate="08S01")
        assert ctx.tls_context is not None
        # The client does not wait for an answer: what followed the SSLRequest is its TLS
        # ClientHello, and goes to the TLS layer.
        client = holder.client = await start_tls_server(client, ctx.tls_context, packets.reader.take_buffered())
        packets = ClientPackets(client)
        seq, payload = await packets.next()
        response = decode_handshake_response(payload)
        if isinstance(response, SSLRequest):
            raise MySQLProtocolError("Bad handshake: a second SSL request", errno=1043, sqlstate="08S01")
    elif ctx.endpoint.tls == "required":
        raise Fatal(1045, "28000", f"endpoint {ctx.endpoint.name} requires TLS", seq=seq + 1)
    assert isinstance(response, HandshakeResponse41)
    user = ctx.cluster.config.user(response.username)
    # The greeting announced the cluster's method with this nonce; a user whose method differs
    # is asked to switch (the step sees the client's plugin and says so).
    auth = server_auth(ctx, response.username, client.is_tls, nonce)
    auth.start()
    data, plugin = response.auth_response, response.auth_plugin_name
    if plugin is None and response.capabilities & k.CLIENT_PLUGIN_AUTH:
        plugin = ctx.cluster.config.client_auth
    seq = await _exchange(client, packets, auth, seq, data, plugin, response.username, logger)
    if user is None:
        raise Fatal(1045, "28000", f"Access denied for user '{response.username}'@'%'", seq=seq)
    if ticket is not None:
        refusal = ticket.admit_user(user)  # like MySQL's max_user_connections: after authentication
        if refusal is not None:
            raise refusal_fatal(ctx, refusal, seq)
    if packets.reader.buffered:
        raise MySQLProtocolError("Malformed communication packet: data before the login ended", errno=1835)
    return MyLogin(client, user, response.capabilities & offered, response.character_set or charset,
                   response.database or None, response.connect_attrs, seq, nonce, _stage1(auth))


def _stage1(auth: ServerAuth) -> bytes | None:
    """What a mysql_native_password login lets the proxy log in to servers with, unknown to it."""
    return auth.passthrough_stage1() if isinstance(auth, NativePasswordServerAuth) else None


async def _exchange(client: Conn, packets: ClientPackets, auth: ServerAuth, seq: int, data: bytes,
                    plugin: str | None, user_name: str, logger: FilteringBoundLogger) -> int:
    """Run an authentication exchange; returns the sequence id of the packet that ends it."""
    while True:
        try:
            reply, done = auth.step(data, plugin)
        except MySQLAuthenticationError as e:
            logger.info("client_auth_failed", user=user_name)
            raise Fatal(e.errno, e.sqlstate, e.message, seq=seq + 1) from None
        plugin = None
        if reply is not None:
            seq += 1
            await client.send_all(encode_packet(seq, reply))
        if done:
            return seq + 1
        seq, data = await packets.next()


async def change_user(ctx: SessionContext, client: Conn, payload: bytes, capabilities: int, nonce: bytes,
                      logger: FilteringBoundLogger) -> tuple[c.ComChangeUser, UserConfig, int, bytes | None]:
    """COM_CHANGE_USER: authenticate the new user here (the client answers the greeting's nonce,
    not a server's). Returns the request, the user and the sequence id for the final answer."""
    request = c.decode_command(payload, capabilities)
    assert isinstance(request, c.ComChangeUser)
    auth = server_auth(ctx, request.user, client.is_tls, nonce)
    auth.start()
    seq = await _exchange(client, ClientPackets(client), auth, 0, request.auth_response, request.auth_plugin_name,
                          request.user, logger)
    user = ctx.cluster.config.user(request.user)
    if user is None:
        raise Fatal(1045, "28000", f"Access denied for user '{request.user}'@'%'", seq=seq)
    return request, user, seq, _stage1(auth)
