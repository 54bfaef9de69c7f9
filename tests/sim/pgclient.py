"""A PostgreSQL client for the simulator: logs in (TLS, SCRAM-SHA-256), sends flows, keeps every
byte it receives after its login, and waits on message counts — never on time alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import trio

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.auth import BackendAuthenticator, PgCredential, ScramKeys
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.protocol.pg.startup import encode_ssl_request, encode_startup_message
from endpoint_proxy.relay.net import Conn, StreamConn, unverified_client_context


class LoginFailed(Exception):
    pass


def q(sql: str) -> bytes:
    return m.Query(sql).encode()


def parse(name: str, sql: str) -> bytes:
    return m.Parse(name, sql).encode()


def bind(statement: str = "", params: tuple[bytes | None, ...] = (), portal: str = "") -> bytes:
    return m.Bind(portal, statement, (), params, ()).encode()


def execute(portal: str = "") -> bytes:
    return m.Execute(portal).encode()


def describe(kind: str = "P", name: str = "") -> bytes:
    return m.Describe(kind, name).encode()


def close(kind: str, name: str) -> bytes:
    return m.Close(kind, name).encode()


def copy_data(data: bytes) -> bytes:
    return m.CopyData(data).encode()


SYNC = m.Sync().encode()
FLUSH = m.Flush().encode()
COPY_DONE = m.CopyDone().encode()
TERMINATE = m.Terminate().encode()


@dataclass(frozen=True)
class Step:
    """Send ``data``, then wait until ``ready`` ReadyForQuery messages more have arrived (and
    ``copy_in`` CopyInResponse, and ``more`` of other types: e.g. (("1", 1),) a ParseComplete)."""

    data: bytes
    ready: int = 0
    copy_in: int = 0
    more: tuple[tuple[str, int], ...] = ()

    def wants(self) -> Counter[str]:
        return Counter({"Z": self.ready, "G": self.copy_in, **dict(self.more)})


def messages(data: bytes) -> list[tuple[str, bytes]]:
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append((chr(msg[0]), msg[1]))
    assert reader.buffered == 0, f"a message cut short: {reader.take_buffered()!r}"
    return out


def types(data: bytes) -> str:
    return "".join(t for t, _ in messages(data))


def errors(data: bytes) -> list[str]:
    out = []
    for t, p in messages(data):
        if t == "E":
            err = m.decode_backend(ord("E"), p)
            assert isinstance(err, m.ErrorResponse)
            out.append(err.sqlstate)
    return out


def rows(data: bytes) -> list[str | None]:
    out: list[str | None] = []
    for t, p in messages(data):
        if t == "D":
            row = m.decode_backend(ord("D"), p)
            assert isinstance(row, m.DataRow)
            out.append(None if row.values[0] is None else row.values[0].decode())
    return out


class PgClient:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.received = bytearray()  # everything after the login's ReadyForQuery
        self.login_messages: list[tuple[str, bytes]] = []
        self.process_id = 0
        self.eof = False
        self._reader = FrameReader()
        self.counts: Counter[str] = Counter()  # messages received after login, by type

    async def _recv(self) -> bytes:
        try:
            data = await self.conn.recv_some(65536)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
        return data

    async def login(self, keys: ScramKeys, *, user: str = "app", database: str = "app", tls: bool = False,
                    params: dict[str, str] | None = None) -> None:
        if tls:
            await self.conn.send_all(encode_ssl_request())
            answer = await self.conn.recv_some(1)
            assert answer == b"S", answer
            stream = trio.SSLStream(self.conn.to_stream(), unverified_client_context(), server_hostname="localhost")
            await stream.do_handshake()
            self.conn = StreamConn(stream)
        startup = {"user": user, "database": database, **(params or {})}
        await self.conn.send_all(encode_startup_message(startup))
        auth = BackendAuthenticator(user, PgCredential(scram_keys=keys), ("scram-sha-256",))
        reader = FrameReader()
        while True:
            msg = reader.next_message()
            if msg is None:
                data = await self._recv()
                if not data:
                    raise LoginFailed(f"the proxy closed during login after {self.login_messages}")
                reader.feed(data)
                continue
            type_, payload = chr(msg[0]), msg[1]
            self.login_messages.append((type_, payload))
            if type_ == "R":
                reply = auth.respond(m.decode_backend(msg[0], payload))  # type: ignore[arg-type]
                if reply:
                    await self.conn.send_all(reply)
            elif type_ == "E":
                raise LoginFailed(str(m.decode_backend(msg[0], payload)))
            elif type_ == "K":
                self.process_id = int.from_bytes(payload[:4], "big")
            elif type_ == "Z":
                break
        rest = reader.take_buffered()
        self._take(rest)

    def _take(self, data: bytes) -> None:
        self.received += data
        self._reader.feed(data)
        while (msg := self._reader.next_message()) is not None:
            self.counts[chr(msg[0])] += 1

    async def send(self, data: bytes) -> None:
        await self.conn.send_all(data)

    async def wait(self, target: Counter[str]) -> None:
        """Until ``target`` counts of message types have arrived since login."""
        while any(self.counts[t] < n for t, n in target.items()):
            data = await self._recv()
            if not data:
                raise ConnectionResetError(f"the proxy closed: got {dict(self.counts)}, waited for "
                                           f"{dict(target)}; received {bytes(self.received)[-300:]!r}")
            self._take(data)

    async def run(self, steps: list[Step]) -> None:
        for step in steps:
            target = self.counts + step.wants()
            await self.send(step.data)
            await self.wait(target)

    async def until_closed(self) -> None:
        """Read until the proxy closes the connection."""
        while not self.eof:
            data = await self._recv()
            self._take(data)

    async def aclose(self) -> None:
        await self.conn.aclose()
