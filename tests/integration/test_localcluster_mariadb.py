"""The local MariaDB cluster: roles, GTID replication, logins and the fault helpers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster, MyCommandError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[MariaDBCluster]:
    with MariaDBCluster(replicas=2) as c:
        yield c


def poll(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def fetchone(kw: dict[str, Any], query: str, timeout: float = 5.0) -> Any:
    conn = pymysql.connect(**kw, connect_timeout=timeout, read_timeout=timeout)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()
    finally:
        conn.close()


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def row_arrived(c: MariaDBCluster, name: str, query: str, expected: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return c.sql(name, query) == expected
        except MyCommandError:  # table not replicated yet
            return False

    return check


def test_roles_and_replication(cluster: MariaDBCluster) -> None:
    assert [i.name for i in cluster.instances] == ["my0", "my1", "my2"]
    assert cluster.primary_name == "my0"
    assert len({i.port for i in cluster.instances}) == 3
    assert all(i.port != 3306 and i.pid() is not None for i in cluster.instances)
    assert cluster.sql("my0", "SELECT @@read_only") == "0"
    assert cluster.sql("my0", "SHOW SLAVE STATUS") == ""
    for name in ("my1", "my2"):
        assert cluster.sql(name, "SELECT @@read_only") == "1"
        status = cluster.replication_status(name)
        assert (status["Slave_IO_Running"], status["Slave_SQL_Running"]) == ("Yes", "Yes")
        assert status["Using_Gtid"] == "Slave_Pos"
        assert status["Master_Port"] == str(cluster.instance("my0").port)
    server_ids = {cluster.sql(i.name, "SELECT @@server_id") for i in cluster.instances}
    assert len(server_ids) == 3


def test_writes_replicate(cluster: MariaDBCluster) -> None:
    cluster.sql("my0", "CREATE TABLE replicated (id int PRIMARY KEY, v text)", user="app")
    cluster.sql("my0", "INSERT INTO replicated VALUES (1, 'hello')", user="app")
    for replica in ("my1", "my2"):
        poll(row_arrived(cluster, replica, "SELECT v FROM replicated WHERE id = 1", "hello"), what=replica)
    with pytest.raises(MyCommandError, match="read-only") as excinfo:
        cluster.sql("my1", "INSERT INTO replicated VALUES (2, 'nope')", user="app")
    assert excinfo.value.errno == 1290
    cluster.wait_caught_up()
    pos = cluster.sql("my0", "SELECT @@gtid_binlog_pos")
    assert cluster.sql("my2", "SELECT @@gtid_slave_pos") == pos


def test_app_login(cluster: MariaDBCluster) -> None:
    user, db = fetchone(cluster.dsn("my0"), "SELECT current_user(), database()")
    assert user.split("@")[0] == "app" and db == "app"
    assert fetchone(cluster.dsn("my2"), "SELECT @@read_only") == (1,)
    with pytest.raises(pymysql.err.OperationalError) as excinfo:
        fetchone(cluster.dsn("my0", password="wrong"), "SELECT 1")
    assert excinfo.value.args[0] == 1045
    # Root has no TCP account: only the unix socket.
    with pytest.raises(pymysql.err.OperationalError) as excinfo:
        fetchone(cluster.dsn("my0", user="root", database=""), "SELECT 1")
    assert excinfo.value.args[0] == 1045


def test_port_per_instance(cluster: MariaDBCluster) -> None:
    for inst in cluster.instances:
        assert fetchone(cluster.dsn(inst.name), "SELECT @@port") == (inst.port,)
        assert cluster.sql(inst.name, "SELECT @@port") == str(inst.port)


def test_monitor_user(cluster: MariaDBCluster) -> None:
    kw = cluster.dsn("my1", user="monitor", database="")
    conn = pymysql.connect(**kw, connect_timeout=5, read_timeout=5, cursorclass=pymysql.cursors.DictCursor)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW ALL SLAVES STATUS")
            rows = cur.fetchall()
            assert len(rows) == 1 and rows[0]["Slave_IO_Running"] == "Yes"
            cur.execute("SHOW SLAVE STATUS")
            assert cur.fetchone()["Using_Gtid"] == "Slave_Pos"
            cur.execute("SELECT @@gtid_binlog_pos AS b, @@gtid_slave_pos AS s, @@gtid_current_pos AS c")
            row = cur.fetchone()
            assert row["s"] and row["b"] == row["s"] == row["c"]
    finally:
        conn.close()


def test_faults_promote_and_follow() -> None:
    with MariaDBCluster(replicas=2) as c:
        my0, my1 = c.instance("my0"), c.instance("my1")
        c.sql("my0", "CREATE TABLE t (v int PRIMARY KEY); INSERT INTO t VALUES (1)")
        c.wait_caught_up()

        # A hung server: connections time out while stopped, work after SIGCONT.
        c.sigstop("my1")
        with pytest.raises(pymysql.err.OperationalError):
            fetchone(c.dsn("my1"), "SELECT 1", timeout=1)
        c.sigcont("my1")
        assert fetchone(c.dsn("my1"), "SELECT 1") == (1,)

        # A crash of the primary: nothing listens afterwards.
        c.kill("my0")
        assert my0.pid() is None
        assert port_refuses(my0.port)
        c.kill("my0")  # already dead: no error

        # Failover: my1 is promoted and my2 follows it.
        c.promote("my1")
        assert c.primary_name == "my1"
        assert c.sql("my1", "SELECT @@read_only") == "0"
        assert c.replication_status("my1") == {}
        c.follow("my2", "my1")
        assert c.replication_status("my2")["Master_Port"] == str(my1.port)
        c.sql("my1", "INSERT INTO t VALUES (2)", user="app")
        poll(row_arrived(c, "my2", "SELECT count(*) FROM t", "2"), what="my2 following my1")
        assert c.sql("my2", "SELECT @@read_only") == "1"

        # The old primary comes back as it was (writable), then rejoins as a replica.
        c.restart("my0")
        assert my0.pid() is not None
        assert c.sql("my0", "SELECT count(*) FROM t") == "1"
        assert fetchone(c.dsn("my0"), "SELECT @@port, @@read_only") == (my0.port, 0)
        c.follow("my0", "my1")
        c.wait_caught_up("my0", "my2")
        assert c.sql("my0", "SELECT count(*) FROM t") == "2"
        assert c.sql("my0", "SELECT @@read_only") == "1"

        # A clean stop and restart of a replica: it keeps replicating from my1.
        c.stop_instance("my2")
        assert port_refuses(c.instance("my2").port)
        c.restart("my2")
        c.wait_replicating("my2")
        c.sql("my1", "INSERT INTO t VALUES (3)")
        c.wait_caught_up()
        assert c.sql("my2", "SELECT count(*) FROM t") == "3"

        root = c.root_dir
        assert root is not None
    assert not root.exists()
    c.stop()  # idempotent
