"""Server-side PostgreSQL connections opened by the proxy: session backends and monitor probes."""

from __future__ import annotations

import ssl
import sys
from dataclasses import dataclass, field
from typing import Final

import trio

from ...config import Address
from ...protocol.errors import AuthenticationError, ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import BackendAuthenticator, PgCredential, UntrustedServerError
from ...protocol.pg.framing import FrameReader, frame
from ...protocol.pg.startup import encode_ssl_request, encode_startup_message
from ...relay.net import Conn, Dialer, connect_tcp, start_tls_client
from ..backend_security import BackendSecurity

_RECV = 65536
# No message of a login (authentication requests, ParameterStatus, notices, an error) comes
# near this: a larger length is refused before anything is allocated for it.
LOGIN_MAX_MESSAGE: Final = 1 << 20
# The proxy's own connections (probes, the function catalog) read a few short rows: a larger
# message is a broken or hostile server, refused before anything is allocated for it.
PROBE_MAX_MESSAGE = 1 << 24


class BackendError(Exception):
    """Opening or using a backend failed. ``error`` is the server's ErrorResponse, if it sent one."""

    def __init__(self, message: str, *, error: m.ErrorResponse | None = None,
                 raw_error: bytes | None = None, sqlstate: str = "08006") -> None:
        super().__init__(message)
        self.error = error
        self.raw_error = raw_error
        self.sqlstate = error.sqlstate if error is not None else sqlstate


@dataclass(slots=True)
class BackendConnection:
    conn: Conn
    instance: str
    process_id: int = 0
    secret_key: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    # ParameterStatus and NoticeResponse messages of the startup, raw, for the client (the
    # session sends them in its hello and lets go of them).
    startup_messages: bytes = b""
    status: str = "I"
    address: Address | None = None
    in_recovery: bool = False  # the instance was a replica when this connection was made
    lsn_reached: int = 0  # session consistency: WAL position this replica is known to have replayed
    cancel_target: object = None  # transaction mode: its CancelTarget, made once (sessions retarget to it per borrow)
    facts: object = None  # transaction mode: its BackendFacts for the core, made again only when they change


async def _read_message(conn: Conn, reader: FrameReader, buf: bytearray | memoryview) -> tuple[int, bytes]:
    while True:
        msg = reader.next_message()
        if msg is not None:
            return msg
        n = await conn.recv_into(buf)
        if n == 0:
            raise BackendError("the server closed the connection")
        reader.feed(memoryview(buf)[:n])


async def open_backend(instance: str, address: Address, parameters: dict[str, str], *,
                       user: str, password: str | None = None, credential: PgCredential | None = None,
                       tls_mode: str = "off", tls_context: ssl.SSLContext | None = None,
                       security: BackendSecurity | None = None, dial: Dialer = connect_tcp) -> BackendConnection:
    """Connect (with ``dial``), negotiate TLS, authenticate, and read up to the first ReadyForQuery.

    ``credential`` (or a plain ``password``) is what the proxy may log in with;
    ``security`` (default: ``tls_mode``/``tls_context`` without verification, and only
    SCRAM-SHA-256) says how far the server is trusted: TLS verification, and which
    authentication methods it may ask for. The caller bounds the time (a cancel scope).

    Raises BackendError or OSError for network failures. A BackendError with ``raw_error``
    is a refusal of this login (the server's ErrorResponse, or one the proxy makes for a
    credential it cannot use: pass it to the client); without, the instance failed or is not
    to be trusted (its message names the instance).
    """
    sec = security if security is not None else BackendSecurity(tls_mode=tls_mode, tls_context=tls_context)
    cred = credential if credential is not None else PgCredential(password=password)
    where = f"instance {instance} ({address})"
    raw = await dial(address.host, address.port)
    conn: Conn = raw
    try:
        if sec.tls_wanted:
            conn = await _negotiate_tls(raw, address, sec, where)
        params = dict(parameters)
        params["user"] = user
        await conn.send_all(encode_startup_message(params))
        backend = BackendConnection(conn=conn, instance=instance)
        auth = BackendAuthenticator(user, cred, sec.auth_methods)
        try:
            await _authenticate(backend, auth)
        except BackendError as e:
            if e.raw_error is not None:
                raise  # the server refused this login: its own words for the client
            raise BackendError(f"{where}: {e}") from None
        except UntrustedServerError as e:
            raise BackendError(f"{where}: {e.message}", sqlstate=e.sqlstate) from None
        except AuthenticationError as e:
            # The proxy cannot log in as this user (no usable credential): the account's
            # problem, not the instance's; the client gets it like a server's refusal.
            error = m.error_response("FATAL", e.sqlstate, e.message)
            raise BackendError(e.message, raw_error=error, sqlstate=e.sqlstate) from None
        except ProtocolError as e:
            raise BackendError(f"{where}: the server broke the protocol during login: {e}") from None
        return backend
    except BaseException:
        await conn.aclose()
        raise


async def _negotiate_tls(raw: Conn, address: Address, sec: BackendSecurity, where: str) -> Conn:
    await raw.send_all(encode_ssl_request())
    # Read the one-byte answer only: anything after it belongs to the TLS handshake (and
    # bytes a server slips in before it must not be taken as a reply after it).
    answer = bytearray(1)
    n = await raw.recv_into(answer)
    if n == 0:
        raise BackendError(f"{where}: the server closed the connection")
    if n == 1 and answer[0] == ord("S"):
        try:
            return await start_tls_client(raw, sec.tls_context, address.host)
        except (trio.BrokenResourceError, ssl.SSLError, ssl.CertificateError) as e:
            cause = e.__cause__ or e
            raise BackendError(f"{where}: TLS handshake failed (backend_tls = \"{sec.tls_mode}\"): {cause}") from None
    if n == 1 and answer[0] == ord("N") and not sec.tls_required:
        return raw
    if n == 1 and answer[0] == ord("N"):
        raise BackendError(f"{where}: the server does not offer TLS (backend_tls = \"{sec.tls_mode}\")")
    raise BackendError(f"{where}: the server answered the TLS request with neither S nor N")


async def _authenticate(backend: BackendConnection, auth: BackendAuthenticator) -> None:
    conn = backend.conn
    reader = FrameReader(LOGIN_MAX_MESSAGE)
    buf = bytearray(_RECV)
    startup = bytearray()
    while True:
        type_, payload = await _read_message(conn, reader, buf)
        if type_ == ord("E"):
            err = m.decode_backend(type_, payload)
            assert isinstance(err, m.ErrorResponse)
            raise BackendError(err.message, error=err, raw_error=frame(type_, payload))
        msg = m.decode_backend(type_, payload)
        if type_ == ord("R"):
            if isinstance(msg, m.AuthenticationSASLContinue):
                # The client proof may need PBKDF2 over the server's iteration count
                # (milliseconds of CPU): off the event loop, so other sessions keep moving.
                reply = await trio.to_thread.run_sync(auth.respond, msg)
            else:
                reply = auth.respond(msg)  # type: ignore[arg-type]
            if reply:
                await conn.send_all(reply)
        elif isinstance(msg, m.NegotiateProtocolVersion):
            continue
        elif not auth.done and not isinstance(msg, m.NoticeResponse):
            # The rest comes after AuthenticationOk: a server that skips authentication must
            # not get the proxy to take its session.
            raise ProtocolError(f"unexpected message {chr(type_)!r} before authentication completed")
        elif isinstance(msg, m.ParameterStatus):
            backend.parameters[sys.intern(msg.name)] = sys.intern(msg.value)  # the same in every session
            startup += frame(type_, payload)
        elif isinstance(msg, m.BackendKeyData):
            backend.process_id = msg.process_id
            backend.secret_key = msg.secret_key
        elif isinstance(msg, m.NoticeResponse):
            startup += frame(type_, payload)
        elif isinstance(msg, m.ReadyForQuery):
            backend.status = msg.status
            backend.startup_messages = bytes(startup)
            if reader.buffered:
                raise ProtocolError("the server sent data after ReadyForQuery during startup")
            return
        else:
            raise ProtocolError(f"unexpected message {chr(type_)!r} during startup")


async def send_cancel(address: Address, process_id: int, secret_key: int) -> None:
    """Deliver a CancelRequest to a server (fire and forget; the server answers nothing)."""
    from ...protocol.pg.startup import encode_cancel_request

    conn = await connect_tcp(address.host, address.port)
    try:
        await conn.send_all(encode_cancel_request(process_id, secret_key))
        # Wait for the server to close, so the cancel is processed before we return.
        with trio.move_on_after(2):
            await conn.recv_into(bytearray(16))
    finally:
        await conn.aclose()


class ProbeConnection:
    """A persistent monitor connection that runs simple queries and returns text rows.

    It asks for UTF-8 (the server converts from the database's encoding) and decodes with
    replacement, so no name in any catalog can make a probe fail; answers larger than
    PROBE_MAX_MESSAGE are refused. Raises BackendError, OSError or ProtocolError.
    """

    def __init__(self, backend: BackendConnection) -> None:
        self.backend = backend
        self._reader = FrameReader(PROBE_MAX_MESSAGE)
        self._buf = bytearray(8192)

    @classmethod
    async def open(cls, instance: str, address: Address, *, user: str, password: str | None,
                   database: str = "postgres", tls_mode: str = "off",
                   security: BackendSecurity | None = None) -> ProbeConnection:
        # UTF-8 whatever the database's encoding (the server converts): names in a LATIN1
        # catalog arrive as text we can compare.
        params = {"database": database, "application_name": "endpoint_proxy monitor", "client_encoding": "UTF8"}
        backend = await open_backend(instance, address, params, user=user, password=password,
                                     tls_mode=tls_mode, security=security)
        return cls(backend)

    async def query(self, sql: str) -> list[tuple[str | None, ...]]:
        conn = self.backend.conn
        await conn.send_all(m.Query(sql).encode())
        rows: list[tuple[str | None, ...]] = []
        error: m.ErrorResponse | None = None
        while True:
            type_, payload = await _read_message(conn, self._reader, self._buf)
            if type_ == ord("D"):
                row = m.decode_backend(type_, payload)
                if not isinstance(row, m.DataRow):
                    raise BackendError("the server sent a malformed DataRow")
                rows.append(tuple(None if v is None else v.decode("utf-8", "replace") for v in row.values))
            elif type_ == ord("E"):
                err = m.decode_backend(type_, payload)
                if not isinstance(err, m.ErrorResponse):
                    raise BackendError("the server sent a malformed ErrorResponse")
                error = err
            elif type_ == ord("Z"):
                if error is not None:
                    raise BackendError(error.message, error=error)
                return rows

    async def query_params(self, sql: str, params: tuple[str | None, ...]) -> list[tuple[str | None, ...]]:
        """Run ``sql`` with ``$1``... bound to ``params`` (text; None is NULL) through the
        extended protocol, so no value is ever spliced into SQL text; returns text rows."""
        request = (m.Parse("", sql).encode()
                   + m.Bind("", "", (), tuple(None if v is None else v.encode() for v in params), ()).encode()
                   + m.Execute("").encode() + m.Sync().encode())
        conn = self.backend.conn
        await conn.send_all(request)
        rows: list[tuple[str | None, ...]] = []
        error: m.ErrorResponse | None = None
        while True:
            type_, payload = await _read_message(conn, self._reader, self._buf)
            if type_ == ord("D"):
                row = m.decode_backend(type_, payload)
                assert isinstance(row, m.DataRow)
                rows.append(tuple(v.decode() if v is not None else None for v in row.values))
            elif type_ == ord("E"):
                err = m.decode_backend(type_, payload)
                assert isinstance(err, m.ErrorResponse)
                error = err
            elif type_ == ord("Z"):
                if error is not None:
                    raise BackendError(error.message, error=error)
                return rows

    async def aclose(self) -> None:
        try:
            with trio.move_on_after(0.5):
                await self.backend.conn.send_all(frame(ord("X")))
        except OSError:
            pass
        await self.backend.conn.aclose()
