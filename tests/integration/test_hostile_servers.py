"""A proxy in front of a real cluster plus hostile fake instances: it stays up, they are down, the rest serves.

Each fake instance (tests/fixtures/fakeserver.py) closes at once, never answers, sends
garbage, announces a 1 GiB message, breaks off a TLS handshake, asks for a cleartext
password or answers the probe with nonsense. The monitor must call each of them down with a
clear last_error, and the real endpoints must keep serving, for both protocols. A LATIN1
database whose function names are not UTF-8 must not end the proxy either.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures import fakeserver as fs
from tests.fixtures.proxy import ProxyProcess, free_port, wait_until

pytestmark = pytest.mark.integration

# name -> (script, what last_error must say)
PG_FAKES: dict[str, tuple[list[fs.Step], str]] = {
    "fake_close": (fs.close_at_once(), "closed the connection"),
    "fake_silent": (fs.silent(), "timed out"),
    "fake_garbage": (fs.garbage(), "exceeds the limit"),
    "fake_huge": (fs.pg_huge_message(), "exceeds the limit"),
    "fake_cleartext": (fs.pg_cleartext_password(), "cleartext password"),  # refused, never answered
    "fake_bad_row": (fs.pg_query_answer(fs.pg_data_row(*[b"\xff"] * 6) + fs.PG_READY_IDLE), "probe column"),
}
PG_TLS_FAKES = {"fake_tls": (fs.pg_ssl_then_garbage(), "TLS handshake")}
MY_FAKES: dict[str, tuple[list[fs.Step], str]] = {
    "fake_close": (fs.close_at_once(), "closed the connection"),
    "fake_silent": (fs.silent(), "timed out"),
    "fake_garbage": (fs.garbage(), "protocol"),
    "fake_huge": (fs.mysql_huge_packet(), "bigger than the limit"),
    "fake_greeting": (fs.mysql_malformed_greeting(), "handshake"),
    "fake_after_greeting": (fs.mysql_greeting_then_garbage(), "protocol"),
    "fake_bad_answer": (fs.mysql_query_answer(fs.mysql_packet(1, b"\x00\x00\x00\x02\x00\x00\x00")),
                        "unexpected answer"),
}
MY_TLS_FAKES = {"fake_tls": (fs.mysql_ssl_then_garbage(), "TLS handshake")}


def _cluster_doc(name: str, protocol: str, cluster: Any, fakes: dict[str, fs.FakeServer],
                 **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": protocol,
        "health_check_interval_ms": 200,
        "failover_timeout_ms": 5000,
        "monitor": {"user": cluster.monitor_user, "password": cluster.monitor_password},
        "users": [{"name": cluster.app_user, "password": cluster.app_password}],
        "instances": [{"name": i.name, "host": i.host, "port": i.port} for i in cluster.instances]
        + [{"name": n, "host": "127.0.0.1", "port": f.port} for n, f in fakes.items()],
        "endpoints": [
            {"name": f"{name}_writer", "listen": f"127.0.0.1:{free_port()}", "kind": "writer"},
            {"name": f"{name}_reader", "listen": f"127.0.0.1:{free_port()}", "kind": "reader"},
            {"name": f"{name}_rw", "listen": f"127.0.0.1:{free_port()}", "kind": "readwrite"},
        ],
        **extra,
    }


def _start(stack: ExitStack, scripts: dict[str, tuple[list[fs.Step], str]]) -> dict[str, fs.FakeServer]:
    return {name: stack.enter_context(fs.FakeServer(script)) for name, (script, _) in scripts.items()}


def _topology(proxy: ProxyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{proxy.doc['admin']['listen']}/topology", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return {c["name"]: c for c in doc["clusters"]}


def _all_fakes_down(proxy: ProxyProcess, expected: dict[str, dict[str, tuple[list[fs.Step], str]]]) -> bool:
    clusters = _topology(proxy)
    for cluster, fakes in expected.items():
        instances = {i["name"]: i for i in clusters[cluster]["instances"]}
        for name in fakes:
            if instances[name]["health"] != "down":
                return False
        if clusters[cluster]["writer"] is None:
            return False
    return True


def _check_fakes(proxy: ProxyProcess, expected: dict[str, dict[str, tuple[list[fs.Step], str]]],
                 cluster_obj: Any) -> None:
    try:
        wait_until(lambda: _all_fakes_down(proxy, expected), 30, "every fake instance to be down and a writer known")
    except TimeoutError:
        print(json.dumps(_topology(proxy), indent=1), proxy.log()[-3000:])
        raise
    clusters = _topology(proxy)
    for cluster, fakes in expected.items():
        doc = clusters[cluster]
        instances = {i["name"]: i for i in doc["instances"]}
        assert doc["writer"] == cluster_obj.primary_name
        for name, (_, says) in fakes.items():
            error = instances[name]["last_error"]
            assert error and re.search(says, error), (cluster, name, error)
            assert instances[name]["role"] != "writer"
        for inst in cluster_obj.instances:
            assert instances[inst.name]["health"] == "up", (cluster, inst.name, instances[inst.name])


def _still_up(proxy: ProxyProcess, seconds: float) -> None:
    """The monitor goes on probing the fakes for a while; the process must live through it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proxy.proc is not None and proxy.proc.poll() is None, proxy.log()[-4000:]
        time.sleep(0.1)
    assert '"monitor_error"' not in proxy.log()


def test_postgresql_hostile_instances(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    with ExitStack() as stack:
        fakes, tls_fakes = _start(stack, PG_FAKES), _start(stack, PG_TLS_FAKES)
        doc = {
            "logging": {"format": "json", "level": "info"},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            # backend_auth allows "trust" too: the scripted servers log the probe in without a password
            "clusters": [_cluster_doc("pg", "postgresql", pg_cluster, fakes, backend_auth=["scram-sha-256", "trust"]),
                         _cluster_doc("pg_tls", "postgresql", pg_cluster, tls_fakes, backend_tls="require")],
        }
        proxy = stack.enter_context(ProxyProcess(doc, tmp_path))
        _check_fakes(proxy, {"pg": PG_FAKES, "pg_tls": PG_TLS_FAKES}, pg_cluster)
        primary = pg_cluster.instance(pg_cluster.primary_name).port
        replicas = {i.port for i in pg_cluster.instances} - {primary}

        async def port_of(endpoint: str) -> int:
            conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), user=pg_cluster.app_user,
                                         password=pg_cluster.app_password, database=pg_cluster.database,
                                         ssl=False, timeout=10)
            try:
                return int(await conn.fetchval("select inet_server_port()"))
            finally:
                await conn.close()

        for cluster in ("pg", "pg_tls"):
            assert asyncio.run(port_of(f"{cluster}_writer")) == primary
            assert asyncio.run(port_of(f"{cluster}_reader")) in replicas
            assert asyncio.run(port_of(f"{cluster}_rw")) in replicas
        for fake in [*fakes.values(), *tls_fakes.values()]:
            assert fake.connections >= 1
        _still_up(proxy, 2.0)


def test_mysql_hostile_instances(my_cluster: MariaDBCluster, tmp_path: Path) -> None:
    with ExitStack() as stack:
        fakes, tls_fakes = _start(stack, MY_FAKES), _start(stack, MY_TLS_FAKES)
        doc = {
            "logging": {"format": "json", "level": "info"},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "clusters": [_cluster_doc("my", "mysql", my_cluster, fakes),
                         # prefer: the shared cluster's servers offer no TLS; the fake does, then breaks it
                         _cluster_doc("my_tls", "mysql", my_cluster, tls_fakes, backend_tls="prefer")],
        }
        proxy = stack.enter_context(ProxyProcess(doc, tmp_path))
        _check_fakes(proxy, {"my": MY_FAKES, "my_tls": MY_TLS_FAKES}, my_cluster)
        primary = my_cluster.instance(my_cluster.primary_name).port
        replicas = {i.port for i in my_cluster.instances} - {primary}

        def port_of(endpoint: str) -> int:
            conn = pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), user=my_cluster.app_user,
                                   password=my_cluster.app_password, database=my_cluster.database,
                                   connect_timeout=10, read_timeout=30)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT @@port")
                    row = cur.fetchone()
                    assert row is not None
                    return int(row[0])
            finally:
                conn.close()

        for cluster in ("my", "my_tls"):
            assert port_of(f"{cluster}_writer") == primary
            assert port_of(f"{cluster}_reader") in replicas
            assert port_of(f"{cluster}_rw") in replicas | {primary}  # (@@port reads go to the writer)
        for fake in [*fakes.values(), *tls_fakes.values()]:
            assert fake.connections >= 1
        _still_up(proxy, 2.0)


# --- a LATIN1 database -----------------------------------------------------------------------------


@pytest.fixture
def latin1_db(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A LATIN1 database with a volatile function whose name is not ASCII ("fünf": 0xFC in LATIN1),
    whose clients get LATIN1 unless they ask for another encoding (a legacy application's setup)."""
    primary = pg_cluster.primary_name
    db = "latin1_catalog"
    pg_cluster.sql(primary, f"drop database if exists {db}", database="postgres")
    pg_cluster.sql(primary, f"create database {db} encoding 'LATIN1' template template0 lc_collate 'C' "
                            f"lc_ctype 'C' owner {pg_cluster.app_user}", database="postgres")
    pg_cluster.sql(primary, "set client_encoding = 'UTF8'; "
                            "create function \"fünf\"() returns int language sql volatile as 'select 5'", database=db)
    pg_cluster.sql(primary, f"alter database {db} set client_encoding = 'LATIN1'", database="postgres")
    pg_cluster.wait_caught_up(*[i.name for i in pg_cluster.instances if i.name != primary])
    yield db
    pg_cluster.sql(primary, f"drop database if exists {db} with (force)", database="postgres")


def test_a_latin1_catalog_is_read_and_does_not_end_the_proxy(pg_cluster: PostgresCluster, latin1_db: str,
                                                            tmp_path: Path) -> None:
    doc = {
        "logging": {"format": "json", "level": "info"},
        "clusters": [_cluster_doc("pg", "postgresql", pg_cluster, {})],
    }
    primary = pg_cluster.instance(pg_cluster.primary_name).port
    replicas = {i.port for i in pg_cluster.instances} - {primary}
    with ProxyProcess(doc, tmp_path) as proxy:
        async def main() -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port("pg_rw"), user=pg_cluster.app_user,
                                         password=pg_cluster.app_password, database=latin1_db, ssl=False,
                                         timeout=10)
            try:
                assert await conn.fetchval("select current_setting('server_encoding')") == "LATIN1"
                assert await conn.fetchval("select inet_server_port()") in replicas
                # The writer's catalog knows "fünf" writes (it is volatile): it runs on the writer.
                assert await conn.fetchrow('select "fünf"(), inet_server_port()') == (5, primary)
            finally:
                await conn.close()

        asyncio.run(main())
        assert proxy.proc is not None and proxy.proc.poll() is None
        assert '"function_catalog_failed"' not in proxy.log()
