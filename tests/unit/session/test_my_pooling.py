"""Transaction mode in the MySQL session core, without sockets: when a session borrows a pooled server
connection and gives it back, how the connection is brought to the session's state, statement ids across
connections, pins and their release, borrow timeouts.

Each session's commands are delivered whole, one byte at a time and cut at every split point, and the
servers' answers cut the same ways; the answers the client sees must not depend on the cuts.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.framing import encode_packet, read_row_value
from endpoint_proxy.sessioncore.loss import LossOutcome

from .myfakes import (
    PING,
    QUIT,
    RESET_CONNECTION,
    FakePool,
    PooledDriver,
    close_statement,
    errnos,
    execute,
    execute_cursor,
    fetch,
    long_data,
    packets,
    prepare,
    query,
    set_option,
)
from .test_pg_core import splits

BORROW, GIVE_BACK, CLOSE, FORGET = "borrow", "give back", "close", "forget"


def pool(size: int = 2, **kw: object) -> FakePool:
    return FakePool("w", size, **kw)  # type: ignore[arg-type]


def session(the_pool: FakePool, **kw: object) -> PooledDriver:
    return PooledDriver({"main": the_pool}, **kw)  # type: ignore[arg-type]


def cuts_of(n: int) -> list[list[int]]:
    """Ways to cut one command of ``n`` bytes: whole, byte by byte, at every split point."""
    return [[n], [1] * n] + [[k, n - k] for k in range(1, n)]


def one_at_a_time(d: PooledDriver, commands: Iterable[bytes], cut: int | None = None) -> None:
    """Send each command after the answer to the previous one, cut at ``cut`` (None: whole)."""
    for command in commands:
        d.send(command, None if cut is None or cut >= len(command) else [cut, len(command) - cut])


def ask(d: PooledDriver, sql: str, piece: int | list[int] | None = None) -> str | None:
    """The first value of a one-row result (an error raises)."""
    d.to_client.clear()
    d.send(query(sql), piece)
    answer = packets(bytes(d.to_client))
    assert answer[0][1][:1] != b"\xff", p.decode_err(answer[0][1])
    value, _ = read_row_value(answer[2][1], 0)
    return None if value is None else value.decode()


def sent(server: object) -> list[str]:
    """The commands a fake server received, readable."""
    out = []
    for payload in server.commands:  # type: ignore[attr-defined]
        out.append(payload[1:].decode() if payload[0] == c.COM_QUERY else c.command_name(payload[0]))
    return out


# --- when a connection is borrowed and given back ------------------------------------------------------

TX_FLOW = [query("select 1"), query("begin"), query("insert into t values (1)"), query("commit"), query("select 2")]


def test_a_connection_is_borrowed_per_statement_and_held_through_a_transaction() -> None:
    expected = None
    longest = max(len(cmd) for cmd in TX_FLOW)
    for cut in [None, *range(1, longest)]:
        for server_piece in (None, 1, 5):
            the_pool = pool(size=1)
            d = session(the_pool, server_piece=server_piece)
            one_at_a_time(d, TX_FLOW, cut)
            server = the_pool.opened[0]
            assert sent(server) == ["select 1", "begin", "insert into t values (1)", "commit", "select 2"]
            assert the_pool.events == [(BORROW, server.name), (GIVE_BACK, server.name)] * 3, (cut, server_piece)
            assert not d.plans  # the connection has the session's state: nothing to run before its commands
            if expected is None:
                expected = bytes(d.to_client)
            assert bytes(d.to_client) == expected
            assert d.env.started == d.env.ended and len(d.env.started) == 5
            assert the_pool.lent == 0


def test_byte_by_byte_commands_keep_nothing_borrowed_while_they_arrive() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    command = query("select 1")
    for i in range(len(command) - 1):
        d.send(command[i:i + 1])
        assert the_pool.lent == 0  # a command half here borrows nothing yet
    d.send(command[-1:])
    assert the_pool.lent == 0 and the_pool.events[0][0] == BORROW


def test_pipelined_commands_are_served_in_order_on_one_borrow() -> None:
    flow = b"".join(TX_FLOW) + PING
    expected = None
    for cut in splits(flow):
        the_pool = pool(size=2)
        d = session(the_pool)
        d.send(flow, cut)
        queries = [q for s in the_pool.opened for q in s.queries]
        assert queries == ["select 1", "begin", "insert into t values (1)", "commit", "select 2"]
        # the transaction ran on one connection whatever arrived when
        tx_server = next(s for s in the_pool.opened if "begin" in s.queries)
        assert tx_server.queries[tx_server.queries.index("begin"):][:3] == ["begin", "insert into t values (1)",
                                                                             "commit"]
        if expected is None:
            expected = bytes(d.to_client)
        assert bytes(d.to_client) == expected
        assert the_pool.lent == 0
    whole = pool()
    d = session(whole)
    d.send(flow)
    assert [e[0] for e in whole.events] == [BORROW, GIVE_BACK]  # all of it queued: one borrow


def test_the_answer_is_sent_after_the_connection_goes_back() -> None:
    # so that a client slow to read its answer keeps no connection from the others
    from endpoint_proxy.sessioncore.actions import Attach, ToClient, ToServer
    from endpoint_proxy.sessioncore.mysql import Release

    for command in (query("select 1"), prepare("select ?")):
        the_pool = pool(size=1)
        d = session(the_pool)
        d.core.client_data(command)
        attach = d.core.next_action()
        assert isinstance(attach, Attach)
        d._borrow(attach)
        to_server = d.core.next_action()
        assert isinstance(to_server, ToServer)
        assert d.core.server_data(the_pool.opened[0].feed(to_server.data)) != 0
        actions = []
        while (action := d.core.next_action()) is not None:
            actions.append(type(action))
        assert actions == [Release, ToClient]


def test_autocommit_off_holds_the_connection() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    one_at_a_time(d, [query("set autocommit = 0"), query("select 1")])
    assert the_pool.lent == 1  # every statement is in a transaction (SERVER_STATUS_AUTOCOMMIT is off)


def test_a_session_that_ends_gives_back_a_clean_connection_and_closes_one_in_a_transaction() -> None:
    clean, dirty = pool(), pool()
    d = session(clean)
    one_at_a_time(d, [query("set @a = 1"), QUIT])
    assert d.closed and [e[0] for e in clean.events] == [BORROW, GIVE_BACK, ]
    d = session(dirty)
    one_at_a_time(d, [query("begin"), query("insert into t values (1)"), QUIT])
    assert d.closed and [e[0] for e in dirty.events] == [BORROW, CLOSE]


# --- the connection's state and the session's -------------------------------------------------------


def test_nothing_is_sent_when_the_connection_has_the_sessions_state() -> None:
    setup = [query("set names utf8mb4"), query("set sql_mode = 'STRICT_ALL_TABLES'"), query("set @tenant = 1")]
    the_pool = pool(size=1)
    a, b = session(the_pool), session(the_pool)
    one_at_a_time(a, setup)
    one_at_a_time(b, setup)
    a.plans.clear()
    b.plans.clear()
    server = the_pool.opened[0]
    server.commands.clear()
    for _ in range(5):
        one_at_a_time(a, [query("select 1")])
        one_at_a_time(b, [query("select 2")])
    # the same statements set the same state: no statement of the proxy's when they take turns
    assert a.plans == [] and b.plans == []
    assert sent(server) == ["select 1", "select 2"] * 5


def test_differing_state_is_brought_over_by_the_minimal_statements() -> None:
    for cut in (None, 1, 3):
        the_pool = pool(size=1)
        a, b = session(the_pool), session(the_pool)
        one_at_a_time(a, [query("set @a = 1"), query("use other"), query("set time_zone = '+02:00'")], cut)
        assert ask(b, "select @a") is None
        assert [cmd[1:].decode() for cmd in b.plans] == ["SET @`a` = NULL, SESSION time_zone = DEFAULT",
                                                         "USE `app`"]
        assert ask(b, "select database()") == "app"
        assert ask(a, "select @a") == "1"
        assert ask(a, "select database()") == "other"
        assert [cmd[1:].decode() for cmd in a.plans] == ["set @a = 1", "USE `other`", "set time_zone = '+02:00'"]


def test_each_session_sees_only_its_own_variables() -> None:
    the_pool = pool(size=2)
    sessions = [session(the_pool) for _ in range(6)]
    mine: dict[int, str] = {}
    for round_ in range(6):
        holder = sessions[round_]
        one_at_a_time(holder, [query("begin")])  # holds one connection for the round; the others share one
        for i, d in enumerate(sessions):
            if (i + round_) % 3 == 0:
                mine[i] = str(i * 10 + round_)
                one_at_a_time(d, [query(f"set @v = {mine[i]}")], cut=2)
            assert ask(d, "select @v", piece=1) == mine.get(i), (i, round_)
        one_at_a_time(holder, [query("commit")])
    assert the_pool.lent == 0 and len(the_pool.opened) == 2


def test_what_cannot_be_undone_by_name_goes_by_reset_connection() -> None:
    the_pool = pool(size=1)
    a, b = session(the_pool), session(the_pool)
    one_at_a_time(a, [query("set names latin1"), query("set @a = 1")])
    one_at_a_time(b, [query("set @b = 2")])
    assert [cmd[:1] for cmd in b.plans] == [bytes((c.COM_RESET_CONNECTION,))]
    assert ask(b, "select @a") is None and ask(b, "select @b") == "2"


def test_an_undo_the_server_refuses_falls_back_to_reset_connection() -> None:
    the_pool = pool(size=1, refuse=["SET @`a` = NULL, SESSION time_zone = DEFAULT"])
    a, b = session(the_pool), session(the_pool)
    one_at_a_time(a, [query("set time_zone = '+02:00'"), query("set @a = 1")])
    one_at_a_time(b, [query("set @b = 1")])
    assert [cmd[1:].decode() if cmd[0] == c.COM_QUERY else c.command_name(cmd[0]) for cmd in b.plans] == [
        "SET @`a` = NULL, SESSION time_zone = DEFAULT", "COM_RESET_CONNECTION"]
    assert ask(b, "select @a") is None and ask(a, "select @a") == "1"


def test_the_multi_statement_option_follows_the_session() -> None:
    the_pool = pool(size=1)
    a, b = session(the_pool), session(the_pool)
    one_at_a_time(a, [set_option(True)])
    one_at_a_time(b, [PING])
    one_at_a_time(a, [PING])
    server = the_pool.opened[0]
    assert [c.command_name(cmd[0]) + str(cmd[1]) for cmd in b.plans + a.plans] == ["COM_SET_OPTION1",
                                                                                   "COM_SET_OPTION0"]
    assert server.multi is True


def test_reset_connection_with_nothing_borrowed_takes_no_connection() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    one_at_a_time(d, [query("set @a = 1")])
    events = len(the_pool.events)
    one_at_a_time(d, [RESET_CONNECTION])
    assert len(the_pool.events) == events and packets(bytes(d.to_client))[-1][1][0] == 0
    assert ask(d, "select @a") is None  # the connection still had it: the next borrow undid it


# --- prepared statements -------------------------------------------------------------------------------


def statement_id(d: PooledDriver) -> int:
    """The id in the answer to a COM_STMT_PREPARE (the client's output cleared before it)."""
    return int.from_bytes(packets(bytes(d.to_client))[0][1][1:5], "little")


def execute_one(statement_id: int, value: int, *, typed: bool) -> bytes:
    """COM_STMT_EXECUTE of a statement of one parameter, with its type (LONGLONG) or relying on the last."""
    head = bytes((c.COM_STMT_EXECUTE,)) + statement_id.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
    bound = b"\x01\x08\x00" if typed else b"\x00"
    return encode_packet(0, head + b"\0" + bound + value.to_bytes(8, "little"))


def test_statement_ids_stay_the_sessions_across_connections() -> None:
    for cut in (None, 1, 4):
        the_pool = pool(size=2)
        a, b = session(the_pool), session(the_pool)
        a.to_client.clear()
        one_at_a_time(a, [prepare("select ?")], cut)
        sid = statement_id(a)
        first = the_pool.opened[0]
        one_at_a_time(b, [query("begin")])  # b holds the connection a prepared on
        a.to_client.clear()
        one_at_a_time(a, [execute(sid)], cut)  # on a new connection: prepared there first
        second = the_pool.opened[1]
        assert second is not first and second.queries == ["select ?", "EXECUTE select ?"]
        assert not errnos(bytes(a.to_client))
        before = [len(s.commands) for s in the_pool.opened]
        events = len(the_pool.events)
        one_at_a_time(a, [close_statement(sid)], cut)
        # the client's close only forgets its id: no connection taken, nothing sent (others may share it)
        assert [len(s.commands) for s in the_pool.opened] == before and len(the_pool.events) == events
        a.to_client.clear()
        one_at_a_time(a, [execute(sid)])
        assert errnos(bytes(a.to_client)) == [1243]
        one_at_a_time(b, [query("commit")])


def test_sessions_share_the_server_statement_of_the_same_text() -> None:
    the_pool = pool(size=1)
    a, b = session(the_pool), session(the_pool)
    a.to_client.clear()
    one_at_a_time(a, [prepare("select ?")])
    sid_a = statement_id(a)
    b.to_client.clear()
    one_at_a_time(b, [prepare("select ?")])  # a second server statement of the same text; the first is closed
    sid_b = statement_id(b)
    server = the_pool.opened[0]
    one_at_a_time(a, [execute(sid_a), execute(sid_a)])
    one_at_a_time(b, [execute(sid_b)])
    assert sent(server) == ["COM_STMT_PREPARE", "COM_STMT_PREPARE", "COM_STMT_CLOSE", "COM_STMT_EXECUTE",
                            "COM_STMT_EXECUTE", "COM_STMT_EXECUTE"]
    assert len(server.statements) == 1 and not a.plans and not b.plans
    assert not errnos(bytes(a.to_client) + bytes(b.to_client))


def test_every_execution_carries_its_parameter_types() -> None:
    # A client sends the types once; a pooled server statement may be another connection's, or shared with
    # a session whose types differ: the proxy adds the session's last types to each execution.
    the_pool = pool(size=2)
    a, b = session(the_pool), session(the_pool)
    a.to_client.clear()
    one_at_a_time(a, [prepare("select ?")])
    sid = statement_id(a)
    one_at_a_time(a, [execute_one(sid, 7, typed=True), execute_one(sid, 8, typed=False)])
    one_at_a_time(b, [query("begin")])
    one_at_a_time(a, [execute_one(sid, 9, typed=False)], cut=3)  # on a connection that never saw the types
    first, second = the_pool.opened
    executions = [cmd for server in (first, second) for cmd in server.commands if cmd[0] == c.COM_STMT_EXECUTE]
    assert [cmd[5:] for cmd in executions] == [b"\0" + (1).to_bytes(4, "little") + b"\0\x01\x08\x00"
                                               + value.to_bytes(8, "little") for value in (7, 8, 9)]
    assert not errnos(bytes(a.to_client))


def test_a_statement_prepared_in_another_database_is_prepared_there() -> None:
    the_pool = pool(size=2)
    a, b = session(the_pool), session(the_pool)
    a.to_client.clear()
    one_at_a_time(a, [prepare("select * from t")])
    sid = statement_id(a)
    one_at_a_time(a, [query("use other")])
    one_at_a_time(b, [query("begin")])
    one_at_a_time(a, [execute(sid)])
    second = the_pool.opened[1]
    assert sent(second) == ["USE `other`", "COM_INIT_DB", "COM_STMT_PREPARE", "COM_INIT_DB", "COM_STMT_EXECUTE"]
    assert [cmd[1:] for cmd in second.commands if cmd[0] == c.COM_INIT_DB] == [b"app", b"other"]
    assert second.schema == "other"


def test_each_connection_keeps_at_most_max_prepared_statements() -> None:
    the_pool = pool(size=1)
    d = session(the_pool, max_prepared=2)
    ids = []
    for sql in ("select 1", "select 2", "select 3"):
        d.to_client.clear()
        one_at_a_time(d, [prepare(sql)])
        ids.append(statement_id(d))
    server = the_pool.opened[0]
    assert sorted(server.statements.values()) == ["select 2", "select 3"]  # the least recently used was closed
    one_at_a_time(d, [execute(ids[1])])  # now select 3 is the least recently used
    d.to_client.clear()
    one_at_a_time(d, [execute(ids[0])])  # prepared again; select 3 goes
    assert not errnos(bytes(d.to_client))
    assert sorted(server.statements.values()) == ["select 1", "select 2"]
    assert server.queries[-1] == "EXECUTE select 1"


def test_a_cursor_holds_the_connection_until_its_last_row() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    d.to_client.clear()
    one_at_a_time(d, [prepare("select v from t")])
    sid = statement_id(d)
    one_at_a_time(d, [execute_cursor(sid)])
    assert the_pool.lent == 1
    one_at_a_time(d, [fetch(sid)])
    assert the_pool.lent == 1
    one_at_a_time(d, [fetch(sid)])  # the last row: the server closed the cursor
    assert the_pool.lent == 0
    one_at_a_time(d, [execute_cursor(sid)])
    assert the_pool.lent == 1
    server = the_pool.opened[0]
    one_at_a_time(d, [close_statement(sid)])  # a statement with this session's cursor: closed for real
    assert the_pool.lent == 0 and sent(server)[-1] == "COM_STMT_CLOSE" and not server.statements


def test_long_data_holds_the_connection_until_the_execution() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    d.to_client.clear()
    one_at_a_time(d, [prepare("insert into t values (?)")])
    sid = statement_id(d)
    for cut in (None, 3):
        one_at_a_time(d, [long_data(sid, b"x" * 10), long_data(sid, b"y" * 10)], cut)
        assert the_pool.lent == 1
        server = the_pool.opened[0]
        assert server.long_data[next(iter(server.statements))] == b"x" * 10 + b"y" * 10
        one_at_a_time(d, [execute(sid)])
        assert the_pool.lent == 0 and not server.long_data


# --- pins ----------------------------------------------------------------------------------------------


def test_a_temporary_table_pins_the_connection_and_it_is_closed_at_the_end() -> None:
    the_pool = pool(size=2)
    d = session(the_pool)
    one_at_a_time(d, [query("create temporary table tt (a int)"), query("select 1"), query("select 2")])
    server = the_pool.opened[0]
    assert the_pool.events == [(BORROW, server.name)] and d.env.pins == ["temporary table"]
    assert server.queries == ["create temporary table tt (a int)", "select 1", "select 2"]
    one_at_a_time(d, [QUIT])
    assert the_pool.events[-1] == (CLOSE, server.name)  # the temporary table may still be there


@pytest.mark.parametrize(("take", "release"), [
    ("lock tables t write", "unlock tables"),
    ("flush tables with read lock", "unlock tables"),
    ("select get_lock('a', 0)", "select release_all_locks()"),
])
def test_a_lock_pins_until_it_is_released(take: str, release: str) -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    one_at_a_time(d, [query(take), query("select 1")])
    assert the_pool.lent == 1 and d.env.pins
    one_at_a_time(d, [query(release)])
    assert the_pool.lent == 0 and d.env.unpins == d.env.pins
    one_at_a_time(d, [query("select 2"), QUIT])
    assert [e[0] for e in the_pool.events] == [BORROW, GIVE_BACK, BORROW, GIVE_BACK]


def test_unlock_tables_does_not_end_a_backup_lock_or_a_temporary_table() -> None:
    for take in ("backup stage start", "create temporary table tt (a int)"):
        the_pool = pool(size=1)
        d = session(the_pool)
        one_at_a_time(d, [query("lock tables t write"), query(take), query("unlock tables")])
        assert the_pool.lent == 1 and not d.env.unpins, take


def test_reset_connection_on_a_pinned_connection_releases_it() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    one_at_a_time(d, [query("create temporary table tt (a int)"), query("set @a = 1"), RESET_CONNECTION])
    server = the_pool.opened[0]
    assert sent(server)[-1] == "COM_RESET_CONNECTION"  # the server drops the temporary table
    assert the_pool.lent == 0 and d.env.unpins == ["temporary table"]
    assert ask(d, "select @a") is None


# --- borrow timeouts and lost connections ----------------------------------------------------------------


def test_a_borrow_timeout_answers_1040_and_the_session_goes_on() -> None:
    the_pool = pool(size=1)
    holder, waiter = session(the_pool), session(the_pool)
    one_at_a_time(holder, [query("begin")])
    for cut in (None, 1, 3):
        waiter.to_client.clear()
        one_at_a_time(waiter, [query("select 1")], cut)
        answer = packets(bytes(waiter.to_client))
        assert len(answer) == 1
        err = p.decode_err(answer[0][1])
        assert (err.errno, err.sqlstate) == (1040, "08004") and "borrow_timeout_ms" in err.message
        assert answer[0][0] == 1  # the sequence id of an answer
    assert waiter.env.errors == []  # (the pool counts its borrow timeouts itself: borrow_timeout)
    one_at_a_time(holder, [query("commit")])
    assert ask(waiter, "select @nothing") is None


def test_a_lost_connection_in_a_transaction_fails_it_and_is_forgotten() -> None:
    the_pool = pool(size=2)
    d = session(the_pool, alive=lambda name: False)
    one_at_a_time(d, [query("begin")])
    d.mute = True
    d.send(query("insert into t values (1)"))
    d.mute = False
    server = the_pool.opened[0]
    d.core.server_eof()
    d.run()
    assert d.core.loss_outcome is LossOutcome.FAIL_TRANSACTION
    assert the_pool.events[-1] == (FORGET, server.name) and the_pool.lent == 0
    one_at_a_time(d, [query("insert into t values (2)"), query("rollback")])
    assert errnos(bytes(d.to_client)) == [1927, 1927]
    assert ask(d, "select @a") is None  # a new connection


def test_a_read_whose_connection_died_is_retried_on_another() -> None:
    the_pool = pool(size=2)
    d = session(the_pool, alive=lambda name: False)
    d.mute = True
    d.send(query("select 1"))
    d.mute = False
    d.core.server_eof()
    d.run()
    assert d.core.loss_outcome is LossOutcome.RETRY
    assert [e[0] for e in the_pool.events] == [BORROW, FORGET, BORROW, GIVE_BACK]
    assert not errnos(bytes(d.to_client)) and the_pool.opened[1].queries == ["select 1"]


def test_a_connection_the_server_killed_is_passed_through() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    one_at_a_time(d, [query("begin")])
    killed = encode_packet(0, p.err_packet(1927, "70100", "Connection was killed"))
    d.core.server_data(killed)
    d.core.server_eof()
    d.run()
    assert d.core.loss_outcome is LossOutcome.PASS_THROUGH and d.closed
    assert the_pool.events[-1][0] == FORGET and the_pool.lent == 0


# --- readwrite ---------------------------------------------------------------------------------------------


def test_readwrite_borrows_from_the_writer_and_reader_pools_with_the_state() -> None:
    writer, reader = FakePool("w", 1), FakePool("r", 1, in_recovery=True)
    d = PooledDriver({"writer": writer, "reader": reader}, readwrite=True)
    one_at_a_time(d, [query("set @tenant = 7"), query("insert into t values (1)")])
    assert ask(d, "select @tenant") == "7"  # on the replica, the variable brought along
    assert [cmd[1:].decode() for cmd in d.plans] == ["set @tenant = 7"]
    assert writer.opened[0].queries == ["set @tenant = 7", "insert into t values (1)"]
    assert reader.opened[0].queries == ["set @tenant = 7", "select @tenant"]
    assert writer.lent == reader.lent == 0


def test_readwrite_pipelines_switch_pools_at_command_boundaries() -> None:
    flow = query("set @t = 1") + query("select @t") + query("insert into t values (1)") + query("select @t")
    expected = None
    for cut in splits(flow):
        writer, reader = FakePool("w", 1), FakePool("r", 1, in_recovery=True)
        d = PooledDriver({"writer": writer, "reader": reader}, readwrite=True)
        d.send(flow, cut)
        assert writer.opened[0].queries == ["set @t = 1", "insert into t values (1)"], cut
        # the variable went along to the replica (once: the second read finds it there)
        assert reader.opened[0].queries == ["set @t = 1", "select @t", "select @t"], cut
        assert writer.lent == reader.lent == 0
        if expected is None:
            expected = bytes(d.to_client)
        assert bytes(d.to_client) == expected


def test_xa_transactions_hold_the_connection_until_they_end() -> None:
    the_pool = pool(size=1)
    d = session(the_pool)
    one_at_a_time(d, [query("xa start 'x'"), query("insert into t values (1)"), query("xa end 'x'"),
                      query("xa prepare 'x'")])
    assert the_pool.lent == 1
    one_at_a_time(d, [query("xa commit 'x'")])
    assert the_pool.lent == 0
