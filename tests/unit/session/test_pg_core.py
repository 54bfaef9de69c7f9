"""The PostgreSQL session core, without sockets: request boundaries, routing, loss, replay.

Each flow runs with the client's bytes delivered whole, one byte at a time and at every split
point, and with the server's answers cut the same ways: what reaches each server and what
reaches the client must not depend on how the network cut the bytes.
"""

from __future__ import annotations

import random

import pytest

from endpoint_proxy.sessioncore.actions import Attach, Detach, Lost
from endpoint_proxy.sessioncore.loss import LossOutcome

from .pgfakes import (
    COPY_DONE,
    FATAL_TERMINATED,
    FLUSH,
    SYNC,
    TERMINATE,
    Driver,
    FakePgServer,
    bind,
    copy_data,
    describe,
    error_codes,
    execute,
    parse,
    q,
    ready_statuses,
)


def writer_only(servers: dict[str, FakePgServer]) -> Driver:
    return Driver(servers, lambda role, exclude: None if "w" in exclude else "w")


def readwrite(**kw: object) -> Driver:
    servers = {"w": FakePgServer("w"), "r": FakePgServer("r", in_recovery=True)}

    def route(role: str, exclude: frozenset[str]) -> str | None:
        name = "r" if role == "reader" else "w"
        return None if name in exclude else name

    return Driver(servers, route, readwrite=True, **kw)  # type: ignore[arg-type]


def splits(data: bytes) -> list[list[int]]:
    """Ways to cut ``data``: whole, byte by byte, at every single split point, random sizes."""
    n = len(data)
    cuts: list[list[int]] = [[n], [1] * n]
    cuts += [[k, n - k] for k in range(1, n)]
    rng = random.Random(n)
    cuts += [[rng.randint(1, 7) for _ in range(n)] for _ in range(5)]
    return cuts


# --- one backend: bytes pass untouched whatever the cuts ----------------------------------

SIMPLE_FLOW = q("select 1") + q("set search_path = a") + q("begin") + q("insert into t values (1)") + q("commit")
EXTENDED_FLOW = (parse("s1", "select $1") + describe("S", "s1") + FLUSH
                 + bind("s1", (b"1",)) + execute() + SYNC + bind("s1", (b"2",)) + execute() + SYNC)
COPY_FLOW = q("copy t from stdin") + copy_data(b"1\n") + copy_data(b"2\n") + COPY_DONE


@pytest.mark.parametrize("flow", [SIMPLE_FLOW, EXTENDED_FLOW], ids=["simple", "extended"])
def test_a_writer_session_forwards_every_byte_whatever_the_cuts(flow: bytes) -> None:
    expected_client = None
    for cut in splits(flow):
        for server_piece in (None, 1, 3):
            d = writer_only({"w": FakePgServer("w")})
            d.server_piece = server_piece
            d.send(flow, cut)
            assert bytes(d.servers["w"].received) == flow
            if expected_client is None:
                expected_client = bytes(d.to_client)
            assert bytes(d.to_client) == expected_client
            assert d.core.inflight == 0 and not d.core.in_unit
            assert d.env.started == d.env.ended  # every request counted once, and uncounted


def test_copy_in_is_one_request_whatever_the_cuts() -> None:
    for cut in splits(COPY_FLOW):
        d = writer_only({"w": FakePgServer("w")})
        d.send(COPY_FLOW, cut)
        assert bytes(d.servers["w"].received) == COPY_FLOW
        assert ready_statuses(bytes(d.to_client)) == "I"


# --- readwrite: whole requests, decided at their boundaries --------------------------------


def test_readwrite_sends_each_request_whole_to_one_backend_whatever_the_cuts() -> None:
    # Defect 1: after a SELECT 1, a 4 kB INSERT whose bytes came in two reads hung the session.
    big_insert = q("insert into t values ('" + "x" * 4000 + "')")
    flow = q("select 1") + big_insert + q("select 2")
    for cut in [[len(flow)], [20, 1500, 1500, 1500, 1500], [13, 14, 2000, 4000]] + [[k, len(flow) - k]
                                                                                   for k in range(1, 60)]:
        d = readwrite()
        d.send(flow, cut)
        insert = big_insert[5:-1].decode()
        assert insert in d.servers["w"].queries, cut
        readers = [s for name, s in d.servers.items() if name.startswith("r#")]
        assert len(readers) == 1 and readers[0].queries[0] == "select 1", cut  # one reader, reused
        # Every query ran once, whole, somewhere (a read pipelined behind a write may stay on
        # the writer); every server got whole messages only.
        ran = [sql for s in d.servers.values() for sql in s.queries]
        assert sorted(ran) == sorted(["select 1", insert, "select 2"]), cut
        for server in d.servers.values():
            assert server._reader.buffered == 0
        assert ready_statuses(bytes(d.to_client)) == "III"


def test_readwrite_decides_on_the_first_flush_unit_not_on_the_read_size() -> None:
    # A Parse of a read followed, in the same unit, by a Parse of a write: the unit is a write.
    flow = parse("", "select 1") + parse("w", "insert into t values (1)") + bind("") + execute() + SYNC
    roles = set()
    for cut in splits(flow):
        d = readwrite()
        d.send(q("select 0"))  # now on a replica
        d.send(flow, cut)
        roles.add(tuple(role for role, _ in d.attaches))
    assert roles == {("reader", "writer")}


def test_asyncpg_copy_records_after_a_prepared_read_goes_to_the_writer() -> None:
    d = readwrite()
    d.send(parse("__asyncpg_1__", "SELECT n FROM t LIMIT 1") + describe("S", "__asyncpg_1__") + SYNC)
    d.send(q("COPY t(n) FROM STDIN (FORMAT binary)"))
    d.send(copy_data(b"row") + COPY_DONE)
    assert d.servers["w"].queries[-1] == "COPY t(n) FROM STDIN (FORMAT binary)"
    assert ready_statuses(bytes(d.to_client)) == "II"


def test_asyncpg_prepare_with_flush_then_copy_goes_to_the_writer_and_hides_our_sync() -> None:
    # asyncpg prepares with Parse/Describe/Flush (no Sync), then sends COPY as a Query: the
    # reader's batch is closed with a Sync of the proxy's own, whose answer the client never sees.
    for cut in splits(q("COPY t(n) FROM STDIN (FORMAT binary)")):
        d = readwrite()
        d.send(q("select 0"))
        d.send(parse("__asyncpg_stmt_2__", "SELECT n FROM t LIMIT 1") + describe("S", "__asyncpg_stmt_2__") + FLUSH)
        d.send(q("COPY t(n) FROM STDIN (FORMAT binary)"), cut)
        d.send(copy_data(b"row") + COPY_DONE)
        # The writer got the named statement replayed, then the COPY; the reader never saw it.
        assert d.servers["w"].queries == ["SELECT n FROM t LIMIT 1", "COPY t(n) FROM STDIN (FORMAT binary)"]
        assert all("COPY" not in sql for name, s in d.servers.items() if name != "w" for sql in s.queries)
        assert ready_statuses(bytes(d.to_client)) == "II"  # select 0 and the COPY: not our Sync's


def test_copy_data_sent_ahead_of_the_copy_in_response_follows_the_copy() -> None:
    # asyncpg's copy_records_to_table sends its data without waiting for CopyInResponse.
    flow = q("COPY t(n) FROM STDIN (FORMAT binary)") + copy_data(b"row") + COPY_DONE
    for cut in splits(flow):
        d = readwrite()
        d.send(q("select 0"))
        d.send(flow, cut)
        assert bytes(d.servers["w"].received).endswith(flow), cut
        assert ready_statuses(bytes(d.to_client)) == "II"


def test_a_write_pipelined_behind_a_read_waits_for_the_read_then_goes_to_the_writer() -> None:
    d = readwrite()
    d.send(q("select 0"))  # on a replica
    reader = d.active
    assert reader is not None and reader.in_recovery
    # The next read is pipelined with a write behind it, in one chunk; the scripted server
    # answers at once, so the write waits only for the read's answer to be delivered.
    d.send(q("select 1") + q("update t set n = 1"))
    assert reader.queries[-1] == "select 1"
    assert d.servers["w"].queries == ["update t set n = 1"]
    assert ready_statuses(bytes(d.to_client)) == "III"


# --- losing a backend ----------------------------------------------------------------------


def test_a_deliberate_termination_reaches_the_client_as_it_would_directly() -> None:
    # Defect 3: pg_terminate_backend while the instance stays up in its role.
    d = writer_only({"w": FakePgServer("w")})
    d.send(q("select 1"))
    d.server_closes(FATAL_TERMINATED)
    assert d.core.loss_outcome is LossOutcome.PASS_THROUGH
    assert error_codes(bytes(d.to_client)) == ["57P01"]
    assert d.closed


def test_an_idle_session_whose_writer_died_moves_at_its_next_request() -> None:
    d = writer_only({"w": FakePgServer("w")})
    d.alive = lambda name: False
    d.send(q("set search_path = tenant1"))
    d.server_closes()
    assert d.core.loss_outcome is LossOutcome.REATTACH_LATER and not d.closed
    d.send(q("select 1"))
    new = d.active
    assert new is not None and new is not d.servers["w"]
    assert new.queries == ["set search_path = tenant1", "select 1"]  # replayed first
    assert ready_statuses(bytes(d.to_client)) == "II"


def test_a_transaction_whose_writer_died_fails_with_08007_until_rollback() -> None:
    d = writer_only({"w": FakePgServer("w")})
    d.alive = lambda name: False
    d.send(q("begin"))
    d.send(q("insert into t values (1)"))
    d.server_closes()
    assert d.core.loss_outcome is LossOutcome.FAIL_TRANSACTION
    d.send(q("insert into t values (2)"))
    d.send(q("rollback"))
    d.send(q("select 1"))
    out = bytes(d.to_client)
    assert error_codes(out) == ["08007"]
    assert ready_statuses(out) == "TTEII"


def test_a_read_on_a_lost_replica_is_retried_elsewhere() -> None:
    servers = {"r1": FakePgServer("r1", in_recovery=True), "r2": FakePgServer("r2", in_recovery=True)}

    def route(role: str, exclude: frozenset[str]) -> str | None:
        for name in ("r1", "r2"):
            if name not in exclude:
                return name
        return None

    d = Driver(servers, route)
    d.alive = lambda name: False
    d.send(q("select 1"))
    before = len(d.to_client)
    # The replica dies with the next read in flight: the scripted server answered already,
    # so take that answer back by closing before feeding it: send the request by hand.
    d.core.client_data(q("select 2"))
    actions = []
    while (a := d.core.next_action()) is not None:
        actions.append(a)
    assert actions == []  # FORWARD: nothing queued
    d.core.server_eof()
    d.run()
    assert d.core.loss_outcome is LossOutcome.RETRY
    assert [a.exclude for a in d.actions if isinstance(a, Attach)] == [frozenset({"r1"})]
    retried = d.active
    assert retried is not None and retried.name == "r2" and retried.queries == ["select 2"]
    assert ready_statuses(bytes(d.to_client)[before:]) == "I"


def test_a_pinned_session_is_not_moved_when_its_instance_is_down() -> None:
    d = writer_only({"w": FakePgServer("w")})
    d.alive = lambda name: False
    d.send(q("listen jobs"))
    d.server_closes()
    assert d.core.loss_outcome is LossOutcome.CANNOT_MOVE
    assert error_codes(bytes(d.to_client)) == ["08006"] and d.closed


def test_a_pinned_session_survives_another_sessions_trouble() -> None:
    # Defect 2's other half: nothing but its own backend's loss affects a session.
    d = writer_only({"w": FakePgServer("w")})
    d.send(q("listen jobs"))
    d.env.generation += 1  # the topology changed, the writer stayed
    d.send(q("select 1"))
    assert not any(isinstance(a, (Detach, Lost)) for a in d.actions)
    assert ready_statuses(bytes(d.to_client)) == "II"


def test_terminate_ends_the_session_and_reaches_the_backend() -> None:
    for cut in splits(q("select 1") + TERMINATE):
        d = writer_only({"w": FakePgServer("w")})
        d.send(q("select 1") + TERMINATE, cut)
        assert d.closed and d.servers["w"].closed


# --- the writer gate (a switchover holds new writer work at its boundary) ------------------------


def test_a_closed_gate_holds_new_writer_work_until_it_opens() -> None:
    from endpoint_proxy.sessioncore.actions import WaitGate

    d = writer_only({"w": FakePgServer("w")})
    d.send(q("select 1"))
    assert d.env.gated == ["begin", "end"]  # one request: in and out
    d.env.gate_open = False
    d.core.client_data(q("insert into t values (1)"))
    actions = []
    while (a := d.core.next_action()) is not None:
        actions.append(a)
    assert [type(a) for a in actions] == [WaitGate]
    assert d.servers["w"].queries == ["select 1"]  # held, not sent
    d.env.gate_open = True
    d.core.gate_opened()
    d.run()
    assert d.servers["w"].queries == ["select 1", "insert into t values (1)"]
    assert d.env.gated == ["begin", "end", "begin", "end"]


def test_statements_inside_a_transaction_never_wait_at_the_gate() -> None:
    d = writer_only({"w": FakePgServer("w")})
    d.send(q("begin"))
    d.env.gate_open = False  # a switchover starts: it waits for this transaction to end
    d.send(q("insert into t values (1)"))
    d.send(q("commit"))
    assert d.servers["w"].queries == ["begin", "insert into t values (1)", "commit"]
    assert d.env.gated == ["begin", "end"]  # the transaction is one piece of writer work


def test_reads_on_a_replica_do_not_touch_the_gate() -> None:
    d = readwrite()
    d.send(q("select 1"))  # moves to a replica
    d.env.gate_open = False
    d.send(q("select 2"))
    readers = [s for name, s in d.servers.items() if name.startswith("r#")]
    assert readers[0].queries == ["select 1", "select 2"]
