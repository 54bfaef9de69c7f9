"""Misbehaving clients get a clear FATAL (or a closed socket) and never disturb other sessions."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import time
from collections.abc import Iterator

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.startup import encode_ssl_request, encode_startup_message
from tests.fixtures.pgwire import md5_login, messages, open_socket, read_all
from tests.fixtures.proxy import ProxyProcess

pytestmark = pytest.mark.integration


def fatal(data: bytes) -> m.ErrorResponse:
    msgs = messages(data)
    errors = [x for x in msgs if isinstance(x, m.ErrorResponse)]
    assert errors, f"expected an ErrorResponse, got {msgs!r}"
    assert errors[-1].severity == "FATAL"
    return errors[-1]


@pytest.fixture
def bystander(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> Iterator[None]:
    """A healthy session open across the test; it must still work afterwards."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(
        host="127.0.0.1", port=pg_proxy.port("writer"), user=pg_cluster.app_user,
        password=pg_cluster.app_password, database=pg_cluster.database, ssl=False))
    try:
        yield
        assert loop.run_until_complete(conn.fetchval("select 41 + 1")) == 42
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def test_ssl_request_followed_by_plaintext_is_refused(pg_proxy: ProxyProcess, bystander: None) -> None:
    with open_socket(pg_proxy) as s:
        s.sendall(encode_ssl_request() + encode_startup_message({"user": "app", "database": "app"}))
        data = read_all(s)
    assert not data.startswith(b"S")
    assert fatal(data).sqlstate == "08P01"


@pytest.mark.parametrize("length", [0, 3, 0x7FFFFFFF, 10_001])
def test_impossible_startup_length_closes_at_once(pg_proxy: ProxyProcess, bystander: None, length: int) -> None:
    with open_socket(pg_proxy) as s:
        started = time.monotonic()
        s.sendall(struct.pack("!I", length) + b"\x00\x03\x00\x00")
        assert read_all(s) == b""
        assert time.monotonic() - started < 2


def test_startup_timeout(pg_proxy: ProxyProcess, bystander: None) -> None:
    # The fixture's startup_timeout_ms is 2000: a silent client is dropped after it.
    with open_socket(pg_proxy) as s:
        started = time.monotonic()
        assert read_all(s, timeout=10) == b""
        assert 1.5 < time.monotonic() - started < 8


@pytest.mark.parametrize(("params", "sqlstate"), [
    ({"user": "", "database": "app"}, "28000"),
    ({"database": "app"}, "28000"),
    ({"user": "u" * 100, "database": "app"}, "42622"),
    ({"user": "app", "database": "d" * 100}, "42622"),
])
def test_bad_names_get_fatal(pg_proxy: ProxyProcess, bystander: None, params: dict[str, str], sqlstate: str) -> None:
    with open_socket(pg_proxy) as s:
        s.sendall(encode_startup_message(params))
        assert fatal(read_all(s)).sqlstate == sqlstate


def test_replication_connections_need_an_endpoint_that_allows_them(pg_proxy: ProxyProcess, pg_cluster: PostgresCluster,
                                                                   bystander: None) -> None:
    params = {"user": "app", "database": "app", "replication": "database"}
    with open_socket(pg_proxy) as s:
        s.sendall(encode_startup_message(params))
        error = fatal(read_all(s))
        assert error.sqlstate == "08P01" and "allow_replication" in error.message
    # Where it is allowed, the server decides (here: the user lacks the REPLICATION attribute).
    out = subprocess.run(["psql", f"host=127.0.0.1 port={pg_proxy.port('repl')} user={pg_cluster.app_user} "
                          f"password={pg_cluster.app_password} dbname={pg_cluster.database} replication=database "
                          "sslmode=disable", "-c", "IDENTIFY_SYSTEM"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "replication role" in out.stderr, out.stderr


def test_unsupported_protocol_version(pg_proxy: ProxyProcess, bystander: None) -> None:
    with open_socket(pg_proxy) as s:
        s.sendall(encode_startup_message({"user": "app"}, protocol_version=(2 << 16)))
        assert fatal(read_all(s)).sqlstate == "0A000"


def test_second_startup_message_during_authentication(pg_proxy: ProxyProcess, bystander: None) -> None:
    with open_socket(pg_proxy) as s:
        s.sendall(encode_startup_message({"user": "app", "database": "app"}))
        s.settimeout(5)
        first = s.recv(4096)
        assert isinstance(messages(first)[0], m.AuthenticationSASL)
        s.sendall(encode_startup_message({"user": "app", "database": "app"}))
        assert fatal(read_all(s)).sqlstate == "08P01"


def test_malformed_scram_message(pg_proxy: ProxyProcess, bystander: None) -> None:
    with open_socket(pg_proxy) as s:
        s.sendall(encode_startup_message({"user": "app", "database": "app"}))
        s.settimeout(5)
        s.recv(4096)
        s.sendall(m.SASLInitialResponse("SCRAM-SHA-256", b"this is not scram").encode())
        assert fatal(read_all(s)).sqlstate == "08P01"


def test_huge_message_after_login_closes_only_that_session(pg_proxy: ProxyProcess, bystander: None) -> None:
    s = md5_login(pg_proxy)
    with s:
        s.sendall(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"select 1")
        started = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - started < 2


def test_length_below_four_after_login(pg_proxy: ProxyProcess, bystander: None) -> None:
    s = md5_login(pg_proxy)
    with s:
        s.sendall(b"Q" + struct.pack("!I", 2))
        assert read_all(s) == b""
