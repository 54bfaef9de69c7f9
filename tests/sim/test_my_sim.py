"""MySQL sessions under the network simulator: the real shell (greeting, login, core, backends)
over streams cut at every byte boundary, in random pieces, late, and broken.

As for PostgreSQL (test_pg_sim.py): each flow runs whole first (the reference), then with the
client's stream to the proxy and the servers' streams to the proxy cut at every offset of the
flow, one byte at a time and at random sizes; the client must receive exactly the reference's
bytes, each server exactly its commands, and every session must end with nothing left counted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.framing import PacketReader
from endpoint_proxy.server.mysql.session import MySession
from endpoint_proxy.sessioncore.loss import LossOutcome

from .cluster import DOWN, PASSWORD, REPLICA, USER, WRITER, Sim
from .myclient import (
    CLIENT_CAPS,
    PING,
    QUIT,
    Command,
    MyClient,
    Response,
    close_statement,
    execute,
    init_db,
    packets,
    prepare,
    query,
    reset_statement,
)
from .myserver import KILLED
from .net import BYTEWISE, WHOLE, Delivery, delayed, random_sizes
from .runner import bounded, run, splits, until


@dataclass
class Ctx:
    """What a step made at run time sees: the cluster, the session, the responses so far."""

    sim: Sim
    session: MySession
    responses: list[Response]


# A step: commands sent at once (a pipeline when several), or a function of the run so far that
# returns commands (one with a statement id a PREPARE returned) or acts on the cluster (async).
Step = list[Command] | Callable[[Ctx], list[Command] | Awaitable[None]]
Flow = list[Step]


@dataclass
class Outcome:
    received: bytes
    responses: list[Response] = field(default_factory=list)
    served: dict[str, list[bytes]] = field(default_factory=dict)
    queries: dict[str, list[str]] = field(default_factory=dict)
    c2p: tuple[int, int] = (0, 0)
    s2p: tuple[int, int] = (0, 0)


def q(*sqls: str) -> list[Command]:
    return [Command(query(sql)) for sql in sqls]


def last_statement(run: Ctx) -> int:
    for r in reversed(run.responses):
        if r.tracker.prepare_ok is not None:
            return r.tracker.prepare_ok.statement_id
    raise AssertionError("no statement was prepared")


def errnos(responses: list[Response]) -> list[int]:
    return [r.tracker.error.errno for r in responses if r.tracker.error is not None]


def text_values(raw: bytes) -> list[str | None]:
    """The first column of every text row in ``raw`` (one response or several)."""
    from endpoint_proxy.protocol.mysql.framing import read_row_value

    out: list[str | None] = []
    for _, payload in packets(raw):
        first = payload[:1]
        if first in (b"\x00", b"\xff") or (first == b"\xfe" and len(payload) < 9) or payload[:4] == b"\x03def":
            continue
        if len(payload) == 1:  # a column count
            continue
        value, _ = read_row_value(payload, 0)
        out.append(None if value is None else value.decode())
    return out


async def case(sim: Sim, endpoint: str, flow: Flow, *, to_proxy: Delivery = WHOLE, from_proxy: Delivery = WHOLE,
               from_server: Delivery = WHOLE, to_server: Delivery = WHOLE, tls: bool = False,
               caps: int = CLIENT_CAPS, quit: bool = True) -> Outcome:
    sim.from_server, sim.to_server = from_server, to_server
    first_link = len(sim.backend_links)
    before = {name: len(server.conns) for name, server in sim.servers.items()}
    conn, session, link = sim.session(endpoint, to_proxy, from_proxy)
    assert isinstance(session, MySession)
    client = MyClient(conn, caps)
    out = Outcome(b"")
    what = _report(sim, client)
    with bounded(what, to_proxy=to_proxy, from_server=from_server):
        await client.login(USER, PASSWORD, database="app", tls=tls)
        out.c2p = (link.forward.written, 0)
        login_end = max(li.back.written for li in sim.backend_links[first_link:])
        for step in flow:
            made = step if isinstance(step, list) else step(Ctx(sim, session, out.responses))
            if isinstance(made, list):
                out.responses += await client.run(made)
            else:
                await made
        if quit and not client.eof:
            await client.send([Command(QUIT)])
        await client.until_closed()
        await sim.sessions_done()
    out.received = bytes(client.received)
    out.c2p = (out.c2p[0], link.forward.written)
    out.s2p = (login_end, max(li.back.written for li in sim.backend_links[first_link:]))
    for name, server in sim.servers.items():
        conns = server.conns[before[name]:]
        out.served[name] = [bytes(sc.received) for sc in conns]
        out.queries[name] = [sql for sc in conns for sql in sc.queries]
        for sc in conns:
            assert sc.leftover == 0, f"{name} got a command cut short: {bytes(sc.received)[-100:]!r}"
    return out


async def sweep(sim: Sim, endpoint: str, flow: Flow, *, from_start: bool = False,
                servers_from_start: bool = False, seeds: int = 3,
                check: Callable[[Outcome, Outcome, str], None] | None = None, caps: int = CLIENT_CAPS,
                after: Callable[[], Awaitable[None]] | None = None) -> Outcome:
    """The flow whole, then cut at every offset of the client's and the servers' streams (of the
    flow's part, or of the whole streams with ``from_start``, or of the servers' whole streams
    with ``servers_from_start``), one byte at a time and at random sizes; each run must match the
    reference (``check``: how)."""

    async def one(**kw: Any) -> Outcome:
        out = await case(sim, endpoint, flow, caps=caps, **kw)
        if after is not None:
            await after()
        return out

    ref = await one()

    def same(out: Outcome, ref: Outcome, how: str) -> None:
        assert out.received == ref.received, f"{how}: the client got other bytes\n{sim.dump()}"
        assert out.served == ref.served, f"{how}: a server got other commands"

    check = check or same
    for d in splits(1 if from_start else ref.c2p[0], ref.c2p[1], seeds=seeds):
        check(await one(to_proxy=d), ref, f"client->proxy {d.describe()}")
    for d in splits(1 if from_start or servers_from_start else ref.s2p[0], ref.s2p[1], seeds=seeds):
        check(await one(from_server=d), ref, f"server->proxy {d.describe()}")
    check(await one(to_proxy=BYTEWISE, from_proxy=BYTEWISE, from_server=BYTEWISE, to_server=BYTEWISE), ref,
          "every stream one byte at a time")
    return ref


def _flow_test(flow: Flow, endpoint: str = "writer", caps: int = CLIENT_CAPS, **sim_kw: object) -> Outcome:
    async def main() -> Outcome:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql", **sim_kw)  # type: ignore[arg-type]
            await sim.start(nursery)
            ref = await sweep(sim, endpoint, flow, caps=caps)
            nursery.cancel_scope.cancel()
            return ref

    return run(main)


# --- flows ------------------------------------------------------------------------------------

QUERIES: Flow = [
    q("select 1"), q("set @a = 5"), q("select @a"), q("begin"), q("insert into t values (1)"), q("commit"),
    q("select n from rows_4"), q("select * from nosuch"), q("use app2"), [Command(init_db("app3"))],
    [Command(PING)],
]

MULTI: Flow = [
    q("select 1; select n from rows_3; insert into t values (1); select 2"),  # four results
    q("select 1; select * from nosuch; select 3"),  # an error ends the results
    q("begin; insert into t values (2); commit"),
]

STATEMENTS: Flow = [
    [Command(prepare("select ?"))],
    lambda run: [Command(execute(last_statement(run), b"x"))],
    lambda run: [Command(execute(last_statement(run), b"y")), Command(reset_statement(last_statement(run)))],
    [Command(prepare("insert into t values (?, ?)"))],
    lambda run: [Command(execute(last_statement(run), b"1", b"2"))],
    lambda run: [Command(close_statement(last_statement(run))), Command(execute(last_statement(run), b"3", b"4"))],
    [Command(prepare("select n from rows_3"))],
    lambda run: [Command(execute(last_statement(run)))],
]

PIPELINED: Flow = [
    q("select 1", "begin", "insert into t values (1)", "commit", "select n from rows_2", "select * from nosuch")
    + [Command(PING), Command(prepare("select ?"))],
    lambda run: [Command(execute(last_statement(run), b"p")), *q("select 2; select 3")],
]


def test_login_with_native_password_at_every_split_point() -> None:
    # The greeting (with the first backend's thread id), mysql_native_password both ways (the
    # proxy logs in to the server with SHA1(password) from the client's own proof).
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql")
            await sim.start(nursery)
            ref = await sweep(sim, "writer", [q("select 1")], from_start=True, seeds=2)
            assert text_values(ref.received) == ["1"]
            nursery.cancel_scope.cancel()

    run(main)


def test_tls_upgrade_on_both_legs_in_pieces() -> None:
    # CLIENT_SSL from the client (its TLS handshake right behind the SSLRequest, in pieces) and
    # backend_tls = "require" to the server.
    flow: Flow = [q("select 1"), q("select n from rows_3; select 2")]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql", tls_backends=True, backend_tls="require")
            await sim.start(nursery)
            ref = await case(sim, "writer", flow, tls=True)
            assert all(sc.tls for sc in sim.servers["w"].conns)
            assert text_values(ref.received) == ["1", "1", "2", "3", "2"]
            for d in [BYTEWISE, random_sizes(1, 1, 200), random_sizes(2, 1, 40), Delivery(at=(36, 37, 40, 100))]:
                out = await case(sim, "writer", flow, to_proxy=d, from_proxy=d, from_server=d, to_server=d, tls=True)
                assert out.received == ref.received, d.describe()
            nursery.cancel_scope.cancel()

    run(main, threshold=0.05)


def test_text_queries_at_every_split_point(transport: str) -> None:
    ref = _flow_test(QUERIES)
    assert errnos(ref.responses) == [1146]
    assert text_values(ref.responses[2].raw) == ["5"]
    assert ref.served["w"][0].endswith(bytes(packets(ref.served["w"][0])[-1][1]))


def test_multi_result_sets_at_every_split_point(transport: str) -> None:
    ref = _flow_test(MULTI)
    assert ref.responses[0].tracker.result_sets == 3  # and one OK among them
    assert errnos(ref.responses) == [1146]
    assert text_values(ref.responses[1].raw) == ["1"]


def test_prepared_statements_at_every_split_point(transport: str) -> None:
    ref = _flow_test(STATEMENTS)
    assert errnos(ref.responses) == [1243]  # the closed statement
    assert ref.queries["w"][:2] == ["PREPARE select ?", "EXECUTE select ?"]


def test_pipelined_commands_at_every_split_point(transport: str) -> None:
    ref = _flow_test(PIPELINED)
    assert errnos(ref.responses) == [1146]
    assert len(ref.responses) == 10


def test_load_data_local_allowed_at_every_split_point(transport: str) -> None:
    flow: Flow = [[Command(query("load data local infile 'rows.txt' into table t"), b"1\n2\n3\n")], q("select 1")]
    ref = _flow_test(flow, caps=CLIENT_CAPS | k.CLIENT_LOCAL_FILES, allow_local_infile=True)
    assert ref.responses[0].tracker.affected_rows == 3


def test_load_data_local_refused_when_not_allowed(transport: str) -> None:
    # Not allowed: the proxy offers no CLIENT_LOCAL_FILES, so the server refuses (1148); a server
    # that asks for a file anyway gets none, and the client the proxy's own 1148.
    flow: Flow = [q("load data local infile '/etc/passwd' into table t"), q("select 1")]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql")
            await sim.start(nursery)
            ref = await sweep(sim, "writer", flow, caps=CLIENT_CAPS | k.CLIENT_LOCAL_FILES, seeds=1)
            assert errnos(ref.responses) == [1148]
            sim.servers["w"].ask_for_files = True
            ref = await sweep(sim, "writer", flow, caps=CLIENT_CAPS | k.CLIENT_LOCAL_FILES, seeds=1)
            assert errnos(ref.responses) == [1148]
            assert sim.servers["w"].loaded and set(sim.servers["w"].loaded) == {0}  # an empty file, each time
            nursery.cancel_scope.cancel()

    run(main)


# --- readwrite --------------------------------------------------------------------------------

READWRITE: Flow = [
    q("select 1"), q("insert into t values (1)"), q("select 2"), q("set sql_mode = 'ANSI'"), q("begin"),
    q("select 3"), q("commit"), [Command(prepare("select ?"))],
    lambda run: [Command(execute(last_statement(run), b"r"))], [Command(prepare("insert into t values (?)"))],
    lambda run: [Command(execute(last_statement(run), b"w"))], q("select @@sql_mode"),
]


def test_readwrite_switches_at_every_split_point(transport: str) -> None:
    async def main() -> Outcome:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql")
            await sim.start(nursery)

            def same(out: Outcome, ref: Outcome, how: str) -> None:
                assert out.received == ref.received, f"{how}: the client got other bytes\n{sim.dump()}"
                assert out.queries == ref.queries, f"{how}: routed otherwise"

            ref = await sweep(sim, "rw", READWRITE, check=same, servers_from_start=True, seeds=2)
            nursery.cancel_scope.cancel()
            return ref

    ref = run(main)
    assert [s for s in ref.queries["r1"] if not s.startswith("set")] == [
        "select 1", "select 2", "PREPARE select ?", "EXECUTE select ?", "select @@sql_mode"]
    assert "insert into t values (1)" in ref.queries["w"] and "select 3" in ref.queries["w"]
    assert text_values(ref.responses[-1].raw) == ["ANSI"]  # the SET reached the replica too


# --- losing a backend ---------------------------------------------------------------------------


async def _restore(sim: Sim) -> None:
    sim.set_roles(w=WRITER, r1=REPLICA)
    await sim.settle()


def _lost(outcome: LossOutcome) -> Step:
    async def wait(run: Ctx) -> None:
        session = run.session
        await until(lambda: session.backends.active is None and session.core.loss_outcome is outcome,
                    f"the session to take its loss as {outcome}")
    return wait


async def _writer_crashes(run: Ctx) -> None:
    run.sim.set_roles(w=DOWN, r1=WRITER)
    await run.sim.servers["w"].kill(error=False)


def test_failover_re_attaches_an_idle_session_with_its_state_at_every_split_point(transport: str) -> None:
    flow: Flow = [q("set @a = 1"), q("use app2"), q("select 1"), _writer_crashes,
                  _lost(LossOutcome.REATTACH_LATER), q("select @a"), q("begin", "insert into t values (1)", "commit")]
    calm: Flow = [s for s in flow if isinstance(s, list)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql", {"w": WRITER, "r1": REPLICA, "r2": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "writer", calm)
            assert text_values(ref.received) == ["1", "1"]

            def same(out: Outcome, first: Outcome, how: str) -> None:
                assert out.received == ref.received, how
                assert out.queries == first.queries, how

            first = await sweep(sim, "writer", flow, check=same, after=lambda: _restore(sim), seeds=2)
            assert first.received == ref.received
            # the state replayed in order (the schema as a USE statement), then the client's next statements
            assert first.queries["r1"] == ["set @a = 1", "USE `app2`", "select @a", "begin", "insert into t values (1)",
                                           "commit"]
            assert sim.servers["r1"].conns[-1].schema == "app2"  # the schema moved too
            nursery.cancel_scope.cancel()

    run(main)


def test_a_transaction_on_a_crashed_writer_fails_with_08007_then_goes_on(transport: str) -> None:
    flow: Flow = [q("begin"), q("insert into t values (1)"), _writer_crashes, _lost(LossOutcome.FAIL_TRANSACTION),
                  q("insert into t values (2)"), q("rollback"), q("select 1")]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql", {"w": WRITER, "r1": REPLICA})
            await sim.start(nursery)

            def same(out: Outcome, ref: Outcome, how: str) -> None:
                assert out.received == ref.received, how
                assert out.queries == ref.queries, how

            ref = await sweep(sim, "writer", flow, check=same, after=lambda: _restore(sim), seeds=2)
            assert [r.tracker.error.sqlstate for r in ref.responses if r.tracker.error] == ["08007"]
            assert ref.queries["r1"] == ["select 1"]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_servers_own_kill_reaches_the_client_at_every_split_point(transport: str) -> None:
    # KILL (ERR 1927, then the server closes) while the instance stays the writer: the client
    # gets the server's error and its connection closes, as it would directly.
    async def killed(run: Ctx) -> None:
        await run.sim.servers["w"].kill(error=True)
        await until(lambda: run.session.closed, "the session to close")
        assert run.session.core.loss_outcome is LossOutcome.PASS_THROUGH

    flow: Flow = [q("select 1"), killed]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql")
            await sim.start(nursery)
            ref = await sweep(sim, "writer", flow)
            assert ref.received.endswith(KILLED)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_read_on_a_dying_replica_is_retried_at_every_split_point(transport: str) -> None:
    async def replica_dies_on_next_read(run: Ctx) -> None:
        backend = run.session.backends.active
        assert backend is not None
        run.sim.set_roles(**{backend.instance: DOWN})
        run.sim.servers[backend.instance].fault("select 2", "close")

    flow: Flow = [q("select 1"), replica_dies_on_next_read, q("select 2"), q("select n from rows_3")]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql", {"w": WRITER, "r1": REPLICA, "r2": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "reader", [s for s in flow if isinstance(s, list)])

            async def restore() -> None:
                sim.set_roles(r1=REPLICA, r2=REPLICA)
                sim.servers["r1"].faults.clear()
                sim.servers["r2"].faults.clear()
                await sim.settle()

            def same(out: Outcome, first: Outcome, how: str) -> None:
                assert out.received == ref.received, how

            first = await sweep(sim, "reader", flow, check=same, after=restore, seeds=2)
            ran = sorted(sql for name in ("r1", "r2") for sql in first.queries[name])
            assert ran == ["select 1", "select 2", "select 2", "select n from rows_3"]  # one retried
            nursery.cancel_scope.cancel()

    run(main)


def test_a_link_reset_at_every_offset_of_a_response_never_hangs_or_leaks(transport: str) -> None:
    sent = q("select n from rows_3", "select 2", "select 3")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql", {"w": WRITER, "r1": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "writer", [sent])
            for at in range(ref.s2p[0], ref.s2p[1]):
                for promote in (False, True):
                    sim.from_server = Delivery(reset_at=at)
                    conn, session, _ = sim.session("writer")
                    client = MyClient(conn)
                    with bounded(_report(sim, client), reset_at=sim.from_server):
                        await client.login(USER, PASSWORD, database="app")
                        sim.from_server = WHOLE
                        if promote:
                            sim.set_roles(w=DOWN, r1=WRITER)
                        went_on = False
                        try:
                            await client.run(sent)
                            went_on = promote
                        except ConnectionResetError:
                            pass
                        if went_on:
                            responses = await client.run(q("select 9"))
                            assert text_values(responses[0].raw) == ["9"], at
                            await client.send([Command(QUIT)])
                        await client.until_closed()
                        await sim.sessions_done()
                    got = bytes(client.received)
                    if went_on:
                        packets(got)  # whole packets only
                        assert all(e.sqlstate == "08007" for e in _errors(got)), at
                    else:
                        assert got == ref.received[: len(got)], at
                        assert not promote or not _at_boundary(got), at
                    await _restore(sim)
            nursery.cancel_scope.cancel()

    run(main)


def _report(sim: Sim, client: MyClient) -> Callable[[], str]:
    return lambda: f"the client got {bytes(client.received)[-200:]!r}\n{sim.dump()}"


def _errors(data: bytes) -> list[p.ErrPacket]:
    return [p.decode_err(payload) for _, payload in packets(data) if payload[:1] == b"\xff"]


def _at_boundary(data: bytes) -> bool:
    reader = PacketReader()
    reader.feed(data)
    while reader.next_packet() is not None:
        pass
    return reader.buffered == 0


def test_a_client_that_resets_at_every_offset_leaves_nothing_behind(transport: str) -> None:
    flow = [Command(query("select 1")), Command(prepare("select ?")), Command(PING)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql")
            await sim.start(nursery)
            ref = await case(sim, "writer", [flow])
            for at in range(1, ref.c2p[1]):
                for how in ("rst", "eof"):
                    d = Delivery(reset_at=at, reset=how)
                    conn, session, _ = sim.session("writer", d)
                    client = MyClient(conn)
                    with bounded(lambda: sim.dump(), to_proxy=d):
                        try:
                            await client.login(USER, PASSWORD, database="app")
                            await client.run(flow)
                        except (OSError, Exception):  # noqa: B014 - LoginFailed, a reset: the link broke
                            pass
                        await client.aclose()
                        await sim.sessions_done()
                    assert not sim.servers["w"].live, f"reset at {at} ({how}): a server connection stays open"
            nursery.cancel_scope.cancel()

    run(main)


def test_every_flow_with_late_random_pieces_both_ways(transport: str) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("mysql")
            await sim.start(nursery)
            for endpoint, flow in (("writer", QUERIES), ("writer", MULTI), ("writer", STATEMENTS),
                                   ("writer", PIPELINED), ("rw", READWRITE)):
                ref = await case(sim, endpoint, flow)
                for seed in range(4):
                    late = [delayed(random_sizes(seed * 4 + i, 1, 48), 0.001 * (i + 1)) for i in range(4)]
                    out = await case(sim, endpoint, flow, to_proxy=late[0], from_proxy=late[1],
                                     from_server=late[2], to_server=late[3])
                    assert out.received == ref.received, (endpoint, seed)
                    assert out.queries == ref.queries, (endpoint, seed)
            nursery.cancel_scope.cancel()

    run(main)
