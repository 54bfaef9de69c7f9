"""A scripted PostgreSQL server for the simulator: startup (TLS, trust or SCRAM-SHA-256), simple
and extended protocol, COPY both ways, transactions, several statements per Query, and faults
on cue (a FATAL 57P01 then close, or a close without a word).

It answers from the text of each statement, deterministically, the way PostgreSQL would in
shape (message types, tags, transaction status), closely enough for the proxy's bookkeeping.
A test double for the simulator only: integration tests use real servers.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field

import trio

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.auth import ScramSecret, ScramServerAuth
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.protocol.pg.startup import SSLRequest, StartupMessage, parse_startup_packet
from endpoint_proxy.relay.net import Conn, StreamConn

FATAL_57P01 = m.error_response("FATAL", "57P01", "terminating connection due to administrator command")
_WRITES = ("insert", "update", "delete", "create", "drop", "alter", "truncate")
_COLUMN = (m.Field("?column?", type_oid=25),)


class _Hangup(Exception):
    """Stop serving this connection after sending ``last`` (a fault on cue)."""

    def __init__(self, last: bytes) -> None:
        self.last = last


@dataclass
class Fault:
    """When a statement containing ``needle`` arrives: ``fatal`` (FATAL 57P01, close),
    ``close`` (close without a word) or ``after`` (answer it, then close)."""

    needle: str
    how: str


@dataclass
class PgServerConn:
    """One connection's view on the server: what it received and its session state."""

    instance: PgInstance
    pid: int
    params: dict[str, str] = field(default_factory=dict)
    received: bytearray = field(default_factory=bytearray)  # everything after the startup
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)  # statements run (simple and Parse'd)
    settings: dict[str, str] = field(default_factory=dict)
    statements: dict[str, str] = field(default_factory=dict)
    portals: dict[str, tuple[str, tuple[bytes | None, ...]]] = field(default_factory=dict)
    status: str = "I"
    conn: Conn | None = None
    closed: bool = False
    tls: bool = False
    _copy_in: list[bytes] | None = None
    _skip_to_sync: bool = False
    _reader: FrameReader = field(default_factory=FrameReader)

    @property
    def leftover(self) -> int:
        """Bytes of a message begun and never finished (a request cut off)."""
        return self._reader.buffered

    # --- bytes in, bytes out -----------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Answer the whole messages in ``data`` (and what was buffered); raises _Hangup on a fault."""
        self.received += data
        self._reader.feed(data)
        out = bytearray()
        while (msg := self._reader.next_message()) is not None:
            type_, payload = msg
            self.messages.append((chr(type_), payload))
            try:
                out += self._answer(chr(type_), payload)
            except _Hangup as e:
                raise _Hangup(bytes(out) + e.last) from None
        return bytes(out)

    def _answer(self, t: str, payload: bytes) -> bytes:
        if self._copy_in is not None:
            return self._copy(t, payload)
        if self._skip_to_sync and t != "S":
            return b""
        if t == "Q":
            return self._simple(payload[:-1].decode())
        if t == "P":
            name, rest = _cstr(payload)
            sql, _ = _cstr(rest)
            self.queries.append(sql)
            self._cue(sql)
            if self.instance.in_recovery and _is_write(sql):
                return self._extended_error("25006", "cannot execute in a read-only transaction")
            self.statements[name] = sql
            return m.ParseComplete().encode()
        if t == "B":
            bind = m.Bind.decode(payload)
            if bind.statement not in self.statements:
                return self._extended_error("26000", f'prepared statement "{bind.statement}" does not exist')
            self.portals[bind.portal] = (self.statements[bind.statement], bind.parameters)
            return m.BindComplete().encode()
        if t == "D":
            kind, name = chr(payload[0]), _cstr(payload[1:])[0]
            text = self.statements.get(name) if kind == "S" else self.portals.get(name, ("", ()))[0]
            if text is None:
                return self._extended_error("26000", f'prepared statement "{name}" does not exist')
            head = m.ParameterDescription((25,) * text.count("$")).encode() if kind == "S" else b""
            rows = _returns_rows(text)
            return head + (m.RowDescription(_COLUMN).encode() if rows else m.NoData().encode())
        if t == "E":
            portal = _cstr(payload)[0]
            if portal not in self.portals:
                return self._extended_error("34000", f'portal "{portal}" does not exist')
            sql, params = self.portals[portal]
            answer, error = self._statement(sql, params, describe=False)
            if error:
                self._skip_to_sync = True
            return answer
        if t == "C":
            kind, name = chr(payload[0]), _cstr(payload[1:])[0]
            (self.statements if kind == "S" else self.portals).pop(name, None)
            return m.CloseComplete().encode()
        if t == "S":
            self._skip_to_sync = False
            if self.status == "I":
                self.portals.clear()
            return m.ReadyForQuery(self.status).encode()
        if t == "H":
            return b""
        if t == "X":
            self.closed = True
            return b""
        return self._extended_error("08P01", f"unexpected message type {t!r}")

    def _extended_error(self, sqlstate: str, message: str) -> bytes:
        self._skip_to_sync = True
        if self.status == "T":
            self.status = "E"
        return m.error_response("ERROR", sqlstate, message)

    def _cue(self, sql: str) -> None:
        for fault in list(self.instance.faults):
            if fault.needle in sql:
                self.instance.faults.remove(fault)
                if fault.how == "fatal":
                    raise _Hangup(FATAL_57P01)
                if fault.how == "close":
                    raise _Hangup(b"")
                self.instance.hangup_after.append(self.pid)

    # --- simple protocol -----------------------------------------------------------------------

    def _simple(self, text: str) -> bytes:
        statements = [s.strip() for s in text.split(";") if s.strip()]
        if not statements:
            return m.EmptyQueryResponse().encode() + m.ReadyForQuery(self.status).encode()
        out = bytearray()
        for sql in statements:
            self.queries.append(sql)
            self._cue(sql)
            low = sql.lower()
            if low.startswith("copy") and "from stdin" in low:
                if self.instance.in_recovery:
                    out += self._error("25006", "cannot execute COPY FROM in a read-only transaction")
                    break
                self._copy_in = []
                return bytes(out) + m.CopyInResponse(0, (0,)).encode()
            answer, error = self._statement(sql, (), describe=True)
            out += answer
            if error:
                break
        return bytes(out) + m.ReadyForQuery(self.status).encode()

    def _error(self, sqlstate: str, message: str) -> bytes:
        if self.status == "T":
            self.status = "E"
        return m.error_response("ERROR", sqlstate, message)

    def _statement(self, sql: str, params: tuple[bytes | None, ...], *, describe: bool) -> tuple[bytes, bool]:
        """The answer to one statement (without ReadyForQuery), and whether it failed."""
        low = sql.lower()
        word = low.split()[0] if low.split() else ""
        if self.status == "E" and word not in ("rollback", "commit", "end"):
            return self._error("25P02", "current transaction is aborted, commands ignored until end of "
                                        "transaction block"), True
        if word in ("begin", "start"):
            self.status = "T"
            return m.CommandComplete("BEGIN").encode(), False
        if word in ("commit", "end"):
            tag = "ROLLBACK" if self.status == "E" else "COMMIT"
            self.status = "I"
            return m.CommandComplete(tag).encode(), False
        if word == "rollback":
            self.status = "I"
            return m.CommandComplete("ROLLBACK").encode(), False
        if word == "set":
            name, _, value = low[4:].replace(" to ", " = ").partition("=")
            name, value = name.strip(), value.strip().strip("'")
            self.settings[name] = value
            status = m.ParameterStatus(name, value).encode() if name == "application_name" else b""
            return status + m.CommandComplete("SET").encode(), False
        if word == "show":
            value = self.settings.get(low[5:].strip(), "")
            return self._rows([value.encode()], describe), False
        if "1/0" in low:
            return self._error("22012", "division by zero"), True
        if self.instance.in_recovery and _is_write(sql):
            return self._error("25006", f"cannot execute {word.upper()} in a read-only transaction"), True
        if word == "copy" and "to stdout" in low:
            rows = _values(sql, params)
            body = b"".join(m.CopyData((v or b"") + b"\n").encode() for v in rows)
            return (m.CopyOutResponse(0, (0,)).encode() + body + m.CopyDone().encode()
                    + m.CommandComplete(f"COPY {len(rows)}").encode()), False
        if word in ("select", "values", "execute"):
            return self._rows(_values(sql, params), describe), False
        if word == "insert":
            return m.CommandComplete("INSERT 0 1").encode(), False
        if word == "discard":
            self.settings.clear()
            self.statements.clear()
            return m.CommandComplete("DISCARD ALL").encode(), False
        return m.CommandComplete(word.upper()).encode(), False

    def _rows(self, values: list[bytes | None], describe: bool) -> bytes:
        head = m.RowDescription(_COLUMN).encode() if describe else b""
        body = b"".join(m.DataRow((v,)).encode() for v in values)
        return head + body + m.CommandComplete(f"SELECT {len(values)}").encode()

    def _copy(self, t: str, payload: bytes) -> bytes:
        assert self._copy_in is not None
        if t == "d":
            self._copy_in.append(payload)
            return b""
        if t == "c":
            rows = b"".join(self._copy_in).count(b"\n")
            self._copy_in = None
            self.instance.copied.append(rows)
            return m.CommandComplete(f"COPY {rows}").encode() + m.ReadyForQuery(self.status).encode()
        if t == "f":
            self._copy_in = None
            return self._error("57014", "COPY from stdin failed: " + payload[:-1].decode()) + \
                m.ReadyForQuery(self.status).encode()
        if t in "HS":
            return b""  # PostgreSQL ignores Flush and Sync during COPY IN
        self._copy_in = None
        return self._error("08P01", f"unexpected message type {t!r} during COPY from stdin") + \
            m.ReadyForQuery(self.status).encode()


def _cstr(data: bytes) -> tuple[str, bytes]:
    end = data.index(b"\0")
    return data[:end].decode(), data[end + 1:]


def _is_write(sql: str) -> bool:
    return sql.lower().lstrip().startswith(_WRITES)


def _returns_rows(sql: str) -> bool:
    return sql.lower().lstrip().startswith(("select", "values", "show"))


def _values(sql: str, params: tuple[bytes | None, ...]) -> list[bytes | None]:
    """What a statement returns, from its text: ``generate_series(1, N)`` N rows,
    ``repeat('c', N)`` one row of N c's, ``$n`` the parameter, a number itself, else '1'."""
    low = sql.lower()
    if found := re.search(r"generate_series\(1,\s*(\d+)\)", low):
        return [str(i).encode() for i in range(1, int(found.group(1)) + 1)]
    if found := re.search(r"repeat\('(.)',\s*(\d+)\)", sql):
        return [found.group(1).encode() * int(found.group(2))]
    if found := re.search(r"\$(\d+)", sql):
        return [params[int(found.group(1)) - 1]]
    if found := re.fullmatch(r"select (\d+)", low.strip()):
        return [found.group(1).encode()]
    return [b"1"]


class PgInstance:
    """One fake server (an instance of the cluster): accepts connections and keeps them."""

    def __init__(self, name: str, *, in_recovery: bool = False, secret: ScramSecret | None = None,
                 tls_context: ssl.SSLContext | None = None, pid_base: int = 1000) -> None:
        self.name = name
        self.in_recovery = in_recovery
        self.secret = secret  # SCRAM-SHA-256 with this verifier; None: trust
        self.tls_context = tls_context  # answers SSLRequest with S when set
        self.conns: list[PgServerConn] = []
        self.faults: list[Fault] = []
        self.hangup_after: list[int] = []
        self.copied: list[int] = []  # rows of each finished COPY FROM STDIN
        self._next_pid = pid_base

    def fault(self, needle: str, how: str) -> None:
        self.faults.append(Fault(needle, how))

    @property
    def live(self) -> list[PgServerConn]:
        return [c for c in self.conns if not c.closed]

    async def kill(self, *, fatal: bool) -> None:
        """End every open session now (pg_terminate_backend sends a FATAL; a crash says nothing)."""
        for sc in self.live:
            sc.closed = True
            assert sc.conn is not None
            if fatal:
                try:
                    await sc.conn.send_all(FATAL_57P01)
                except OSError:
                    pass
            await sc.conn.aclose()

    async def serve(self, conn: Conn) -> None:
        """Serve one connection until the client leaves, a fault, or ``kill``."""
        self._next_pid += 1
        sc = PgServerConn(self, self._next_pid)
        self.conns.append(sc)
        try:
            conn, data = await self._startup(sc, conn)
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
                if sc.pid in self.hangup_after:
                    break
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            sc.closed = True
            await conn.aclose()

    async def _startup(self, sc: PgServerConn, conn: Conn) -> tuple[Conn, bytes]:
        """The startup phase; returns the connection (TLS may have replaced it) and what the
        client sent behind its login."""
        reader = FrameReader()
        while True:
            payload = reader.next_startup()
            if payload is None:
                data = await conn.recv_some(65536)
                if not data:
                    raise ConnectionResetError("client left during startup")
                reader.feed(data)
                continue
            packet = parse_startup_packet(payload)
            if isinstance(packet, SSLRequest):
                if self.tls_context is None:
                    await conn.send_all(b"N")
                    continue
                await conn.send_all(b"S")
                stream = trio.SSLStream(conn.to_stream(), self.tls_context, server_side=True)
                await stream.do_handshake()
                conn = StreamConn(stream)
                sc.tls = True
                continue
            assert isinstance(packet, StartupMessage)
            sc.params = dict(packet.parameters)
            break
        if self.secret is None:
            await conn.send_all(m.AuthenticationOk().encode())
        else:
            auth = ScramServerAuth(packet.user, self.secret)
            await conn.send_all(auth.start())
            done = False
            while not done:
                msg = reader.next_message()
                if msg is None:
                    data = await conn.recv_some(65536)
                    if not data:
                        raise ConnectionResetError("client left during authentication")
                    reader.feed(data)
                    continue
                reply, done = auth.step(msg[1])
                await conn.send_all(reply)
        hello = (m.ParameterStatus("server_version", "15.0 (sim)").encode()
                 + m.ParameterStatus("application_name", sc.params.get("application_name", "")).encode()
                 + m.ParameterStatus("standard_conforming_strings", "on").encode()
                 + m.BackendKeyData(sc.pid, 0x5EC0 + sc.pid).encode() + m.ReadyForQuery("I").encode())
        await conn.send_all(hello)
        return conn, reader.take_buffered()
