"""A reload reaches every worker process: a removed user is refused whichever worker a client lands on."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import tomli_w

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

TOKEN = "workers-reload-token-123"


async def logins(port: int, cluster: PostgresCluster, user: str, password: str, n: int) -> list[str]:
    """Log in ``n`` times (new connections, spread over the workers by the kernel)."""
    outcomes = []
    for _ in range(n):
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                         database=cluster.database, ssl=False, timeout=10)
        except asyncpg.InvalidPasswordError:
            outcomes.append("refused")
            continue
        await conn.fetchval("select 1")
        await conn.close()
        outcomes.append("ok")
    return outcomes


def reloads_logged(proxy: ProxyProcess) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in proxy.log().splitlines():
        if '"config_reloaded"' in line:
            worker = json.loads(line).get("worker", 0)
            counts[worker] = counts.get(worker, 0) + 1
    return counts


def test_a_removed_user_is_refused_on_every_worker(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess,
                                                   tmp_path: Path) -> None:
    # (pg_proxy: its fixture creates the md5user role)
    doc = pg_proxy_config(pg_cluster)
    doc.pop("tls", None)
    doc["server"]["workers"] = 2
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}", "token": TOKEN}
    c = doc["clusters"][0]
    c["endpoints"] = [e for e in c["endpoints"] if e["name"] == "writer"]
    with ProxyProcess(doc, tmp_path) as proxy:
        port = proxy.port("writer")
        assert asyncio.run(logins(port, pg_cluster, "md5user", "md5-secret", 8)) == ["ok"] * 8

        without: dict[str, Any] = copy.deepcopy(doc)
        without["clusters"][0]["users"] = [u for u in c["users"] if u["name"] != "md5user"]
        proxy.config_path.write_bytes(tomli_w.dumps(without).encode())
        admin_port = int(doc["admin"]["listen"].rsplit(":", 1)[1])
        proxy.wait_for_port(admin_port, "the admin server")
        request = urllib.request.Request(f"http://{doc['admin']['listen']}/reload", method="POST", data=b"",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer) == {"ok": True}
        assert reloads_logged(proxy) == {0: 1, 1: 1}  # worker 0 answered once both had applied it
        assert asyncio.run(logins(port, pg_cluster, "md5user", "md5-secret", 12)) == ["refused"] * 12
        assert asyncio.run(logins(port, pg_cluster, pg_cluster.app_user, pg_cluster.app_password, 6)) == ["ok"] * 6

        # SIGHUP to the parent: the same, through worker 0.
        proxy.config_path.write_bytes(tomli_w.dumps(doc).encode())
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads_logged(proxy) == {0: 2, 1: 2}, 20, "both workers to reload")
        assert asyncio.run(logins(port, pg_cluster, "md5user", "md5-secret", 8)) == ["ok"] * 8
    log = proxy.log()
    assert '"worker": 0' in log and '"worker": 1' in log
