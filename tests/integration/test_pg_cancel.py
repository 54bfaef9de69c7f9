"""A CancelRequest through the proxy behaves as PostgreSQL's own: its connection closes only
once the server has taken the cancel, so a client that waits for that close (libpq, asyncpg)
never has the cancel land on its next statement."""

from __future__ import annotations

import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.startup import encode_cancel_request
from tests.fixtures.pgwire import md5_session, read_until_ready
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_workers(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Two worker processes on one port: a cancel may land on the worker without the session."""
    doc = pg_proxy_config(pg_cluster)  # pg_proxy made the md5user these tests log in as
    doc.pop("tls", None)
    doc["server"]["workers"] = 2
    doc["clusters"][0]["endpoints"] = [e for e in doc["clusters"][0]["endpoints"] if e["name"] == "writer"]
    with ProxyProcess(doc, tmp_path_factory.mktemp("two-workers")) as proxy:
        yield proxy


def _cancel_waits_for_the_server(cluster: PostgresCluster, proxy: ProxyProcess) -> None:
    s, key = md5_session(proxy)
    with s:
        s.sendall(m.Query("select pg_sleep(30)").encode())
        wait_until(lambda: cluster.sql(cluster.primary_name, "select count(*) from pg_stat_activity where "
                                       "query = 'select pg_sleep(30)' and state = 'active'") == "1",
                   10, "the statement to run")
        postmaster = cluster.instance(cluster.primary_name).pid()
        assert postmaster is not None
        # A stopped postmaster takes no cancel (the running backend is not stopped).
        os.kill(postmaster, signal.SIGSTOP)
        try:
            with socket.create_connection(("127.0.0.1", proxy.port("writer")), timeout=10) as c:
                c.sendall(encode_cancel_request(key.process_id, key.secret_key))
                c.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    c.recv(1)  # the proxy must not report the cancel done before the server took it
                os.kill(postmaster, signal.SIGCONT)
                c.settimeout(10)
                assert c.recv(1) == b""
        finally:
            os.kill(postmaster, signal.SIGCONT)
        answers = read_until_ready(s)
        errors = [x for x in answers if isinstance(x, m.ErrorResponse)]
        assert [e.sqlstate for e in errors] == ["57014"]
        s.sendall(m.Query("select 42").encode())
        assert [x.values for x in read_until_ready(s) if isinstance(x, m.DataRow)] == [(b"42",)]


def test_a_cancel_is_done_only_when_the_server_took_it(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    _cancel_waits_for_the_server(pg_cluster, pg_proxy)


def test_a_cancel_forwarded_to_another_worker_too(pg_cluster: PostgresCluster, two_workers: ProxyProcess,
                                                   tmp_path: Path) -> None:
    # The kernel spreads the cancel connections over both workers: in four rounds, some land
    # on the worker that does not hold the session (each does with probability 1/2).
    for _ in range(4):
        _cancel_waits_for_the_server(pg_cluster, two_workers)


def test_unknown_keys_are_counted_and_a_guessing_source_is_stopped(pg_cluster: PostgresCluster,
                                                                   tmp_path: Path) -> None:
    doc = pg_proxy_config(pg_cluster)
    doc.pop("tls", None)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    doc["clusters"][0]["endpoints"] = [e for e in doc["clusters"][0]["endpoints"] if e["name"] == "writer"]
    with ProxyProcess(doc, tmp_path) as proxy:
        for guess in range(20):
            with socket.create_connection(("127.0.0.1", proxy.port("writer")), timeout=10) as c:
                c.sendall(encode_cancel_request(4242, guess))
                assert c.recv(1) == b""
        with urllib.request.urlopen(f"http://{doc['admin']['listen']}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'endpoint_proxy_errors_total{cluster="pg",kind="cancel_unknown"} 20.0' in text
        # Past the limit even a right key from that address is dropped: the statement runs out.
        s, key = md5_session(proxy)
        with s:
            s.sendall(m.Query("select pg_sleep(1)").encode())
            with socket.create_connection(("127.0.0.1", proxy.port("writer")), timeout=10) as c:
                c.sendall(encode_cancel_request(key.process_id, key.secret_key))
                assert c.recv(1) == b""
            assert not [x for x in read_until_ready(s) if isinstance(x, m.ErrorResponse)]
