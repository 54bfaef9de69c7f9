"""Transaction pooling in the PostgreSQL session core, without sockets: when a server connection
goes back to the pool, prepared statements across shared connections, settings by difference,
pins. Each client must get exactly what a server of its own would have sent it."""

from __future__ import annotations

import pytest

from endpoint_proxy.protocol.pg import messages as m

from .pgfakes import FLUSH, SYNC, bind, describe, error_codes, execute, messages, parse, q, ready_statuses
from .pgpoolfakes import Pool, PooledClient, StatefulServer, direct
from .test_pg_core import splits


def close_statement(name: str) -> bytes:
    return m.Close("S", name).encode()


def prepared_run(name: str, sql: str) -> bytes:
    """A statement prepared by name and run once, as pgbench -M prepared does."""
    return parse(name, sql) + bind(name) + execute() + SYNC


def run(name: str) -> bytes:
    return bind(name) + execute() + SYNC


def types(data: bytes) -> str:
    return "".join(t for t, _ in messages(data))


# --- when the connection goes back ---------------------------------------------------------------


def test_the_connection_goes_back_after_each_request_and_transaction() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool)
    a.send(q("select 1"))
    assert pool.lent == 0 and a.active is None  # back after an autocommit statement
    a.send(q("begin") + q("insert into t values (1)"))
    assert pool.lent == 1  # kept for the whole transaction
    b = PooledClient(pool)
    b.send(q("select 2"))
    assert error_codes(bytes(b.to_client)) == ["53300"]  # the only connection is lent
    a.send(q("commit"))
    assert pool.lent == 0
    b.send(q("select 2"))
    assert ready_statuses(bytes(b.to_client)) == "II"


def test_an_extended_batch_keeps_the_connection_until_its_sync() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool)
    a.send(parse("", "select 1") + describe("S", "") + FLUSH)  # asyncpg's way: an answer before Sync
    assert pool.lent == 1
    a.send(bind("") + execute() + SYNC)
    assert pool.lent == 0 and types(bytes(a.to_client)) == "1tn2CZ"


@pytest.mark.parametrize("pin, release", [
    ("listen jobs", "unlisten *"),
    ("create temp table scratch (a int)", "discard temp"),
    ("select pg_advisory_lock(1)", "select pg_advisory_unlock_all()"),
])
def test_a_pinned_session_keeps_its_connection_until_the_state_is_gone(pin: str, release: str) -> None:
    pool = Pool(size=1)
    a = PooledClient(pool)
    a.send(q(pin))
    a.send(q("select 1"))
    assert pool.lent == 1 and a.env.pins
    a.send(q(release))
    assert pool.lent == 0 and a.env.unpins == a.env.pins


# --- prepared statements over shared connections ---------------------------------------------------


def test_clients_share_server_statements_and_each_sees_its_own() -> None:
    pool = Pool(size=1)
    flow = prepared_run("P_0", "select $1") + run("P_0") + close_statement("P_0") + SYNC
    clients = [PooledClient(pool) for _ in range(3)]
    for c in clients:
        c.send(flow)
    server = pool.opened[0]
    assert len(server.parses) == 1 and server.parses[0].startswith(b"ep_")  # prepared once for all
    for c in clients:
        assert bytes(c.to_client) == direct(flow)


def test_sessions_keep_one_shared_record_of_a_statement_they_all_prepared() -> None:
    # Thousands of clients of one application prepare the same statements: each idle session's
    # record of one is a reference to shared objects, and no raw Parse is kept for replay (that is
    # session mode's; the StatementMap is transaction mode's record).
    pool = Pool(size=1)
    a, b = PooledClient(pool), PooledClient(pool)
    a.send(prepared_run("stmt_a", "select $1 + 1"))
    b.send(prepared_run("stmt_b", "select $1 + 1"))
    assert a.core.smap is not None and b.core.smap is not None
    record_a, record_b = a.core.smap.statements[b"stmt_a"], b.core.smap.statements[b"stmt_b"]
    assert record_a is record_b and record_a[0].startswith(b"ep_")
    assert not a.core.state.parse_messages and not b.core.state.parse_messages
    assert bytes(a.to_client) == direct(prepared_run("stmt_a", "select $1 + 1"))


def test_a_statement_is_prepared_on_the_connection_that_lacks_it() -> None:
    pool = Pool(size=2)
    a, b = PooledClient(pool), PooledClient(pool)
    a.send(prepared_run("s1", "select 1"))
    b.send(q("begin"))  # b holds one connection...
    a.send(q("begin"))  # ...a gets the other, which lacks s1
    a.send(run("s1"))
    a.send(q("commit"))
    b.send(q("commit"))
    assert {s.name for s in pool.opened} == {"main0", "main1"}
    assert all(len(s.parses) == 1 for s in pool.opened)
    assert bytes(a.to_client) == direct(prepared_run("s1", "select 1") + q("begin") + run("s1") + q("commit"))


def test_describe_and_close_of_a_statement() -> None:
    pool = Pool(size=1)
    flow = (parse("s", "select 1") + describe("S", "s") + SYNC + run("s") + close_statement("s") + SYNC
            + bind("s") + execute() + SYNC)  # used after its Close: the server's error, as directly
    a = PooledClient(pool)
    a.send(flow)
    assert types(bytes(a.to_client)) == types(direct(flow))
    assert error_codes(bytes(a.to_client)) == ["26000"]


def test_a_pipeline_gets_our_answers_in_order() -> None:
    # Parse of a statement the connection has, in the middle of a pipeline: its ParseComplete is
    # ours and must come after the answers to what was sent before it.
    pool = Pool(size=1)
    PooledClient(pool).send(prepared_run("s2", "select 2"))  # the connection has select 2 now
    flow = (parse("s1", "select 1") + bind("s1") + execute() + parse("s2", "select 2") + bind("s2") + execute()
            + close_statement("s1") + bind("") + SYNC)
    for cut in splits(flow):
        pool2 = Pool(size=1)
        PooledClient(pool2).send(prepared_run("s2", "select 2"))
        a = PooledClient(pool2)
        a.send(flow, cut)
        assert bytes(a.to_client) == direct(flow), cut
    del pool


def test_an_error_in_a_batch_skips_to_sync_and_creates_nothing() -> None:
    pool = Pool(size=1)
    flow = (parse("bad", "syntax error here") + bind("bad") + execute() + parse("good", "select 1") + SYNC
            + bind("good") + execute() + SYNC)
    a = PooledClient(pool)
    a.send(flow)
    assert types(bytes(a.to_client)) == types(direct(flow))  # E Z, then the skipped Parse's statement is missing
    assert error_codes(bytes(a.to_client)) == ["42601", "26000"]
    b = PooledClient(pool)
    b.send(prepared_run("good", "select 1"))
    assert bytes(b.to_client) == direct(prepared_run("good", "select 1"))


def test_a_failed_prepare_on_another_connection_answers_the_clients_message() -> None:
    pool = Pool(size=2)
    a, b = PooledClient(pool), PooledClient(pool)
    a.send(prepared_run("s1", "select 1"))
    b.send(q("begin"))
    first = pool.opened[0]
    first.statements.clear()  # (the server lost it: say, a DISCARD ALL outside the proxy's view)
    a.send(q("begin"))
    a.send(run("s1"))  # on writer1, prepared first
    assert ready_statuses(bytes(a.to_client))[-1] == "T"


def test_least_recently_used_statements_are_closed_when_the_connection_goes_back() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool, max_prepared=2)
    for i in range(4):
        a.send(prepared_run(f"s{i}", f"select {i}"))
    server = pool.opened[0]
    assert len(server.statements) == 2
    a.send(run("s0"))  # closed on the server: prepared again, under the client's same name
    assert ready_statuses(bytes(a.to_client)) == "IIIII" and not error_codes(bytes(a.to_client))


def test_every_cut_of_a_shared_flow_gives_the_client_what_a_server_would() -> None:
    flow = (prepared_run("a", "select 1") + parse("b", "select 2") + describe("S", "b") + FLUSH
            + bind("b") + execute() + SYNC + q("select 3") + close_statement("a") + SYNC)
    want = direct(flow)
    for cut in splits(flow):
        for piece in (None, 1, 7):
            pool = Pool(size=1)
            PooledClient(pool).send(prepared_run("x", "select 1"))  # the connection has "select 1"
            a = PooledClient(pool, server_piece=piece)
            a.send(flow, cut)
            assert bytes(a.to_client) == want, (cut, piece)
            assert pool.lent == 0


# --- settings by difference -----------------------------------------------------------------------


def test_settings_follow_each_client_and_nothing_is_sent_when_nothing_differs() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool, startup={"application_name": "app-a"})
    b = PooledClient(pool)
    a.send(q("set search_path = 'tenant_a'") + q("select 1"))
    server = pool.opened[0]
    assert server.settings == {"search_path": "tenant_a", "application_name": "app-a"}
    sent = len(server.queries)
    a.send(q("select 2"))
    assert len(server.queries) == sent + 1  # the same client, the same state: nothing in between
    b.send(q("select 3"))
    assert server.settings == {}  # b has none of a's settings
    a.send(q("select 4"))
    assert server.settings == {"search_path": "tenant_a", "application_name": "app-a"}
    assert ready_statuses(bytes(b.to_client)) == "I"


def test_reset_returns_to_the_startup_value() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool, startup={"application_name": "app-a"})
    a.send(q("set application_name = 'other'") + q("reset application_name"))
    PooledClient(pool).send(q("select 1"))
    a.send(q("select 2"))
    assert pool.opened[0].settings == {"application_name": "app-a"}


def test_sql_prepared_statements_follow_each_client() -> None:
    pool = Pool(size=1)
    a, b = PooledClient(pool), PooledClient(pool)
    a.send(q("prepare p as select 1") + q("execute p"))
    b.send(q("prepare p as select 2"))  # the same name, another text: no "already exists"
    a.send(q("execute p"))
    b.send(q("deallocate p"))
    a.send(q("execute p"))
    assert not error_codes(bytes(a.to_client)) and not error_codes(bytes(b.to_client))
    assert pool.opened[0].sql_prepared == {"p": "prepare p as select 1"}


def test_client_parameters_are_not_told_again_when_they_did_not_change() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool, startup={"application_name": "app-a"})
    a.send(q("select 1"))
    b = PooledClient(pool)
    b.send(q("select 1"))
    a.to_client.clear()
    a.send(q("select 2"))
    # the connection went to b (application_name '') and back: a is told nothing, its value is the same
    assert [t for t, _ in messages(bytes(a.to_client))] == ["C", "Z"]


def test_the_borrow_timeout_error_leaves_the_session_usable() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool)
    a.refused_borrow = lambda: True
    a.send(q("select 1"))
    assert error_codes(bytes(a.to_client)) == ["53300"] and ready_statuses(bytes(a.to_client)) == "I"
    a.refused_borrow = lambda: False
    a.send(q("select 1"))
    assert ready_statuses(bytes(a.to_client)) == "II"


def test_a_server_that_never_saw_the_clients_terminate() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool)
    a.send(q("select 1") + m.Terminate().encode())
    assert a.closed and b"X" not in bytes(pool.opened[0].received)[-5:]
    assert isinstance(StatefulServer, type)


def test_a_loaded_library_pins_in_transaction_mode() -> None:
    pool = Pool(size=1)
    a = PooledClient(pool)
    a.send(q("load 'auto_explain'"))
    a.send(q("select 1"))
    assert pool.lent == 1 and a.env.pins == ["loaded library"]
