"""The admin console over in-memory streams: a fake proxy state, a small PostgreSQL client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from endpoint_proxy.admin.console import (
    SIMPLE_PROTOCOL_ONLY,
    AdminUsers,
    serve_pg_console,
    split_commands,
)
from endpoint_proxy.config import Address, ConfigError, UserConfig, parse_config
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.auth import (
    BackendAuthenticator,
    ScramSecret,
    format_scram_verifier,
    make_scram_secret,
    parse_scram_verifier,
)
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.protocol.pg.startup import StartupMessage
from endpoint_proxy.relay.net import StreamConn
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.server.session.context import CONSOLE_DATABASE
from endpoint_proxy.server.session.info import SessionInfo, session_state
from endpoint_proxy.topology.state import ProbeResult

DOC: dict[str, Any] = {
    "admin": {"users": [{"name": "admin", "password": "admin-secret"},
                        {"name": "ops", "password": "ops-secret"}]},
    "clusters": [{
        "name": "app",
        "protocol": "postgresql",
        "users": [{"name": "app", "password": "app-secret"}],
        "instances": [{"name": "a", "host": "10.0.0.1", "port": 5432},
                      {"name": "b", "host": "10.0.0.2", "port": 5433},
                      {"name": "c", "host": "10.0.0.3", "port": 5434}],
        "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "writer", "tls": "off"},
                      {"name": "ro", "listen": "127.0.0.1:6433", "kind": "reader"},
                      {"name": "split", "listen": "127.0.0.1:6434", "kind": "readwrite", "consistency": "session"}],
    }],
}


@dataclass
class FakeState:
    """The ConsoleState of a proxy: clusters fed by hand, sessions from a list, a scripted reload."""

    admin_users: AdminUsers
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    clusters: dict[str, ClusterRuntime] = field(default_factory=dict)
    bound: dict[str, Address] = field(default_factory=dict)
    session_list: list[SessionInfo] = field(default_factory=list)
    reload_error: Exception | None = None
    reload_result: object = None
    reloads: int = 0

    def sessions(self) -> Iterable[SessionInfo]:
        return list(self.session_list)

    async def reload(self) -> object:
        self.reloads += 1
        await trio.lowlevel.checkpoint()
        if self.reload_error is not None:
            raise self.reload_error
        return self.reload_result

    @property
    def cluster(self) -> ClusterRuntime:
        return self.clusters["app"]

    def probe(self, name: str, *, in_recovery: bool, lsn: int = 1000, timeline: int = 1) -> None:
        result = (ProbeResult(in_recovery=False, current_lsn=lsn, timeline=timeline) if not in_recovery
                  else ProbeResult(in_recovery=True, receive_lsn=lsn, replay_lsn=lsn))
        self.cluster._apply(self.cluster.topology.probe_succeeded(name, trio.current_time(), result=result))

    def fail(self, name: str, error: str = "connection refused") -> None:
        self.cluster._apply(self.cluster.topology.probe_failed(name, trio.current_time(), error))


_ADMIN_USERS = AdminUsers(parse_config(DOC).admin.users)
_ADMIN_USERS.prepare()  # once per test run: PBKDF2 is slow on purpose


def make_state() -> FakeState:
    config = parse_config(DOC)
    state = FakeState(admin_users=_ADMIN_USERS)
    for c in config.clusters:
        state.clusters[c.name] = ClusterRuntime(c, state.metrics.cluster(c.name))
    state.bound["app/rw"] = Address("127.0.0.1", 7001)
    return state


class Client:
    """The client end of an in-memory connection: frames out, decoded messages in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = FrameReader()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def message(self) -> m.BackendMessage | None:
        """The next message; None at end of stream."""
        with trio.fail_after(5):
            while True:
                msg = self.reader.next_message()
                if msg is not None:
                    return m.decode_backend(*msg)
                data = await self.stream.receive_some(65536)
                if not data:
                    assert self.reader.buffered == 0
                    return None
                self.reader.feed(data)

    async def until_ready(self) -> list[m.BackendMessage]:
        """Messages up to and including ReadyForQuery."""
        out: list[m.BackendMessage] = []
        while True:
            msg = await self.message()
            assert msg is not None, f"connection closed; got {out}"
            out.append(msg)
            if isinstance(msg, m.ReadyForQuery):
                return out

    async def login(self, user: str, password: str) -> list[m.BackendMessage]:
        """SCRAM as libpq does it; returns what came after the exchange (up to RFQ or close)."""
        auth = BackendAuthenticator(user, password)
        while True:
            msg = await self.message()
            if isinstance(msg, m.Authentication):
                reply = auth.respond(msg)
                if reply is not None:
                    await self.send(reply)
                if auth.done:
                    return await self.until_ready()
                continue
            rest: list[m.BackendMessage] = [] if msg is None else [msg]
            while msg is not None:
                msg = await self.message()
                if msg is not None:
                    rest.append(msg)
            return rest

    async def query(self, sql: str) -> list[m.BackendMessage]:
        await self.send(m.Query(sql).encode())
        return await self.until_ready()

    async def closed(self) -> bool:
        return await self.message() is None


@dataclass
class Console:
    state: FakeState
    client: Client
    done: trio.Event


async def open_console(nursery: trio.Nursery, state: FakeState, user: str = "admin",
                       **kwargs: Any) -> Console:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    startup = StartupMessage(0x30000, {"user": user, "database": CONSOLE_DATABASE, "application_name": "psql"})
    done = trio.Event()

    async def serve() -> None:
        await serve_pg_console(StreamConn(server_stream), startup, FrameReader(10_000), bytearray(8192), state,
                               **kwargs)
        done.set()

    nursery.start_soon(serve)
    return Console(state, Client(client_stream), done)


@pytest.fixture
async def console(nursery: trio.Nursery) -> AsyncIterator[Console]:
    c = await open_console(nursery, make_state())
    hello = await c.client.login("admin", "admin-secret")
    assert isinstance(hello[-1], m.ReadyForQuery) and hello[-1].status == "I"
    yield c


def rows(messages: list[m.BackendMessage]) -> tuple[list[str], list[list[str | None]]]:
    """(column names, rows) of a one-result answer; checks its shape on the way."""
    desc = [x for x in messages if isinstance(x, m.RowDescription)]
    assert len(desc) == 1
    assert all(f.type_oid == 25 and f.format == 0 for f in desc[0].fields)
    assert isinstance(messages[-2], m.CommandComplete) and messages[-2].tag == "SHOW"
    assert isinstance(messages[-1], m.ReadyForQuery) and messages[-1].status == "I"
    data = [[None if v is None else v.decode() for v in x.values] for x in messages if isinstance(x, m.DataRow)]
    return [f.name for f in desc[0].fields], data


def table(messages: list[m.BackendMessage]) -> list[dict[str, str | None]]:
    columns, data = rows(messages)
    return [dict(zip(columns, r, strict=True)) for r in data]


def error_of(messages: list[m.BackendMessage]) -> m.ErrorResponse:
    errors = [x for x in messages if isinstance(x, m.ErrorResponse)]
    assert len(errors) == 1
    return errors[0]


# --- login -----------------------------------------------------------------------------------------


async def test_login_sends_what_psql_expects(nursery: trio.Nursery) -> None:
    c = await open_console(nursery, make_state())
    hello = await c.client.login("admin", "admin-secret")
    params = {x.name: x.value for x in hello if isinstance(x, m.ParameterStatus)}
    assert params["client_encoding"] == "UTF8"
    assert params["server_encoding"] == "UTF8"
    assert params["DateStyle"].startswith("ISO")
    assert params["integer_datetimes"] == "on"
    assert params["standard_conforming_strings"] == "on"
    assert params["server_version"].split(" ")[0].replace(".", "").isdigit()
    assert params["application_name"] == "psql"
    assert params["session_authorization"] == "admin"
    (key,) = [x for x in hello if isinstance(x, m.BackendKeyData)]
    assert isinstance(hello[-1], m.ReadyForQuery) and hello[-1].status == "I"
    # Another login gets other keys.
    c2 = await open_console(nursery, c.state, user="ops")
    hello2 = await c2.client.login("ops", "ops-secret")
    (key2,) = [x for x in hello2 if isinstance(x, m.BackendKeyData)]
    assert (key.process_id, key.secret_key) != (key2.process_id, key2.secret_key)


@pytest.mark.parametrize(("user", "password"), [
    ("admin", "wrong"),
    ("nobody", "admin-secret"),  # not an admin user: the same answer as a wrong password
    ("app", "app-secret"),  # a cluster user is no admin user
])
async def test_failed_login_is_28P01_and_closes(nursery: trio.Nursery, user: str, password: str) -> None:
    c = await open_console(nursery, make_state(), user=user)
    rest = await c.client.login(user, password)
    assert len(rest) == 1 and isinstance(rest[0], m.ErrorResponse)
    err = rest[0]
    assert (err.severity, err.sqlstate) == ("FATAL", "28P01")
    assert err.message == f'password authentication failed for user "{user}"'
    with trio.fail_after(5):
        await c.done.wait()


async def test_no_admin_users_means_no_login(nursery: trio.Nursery) -> None:
    state = make_state()
    state.admin_users = AdminUsers()
    c = await open_console(nursery, state)
    rest = await c.client.login("admin", "admin-secret")
    assert [(e.severity, e.sqlstate) for e in rest if isinstance(e, m.ErrorResponse)] == [("FATAL", "28P01")]


async def test_login_must_finish_in_time(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    c = await open_console(nursery, make_state(), auth_timeout_s=3)
    msg = await c.client.message()
    assert isinstance(msg, m.AuthenticationSASL)
    start = trio.current_time()
    await c.done.wait()  # the client never answers
    assert trio.current_time() - start == pytest.approx(3)
    assert await c.client.closed()


async def test_a_non_password_message_during_login_is_fatal(nursery: trio.Nursery) -> None:
    c = await open_console(nursery, make_state())
    assert isinstance(await c.client.message(), m.AuthenticationSASL)
    await c.client.send(m.Query("SHOW HELP").encode())
    err = await c.client.message()
    assert isinstance(err, m.ErrorResponse) and (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert await c.client.closed()


async def test_a_client_that_leaves_during_login_is_just_gone(nursery: trio.Nursery) -> None:
    c = await open_console(nursery, make_state())
    assert isinstance(await c.client.message(), m.AuthenticationSASL)
    await c.client.stream.aclose()
    with trio.fail_after(5):
        await c.done.wait()


# --- commands -------------------------------------------------------------------------------------


async def test_show_clusters(console: Console) -> None:
    assert table(await console.client.query("SHOW CLUSTERS")) == [{
        "name": "app", "protocol": "postgresql", "status": "no-writer", "writer": None,
        "instances": "3", "endpoints": "3", "authority": None, "authority_status": None, "leader": None,
        "revision": None}]
    console.state.probe("a", in_recovery=False)
    (c,) = table(await console.client.query("show clusters;"))
    assert (c["status"], c["writer"]) == ("available", "a")


async def test_show_instances(console: Console) -> None:
    state = console.state
    state.probe("a", in_recovery=False, lsn=5000, timeline=3)
    state.probe("b", in_recovery=True, lsn=5000)
    state.probe("c", in_recovery=True, lsn=4000)
    state.cluster.connections["b"] += 2
    columns, _ = rows(await console.client.query("SHOW INSTANCES"))
    assert columns == ["cluster", "name", "address", "role", "health", "lag_bytes", "lag_ms", "timeline", "fenced",
                       "connections", "last_error"]
    inst = {r["name"]: r for r in table(await console.client.query("  Show   Instances ; "))}
    assert inst["a"] == {"cluster": "app", "name": "a", "address": "10.0.0.1:5432", "role": "writer",
                         "health": "up", "lag_bytes": "0", "lag_ms": inst["a"]["lag_ms"], "timeline": "3",
                         "fenced": "false", "connections": "0", "last_error": None}
    assert (inst["b"]["role"], inst["b"]["lag_bytes"], inst["b"]["connections"]) == ("reader", "0", "2")
    assert (inst["c"]["role"], inst["c"]["lag_bytes"]) == ("reader", "1000")
    state.fail("c", "connection refused")
    inst = {r["name"]: r for r in table(await console.client.query("SHOW INSTANCES"))}
    assert (inst["c"]["health"], inst["c"]["last_error"]) == ("down", "connection refused")


async def test_show_endpoints(console: Console) -> None:
    state = console.state
    state.probe("a", in_recovery=False)
    state.probe("b", in_recovery=True)
    state.probe("c", in_recovery=True)
    columns, _ = rows(await console.client.query("SHOW ENDPOINTS"))
    assert columns == ["cluster", "name", "kind", "listen", "members", "tls", "consistency", "statements", "p50_ms",
                       "p99_ms"]
    no_stats = {"statements": None, "p50_ms": None, "p99_ms": None}  # no listener has counted anything
    assert table(await console.client.query("show endpoints")) == [
        {"cluster": "app", "name": "rw", "kind": "writer", "listen": "127.0.0.1:7001", "members": "a",
         "tls": "off", "consistency": None, **no_stats},
        {"cluster": "app", "name": "ro", "kind": "reader", "listen": "127.0.0.1:6433", "members": "b,c",
         "tls": "optional", "consistency": None, **no_stats},
        {"cluster": "app", "name": "split", "kind": "readwrite", "listen": "127.0.0.1:6434", "members": "a",
         "tls": "optional", "consistency": "session", **no_stats},
    ]
    state.fail("a")
    assert table(await console.client.query("SHOW ENDPOINTS"))[0]["members"] == ""


async def test_show_sessions(console: Console) -> None:
    assert rows(await console.client.query("SHOW SESSIONS")) == (
        ["cluster", "endpoint", "id", "user", "database", "instance", "state", "client", "pinned"], [])
    console.state.session_list = [
        SessionInfo("app", "ro", 7, "app", "appdb", "b", "idle", "127.0.0.1:50000"),
        SessionInfo("app", "rw", 3, "app", "appdb", "a", "idle in transaction", None, pinned="LISTEN"),
        SessionInfo("app", "rw", 9, None, None, None, "startup", "127.0.0.1:50002"),
    ]
    assert rows(await console.client.query("SHOW SESSIONS"))[1] == [
        ["app", "rw", "3", "app", "appdb", "a", "idle in transaction", None, "LISTEN"],
        ["app", "ro", "7", "app", "appdb", "b", "idle", "127.0.0.1:50000", None],
        ["app", "rw", "9", None, None, None, "startup", "127.0.0.1:50002", None],
    ]


async def test_show_help_lists_every_command(console: Console) -> None:
    columns, data = rows(await console.client.query("SHOW HELP"))
    assert columns == ["command", "description"]
    assert [r[0] for r in data][:9] == ["SHOW CLUSTERS", "SHOW INSTANCES", "SHOW ENDPOINTS", "SHOW SESSIONS",
                                        "SHOW POOLS", "SHOW FAULTS", "SHOW HELP", "RELOAD",
                                        "SWITCHOVER [cluster] [TO instance]"]
    simulate = [r[0] for r in data if r[0] is not None and r[0].startswith("SIMULATE")]
    assert [c.split(" ")[1] for c in simulate] == ["INSTANCE", "<p>", "LATENCY", "BANDWIDTH", "SLICER", "RESET",
                                                   "REPLICA"]
    assert data[-1][0] == "CLEAR FAULTS | CLEAR FAULT <id>"


async def test_several_commands_in_one_query(console: Console) -> None:
    answer = await console.client.query("SHOW CLUSTERS; SHOW HELP;")
    assert [type(x) for x in answer].count(m.RowDescription) == 2
    assert [x.tag for x in answer if isinstance(x, m.CommandComplete)] == ["SHOW", "SHOW"]
    # An error stops the rest, as in a server.
    answer = await console.client.query("SHOW CLUSTERS; bogus; SHOW HELP")
    assert [x.tag for x in answer if isinstance(x, m.CommandComplete)] == ["SHOW"]
    assert error_of(answer).sqlstate == "42601"


async def test_empty_query(console: Console) -> None:
    answer = await console.client.query(" ; ")
    assert [type(x) for x in answer] == [m.EmptyQueryResponse, m.ReadyForQuery]


@pytest.mark.parametrize(("sql", "sqlstate"), [
    ("SELECT 1", "42601"),
    ("SHOW", "42601"),
    ("SHOW STATS", "0A000"),
    ("SHOW CLUSTERS EXTRA", "0A000"),
    ("RELOAD NOW", "42601"),
    ("BEGIN", "42601"),
])
async def test_anything_else_is_an_error_and_the_session_goes_on(console: Console, sql: str,
                                                                 sqlstate: str) -> None:
    answer = await console.client.query(sql)
    err = error_of(answer)
    assert (err.severity, err.sqlstate) == ("ERROR", sqlstate)
    assert "SHOW HELP" in err.fields.get("H", "")
    assert [type(x) for x in answer] == [m.ErrorResponse, m.ReadyForQuery]
    assert rows(await console.client.query("SHOW HELP"))[1]


async def test_reload(console: Console) -> None:
    state = console.state
    answer = await console.client.query("RELOAD")
    assert [type(x) for x in answer] == [m.CommandComplete, m.ReadyForQuery]
    assert isinstance(answer[0], m.CommandComplete) and answer[0].tag == "RELOAD"
    assert state.reloads == 1
    # What changed comes back as notices.
    state.reload_result = ["endpoint ro changed", "endpoint x added"]
    answer = await console.client.query("reload;")
    assert [x.message for x in answer if isinstance(x, m.NoticeResponse)] == ["endpoint ro changed",
                                                                               "endpoint x added"]
    assert isinstance(answer[-2], m.CommandComplete) and answer[-2].tag == "RELOAD"


@pytest.mark.parametrize(("error", "sqlstate", "text"), [
    (ConfigError("clusters[0].endpoints[1].kind", "must be one of writer, reader"), "F0000",
     "clusters[0].endpoints[1].kind: must be one of writer, reader"),
    (OSError(98, "cannot listen: Address already in use"), "F0000", "Address already in use"),
    (NotImplementedError("this proxy was started without a config file"), "0A000", "without a config file"),
])
async def test_a_failed_reload_is_an_error(console: Console, error: Exception, sqlstate: str, text: str) -> None:
    console.state.reload_error = error
    answer = await console.client.query("RELOAD")
    err = error_of(answer)
    assert (err.severity, err.sqlstate) == ("ERROR", sqlstate)
    assert text in err.message
    assert isinstance(answer[-1], m.ReadyForQuery)
    assert rows(await console.client.query("SHOW CLUSTERS"))[1]


async def test_a_bug_in_a_command_is_an_error_not_a_crash(console: Console) -> None:
    def broken() -> Iterable[SessionInfo]:
        raise RuntimeError("boom")

    console.state.sessions = broken  # type: ignore[method-assign]
    err = error_of(await console.client.query("SHOW SESSIONS"))
    assert (err.severity, err.sqlstate) == ("ERROR", "XX000")
    assert rows(await console.client.query("SHOW HELP"))[1]


# --- the protocol ------------------------------------------------------------------------------


async def test_extended_protocol_is_refused_until_sync(console: Console) -> None:
    batch = (m.Parse("", "SHOW CLUSTERS", ()).encode()
             + m.Bind("", "", (), (), ()).encode()
             + m.Describe("P", "").encode()
             + m.Execute("", 0).encode()
             + m.Query("SHOW HELP").encode()  # skipped, as a server skips everything up to Sync
             + m.Sync().encode())
    await console.client.send(batch)
    answer = await console.client.until_ready()
    assert [type(x) for x in answer] == [m.ErrorResponse, m.ReadyForQuery]
    err = error_of(answer)
    assert (err.severity, err.sqlstate, err.message) == ("ERROR", "0A000", SIMPLE_PROTOCOL_ONLY)
    # A lone Sync, a Flush and stray COPY messages are harmless.
    await console.client.send(m.Flush().encode() + m.CopyDone().encode() + m.Sync().encode())
    assert [type(x) for x in await console.client.until_ready()] == [m.ReadyForQuery]
    assert rows(await console.client.query("SHOW HELP"))[1]


async def test_function_call_is_refused(console: Console) -> None:
    await console.client.send(m.FunctionCall(1, (), (), 0).encode())
    answer = await console.client.until_ready()
    assert error_of(answer).message == SIMPLE_PROTOCOL_ONLY


async def test_pipelined_queries_are_answered_in_order(console: Console) -> None:
    await console.client.send(m.Query("SHOW CLUSTERS").encode() + m.Query("bogus").encode()
                              + m.Query("SHOW HELP").encode())
    first, second, third = [await console.client.until_ready() for _ in range(3)]
    assert rows(first)[0][0] == "name"
    assert error_of(second).sqlstate == "42601"
    assert rows(third)[0][0] == "command"


async def test_terminate_closes(console: Console) -> None:
    await console.client.send(m.Terminate().encode())
    assert await console.client.closed()
    with trio.fail_after(5):
        await console.done.wait()


async def test_a_client_that_leaves_is_just_gone(console: Console) -> None:
    await console.client.stream.aclose()
    with trio.fail_after(5):
        await console.done.wait()


async def test_an_unknown_message_type_is_fatal(console: Console) -> None:
    await console.client.send(b"y\x00\x00\x00\x04")
    err = await console.client.message()
    assert isinstance(err, m.ErrorResponse) and (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert await console.client.closed()


async def test_a_malformed_query_is_fatal(console: Console) -> None:
    await console.client.send(b"Q\x00\x00\x00\x08SHOW")  # no terminating zero byte
    err = await console.client.message()
    assert isinstance(err, m.ErrorResponse) and (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert await console.client.closed()


async def test_an_impossible_length_closes_at_once(console: Console) -> None:
    await console.client.send(b"Q\x7f\xff\xff\xff")
    assert await console.client.closed()


# --- pieces ---------------------------------------------------------------------------------------


def test_split_commands() -> None:
    assert split_commands("  show\n  clusters ;; SHOW\tHELP;") == ["show clusters", "SHOW HELP"]
    assert split_commands(" ; ") == []


def test_session_state_words() -> None:
    assert session_state(logged_in=False, busy=False, transaction="I") == "startup"
    assert session_state(logged_in=True, busy=True, transaction="T") == "active"
    assert session_state(logged_in=True, busy=False, transaction="I") == "idle"
    assert session_state(logged_in=True, busy=False, transaction="T") == "idle in transaction"
    assert session_state(logged_in=True, busy=False, transaction="E") == "idle in transaction (aborted)"


def test_admin_users_derive_once_and_survive_a_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    derived: list[str] = []

    def counting(password: str) -> ScramSecret:
        derived.append(password)
        return make_scram_secret(password)

    monkeypatch.setattr("endpoint_proxy.admin.console.make_scram_secret", counting)
    users = AdminUsers([UserConfig("admin", "one"), UserConfig("ops", "two")])
    users.prepare()
    assert sorted(derived) == ["one", "two"] and len(users) == 2 and set(users) == {"admin", "ops"}
    first = users["admin"]
    assert users["admin"] is first and len(derived) == 2
    assert users.get("nobody") is None
    # A reload: admin unchanged keeps its verifier, ops' new password gets a new one, new user derived lazily.
    updated = users.updated([UserConfig("admin", "one"), UserConfig("ops", "three"), UserConfig("new", "four")])
    assert updated["admin"] is first
    assert updated["ops"] != users["ops"]
    assert updated["new"].iterations == 4096
    assert sorted(derived) == ["four", "one", "three", "two"]


def test_admin_users_config() -> None:
    config = parse_config(DOC)
    assert config.admin.users == (UserConfig("admin", "admin-secret"), UserConfig("ops", "ops-secret"))
    assert config.admin.listen is None
    assert parse_config({"clusters": DOC["clusters"]}).admin.users == ()


@pytest.mark.parametrize(("users", "path"), [
    ([{"name": "", "password": "x"}], "admin.users[0].name"),
    ([{"password": "x"}], "admin.users[0].name"),
    ([{"name": "a"}], "admin.users[0].password"),
    ([{"name": "a", "password": ""}], "admin.users[0].password"),
    ([{"name": "a", "password": "x"}, {"name": "a", "password": "y"}], "admin.users[1].name"),
    ([{"name": "a", "password": "x", "auth": "md5"}], "admin.users[0].auth"),
    ("admin", "admin.users"),
    (["admin"], "admin.users[0]"),
])
def test_bad_admin_users_name_the_key(users: Any, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"admin": {"users": users}, "clusters": DOC["clusters"]})
    assert e.value.path == path


async def test_a_password_scram_cannot_use_lets_nobody_in(nursery: trio.Nursery) -> None:
    users = AdminUsers([UserConfig("bad", "a\u0007b")])
    users.prepare()  # logs, does not raise: the proxy starts
    state = make_state()
    state.admin_users = users
    c = await open_console(nursery, state, user="bad")
    rest = await c.client.login("bad", "whatever")
    assert [(e.severity, e.sqlstate) for e in rest if isinstance(e, m.ErrorResponse)] == [("FATAL", "28P01")]


async def test_an_admin_user_configured_by_its_verifier_logs_in(nursery: trio.Nursery,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = format_scram_verifier(make_scram_secret("verified-admin-pw"))
    config = parse_config({"admin": {"users": [{"name": "ops", "password": verifier}]}, "clusters": DOC["clusters"]})
    assert config.admin.users[0].password is None
    derived: list[str] = []

    def counting(password: str) -> ScramSecret:
        derived.append(password)
        return make_scram_secret(password)

    monkeypatch.setattr("endpoint_proxy.admin.console.make_scram_secret", counting)
    users = AdminUsers(config.admin.users)
    users.prepare()
    assert "verified-admin-pw" not in derived and users["ops"] == parse_scram_verifier(verifier)
    state = make_state()
    state.admin_users = users
    c = await open_console(nursery, state, user="ops")
    hello = await c.client.login("ops", "verified-admin-pw")
    assert isinstance(hello[-1], m.ReadyForQuery)
    wrong = await open_console(nursery, state, user="ops")
    rest = await wrong.client.login("ops", "not-it")
    assert [(e.severity, e.sqlstate) for e in rest if isinstance(e, m.ErrorResponse)] == [("FATAL", "28P01")]
