"""PostgreSQL sessions under the network simulator: the real shell (login, core, backends) over
streams cut at every byte boundary, in random pieces, late, and broken.

Each flow first runs with every stream whole; that run is the reference. Then it runs again
with the client's stream to the proxy cut at every offset of the flow (one cut per run), with
the servers' streams to the proxy cut the same way, one byte at a time, and at random sizes:
the client must receive exactly the reference's bytes, each server exactly the reference's
requests, and every session must end with nothing left counted or open.

Most tests run twice (the ``transport`` fixture): over in-memory connections, which the shell
serves with its reader tasks, and over TCP sockets, which the relay hub serves from inside
trio's I/O dispatch (every plain-TCP session in production).

Sizes (what keeps this affordable: about 4 ms a session in memory, three times that over
sockets): flows of 100-600 bytes each way; every split point of the flow's part of each stream
(the login's own split points are the login tests'; a readwrite flow's servers' streams from
their start, as its backends log in during the flow); over sockets every 4th split point; the
4 kB INSERT of issue 10's defect 1 at 1,400- and 1,460-byte segments, one byte at a time and at
random sizes, not at every offset.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.server.pg.session import PgSession
from endpoint_proxy.sessioncore.loss import LossOutcome

from .cluster import DOWN, REPLICA, WRITER, Sim
from .net import BYTEWISE, WHOLE, Delivery, delayed, random_sizes
from .pgclient import (
    COPY_DONE,
    FLUSH,
    SYNC,
    TERMINATE,
    LoginFailed,
    PgClient,
    Step,
    bind,
    close,
    copy_data,
    describe,
    errors,
    execute,
    messages,
    parse,
    q,
    rows,
    types,
)
from .pgserver import FATAL_57P01
from .runner import bounded, run, splits, until

Action = Callable[[Sim, PgSession], Awaitable[None]]
Flow = list[Step | Action]


@dataclass
class Outcome:
    received: bytes  # what the client got after its login
    served: dict[str, list[bytes]] = field(default_factory=dict)  # per instance: each connection's requests
    queries: dict[str, list[str]] = field(default_factory=dict)  # per instance: statements run
    c2p: tuple[int, int] = (0, 0)  # the client's stream to the proxy: (login end, total)
    s2p: tuple[int, int] = (0, 0)  # the servers' streams to the proxy: (first login end, longest)
    closed_by_proxy: bool = False


async def case(sim: Sim, endpoint: str, flow: Flow, *, to_proxy: Delivery = WHOLE, from_proxy: Delivery = WHOLE,
               from_server: Delivery = WHOLE, to_server: Delivery = WHOLE, tls: bool = False,
               terminate: bool = True) -> Outcome:
    """One session through the real shell: login, the flow, Terminate; then the proxy must let go."""
    sim.from_server, sim.to_server = from_server, to_server
    first_link = len(sim.backend_links)
    before = {name: len(server.conns) for name, server in sim.servers.items()}
    conn, session, link = sim.session(endpoint, to_proxy, from_proxy)
    assert isinstance(session, PgSession)
    client = PgClient(conn)
    out = Outcome(b"")
    with hang_report(sim, client, to_proxy=to_proxy, from_server=from_server):
        await client.login(sim.keys, tls=tls)
        out.c2p = (link.forward.written, 0)
        login_end = max(li.back.written for li in sim.backend_links[first_link:])
        for step in flow:
            if isinstance(step, Step):
                await client.run([step])
            else:
                await step(sim, session)
        if terminate and not client.eof:
            await client.send(TERMINATE)
        await client.until_closed()
        await sim.sessions_done()
    out.received = bytes(client.received)
    out.c2p = (out.c2p[0], link.forward.written)
    out.s2p = (login_end, max(li.back.written for li in sim.backend_links[first_link:]))
    for name, server in sim.servers.items():
        conns = server.conns[before[name]:]
        out.served[name] = [bytes(sc.received) for sc in conns]
        out.queries[name] = [sql for sc in conns for sql in sc.queries]
        assert all(sc.leftover == 0 for sc in conns), f"{name} got a request cut short"
    return out


def hang_report(sim: Sim, client: PgClient, **deliveries: Delivery) -> contextlib.AbstractContextManager[None]:
    return bounded(lambda: f"the client got {dict(client.counts)}\n{sim.dump()}", **deliveries)


def requests(flow: Flow) -> bytes:
    return b"".join(step.data for step in flow if isinstance(step, Step)) + TERMINATE


async def sweep(sim: Sim, endpoint: str, flow: Flow, *, client: bool = True, server: bool = True,
                from_start: bool = False, servers_from_start: bool = False, seeds: int = 3,
                check: Callable[[Outcome, Outcome, str], None] | None = None) -> Outcome:
    """The flow whole (the reference), then cut at every offset of its part of the client's
    stream and of the servers' streams (of the whole streams with ``from_start``; of the servers'
    whole streams, logins of the backends a flow opens included, with ``servers_from_start``),
    one byte at a time and at random sizes; each run must match the reference (``check``: how)."""
    ref = await case(sim, endpoint, flow)

    def same(out: Outcome, ref: Outcome, how: str) -> None:
        assert out.received == ref.received, f"{how}: the client got other bytes\n{sim.dump()}"
        assert out.served == ref.served, f"{how}: a server got other requests"

    check = check or same
    if client:
        start = 1 if from_start else ref.c2p[0]
        for d in splits(start, ref.c2p[1], seeds=seeds):
            check(await case(sim, endpoint, flow, to_proxy=d), ref, f"client->proxy {d.describe()}")
    if server:
        start = 1 if from_start or servers_from_start else ref.s2p[0]
        for d in splits(start, ref.s2p[1], seeds=seeds):
            check(await case(sim, endpoint, flow, from_server=d), ref, f"server->proxy {d.describe()}")
    out = await case(sim, endpoint, flow, to_proxy=BYTEWISE, from_proxy=BYTEWISE, from_server=BYTEWISE,
                     to_server=BYTEWISE)
    check(out, ref, "every stream one byte at a time")
    return ref


# --- flows ---------------------------------------------------------------------------------

SIMPLE: Flow = [
    Step(q("select 1"), 1),
    Step(q("set application_name = 'sim'"), 1),  # the server reports it: ParameterStatus
    Step(q("select generate_series(1, 4)"), 1),
    Step(q("begin"), 1),
    Step(q("insert into t values (1)"), 1),
    Step(q("select 1/0"), 1),  # fails the transaction
    Step(q("rollback"), 1),
    Step(q("select 1; select 2; show application_name"), 1),  # three results, one ReadyForQuery
    Step(q(""), 1),
]

EXTENDED: Flow = [
    Step(parse("s1", "select $1") + describe("S", "s1") + FLUSH, more=(("T", 1),)),  # answered before any Sync
    Step(bind("s1", (b"42",)) + execute() + bind("s1", (b"43",)) + execute() + SYNC, 1),
    Step(parse("", "select generate_series(1, 3)") + bind() + describe("P") + execute() + SYNC, 1),
    Step(bind("nosuch") + execute() + SYNC, 1),  # an error: the rest up to Sync is skipped
    Step(close("S", "s1") + SYNC, 1),
]

# Everything sent at once, answers read after: requests queue behind each other in both streams.
PIPELINED: Flow = [Step(
    q("select 1") + q("begin") + q("insert into t values (2)") + q("commit")
    + parse("p", "select $1") + bind("p", (b"x",)) + execute() + SYNC
    + bind("p", (b"y",)) + execute() + SYNC + q("select generate_series(1, 3)") + q("select 1/0"), 8)]

COPY: Flow = [
    Step(q("copy t from stdin"), copy_in=1),
    Step(copy_data(b"1\n") + copy_data(b"2\n") + COPY_DONE, 1),
    Step(q("copy t from stdin") + copy_data(b"3\n4\n5\n") + COPY_DONE, 1, copy_in=1),  # data ahead of the answer
    Step(q("copy t from stdin"), copy_in=1),
    Step(m.CopyFail("client gave up").encode(), 1),
    Step(q("copy (select generate_series(1, 12)) to stdout"), 1),
]


def test_login_with_scram_at_every_split_point() -> None:
    # SCRAM-SHA-256 between the client and the proxy, and between the proxy and the server (with
    # the keys of the client's own exchange): the login's every byte boundary, both ways.
    flow: Flow = [Step(q("select 1"), 1)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", scram_backends=True)
            await sim.start(nursery)
            ref = await sweep(sim, "writer", flow, from_start=True, seeds=2)
            assert types(ref.received) == "TDCZ"
            nursery.cancel_scope.cancel()

    # The proxy derives SCRAM proofs in a worker thread: let the mock clock wait for it.
    run(main, threshold=0.05)


def test_tls_upgrade_on_both_legs_in_pieces() -> None:
    # The SSLRequest upgrade (client -> proxy) and backend_tls = "require" (proxy -> server):
    # the TLS records arrive one byte at a time, in random pieces, and with the first cuts
    # right where the SSLRequest ends and the handshake begins.
    flow: Flow = [Step(q("select 1") + q("select generate_series(1, 3)"), 2)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", scram_backends=True, tls_backends=True, backend_tls="require")
            await sim.start(nursery)
            ref = await case(sim, "writer", flow, tls=True)
            assert all(sc.tls for sc in sim.servers["w"].conns)
            assert rows(ref.received) == ["1", "1", "2", "3"]
            cuts = [BYTEWISE, random_sizes(1, 1, 200), random_sizes(2, 1, 40), Delivery(at=(7, 8, 9, 10, 60))]
            for d in cuts:
                out = await case(sim, "writer", flow, to_proxy=d, from_proxy=d, from_server=d, to_server=d, tls=True)
                assert out.received == ref.received, d.describe()
                assert [len(b) for b in out.served["w"]] == [len(b) for b in ref.served["w"]]
            nursery.cancel_scope.cancel()

    run(main, threshold=0.05)


def _writer_flow_test(flow: Flow) -> Outcome:
    async def main() -> Outcome:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql")
            await sim.start(nursery)
            ref = await sweep(sim, "writer", flow)
            assert ref.served["w"] == [requests(flow)]  # the server got exactly what the client sent
            nursery.cancel_scope.cancel()
            return ref

    return run(main)


def test_simple_protocol_at_every_split_point(transport: str) -> None:
    ref = _writer_flow_test(SIMPLE)
    assert errors(ref.received) == ["22012"]
    assert types(ref.received).count("Z") == 9


def test_extended_protocol_at_every_split_point(transport: str) -> None:
    ref = _writer_flow_test(EXTENDED)
    assert rows(ref.received) == ["42", "43", "1", "2", "3"]
    assert errors(ref.received) == ["26000"]


def test_pipelined_requests_at_every_split_point(transport: str) -> None:
    ref = _writer_flow_test(PIPELINED)
    assert types(ref.received).count("Z") == 8 and errors(ref.received) == ["22012"]


def test_copy_in_and_out_at_every_split_point(transport: str) -> None:
    ref = _writer_flow_test(COPY)
    assert types(ref.received).count("G") == 3 and types(ref.received).count("H") == 1
    assert errors(ref.received) == ["57014"]
    assert len([t for t, _ in messages(ref.received) if t == "d"]) == 12


# --- readwrite -------------------------------------------------------------------------------

READWRITE: Flow = [
    Step(q("select 1"), 1),  # a replica
    Step(q("insert into t values ('" + "x" * 40 + "')"), 1),  # the writer
    Step(q("select 2"), 1),  # a replica again
    Step(q("set application_name = 'rw'"), 1),
    Step(q("begin"), 1),
    Step(q("select 3"), 1),
    Step(q("commit"), 1),
    Step(parse("", "select $1") + bind("", (b"7",)) + execute() + SYNC, 1),
    Step(parse("", "insert into t values ($1)") + bind("", (b"8",)) + execute() + SYNC, 1),
    Step(q("show application_name"), 1),
]


def test_readwrite_switches_at_every_split_point(transport: str) -> None:
    async def main() -> Outcome:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql")
            await sim.start(nursery)

            def same(out: Outcome, ref: Outcome, how: str) -> None:
                assert out.received == ref.received, f"{how}: the client got other bytes\n{sim.dump()}"
                assert out.queries == ref.queries, f"{how}: routed otherwise"

            ref = await sweep(sim, "rw", READWRITE, check=same, servers_from_start=True, seeds=2)
            nursery.cancel_scope.cancel()
            return ref

    ref = run(main)
    assert [sql for sql in ref.queries["r1"] if not sql.startswith("set")] == [
        "select 1", "select 2", "select $1", "show application_name"]
    assert "begin" in ref.queries["w"] and "select 3" in ref.queries["w"]
    assert rows(ref.received)[-1] == "rw"  # the SET reached the replica too


def test_readwrite_4kb_insert_after_a_select_in_tcp_segments(transport: str) -> None:
    # Issue 10, defect 1: a 4 kB INSERT after a SELECT, cut at 1,400-byte segments, hung the session.
    big = "insert into t values ('" + "x" * 4000 + "')"
    flow: Flow = [Step(q("select 1"), 1), Step(q(big), 1), Step(q("select 2"), 1),
                  Step(q("select 3") + q(big) + q("select 4"), 3)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql")
            await sim.start(nursery)
            ref = await case(sim, "rw", flow)
            assert ref.queries["w"].count(big) == 2
            for d in [Delivery(size=1400), Delivery(size=1460), BYTEWISE, random_sizes(7, 1, 3000),
                      delayed(Delivery(size=1400), 0.001)]:
                out = await case(sim, "rw", flow, to_proxy=d, from_server=d)
                assert out.received == ref.received, d.describe()
                assert sorted(out.queries["w"] + out.queries["r1"]) == sorted(ref.queries["w"] + ref.queries["r1"])
            nursery.cancel_scope.cancel()

    run(main)


# --- losing a backend ---------------------------------------------------------------------------


async def _restore(sim: Sim) -> None:
    sim.set_roles(w=WRITER, r1=REPLICA)
    await sim.settle()


def _lost(outcome: LossOutcome) -> Action:
    async def wait(sim: Sim, session: PgSession) -> None:
        await until(lambda: session.backends.active is None and session.core.loss_outcome is outcome,
                    f"the session to take its loss as {outcome}")
    return wait


async def writer_crashes(sim: Sim, session: PgSession) -> None:
    """The writer goes away without a word (no FATAL) and the monitor promotes r1."""
    sim.set_roles(w=DOWN, r1=WRITER)
    await sim.servers["w"].kill(fatal=False)


def test_failover_re_attaches_an_idle_session_with_its_state_at_every_split_point(transport: str) -> None:
    # Failover re-attach: the writer's server closes without a FATAL while the session is idle;
    # the verdict says it is down; the next statement runs on the new writer with the SET
    # replayed, and the client sees exactly what it would have seen without the failover.
    flow: Flow = [Step(q("set search_path = tenant1"), 1), Step(q("select 1"), 1),
                  writer_crashes, _lost(LossOutcome.REATTACH_LATER),
                  Step(q("select 2"), 1), Step(q("show search_path"), 1), Step(q("begin") + q("commit"), 2)]
    calm: Flow = [step for step in flow if isinstance(step, Step)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", {"w": WRITER, "r1": REPLICA, "r2": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "writer", calm)
            assert rows(ref.received) == ["1", "2", "tenant1"]

            async def failover(**kw: Any) -> Outcome:
                out = await case(sim, "writer", flow, **kw)
                await _restore(sim)
                return out

            first = await failover()
            assert first.received == ref.received
            assert first.queries["r1"] == ["set search_path = tenant1", "select 2", "show search_path", "begin",
                                           "commit"]
            for d in [*splits(first.c2p[0], first.c2p[1], seeds=2)]:
                out = await failover(to_proxy=d)
                assert out.received == ref.received, d.describe()
                assert out.queries == first.queries, d.describe()
            for d in [*splits(1, first.s2p[1], seeds=2)]:
                out = await failover(from_server=d)
                assert out.received == ref.received, d.describe()
                assert out.queries == first.queries, d.describe()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_transaction_on_a_crashed_writer_fails_with_08007_then_goes_on(transport: str) -> None:
    flow: Flow = [Step(q("begin"), 1), Step(q("insert into t values (1)"), 1),
                  writer_crashes, _lost(LossOutcome.FAIL_TRANSACTION),
                  Step(q("insert into t values (2)"), 1), Step(q("rollback"), 1), Step(q("select 1"), 1)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", {"w": WRITER, "r1": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "writer", flow)
            await _restore(sim)
            assert errors(ref.received) == ["08007"]
            assert "".join(chr(p[0]) for t, p in messages(ref.received) if t == "Z") == "TTEII"
            assert ref.queries["r1"] == ["select 1"]
            for d in splits(ref.c2p[0], ref.c2p[1], seeds=2):
                out = await case(sim, "writer", flow, to_proxy=d)
                await _restore(sim)
                assert out.received == ref.received, d.describe()
                assert out.queries == ref.queries, d.describe()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_servers_own_termination_reaches_the_client_at_every_split_point(transport: str) -> None:
    # pg_terminate_backend while the instance stays the writer: the FATAL 57P01 reaches the
    # client as it would directly, and the connection closes (no failover, no retry).
    outcomes: list[LossOutcome | None] = []

    async def terminated(sim: Sim, session: PgSession) -> None:
        await sim.servers["w"].kill(fatal=True)
        await until(lambda: session.closed, "the session to close")
        outcomes.append(session.core.loss_outcome)

    flow: Flow = [Step(q("select 1"), 1), terminated]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql")
            await sim.start(nursery)

            def passed_through(out: Outcome, ref: Outcome, how: str) -> None:
                assert out.received == ref.received, how
                assert outcomes[-1] is LossOutcome.PASS_THROUGH, how

            ref = await sweep(sim, "writer", flow, check=passed_through)
            assert ref.received.endswith(FATAL_57P01)
            assert set(outcomes) == {LossOutcome.PASS_THROUGH}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_fatal_in_pieces_from_a_writer_going_down_leaves_whole_messages(transport: str) -> None:
    # The writer shuts down (FATAL 57P01 to its sessions) and the monitor promotes r1. Whole, the
    # FATAL is held back and the idle session moves on unseen; cut, its first bytes reached the
    # client already, and only its rest may follow them: the client gets the FATAL, then EOF.
    async def shutdown(sim: Sim, session: PgSession) -> None:
        sim.set_roles(w=DOWN, r1=WRITER)
        await sim.servers["w"].kill(fatal=True)
        await until(lambda: session.closed or (session.core.loss_outcome is LossOutcome.REATTACH_LATER
                                               and not session.core.closing), "the session to take its loss")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", {"w": WRITER, "r1": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "writer", [Step(q("select 1"), 1)])
            closed = 0
            for d in [WHOLE, *splits(ref.s2p[0], ref.s2p[1] + len(FATAL_57P01), seeds=2)]:
                conn, session, _ = sim.session("writer")
                sim.from_server = d
                client = PgClient(conn)
                with hang_report(sim, client, from_server=d):
                    await client.login(sim.keys)
                    await client.run([Step(q("select 1"), 1)])
                    assert isinstance(session, PgSession)
                    await shutdown(sim, session)
                    if not session.closed:
                        await client.run([Step(q("select 2"), 1)])
                        await client.send(TERMINATE)
                    await client.until_closed()
                    await sim.sessions_done()
                got = bytes(client.received)
                assert at_boundary(got), d.describe()
                if rows(got) == ["1"]:
                    closed += 1
                    assert got.endswith(FATAL_57P01), d.describe()
                else:
                    assert rows(got) == ["1", "2"] and not errors(got), d.describe()
                sim.from_server = WHOLE
                await _restore(sim)
            assert closed  # some cuts fell inside the FATAL
            nursery.cancel_scope.cancel()

    run(main)


def test_a_read_on_a_dying_replica_is_retried_at_every_split_point(transport: str) -> None:
    async def replica_dies_on_next_read(sim: Sim, session: PgSession) -> None:
        backend = session.backends.active
        assert backend is not None
        sim.set_roles(**{backend.instance: DOWN})
        sim.servers[backend.instance].fault("select 2", "close")

    flow: Flow = [Step(q("select 1"), 1), replica_dies_on_next_read, Step(q("select 2"), 1),
                  Step(q("select generate_series(1, 3)"), 1)]
    calm: Flow = [step for step in flow if isinstance(step, Step)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", {"w": WRITER, "r1": REPLICA, "r2": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "reader", calm)

            async def retried(**kw: Any) -> Outcome:
                out = await case(sim, "reader", flow, **kw)
                sim.set_roles(r1=REPLICA, r2=REPLICA)
                sim.servers["r1"].faults.clear()
                sim.servers["r2"].faults.clear()
                await sim.settle()
                return out

            first = await retried()
            assert first.received == ref.received
            ran = sorted(sql for name in ("r1", "r2") for sql in first.queries[name])
            assert ran == ["select 1", "select 2", "select 2", "select generate_series(1, 3)"]  # one retried
            for d in splits(first.c2p[0], first.c2p[1], seeds=2):
                assert (await retried(to_proxy=d)).received == ref.received, d.describe()
            for d in splits(1, first.s2p[1], seeds=2):
                assert (await retried(from_server=d)).received == ref.received, d.describe()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_link_reset_at_every_offset_of_a_response_never_hangs_or_leaks(transport: str) -> None:
    # The server's stream breaks (RST) at every offset of its answers, with the writer still up
    # (the client loses its connection, as it would directly) or gone (what is in flight fails
    # with 08007 and the session moves to the new writer): the client gets whole messages, the
    # session always ends or goes on, and nothing stays counted or open.
    sent = q("select generate_series(1, 3)") + q("select 2") + q("select 3")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql", {"w": WRITER, "r1": REPLICA})
            await sim.start(nursery)
            ref = await case(sim, "writer", [Step(sent, 3)])
            for k in range(ref.s2p[0], ref.s2p[1]):
                for promote in (False, True):
                    sim.from_server = Delivery(reset_at=k)
                    conn, session, _ = sim.session("writer")
                    client = PgClient(conn)
                    with hang_report(sim, client, reset_at=sim.from_server):
                        await client.login(sim.keys)
                        sim.from_server = WHOLE  # for the new writer's connection
                        if promote:
                            sim.set_roles(w=DOWN, r1=WRITER)
                        await client.send(sent)
                        went_on = False
                        if promote:
                            try:
                                await client.wait(Counter({"Z": 3}))
                                went_on = True
                            except ConnectionResetError:
                                pass
                        if went_on:
                            await client.run([Step(q("select 9"), 1)])
                            await client.send(TERMINATE)
                        await client.until_closed()
                        await sim.sessions_done()
                    got = bytes(client.received)
                    if went_on:
                        messages(got)  # whole messages only
                        assert set(errors(got)) <= {"08007"}, k
                        assert rows(got)[-1] == "9", k
                    else:
                        # The connection closed: what came before is the reference's start.
                        assert got == ref.received[: len(got)], k
                        # A failover goes on unless the stream broke inside a message.
                        assert not promote or not at_boundary(got), k
                    await _restore(sim)
            nursery.cancel_scope.cancel()

    run(main)


def at_boundary(data: bytes) -> bool:
    reader = FrameReader()
    reader.feed(data)
    while reader.next_message() is not None:
        pass
    return reader.buffered == 0


def test_a_client_that_resets_at_every_offset_leaves_nothing_behind(transport: str) -> None:
    flow: Flow = [Step(q("select 1") + parse("s", "select $1") + bind("s", (b"1",)) + execute() + SYNC, 2),
                  Step(q("copy t from stdin"), copy_in=1), Step(copy_data(b"1\n") + COPY_DONE, 1)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql")
            await sim.start(nursery)
            ref = await case(sim, "writer", flow)
            for k in range(1, ref.c2p[1]):
                for how in ("rst", "eof"):
                    conn, session, link = sim.session("writer", Delivery(reset_at=k, reset=how))
                    client = PgClient(conn)
                    with hang_report(sim, client, to_proxy=Delivery(reset_at=k, reset=how)):
                        try:
                            await client.login(sim.keys)
                            await client.run([s for s in flow if isinstance(s, Step)])
                        except (OSError, LoginFailed):
                            pass  # the link broke under it
                        await client.aclose()
                        await sim.sessions_done()
                    for server in sim.servers.values():
                        assert not server.live, f"reset at {k} ({how}): a server connection stays open"
            nursery.cancel_scope.cancel()

    run(main)


def test_every_flow_with_late_random_pieces_both_ways(transport: str) -> None:
    # Every stream in random pieces, each piece late by a millisecond (virtual time): requests
    # and answers overlap in every way the timing allows.
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Sim("postgresql")
            await sim.start(nursery)
            for endpoint, flow in (("writer", SIMPLE), ("writer", PIPELINED), ("writer", COPY), ("writer", EXTENDED),
                                   ("rw", READWRITE)):
                ref = await case(sim, endpoint, flow)
                for seed in range(4):
                    late = [delayed(random_sizes(seed * 4 + i, 1, 48), 0.001 * (i + 1)) for i in range(4)]
                    out = await case(sim, endpoint, flow, to_proxy=late[0], from_proxy=late[1],
                                     from_server=late[2], to_server=late[3])
                    assert out.received == ref.received, (endpoint, seed)
                    assert out.queries == ref.queries, (endpoint, seed)
            nursery.cancel_scope.cancel()

    run(main)
