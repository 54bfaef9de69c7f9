"""Test doubles for transaction pooling (PostgreSQL): a server that keeps statements, settings and
buffered extended-protocol answers as PostgreSQL does, a pool of them, and a driver playing the shell.

The property the tests check: what each client receives through the pooled core is what it would
have received from a server of its own (``direct``), whatever other clients did on the shared
connections, and however the bytes were cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.sessioncore.actions import (
    ATTEND,
    FORWARD,
    Action,
    Attach,
    AttachError,
    BackendFacts,
    Close,
    Detach,
    Lost,
    PrepareStatements,
    Release,
    ToClient,
    ToServer,
)
from endpoint_proxy.sessioncore.pg import PgSessionCore
from endpoint_proxy.sessioncore.pg_pool import PooledMark, startup_settings

from .pgfakes import FakeEnv, pieces


def _err(code: str, text: str) -> bytes:
    return m.error_response("ERROR", code, text)


class StatefulServer:
    """One server connection: named statements, portals, settings, SQL PREPAREs, a transaction
    status; extended-protocol answers wait for Flush or Sync; an error skips to Sync."""

    def __init__(self, name: str = "w", *, in_recovery: bool = False) -> None:
        self.name = name
        self.in_recovery = in_recovery
        self.statements: dict[bytes, bytes] = {}
        self.sql_prepared: dict[str, str] = {}
        self.settings: dict[str, str] = {}
        self.status = "I"
        self.parses: list[bytes] = []  # statement names parsed, in order
        self.queries: list[str] = []
        self.received = bytearray()
        self._reader = FrameReader()
        self._pending = bytearray()  # extended answers not flushed yet
        self._skip = False
        self._copy = False

    def feed(self, data: bytes) -> bytes:
        self.received += data
        self._reader.feed(data)
        out = bytearray()
        while (msg := self._reader.next_message()) is not None:
            out += self._answer(*msg)
        return bytes(out)

    def _answer(self, type_: int, payload: bytes) -> bytes:
        t = chr(type_)
        if self._copy:
            if t == "d":
                return b""
            if t == "c":
                self._copy = False
                return m.CommandComplete("COPY 1").encode() + m.ReadyForQuery(self.status).encode()
        if t == "Q":
            return self._query(payload.rstrip(b"\0").decode())
        if t == "H":
            out, self._pending = bytes(self._pending), bytearray()
            return out
        if t == "S":
            self._skip = False
            if self.status == "E":
                self.status = "I"
            out = bytes(self._pending) + m.ReadyForQuery(self.status).encode()
            self._pending = bytearray()
            return out
        if t == "X" or self._skip:
            return b""
        self._pending += self._extended(t, payload)
        return b""

    def _fail(self, code: str, text: str) -> bytes:
        self._skip = True
        if self.status == "T":
            self.status = "E"
        return _err(code, text)

    def _extended(self, t: str, payload: bytes) -> bytes:
        if t == "P":
            name, _, rest = payload.partition(b"\0")
            query = rest[: rest.find(b"\0")]
            if name and name in self.statements:
                return self._fail("42P05", f'prepared statement "{name.decode()}" already exists')
            if b"syntax error" in query:
                return self._fail("42601", "syntax error")
            self.statements[name] = query
            self.parses.append(name)
            self.queries.append(query.decode())
            return m.ParseComplete().encode()
        if t == "B":
            _portal, _, rest = payload.partition(b"\0")
            name = rest[: rest.find(b"\0")]
            if name not in self.statements:
                return self._fail("26000", f'prepared statement "{name.decode()}" does not exist')
            return m.BindComplete().encode()
        if t == "D":
            if payload[:1] == b"S":
                if payload[1:-1] not in self.statements:
                    return self._fail("26000", "prepared statement does not exist")
                return m.ParameterDescription(()).encode() + m.NoData().encode()
            return m.NoData().encode()
        if t == "E":
            return m.CommandComplete("SELECT 1").encode()
        if t == "C":
            if payload[:1] == b"S":
                self.statements.pop(payload[1:-1], None)
            return m.CloseComplete().encode()
        return b""

    def _query(self, sql: str) -> bytes:
        self.queries.append(sql)
        low = sql.strip().rstrip(";").lower()
        rfq = m.ReadyForQuery
        words = low.split()
        if low.startswith("copy") and "from stdin" in low:
            self._copy = True
            return m.CopyInResponse(0, ()).encode()
        if low.startswith("begin"):
            self.status = "T"
            return m.CommandComplete("BEGIN").encode() + rfq(self.status).encode()
        if low.startswith(("commit", "rollback")):
            self.status = "I"
            return m.CommandComplete(words[0].upper()).encode() + rfq(self.status).encode()
        if self.status == "E":
            return _err("25P02", "current transaction is aborted") + rfq("E").encode()
        out = b""
        if words[:1] == ["set"] and "=" in low:
            name, value = (part.strip() for part in low[4:].split("=", 1))
            self.settings[name] = value.strip("'")
            if name == "application_name":
                out = m.ParameterStatus("application_name", value.strip("'")).encode()
        elif words[:1] == ["select"] and "set_config(" in low:
            args = low.split("set_config(", 1)[1].split(",")
            name, value = args[0].strip(" '"), args[1].strip(" '")
            self.settings[name] = value
            if name == "application_name":
                out = m.ParameterStatus("application_name", value).encode()
        elif words[:1] == ["reset"] and words[1:2] != ["all"] and len(words) > 1:
            self.settings.pop(words[1], None)
            if words[1] == "application_name":
                out = m.ParameterStatus("application_name", "").encode()
        elif low in ("reset all", "discard all"):
            self.settings.clear()
            if low == "discard all":
                self.statements.clear()
                self.sql_prepared.clear()
        elif words[:1] == ["prepare"]:
            self.sql_prepared[words[1]] = sql
        elif words[:1] == ["deallocate"]:
            name = words[-1].strip('"')
            if name not in self.sql_prepared:
                return _err("26000", f'prepared statement "{name}" does not exist') + rfq(self.status).encode()
            del self.sql_prepared[name]
        elif words[:1] == ["execute"] and words[1].split("(")[0] not in self.sql_prepared:
            return _err("26000", "prepared statement does not exist") + rfq(self.status).encode()
        elif words[:2] == ["show", "application_name"]:
            value = self.settings.get("application_name", "")
            out = (m.RowDescription((m.FieldDescription("application_name", 0, 0, 25, -1, -1, 0),)).encode()
                   + m.DataRow((value.encode(),)).encode())
        return out + m.CommandComplete(words[0].upper() if words else "EMPTY").encode() + rfq(self.status).encode()


def direct(flow: bytes) -> bytes:
    """What a client sending ``flow`` gets from a server of its own."""
    return StatefulServer().feed(flow)


class Pool:
    """Idle server connections per role; new ones on demand, up to ``size`` per role."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.idle: dict[str, list[tuple[StatefulServer, PooledMark]]] = {}
        self.opened: list[StatefulServer] = []
        self.lent = 0

    def borrow(self, role: str) -> tuple[StatefulServer, PooledMark] | None:
        idle = self.idle.setdefault(role, [])
        if idle:
            self.lent += 1
            return idle.pop()
        if sum(1 for s in self.opened if (s.in_recovery == (role == "reader"))) >= self.size:
            return None
        server = StatefulServer(f"{role}{len(self.opened)}", in_recovery=role == "reader")
        self.opened.append(server)
        self.lent += 1
        return server, PooledMark()

    def give_back(self, role: str, server: StatefulServer, mark: PooledMark) -> None:
        self.lent -= 1
        self.idle.setdefault(role, []).append((server, mark))


class PooledClient:
    """One client session on a transaction-mode endpoint, run synchronously the way the shell does."""

    def __init__(self, pool: Pool, *, readwrite: bool = False, startup: dict[str, str] | None = None,
                 max_prepared: int = 200, server_piece: int | None = None) -> None:
        self.env = FakeEnv()
        self.pool = pool
        self.core = PgSessionCore(self.env, BackendFacts("w", False), readwrite=readwrite, pooled=True,
                                  startup=startup_settings(startup) if startup else None, max_prepared=max_prepared,
                                  client_params={"application_name": (startup or {}).get("application_name", "")})
        self.active: tuple[StatefulServer, PooledMark] | None = None
        self.active_role = ""
        self.to_client = bytearray()
        self.server_piece = server_piece
        self.closed = False
        self.actions: list[Action] = []
        self.borrows: list[str] = []
        self.refused_borrow: Callable[[], bool] = lambda: False

    def send(self, data: bytes, piece: int | Iterable[int] | None = None) -> None:
        for chunk in pieces(data, piece) if piece else [data]:
            if self.closed:
                return
            if self.core.client_data(chunk) == FORWARD:
                self._to_server(chunk)
            self.run()

    def run(self) -> None:
        while (action := self.core.next_action()) is not None:
            self.actions.append(action)
            if isinstance(action, ToClient):
                self.to_client += action.data
            elif isinstance(action, ToServer):
                self._to_server(action.data)
            elif isinstance(action, Close):
                self.closed = True
                return
            elif isinstance(action, Release):
                assert self.active is not None
                server, mark = self.active
                if action.cleanup:
                    server.feed(action.cleanup)
                self.pool.give_back(self.active_role, server, mark)
                self.active = None
            elif isinstance(action, Attach):
                self._attach(action)
            elif isinstance(action, PrepareStatements):
                assert self.active is not None
                server = self.active[0]
                results = []
                error = b""
                for name, body in action.statements:
                    answer = server.feed(_parse(name, body) + m.Flush().encode())
                    results.append((name, answer[:1] == b"1"))
                    if answer[:1] == b"E":
                        error = answer
                        break
                self.core.prepared(results, error)
            elif isinstance(action, (Detach, Lost)):
                raise AssertionError(f"unexpected {action}")

    def _attach(self, action: Attach) -> None:
        got = None if self.refused_borrow() else self.pool.borrow(action.role)
        if got is None:
            self.core.attach_failed(AttachError("busy", "53300", "no server connection"))
            return
        server, mark = got
        plan = self.core.pooled_plan(mark)
        if plan.batch:
            server.feed(plan.batch)
        self.active = (server, mark)
        self.active_role = action.role
        self.borrows.append(server.name)
        params = {"application_name": server.settings.get("application_name", "")}
        self.core.attached_backend(BackendFacts(server.name, server.in_recovery, server.status,
                                                tuple(params.items())), mark=mark, conn_params=params)

    def _to_server(self, data: bytes) -> None:
        assert self.active is not None, "the core forwarded bytes with no backend"
        answer = self.active[0].feed(bytes(data))
        for chunk in pieces(answer, self.server_piece) if self.server_piece else ([answer] if answer else []):
            if self.core.server_data(chunk) != ATTEND:  # FORWARD, FORWARD_FIRST
                self.to_client += chunk


def _parse(name: bytes, body: bytes) -> bytes:
    payload = name + b"\0" + body
    return b"P" + (len(payload) + 4).to_bytes(4, "big") + payload
