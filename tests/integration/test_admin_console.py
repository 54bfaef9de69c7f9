"""The admin console of a real proxy process in front of the real cluster, driven by psql."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
from collections.abc import Iterator

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-secret"


@pytest.fixture(scope="module")
def console_proxy(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    doc = pg_proxy_config(pg_cluster)
    doc["admin"] = {"users": [{"name": ADMIN_USER, "password": ADMIN_PASSWORD}]}
    with ProxyProcess(doc, tmp_path_factory.mktemp("console-proxy")) as proxy:
        wait_until(lambda: settled(proxy, pg_cluster), 20, "every instance up with its role")
        yield proxy


def psql(proxy: ProxyProcess, sql: str, *, endpoint: str = "writer", user: str = ADMIN_USER,
         password: str = ADMIN_PASSWORD, database: str = "endpoint_proxy",
         check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(proxy.port(endpoint)), "-U", user, database,
         "--csv", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=env, capture_output=True, text=True, timeout=30, check=check)


def show(proxy: ProxyProcess, what: str, **kw: str) -> list[dict[str, str]]:
    out = psql(proxy, f"SHOW {what}", **kw)
    return list(csv.DictReader(io.StringIO(out.stdout)))


def settled(proxy: ProxyProcess, cluster: PostgresCluster) -> bool:
    rows = show(proxy, "INSTANCES")
    return (len(rows) == len(cluster.instances) and all(r["health"] == "up" for r in rows)
            and {r["name"] for r in rows if r["role"] == "writer"} == {cluster.primary_name})


def test_show_instances(pg_cluster: PostgresCluster, console_proxy: ProxyProcess) -> None:
    rows = show(console_proxy, "INSTANCES")
    assert list(rows[0]) == ["cluster", "name", "address", "role", "health", "lag_bytes", "lag_ms", "timeline",
                             "fenced", "connections", "last_error"]
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {i.name for i in pg_cluster.instances}
    for inst in pg_cluster.instances:
        r = by_name[inst.name]
        assert r["cluster"] == "pg"
        assert r["address"] == f"{inst.host}:{inst.port}"
        assert r["role"] == ("writer" if inst.name == pg_cluster.primary_name else "reader")
        assert (r["health"], r["fenced"], r["last_error"]) == ("up", "false", "")
        assert int(r["lag_bytes"]) >= 0
    assert by_name[pg_cluster.primary_name]["timeline"] != ""


def test_show_endpoints(pg_cluster: PostgresCluster, console_proxy: ProxyProcess) -> None:
    rows = {r["name"]: r for r in show(console_proxy, "ENDPOINTS")}
    configured = {ep["name"] for ep in console_proxy.doc["clusters"][0]["endpoints"]}
    assert set(rows) == configured
    replicas = sorted(i.name for i in pg_cluster.instances if i.name != pg_cluster.primary_name)
    assert rows["writer"]["kind"] == "writer"
    assert rows["writer"]["listen"] == f"127.0.0.1:{console_proxy.port('writer')}"
    assert rows["writer"]["members"] == pg_cluster.primary_name
    assert sorted(rows["reader"]["members"].split(",")) == replicas
    assert rows["rw_session"]["consistency"] == "session"
    assert rows["writer"]["consistency"] == ""
    assert rows["writer"]["tls"] == "optional"
    if "tls_off" in rows:
        assert rows["tls_off"]["tls"] == "off"


def test_show_clusters(pg_cluster: PostgresCluster, console_proxy: ProxyProcess) -> None:
    (row,) = show(console_proxy, "clusters;")
    assert row == {"name": "pg", "protocol": "postgresql", "status": "available",
                   "writer": pg_cluster.primary_name, "instances": str(len(pg_cluster.instances)),
                   "endpoints": str(len(console_proxy.doc["clusters"][0]["endpoints"])),
                   # no HA authority configured: its columns are NULL
                   "authority": "", "authority_status": "", "leader": "", "revision": ""}


def test_show_sessions_lists_an_open_session(pg_cluster: PostgresCluster, console_proxy: ProxyProcess) -> None:
    async def main() -> list[dict[str, str]]:
        conn = await asyncpg.connect(host="127.0.0.1", port=console_proxy.port("reader"), user=pg_cluster.app_user,
                                     password=pg_cluster.app_password, database=pg_cluster.database, ssl=False,
                                     timeout=10)
        try:
            await conn.fetchval("select 1")
            # psql blocks this loop; the asyncpg connection just stays open and idle meanwhile.
            return show(console_proxy, "SESSIONS")
        finally:
            await conn.close()

    rows = asyncio.run(main())
    assert list(rows[0]) == ["cluster", "endpoint", "id", "user", "database", "instance", "state", "client",
                             "pinned"]
    mine = [r for r in rows if r["endpoint"] == "reader" and r["user"] == pg_cluster.app_user]
    assert len(mine) == 1, rows
    (r,) = mine
    replicas = {i.name for i in pg_cluster.instances if i.name != pg_cluster.primary_name}
    assert (r["cluster"], r["database"], r["state"]) == ("pg", pg_cluster.database, "idle")
    assert r["instance"] in replicas
    assert r["client"].startswith("127.0.0.1:")
    assert int(r["id"]) > 0
    assert r["pinned"] == ""


def test_show_sessions_says_why_a_session_is_pinned(pg_cluster: PostgresCluster,
                                                    console_proxy: ProxyProcess) -> None:
    async def main() -> list[dict[str, str]]:
        conn = await asyncpg.connect(host="127.0.0.1", port=console_proxy.port("rw"), user=pg_cluster.app_user,
                                     password=pg_cluster.app_password, database=pg_cluster.database, ssl=False,
                                     timeout=10)
        try:
            await conn.execute("listen pinned_channel")  # state that cannot move: the session stays put
            return show(console_proxy, "SESSIONS")
        finally:
            await conn.close()

    during = asyncio.run(main())
    (mine,) = [r for r in during if r["endpoint"] == "rw" and r["user"] == pg_cluster.app_user]
    assert (mine["pinned"], mine["instance"]) == ("LISTEN", pg_cluster.primary_name)


def test_show_help_and_errors(console_proxy: ProxyProcess) -> None:
    commands = {r["command"] for r in show(console_proxy, "HELP")}
    assert {"SHOW CLUSTERS", "SHOW INSTANCES", "SHOW ENDPOINTS", "SHOW SESSIONS", "SHOW HELP", "RELOAD"} <= commands
    bad = psql(console_proxy, "select 1", check=False)
    assert bad.returncode == 1
    assert "unrecognized admin console command" in bad.stderr
    # An error does not end the session: psql runs the next -c after it without ON_ERROR_STOP.
    env = {**os.environ, "PGPASSWORD": ADMIN_PASSWORD, "PGSSLMODE": "disable"}
    out = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(console_proxy.port("writer")), "-U", ADMIN_USER, "endpoint_proxy",
         "-At", "-c", "SHOW STATS", "-c", "SHOW CLUSTERS"],
        env=env, capture_output=True, text=True, timeout=30)
    assert "SHOW STATS" in out.stderr
    assert out.stdout.startswith("pg|postgresql|available|")


def test_reload(console_proxy: ProxyProcess) -> None:
    out = psql(console_proxy, "RELOAD")
    assert out.stdout.strip() == "RELOAD"
    assert show(console_proxy, "CLUSTERS")[0]["status"] == "available"


def test_any_postgresql_endpoint_serves_the_console(console_proxy: ProxyProcess) -> None:
    for endpoint in ("reader", "rw", "inst1"):
        assert [r["name"] for r in show(console_proxy, "CLUSTERS", endpoint=endpoint)] == ["pg"]


def test_wrong_password_is_refused(console_proxy: ProxyProcess) -> None:
    out = psql(console_proxy, "SHOW HELP", password="wrong", check=False)
    assert out.returncode == 2
    assert f'password authentication failed for user "{ADMIN_USER}"' in out.stderr
    assert out.stdout == ""


def test_an_application_user_gets_no_console(pg_cluster: PostgresCluster, console_proxy: ProxyProcess) -> None:
    out = psql(console_proxy, "SHOW HELP", user=pg_cluster.app_user, password=pg_cluster.app_password,
               check=False)
    assert out.returncode == 2
    assert f'password authentication failed for user "{pg_cluster.app_user}"' in out.stderr
    # The same user on its own database still gets the server.
    ok = psql(console_proxy, "select 1", user=pg_cluster.app_user, password=pg_cluster.app_password,
              database=pg_cluster.database)
    assert ok.stdout.splitlines()[-1] == "1"
