"""Test doubles for the PostgreSQL session core: an environment, a scripted server, a driver.

The scripted server answers the frontend messages the tests send (simple and extended
protocol, COPY FROM STDIN, transactions) the way PostgreSQL does, closely enough for the
core's bookkeeping; it is a unit-test double, never used against the proxy's integration
tests (those use real servers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.routing.pg_classify import FunctionPolicy
from endpoint_proxy.sessioncore.actions import (
    ATTEND,
    FORWARD,
    Action,
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
from endpoint_proxy.sessioncore.pg import PgSessionCore

# --- messages ----------------------------------------------------------------------------


def q(sql: str) -> bytes:
    return m.Query(sql).encode()


def parse(name: str, sql: str) -> bytes:
    return m.Parse(name, sql).encode()


def bind(statement: str = "", params: tuple[bytes | None, ...] = ()) -> bytes:
    return m.Bind("", statement, (), params, ()).encode()


def execute() -> bytes:
    return m.Execute("").encode()


def describe(kind: str = "P", name: str = "") -> bytes:
    return m.Describe(kind, name).encode()


SYNC = m.Sync().encode()
FLUSH = m.Flush().encode()
TERMINATE = m.Terminate().encode()


def copy_data(data: bytes) -> bytes:
    return m.CopyData(data).encode()


COPY_DONE = m.CopyDone().encode()


def rfq(status: str = "I") -> bytes:
    return m.ReadyForQuery(status).encode()


FATAL_TERMINATED = m.error_response("FATAL", "57P01", "terminating connection due to administrator command")


# --- the environment -----------------------------------------------------------------------


@dataclass
class FakeEnv:
    generation: int = 0
    placement: Callable[[str, str], bool] = lambda role, instance: True
    started: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    unpins: list[str] = field(default_factory=list)
    functions: FunctionPolicy = field(default_factory=FunctionPolicy)
    gate_open: bool = True  # the writer gate
    gated: list[str] = field(default_factory=list)  # "begin" / "end", in order

    def placement_ok(self, role: str, instance: str) -> bool:
        return self.placement(role, instance)

    def function_policy(self) -> FunctionPolicy:
        return self.functions

    def request_started(self, instance: str, in_recovery: bool) -> None:
        self.started.append(instance)

    def request_ended(self, instance: str) -> None:
        self.ended.append(instance)

    def pinned(self, reason: str) -> None:
        self.pins.append(reason)

    def unpinned(self, reason: str) -> None:
        self.unpins.append(reason)

    def error(self, kind: str) -> None:
        self.errors.append(kind)

    def writer_begin(self) -> None:
        self.gated.append("begin")

    def writer_end(self) -> None:
        self.gated.append("end")


# --- a scripted server -----------------------------------------------------------------------


class FakePgServer:
    """Answers frontend messages; records every byte it received."""

    def __init__(self, name: str, *, in_recovery: bool = False) -> None:
        self.name = name
        self.in_recovery = in_recovery
        self.received = bytearray()
        self.queries: list[str] = []  # Query texts and Parse queries, in order
        self.status = "I"
        self.closed = False
        self._reader = FrameReader()
        self._copy = False
        self._error = False  # extended protocol: skip to Sync

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
                return m.CommandComplete("COPY 1").encode() + rfq(self.status)
        if self._error and t != "S":
            return b""
        if t == "Q":
            sql = payload.rstrip(b"\0").decode()
            self.queries.append(sql)
            return self._query(sql)
        if t == "P":
            name, _, rest = payload.partition(b"\0")
            self.queries.append(rest[: rest.find(b"\0")].decode())
            if self.in_recovery and self.queries[-1].lower().startswith(("insert", "update", "delete")):
                self._error = True
                return m.error_response("ERROR", "25006", "cannot execute in a read-only transaction")
            return m.ParseComplete().encode()
        if t == "B":
            return m.BindComplete().encode()
        if t == "D":
            return m.NoData().encode()
        if t == "E":
            return m.CommandComplete("SELECT 1").encode()
        if t == "C":
            return m.CloseComplete().encode()
        if t == "S":
            self._error = False
            return rfq(self.status)
        if t == "X":
            self.closed = True
        return b""

    def _query(self, sql: str) -> bytes:
        low = sql.strip().lower()
        if low.startswith("copy") and "from stdin" in low:
            self._copy = True
            return m.CopyInResponse(0, ()).encode()
        if low.startswith("begin"):
            self.status = "T"
            return m.CommandComplete("BEGIN").encode() + rfq(self.status)
        if low.startswith(("commit", "rollback")):
            self.status = "I"
            return m.CommandComplete(low.split()[0].upper()).encode() + rfq(self.status)
        if self.in_recovery and low.startswith(("insert", "update", "delete", "create")):
            status = "E" if self.status != "I" else "I"
            self.status = status
            return m.error_response("ERROR", "25006", "cannot execute in a read-only transaction") + rfq(status)
        return m.CommandComplete("SELECT 1").encode() + rfq(self.status)


# --- a driver that plays the shell ---------------------------------------------------------------


def pieces(data: bytes, size: int | Iterable[int]) -> list[bytes]:
    """``data`` cut into pieces of ``size`` bytes (or of each size in turn)."""
    out = []
    sizes = iter([size] * len(data) if isinstance(size, int) else size)
    pos = 0
    while pos < len(data):
        n = max(1, next(sizes, len(data)))
        out.append(data[pos: pos + n])
        pos += n
    return out


class Driver:
    """Runs a core against scripted servers the way the trio shell would, synchronously."""

    def __init__(self, servers: dict[str, FakePgServer], route: Callable[[str, frozenset[str]], str | None], *,
                 readwrite: bool = False, consistency: bool = False, first: str | None = None,
                 server_piece: int | None = None, alive: Callable[[str], bool] = lambda name: True) -> None:
        self.env = FakeEnv()
        self.servers = servers
        self.route = route
        self.alive = alive  # the monitor's verdict: is the instance still up in its role?
        first = first or route("writer" if readwrite else "main", frozenset())
        assert first is not None
        self.active: FakePgServer | None = servers[first]
        self.parked: dict[str, FakePgServer] = {}
        self.core = PgSessionCore(self.env, BackendFacts(first, servers[first].in_recovery),
                                  readwrite=readwrite, session_consistency=consistency)
        self.to_client = bytearray()
        self.server_piece = server_piece
        self.closed = False
        self.attaches: list[tuple[str, str]] = []  # (role, instance)
        self.actions: list[Action] = []

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

    def _attach(self, action: Attach) -> None:
        server = self.parked.pop(action.role, None)
        fresh = server is None
        if server is None:
            name = self.route(action.role, action.exclude)
            if name is None:
                self.core.attach_failed(AttachError("no_route", "57P03", "no instance"))
                return
            server = FakePgServer(name, in_recovery=self.servers[name].in_recovery)
            self.servers[name + f"#{len(self.attaches)}"] = server
        plan = self.core.replay_plan(action.role, fresh)
        if plan.batch:
            server.feed(plan.batch)
        self.active = server
        self.attaches.append((action.role, server.name))
        self.core.attached_backend(BackendFacts(server.name, server.in_recovery, server.status))

    def _to_server(self, data: bytes) -> None:
        server = self.active
        assert server is not None, "the core forwarded bytes with no backend"
        answer = server.feed(bytes(data))
        for chunk in pieces(answer, self.server_piece) if self.server_piece else ([answer] if answer else []):
            if self.core.server_data(chunk) != ATTEND:  # FORWARD, FORWARD_FIRST
                self.to_client += chunk

    def server_closes(self, fatal: bytes = b"") -> None:
        """The active server sends ``fatal`` (if any) and closes."""
        if fatal and self.core.server_data(fatal) != ATTEND:
            self.to_client += fatal
        self.core.server_eof()
        self.run()


def messages(data: bytes) -> list[tuple[str, bytes]]:
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append((chr(msg[0]), msg[1]))
    return out


def ready_statuses(data: bytes) -> str:
    return "".join(chr(p[0]) for t, p in messages(data) if t == "Z")


def error_codes(data: bytes) -> list[str]:
    codes = []
    for t, p in messages(data):
        if t == "E":
            err = m.decode_backend(ord("E"), p)
            assert isinstance(err, m.ErrorResponse)
            codes.append(err.sqlstate)
    return codes
