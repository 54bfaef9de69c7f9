"""The relay hub (server/hub.py) carries steady-state traffic, and what it hands back to a
session's own task (a slow client, a pipeline, an unusual message) stays correct."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.pg import messages as m
from tests.fixtures.pgwire import md5_login, read_until_ready
from tests.fixtures.proxy import ProxyProcess

pytestmark = pytest.mark.integration


def _relay_counts(proxy: ProxyProcess) -> tuple[float, float]:
    """(endpoint_proxy_relay_events_total, endpoint_proxy_relay_handbacks_total)."""
    with urllib.request.urlopen(f"http://{proxy.doc['admin']['listen']}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["endpoint_proxy_relay_events_total"], values["endpoint_proxy_relay_handbacks_total"]


def _env(cluster: PostgresCluster) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": cluster.app_password, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_the_hub_relays_pgbench_in_every_protocol_mode(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess,
                                                       tmp_path: Path, mode: str) -> None:
    script = tmp_path / "select.sql"
    script.write_text("\\set n random(1, 1000000)\nSELECT :n::int + 1 AS next;\n")
    clients, per_client = 4, 300
    events_before, handbacks_before = _relay_counts(pg_proxy)
    out = subprocess.run(
        ["pgbench", "-n", "-f", str(script), "-M", mode, "-c", str(clients), "-j", "2", "-t", str(per_client),
         "-h", "127.0.0.1", "-p", str(pg_proxy.port("writer")), "-U", pg_cluster.app_user, pg_cluster.database],
        env=_env(pg_cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    total = clients * per_client
    assert f"number of transactions actually processed: {total}/{total}" in out.stdout
    events, handbacks = _relay_counts(pg_proxy)
    # Every transaction is a request and an answer, served by the hub without waking the
    # session's tasks: they log in, serve the first request, then park in the hub until the
    # session ends.
    assert events - events_before >= 2 * (total - clients)
    assert handbacks - handbacks_before <= 4 * clients


def test_a_client_that_stops_reading_gets_a_large_result_whole(pg_cluster: PostgresCluster,
                                                               pg_proxy: ProxyProcess) -> None:
    rows_wanted = 40_000  # about 20 MB: more than the socket buffers between proxy and client

    async def main() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg_proxy.port("writer"), user=pg_cluster.app_user,
                                     password=pg_cluster.app_password, database=pg_cluster.database, ssl=False)
        try:
            loop = asyncio.get_running_loop()
            # Mid-result the client's event loop stalls: the proxy's sends fill the socket
            # and the rest must wait for the client, then arrive intact and in order.
            loop.call_later(0.05, time.sleep, 1.0)
            query = f"select i, repeat(md5(i::text), 16) as pad from generate_series(1, {rows_wanted}) i"
            rows = await conn.fetch(query)
            assert [r["i"] for r in rows] == list(range(1, rows_wanted + 1))
            assert all(len(r["pad"]) == 512 for r in rows)
            assert await conn.fetchval("select 7 * 6") == 42  # and the session goes on
        finally:
            await conn.close()

    _, handbacks_before = _relay_counts(pg_proxy)
    asyncio.run(main())
    _, handbacks = _relay_counts(pg_proxy)
    assert handbacks > handbacks_before  # the stalled client sent the answer back to the session's task


def test_pipelined_requests_while_one_is_in_flight(pg_proxy: ProxyProcess) -> None:
    """Requests sent before the answers to earlier ones arrive each get their own answer, in order."""
    s = md5_login(pg_proxy)
    with s:
        s.sendall(m.Query("select 1 as a").encode())
        read_until_ready(s)  # settled: the session's tasks are parked in the hub
        s.sendall(m.Query("select pg_sleep(0.2), 'first' as x").encode())
        time.sleep(0.05)  # the first is running when the next ones arrive, one send each
        s.sendall(m.Query("select 'second' as x").encode())
        s.sendall(m.Parse("", "select $1::text || '!' as x").encode()
                  + m.Bind("", "", (), (b"third",), ()).encode() + m.Execute("", 0).encode())
        s.sendall(m.Sync().encode())
        s.sendall(m.Query("begin; select 'fourth' as x").encode())
        s.sendall(m.Query("select 'fifth' as x; rollback").encode())
        answers = read_until_ready(s, count=5)
        rows = [msg.values[-1] for msg in answers if isinstance(msg, m.DataRow)]
        assert rows == [b"first", b"second", b"third!", b"fourth", b"fifth"]
        assert [msg.status for msg in answers if isinstance(msg, m.ReadyForQuery)] == ["I", "I", "I", "T", "I"]
        s.sendall(m.Query("select 42").encode())
        answers = read_until_ready(s)
        assert [msg.values for msg in answers if isinstance(msg, m.DataRow)] == [(b"42",)]
