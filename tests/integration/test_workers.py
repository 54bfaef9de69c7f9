"""Worker processes sharing each endpoint's port: sessions work, and a cancel finds its session
whichever worker the CancelRequest lands on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, pg_proxy_config

pytestmark = pytest.mark.integration


def test_two_workers_serve_and_cancel_across_workers(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    doc = pg_proxy_config(pg_cluster)
    doc.pop("tls", None)
    doc["server"]["workers"] = 2
    c = doc["clusters"][0]
    c["endpoints"] = [e for e in c["endpoints"] if e["name"] in ("writer", "reader")]
    with ProxyProcess(doc, tmp_path) as proxy:

        async def one() -> int:
            conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port("writer"), user=pg_cluster.app_user,
                                         password=pg_cluster.app_password, database=pg_cluster.database,
                                         ssl=False, timeout=10)
            try:
                # each cancel opens a new connection, which the kernel hands to either worker
                for _ in range(3):
                    with pytest.raises(asyncio.TimeoutError):
                        await conn.execute("select pg_sleep(30)", timeout=0.3)
                    assert await conn.fetchval("select 1", timeout=5) == 1
                return int(await conn.fetchval("select pg_backend_pid()"))
            finally:
                await conn.close()

        async def main() -> list[int]:
            return list(await asyncio.gather(*(one() for _ in range(8))))

        pids = asyncio.run(main())
        assert len(set(pids)) == 8
        log = proxy.log()
        assert '"worker": 0' in log and '"worker": 1' in log
    active = pg_cluster.sql(pg_cluster.primary_name, "select count(*) from pg_stat_activity "
                            "where query = 'select pg_sleep(30)' and state = 'active'")
    assert active == "0"
