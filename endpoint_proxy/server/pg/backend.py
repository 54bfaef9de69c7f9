"""Server-side PostgreSQL connections opened by the proxy: session backends and monitor probes."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import trio

from ...config import Address
from ...protocol.errors import ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import BackendAuthenticator
from ...protocol.pg.framing import DEFAULT_MAX_LENGTH, FrameReader, frame
from ...protocol.pg.startup import encode_ssl_request, encode_startup_message
from ...relay.net import Conn, RawConn, connect_tcp, start_tls_client

_RECV = 65536
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


@dataclass
class BackendConnection:
    conn: Conn
    instance: str
    process_id: int = 0
    secret_key: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    # ParameterStatus and NoticeResponse messages of the startup, raw, for the client.
    startup_messages: bytes = b""
    status: str = "I"
    address: Address | None = None
    in_recovery: bool = False  # the instance was a replica when this connection was made
    # What of the session's state this backend already has (see SessionState):
    statements: set[str] = field(default_factory=set)  # named prepared statements (protocol level)
    sql_prepared: set[str] = field(default_factory=set)  # SQL-level PREPARE names
    sets_applied: int = 0
    set_version: int = 0
    pending: list[bytes] = field(default_factory=list)  # frontend messages to send before its next use
    lsn_reached: int = 0  # session consistency: WAL position this replica is known to have replayed


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
                       user: str, password: str | None, tls_mode: str = "off",
                       tls_context: ssl.SSLContext | None = None,
                       max_message: int = DEFAULT_MAX_LENGTH) -> BackendConnection:
    """Connect, negotiate TLS, authenticate, and read up to the first ReadyForQuery.

    The caller bounds the time (a cancel scope). Raises BackendError (with the server's
    ErrorResponse when there is one; a failed TLS handshake is one too), OSError for
    network failures, or ProtocolError for a message that does not parse or is longer
    than ``max_message``.
    """
    raw = await connect_tcp(address.host, address.port)
    conn: Conn = raw
    try:
        if tls_mode != "off":
            conn = await _negotiate_tls(raw, address, tls_mode, tls_context)
        params = dict(parameters)
        params["user"] = user
        await conn.send_all(encode_startup_message(params))
        backend = BackendConnection(conn=conn, instance=instance)
        await _authenticate(backend, user, password, max_message)
        return backend
    except BaseException:
        await conn.aclose()
        raise


async def _negotiate_tls(raw: RawConn, address: Address, mode: str,
                         ctx: ssl.SSLContext | None) -> Conn:
    await raw.send_all(encode_ssl_request())
    answer = bytearray(1)
    n = await raw.recv_into(answer)
    if n == 0:
        raise BackendError("the server closed the connection")
    if answer[0] == ord("S"):
        try:
            return await start_tls_client(raw, ctx, address.host)
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            raise BackendError(f"TLS handshake with {address} failed: {e.__cause__ or e}") from None
    if answer[0] == ord("N") and mode == "prefer":
        return raw
    raise BackendError(f"server {address} does not offer TLS (backend_tls = \"{mode}\")")


async def _authenticate(backend: BackendConnection, user: str, password: str | None,
                        max_message: int = DEFAULT_MAX_LENGTH) -> None:
    conn = backend.conn
    reader = FrameReader(max_message)
    buf = bytearray(_RECV)
    auth = BackendAuthenticator(user, password)
    startup = bytearray()
    while True:
        type_, payload = await _read_message(conn, reader, buf)
        if type_ == ord("E"):
            try:
                err = m.decode_backend(type_, payload)
            except ProtocolError:
                raise BackendError("the server sent a malformed error") from None
            assert isinstance(err, m.ErrorResponse)
            raise BackendError(err.message, error=err, raw_error=frame(type_, payload))
        msg = m.decode_backend(type_, payload)
        if type_ == ord("R"):
            if isinstance(msg, m.AuthenticationSASLContinue):
                # The client proof needs PBKDF2 over the server's iteration count (milliseconds
                # of CPU): off the event loop, so other sessions keep moving.
                reply = await trio.to_thread.run_sync(auth.respond, msg)
            else:
                reply = auth.respond(msg)  # type: ignore[arg-type]
            if reply:
                await conn.send_all(reply)
        elif isinstance(msg, m.ParameterStatus):
            backend.parameters[msg.name] = msg.value
            startup += frame(type_, payload)
        elif isinstance(msg, m.BackendKeyData):
            backend.process_id = msg.process_id
            backend.secret_key = msg.secret_key
        elif isinstance(msg, m.NoticeResponse):
            startup += frame(type_, payload)
        elif isinstance(msg, m.NegotiateProtocolVersion):
            continue
        elif isinstance(msg, m.ReadyForQuery):
            backend.status = msg.status
            backend.startup_messages = bytes(startup)
            if reader.buffered:
                raise BackendError("the server sent data after ReadyForQuery during startup")
            return
        else:
            raise BackendError(f"unexpected message {chr(type_)!r} during startup")


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
                   database: str = "postgres", tls_mode: str = "off") -> ProbeConnection:
        params = {"database": database, "application_name": "endpoint_proxy monitor", "client_encoding": "UTF8"}
        backend = await open_backend(instance, address, params, user=user, password=password,
                                     tls_mode=tls_mode, max_message=PROBE_MAX_MESSAGE)
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

    async def aclose(self) -> None:
        try:
            with trio.move_on_after(0.5):
                await self.backend.conn.send_all(frame(ord("X")))
        except OSError:
            pass
        await self.backend.conn.aclose()
