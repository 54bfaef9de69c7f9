"""Soak: many sessions doing queries, pipelines, COPY, statement timeouts and cancels while
another connection terminates a random backend every 100 ms. Every operation ends (a result
or a clean error) within a bound, and every endpoint keeps accepting new connections.

This is the load under which the proxy once stopped accepting for good and left a pipeline
unanswered; a deliberate termination must reach the client as it would directly (the
connection closes), never as a writer loss for everyone.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
from dataclasses import dataclass, field

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config
from tests.fixtures.splitrelay import SplitRelay, random_pieces

pytestmark = pytest.mark.integration

APP = "soak"
DURATION_S = float(os.environ.get("SOAK_SECONDS", "20"))
OP_BOUND_S = 15.0  # an operation that takes longer than this is a hang


@dataclass
class Tally:
    ops: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    hangs: list[str] = field(default_factory=list)
    # asyncpg sometimes loses track of its own state when its connection is terminated under
    # it ("cannot switch to state ..."): the same load straight at the servers does it too
    # (SOAK_DIRECT=1), so these count as a connection to start over, not as a proxy fault.
    confused: list[str] = field(default_factory=list)

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def _connect(port: int, cluster: PostgresCluster) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=cluster.app_user,
                                 password=cluster.app_password, database=cluster.database, ssl=False,
                                 timeout=10, server_settings={"application_name": APP})


OPS = ("query", "pipeline", "copy in", "copy out", "statement timeout", "cancel")
READ_OPS = ("query", "copy out", "statement timeout", "cancel")


async def _operation(conn: asyncpg.Connection, kind: int, n: int) -> None:
    if kind == 0:
        assert await conn.fetchval("select $1::int + 1", n) == n + 1
    elif kind == 1:  # a pipeline: Bind/Execute for every row, one Sync
        await conn.executemany("insert into soak_rows (n) values ($1)", [(n + i,) for i in range(20)])
    elif kind == 2:
        await conn.copy_records_to_table("soak_rows", records=[(n + i,) for i in range(200)], columns=["n"])
    elif kind == 3:
        out = io.BytesIO()
        await conn.copy_from_query("select g from generate_series(1, 2000) g", output=out)
        assert out.getvalue().count(b"\n") == 2000
    elif kind == 4:  # the server cancels it
        async with conn.transaction():
            await conn.execute("set local statement_timeout = 20")
            try:
                await conn.execute("select pg_sleep(1)")
            except asyncpg.QueryCanceledError:
                pass
            else:
                raise AssertionError("statement_timeout did not fire")
    else:  # the client cancels it (asyncpg sends a CancelRequest on timeout)
        try:
            await conn.execute("select pg_sleep(1)", timeout=0.02)
        except TimeoutError:
            pass


async def _client(port: int, cluster: PostgresCluster, seed: int, until: float, tally: Tally,
                  ops: tuple[str, ...]) -> None:
    rng = random.Random(seed)
    conn: asyncpg.Connection | None = None
    n = seed * 1_000_000
    while time.monotonic() < until:
        n += 1000
        kind = OPS.index(rng.choice(ops))
        try:
            async with asyncio.timeout(OP_BOUND_S):
                if conn is None or conn.is_closed():
                    conn = await _connect(port, cluster)
                await _operation(conn, kind, n)
            tally.ops += 1
        except TimeoutError:
            tally.hangs.append(f"client {seed} on port {port}: {OPS[kind]}")
            if conn is not None:
                conn.terminate()
            conn = None
        except asyncpg.InternalClientError as e:
            tally.confused.append(f"client {seed} on port {port}: {OPS[kind]}: {e}")
            if conn is not None:
                conn.terminate()
            conn = None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            # 57P01 (terminated), a connection closed under a statement, 08007 (a statement
            # whose server went away): the client reconnects, as applications do.
            tally.error(e)
            if conn is not None and not conn.is_closed():
                try:
                    async with asyncio.timeout(OP_BOUND_S):
                        await conn.execute("rollback")
                except Exception:  # noqa: BLE001 - it is broken: start over
                    conn.terminate()
                    conn = None
    if conn is not None:
        conn.terminate()


async def _killer(cluster: PostgresCluster, until: float, killed: list[int]) -> None:
    """Every 100 ms, terminate one random backend of the soak's sessions, on any instance."""
    conns = [await asyncpg.connect(cluster.dsn(i.name, user="postgres", password="postgres"), timeout=10)
             for i in cluster.instances]
    rng = random.Random(7)
    try:
        while time.monotonic() < until:
            conn = rng.choice(conns)
            pid = await conn.fetchval(
                "select pid from pg_stat_activity where application_name = $1 and backend_type = 'client backend' "
                "order by random() limit 1", APP)
            if pid is not None:
                await conn.execute("select pg_terminate_backend($1)", pid)
                killed.append(pid)
            await asyncio.sleep(0.1)
    finally:
        for conn in conns:
            await conn.close()


async def _accepts(port: int, cluster: PostgresCluster) -> bool:
    async with asyncio.timeout(10):
        conn = await _connect(port, cluster)
        try:
            return bool(await conn.fetchval("select 1") == 1)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def soak_proxy(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> ProxyProcess:
    pg_cluster.sql(pg_cluster.primary_name, "create table if not exists soak_rows (n bigint)",
                   user=pg_cluster.app_user)
    pg_cluster.sql(pg_cluster.primary_name, "alter role postgres password 'postgres'")
    doc = pg_proxy_config(pg_cluster)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    with ProxyProcess(doc, tmp_path_factory.mktemp("soak")) as proxy:
        yield proxy


def test_sessions_survive_random_terminations_and_endpoints_keep_accepting(
        pg_cluster: PostgresCluster, soak_proxy: ProxyProcess) -> None:
    endpoints = {"writer": OPS, "rw": OPS, "reader": READ_OPS}
    # The clients' bytes reach the proxy in pieces of 1 to 1,500 bytes, as over a real network.
    targets = [soak_proxy.port(name) for name in endpoints]
    if os.environ.get("SOAK_DIRECT"):  # for comparison: the same load straight at the servers
        primary = pg_cluster.instance(pg_cluster.primary_name).port
        targets = [primary, primary, pg_cluster.instances[1].port]
    relays = [SplitRelay(("127.0.0.1", port), piece=random_pieces(1, 1500), pause_s=0) for port in targets]
    for relay in relays:
        relay.__enter__()
    ports = [relay.port for relay in relays]
    tally = Tally()
    killed: list[int] = []

    async def main() -> None:
        until = time.monotonic() + DURATION_S
        clients = [_client(ports[i % 3], pg_cluster, i + 1, until, tally, list(endpoints.values())[i % 3])
                   for i in range(12)]
        await asyncio.gather(_killer(pg_cluster, until, killed), *clients)
        for port in ports:
            assert await _accepts(port, pg_cluster), f"endpoint on {port} stopped accepting"

    try:
        asyncio.run(main())
    finally:
        for relay in relays:
            relay.__exit__(None, None, None)
    assert not tally.hangs, f"operations that never ended: {tally.hangs}; errors {tally.errors}"
    assert len(killed) > 50
    assert tally.ops > 200, (tally.ops, tally.errors)
    # A termination is not a failover: the writer never moved.
    assert "writer_changed" not in soak_proxy.log().split("endpoint_listening")[-1]
