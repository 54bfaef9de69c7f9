"""The local PostgreSQL cluster: roles, replication, SCRAM logins and the fault helpers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PgCommandError, PostgresCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster(replicas=2) as c:
        yield c


def poll(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def fetchval(dsn: str, query: str, **kwargs: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(dsn, **kwargs)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(go())


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_roles_and_streaming(cluster: PostgresCluster) -> None:
    assert [i.name for i in cluster.instances] == ["pg0", "pg1", "pg2"]
    assert cluster.primary_name == "pg0"
    assert len({i.port for i in cluster.instances}) == 3
    assert all(i.port != 5432 and i.pid() is not None for i in cluster.instances)
    assert cluster.sql("pg0", "SELECT pg_is_in_recovery()") == "f"
    assert cluster.sql("pg1", "SELECT pg_is_in_recovery()") == "t"
    assert cluster.sql("pg2", "SELECT pg_is_in_recovery()") == "t"
    streaming = cluster.sql("pg0", "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
    assert sorted(streaming.split()) == ["pg1", "pg2"]


def test_writes_replicate(cluster: PostgresCluster) -> None:
    cluster.sql("pg0", "CREATE TABLE replicated (id int PRIMARY KEY, v text)", user="app")
    cluster.sql("pg0", "INSERT INTO replicated VALUES (1, 'hello')", user="app")
    for replica in ("pg1", "pg2"):

        def arrived(replica: str = replica) -> bool:
            try:
                return cluster.sql(replica, "SELECT v FROM replicated WHERE id = 1") == "hello"
            except PgCommandError:  # table not replayed yet
                return False

        poll(arrived, what=f"row on {replica}")
    with pytest.raises(PgCommandError, match="read-only"):
        cluster.sql("pg1", "INSERT INTO replicated VALUES (2, 'nope')", user="app")


def test_scram_login(cluster: PostgresCluster) -> None:
    assert fetchval(cluster.dsn("pg0"), "SELECT current_user", ssl=False) == "app"
    assert fetchval(cluster.dsn("pg2"), "SELECT pg_is_in_recovery()", ssl=False) is True
    stored = cluster.sql("pg0", "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
    assert stored.startswith("SCRAM-SHA-256$")
    # The app user may also connect to the postgres database.
    assert fetchval(cluster.dsn("pg0", database="postgres"), "SELECT 1", ssl=False) == 1
    with pytest.raises(asyncpg.InvalidPasswordError):
        fetchval(cluster.dsn("pg0", password="wrong"), "SELECT 1", ssl=False)


def test_monitor_user(cluster: PostgresCluster) -> None:
    dsn = cluster.dsn("pg0", user="monitor", database="postgres")
    # pg_monitor sees the replication columns that are hidden from ordinary users.
    lsn = fetchval(dsn, "SELECT min(replay_lsn::text) FROM pg_stat_replication", ssl=False)
    assert lsn is not None


def test_faults_promote_and_follow() -> None:
    with PostgresCluster(replicas=2) as c:
        pg0 = c.instance("pg0")

        # A crash: nothing listens afterwards; the data directory survives a restart.
        c.sql("pg0", "CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        c.wait_caught_up()
        c.kill("pg0")
        assert pg0.pid() is None
        assert port_refuses(pg0.port)
        c.kill("pg0")  # already dead: no error
        c.restart("pg0")
        assert c.sql("pg0", "SELECT count(*) FROM t") == "1"
        assert fetchval(c.dsn("pg0"), "SELECT 1", ssl=False) == 1
        c.wait_streaming("pg1", "pg2", timeout=15)

        # A hung server: connections time out while stopped, work after SIGCONT.
        c.sigstop("pg1")
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            fetchval(c.dsn("pg1"), "SELECT 1", ssl=False, timeout=1)
        c.sigcont("pg1")
        assert fetchval(c.dsn("pg1"), "SELECT 1", ssl=False, timeout=5) == 1

        # Failover: the primary dies, pg1 is promoted and pg2 follows it.
        c.wait_caught_up()
        c.kill("pg0")
        c.promote("pg1")
        assert c.primary_name == "pg1"
        assert c.sql("pg1", "SELECT pg_is_in_recovery()") == "f"
        c.follow("pg2", "pg1")
        c.sql("pg1", "INSERT INTO t VALUES (2)")
        poll(lambda: c.sql("pg2", "SELECT count(*) FROM t") == "2", what="pg2 following pg1")
        assert c.sql("pg2", "SELECT pg_is_in_recovery()") == "t"
        assert c.sql("pg2", "SELECT received_tli FROM pg_stat_wal_receiver") == "2"

        root = c.root_dir
        assert root is not None
    assert not root.exists()
    c.stop()  # idempotent


def test_ssl_and_stop_instance() -> None:
    with PostgresCluster(replicas=0, ssl=True) as c:
        assert c.ssl_cert.is_file() and c.ssl_key.is_file()
        ctx = ssl.create_default_context(cafile=str(c.ssl_cert))
        used = fetchval(c.dsn("pg0"), "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", ssl=ctx)
        assert used is True
        c.stop_instance("pg0")
        assert c.instance("pg0").pid() is None
        assert port_refuses(c.instance("pg0").port)
        c.restart("pg0")
        assert fetchval(c.dsn("pg0"), "SELECT 1", ssl=False) == 1
