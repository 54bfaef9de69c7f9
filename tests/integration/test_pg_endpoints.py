"""Real clients (asyncpg, psql, pgbench) through the proxy's endpoints against a real cluster."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


async def connect(proxy: ProxyProcess, endpoint: str, cluster: PostgresCluster, **kw: Any) -> asyncpg.Connection:
    kw.setdefault("user", cluster.app_user)
    kw.setdefault("password", cluster.app_password)
    kw.setdefault("database", cluster.database)
    kw.setdefault("ssl", False)
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), timeout=10, **kw)


def port_of(cluster: PostgresCluster, name: str) -> int:
    return cluster.instance(name).port


@pytest.fixture(scope="module", autouse=True)
def table(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary_name
    pg_cluster.sql(primary, "create table if not exists items (id int primary key, name text)",
                   user=pg_cluster.app_user, database=pg_cluster.database)


def test_writer_endpoint_lands_on_the_primary(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> tuple[int, bool]:
        conn = await connect(pg_proxy, "writer", pg_cluster)
        try:
            return await conn.fetchval("select inet_server_port()"), await conn.fetchval("select pg_is_in_recovery()")
        finally:
            await conn.close()

    port, in_recovery = run(main)
    assert port == port_of(pg_cluster, pg_cluster.primary_name)
    assert in_recovery is False


def test_reader_endpoint_spreads_over_replicas(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    replicas = {i.port for i in pg_cluster.instances if i.name != pg_cluster.primary_name}

    async def main() -> list[int]:
        # Held open together, least-connections must use both replicas.
        conns = [await connect(pg_proxy, "reader", pg_cluster) for _ in range(4)]
        try:
            return [await c.fetchval("select inet_server_port()") for c in conns]
        finally:
            for c in conns:
                await c.close()

    ports = run(main)
    assert set(ports) == replicas
    assert sorted(ports.count(p) for p in replicas) == [2, 2]


def test_instance_and_custom_endpoints(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    names = [i.name for i in pg_cluster.instances]

    async def port(endpoint: str) -> int:
        conn = await connect(pg_proxy, endpoint, pg_cluster)
        try:
            return int(await conn.fetchval("select inet_server_port()"))
        finally:
            await conn.close()

    assert run(lambda: port("inst1")) == port_of(pg_cluster, names[1])
    # custom, role reader, members = [names[1]]
    assert {run(lambda: port("custom_r")) for _ in range(3)} == {port_of(pg_cluster, names[1])}
    # custom, role any, excluded = names[1:] -> only the primary is left
    assert run(lambda: port("custom_any")) == port_of(pg_cluster, names[0])


def test_simple_prepared_executemany_and_large_result(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> None:
        conn = await connect(pg_proxy, "writer", pg_cluster)
        try:
            await conn.execute("create temp table t (a int, b text)")
            await conn.executemany("insert into t values ($1, $2)", [(i, f"row {i}") for i in range(500)])
            assert await conn.fetchval("select count(*) from t") == 500
            stmt = await conn.prepare("select b from t where a = $1")
            assert await stmt.fetchval(42) == "row 42"
            assert await stmt.fetchval(7) == "row 7"
            rows = await conn.fetch("select g, repeat('x', 50) from generate_series(1, 20000) g")
            assert len(rows) == 20000
            assert rows[-1][0] == 20000
            # Errors come back with their SQLSTATE and the session stays usable.
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.execute("select * from no_such_table")
            assert await conn.fetchval("select 1") == 1
            async with conn.transaction():
                await conn.execute("insert into t values (1000, 'tx')")
            assert await conn.fetchval("select b from t where a = 1000") == "tx"
        finally:
            await conn.close()

    run(main)


def test_copy_in_and_out(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> None:
        conn = await connect(pg_proxy, "writer", pg_cluster)
        try:
            await conn.execute("create temp table c (a int, b text)")
            records = [(i, f"copy {i}") for i in range(3000)]
            await conn.copy_records_to_table("c", records=records)
            assert await conn.fetchval("select count(*) from c") == 3000
            chunks: list[bytes] = []

            async def sink(data: bytes) -> None:
                chunks.append(data)

            await conn.copy_from_query("select * from c order by a", output=sink)
            lines = b"".join(chunks).decode().splitlines()
            assert len(lines) == 3000
            assert lines[5] == "5\tcopy 5"
        finally:
            await conn.close()

    run(main)


def test_cancel_via_timeout(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> None:
        conn = await connect(pg_proxy, "writer", pg_cluster)
        try:
            pid = await conn.fetchval("select pg_backend_pid()")
            # The proxy hands out the real backend pid.
            assert conn.get_server_pid() == pid
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("select pg_sleep(30)", timeout=0.5)
            # asyncpg cancelled the query through the proxy; the session works again at once.
            assert await conn.fetchval("select 1", timeout=5) == 1
        finally:
            await conn.close()

    run(main)
    # and the server really cancelled it: nothing is still sleeping
    active = pg_cluster.sql(pg_cluster.primary_name,
                            "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' "
                            "and state = 'active'")
    assert active == "0"


def test_notify_and_notices_are_delivered(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> None:
        listener = await connect(pg_proxy, "writer", pg_cluster)
        sender = await connect(pg_proxy, "writer", pg_cluster)
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        notices: list[str] = []
        try:
            await listener.add_listener("chan", lambda _c, pid, ch, payload: got.put_nowait((pid, ch, payload)))
            listener.add_log_listener(lambda _c, msg: notices.append(msg.message))
            await sender.execute("select pg_notify('chan', 'hello')")
            pid, channel, payload = await asyncio.wait_for(got.get(), 5)
            assert (channel, payload) == ("chan", "hello")
            assert pid == sender.get_server_pid()
            await listener.execute("do $$ begin raise notice 'careful'; end $$")
            assert notices == ["careful"]
        finally:
            await listener.close()
            await sender.close()

    run(main)


def test_wrong_password_and_unknown_user(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def wrong_password() -> None:
        await connect(pg_proxy, "writer", pg_cluster, password="nope")

    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        run(wrong_password)
    assert info.value.sqlstate == "28P01"

    async def unknown_user() -> None:
        await connect(pg_proxy, "writer", pg_cluster, user="nobody", password="x")

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info2:
        run(unknown_user)
    assert info2.value.sqlstate.startswith("28")


def test_md5_client_auth(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> str:
        conn = await connect(pg_proxy, "writer", pg_cluster, user="md5user", password="md5-secret")
        try:
            return str(await conn.fetchval("select current_user"))
        finally:
            await conn.close()

    assert run(main) == "md5user"

    async def wrong() -> None:
        await connect(pg_proxy, "writer", pg_cluster, user="md5user", password="bad")

    with pytest.raises(asyncpg.InvalidPasswordError):
        run(wrong)


def test_unknown_database_error_comes_from_the_server(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def main() -> None:
        await connect(pg_proxy, "writer", pg_cluster, database="no_such_db")

    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        run(main)
    assert info.value.sqlstate == "3D000"


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls_on_and_off(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def ssl_in_use(endpoint: str, ssl_arg: Any) -> bool:
        conn = await connect(pg_proxy, endpoint, pg_cluster, ssl=ssl_arg)
        try:
            assert await conn.fetchval("select 1") == 1
            return conn._transport.get_extra_info("sslcontext") is not None
        finally:
            await conn.close()

    assert run(lambda: ssl_in_use("writer", _client_tls())) is True
    assert run(lambda: ssl_in_use("writer", False)) is False
    assert run(lambda: ssl_in_use("tls_required", _client_tls())) is True

    async def plain_to_required() -> None:
        await connect(pg_proxy, "tls_required", pg_cluster, ssl=False)

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        run(plain_to_required)

    async def require_on_off() -> None:
        await connect(pg_proxy, "tls_off", pg_cluster, ssl=_client_tls())

    # tls = "off": the proxy answers 'N', and a client that insists on TLS gives up.
    with pytest.raises((ConnectionError, OSError, asyncpg.PostgresError)):
        run(require_on_off)


def test_two_hundred_concurrent_clients(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    async def one(i: int) -> int:
        conn = await connect(pg_proxy, "writer", pg_cluster)
        try:
            await conn.fetchval("select pg_sleep(0.2)")
            return int(await conn.fetchval("select $1::int * 2", i))
        finally:
            await conn.close()

    async def main() -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(200))))

    assert run(main) == [i * 2 for i in range(200)]


def _pg_env(cluster: PostgresCluster) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": cluster.app_password, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


def test_psql_through_reader_and_writer(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    def psql(endpoint: str, sql: str) -> str:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(pg_proxy.port(endpoint)), "-U", pg_cluster.app_user,
             "-d", pg_cluster.database, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env=_pg_env(pg_cluster), capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()

    assert psql("writer", "select pg_is_in_recovery()") == "f"
    assert psql("reader", "select pg_is_in_recovery()") == "t"
    # \copy goes through COPY FROM STDIN / TO STDOUT
    psql("writer", "create table if not exists psql_copy (a int)")
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(pg_proxy.port("writer")), "-U", pg_cluster.app_user,
         "-d", pg_cluster.database, "-v", "ON_ERROR_STOP=1", "-c", "\\copy psql_copy from stdin"],
        input="1\n2\n3\n", env=_pg_env(pg_cluster), capture_output=True, text=True, timeout=30, check=True)
    assert psql("writer", "select sum(a) from psql_copy") == "6"


def test_pgbench_init_and_select_only(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    base = ["-h", "127.0.0.1", "-p", str(pg_proxy.port("writer")), "-U", pg_cluster.app_user]
    env = _pg_env(pg_cluster)
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base, pg_cluster.database],
                   env=env, capture_output=True, text=True, timeout=120, check=True)
    for mode in ("simple", "extended", "prepared"):
        out = subprocess.run(["pgbench", "-S", "-n", "-c", "4", "-j", "2", "-t", "200", "-M", mode,
                              *base, pg_cluster.database],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "number of failed transactions: 0" in out.stdout
        assert "number of transactions actually processed: 800/800" in out.stdout
    # The replicas see pgbench's tables: the reader endpoint can read them.
    reader = ["-h", "127.0.0.1", "-p", str(pg_proxy.port("reader")), "-U", pg_cluster.app_user]

    def replicated() -> bool:
        r = subprocess.run(["pgbench", "-S", "-n", "-t", "50", *reader, pg_cluster.database],
                           env=env, capture_output=True, text=True, timeout=60)
        return r.returncode == 0

    wait_until(replicated, 20, "pgbench -S through the reader endpoint")
