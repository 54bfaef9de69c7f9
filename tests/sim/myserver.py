"""A scripted MariaDB server for the simulator: greeting, CLIENT_SSL, mysql_native_password, text
queries (several statements per COM_QUERY: multi-result sets), transactions, prepared
statements (COM_STMT_*), LOAD DATA LOCAL, and faults on cue (ERR 1927 then close, or a close
without a word).

It answers from the text of each statement, deterministically, in MariaDB's shapes (with or
without CLIENT_DEPRECATE_EOF, as agreed). A test double for the simulator only: integration
tests use real servers.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field

import trio

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.auth import check_native_scramble, make_nonce
from endpoint_proxy.protocol.mysql.framing import PacketReader, encode_packet, write_lenenc_int, write_lenenc_str
from endpoint_proxy.protocol.mysql.handshake import HandshakeV10, SSLRequest, decode_handshake_response
from endpoint_proxy.relay.net import Conn, StreamConn

from .pgserver import Fault

SERVER_CAPS = (k.CLIENT_FOUND_ROWS | k.CLIENT_LONG_FLAG | k.CLIENT_CONNECT_WITH_DB
               | k.CLIENT_ODBC | k.CLIENT_LOCAL_FILES | k.CLIENT_IGNORE_SPACE | k.CLIENT_PROTOCOL_41
               | k.CLIENT_INTERACTIVE | k.CLIENT_IGNORE_SIGPIPE | k.CLIENT_TRANSACTIONS | k.CLIENT_SECURE_CONNECTION
               | k.CLIENT_MULTI_STATEMENTS | k.CLIENT_MULTI_RESULTS | k.CLIENT_PS_MULTI_RESULTS
               | k.CLIENT_PLUGIN_AUTH | k.CLIENT_CONNECT_ATTRS | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
               | k.CLIENT_DEPRECATE_EOF)
ER_CONNECTION_KILLED = 1927
KILLED = p.err_packet(ER_CONNECTION_KILLED, "70100", "Connection was killed")
_WRITES = ("insert", "update", "delete", "create", "drop", "alter", "truncate", "replace")


class _Hangup(Exception):
    def __init__(self, last: bytes) -> None:
        self.last = last


def column_def(name: str, type_: int = 0xFD) -> bytes:
    """A ColumnDefinition41 (VAR_STRING, utf8mb4)."""
    out = b"".join(write_lenenc_str(s.encode()) for s in ("def", "db", "t", "t", name, name))
    fixed = (45).to_bytes(2, "little") + (255).to_bytes(4, "little") + bytes((type_,)) + b"\0\0" + b"\0" + b"\0\0"
    return out + write_lenenc_int(len(fixed)) + fixed


def _values(sql: str) -> list[bytes | None]:
    """What a statement returns, from its text: ``rows_N`` N rows, ``repeat('c', N)`` one row of
    N c's, ``@name`` the variable, a number itself, else '1'."""
    low = sql.lower()
    if found := re.search(r"rows_(\d+)", low):
        return [str(i).encode() for i in range(1, int(found.group(1)) + 1)]
    if found := re.search(r"repeat\('(.)',\s*(\d+)\)", sql):
        return [found.group(1).encode() * int(found.group(2))]
    if found := re.fullmatch(r"select (\d+)", low.strip()):
        return [found.group(1).encode()]
    return [b"1"]


@dataclass
class MyServerConn:
    """One connection's view on the server: what it received and its session state."""

    instance: MyInstance
    thread_id: int
    caps: int = 0
    received: bytearray = field(default_factory=bytearray)  # everything after the login
    commands: list[bytes] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    statements: dict[int, str] = field(default_factory=dict)
    status: int = k.SERVER_STATUS_AUTOCOMMIT
    schema: str | None = None
    infile: list[bytes] | None = None
    conn: Conn | None = None
    closed: bool = False
    tls: bool = False
    _next_statement: int = 1  # statement ids differ from server to server (see MyInstance)
    _reader: PacketReader = field(default_factory=PacketReader)

    @property
    def leftover(self) -> int:
        return self._reader.buffered

    @property
    def deprecate_eof(self) -> bool:
        return bool(self.caps & k.CLIENT_DEPRECATE_EOF)

    def feed(self, data: bytes) -> bytes:
        self.received += data
        self._reader.feed(data)
        out = bytearray()
        while (packet := self._reader.next_packet()) is not None:
            seq, payload = packet
            try:
                out += self._answer(seq, payload)
            except _Hangup as e:
                raise _Hangup(bytes(out) + e.last) from None
        return bytes(out)

    # --- packets ---------------------------------------------------------------------------

    @staticmethod
    def _send(seq: int, payloads: list[bytes]) -> bytes:
        return b"".join(encode_packet((seq + 1 + i) & 0xFF, payload) for i, payload in enumerate(payloads))

    def _ok(self, *, affected: int = 0, more: bool = False) -> bytes:
        status = self.status | (k.SERVER_MORE_RESULTS_EXISTS if more else 0)
        return p.OkPacket(affected_rows=affected, status=status).encode(self.caps)

    def _end(self, more: bool) -> bytes:
        status = self.status | (k.SERVER_MORE_RESULTS_EXISTS if more else 0)
        if self.deprecate_eof:
            return p.OkPacket(status=status, header=0xFE).encode(self.caps)
        return p.EofPacket(status=status).encode()

    def _eof(self) -> list[bytes]:
        return [] if self.deprecate_eof else [p.EofPacket(status=self.status).encode()]

    def _result(self, values: list[bytes | None], more: bool, *, binary: bool = False) -> list[bytes]:
        out = [write_lenenc_int(1), column_def("v"), *self._eof()]
        for v in values:
            if binary:
                out.append(b"\0" + (b"\x04" if v is None else b"\0") + (b"" if v is None else write_lenenc_str(v)))
            else:
                out.append(b"\xfb" if v is None else write_lenenc_str(v))
        return [*out, self._end(more)]

    def _cue(self, sql: str) -> None:
        for fault in list(self.instance.faults):
            if fault.needle in sql:
                self.instance.faults.remove(fault)
                if fault.how == "fatal":
                    raise _Hangup(encode_packet(1, KILLED))
                if fault.how == "close":
                    raise _Hangup(b"")
                self.instance.hangup_after.append(self.thread_id)

    # --- commands ----------------------------------------------------------------------------

    def _answer(self, seq: int, payload: bytes) -> bytes:
        if self.infile is not None:
            if payload:
                self.infile.append(payload)
                return b""
            lines = b"".join(self.infile).count(b"\n")
            self.infile = None
            self.instance.loaded.append(lines)
            return self._send(seq, [self._ok(affected=lines)])
        self.commands.append(payload)
        code = payload[0]
        if code == c.COM_QUERY:
            return self._query(seq, payload[1:].decode())
        if code == c.COM_STMT_PREPARE:
            sql = payload[1:].decode()
            self.queries.append(f"PREPARE {sql}")
            self._cue(sql)
            sid = self._next_statement
            self._next_statement += 1
            self.statements[sid] = sql
            params, cols = sql.count("?"), 1 if sql.lower().startswith("select") else 0
            head = b"\0" + sid.to_bytes(4, "little") + cols.to_bytes(2, "little") + params.to_bytes(2, "little") \
                + b"\0" + (0).to_bytes(2, "little")
            out = [head]
            if params:
                out += [column_def("?") for _ in range(params)] + self._eof()
            if cols:
                out += [column_def("v")] + self._eof()
            return self._send(seq, out)
        if code == c.COM_STMT_EXECUTE:
            sid = int.from_bytes(payload[1:5], "little")
            text = self.statements.get(sid)
            if text is None:
                return self._send(seq, [p.err_packet(1243, "HY000", f"Unknown prepared statement handler ({sid}) "
                                                                     "given to mysqld_stmt_execute")])
            self.queries.append(f"EXECUTE {text}")
            self._cue(text)
            if self.instance.in_recovery and _is_write(text):
                return self._send(seq, [_read_only()])
            if text.lower().startswith("select"):
                return self._send(seq, self._result(_values(text), False, binary=True))
            return self._send(seq, [self._ok(affected=1)])
        if code == c.COM_STMT_CLOSE:
            self.statements.pop(int.from_bytes(payload[1:5], "little"), None)
            return b""
        if code == c.COM_STMT_SEND_LONG_DATA:
            return b""
        if code == c.COM_QUIT:
            self.closed = True
            return b""
        if code == c.COM_INIT_DB:
            self.schema = payload[1:].decode()
            return self._send(seq, [self._ok()])
        if code in (c.COM_PING, c.COM_STMT_RESET, c.COM_RESET_CONNECTION, c.COM_SET_OPTION):
            return self._send(seq, [self._ok()])
        return self._send(seq, [p.err_packet(1047, "08S01", "Unknown command")])

    def _query(self, seq: int, text: str) -> bytes:
        parts = [s.strip() for s in text.split(";")] if self.caps & k.CLIENT_MULTI_STATEMENTS else [text.strip()]
        statements = [s for s in parts if s] or [""]
        out: list[bytes] = []
        for i, sql in enumerate(statements):
            self.queries.append(sql)
            self._cue(sql)
            more = i < len(statements) - 1
            answer = self._statement(sql, more)
            if answer is None:  # LOCAL INFILE: the client sends the file next
                return self._send(seq, [*out, b"\xfb" + self.infile_name(sql)])
            out += answer
            if answer[-1][:1] == b"\xff":
                break
        return self._send(seq, out)

    @staticmethod
    def infile_name(sql: str) -> bytes:
        found = re.search(r"infile\s+'([^']*)'", sql, re.IGNORECASE)
        return (found.group(1) if found else "data.txt").encode()

    def _statement(self, sql: str, more: bool) -> list[bytes] | None:
        low = sql.lower()
        word = low.split()[0] if low.split() else ""
        if word in ("begin",) or low.startswith("start transaction"):
            self.status |= k.SERVER_STATUS_IN_TRANS
            return [self._ok(more=more)]
        if word in ("commit", "rollback"):
            self.status &= ~k.SERVER_STATUS_IN_TRANS
            return [self._ok(more=more)]
        if word == "set":
            name, _, value = sql[4:].partition("=")
            name = name.strip().lower().removeprefix("session ")
            self.settings[name] = value.strip().strip("'")
            return [self._ok(more=more)]
        if word == "use":
            self.schema = sql.split()[1].strip("`")
            return [self._ok(more=more)]
        if low.startswith("load data local"):
            if not self.caps & k.CLIENT_LOCAL_FILES and not self.instance.ask_for_files:
                return [p.err_packet(1148, "42000", "The used command is not allowed with this MariaDB version")]
            if self.instance.in_recovery:
                return [_read_only()]
            self.infile = []
            return None
        if "nosuch" in low:
            return [p.err_packet(1146, "42S02", "Table 'db.nosuch' doesn't exist")]
        if self.instance.in_recovery and _is_write(sql):
            return [_read_only()]
        if word == "select":
            if found := re.fullmatch(r"select (@@|@)(\w+)", low.strip()):
                current = self.settings.get(found.group(2) if found.group(1) == "@@" else f"@{found.group(2)}")
                return self._result([None if current is None else current.encode()], more)
            return self._result(_values(sql), more)
        if word in ("insert", "update", "delete", "replace"):
            return [self._ok(affected=1, more=more)]
        return [self._ok(more=more)]


def _is_write(sql: str) -> bool:
    return sql.lower().lstrip().startswith(_WRITES)


def _read_only() -> bytes:
    return p.err_packet(1290, "HY000", "The MariaDB server is running with the --read-only option so it cannot "
                                       "execute this statement")


class MyInstance:
    """One fake MariaDB server: accepts connections and keeps them."""

    def __init__(self, name: str, *, in_recovery: bool = False, password_hash: bytes,
                 tls_context: ssl.SSLContext | None = None, thread_base: int = 100) -> None:
        self.name = name
        self.in_recovery = in_recovery
        self.password_hash = password_hash
        self.tls_context = tls_context
        self.conns: list[MyServerConn] = []
        self.faults: list[Fault] = []
        self.hangup_after: list[int] = []
        self.loaded: list[int] = []  # lines of each LOAD DATA LOCAL
        self.ask_for_files = False  # request LOCAL INFILE data even from a client that offered none
        self._next_thread = thread_base
        self.statement_base = thread_base * 100 + 1

    def fault(self, needle: str, how: str) -> None:
        self.faults.append(Fault(needle, how))

    @property
    def live(self) -> list[MyServerConn]:
        return [sc for sc in self.conns if not sc.closed]

    async def kill(self, *, error: bool) -> None:
        """End every open session now (KILL sends ERR 1927 first; a crash says nothing)."""
        for sc in self.live:
            sc.closed = True
            assert sc.conn is not None
            if error:
                try:
                    await sc.conn.send_all(encode_packet(0, KILLED))
                except OSError:
                    pass
            await sc.conn.aclose()

    async def serve(self, conn: Conn) -> None:
        self._next_thread += 1
        sc = MyServerConn(self, self._next_thread, _next_statement=self.statement_base)
        self.conns.append(sc)
        try:
            conn, data = await self._login(sc, conn)
            sc.conn = conn
            while not sc.closed:
                if not data:
                    data = await conn.recv_some(65536)
                    if not data:
                        break
                try:
                    answer = sc.feed(data)
                except _Hangup as e:
                    if e.last:
                        await conn.send_all(e.last)
                    break
                data = b""
                if answer:
                    await conn.send_all(answer)
                if sc.thread_id in self.hangup_after:
                    break
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            sc.closed = True
            await conn.aclose()

    async def _login(self, sc: MyServerConn, conn: Conn) -> tuple[Conn, bytes]:
        nonce = make_nonce()
        caps = SERVER_CAPS | (k.CLIENT_SSL if self.tls_context is not None else 0)
        hello = HandshakeV10("10.11.0-MariaDB-sim", sc.thread_id, nonce, caps, k.UTF8MB4_GENERAL_CI,
                             status=k.SERVER_STATUS_AUTOCOMMIT, auth_plugin_name="mysql_native_password")
        await conn.send_all(encode_packet(0, hello.encode()))
        reader = PacketReader()

        async def packet() -> tuple[int, bytes]:
            while (got := reader.next_packet()) is None:
                data = await conn.recv_some(65536)
                if not data:
                    raise ConnectionResetError("the client left during the login")
                reader.feed(data)
            return got

        seq, payload = await packet()
        response = decode_handshake_response(payload)
        if isinstance(response, SSLRequest):
            assert self.tls_context is not None
            stream = trio.SSLStream(conn.to_stream(), self.tls_context, server_side=True)
            await stream.do_handshake()
            conn = StreamConn(stream)
            sc.tls = True
            seq, payload = await packet()
            response = decode_handshake_response(payload)
        assert not isinstance(response, SSLRequest)
        sc.caps = response.capabilities & caps
        sc.schema = response.database
        if not check_native_scramble(response.auth_response, nonce, self.password_hash):
            await conn.send_all(encode_packet(seq + 1, p.err_packet(1045, "28000", "Access denied")))
            raise ConnectionResetError("access denied")
        await conn.send_all(encode_packet(seq + 1, sc._ok()))
        return conn, reader.take_buffered()
