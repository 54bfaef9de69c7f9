"""Failover with a real cluster: kill -9 of the primary, promotion of a replica, sessions move."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: the test destroys it."""
    with PostgresCluster(replicas=2) as c:
        yield c


@pytest.fixture
def proxy(cluster: PostgresCluster, tmp_path: Path) -> Iterator[ProxyProcess]:
    doc = pg_proxy_config(cluster, failover_timeout_ms=20000)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    with ProxyProcess(doc, tmp_path) as p:
        yield p


def _metric(proxy: ProxyProcess, name: str) -> float:
    """A sample's value from /metrics, parsed with prometheus_client's parser (0 when absent)."""
    with urllib.request.urlopen(f"http://{proxy.doc['admin']['listen']}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def _connect(proxy: ProxyProcess, cluster: PostgresCluster, endpoint: str) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                                 password=cluster.app_password, database=cluster.database, ssl=False,
                                 timeout=10)


def _events(log_text: str) -> list[tuple[str, str | None]]:
    """(event, instance) of each JSON line of a proxy log."""
    found = []
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not a JSON line, or one still being written
        if isinstance(event, dict):
            found.append((event.get("event"), event.get("instance")))
    return found


async def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: wait_until(predicate, timeout, what))


def test_kill_primary_then_promote(cluster: PostgresCluster, proxy: ProxyProcess) -> None:
    old, new, other = (i.name for i in cluster.instances)
    new_port = cluster.instance(new).port
    changes_before = _metric(proxy, "endpoint_proxy_writer_changes_total")
    cluster.sql(old, "create table t (id int primary key, v text)", user=cluster.app_user)
    cluster.wait_caught_up(new, other)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sessions = []
        for i in range(20):
            conn = await _connect(proxy, cluster, "writer")
            await conn.execute(f"set application_name = 'idle-{i}'")
            await conn.execute(f"set myapp.tag = 'tag-{i}'")
            stmt = await conn.prepare("select $1::int * 10, current_setting('myapp.tag')")
            assert await stmt.fetchrow(i) == (i * 10, f"tag-{i}")
            sessions.append((conn, stmt))
        # readwrite sessions: one left on its writer backend, one on its reader backend.
        rw_on_writer = await _connect(proxy, cluster, "rw")
        rw_on_reader = await _connect(proxy, cluster, "rw")
        for conn in (rw_on_writer, rw_on_reader):
            await conn.execute("set myapp.tag = 'rw'")
            await conn.execute("insert into t values (100 + $1, 'rw') on conflict do nothing", id(conn) % 1000)
        assert await rw_on_reader.fetchval("select pg_is_in_recovery()") is True
        in_tx = await _connect(proxy, cluster, "writer")
        tx = in_tx.transaction()
        await tx.start()
        await in_tx.execute("insert into t values (1, 'lost?')")

        read_failures: list[BaseException] = []
        reads = 0
        stop = asyncio.Event()

        async def reader_load() -> None:
            nonlocal reads
            conns = [await _connect(proxy, cluster, "reader") for _ in range(2)]
            try:
                while not stop.is_set():
                    for c in conns:
                        try:
                            assert await c.fetchval("select 1", timeout=15) == 1
                            reads += 1
                        except Exception as e:  # noqa: BLE001 - every failure is counted
                            read_failures.append(e)
                    await asyncio.sleep(0.02)
            finally:
                for c in conns:
                    await c.close()

        load = asyncio.create_task(reader_load())
        await _wait_for(lambda: reads > 20, 10, "reader load to run")

        await loop.run_in_executor(None, cluster.kill, old)
        # A statement sent while there is no writer waits for one.
        waiting_conn = sessions[0][0]
        waiting = asyncio.create_task(waiting_conn.fetchval("select inet_server_port()", timeout=30))
        await _wait_for(lambda: '"instance_down"' in proxy.log() and old in proxy.log(), 10,
                        "the proxy to see the primary down")
        assert not waiting.done()
        await loop.run_in_executor(None, cluster.promote, new)
        assert await asyncio.wait_for(waiting, 20) == new_port
        await loop.run_in_executor(None, cluster.follow, other, new)

        # Every idle session's next statement runs on the new writer, its state intact.
        for i, (conn, stmt) in enumerate(sessions):
            assert await stmt.fetchrow(i) == (i * 10, f"tag-{i}")
            assert await conn.fetchval("select current_setting('application_name')") == f"idle-{i}"
            assert await conn.fetchval("select inet_server_port()") == new_port
            assert await conn.fetchval("select pg_is_in_recovery()") is False
        await sessions[1][0].execute("insert into t values (2, 'after')")

        for conn in (rw_on_writer, rw_on_reader):
            assert await conn.fetchval("insert into t values (500 + $1, 'after') returning inet_server_port()",
                                       id(conn) % 1000) == new_port
            assert await conn.fetchval("select current_setting('myapp.tag')") == "rw"
            await conn.close()

        # The open transaction learns its outcome is unknown, and goes on after ROLLBACK.
        with pytest.raises(asyncpg.PostgresError) as info:
            await in_tx.execute("insert into t values (3, 'in tx')")
        assert info.value.sqlstate == "08007"
        await tx.rollback()
        assert await in_tx.fetchval("select inet_server_port()") == new_port
        assert await in_tx.fetchval("select count(*) from t where id = 2") == 1

        await _wait_for(lambda: reads > 60, 10, "more reads after the failover")
        stop.set()
        await load
        assert read_failures == []
        for conn, _ in sessions:
            await conn.close()
        await in_tx.close()

    try:
        asyncio.run(main())
    finally:
        print(proxy.log()[-4000:])
    assert '"session_reattached"' in proxy.log()
    # the failover shows in the metrics: the writer became another instance, one failover timed
    assert _metric(proxy, "endpoint_proxy_writer_changes_total") >= changes_before + 1
    assert _metric(proxy, "endpoint_proxy_failover_duration_seconds_count") >= 1
    assert _metric(proxy, "endpoint_proxy_errors_total") >= 1


def test_hung_primary_is_detected_and_old_primary_is_fenced(cluster: PostgresCluster, tmp_path: Path) -> None:
    old, new, other = (i.name for i in cluster.instances)
    with ProxyProcess(pg_proxy_config(cluster, failover_timeout_ms=1500), tmp_path) as proxy:
        _hung_then_fenced(cluster, proxy, old, new)


def _hung_then_fenced(cluster: PostgresCluster, proxy: ProxyProcess, old: str, new: str) -> None:
    async def writer_port() -> int:
        conn = await _connect(proxy, cluster, "writer")
        try:
            return int(await conn.fetchval("select inet_server_port()"))
        finally:
            await conn.close()

    # Start from a settled topology (a slow first probe may have marked it down already),
    # and look only at what the proxy logs from then on.
    wait_until(lambda: asyncio.run(writer_port()) == cluster.instance(old).port, 10, "the writer to be known")
    mark = len(proxy.log())
    cluster.sigstop(old)
    try:
        wait_until(lambda: ("instance_down", old) in _events(proxy.log()[mark:]), 5,
                   "a SIGSTOPped primary to be declared down")
    finally:
        cluster.sigcont(old)

    def writer_back() -> bool:
        events = _events(proxy.log()[mark:])
        writers = [e for e in events if e[0] == "writer_changed"]
        return ("instance_up", old) in events and writers[-1:] == [("writer_changed", old)]

    wait_until(writer_back, 5, "the writer to come back after SIGCONT")
    assert asyncio.run(writer_port()) == cluster.instance(old).port

    # Promote a replica while the old primary stays writable: it has the lower timeline
    # and must be fenced, never receiving a write.
    cluster.promote(new)
    wait_until(lambda: '"instance_fenced"' in proxy.log(), 10, "the old primary to be fenced")

    async def main() -> None:
        for _ in range(5):
            conn = await _connect(proxy, cluster, "writer")
            try:
                assert await conn.fetchval("select inet_server_port()") == cluster.instance(new).port
            finally:
                await conn.close()

    asyncio.run(main())

    async def fenced_only() -> None:
        # custom_any excludes pg1 and pg2: only the fenced old primary is left, and it is never used.
        conn = await _connect(proxy, cluster, "custom_any")
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(fenced_only())
    assert info.value.sqlstate == "08006"


def test_paused_replica_leaves_the_reader_endpoint(cluster: PostgresCluster, tmp_path: Path) -> None:
    primary, r1, r2 = (i.name for i in cluster.instances)
    doc = pg_proxy_config(cluster, max_replica_lag_ms=300)
    with ProxyProcess(doc, tmp_path) as proxy:
        cluster.sql(r1, "select pg_wal_replay_pause()")
        cluster.sql(primary, "create table lagging (x int)", user=cluster.app_user)

        async def reader_ports(n: int) -> set[int]:
            ports = set()
            for _ in range(n):
                conn = await _connect(proxy, cluster, "reader")
                try:
                    ports.add(int(await conn.fetchval("select inet_server_port()")))
                finally:
                    await conn.close()
            return ports

        def only_r2() -> bool:
            cluster.sql(primary, "insert into lagging values (1)", user=cluster.app_user)
            return asyncio.run(reader_ports(4)) == {cluster.instance(r2).port}

        wait_until(only_r2, 10, "the paused replica to leave the reader endpoint")
        cluster.sql(r1, "select pg_wal_replay_resume()")
        wait_until(lambda: asyncio.run(reader_ports(4)) == {cluster.instance(r1).port, cluster.instance(r2).port},
                   10, "the resumed replica to come back")


def test_failover_with_pools(cluster: PostgresCluster, tmp_path: Path) -> None:
    """Transaction mode: idle clients keep their sessions (settings, prepared statements) across a
    failover without an error; a borrowed transaction gets 08007 and goes on after ROLLBACK."""
    old, new, other = (i.name for i in cluster.instances)
    new_port = cluster.instance(new).port
    cluster.sql(old, "create table t (id int primary key, v text)", user=cluster.app_user)
    cluster.wait_caught_up(new, other)
    doc = pg_proxy_config(cluster, failover_timeout_ms=20000, pool_size=4)
    doc["clusters"][0]["endpoints"].append(
        {"name": "tx", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "pool_mode": "transaction"})

    async def main(proxy: ProxyProcess) -> None:
        loop = asyncio.get_running_loop()
        sessions = []
        for i in range(12):
            conn = await _connect(proxy, cluster, "tx")
            await conn.execute(f"set myapp.tag = 'tag-{i}'")
            stmt = await conn.prepare("select $1::int * 10, current_setting('myapp.tag')")
            assert await stmt.fetchrow(i) == (i * 10, f"tag-{i}")
            sessions.append((conn, stmt))
        in_tx = await _connect(proxy, cluster, "tx")
        tx = in_tx.transaction()
        await tx.start()
        await in_tx.execute("insert into t values (1, 'lost?')")

        await loop.run_in_executor(None, cluster.kill, old)
        waiting = asyncio.create_task(sessions[0][0].fetchval("select inet_server_port()", timeout=30))
        await _wait_for(lambda: '"instance_down"' in proxy.log(), 10, "the proxy to see the primary down")
        await loop.run_in_executor(None, cluster.promote, new)
        assert await asyncio.wait_for(waiting, 20) == new_port
        await loop.run_in_executor(None, cluster.follow, other, new)

        for i, (conn, stmt) in enumerate(sessions):
            assert await stmt.fetchrow(i) == (i * 10, f"tag-{i}")
            assert await conn.fetchval("select inet_server_port()") == new_port
        with pytest.raises(asyncpg.PostgresError) as info:
            await in_tx.execute("insert into t values (3, 'in tx')")
        assert info.value.sqlstate == "08007"
        await tx.rollback()
        await in_tx.execute("insert into t values (2, 'after')")
        assert await in_tx.fetchval("select count(*) from t where id = 2") == 1
        for conn, _ in sessions:
            await conn.close()
        await in_tx.close()
        pooled = int(cluster.sql(new, f"select count(*) from pg_stat_activity where usename = '{cluster.app_user}' "
                                      "and backend_type = 'client backend'", database="postgres"))
        assert pooled <= 4

    with ProxyProcess(doc, tmp_path) as proxy:
        try:
            asyncio.run(main(proxy))
        finally:
            print(proxy.log()[-4000:])
