"""Test doubles for the MySQL session core: a scripted server and a driver that plays the shell.

The scripted server answers the commands the tests send (text queries, prepared statements,
transactions, LOAD DATA LOCAL) as MariaDB does with CLIENT_DEPRECATE_EOF, closely enough for
the core's bookkeeping. Unit tests only: integration tests use real servers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.framing import PacketReader, encode_packet, write_lenenc_int
from endpoint_proxy.sessioncore.actions import (
    FORWARD,
    Attach,
    AttachError,
    BackendFacts,
    CatchUp,
    Close,
    Detach,
    Lost,
    ToClient,
    ToServer,
)
from endpoint_proxy.sessioncore.mysql import ChangeUser, DropParked, Kill, MySessionCore, Prepare

from ..mysql.strategies import column_def, text_row
from .pgfakes import FakeEnv, pieces

CAPS = k.CLIENT_PROTOCOL_41 | k.CLIENT_DEPRECATE_EOF | k.CLIENT_TRANSACTIONS | k.CLIENT_MULTI_RESULTS
AUTOCOMMIT = k.SERVER_STATUS_AUTOCOMMIT
IN_TRANS = k.SERVER_STATUS_IN_TRANS


def query(sql: str, seq: int = 0) -> bytes:
    return encode_packet(seq, bytes((c.COM_QUERY,)) + sql.encode())


def prepare(sql: str) -> bytes:
    return encode_packet(0, bytes((c.COM_STMT_PREPARE,)) + sql.encode())


def execute(statement_id: int) -> bytes:
    payload = bytes((c.COM_STMT_EXECUTE,)) + statement_id.to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little")
    return encode_packet(0, payload)


def close_statement(statement_id: int) -> bytes:
    return encode_packet(0, bytes((c.COM_STMT_CLOSE,)) + statement_id.to_bytes(4, "little"))


PING = encode_packet(0, bytes((c.COM_PING,)))
QUIT = encode_packet(0, bytes((c.COM_QUIT,)))


class FakeMyServer:
    def __init__(self, name: str, *, in_recovery: bool = False, first_statement: int = 1) -> None:
        self.name = name
        self.in_recovery = in_recovery
        self.received = bytearray()
        self.commands: list[bytes] = []
        self.queries: list[str] = []
        self.status = AUTOCOMMIT
        self.statements: dict[int, str] = {}
        self._next = first_statement
        self._reader = PacketReader()
        self.closed = False
        self.infile = False  # waiting for LOCAL INFILE data
        self.thread_id = 100 + first_statement

    def feed(self, data: bytes) -> bytes:
        self.received += data
        self._reader.feed(data)
        out = bytearray()
        while (packet := self._reader.next_packet()) is not None:
            seq, payload = packet
            out += self._answer(seq, payload)
        return bytes(out)

    def _ok(self, seq: int) -> bytes:
        return encode_packet(seq + 1, p.OkPacket(status=self.status).encode(CAPS))

    def _answer(self, seq: int, payload: bytes) -> bytes:
        if self.infile:
            if not payload:
                self.infile = False
                return self._ok(seq)
            return b""
        self.commands.append(payload)
        code = payload[0]
        if code == c.COM_QUERY:
            sql = payload[1:].decode()
            self.queries.append(sql)
            low = sql.strip().lower()
            if low.startswith("begin") or low.startswith("start transaction"):
                self.status = AUTOCOMMIT | IN_TRANS
                return self._ok(seq)
            if low.startswith(("commit", "rollback")):
                self.status = AUTOCOMMIT
                return self._ok(seq)
            if low.startswith("load data local"):
                self.infile = True
                return encode_packet(seq + 1, b"\xfb" + b"/etc/passwd")
            if low.startswith("select"):
                return b"".join(encode_packet(seq + 1 + i, part) for i, part in enumerate(
                    (write_lenenc_int(1), column_def("v"), text_row(b"1"),
                     p.OkPacket(status=self.status, header=0xFE).encode(CAPS))))
            if low.startswith("set sql_mode"):
                nbe = k.SERVER_STATUS_NO_BACKSLASH_ESCAPES
                self.status = self.status | nbe if "no_backslash_escapes" in low else self.status & ~nbe
            if low.startswith("set nosuchvariable"):
                return encode_packet(seq + 1, p.err_packet(1193, "HY000", "Unknown system variable"))
            if self.in_recovery and low.startswith(("insert", "update", "delete")):
                return encode_packet(seq + 1, p.err_packet(1290, "HY000", "read only"))
            return self._ok(seq)
        if code == c.COM_STMT_PREPARE:
            sid = self._next
            self._next += 1
            self.statements[sid] = payload[1:].decode()
            self.queries.append(payload[1:].decode())
            no_columns_no_params = (0).to_bytes(2, "little") * 2
            prep = b"\x00" + sid.to_bytes(4, "little") + no_columns_no_params + b"\0\0\0"
            return encode_packet(seq + 1, prep)
        if code == c.COM_STMT_EXECUTE:
            sid = int.from_bytes(payload[1:5], "little")
            if sid not in self.statements:
                unknown = p.err_packet(1243, "HY000", f"Unknown prepared statement handler ({sid})")
                return encode_packet(seq + 1, unknown)
            self.queries.append(f"EXECUTE {self.statements[sid]}")
            return self._ok(seq)
        if code == c.COM_STMT_CLOSE:
            self.statements.pop(int.from_bytes(payload[1:5], "little"), None)
            return b""
        if code == c.COM_QUIT:
            self.closed = True
            return b""
        return self._ok(seq)


class MyDriver:
    """Runs a MySessionCore against scripted servers the way the trio shell would."""

    def __init__(self, servers: dict[str, FakeMyServer], route: Callable[[str, frozenset[str]], str | None], *,
                 readwrite: bool = False, server_piece: int | None = None,
                 alive: Callable[[str], bool] = lambda name: True, allow_local_infile: bool = False) -> None:
        self.env = FakeEnv()
        self.servers = servers
        self.route = route
        self.alive = alive
        first = route("writer" if readwrite else "main", frozenset())
        assert first is not None
        self.active: FakeMyServer | None = servers[first]
        self.parked: dict[str, FakeMyServer] = {}
        self.core = MySessionCore(self.env, BackendFacts(first, servers[first].in_recovery), capabilities=CAPS,
                                  status=AUTOCOMMIT, readwrite=readwrite, allow_local_infile=allow_local_infile)
        self.to_client = bytearray()
        self.server_piece = server_piece
        self.closed = False
        self.attaches: list[tuple[str, str]] = []
        self.kills: list[Kill] = []
        self.opened = 0

    def send(self, data: bytes, piece: int | Iterable[int] | None = None) -> None:
        for chunk in pieces(data, piece) if piece else [data]:
            if self.closed:
                return
            if self.core.client_data(chunk) == FORWARD:
                self._to_server(chunk)
            self.run()

    def run(self) -> None:
        while (action := self.core.next_action()) is not None:
            if isinstance(action, ToClient):
                self.to_client += action.data
            elif isinstance(action, ToServer):
                self._to_server(action.data)
            elif isinstance(action, Close):
                self.closed = True
                return
            elif isinstance(action, Detach):
                if action.park and self.active is not None:
                    self.parked[self.core.role] = self.active
                self.active = None
            elif isinstance(action, Attach):
                self._attach(action)
            elif isinstance(action, Lost):
                self.active = None
                self.core.verdict(self.alive(action.instance))
            elif isinstance(action, CatchUp):
                self.core.caught_up(True)
            elif isinstance(action, Prepare):
                assert self.active is not None
                answer = self.active.feed(prepare(action.sql))
                self.core.prepared(action.client_id, int.from_bytes(answer[5:9], "little"))
            elif isinstance(action, Kill):
                self.kills.append(action)
                self.core.reply_ok(action.seq - 1)
            elif isinstance(action, (ChangeUser, DropParked)):
                pass

    def _attach(self, action: Attach) -> None:
        server = self.parked.pop(action.role, None)
        fresh = server is None
        if server is None:
            name = self.route(action.role, action.exclude)
            if name is None:
                self.core.attach_failed(AttachError("no_route", "1105", "no instance"))
                return
            self.opened += 1
            server = FakeMyServer(name, in_recovery=self.servers[name].in_recovery,
                                  first_statement=1 + 10 * self.opened)
            self.servers[f"{name}#{self.opened}"] = server
        for command in self.core.replay_plan(action.role, fresh):
            server.feed(encode_packet(0, command))
        self.active = server
        self.attaches.append((action.role, server.name))
        self.core.attached_backend(BackendFacts(server.name, server.in_recovery), status=server.status)

    def _to_server(self, data: bytes) -> None:
        server = self.active
        assert server is not None, "the core forwarded bytes with no backend"
        answer = server.feed(bytes(data))
        for chunk in pieces(answer, self.server_piece) if self.server_piece else ([answer] if answer else []):
            if self.core.server_data(chunk) == FORWARD:
                self.to_client += chunk
            self.run()

    def server_closes(self, said: bytes = b"") -> None:
        if said and self.core.server_data(said) == FORWARD:
            self.to_client += said
        self.core.server_eof()
        self.run()


def packets(data: bytes) -> list[tuple[int, bytes]]:
    reader = PacketReader()
    reader.feed(data)
    out = []
    while (packet := reader.next_packet()) is not None:
        out.append(packet)
    return out


def errnos(data: bytes) -> list[int]:
    return [p.decode_err(payload).errno for _, payload in packets(data) if payload[:1] == b"\xff"]
