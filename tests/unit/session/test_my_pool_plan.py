"""Bringing a pooled MySQL connection to a session's state by the difference (sessioncore/my_pool_plan.py)."""

from __future__ import annotations

import pytest

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.routing.my_session_state import MySessionState, ReplayEntry
from endpoint_proxy.sessioncore.my_pool_plan import PooledMark, applied, plan

RESET = "RESET"
SET_OPTION_ON = "SET_OPTION ON"


def session(*sqls: str, schema: str | None = "app") -> MySessionState:
    s = MySessionState.start(schema=schema)
    for sql in sqls:
        s.on_query(sql)
        s.on_response(True)
    return s


def state(*sqls: str, schema: str | None = "app") -> tuple[ReplayEntry, ...]:
    return tuple(session(*sqls, schema=schema).entries)


def mark_with(*sqls: str, schema: str | None = "app") -> PooledMark:
    """A connection that logged in to ``schema`` and then ran ``sqls`` for some session."""
    mark = PooledMark.fresh((0, 45), schema)
    s = session(*sqls, schema=schema)
    mark.entries, mark.schema = tuple(s.entries), s.schema
    return mark


def readable(commands: tuple[bytes, ...]) -> list[str]:
    out = []
    for command in commands:
        if command[0] == c.COM_RESET_CONNECTION:
            out.append(RESET)
        elif command[0] == c.COM_SET_OPTION:
            out.append(SET_OPTION_ON if command[1] == 0 else "SET_OPTION OFF")
        else:
            assert command[0] == c.COM_QUERY
            out.append(command[1:].decode())
    return out


CASES = [
    # (what the connection has, what the session has, the commands that make them the same)
    ((), (), []),
    (("set @a = 1",), ("set @a = 1",), []),
    (("set names utf8mb4", "set sql_mode = 'ANSI'"), ("set names utf8mb4", "set sql_mode = 'ANSI'"), []),
    (("set @a = 1",), (), ["SET @`a` = NULL"]),
    ((), ("set @a = 1",), ["set @a = 1"]),
    (("set @a = 1",), ("set @a = 2",), ["set @a = 2"]),  # set again before anything reads it: no undo
    (("set @a = 1", "set @b = 2"), ("set @a = 1",), ["SET @`b` = NULL"]),  # the shared prefix stays
    (("set @a = 1", "set @b = 2", "set sql_mode = ''"), (),
     ["SET @`a` = NULL, @`b` = NULL, SESSION sql_mode = DEFAULT"]),  # one round trip
    (("set time_zone = '+02:00'",), (), ["SET SESSION time_zone = DEFAULT"]),
    (("use other",), (), ["USE `app`"]),
    (("use other",), ("use third",), ["USE `third`"]),
    (("prepare s from 'select 1'",), (), ["DEALLOCATE PREPARE `s`"]),
    # the session's tail reads what the connection's tail set: undone first
    (("set @a = 1", "set @b = 2"), ("set @c = @b",), ["SET @`a` = NULL, @`b` = NULL", "set @c = @b"]),
    # what the connection's tail changed was set by the shared prefix: the prefix runs again
    (("set @a = 1, @b = 1", "set @b = 2"), ("set @a = 1, @b = 1",), ["set @a = 1, @b = 1"]),
    # values that depend on earlier entries are rebuilt in order
    (("set @a = 2",), ("set @a = 1", "set @b = @a", "set @a = 2"), ["set @a = 1", "set @b = @a", "set @a = 2"]),
    # what DEFAULT does not give back (the handshake set it): COM_RESET_CONNECTION and the whole state
    (("set names latin1",), (), [RESET]),
    (("set names latin1",), ("set @a = 1",), [RESET, "set @a = 1"]),
    (("set session transaction isolation level serializable",), (), [RESET]),
    (("set wait_timeout = 5", "use other"), ("set @a = 1",), [RESET, "USE `app`", "set @a = 1"]),
]


@pytest.mark.parametrize(("have", "want", "expected"), CASES)
def test_the_difference(have: tuple[str, ...], want: tuple[str, ...], expected: list[str]) -> None:
    result = plan(mark_with(*have), state(*want), "app", False)
    assert result is not None
    assert readable(result.commands) == expected
    assert result.reset == (expected[:1] == [RESET])


def test_equal_lists_of_other_sessions_entries_send_nothing() -> None:
    # two sessions that ran the same SETs have entries of their own, equal by text
    mark = mark_with("set names utf8mb4", "set autocommit = 1", "set @tenant = 7")
    other = state("set names utf8mb4", "set autocommit = 1", "set @tenant = 7")
    assert all(a is not b for a, b in zip(mark.entries, other, strict=True))
    result = plan(mark, other, "app", False)
    assert result is not None and result.commands == ()


def test_the_multi_statement_option_is_set_when_it_differs() -> None:
    mark = mark_with()
    result = plan(mark, (), "app", True)
    assert result is not None and readable(result.commands) == [SET_OPTION_ON]
    mark.multi_statements = True
    result = plan(mark, (), "app", True)
    assert result is not None and result.commands == ()


def test_another_base_database_goes_by_reset() -> None:
    # the session ran COM_RESET_CONNECTION while in "other": its entries start there
    result = plan(mark_with("set @a = 1"), (), "other", False)
    assert result is not None and readable(result.commands) == [RESET, "USE `other`"]


def test_a_connection_in_a_database_cannot_serve_a_session_in_none() -> None:
    mark = mark_with("use other", schema=None)
    assert plan(mark, (), None, False) is None


def test_a_connection_whose_state_is_unknown_is_reset() -> None:
    mark = mark_with("set @a = 1")
    mark.unknown = True
    result = plan(mark, state("set @a = 1"), "app", False)
    # (nor is its multi-statement option known)
    assert result is not None and readable(result.commands) == [RESET, "USE `app`", "SET_OPTION OFF", "set @a = 1"]


def test_a_forced_reset_rebuilds_everything() -> None:
    mark = mark_with("set @a = 1")
    mark.multi_statements = True  # (whether the reset turns it off is not relied on)
    result = plan(mark, state("set @a = 1", "use other"), "app", True, reset=True)
    assert result is not None and readable(result.commands) == [RESET, SET_OPTION_ON, "set @a = 1", "USE `other`"]


def test_applied_records_the_sessions_state_and_a_reset_forgets_prepared_statements() -> None:
    mark = mark_with()
    mark.prepared[("select ?", "app", ())] = 7
    want = state("set @a = 1", "use other")
    applied(mark, want, "app", "other", True)
    assert mark.entries == want and mark.schema == "other" and mark.multi_statements
    assert mark.prepared
    applied(mark, want, "app", "other", True, reset=True)
    assert not mark.prepared
