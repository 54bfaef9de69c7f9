"""Transaction pooling (PostgreSQL): many clients on a few server connections, through real clients
(asyncpg, psycopg 3, pgbench) against the shared real cluster, in a database of their own so that
the server's count of connections is this module's."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import tomli_w

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

DB = "pooltest"
POOL_SIZE = 4


@pytest.fixture(scope="module")
def pool_proxy(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    primary = pg_cluster.primary_name
    if pg_cluster.sql(primary, f"select 1 from pg_database where datname = '{DB}'") != "1":
        pg_cluster.sql(primary, f"create database {DB} owner {pg_cluster.app_user}", database="postgres")
    pg_cluster.sql(primary, "create table if not exists items (id int primary key, v text)",
                   user=pg_cluster.app_user, database=DB)
    pg_cluster.wait_caught_up(*(i.name for i in pg_cluster.instances if i.name != primary))
    doc = pg_proxy_config(pg_cluster, pool_size=POOL_SIZE, borrow_timeout_ms=1500)
    doc["clusters"][0]["endpoints"] = [
        {"name": "tx", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "pool_mode": "transaction"},
        {"name": "tx_rw", "listen": f"127.0.0.1:{free_port()}", "kind": "readwrite", "pool_mode": "transaction"},
    ]
    with ProxyProcess(doc, tmp_path_factory.mktemp("poolproxy")) as proxy:
        yield proxy


def server_connections(cluster: PostgresCluster) -> int:
    """Client backends on every instance for this module's database."""
    return sum(int(cluster.sql(i.name, f"select count(*) from pg_stat_activity where datname = '{DB}' "
                                       "and backend_type = 'client backend' and pid <> pg_backend_pid()",
                               database="postgres"))
               for i in cluster.instances)


async def connect(proxy: ProxyProcess, cluster: PostgresCluster, endpoint: str = "tx",
                  **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                                 password=cluster.app_password, database=DB, ssl=False, timeout=10, **kw)


def test_many_asyncpg_clients_share_a_few_connections_and_keep_their_own_state(
        pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    clients = 24

    async def client(i: int) -> None:
        conn = await connect(pool_proxy, pg_cluster, server_settings={"application_name": f"client-{i}"})
        try:
            await conn.execute(f"set search_path = 'tenant_{i}', public")
            await conn.execute(f"prepare mine as select {i}")
            for n in range(20):
                # asyncpg prepares every statement with arguments under its own names
                row = await conn.fetchrow("select current_setting('application_name') as app, "
                                          "current_setting('search_path') as path, $1::int + 1 as n", n)
                assert (row["app"], row["path"], row["n"]) == (f"client-{i}", f"tenant_{i}, public", n + 1)
                assert await conn.fetchval("execute mine") == i
                async with conn.transaction():
                    await conn.execute("insert into items values ($1, $2) on conflict (id) do update set v = $2",
                                       i, str(n))
                    assert await conn.fetchval("select v from items where id = $1", i) == str(n)
            stmt = await conn.prepare("select $1::text || '-' || current_setting('application_name')")
            assert await stmt.fetchval("x") == f"x-client-{i}"
        finally:
            await conn.close()

    async def main() -> int:
        peak = 0
        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        while not all(t.done() for t in tasks):
            peak = max(peak, await asyncio.to_thread(server_connections, pg_cluster))
            await asyncio.sleep(0.2)
        for t in tasks:
            t.result()
        return peak

    peak = asyncio.run(main())
    assert 0 < peak <= POOL_SIZE


def test_pgbench_prepared_through_transaction_mode(pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    env = {**os.environ, "PGPASSWORD": pg_cluster.app_password, "PGSSLMODE": "disable"}
    base = ["-h", "127.0.0.1", "-p", str(pool_proxy.port("tx")), "-U", pg_cluster.app_user]
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base, DB], env=env, capture_output=True, text=True,
                   timeout=120, check=True)
    # TPC-B holds a connection from BEGIN to END: one client per pgbench thread (a thread blocked in a
    # synchronous prepare would stall the transactions of its other clients, pooled or not).
    runs = [["-c", "12", "-j", "12", "-t", "30", "-M", mode] for mode in ("prepared", "extended", "simple")]
    runs.append(["-S", "-c", "16", "-j", "2", "-t", "200", "-M", "prepared"])
    for args in runs:
        out = subprocess.run(["pgbench", "-n", *args, *base, DB], env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr
        assert "number of failed transactions: 0" in out.stdout, out.stdout


def test_psycopg_prepared_statements_and_pipelines(pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    dsn = (f"host=127.0.0.1 port={pool_proxy.port('tx')} user={pg_cluster.app_user} "
           f"password={pg_cluster.app_password} dbname={DB} sslmode=disable")
    conns = [psycopg.connect(dsn, autocommit=True, prepare_threshold=0) for _ in range(8)]
    try:
        for round_ in range(5):
            for i, conn in enumerate(conns):
                # _pg3_N names: the same names, different statements, in different clients
                query = "select %s::int * 2" if i % 2 else "select %s::int + 1000"
                value = conn.execute(query, (round_,)).fetchone()
                assert value == ((round_ * 2,) if i % 2 else (round_ + 1000,))
                with conn.pipeline():
                    cur1 = conn.execute("select %s::text", (f"p{i}",))
                    cur2 = conn.execute("select %s::int", (i,))
                    conn.execute("insert into items values (%s, 'pipe') on conflict (id) do nothing", (1000 + i,))
                assert cur1.fetchone() == (f"p{i}",) and cur2.fetchone() == (i,)
    finally:
        for conn in conns:
            conn.close()


def test_copy_in_transaction_mode(pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        conn = await connect(pool_proxy, pg_cluster)
        try:
            await conn.execute("create table if not exists copied (a int, b text)")
            await conn.execute("truncate copied")
            await conn.copy_records_to_table("copied", records=[(i, f"r{i}") for i in range(500)])
            assert await conn.fetchval("select count(*) from copied") == 500
        finally:
            await conn.close()

    asyncio.run(main())


def test_pinned_state_keeps_the_connection_until_it_is_gone(pool_proxy: ProxyProcess,
                                                            pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        listener = await connect(pool_proxy, pg_cluster)
        notifier = await connect(pool_proxy, pg_cluster)
        got: asyncio.Queue[str] = asyncio.Queue()
        try:
            await listener.add_listener("jobs", lambda *args: got.put_nowait(args[3]))
            pid = await listener.fetchval("select pg_backend_pid()")
            for _ in range(5):
                await notifier.execute("select pg_notify('jobs', 'hello')")
                assert await asyncio.wait_for(got.get(), 5) == "hello"
                assert await listener.fetchval("select pg_backend_pid()") == pid  # pinned: the same server
            await listener.remove_listener("jobs", lambda *args: None)
            await listener.execute("unlisten *")
            temp = await connect(pool_proxy, pg_cluster)
            await temp.execute("create temp table scratch (a int)")
            await temp.execute("insert into scratch values (1)")
            for _ in range(5):
                assert await temp.fetchval("select count(*) from scratch") == 1
            await temp.execute("discard temp")
            await temp.close()
        finally:
            await listener.close()
            await notifier.close()

    asyncio.run(main())


def test_a_client_that_waits_too_long_for_a_connection_gets_53300_and_stays(
        pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        holders = [await connect(pool_proxy, pg_cluster) for _ in range(POOL_SIZE)]
        waiter = await connect(pool_proxy, pg_cluster)
        try:
            for h in holders:
                await h.execute("begin")
                await h.execute("select 1")
            started = time.monotonic()
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await waiter.fetchval("select 1")
            assert time.monotonic() - started >= 1.0
            await holders[0].execute("commit")
            assert await waiter.fetchval("select 42") == 42
        finally:
            for c in [*holders, waiter]:
                await c.close()

    asyncio.run(main())


def test_readwrite_borrows_from_writer_and_replica_pools(pool_proxy: ProxyProcess,
                                                         pg_cluster: PostgresCluster) -> None:
    writer_port = pg_cluster.instance(pg_cluster.primary_name).port

    async def main() -> None:
        conn = await connect(pool_proxy, pg_cluster, "tx_rw")
        try:
            await conn.execute("set application_name = 'rw-pooled'")
            ports = {await conn.fetchval("select inet_server_port()") for _ in range(10)}
            assert writer_port not in ports and ports
            assert await conn.fetchval("select current_setting('application_name')") == "rw-pooled"
            async with conn.transaction():
                assert await conn.fetchval("select inet_server_port()") == writer_port
            await conn.execute("insert into items values (7777, 'w') on conflict (id) do update set v = 'w'")
        finally:
            await conn.close()

    asyncio.run(main())


def test_a_reload_resizes_the_pools_without_dropping_clients(pg_cluster: PostgresCluster, pool_proxy: ProxyProcess,
                                                              tmp_path: Path) -> None:
    doc = pg_proxy_config(pg_cluster, pool_size=6, borrow_timeout_ms=10000)
    doc["clusters"][0]["endpoints"] = [
        {"name": "tx", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "pool_mode": "transaction"}]
    before = server_connections(pg_cluster)  # the module's other proxy keeps some open

    async def hold_all(clients: list[asyncpg.Connection]) -> None:
        for c in clients:
            await c.execute("begin")
            await c.execute("select 1")

    async def main(proxy: ProxyProcess) -> None:
        clients = [await connect(proxy, pg_cluster) for _ in range(6)]
        try:
            await hold_all(clients)  # six server connections lent
            assert await asyncio.to_thread(server_connections, pg_cluster) - before == 6
            smaller = {**doc, "clusters": [{**doc["clusters"][0], "pool_size": 2}]}
            proxy.config_path.write_bytes(tomli_w.dumps(smaller).encode())
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_until, lambda: '"config_reloaded"' in proxy.log(), 20, "the reload")
            for c in clients:  # every client keeps its session and its transaction
                await c.execute("commit")
            await asyncio.to_thread(wait_until, lambda: server_connections(pg_cluster) - before <= 2, 20,
                                    "connections over the new size to close as they come back")
            results = await asyncio.gather(*(c.fetchval("select $1::int", i) for i, c in enumerate(clients)))
            assert results == list(range(6))
            assert server_connections(pg_cluster) - before <= 2
        finally:
            for c in clients:
                await c.close()

    with ProxyProcess(doc, tmp_path) as proxy:
        asyncio.run(main(proxy))


def test_a_client_cancel_reaches_the_connection_it_holds(pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    # Transaction mode: the client's cancel key names no server connection of its own; a cancel
    # goes to whichever connection the client holds for the statement under way (and to none
    # between statements). asyncpg sends a CancelRequest when a statement passes its timeout.
    async def main() -> None:
        conn = await connect(pool_proxy, pg_cluster)
        other = await connect(pool_proxy, pg_cluster)
        try:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("select pg_sleep(30)", timeout=0.5)
            assert await conn.fetchval("select 41 + 1") == 42  # the session goes on
            assert time.monotonic() - started < 15
            # The sleep was cancelled on the server, not left running on a pooled connection.
            assert await other.fetchval("select count(*) from pg_stat_activity "
                                        "where query = 'select pg_sleep(30)' and state = 'active'") == 0
            # A cancel between statements cancels nothing: the next statement runs.
            pid, secret = conn.get_server_pid(), conn._protocol.backend_secret
            reader, writer = await asyncio.open_connection("127.0.0.1", pool_proxy.port("tx"))
            writer.write((16).to_bytes(4, "big") + (80877102).to_bytes(4, "big")
                         + pid.to_bytes(4, "big") + secret.to_bytes(4, "big", signed=secret < 0))
            assert await asyncio.wait_for(reader.read(), 5) == b""  # taken (closed by the proxy)
            writer.close()
            assert await conn.fetchval("select pg_sleep(0.2)::text || '2'") == "2"
        finally:
            await conn.close()
            await other.close()

    asyncio.run(main())


def test_idle_pooled_connections_the_server_terminated_are_not_handed_to_clients(
        pool_proxy: ProxyProcess, pg_cluster: PostgresCluster) -> None:
    # pg_terminate_backend on every idle pooled connection (as an administrator, or the server's
    # idle_session_timeout, would): the clients' next statements run on fresh connections, with
    # no error, whether a connection was used a moment ago (kept in the hub) or not.
    primary = pg_cluster.primary_name

    def pooled_pids() -> list[str]:
        out = pg_cluster.sql(primary, f"select pid from pg_stat_activity where datname = '{DB}' and "
                                      "backend_type = 'client backend' and pid <> pg_backend_pid()",
                             database="postgres")
        return out.split() if out else []

    async def main() -> None:
        conns = [await connect(pool_proxy, pg_cluster) for _ in range(POOL_SIZE)]
        try:
            for _round in range(3):
                # Every connection of the pool used just now, then idle in the pool.
                assert await asyncio.gather(*(c.fetchval("select $1::int", i) for i, c in enumerate(conns))) \
                    == list(range(POOL_SIZE))
                old = pooled_pids()
                assert old
                pg_cluster.sql(primary, "select count(pg_terminate_backend(pid::int)) from unnest("
                                        f"string_to_array('{' '.join(old)}', ' ')) as pid", database="postgres")
                wait_until(lambda old=old: not set(old) & set(pooled_pids()), 10, "terminated backends gone")
                for i, c in enumerate(conns):
                    assert await c.fetchval("select $1::int + 1", i) == i + 1
                assert not set(old) & set(pooled_pids())
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())
