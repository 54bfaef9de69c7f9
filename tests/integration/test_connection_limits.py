"""Connection limits against real servers and clients: over an endpoint's max_client_connections, the
proxy's total, or a user's max_connections, the next client is refused at once with the protocol's
own error (PostgreSQL 53300, MySQL 1040 / 1203) while the clients already in go on, and a place
freed by a disconnect is usable again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, my_proxy_config, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

# A refusal is answered at once: well under a second even on a busy shared machine.
AT_ONCE_S = 2.0


@pytest.fixture(scope="module")
def pg_limited(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The shared cluster behind a proxy with limits: 3 on endpoint "limited", 2 for user "few",
    8 in total."""
    pg_cluster.sql(pg_cluster.primary_name, "do $$ begin if not exists (select from pg_roles where rolname = 'few')"
                                            " then create role few login password 'few-secret'; end if; end $$")
    pg_cluster.sql(pg_cluster.primary_name, f"grant all on database {pg_cluster.database} to few")
    doc = pg_proxy_config(pg_cluster)
    cluster = doc["clusters"][0]
    cluster["endpoints"] = [
        {"name": "limited", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "max_client_connections": 3},
        {"name": "open", "listen": f"127.0.0.1:{free_port()}", "kind": "writer"},
    ]
    cluster["users"].append({"name": "few", "password": "few-secret", "max_connections": 2})
    doc["server"]["max_client_connections"] = 8
    with ProxyProcess(doc, tmp_path_factory.mktemp("pg_limited")) as proxy:
        yield proxy


async def _pg(cluster: PostgresCluster, port: int, user: str | None = None, password: str | None = None,
              **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=user or cluster.app_user,
                                 password=password or cluster.app_password, database=cluster.database,
                                 ssl=False, timeout=10, **kw)


async def _refused(coro: Any) -> asyncpg.PostgresError:
    started = time.monotonic()
    with pytest.raises(asyncpg.TooManyConnectionsError) as info:
        await coro
    assert time.monotonic() - started < AT_ONCE_S
    return info.value


async def _retry(connect: Any) -> Any:
    """Connect; while the limit is full (places of an earlier test's clients not freed yet), again."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await connect()
        except asyncpg.TooManyConnectionsError:
            assert time.monotonic() < deadline, "the freed place never came back"
            await asyncio.sleep(0.05)


def test_pg_the_endpoint_limit_refuses_the_next_client_and_spares_the_others(
        pg_cluster: PostgresCluster, pg_limited: ProxyProcess) -> None:
    port = pg_limited.port("limited")

    async def main() -> None:
        conns = [await _retry(lambda: _pg(pg_cluster, port)) for _ in range(3)]
        try:
            error = await _refused(_pg(pg_cluster, port))
            assert error.sqlstate == "53300"
            assert 'too many connections to endpoint "limited"' in str(error)
            # The three already in go on, and so does another endpoint of the same cluster.
            assert [await c.fetchval("select $1::int", i) for i, c in enumerate(conns)] == [0, 1, 2]
            other = await _pg(pg_cluster, pg_limited.port("open"))
            assert await other.fetchval("select 1") == 1
            await other.close()
            # A place freed by a disconnect is usable again (once the proxy has seen the close).
            await conns.pop().close()
            conns.append(await _retry(lambda: _pg(pg_cluster, port)))
            assert await conns[-1].fetchval("select 7") == 7
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


def test_psql_over_the_limit_gets_the_fatal_after_tls_negotiation(pg_cluster: PostgresCluster,
                                                                   pg_limited: ProxyProcess) -> None:
    port = pg_limited.port("limited")

    async def main() -> None:
        conns = [await _retry(lambda: _pg(pg_cluster, port)) for _ in range(3)]
        try:
            env = {**os.environ, "PGPASSWORD": pg_cluster.app_password, "PGSSLMODE": "require",
                   "PGCONNECT_TIMEOUT": "10"}
            out = await asyncio.to_thread(
                subprocess.run, ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", pg_cluster.app_user,
                                 pg_cluster.database, "-c", "select 1"],
                env=env, capture_output=True, text=True, timeout=30)
            assert out.returncode == 2, out
            assert 'FATAL:  too many connections to endpoint "limited"' in out.stderr
            assert all([await c.fetchval("select 1") == 1 for c in conns])
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


def test_pg_a_users_limit_counts_that_user_only(pg_cluster: PostgresCluster, pg_limited: ProxyProcess) -> None:
    port = pg_limited.port("open")

    async def main() -> None:
        few = [await _retry(lambda: _pg(pg_cluster, port, "few", "few-secret")) for _ in range(2)]
        app = await _pg(pg_cluster, port)
        try:
            error = await _refused(_pg(pg_cluster, port, "few", "few-secret"))
            assert 'too many connections for role "few"' in str(error)
            # A wrong password is still told so: the limit is checked after authentication.
            with pytest.raises(asyncpg.InvalidPasswordError):
                await _pg(pg_cluster, port, "few", "wrong")
            assert await app.fetchval("select current_user") == pg_cluster.app_user
            assert [await c.fetchval("select current_user") for c in few] == ["few", "few"]
            await few.pop().close()
            few.append(await _retry(lambda: _pg(pg_cluster, port, "few", "few-secret")))
        finally:
            for c in [*few, app]:
                await c.close()

    asyncio.run(main())


def test_pg_the_proxys_total_limit(pg_cluster: PostgresCluster, pg_limited: ProxyProcess) -> None:
    async def main() -> None:
        conns = [await _retry(lambda: _pg(pg_cluster, pg_limited.port("open"))) for _ in range(8)]
        try:
            error = await _refused(_pg(pg_cluster, pg_limited.port("open")))
            assert "too many connections to the proxy (server.max_client_connections = 8)" in str(error)
            assert [await c.fetchval("select 1") for c in conns] == [1] * 8
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


# --- MySQL ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def my_limited(my_cluster: MariaDBCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    doc = my_proxy_config(my_cluster)
    cluster = doc["clusters"][0]
    doc["clusters"] = [cluster]
    cluster["endpoints"] = [
        {"name": "limited", "listen": f"127.0.0.1:{free_port()}", "kind": "writer", "max_client_connections": 3},
        {"name": "open", "listen": f"127.0.0.1:{free_port()}", "kind": "writer"},
    ]
    for user in cluster["users"]:
        if user["name"] == "sha2user":
            user["max_connections"] = 2
    with ProxyProcess(doc, Path(tmp_path_factory.mktemp("my_limited"))) as proxy:
        yield proxy


def _my(cluster: MariaDBCluster, port: int, user: str | None = None, password: str | None = None
        ) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=port, user=user or cluster.app_user,
                           password=password or cluster.app_password, database=cluster.database,
                           connect_timeout=10, read_timeout=30, autocommit=True)


def _one(conn: pymysql.Connection, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def _my_refused(connect: Any) -> tuple[int, str]:
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect()
    assert time.monotonic() - started < AT_ONCE_S
    return info.value.args[0], info.value.args[1]


def test_mysql_the_endpoint_limit_refuses_with_1040_and_spares_the_others(
        my_cluster: MariaDBCluster, my_limited: ProxyProcess) -> None:
    port = my_limited.port("limited")
    conns = [wait_until(lambda: _my(my_cluster, port), 10, "a place") for _ in range(3)]
    try:
        assert _my_refused(lambda: _my(my_cluster, port)) == (1040, "Too many connections")
        assert [_one(c, f"SELECT {i}") for i, c in enumerate(conns)] == [0, 1, 2]
        other = _my(my_cluster, my_limited.port("open"))
        assert _one(other, "SELECT 1") == 1
        other.close()
        conns.pop().close()
        conns.append(wait_until(lambda: _my(my_cluster, port), 10, "the freed place"))
        assert _one(conns[-1], "SELECT 7") == 7
    finally:
        for c in conns:
            c.close()


def test_mysql_a_users_limit_refuses_with_1203_after_authentication(my_cluster: MariaDBCluster,
                                                                    my_limited: ProxyProcess) -> None:
    port = my_limited.port("open")
    sha2 = [wait_until(lambda: _my(my_cluster, port, "sha2user", "sha2-secret"), 10, "a place") for _ in range(2)]
    app = _my(my_cluster, port)
    try:
        errno, message = _my_refused(lambda: _my(my_cluster, port, "sha2user", "sha2-secret"))
        assert (errno, message) == (1203, "User sha2user already has more than 'max_user_connections' active "
                                          "connections")
        wrong = _my_refused(lambda: _my(my_cluster, port, "sha2user", "wrong"))
        assert wrong[0] == 1045  # a wrong password is still told so
        assert _one(app, "SELECT CURRENT_USER()").startswith(my_cluster.app_user)
        assert [_one(c, "SELECT 1") for c in sha2] == [1, 1]
        sha2.pop().close()
        sha2.append(wait_until(lambda: _my(my_cluster, port, "sha2user", "sha2-secret"), 10, "the freed place"))
    finally:
        for c in [*sha2, app]:
            c.close()
