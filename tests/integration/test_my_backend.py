"""Backend connections to real MariaDB servers: login, errors, probe queries, the monitor probe, KILL QUERY."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pymysql
import pytest
import trio

from endpoint_proxy.config import Address
from endpoint_proxy.localcluster.certs import write_self_signed
from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.protocol.mysql.constants import (
    CLIENT_DEPRECATE_EOF,
    CLIENT_MULTI_RESULTS,
    CLIENT_PROTOCOL_41,
    CLIENT_SESSION_TRACK,
    CLIENT_TRANSACTIONS,
    SERVER_STATUS_AUTOCOMMIT,
    UTF8MB4_GENERAL_CI,
)
from endpoint_proxy.server.mysql.backend import (
    MyBackendConnection,
    MyBackendError,
    MyProbeConnection,
    kill_query,
    open_my_backend,
)
from endpoint_proxy.server.mysql.probe import probe_mariadb
from endpoint_proxy.topology.mariadb_probe import gtid_position
from endpoint_proxy.topology.state import ClusterTopology

pytestmark = pytest.mark.integration

READER_PASSWORD = "reader-secret"
CAPS = CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS | CLIENT_MULTI_RESULTS | CLIENT_DEPRECATE_EOF | CLIENT_SESSION_TRACK


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBCluster]:
    cert, key = write_self_signed(tmp_path_factory.mktemp("my-tls"))
    with MariaDBCluster(replicas=2, extra_conf={"ssl_cert": str(cert), "ssl_key": str(key)}) as c:
        c.sql(c.primary_name, "CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)", user=c.app_user)
        # A user who may read every database: it learns that one does not exist (1049), where
        # the app user is refused access to it (1044).
        c.sql(c.primary_name, f"CREATE USER reader@'%' IDENTIFIED BY '{READER_PASSWORD}'; "
                              "GRANT SELECT ON *.* TO reader@'%'", database="")
        c.wait_caught_up()
        yield c


def address(c: MariaDBCluster, name: str) -> Address:
    inst = c.instance(name)
    return Address(inst.host, inst.port)


async def open_app(c: MariaDBCluster, name: str, **kw: object) -> MyBackendConnection:
    args: dict[str, object] = {
        "user": c.app_user, "password": c.app_password, "database": c.database,
        "capabilities": CAPS, "character_set": UTF8MB4_GENERAL_CI,
    }
    args.update(kw)
    with trio.fail_after(10):
        return await open_my_backend(name, address(c, name), **args)  # type: ignore[arg-type]


async def monitor(c: MariaDBCluster, name: str, tls_mode: str = "off") -> MyProbeConnection:
    with trio.fail_after(10):
        return await MyProbeConnection.open(name, address(c, name), user=c.monitor_user,
                                            password=c.monitor_password, tls_mode=tls_mode)


async def test_app_login_and_thread_id(cluster: MariaDBCluster) -> None:
    backend = await open_app(cluster, "my0", connect_attrs={"program_name": "test_my_backend"})
    conn = MyProbeConnection(backend)
    try:
        assert "MariaDB" in backend.server_version
        assert backend.capabilities & CAPS == CAPS
        assert backend.status & SERVER_STATUS_AUTOCOMMIT
        assert not backend.conn.is_tls
        with trio.fail_after(5):
            rows = await conn.query("SELECT CONNECTION_ID(), DATABASE(), CURRENT_USER()")
        assert rows == [(str(backend.thread_id), cluster.database, f"{cluster.app_user}@127.0.0.1")]
        # A session backend is an ordinary connection: the same queries work over it.
        assert await conn.query("SELECT @@autocommit") == [("1",)]
    finally:
        await conn.aclose()


async def test_wrong_password(cluster: MariaDBCluster) -> None:
    with pytest.raises(MyBackendError) as info:
        await open_app(cluster, "my0", password="not-the-password")
    err = info.value
    assert (err.errno, err.sqlstate) == (1045, "28000")
    assert err.err_payload is not None and err.err_payload[:3] == b"\xff\x15\x04"
    assert "Access denied" in str(err)


async def test_unknown_database(cluster: MariaDBCluster) -> None:
    with pytest.raises(MyBackendError) as info:
        await open_app(cluster, "my0", user="reader", password=READER_PASSWORD, database="no_such_db")
    assert (info.value.errno, info.value.sqlstate) == (1049, "42000")
    assert info.value.err_payload is not None and info.value.err_payload[:3] == b"\xff\x19\x04"
    # A user without rights there is told it may not, whether it exists or not.
    with pytest.raises(MyBackendError) as info:
        await open_app(cluster, "my0", database="no_such_db")
    assert (info.value.errno, info.value.sqlstate) == (1044, "42000")


async def test_unsupported_auth_plugin(cluster: MariaDBCluster) -> None:
    """An account the proxy cannot log in as is refused like a wrong password: with an ERR for the client."""
    cluster.sql("my0", "SET SESSION sql_log_bin = 0; INSTALL SONAME 'auth_ed25519'; "
                       "CREATE USER ed@'%' IDENTIFIED VIA ed25519 USING PASSWORD('ed-secret')", database="")
    with pytest.raises(MyBackendError) as info:
        await open_app(cluster, "my0", user="ed", password="ed-secret", database=None)
    assert info.value.errno == 2059 and "client_ed25519" in str(info.value)
    assert info.value.err_payload is not None and info.value.err_payload[:3] == b"\xff\x0b\x08"


async def test_tls(cluster: MariaDBCluster) -> None:
    conn = await monitor(cluster, "my1", tls_mode="require")
    try:
        assert conn.backend.conn.is_tls
        rows = await conn.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert rows and rows[0][1]
    finally:
        await conn.aclose()
    backend = await open_app(cluster, "my0", tls_mode="prefer")
    try:
        assert backend.conn.is_tls
    finally:
        await backend.conn.aclose()


async def test_monitor_queries(cluster: MariaDBCluster) -> None:
    conn = await monitor(cluster, "my0")
    try:
        with trio.fail_after(5):
            assert await conn.query("SELECT 1, NULL, 'x', ''") == [("1", None, "x", "")]
            results = await conn.query_results("SELECT 1 AS a UNION ALL SELECT 2; DO 0; SELECT 'z' AS b")
            assert [(r.columns, r.rows) for r in results] == [(("a",), [("1",), ("2",)]), (("b",), [("z",)])]
            assert await conn.query_sets("SELECT 1; SELECT 2, 3") == [[("1",)], [("2", "3")]]
            assert await conn.query("SELECT 1 FROM DUAL WHERE 0") == []
            with pytest.raises(MyBackendError) as info:
                await conn.query("SELEKT 1")
            assert info.value.errno == 1064 and info.value.err_payload is not None
            # An error leaves the connection usable.
            assert await conn.query("SELECT 'still here'") == [("still here",)]
    finally:
        await conn.aclose()


async def probe(c: MariaDBCluster, name: str) -> tuple[bool, int | None, int | None, int | None]:
    conn = await monitor(c, name)
    try:
        with trio.fail_after(5):
            r = await probe_mariadb(conn)
        return r.in_recovery, r.current_lsn, r.receive_lsn, r.replay_lsn
    finally:
        await conn.aclose()


async def test_probe_roles_and_positions(cluster: MariaDBCluster) -> None:
    cluster.sql(cluster.primary_name, "INSERT INTO t (v) VALUES (1)", user=cluster.app_user)
    cluster.wait_caught_up()
    in_recovery, current, receive, replay = await probe(cluster, "my0")
    assert not in_recovery and receive is None and replay is None
    assert current == gtid_position(cluster.sql("my0", "SELECT @@gtid_binlog_pos")) and current > 0
    for name in ("my1", "my2"):
        assert await probe(cluster, name) == (True, None, current, current)


async def test_stopped_replica_lags(cluster: MariaDBCluster) -> None:
    cluster.sql("my2", "STOP SLAVE SQL_THREAD", database="")
    try:
        for v in range(3):
            cluster.sql(cluster.primary_name, f"INSERT INTO t (v) VALUES ({v})", user=cluster.app_user)
        _, writer_lsn, _, _ = await probe(cluster, "my0")
        assert writer_lsn is not None
        with trio.fail_after(10):
            while True:  # the IO thread still fetches
                in_recovery, current, receive, replay = await probe(cluster, "my2")
                if receive == writer_lsn:
                    break
                await trio.sleep(0.05)
        assert in_recovery and current is None
        assert replay is not None and replay < writer_lsn
        topo = ClusterTopology(("my0", "my2"))
        for name in ("my0", "my2"):
            conn = await monitor(cluster, name)
            try:
                topo.probe_succeeded(name, trio.current_time(), result=await probe_mariadb(conn))
            finally:
                await conn.aclose()
        assert topo.writer == "my0"
        assert topo.instances["my2"].lag_bytes == writer_lsn - replay == 3
    finally:
        cluster.sql("my2", "START SLAVE SQL_THREAD", database="")
    cluster.wait_caught_up("my2")
    _, _, _, replay = await probe(cluster, "my2")
    assert replay == writer_lsn


async def test_kill_query(cluster: MariaDBCluster) -> None:
    victim = pymysql.connect(**cluster.dsn("my1"), connect_timeout=5, read_timeout=30)
    outcome: list[object] = []

    def sleep_long() -> None:
        start = time.monotonic()
        try:
            with victim.cursor() as cur:
                cur.execute("SELECT SLEEP(10)")
                outcome.append(cur.fetchone())
        except pymysql.err.OperationalError as e:
            outcome.append(e.args[0])  # 1317: query execution was interrupted
        outcome.append(time.monotonic() - start)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, sleep_long)
            watcher = await monitor(cluster, "my1")
            try:
                with trio.fail_after(5):
                    while not await watcher.query(
                        "SELECT 1 FROM information_schema.PROCESSLIST "
                        f"WHERE ID = {victim.thread_id()} AND INFO LIKE 'SELECT SLEEP%'"
                    ):
                        await trio.sleep(0.02)
            finally:
                await watcher.aclose()
            with trio.fail_after(5):
                await kill_query(address(cluster, "my1"), user=cluster.app_user, password=cluster.app_password,
                                 thread_id=victim.thread_id())
        assert outcome[0] in ((1,), 1317)
        assert isinstance(outcome[1], float) and outcome[1] < 5
        # KILL QUERY leaves the connection itself alive.
        with victim.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    finally:
        victim.close()
    with pytest.raises(MyBackendError) as info:
        await kill_query(address(cluster, "my1"), user=cluster.app_user, password=cluster.app_password,
                         thread_id=2**31)
    assert info.value.errno == 1094
