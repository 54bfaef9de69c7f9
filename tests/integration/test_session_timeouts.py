"""Session timeouts (the janitor, server/janitor.py) against a real server: a statement past
query_timeout_ms is cancelled (57014) and the session goes on; a session idle inside a transaction
past idle_transaction_timeout_ms gets FATAL 25P03 and is closed; one idle past
client_idle_timeout_ms gets FATAL 57P05. In session and in transaction pool mode."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.pg import messages as m
from tests.fixtures.pgwire import md5_session, messages, read_all, read_until_ready
from tests.fixtures.proxy import ProxyProcess, free_port, my_proxy_config, pg_proxy_config

pytestmark = pytest.mark.integration

MODES = ["writer", "tx"]


@pytest.fixture(scope="module")
def timeout_proxy(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    # (pg_proxy made md5user, whom these tests log in as)
    doc = pg_proxy_config(pg_cluster, query_timeout_ms=400, idle_transaction_timeout_ms=800,
                          client_idle_timeout_ms=2500)
    doc.pop("tls", None)
    doc["clusters"][0]["endpoints"] = [
        {"name": "writer", "listen": f"127.0.0.1:{free_port()}", "kind": "writer"},
        {"name": "tx", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "pool_mode": "transaction"},
    ]
    with ProxyProcess(doc, tmp_path_factory.mktemp("timeouts")) as proxy:
        yield proxy


def errors(msgs: list[m.Message]) -> list[tuple[str, str]]:
    return [(e.severity, e.sqlstate) for e in msgs if isinstance(e, m.ErrorResponse)]


@pytest.mark.parametrize("endpoint", MODES)
def test_a_long_statement_is_cancelled_and_the_session_goes_on(timeout_proxy: ProxyProcess, endpoint: str) -> None:
    s, _ = md5_session(timeout_proxy, endpoint)
    with s:
        started = time.monotonic()
        s.sendall(m.Query("select pg_sleep(10)").encode())
        assert errors(read_until_ready(s, timeout=8)) == [("ERROR", "57014")]
        assert time.monotonic() - started < 8
        s.sendall(m.Query("select 42").encode())
        assert [x.values for x in read_until_ready(s) if isinstance(x, m.DataRow)] == [(b"42",)]


@pytest.mark.parametrize("endpoint", MODES)
def test_idle_in_transaction_ends_the_session(timeout_proxy: ProxyProcess, endpoint: str) -> None:
    s, _ = md5_session(timeout_proxy, endpoint)
    with s:
        s.sendall(m.Query("begin").encode() + m.Query("select 1").encode())
        read_until_ready(s, count=2)
        assert errors(messages(read_all(s, timeout=8))) == [("FATAL", "25P03")]  # then the close


@pytest.mark.parametrize("endpoint", MODES)
def test_an_idle_session_is_ended_after_the_client_idle_timeout(timeout_proxy: ProxyProcess,
                                                                endpoint: str) -> None:
    s, _ = md5_session(timeout_proxy, endpoint)
    with s:
        for _ in range(4):  # activity keeps it open past the timeout
            time.sleep(0.9)
            s.sendall(m.Query("select 1").encode())
            read_until_ready(s)
        started = time.monotonic()
        assert errors(messages(read_all(s, timeout=10))) == [("FATAL", "57P05")]
        assert time.monotonic() - started >= 2.0


@pytest.fixture(scope="module")
def my_timeout_proxy(my_cluster: MariaDBCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    doc = my_proxy_config(my_cluster)
    doc["clusters"][0].update(query_timeout_ms=400, idle_transaction_timeout_ms=800, client_idle_timeout_ms=2500)
    doc["clusters"][0]["endpoints"] = [
        {"name": "writer", "listen": f"127.0.0.1:{free_port()}", "kind": "writer"},
        {"name": "tx", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "pool_mode": "transaction"},
    ]
    with ProxyProcess(doc, tmp_path_factory.mktemp("mytimeouts")) as proxy:
        yield proxy


def my_connect(proxy: ProxyProcess, cluster: MariaDBCluster, endpoint: str) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                           password=cluster.app_password, database=cluster.database, autocommit=True,
                           connect_timeout=10, read_timeout=30)


@pytest.mark.parametrize("endpoint", MODES)
def test_mysql_a_long_statement_is_killed_and_the_session_goes_on(my_timeout_proxy: ProxyProcess,
                                                                  my_cluster: MariaDBCluster, endpoint: str) -> None:
    conn = my_connect(my_timeout_proxy, my_cluster, endpoint)
    try:
        with conn.cursor() as cur:
            started = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError) as info:
                cur.execute("SELECT SLEEP(10)")
            assert info.value.args[0] == 1317  # Query execution was interrupted (KILL QUERY)
            assert time.monotonic() - started < 8
            cur.execute("SELECT 42")
            assert cur.fetchone() == (42,)
    finally:
        conn.close()


@pytest.mark.parametrize("endpoint", MODES)
def test_mysql_idle_in_transaction_and_idle_sessions_are_ended(my_timeout_proxy: ProxyProcess,
                                                               my_cluster: MariaDBCluster, endpoint: str) -> None:
    conn = my_connect(my_timeout_proxy, my_cluster, endpoint)
    conn.begin()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    time.sleep(2.0)
    with pytest.raises(pymysql.err.OperationalError) as info:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert info.value.args[0] in (4031, 2013)
    idle = my_connect(my_timeout_proxy, my_cluster, endpoint)
    time.sleep(3.5)
    with pytest.raises(pymysql.err.OperationalError) as info:
        with idle.cursor() as cur:
            cur.execute("SELECT 1")
    assert info.value.args[0] in (4031, 2013)
