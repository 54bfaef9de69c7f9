"""Live reload (SIGHUP, POST /reload) and graceful shutdown (SIGTERM) with live sessions."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import tomli_w

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration


async def _connect(port: int, cluster: PostgresCluster, **kw: Any) -> asyncpg.Connection:
    kw.setdefault("user", cluster.app_user)
    kw.setdefault("password", cluster.app_password)
    return await asyncpg.connect(host="127.0.0.1", port=port, database=cluster.database, ssl=False,
                                 timeout=10, **kw)


def _small_config(cluster: PostgresCluster) -> dict[str, Any]:
    doc = pg_proxy_config(cluster)
    doc.pop("tls", None)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    doc["server"]["shutdown_timeout_ms"] = 20000
    c = doc["clusters"][0]
    c["endpoints"] = [e for e in c["endpoints"] if e["name"] in ("writer", "reader")]
    c["users"] = [u for u in c["users"] if u["name"] == cluster.app_user]
    return doc


def _post_reload(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    url = f"http://{proxy.doc['admin']['listen']}/reload"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_reload_adds_and_removes_without_dropping_sessions(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess,
                                                          tmp_path: Path) -> None:
    # (pg_proxy: its fixture creates the md5user role this test adds to the proxy)
    names = [i.name for i in pg_cluster.instances]
    doc = _small_config(pg_cluster)
    with ProxyProcess(doc, tmp_path) as proxy:

        async def main() -> None:
            kept = await _connect(proxy.port("writer"), pg_cluster)
            on_reader = [await _connect(proxy.port("reader"), pg_cluster) for _ in range(4)]
            await kept.execute("set application_name = 'kept'")

            # 1. add an endpoint and a user, and take one replica out, by SIGHUP
            new = copy.deepcopy(doc)
            c = new["clusters"][0]
            c["endpoints"].append({"name": "inst0", "listen": f"127.0.0.1:{free_port()}", "kind": "instance",
                                   "instance": names[0]})
            c["users"].append({"name": "md5user", "password": "md5-secret", "auth": "md5"})
            c["instances"] = [i for i in c["instances"] if i["name"] != names[2]]
            proxy.config_path.write_bytes(tomli_w.dumps(new).encode())
            proxy.doc = new
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGHUP)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_until(lambda: '"config_reloaded"' in proxy.log(), 10, "the reload"))
            added = await _connect(proxy.port("inst0"), pg_cluster)
            assert await added.fetchval("select inet_server_port()") == pg_cluster.instance(names[0]).port
            await added.close()
            md5 = await _connect(proxy.port("writer"), pg_cluster, user="md5user", password="md5-secret")
            await md5.close()
            # the untouched session goes on, state intact
            assert await kept.fetchval("select current_setting('application_name')") == "kept"
            # reader sessions that were on the removed replica moved at their next statement
            ports = {await c.fetchval("select inet_server_port()") for c in on_reader}
            assert ports == {pg_cluster.instance(names[1]).port}

            # 2. an invalid config is refused, and the old one stays
            proxy.config_path.write_text("[[clusters]]\nname = 'x'\nprotocol = 'oracle'\n")
            status, body = _post_reload(proxy)
            assert status == 400 and body["ok"] is False and "clusters[0].protocol" in body["error"]
            assert await kept.fetchval("select 1") == 1

            # 3. removing an endpoint closes its listener but not its sessions
            smaller = copy.deepcopy(new)
            smaller["clusters"][0]["endpoints"] = [e for e in smaller["clusters"][0]["endpoints"]
                                                   if e["name"] != "reader"]
            proxy.config_path.write_bytes(tomli_w.dumps(smaller).encode())
            status, body = _post_reload(proxy)
            assert status == 200 and body["ok"] is True
            assert _refuses(proxy.port("reader"))
            assert await on_reader[0].fetchval("select 1") == 1
            for conn in [kept, *on_reader]:
                await conn.close()

        asyncio.run(main())
    assert '"config_reload_failed"' in proxy.log()


def test_sigterm_drains_then_a_second_signal_closes_at_once(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    pg_cluster.sql(pg_cluster.primary_name, "create table if not exists drained (id int)", user=pg_cluster.app_user)
    doc = _small_config(pg_cluster)
    proxy = ProxyProcess(doc, tmp_path).start()
    try:
        assert proxy.proc is not None

        async def main() -> None:
            idle = await _connect(proxy.port("writer"), pg_cluster)
            busy = await _connect(proxy.port("writer"), pg_cluster)
            tx = busy.transaction()
            await tx.start()
            await busy.execute("insert into drained values (1)")
            proxy.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: wait_until(lambda: _refuses(proxy.port("writer")), 5,
                                                                "the listener to close"))
            # the idle session was closed (FATAL 57P01, as PostgreSQL's own shutdown sends); the open
            # transaction may finish. asyncpg reports a FATAL that came while it was idle either way:
            # as the error, or as InternalClientError when its next query meets it (it does so directly too).
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError,
                                asyncpg.InternalClientError)):
                await idle.fetchval("select 1")
            await busy.execute("insert into drained values (2)")
            await tx.commit()
            await loop.run_in_executor(None, lambda: proxy.proc.wait(10))  # type: ignore[union-attr]

        asyncio.run(main())
        assert proxy.proc.returncode == 0
        assert pg_cluster.sql(pg_cluster.primary_name, "select count(*) from drained") == "2"
    finally:
        proxy.stop()

    (tmp_path / "second").mkdir()
    proxy = ProxyProcess(doc, tmp_path / "second").start()
    assert proxy.proc is not None
    try:
        async def second() -> float:
            busy = await _connect(proxy.port("writer"), pg_cluster)
            await busy.execute("begin")
            proxy.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: wait_until(lambda: '"shutdown_started"' in proxy.log(), 5,
                                                                "the drain to start"))
            started = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            await loop.run_in_executor(None, lambda: proxy.proc.wait(5))  # type: ignore[union-attr]
            return time.monotonic() - started

        assert asyncio.run(second()) < 5
    finally:
        proxy.stop()
