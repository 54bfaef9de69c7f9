"""The readwrite endpoint: one host:port, writes on the writer, reads on replicas, state kept across both."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, pg_proxy_config

pytestmark = pytest.mark.integration


async def _connect(proxy: ProxyProcess, cluster: PostgresCluster, endpoint: str = "rw") -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                                 password=cluster.app_password, database=cluster.database, ssl=False, timeout=10,
                                 command_timeout=30)


def _ports(cluster: PostgresCluster) -> tuple[int, set[int]]:
    writer = cluster.instance(cluster.primary_name).port
    return writer, {i.port for i in cluster.instances if i.port != writer}


def test_writes_on_the_writer_reads_on_replicas(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    writer, replicas = _ports(pg_cluster)

    async def main() -> None:
        conn = await _connect(pg_proxy, pg_cluster)
        try:
            await conn.execute("create table if not exists rw_items (id int primary key, v text)")
            await conn.execute("insert into rw_items values (1, 'a') on conflict (id) do update set v = 'a'")
            await conn.execute("update rw_items set v = 'b' where id = 1")
            assert await conn.fetchval("select inet_server_port()") in replicas
            assert await conn.fetchval("/* endpoint: writer */ select inet_server_port()") == writer
            assert await conn.fetchval("select inet_server_port() from rw_items for update") == writer
            # nextval and the user's volatile function write: never on a replica
            await conn.execute("create sequence if not exists rw_seq")
            assert await conn.fetchval("select nextval('rw_seq') > 0")
            assert await conn.fetchval("select app_bump()") == 1
            await conn.execute("delete from rw_items where id = 1")
        finally:
            await conn.close()

    asyncio.run(main())


def test_transactions_stay_together(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    writer, replicas = _ports(pg_cluster)

    async def main() -> None:
        conn = await _connect(pg_proxy, pg_cluster)
        try:
            async with conn.transaction():
                assert await conn.fetchval("select inet_server_port()") == writer
                assert await conn.fetchval("select inet_server_port()") == writer
            async with conn.transaction(readonly=True):
                port = await conn.fetchval("select inet_server_port()")
                assert port in replicas
                assert await conn.fetchval("select inet_server_port()") == port
            # a failed transaction is rolled back where it ran
            with pytest.raises(asyncpg.UndefinedTableError):
                async with conn.transaction():
                    await conn.execute("select * from no_such_table")
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()

    asyncio.run(main())


def test_session_state_follows_the_session(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    writer, replicas = _ports(pg_cluster)

    async def main() -> None:
        conn = await _connect(pg_proxy, pg_cluster)
        try:
            await conn.execute("set application_name = 'rw-app'")
            await conn.execute("set myapp.flag = 'on'")
            assert await conn.fetchrow("select inet_server_port(), current_setting('application_name'), "
                                       "current_setting('myapp.flag')") in [(p, "rw-app", "on") for p in replicas]
            # prepared statements of both kinds, used alternately
            read = await conn.prepare("select $1::int + 1, inet_server_port()")
            write = await conn.prepare("insert into rw_items values ($1, 'p') returning inet_server_port()")
            for i in range(100, 110):
                row = await read.fetchrow(i)
                assert row[0] == i + 1 and row[1] in replicas
                assert await write.fetchval(i) == writer
            await conn.execute("reset application_name")
            assert await conn.fetchval("select current_setting('application_name')") == ""
            await conn.execute("delete from rw_items where id >= 100")
            # a temporary table pins the session to the writer from then on
            await conn.execute("create temp table scratch (a int)")
            await conn.execute("insert into scratch values (1)")
            assert await conn.fetchrow("select count(*), inet_server_port() from scratch") == (1, writer)
            assert await conn.fetchval("select inet_server_port()") == writer
        finally:
            await conn.close()

    asyncio.run(main())


def test_set_config_follows_the_session_to_replicas(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    writer, replicas = _ports(pg_cluster)
    pg_cluster.sql(pg_cluster.primary_name, "create schema if not exists rw_tenant; "
                   "create table if not exists rw_tenant.only_here (v text); "
                   "insert into rw_tenant.only_here select 'tenant' where not exists (select from rw_tenant.only_here)",
                   user=pg_cluster.app_user)
    pg_cluster.wait_caught_up(*(i.name for i in pg_cluster.instances if i.name != pg_cluster.primary_name))

    async def main() -> None:
        conn = await _connect(pg_proxy, pg_cluster)
        try:
            await conn.execute("select set_config('search_path', 'rw_tenant, public', false)")
            for _ in range(3):
                row = await conn.fetchrow("select current_setting('search_path'), inet_server_port(), "
                                          "(select v from only_here)")
                assert row[0] == "rw_tenant, public" and row[1] in replicas and row[2] == "tenant"
            # the unnamed statement of the extended protocol, too (asyncpg's execute with arguments)
            await conn.execute("select set_config('application_name', $1, false)", "tenant-app")
            row = await conn.fetchrow("select current_setting('application_name'), inet_server_port()")
            assert row[1] == writer or row[0] == "tenant-app"
        finally:
            await conn.close()

    asyncio.run(main())


def test_pgbench_through_readwrite(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    env = {**os.environ, "PGPASSWORD": pg_cluster.app_password, "PGSSLMODE": "disable"}
    base = ["-h", "127.0.0.1", "-p", str(pg_proxy.port("rw")), "-U", pg_cluster.app_user]
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-I", "dtgvp", *base, pg_cluster.database],
                   env=env, capture_output=True, text=True, timeout=120, check=True)
    for args in (["-S", "-M", "prepared"], ["-S", "-M", "extended"], ["-N", "-M", "prepared"], ["-M", "simple"]):
        out = subprocess.run(["pgbench", "-n", "-c", "4", "-j", "2", "-t", "100", *args, *base, pg_cluster.database],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "number of failed transactions: 0" in out.stdout, out.stdout


@pytest.fixture(scope="module")
def delayed_cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster(replicas=2, replica_conf={"recovery_min_apply_delay": "300ms"}) as c:
        yield c


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_session_consistency_never_reads_stale(delayed_cluster: PostgresCluster, tmp_path: Path,
                                               pool_mode: str) -> None:
    cluster = delayed_cluster
    cluster.sql(cluster.primary_name, "create table if not exists counter (n int)", user=cluster.app_user)
    cluster.sql(cluster.primary_name, "delete from counter; insert into counter values (0)", user=cluster.app_user)
    doc = pg_proxy_config(cluster)
    for ep in doc["clusters"][0]["endpoints"]:
        if ep["name"] in ("rw", "rw_session"):
            ep["pool_mode"] = pool_mode
    with ProxyProcess(doc, tmp_path) as proxy:

        async def main() -> dict[str, Any]:
            conn = await _connect(proxy, cluster, "rw_session")
            eventual = await _connect(proxy, cluster, "rw")
            stale_eventual = 0
            try:
                for i in range(1, 201):
                    await conn.execute("update counter set n = $1", i)
                    assert await conn.fetchval("select n from counter") == i
                    await eventual.execute("update counter set n = n")
                    if await eventual.fetchval("select n from counter") != i:
                        stale_eventual += 1
                # once the replicas have caught up, reads go to them again (bounded wait)
                writer_port = cluster.instance(cluster.primary_name).port
                port = writer_port
                deadline = asyncio.get_running_loop().time() + 10
                while port == writer_port and asyncio.get_running_loop().time() < deadline:
                    port = await conn.fetchval("select inet_server_port()")
                return {"stale_eventual": stale_eventual, "port": port}
            finally:
                await conn.close()
                await eventual.close()

        result = asyncio.run(main())
    # Without session consistency the same sequence does read stale data: the test can tell.
    assert result["stale_eventual"] > 0
    assert result["port"] != cluster.instance(cluster.primary_name).port
