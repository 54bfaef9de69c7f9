"""A backend lost while the client waits on a request that ends with Flush (asyncpg's prepare:
Parse, Describe, Flush): the client must get an answer, whatever the monitor's verdict."""

from __future__ import annotations

import pytest

from endpoint_proxy.sessioncore.actions import FORWARD
from tests.unit.session.pgfakes import (
    FATAL_TERMINATED,
    FLUSH,
    SYNC,
    Driver,
    FakePgServer,
    describe,
    error_codes,
    parse,
    ready_statuses,
)


def writer_only() -> Driver:
    return Driver({"w": FakePgServer("w")}, lambda role, exclude: None if "w" in exclude else "w")


@pytest.mark.parametrize("instance_up", [True, False], ids=["terminated", "instance-down"])
@pytest.mark.parametrize("fatal", [FATAL_TERMINATED, b""], ids=["fatal-then-close", "close"])
def test_a_flushed_prepare_whose_backend_is_lost_unanswered_gets_an_answer(instance_up: bool, fatal: bytes) -> None:
    d = writer_only()
    d.alive = lambda name: instance_up
    # The prepare reaches the server, which dies before answering it: forward by hand,
    # without letting the scripted server answer.
    request = parse("s1", "select 1") + describe("S", "s1") + FLUSH
    assert d.core.client_data(request) == FORWARD
    d.run()
    d.server_closes(fatal)
    # The client waits for ParseComplete: it must get an error (or its connection closed).
    out = bytes(d.to_client)
    assert d.closed or error_codes(out), (d.core.loss_outcome, out)
    if not d.closed:
        # After the error the client sends Sync (asyncpg does) and gets its ReadyForQuery.
        d.send(SYNC)
        assert ready_statuses(bytes(d.to_client)) == "I"
