"""A MySQL client for the simulator (and for integration tests over TCP): logs in (CLIENT_SSL,
mysql_native_password), sends commands — one at a time or pipelined — and keeps every byte it
receives after its login; it knows where each response ends from the protocol's own
``ResponseTracker``, and answers a LOCAL INFILE request with the data it was given."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trio

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.auth import scramble_native_password
from endpoint_proxy.protocol.mysql.framing import PacketReader, encode_packet, write_lenenc_str
from endpoint_proxy.protocol.mysql.handshake import HandshakeResponse41, SSLRequest, decode_handshake_v10
from endpoint_proxy.protocol.mysql.response import ResponseTracker
from endpoint_proxy.relay.net import Conn, StreamConn, unverified_client_context

CLIENT_CAPS = (k.CLIENT_LONG_PASSWORD | k.CLIENT_FOUND_ROWS | k.CLIENT_LONG_FLAG | k.CLIENT_PROTOCOL_41
               | k.CLIENT_TRANSACTIONS | k.CLIENT_SECURE_CONNECTION | k.CLIENT_MULTI_STATEMENTS
               | k.CLIENT_MULTI_RESULTS | k.CLIENT_PS_MULTI_RESULTS | k.CLIENT_PLUGIN_AUTH
               | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | k.CLIENT_DEPRECATE_EOF | k.CLIENT_CONNECT_WITH_DB)


class LoginFailed(Exception):
    pass


def query(sql: str) -> bytes:
    return bytes((c.COM_QUERY,)) + sql.encode()


def prepare(sql: str) -> bytes:
    return bytes((c.COM_STMT_PREPARE,)) + sql.encode()


def execute(statement_id: int, *params: bytes) -> bytes:
    """COM_STMT_EXECUTE with string parameters (no cursor, one iteration)."""
    out = bytes((c.COM_STMT_EXECUTE,)) + statement_id.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
    if params:
        out += bytes((len(params) + 7) // 8) + b"\x01" + b"\xfd\x00" * len(params)
        out += b"".join(write_lenenc_str(v) for v in params)
    return out


def close_statement(statement_id: int) -> bytes:
    return bytes((c.COM_STMT_CLOSE,)) + statement_id.to_bytes(4, "little")


def reset_statement(statement_id: int) -> bytes:
    return bytes((c.COM_STMT_RESET,)) + statement_id.to_bytes(4, "little")


PING = bytes((c.COM_PING,))
QUIT = bytes((c.COM_QUIT,))


def init_db(schema: str) -> bytes:
    return bytes((c.COM_INIT_DB,)) + schema.encode()


@dataclass(frozen=True)
class Command:
    """One command: its payload, and the file a LOCAL INFILE request gets (None: refuse with an
    empty file, as a client does that has none)."""

    payload: bytes
    infile: bytes | None = None


@dataclass
class Response:
    tracker: ResponseTracker
    raw: bytes


def packets(data: bytes) -> list[tuple[int, bytes]]:
    reader = PacketReader()
    reader.feed(data)
    out = []
    while (packet := reader.next_packet()) is not None:
        out.append(packet)
    assert reader.buffered == 0, "a packet cut short"
    return out


class MyClient:
    def __init__(self, conn: Conn, caps: int = CLIENT_CAPS) -> None:
        self.conn = conn
        self.caps = caps
        self.received = bytearray()  # everything after the login's OK
        self.connection_id = 0
        self.eof = False
        self._reader = PacketReader()

    async def _recv(self) -> bytes:
        try:
            data = await self.conn.recv_some(65536)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
        return data

    async def _packet(self) -> tuple[int, bytes]:
        while (packet := self._reader.next_packet()) is None:
            data = await self._recv()
            if not data:
                raise ConnectionResetError(f"the server closed; received {bytes(self.received)[-300:]!r}")
            self.received += data
            self._reader.feed(data)
        return packet

    async def login(self, user: str, password: str, *, database: str | None = None, tls: bool = False,
                    tls_context: ssl.SSLContext | None = None) -> None:
        seq, payload = await self._packet()
        if payload[:1] == b"\xff":
            raise LoginFailed(p.decode_err(payload).message)
        hello = decode_handshake_v10(payload)
        self.connection_id = hello.connection_id
        caps = self.caps & (hello.capabilities | k.CLIENT_SSL)
        if database is None:
            caps &= ~k.CLIENT_CONNECT_WITH_DB
        if tls:
            assert hello.capabilities & k.CLIENT_SSL, "the server offers no TLS"
            caps |= k.CLIENT_SSL
            seq += 1
            await self.conn.send_all(encode_packet(seq, SSLRequest(caps, character_set=45).encode()))
            context = tls_context or unverified_client_context()
            stream = trio.SSLStream(self.conn.to_stream(), context, server_hostname="localhost")
            await stream.do_handshake()
            self.conn = StreamConn(stream)
        self.caps = caps
        scramble = scramble_native_password(password, hello.auth_plugin_data)
        response = HandshakeResponse41(caps, user, scramble, database=database,
                                       auth_plugin_name="mysql_native_password", character_set=45)
        seq += 1
        await self.conn.send_all(encode_packet(seq, response.encode()))
        while True:
            seq, payload = await self._packet()
            if payload[:1] == b"\x00":
                break
            if payload[:1] == b"\xff":
                raise LoginFailed(p.decode_err(payload).message)
            if payload[:1] == b"\xfe":  # an auth switch: answer it with the same plugin's proof
                nonce = payload[payload.index(b"\0") + 1:].rstrip(b"\0")
                seq += 1
                await self.conn.send_all(encode_packet(seq, scramble_native_password(password, nonce)))
                continue
            raise LoginFailed(f"unexpected login packet {payload[:16]!r}")
        self.received.clear()
        rest = self._reader.take_buffered()
        self.received += rest
        self._reader.feed(rest)

    async def send(self, commands: list[Command]) -> None:
        await self.conn.send_all(b"".join(encode_packet(0, command.payload) for command in commands))

    async def response(self, command: Command) -> Response:
        """Read the response to ``command`` (sent already), sending its LOCAL INFILE data if asked."""
        tracker = ResponseTracker(command.payload[0], self.caps)
        raw = bytearray()
        while not tracker.done:
            seq, payload = await self._packet()
            raw += encode_packet(seq, payload)
            tracker.feed(payload)
            if tracker.awaiting_client and tracker.local_infile is not None:
                data = command.infile or b""
                seq += 1
                out = b""
                if data:
                    out += encode_packet(seq, data)
                    seq += 1
                await self.conn.send_all(out + encode_packet(seq, b""))
        return Response(tracker, bytes(raw))

    async def run(self, commands: list[Command]) -> list[Response]:
        """Send ``commands`` at once (a pipeline when several), then read their responses in order."""
        await self.send(commands)
        return [await self.response(command) for command in commands]

    async def until_closed(self) -> None:
        while not self.eof:
            data = await self._recv()
            self.received += data

    async def aclose(self) -> None:
        await self.conn.aclose()
