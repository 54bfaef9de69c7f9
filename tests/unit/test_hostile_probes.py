"""Probes against hostile fake servers (tests/fixtures/fakeserver.py): each is a failed probe with a clear reason.

The real probe code runs here (ProbeConnection, MyProbeConnection, the runtime's probe_once)
against a server that closes, hangs, sends garbage, announces a 1 GiB message, breaks a TLS
handshake or asks for a cleartext password. None of it may raise out of the monitor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import trio

from endpoint_proxy.config import parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.topology.state import Health, ProbeResult
from tests.fixtures import fakeserver as fs

CASES = [
    # protocol, backend_tls, script, what last_error says
    ("postgresql", "off", fs.close_at_once(), "closed the connection"),
    ("postgresql", "off", fs.silent(), "timed out"),
    ("postgresql", "off", fs.garbage(), "."),
    ("postgresql", "off", fs.pg_huge_message(), "exceeds the limit"),
    ("postgresql", "off", fs.pg_huge_message(length=(1 << 30) - 1), "exceeds the limit"),
    ("postgresql", "require", fs.pg_ssl_then_garbage(), "TLS handshake"),
    ("postgresql", "require", fs.close_at_once(), "closed the connection"),
    # a server asking for a cleartext password is refused (backend_auth), never answered
    ("postgresql", "off", fs.pg_cleartext_password(), "cleartext password"),
    ("postgresql", "off", fs.pg_cleartext_password(then=[fs.Send(fs.garbage_bytes(64))]), "cleartext password"),
    # logged in, then an answer to the probe that is not one
    ("postgresql", "off", fs.pg_query_answer(fs.pg_data_row(*[b"\xff\xfe"] * 6) + fs.PG_READY_IDLE),
     "ValueError: probe column in_recovery"),
    ("postgresql", "off", fs.pg_query_answer(fs.pg_message(b"D", b"\x00\x06\x00\x00") + fs.PG_READY_IDLE), "."),
    ("postgresql", "off", fs.pg_query_answer(fs.PG_READY_IDLE), "0 rows"),
    ("postgresql", "off", fs.pg_query_answer(fs.pg_message(b"E", b"garbage") + fs.PG_READY_IDLE), "."),
    ("postgresql", "off", fs.pg_query_answer(fs.pg_data_row(b"f", b"1", None, None, b"0", b"x") + fs.PG_READY_IDLE),
     "timeline"),
    ("mysql", "off", fs.close_at_once(), "closed the connection"),
    ("mysql", "off", fs.silent(), "timed out"),
    ("mysql", "off", fs.garbage(), "."),
    ("mysql", "off", fs.mysql_huge_packet(), "."),
    ("mysql", "off", fs.mysql_malformed_greeting(), "(?i)malformed|protocol"),
    ("mysql", "off", fs.mysql_greeting_then_garbage(), "."),
    ("mysql", "require", fs.mysql_ssl_then_garbage(), "TLS handshake"),
    ("mysql", "off", fs.mysql_query_answer(fs.mysql_packet(1, b"\x05") + fs.garbage_bytes(64)), "timed out"),
    ("mysql", "off", fs.mysql_query_answer(fs.mysql_packet(1, b"\x00\x00\x00\x02\x00\x00\x00")),
     "unexpected answer"),
]


@pytest.fixture(params=range(len(CASES)), ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def case(request: pytest.FixtureRequest) -> Iterator[tuple[ClusterRuntime, fs.FakeServer, str]]:
    protocol, tls, script, expected = CASES[request.param]
    with fs.FakeServer(script) as fake:
        cfg = parse_config({"clusters": [{
            "name": "c", "protocol": protocol, "backend_tls": tls, "health_check_interval_ms": 100,
            # the scripted servers log the probe in without a password ("trust")
            **({"backend_auth": ["scram-sha-256", "trust"]} if protocol == "postgresql" else {}),
            "users": [{"name": "u", "password": "p"}],
            "instances": [{"name": "fake", "host": "127.0.0.1", "port": fake.port}],
            "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer"}],
        }]}).clusters[0]
        yield ClusterRuntime(cfg), fake, expected


async def test_a_hostile_server_is_a_failed_probe(case: tuple[ClusterRuntime, fs.FakeServer, str]) -> None:
    rt, fake, expected = case
    # As if it had answered before: the normal probe timeout (1 s) applies.
    rt._apply(rt.topology.probe_succeeded("fake", trio.current_time(), result=ProbeResult(True)))
    with trio.fail_after(10):
        conn = await rt.probe_once("fake", None)
    assert conn is None
    st = rt.topology.instances["fake"]
    assert st.health is Health.DOWN
    assert st.last_error and re.search(expected, st.last_error), st.last_error
    assert fake.connections >= 1


@pytest.mark.parametrize(("protocol", "script"), [
    ("postgresql", fs.garbage()),
    ("postgresql", fs.pg_ssl_then_garbage()),
    ("mysql", fs.mysql_malformed_greeting()),
    ("mysql", fs.mysql_ssl_then_garbage()),
])
async def test_the_monitor_keeps_probing_a_hostile_server(protocol: str, script: list[fs.Step]) -> None:
    with fs.FakeServer(script) as fake:
        cfg = parse_config({"clusters": [{
            "name": "c", "protocol": protocol, "backend_tls": "require", "health_check_interval_ms": 100,
            "users": [{"name": "u", "password": "p"}],
            "instances": [{"name": "fake", "host": "127.0.0.1", "port": fake.port}],
            "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer"}],
        }]}).clusters[0]
        rt = ClusterRuntime(cfg)
        with trio.move_on_after(1.0):
            await rt.monitor_instance("fake")
        assert rt.topology.instances["fake"].health is Health.DOWN
        assert fake.connections >= 3  # one per interval: it kept going
