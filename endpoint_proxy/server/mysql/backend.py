"""Server-side MySQL/MariaDB connections opened by the proxy: session backends, monitor probes, KILL QUERY."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Final

import trio

from ...config import Address
from ...protocol.mysql.auth import BackendAuthenticator, MyCredential
from ...protocol.mysql.commands import COM_QUERY, COM_QUIT, ComQuery
from ...protocol.mysql.constants import (
    CLIENT_COMPRESS,
    CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_DEPRECATE_EOF,
    CLIENT_LONG_FLAG,
    CLIENT_MULTI_FACTOR_AUTHENTICATION,
    CLIENT_MULTI_RESULTS,
    CLIENT_MULTI_STATEMENTS,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
    CLIENT_SSL_VERIFY_SERVER_CERT,
    CLIENT_TRANSACTIONS,
    CLIENT_ZSTD_COMPRESSION_ALGORITHM,
    MARIADB_CLIENT_COM_MULTI,
    UTF8MB4_GENERAL_CI,
)
from ...protocol.mysql.errors import MySQLAuthenticationError, MySQLProtocolError
from ...protocol.mysql.framing import (
    HANDSHAKE_MAX_PAYLOAD,
    Cursor,
    PacketReader,
    decode_text,
    encode_packet,
    read_row_value,
)
from ...protocol.mysql.handshake import HandshakeResponse41, HandshakeV10, SSLRequest, decode_handshake_v10
from ...protocol.mysql.packets import ERR_HEADER, decode_err, err_packet
from ...protocol.mysql.response import ResponseTracker
from ...relay.net import Conn, Dialer, connect_tcp, start_tls_client
from ..backend_security import BackendSecurity

_RECV: Final = 16384
# The proxy's own connections read a few short rows: a larger answer is a broken or hostile server.
PROBE_MAX_PAYLOAD: Final = 1 << 24

# Client error numbers (libmysqlclient's CR_*), for failures the server did not report itself.
CR_SERVER_LOST: Final = 2013  # "Lost connection to server during query"
CR_SSL_CONNECTION_ERROR: Final = 2026
CR_MALFORMED_PACKET: Final = 2027

# Capability bits open_my_backend decides itself, whatever the caller passes:
# - always asked for: the 4.1 protocol and its authentication (what BackendAuthenticator speaks);
# - per argument: CLIENT_SSL (tls_mode), CLIENT_CONNECT_WITH_DB (database), CLIENT_CONNECT_ATTRS
#   (connect_attrs);
# - never: compression, multi-factor authentication, COM_MULTI, and the client-only
#   CLIENT_SSL_VERIFY_SERVER_CERT.
# They only shape the login (and COM_CHANGE_USER); compare the rest to tell what a server lacks.
LOGIN_CAPABILITIES: Final = (
    CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
)
OWN_CAPABILITIES: Final = (
    LOGIN_CAPABILITIES
    | CLIENT_SSL
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_CONNECT_ATTRS
    | CLIENT_COMPRESS
    | CLIENT_ZSTD_COMPRESSION_ALGORITHM
    | CLIENT_MULTI_FACTOR_AUTHENTICATION
    | CLIENT_SSL_VERIFY_SERVER_CERT
    | MARIADB_CLIENT_COM_MULTI
)
# What the proxy's own connections (probes, KILL QUERY) ask for: multi-statement text queries.
PROBE_CAPABILITIES: Final = (
    CLIENT_LONG_FLAG | CLIENT_TRANSACTIONS | CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS | CLIENT_DEPRECATE_EOF
)

Row = tuple[str | None, ...]


class MyBackendError(Exception):
    """Opening or using a backend failed.

    ``errno``/``sqlstate`` are the server's when it refused (then ``err_payload`` is its ERR
    packet payload, to hand to the client verbatim), else a client error number (2013: the
    connection was lost or broke the protocol).
    """

    def __init__(self, message: str, *, errno: int = CR_SERVER_LOST, sqlstate: str = "HY000",
                 err_payload: bytes | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.sqlstate = sqlstate
        self.err_payload = err_payload

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @classmethod
    def from_err_payload(cls, payload: bytes, context: str = "") -> MyBackendError:
        """The error a server's ERR packet reports (a malformed one is a protocol error)."""
        try:
            err = decode_err(payload)
        except MySQLProtocolError as e:
            return cls(f"{context}{e.message}", errno=CR_MALFORMED_PACKET)
        return cls(f"{context}{err.message}", errno=err.errno, sqlstate=err.sqlstate, err_payload=payload)


@dataclass
class MyBackendConnection:
    conn: Conn
    instance: str
    address: Address
    thread_id: int  # the connection id from the server's HandshakeV10 (CONNECTION_ID(), KILL's argument)
    server_version: str
    capabilities: int  # what was agreed with this server (see OWN_CAPABILITIES)
    character_set: int
    status: int = 0  # status flags of the last OK
    in_recovery: bool = False  # set by the caller: the instance was a replica when this was opened
    session_changes: list[tuple[int, bytes]] = field(default_factory=list)  # from the login OK (SESSION_TRACK)


def _protocol_error(e: MySQLProtocolError) -> MyBackendError:
    return MyBackendError(f"the server broke the protocol: {e.message}", errno=CR_MALFORMED_PACKET)


async def _read_packet(conn: Conn, reader: PacketReader, buf: bytearray) -> tuple[int, bytes]:
    """The next logical payload (seq, payload); MySQLProtocolError for a bad frame."""
    while True:
        packet = reader.next_packet()
        if packet is not None:
            return packet
        n = await conn.recv_into(buf)
        if n == 0:
            raise MyBackendError("Lost connection to server: it closed the connection")
        reader.feed(memoryview(buf)[:n])


async def open_my_backend(instance: str, address: Address, *, user: str, password: str | None = None,
                          database: str | None, capabilities: int, character_set: int,
                          connect_attrs: dict[str, str] | None = None, tls_mode: str = "off",
                          tls_context: ssl.SSLContext | None = None, credential: MyCredential | None = None,
                          security: BackendSecurity | None = None) -> MyBackendConnection:
    """Connect, read the greeting, negotiate TLS, authenticate, and stop at the login's OK.

    ``capabilities`` are what the caller wants (typically what it agreed with its client);
    the connection's ``capabilities`` are those the server also has, with the bits of
    ``OWN_CAPABILITIES`` decided here. ``credential`` (or a plain ``password``) is what the
    proxy may log in with. ``security`` (default: ``tls_mode``/``tls_context`` without
    verification, mysql_native_password and caching_sha2_password, no key from the server)
    says how far the server is trusted: TLS "off", "prefer" (when the server offers it),
    "require", "verify-ca", "verify-full"; which plugins it may switch to; where
    caching_sha2_password's full authentication gets its RSA key. The caller bounds the
    time (a cancel scope). Raises MyBackendError or OSError for network failures; the
    connection is closed on any failure.
    ``err_payload`` is set when the login itself was refused (by the server: 1045, 1044, 1049,
    1040...; or because the proxy cannot log in this way: 2059, 2061) and not when the
    instance failed (closed, malformed, no TLS where required); then the message names the
    instance.
    """
    greeting = await greet_my_backend(address, instance)
    return await login_my_backend(instance, greeting, user=user, password=password, database=database,
                                  capabilities=capabilities, character_set=character_set,
                                  connect_attrs=connect_attrs, tls_mode=tls_mode, tls_context=tls_context,
                                  credential=credential, security=security)


@dataclass
class MyGreeting:
    """A server connection that has sent its greeting and waits for our login."""

    conn: Conn
    address: Address
    seq: int
    hello: HandshakeV10


async def greet_my_backend(address: Address, instance: str = "", *, dial: Dialer = connect_tcp) -> MyGreeting:
    """Connect (with ``dial``) and read the server's greeting (its thread id, version,
    capabilities). Raises MyBackendError (``err_payload`` set when the server refused at once;
    else the message names the instance) or OSError."""
    try:
        return await _greet(address, dial)
    except MyBackendError as e:
        if e.err_payload is not None:
            raise
        where = f"instance {instance} ({address})" if instance else str(address)
        raise MyBackendError(f"{where}: {e.message}", errno=e.errno, sqlstate=e.sqlstate) from None


async def _greet(address: Address, dial: Dialer) -> MyGreeting:
    raw = await dial(address.host, address.port)
    try:
        reader = PacketReader(HANDSHAKE_MAX_PAYLOAD)
        buf = bytearray(_RECV)
        try:
            seq, payload = await _read_packet(raw, reader, buf)
            if payload[:1] == bytes((ERR_HEADER,)):
                # Refused before the greeting: too many connections, host blocked...
                raise MyBackendError.from_err_payload(payload)
            hello = decode_handshake_v10(payload)
        except MySQLProtocolError as e:
            raise _protocol_error(e) from None
        if reader.buffered:
            raise MyBackendError("the server sent data after its greeting", errno=CR_MALFORMED_PACKET)
        return MyGreeting(raw, address, seq, hello)
    except BaseException:
        await raw.aclose()
        raise


async def login_my_backend(instance: str, greeting: MyGreeting, *, user: str, password: str | None = None,
                           database: str | None, capabilities: int, character_set: int,
                           connect_attrs: dict[str, str] | None = None, tls_mode: str = "off",
                           tls_context: ssl.SSLContext | None = None, credential: MyCredential | None = None,
                           security: BackendSecurity | None = None) -> MyBackendConnection:
    """Log in over a greeted connection (see ``open_my_backend``); closes it on any failure."""
    sec = security if security is not None else BackendSecurity(tls_mode=tls_mode, tls_context=tls_context)
    cred = credential if credential is not None else MyCredential(password=password)
    try:
        return await _login(instance, greeting, user=user, credential=cred, database=database,
                            capabilities=capabilities, character_set=character_set, connect_attrs=connect_attrs,
                            sec=sec)
    except MyBackendError as e:
        if e.err_payload is not None:
            raise
        raise MyBackendError(f"instance {instance} ({greeting.address}): {e.message}", errno=e.errno,
                             sqlstate=e.sqlstate) from None


async def _login(instance: str, greeting: MyGreeting, *, user: str, credential: MyCredential,
                 database: str | None, capabilities: int, character_set: int,
                 connect_attrs: dict[str, str] | None, sec: BackendSecurity) -> MyBackendConnection:
    raw, address, seq, hello = greeting.conn, greeting.address, greeting.seq, greeting.hello
    conn: Conn = raw
    try:
        reader = PacketReader(HANDSHAKE_MAX_PAYLOAD)
        buf = bytearray(_RECV)
        try:
            agreed = (capabilities & ~OWN_CAPABILITIES) | LOGIN_CAPABILITIES
            if database is not None:
                agreed |= CLIENT_CONNECT_WITH_DB
            if connect_attrs is not None:
                agreed |= CLIENT_CONNECT_ATTRS
            agreed &= hello.capabilities
            if sec.tls_wanted:
                if hello.capabilities & CLIENT_SSL:
                    agreed |= CLIENT_SSL
                    seq = (seq + 1) & 0xFF
                    await raw.send_all(encode_packet(seq, SSLRequest(agreed, character_set=character_set).encode()))
                    conn = await _start_tls(raw, address, sec)
                elif sec.tls_required:
                    raise MyBackendError(f"the server does not offer TLS (backend_tls = \"{sec.tls_mode}\")",
                                         errno=CR_SSL_CONNECTION_ERROR)
            auth = BackendAuthenticator(
                user, credential, tls=conn.is_tls, capabilities=agreed, server_public_key=sec.server_public_key,
                allow_public_key_retrieval=sec.allow_public_key_retrieval, allowed=sec.auth_methods)
            plugin, auth_response = auth.start(hello.auth_plugin_name, hello.auth_plugin_data)
            response = HandshakeResponse41(
                agreed,
                user,
                auth_response,
                database=database if agreed & CLIENT_CONNECT_WITH_DB else None,
                auth_plugin_name=plugin if agreed & CLIENT_PLUGIN_AUTH else None,
                connect_attrs=connect_attrs if agreed & CLIENT_CONNECT_ATTRS else None,
                character_set=character_set,
            )
            seq = (seq + 1) & 0xFF
            await conn.send_all(encode_packet(seq, response.encode()))
            while not auth.done:
                seq, payload = await _read_packet(conn, reader, buf)
                if payload[:1] == bytes((ERR_HEADER,)):
                    raise MyBackendError.from_err_payload(payload)
                reply = auth.respond(payload)
                if reply is not None:
                    seq = (seq + 1) & 0xFF
                    await conn.send_all(encode_packet(seq, reply))
        except MySQLAuthenticationError as e:
            # The proxy cannot log in this way (a plugin it does not speak, a clear-text password
            # without TLS): the account's problem, not the instance's, so it comes with an ERR
            # payload for the client like a server's refusal.
            raise MyBackendError(e.message, errno=e.errno, sqlstate=e.sqlstate,
                                 err_payload=err_packet(e.errno, e.sqlstate, e.message)) from None
        except MySQLProtocolError as e:
            raise _protocol_error(e) from None
        if reader.buffered:
            raise MyBackendError("the server sent data after the login's OK", errno=CR_MALFORMED_PACKET)
        ok = auth.ok
        assert ok is not None
        return MyBackendConnection(
            conn=conn,
            instance=instance,
            address=address,
            thread_id=hello.connection_id,
            server_version=hello.server_version,
            capabilities=agreed,
            character_set=character_set,
            status=ok.status,
            session_changes=list(ok.session_changes),
        )
    except BaseException:
        await conn.aclose()
        raise


async def _start_tls(raw: Conn, address: Address, sec: BackendSecurity) -> Conn:
    try:
        return await start_tls_client(raw, sec.tls_context, address.host)
    except (trio.BrokenResourceError, ssl.SSLError, ssl.CertificateError) as e:
        raise MyBackendError(f"TLS handshake failed (backend_tls = \"{sec.tls_mode}\"): {e.__cause__ or e}",
                             errno=CR_SSL_CONNECTION_ERROR) from None


@dataclass
class ResultSet:
    """One result set of a text query: column names and rows (values as text, None for NULL)."""

    columns: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)


def _column_name(payload: bytes) -> str:
    """The name (alias) of a ColumnDefinition41: after catalog, schema, table and org_table."""
    cur = Cursor(payload, "column definition")
    for _ in range(4):
        cur.lenenc_bytes()
    return cur.lenenc_text()


def _text_row(payload: bytes, columns: int) -> Row:
    values: list[str | None] = []
    pos = 0
    for _ in range(columns):
        value, pos = read_row_value(payload, pos)
        values.append(None if value is None else decode_text(value))
    if pos != len(payload):
        raise MySQLProtocolError(f"Malformed communication packet (row): {len(payload) - pos} trailing bytes")
    return tuple(values)


class MyProbeConnection:
    """A persistent monitor connection that runs text queries (several statements at once allowed)."""

    def __init__(self, backend: MyBackendConnection) -> None:
        self.backend = backend
        self._reader = PacketReader(PROBE_MAX_PAYLOAD)
        self._buf = bytearray(_RECV)

    @classmethod
    async def open(cls, instance: str, address: Address, *, user: str, password: str | None,
                   tls_mode: str = "off", tls_context: ssl.SSLContext | None = None,
                   credential: MyCredential | None = None,
                   security: BackendSecurity | None = None) -> MyProbeConnection:
        backend = await open_my_backend(
            instance, address, user=user, password=password, database=None,
            capabilities=PROBE_CAPABILITIES, character_set=UTF8MB4_GENERAL_CI,
            connect_attrs={"program_name": "endpoint_proxy monitor"}, tls_mode=tls_mode, tls_context=tls_context,
            credential=credential, security=security,
        )
        return cls(backend)

    async def query_results(self, sql: str) -> list[ResultSet]:
        """Run ``sql`` (COM_QUERY) and return its result sets in order; statements that return
        no rows (an OK) have none. An ERR raises MyBackendError with the server's errno and
        ``err_payload`` (the connection stays usable); a broken response raises MyBackendError
        (errno 2027) and leaves the connection unusable."""
        backend = self.backend
        conn = backend.conn
        caps = backend.capabilities
        try:
            tracker = ResponseTracker(COM_QUERY, caps)
            await conn.send_all(encode_packet(0, ComQuery(sql).encode(caps)))
            results: list[ResultSet] = []
            names: list[str] = []
            definitions = 0  # column definitions still to come in the current result set
            while not tracker.done:
                _, payload = await _read_packet(conn, self._reader, self._buf)
                if definitions:
                    names.append(_column_name(payload))
                    definitions -= 1
                    if not definitions:
                        results.append(ResultSet(tuple(names)))
                sets, rows = tracker.result_sets, tracker.rows
                tracker.feed(payload)
                if tracker.error is not None:
                    err = tracker.error
                    raise MyBackendError(err.message, errno=err.errno, sqlstate=err.sqlstate, err_payload=payload)
                if tracker.awaiting_client:
                    raise MyBackendError("the server asked for a LOCAL INFILE a probe never sends",
                                         errno=CR_MALFORMED_PACKET)
                if tracker.result_sets != sets:
                    definitions = tracker.columns
                    names = []
                elif tracker.rows != rows:
                    current = results[-1]
                    current.rows.append(_text_row(payload, len(current.columns)))
        except MySQLProtocolError as e:
            raise _protocol_error(e) from None
        if tracker.status is not None:
            backend.status = tracker.status
        if self._reader.buffered:
            raise MyBackendError("the server sent data after the end of a response", errno=CR_MALFORMED_PACKET)
        return results

    async def query_sets(self, sql: str) -> list[list[Row]]:
        """The rows of each result set of ``sql``."""
        return [rs.rows for rs in await self.query_results(sql)]

    async def query(self, sql: str) -> list[Row]:
        """The rows of every result set of ``sql``, concatenated."""
        return [row for rs in await self.query_results(sql) for row in rs.rows]

    async def aclose(self) -> None:
        """COM_QUIT (best effort, bounded), then close."""
        conn = self.backend.conn
        try:
            with trio.move_on_after(0.5):
                await conn.send_all(encode_packet(0, bytes((COM_QUIT,))))
        except OSError:
            pass
        await conn.aclose()


async def kill_query(address: Address, *, user: str, password: str | None = None, thread_id: int,
                     tls_mode: str = "off", tls_context: ssl.SSLContext | None = None,
                     credential: MyCredential | None = None, security: BackendSecurity | None = None) -> None:
    """Interrupt the statement running on connection ``thread_id`` (``KILL QUERY``) from a new connection.

    ``user`` needs to own that connection or hold CONNECTION ADMIN. A connection that has
    gone raises MyBackendError 1094 (unknown thread id); a connection that is idle is left alone.
    """
    probe = await MyProbeConnection.open("kill", address, user=user, password=password, tls_mode=tls_mode,
                                         tls_context=tls_context, credential=credential, security=security)
    try:
        await probe.query(f"KILL QUERY {int(thread_id)}")
    finally:
        with trio.CancelScope(shield=True):
            await probe.aclose()
