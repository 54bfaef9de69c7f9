"""How a PostgreSQL session ends, and what one session's trouble does to the others.

- A server's own termination of a session (pg_terminate_backend, idle_session_timeout) reaches
  the client as it would directly: the server's FATAL, then the connection closes.
- One session's lost backend never moves the cluster: the writer stays, other sessions
  (a LISTEN among them) go on.
- An idle session holds no relay buffer.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, wait_until

pytestmark = pytest.mark.integration


async def _connect(cluster: PostgresCluster, port: int, **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=cluster.app_user, password=cluster.app_password,
                                 database=cluster.database, ssl=False, **kw)


def _topology(proxy: ProxyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{proxy.doc['admin']['listen']}/topology", timeout=10) as r:
        return dict(json.loads(r.read()))


def _events_since(proxy: ProxyProcess, mark: int) -> list[str]:
    return [json.loads(line).get("event", "") for line in proxy.log()[mark:].splitlines() if line.startswith("{")]


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
def test_pg_terminate_backend_of_the_own_session_ends_it_as_directly(
        pg_cluster: PostgresCluster, pg_proxy: ProxyProcess, through_proxy: bool) -> None:
    port = pg_proxy.port("writer") if through_proxy else pg_cluster.instance(pg_cluster.primary_name).port

    async def main() -> None:
        conn = await _connect(pg_cluster, port)
        # asyncpg reports the server's FATAL 57P01 itself, or as the cause of the closed connection.
        with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)) as info:
            await conn.fetchval("select pg_terminate_backend(pg_backend_pid())")
        assert "terminating connection due to administrator command" in str(info.value)
        deadline = time.monotonic() + 5
        while not conn.is_closed() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert conn.is_closed()

    asyncio.run(main())


def test_idle_session_timeout_closes_the_client_as_directly(pg_cluster: PostgresCluster,
                                                            pg_proxy: ProxyProcess) -> None:
    async def main() -> None:
        conn = await _connect(pg_cluster, pg_proxy.port("writer"))
        await conn.execute("set idle_session_timeout = '200ms'")
        deadline = time.monotonic() + 10
        while not conn.is_closed() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert conn.is_closed(), "the server closed the idle session; the client must see it"

    asyncio.run(main())


def test_one_sessions_lost_backend_moves_nothing(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    writer_before = _topology(pg_proxy)["clusters"][0]["writer"]
    mark = len(pg_proxy.log())

    async def main() -> None:
        listener = await _connect(pg_cluster, pg_proxy.port("writer"))
        victim = await _connect(pg_cluster, pg_proxy.port("writer"))
        got: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("lifecycle", lambda *args: got.put_nowait(args[3]))
        pid = await victim.fetchval("select pg_backend_pid()")
        pg_cluster.sql(pg_cluster.primary_name, f"select pg_terminate_backend({int(pid)})")
        with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)):
            for _ in range(50):  # the FATAL may arrive before or with the next statement
                await victim.fetchval("select 1")
                await asyncio.sleep(0.02)
        # Everyone else goes on: the LISTEN session was not moved, it still hears its channel.
        other = await _connect(pg_cluster, pg_proxy.port("writer"))
        await other.execute("notify lifecycle, 'still here'")
        assert await asyncio.wait_for(got.get(), 10) == "still here"
        for conn in (listener, other):
            await conn.close()

    asyncio.run(main())
    assert _topology(pg_proxy)["clusters"][0]["writer"] == writer_before
    events = _events_since(pg_proxy, mark)
    assert "writer_changed" not in events and "instance_suspect" not in events and "instance_down" not in events


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_idle_sessions_hold_no_relay_buffers(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess) -> None:
    # Before the rewrite every session held two 64 KiB relay buffers for life (~140 kB each);
    # now an idle session borrows none. RESULTS.md has the measured figure (1,000 sessions).
    assert pg_proxy.proc is not None
    pid = pg_proxy.proc.pid
    n = 60  # the shared cluster's servers allow 100 connections in all

    async def main() -> list[asyncpg.Connection]:
        # Warm up: the first sessions grow the proxy's own structures once.
        warm = [await _connect(pg_cluster, pg_proxy.port("writer")) for _ in range(5)]
        for conn in warm:
            await conn.fetchval("select 1")
            await conn.close()
        await asyncio.sleep(0.2)
        return []

    asyncio.run(main())
    before = _rss_kb(pid)

    async def hold() -> int:
        conns = [await _connect(pg_cluster, pg_proxy.port("writer")) for _ in range(n)]
        for conn in conns:
            await conn.fetchval("select repeat('x', 100000)")  # each moved 100 kB through the relay
        wait_until(lambda: True, 0.1, "settle")
        after = _rss_kb(pid)
        for conn in conns:
            await conn.close()
        return after

    after = asyncio.run(hold())
    per_session = (after - before) / n
    assert per_session < 48, f"{per_session:.1f} kB of proxy memory per idle session (RSS {before} -> {after} kB)"

