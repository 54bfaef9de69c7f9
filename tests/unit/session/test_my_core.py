"""The MySQL session core, without sockets: command boundaries, routing, loss, statement ids.

Each flow runs with the client's bytes delivered whole, one byte at a time and at every split
point, and with the server's answers cut the same ways.
"""

from __future__ import annotations

import pytest

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.framing import encode_packet
from endpoint_proxy.sessioncore.loss import LossOutcome

from .myfakes import (
    PING,
    QUIT,
    FakeMyServer,
    MyDriver,
    StatefulServer,
    close_statement,
    errnos,
    execute,
    packets,
    prepare,
    query,
)
from .test_pg_core import splits


def writer_only() -> MyDriver:
    return MyDriver({"w": FakeMyServer("w")}, lambda role, exclude: None if "w" in exclude else "w")


def readwrite(**kw: object) -> MyDriver:
    servers = {"w": FakeMyServer("w"), "r": FakeMyServer("r", in_recovery=True)}

    def route(role: str, exclude: frozenset[str]) -> str | None:
        name = "r" if role == "reader" else "w"
        return None if name in exclude else name

    return MyDriver(servers, route, readwrite=True, **kw)  # type: ignore[arg-type]


FLOW = query("select 1") + query("set @a = 1") + query("begin") + query("insert into t values (1)") + \
    query("commit") + PING


def test_a_writer_session_passes_every_command_whatever_the_cuts() -> None:
    expected = None
    for cut in splits(FLOW):
        for server_piece in (None, 1, 5):
            d = writer_only()
            d.server_piece = server_piece
            d.send(FLOW, cut)
            assert bytes(d.servers["w"].received) == FLOW, cut
            if expected is None:
                expected = bytes(d.to_client)
            assert bytes(d.to_client) == expected
            assert d.env.started == d.env.ended and len(d.env.started) == 6


def test_pipelined_commands_are_answered_in_order() -> None:
    d = writer_only()
    d.send(query("select 1") + query("select 2") + PING)
    answers = packets(bytes(d.to_client))
    assert [payload[:1] for _, payload in answers].count(b"\xfe") == 2  # two result sets, then
    assert answers[-1][1][0] == 0  # the ping's OK


def test_readwrite_routes_each_command_whole_whatever_the_cuts() -> None:
    big = query("insert into t values ('" + "x" * 4000 + "')")
    flow = query("select 1") + big + query("select 2")
    for cut in [[len(flow)], [10, 1400, 1400, 1400]] + [[k, len(flow) - k] for k in range(1, 40)]:
        d = readwrite()
        d.send(flow, cut)
        assert d.servers["w"].queries == [big[5:].decode()], cut
        readers = [s for name, s in d.servers.items() if name.startswith("r#")]
        assert [s.queries for s in readers] == [["select 1", "select 2"]], cut


def test_prepared_statements_keep_their_ids_across_backends() -> None:
    d = readwrite()
    d.send(prepare("select ?"))  # prepared on a replica
    client_id = int.from_bytes(packets(bytes(d.to_client))[0][1][1:5], "little")
    d.send(query("update t set v = 1"))  # now on the writer
    d.to_client.clear()
    d.send(execute(client_id))  # a read: back on the replica, same id
    d.send(prepare("insert into t values (?)"))
    writer_id = int.from_bytes(packets(bytes(d.to_client))[-1][1][1:5], "little")
    assert writer_id != client_id
    d.send(execute(writer_id))
    d.send(close_statement(client_id))
    assert not errnos(bytes(d.to_client))
    assert "EXECUTE insert into t values (?)" in d.servers["w"].queries


def test_a_statement_prepared_again_elsewhere_gets_its_parameter_types() -> None:
    # A client sends a statement's parameter types with its first execution only. When the proxy
    # prepares the statement again on another backend (here: a read inside a transaction, on the
    # writer; a failover or a switchover alike), that server has no types: the first execution
    # there carries the client's last ones (MariaDB answers 1210 otherwise); later ones need not.
    servers = {"w": StatefulServer("w"), "r": StatefulServer("r", in_recovery=True)}
    d = MyDriver(servers, lambda role, exclude: "r" if role == "reader" else "w", readwrite=True)
    d.send(prepare("select ?"))
    sid = int.from_bytes(packets(bytes(d.to_client))[0][1][1:5], "little")

    def run(value: int, *, typed: bool) -> bytes:
        head = bytes((c.COM_STMT_EXECUTE,)) + sid.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
        return encode_packet(0, head + b"\0" + (b"\x01\x08\x00" if typed else b"\x00") + value.to_bytes(8, "little"))

    d.send(run(7, typed=True))  # on the replica, where it was prepared
    d.send(run(8, typed=False))
    d.send(query("begin"))
    d.send(run(9, typed=False))  # on the writer, prepared there by the proxy
    d.send(run(10, typed=False))
    d.send(query("commit"))
    executions = {role: [cmd[11:] for name, server in d.servers.items() if name.split("#")[0] == role
                         for cmd in server.commands if cmd[0] == c.COM_STMT_EXECUTE] for role in ("r", "w")}
    typed, untyped = b"\x01\x08\x00", b"\x00"
    assert executions["r"] == [typed + (7).to_bytes(8, "little"), untyped + (8).to_bytes(8, "little")]
    assert executions["w"] == [typed + (9).to_bytes(8, "little"), untyped + (10).to_bytes(8, "little")]
    assert not errnos(bytes(d.to_client))


def test_a_kill_statement_goes_to_the_shell() -> None:
    d = writer_only()
    d.send(query("KILL QUERY 42"))
    assert [(k.what, k.target) for k in d.kills] == [("QUERY", 42)]
    assert packets(bytes(d.to_client))[-1][0] == 1  # the answer's sequence id


def test_a_server_that_kills_the_session_is_passed_through() -> None:
    # KILL from another connection, wait_timeout: the instance is up in its role.
    d = writer_only()
    d.send(query("select 1"))
    killed = encode_packet(0, p.err_packet(1927, "70100", "Connection was killed"))
    d.server_closes(killed)
    assert d.core.loss_outcome is LossOutcome.PASS_THROUGH and d.closed
    assert errnos(bytes(d.to_client)) == [1927]


def test_a_transaction_whose_writer_died_fails_until_rollback() -> None:
    d = writer_only()
    d.alive = lambda name: False
    d.send(query("begin"))
    d.core.client_data(query("insert into t values (1)"))  # in flight when the server dies
    d.core.server_eof()
    d.run()
    assert d.core.loss_outcome is LossOutcome.FAIL_TRANSACTION
    d.send(query("insert into t values (2)"))
    d.send(query("rollback"))
    d.send(query("select 1"))
    assert errnos(bytes(d.to_client)) == [1927, 1927]
    assert d.active is not None and d.active.queries == ["select 1"]


def test_a_read_whose_server_died_is_retried_elsewhere() -> None:
    servers = {"r1": FakeMyServer("r1", in_recovery=True), "r2": FakeMyServer("r2", in_recovery=True)}

    def route(role: str, exclude: frozenset[str]) -> str | None:
        return next((n for n in ("r1", "r2") if n not in exclude), None)

    d = MyDriver(servers, route, alive=lambda name: False)
    d.core.client_data(query("select 1"))
    d.core.server_eof()
    d.run()
    assert d.core.loss_outcome is LossOutcome.RETRY
    assert d.active is not None and d.active.name == "r2" and d.active.queries == ["select 1"]
    assert not errnos(bytes(d.to_client))


def test_a_local_infile_request_from_a_server_is_refused_when_not_allowed() -> None:
    d = writer_only()
    d.send(query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t"))
    out = bytes(d.to_client)
    assert b"/etc/passwd" not in out
    assert errnos(out) == [1148]
    assert bytes(d.servers["w"].received).endswith(encode_packet(2, b""))  # the server got no file
    d.send(PING)
    assert packets(bytes(d.to_client))[-1][1][0] == 0


@pytest.mark.parametrize("allowed", [True])
def test_a_local_infile_request_reaches_the_client_when_allowed(allowed: bool) -> None:
    d = MyDriver({"w": FakeMyServer("w")}, lambda role, exclude: "w", allow_local_infile=allowed)
    d.send(query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t"))
    assert b"/etc/passwd" in bytes(d.to_client)
    d.send(encode_packet(2, b"1,2\n") + encode_packet(3, b""))
    assert packets(bytes(d.to_client))[-1][1][0] == 0  # the server's OK


def test_quit_ends_the_session() -> None:
    d = writer_only()
    d.send(query("select 1") + QUIT)
    assert d.closed


def test_a_closed_gate_holds_new_writer_commands_until_it_opens() -> None:
    from endpoint_proxy.sessioncore.actions import WaitGate

    d = writer_only()
    d.env.gate_open = False
    d.core.client_data(query("insert into t values (1)"))
    actions = []
    while (a := d.core.next_action()) is not None:
        actions.append(a)
    assert [type(a) for a in actions] == [WaitGate] and d.servers["w"].queries == []
    d.env.gate_open = True
    d.core.gate_opened()
    d.run()
    assert d.servers["w"].queries == ["insert into t values (1)"]
    assert d.env.gated == ["begin", "end"]


# --- session state (routing/my_session_state.py) as the core uses it ------------------------------------

SMUGGLED = "select 'a\\'; delete from t; -- '"  # one string read with backslash escapes; a DELETE without them


def test_a_backslash_string_is_read_in_the_sessions_sql_mode() -> None:
    d = readwrite()
    d.send(query(SMUGGLED))  # the server's status says backslashes escape: one SELECT, a read
    assert not d.servers["w"].queries
    d.send(query("set sql_mode = 'NO_BACKSLASH_ESCAPES'"))
    d.send(query(SMUGGLED))
    assert SMUGGLED in d.servers["w"].queries  # now it holds a DELETE: the writer runs it


def test_the_status_flag_alone_tells_the_dialect() -> None:
    # A sql_mode value the proxy cannot read (SET from a variable): the server's OK says NO_BACKSLASH_ESCAPES.
    d = readwrite()
    d.send(query("set sql_mode = 'NO_BACKSLASH_ESCAPES'"))
    assert d.core.state.dialect.no_backslash_escapes is True
    d.send(query("set sql_mode = ''"))
    assert d.core.state.dialect.no_backslash_escapes is False


def test_session_variables_follow_the_session_to_another_backend() -> None:
    d = readwrite()
    d.send(query("set @tenant = 7"))
    d.send(query("set time_zone = '+02:00'"))
    d.send(query("set nosuchvariable = 1"))  # refused by the server: nothing to replay
    d.send(query("select @tenant"))
    reader = next(s for name, s in d.servers.items() if name.startswith("r#"))
    assert reader.queries[:2] == ["set @tenant = 7", "set time_zone = '+02:00'"]
    assert not any("nosuchvariable" in q for q in reader.queries)
    assert reader.queries[-1] == "select @tenant"


def test_a_variable_with_a_value_only_this_server_has_pins_the_session() -> None:
    d = readwrite()
    d.send(query("set @id = uuid()"))
    d.send(query("select @id"))
    assert d.servers["w"].queries == ["set @id = uuid()", "select @id"]
    assert d.env.pins and "user variable" in d.env.pins[0]


def test_a_pinned_session_whose_writer_is_lost_ends_with_an_error() -> None:
    d = writer_only()
    d.send(query("create temporary table tt (a int)"))
    d.alive = lambda name: False
    d.server_closes()
    assert d.core.loss_outcome is LossOutcome.CANNOT_MOVE and d.closed
    assert errnos(bytes(d.to_client))[-1:] == [1927]


def test_reset_connection_forgets_the_state() -> None:
    from endpoint_proxy.protocol.mysql import commands as c

    d = readwrite()
    d.send(query("set @id = uuid()"))
    assert d.core.state.pinned_by is not None
    d.send(encode_packet(0, bytes((c.COM_RESET_CONNECTION,))))
    assert d.core.state.pinned_by is None and not d.core.state.entries
    d.send(query("select 1"))
    assert any(name.startswith("r#") for name in d.servers)
