"""Test doubles for the MySQL session core: a scripted server and a driver that plays the shell.

The scripted server answers the commands the tests send (text queries, prepared statements,
transactions, LOAD DATA LOCAL) as MariaDB does with CLIENT_DEPRECATE_EOF, closely enough for
the core's bookkeeping. Unit tests only: integration tests use real servers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
from endpoint_proxy.sessioncore.my_pool_plan import PooledMark
from endpoint_proxy.sessioncore.mysql import ChangeUser, DropParked, Kill, MySessionCore, Prepare, Release

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
            template = self.servers[name]  # a new connection to that server, of the template's kind
            server = type(template)(name, in_recovery=template.in_recovery, first_statement=1 + 10 * self.opened)
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


# --- transaction mode: pooled connections ---------------------------------------------------------------


def init_db(schema: str) -> bytes:
    return encode_packet(0, bytes((c.COM_INIT_DB,)) + schema.encode())


def execute_cursor(statement_id: int) -> bytes:
    """COM_STMT_EXECUTE asking for a read-only cursor (no parameters)."""
    payload = bytes((c.COM_STMT_EXECUTE,)) + statement_id.to_bytes(4, "little") + b"\x01" + (1).to_bytes(4, "little")
    return encode_packet(0, payload)


def fetch(statement_id: int, rows: int = 10) -> bytes:
    payload = bytes((c.COM_STMT_FETCH,)) + statement_id.to_bytes(4, "little") + rows.to_bytes(4, "little")
    return encode_packet(0, payload)


def long_data(statement_id: int, data: bytes) -> bytes:
    return encode_packet(0, bytes((c.COM_STMT_SEND_LONG_DATA,)) + statement_id.to_bytes(4, "little") + b"\0\0" + data)


RESET_CONNECTION = encode_packet(0, bytes((c.COM_RESET_CONNECTION,)))


def set_option(on: bool) -> bytes:
    return encode_packet(0, bytes((c.COM_SET_OPTION,)) + (0 if on else 1).to_bytes(2, "little"))


@dataclass
class MyFakeEnv(FakeEnv):
    unpins: list[str] = field(default_factory=list)

    def unpinned(self, reason: str) -> None:
        self.unpins.append(reason)


_SET_ITEM = re.compile(r"\s*(?:(session|global)\s+)?(@?`?[\w]+`?)\s*=\s*(.+?)\s*$", re.I)


class StatefulServer(FakeMyServer):
    """A FakeMyServer that keeps what a connection's session carries, the way MariaDB does: user and session
    variables, the default database, SQL prepared statements, the multi-statement option, cursors; it answers
    ``select @a`` / ``select @@x`` / ``select database()`` with them. COM_RESET_CONNECTION clears them (keeping
    the database and the handshake's character set). ``refuse``: statements it answers with an error."""

    def __init__(self, name: str, *, in_recovery: bool = False, first_statement: int = 1, schema: str = "app",
                 refuse: Iterable[str] = ()) -> None:
        super().__init__(name, in_recovery=in_recovery, first_statement=first_statement)
        self.vars: dict[str, str] = {}
        self.sysvars: dict[str, str] = {}
        self.schema = schema
        self.sql_prepared: set[str] = set()
        self.multi: bool | None = None
        self.refuse = set(refuse)
        self.cursor_rows: dict[int, int] = {}
        self.long_data: dict[int, bytes] = {}

    def _value(self, seq: int, value: str | None) -> bytes:
        row = text_row(None if value is None else value.encode())
        return b"".join(encode_packet(seq + 1 + i, part) for i, part in enumerate(
            (write_lenenc_int(1), column_def("v"), row, p.OkPacket(status=self.status, header=0xFE).encode(CAPS))))

    def _answer(self, seq: int, payload: bytes) -> bytes:
        if self.infile:
            return super()._answer(seq, payload)
        code = payload[0]
        if code == c.COM_RESET_CONNECTION:
            self.commands.append(payload)
            self.vars.clear()
            self.sysvars.clear()
            self.sql_prepared.clear()
            self.statements.clear()
            self.status = AUTOCOMMIT
            return self._ok(seq)
        if code == c.COM_INIT_DB:
            self.commands.append(payload)
            self.schema = payload[1:].decode()
            return self._ok(seq)
        if code == c.COM_SET_OPTION:
            self.commands.append(payload)
            self.multi = payload[1] == 0
            return encode_packet(seq + 1, p.OkPacket(status=self.status, header=0xFE).encode(CAPS))
        if code == c.COM_STMT_PREPARE:  # with a parameter definition per "?"
            self.commands.append(payload)
            sql = payload[1:].decode()
            sid = self._next
            self._next += 1
            self.statements[sid] = sql
            self.queries.append(sql)
            params = sql.count("?")
            head = b"\x00" + sid.to_bytes(4, "little") + (0).to_bytes(2, "little") + params.to_bytes(2, "little")
            return encode_packet(seq + 1, head + b"\0\0\0") + b"".join(
                encode_packet(seq + 2 + i, column_def("?")) for i in range(params))
        if code == c.COM_STMT_SEND_LONG_DATA:
            self.commands.append(payload)
            sid = int.from_bytes(payload[1:5], "little")
            self.long_data[sid] = self.long_data.get(sid, b"") + payload[7:]
            return b""
        if code == c.COM_STMT_EXECUTE and int.from_bytes(payload[1:5], "little") in self.statements:
            sid = int.from_bytes(payload[1:5], "little")
            self.long_data.pop(sid, None)
            if payload[5] & 1:  # a cursor: metadata, then the rows come with COM_STMT_FETCH
                self.commands.append(payload)
                self.cursor_rows[sid] = 2
                status = self.status | k.SERVER_STATUS_CURSOR_EXISTS
                return b"".join(encode_packet(seq + 1 + i, part) for i, part in enumerate(
                    (write_lenenc_int(1), column_def("v"), p.OkPacket(status=status, header=0xFE).encode(CAPS))))
            self.cursor_rows.pop(sid, None)
        if code == c.COM_STMT_FETCH:
            self.commands.append(payload)
            sid = int.from_bytes(payload[1:5], "little")
            left = self.cursor_rows.get(sid, 0)
            if not left:
                return encode_packet(seq + 1, p.err_packet(1421, "HY000", "no cursor"))
            self.cursor_rows[sid] = left - 1
            status = self.status | k.SERVER_STATUS_CURSOR_EXISTS
            if left == 1:
                del self.cursor_rows[sid]
                status = self.status | k.SERVER_STATUS_LAST_ROW_SENT
            return encode_packet(seq + 1, b"\0\0\x01\0\0\0") + encode_packet(
                seq + 2, p.OkPacket(status=status, header=0xFE).encode(CAPS))
        if code == c.COM_STMT_RESET:
            self.commands.append(payload)
            sid = int.from_bytes(payload[1:5], "little")
            self.cursor_rows.pop(sid, None)
            self.long_data.pop(sid, None)
            if sid not in self.statements:
                unknown = p.err_packet(1243, "HY000", f"Unknown prepared statement handler ({sid})")
                return encode_packet(seq + 1, unknown)
            return self._ok(seq)
        if code != c.COM_QUERY:
            return super()._answer(seq, payload)
        sql = payload[1:].decode()
        low = sql.strip().lower()
        if sql in self.refuse:
            self.commands.append(payload)
            self.queries.append(sql)
            return encode_packet(seq + 1, p.err_packet(1231, "42000", f"refused: {sql}"))
        if low.startswith("select @@"):
            self.commands.append(payload)
            self.queries.append(sql)
            return self._value(seq, self.sysvars.get(low[9:].strip()))
        if low.startswith("select @"):
            self.commands.append(payload)
            self.queries.append(sql)
            return self._value(seq, self.vars.get(low[8:].strip().strip("`")))
        if low == "select database()":
            self.commands.append(payload)
            self.queries.append(sql)
            return self._value(seq, self.schema)
        if low.startswith("use "):
            self.schema = sql.strip()[4:].strip().strip("`")
        elif low.startswith("set names") or low.startswith("set character set"):
            self.sysvars["character_set_client"] = sql.split()[-1]
        elif low.startswith("set ") and not low.startswith(("set transaction", "set statement")):
            self._set(sql.strip()[4:])
        elif low.startswith("prepare "):
            self.sql_prepared.add(low.split()[1].strip("`"))
        elif low.startswith(("deallocate prepare ", "drop prepare ")):
            self.sql_prepared.discard(low.split()[2].strip("`"))
        return super()._answer(seq, payload)

    def _set(self, items: str) -> None:
        for item in items.split(","):
            m = _SET_ITEM.match(item)
            if m is None:
                continue
            name, value = m.group(2).lower().strip("`"), m.group(3).strip("'")
            if name.startswith("@"):
                name = name[1:].strip("`")
                if value.lower() == "null":
                    self.vars.pop(name, None)
                else:
                    self.vars[name] = value
            elif value.lower() == "default":
                self.sysvars.pop(name, None)
            else:
                self.sysvars[name] = value
            if name == "autocommit":
                on = self.sysvars.get(name, "1").lower() in ("1", "on")
                self.status = self.status | AUTOCOMMIT if on else self.status & ~AUTOCOMMIT


class FakePool:
    """One pool of the cluster as the shell uses it: idle connections (the most recently given back is lent
    first), at most ``size`` in all; a borrow with none free is a borrow timeout (the test decides when)."""

    def __init__(self, name: str = "w", size: int = 2, *, in_recovery: bool = False,
                 refuse: Iterable[str] = ()) -> None:
        self.name = name
        self.size = size
        self.in_recovery = in_recovery
        self.refuse = tuple(refuse)
        self.idle: list[tuple[StatefulServer, PooledMark | None]] = []
        self.lent = 0
        self.opened: list[StatefulServer] = []
        self.closed: list[StatefulServer] = []
        self.events: list[tuple[str, str]] = []  # ("borrow" | "give back" | "close" | "forget", server name)

    def borrow(self) -> tuple[StatefulServer, PooledMark | None] | None:
        if self.idle:
            self.lent += 1
            server, mark = self.idle.pop()
            self.events.append(("borrow", server.name))
            return server, mark
        if self.lent >= self.size:
            return None
        server = StatefulServer(f"{self.name}#{len(self.opened) + 1}", in_recovery=self.in_recovery,
                                first_statement=1 + 10 * len(self.opened), refuse=self.refuse)
        self.opened.append(server)
        self.lent += 1
        self.events.append(("borrow", server.name))
        return server, None

    def give_back(self, server: StatefulServer, mark: PooledMark, reusable: bool) -> None:
        self.lent -= 1
        if reusable:
            self.idle.append((server, mark))
            self.events.append(("give back", server.name))
        else:
            self.closed.append(server)
            self.events.append(("close", server.name))

    def forget(self, server: StatefulServer) -> None:
        self.lent -= 1
        self.closed.append(server)
        self.events.append(("forget", server.name))


VARIANT = (CAPS | k.CLIENT_CONNECT_WITH_DB, 45)


class PooledDriver:
    """Runs a transaction-mode MySessionCore the way the trio shell would, borrowing from fake pools (one per
    role: "main", or "writer" and "reader")."""

    def __init__(self, pools: dict[str, FakePool], *, readwrite: bool = False, server_piece: int | None = None,
                 max_prepared: int = 200, alive: Callable[[str], bool] = lambda name: True,
                 caps: int = CAPS) -> None:
        self.env = MyFakeEnv()
        self.pools = pools
        self.alive = alive
        self.core = MySessionCore(self.env, None, capabilities=caps, status=AUTOCOMMIT, readwrite=readwrite,
                                  schema="app", pooled=True, max_prepared=max_prepared, charset=45)
        self.to_client = bytearray()
        self.server_piece = server_piece
        self.closed = False
        self.active: StatefulServer | None = None
        self.lent: tuple[FakePool, StatefulServer, PooledMark] | None = None
        self.plans: list[bytes] = []  # every command a plan ran, in order
        self.borrows = 0
        self.kills: list[Kill] = []
        self.mute = False  # the servers take commands and say nothing (a command in flight when one dies)

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
                self._to_server(action.data, answer=True)
            elif isinstance(action, Close):
                self.close()
                return
            elif isinstance(action, Release):
                assert self.lent is not None
                pool, server, mark = self.lent
                pool.give_back(server, mark, action.reusable)
                self.lent = None
                self.active = None
            elif isinstance(action, Attach):
                self._borrow(action)
            elif isinstance(action, Lost):
                assert self.lent is not None
                self.lent[0].forget(self.lent[1])
                self.lent = None
                self.active = None
                self.core.verdict(self.alive(action.instance))
            elif isinstance(action, Prepare):
                server = self.active
                assert server is not None
                if action.schema is not None:
                    server.feed(init_db(action.schema))
                answer = server.feed(prepare(action.sql))
                if action.schema is not None:
                    server.feed(init_db(self.core.state.schema or ""))
                ok = answer[4] == 0
                self.core.prepared(action.client_id, int.from_bytes(answer[5:9], "little") if ok else None)
            elif isinstance(action, Kill):
                self.kills.append(action)
                self.core.reply_ok(action.seq - 1)
            elif isinstance(action, (ChangeUser, DropParked, Detach, CatchUp)):
                raise AssertionError(f"not in transaction mode: {action}")

    def close(self) -> None:
        """The session ends (the shell's _close)."""
        self.closed = True
        if self.lent is not None:
            pool, server, mark = self.lent
            pool.give_back(server, mark, self.core.parting())
            self.lent = None
            self.active = None

    def _borrow(self, action: Attach) -> None:
        pool = self.pools[action.role]
        got = pool.borrow()
        if got is None:
            self.core.attach_failed(AttachError("pool_timeout", "1040",
                                                "Too many connections: no server connection free within "
                                                "borrow_timeout_ms (100 ms)"))
            return
        server, mark = got
        if mark is None:
            mark = PooledMark.fresh(VARIANT, "app")
        plan = self.core.pool_plan(mark)
        assert plan is not None
        complete = self._run(server, plan.commands)
        if not complete:
            plan = self.core.pool_plan(mark, reset=True)
            assert plan is not None
            complete = self._run(server, plan.commands)
        self.borrows += 1
        self.lent = (pool, server, mark)
        self.active = server
        self.core.borrowed(BackendFacts(server.name, server.in_recovery), mark, status=server.status, plan=plan,
                           complete=complete)

    def _run(self, server: StatefulServer, commands: Iterable[bytes]) -> bool:
        for command in commands:
            self.plans.append(command)
            answer = server.feed(encode_packet(0, command))
            if answer[4:5] == b"\xff":
                return False
        return True

    def _to_server(self, data: bytes, answer: bool = True) -> None:
        server = self.active
        assert server is not None, "the core sent bytes with no connection borrowed"
        reply = server.feed(bytes(data))
        if self.mute:
            return
        for chunk in pieces(reply, self.server_piece) if self.server_piece else ([reply] if reply else []):
            if self.core.server_data(chunk) == FORWARD:
                self.to_client += chunk
            self.run()
