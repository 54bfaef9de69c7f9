"""MySQL failover: kill -9 of the MariaDB primary, promotion, sessions keep their state."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from tests.fixtures.proxy import ProxyProcess, my_proxy_config, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[MariaDBCluster]:
    with MariaDBCluster(replicas=2) as c:
        yield c


def _connect(proxy: ProxyProcess, cluster: MariaDBCluster, endpoint: str) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                           password=cluster.app_password, database=cluster.database, autocommit=True,
                           connect_timeout=10, read_timeout=30)


def _one(conn: pymysql.Connection, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        return row[0] if row else None


def test_kill_primary_then_promote(cluster: MariaDBCluster, tmp_path: Path) -> None:
    old, new, other = (i.name for i in cluster.instances)
    cluster.sql(old, "CREATE TABLE t (id INT PRIMARY KEY)", database=cluster.database)
    cluster.wait_caught_up(new, other)
    with ProxyProcess(my_proxy_config(cluster, failover_timeout_ms=20000), tmp_path) as proxy:
        sessions = []
        for i in range(10):
            conn = _connect(proxy, cluster, "writer")
            with conn.cursor() as cur:
                cur.execute(f"SET @tag = 'tag-{i}'")
                cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
            sessions.append(conn)
        in_tx = _connect(proxy, cluster, "writer")
        in_tx.begin()
        with in_tx.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1)")
        readers = [_connect(proxy, cluster, "reader") for _ in range(2)]
        read_errors: list[BaseException] = []
        rounds = [0]  # read rounds the loader finished (only the loader thread uses `readers`)
        stop = threading.Event()

        def read_load() -> None:
            while not stop.is_set():
                for r in readers:
                    try:
                        assert _one(r, "SELECT 1") == 1
                    except Exception as e:  # noqa: BLE001 - every failure counts
                        read_errors.append(e)
                rounds[0] += 1
                stop.wait(0.02)

        loader = threading.Thread(target=read_load)
        loader.start()
        try:
            cluster.kill(old)
            result: dict[str, Any] = {}

            def waiting_statement() -> None:
                result["port"] = _one(sessions[0], "SELECT @@port")

            waiter = threading.Thread(target=waiting_statement)
            waiter.start()
            wait_until(lambda: '"instance_down"' in proxy.log(), 10, "the proxy to see the primary down")
            cluster.promote(new)
            waiter.join(20)
            assert result.get("port") == cluster.instance(new).port
            cluster.follow(other, new)
            for i, conn in enumerate(sessions):
                with conn.cursor() as cur:
                    cur.execute("SELECT @tag, @@sql_mode, @@port")
                    assert cur.fetchone() == (f"tag-{i}", "ANSI_QUOTES", cluster.instance(new).port)
            with pytest.raises(pymysql.err.MySQLError) as info:
                with in_tx.cursor() as cur:
                    cur.execute("INSERT INTO t VALUES (2)")
            assert info.value.args[0] == 1927
            in_tx.rollback()
            assert _one(in_tx, "SELECT @@port") == cluster.instance(new).port
            mark = rounds[0]
            wait_until(lambda: rounds[0] >= mark + 3, 5, "reads after failover")
        finally:
            stop.set()
            loader.join(10)
        assert read_errors == []
        for conn in [*sessions, in_tx, *readers]:
            conn.close()
        assert '"session_reattached"' in proxy.log()

        # The old primary comes back writable: its binlog history is older (it never saw the
        # new primary's GTIDs), so it is fenced and writes keep going to the new primary.
        cluster.sql(new, "INSERT INTO t VALUES (10)", database=cluster.database)
        cluster.restart(old)
        assert cluster.sql(old, "SELECT @@read_only") == "0"
        wait_until(lambda: '"instance_fenced"' in proxy.log(), 10, "the old primary to be fenced")
        conn = _connect(proxy, cluster, "writer")
        try:
            assert _one(conn, "SELECT @@port") == cluster.instance(new).port
        finally:
            conn.close()
