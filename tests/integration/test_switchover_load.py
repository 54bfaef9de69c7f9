"""A planned switchover under load: zero client errors, nothing acknowledged lost.

Clients keep writing (transactions and autocommit statements) and reading through the writer
and readwrite endpoints while the proxy switches the writer over; the sessions hold new writer
work at its boundary while the switchover runs, and send it to the new writer after. Every
row a client saw committed is on the new writer.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, my_proxy_config, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

ADMIN = {"name": "admin", "password": "admin-secret"}
LOAD_S = 4.0  # the load runs this long; the switchover starts a second into it


def switchover(proxy: ProxyProcess, to: str) -> dict[str, Any]:
    host, port = proxy.doc["admin"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    basic = base64.b64encode(f"{ADMIN['name']}:{ADMIN['password']}".encode()).decode()
    try:
        conn.request("POST", "/switchover", json.dumps({"to": to}), {"Authorization": f"Basic {basic}"})
        response = conn.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    return answer


def topology_writer(proxy: ProxyProcess) -> str | None:
    host, port = proxy.doc["admin"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    basic = base64.b64encode(f"{ADMIN['name']}:{ADMIN['password']}".encode()).decode()
    try:
        conn.request("GET", "/topology", headers={"Authorization": f"Basic {basic}"})
        doc = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    writer: str | None = doc["clusters"][0]["writer"]
    return writer


def drill_doc(doc: dict[str, Any], promotion: dict[str, Any]) -> dict[str, Any]:
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}", "users": [ADMIN]}
    doc["clusters"] = doc["clusters"][:1]
    doc["clusters"][0].update(promotion=promotion, switchover_timeout_ms=5000, health_check_interval_ms=100)
    return doc


# --- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresCluster, ProxyProcess]]:
    with PostgresCluster(replicas=2) as cluster:
        cluster.sql("pg0", "create table load_rows (id bigint primary key, via text)", user=cluster.app_user)
        doc = drill_doc(pg_proxy_config(cluster), {"method": "sql", "user": cluster.promotion_user,
                                                   "password": cluster.promotion_password})
        with ProxyProcess(doc, tmp_path_factory.mktemp("pg-load")) as proxy:
            wait_until(lambda: topology_writer(proxy) == "pg0", 20, "the proxy to know the writer")
            yield cluster, proxy


def test_pg_switchover_under_load_loses_nothing_and_fails_nothing(
        pg_load: tuple[PostgresCluster, ProxyProcess]) -> None:
    cluster, proxy = pg_load
    errors: list[str] = []
    acknowledged: list[int] = []
    longest_wait = [0.0]

    async def client(n: int, endpoint: str) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                                     password=cluster.app_password, database=cluster.database, ssl=False,
                                     timeout=10)
        until = time.monotonic() + LOAD_S
        i = n * 1_000_000
        try:
            while time.monotonic() < until:
                i += 1
                started = time.monotonic()
                try:
                    if i % 3 == 0:
                        async with conn.transaction():
                            await conn.execute("insert into load_rows values ($1, $2)", i, endpoint)
                            await conn.fetchval("select count(*) from load_rows where id = $1", i)
                    else:
                        await conn.execute("insert into load_rows values ($1, $2)", i, endpoint)
                    acknowledged.append(i)
                    await conn.fetchval("select 1")
                except Exception as e:  # noqa: BLE001 - every error is a failure of this test
                    errors.append(f"{endpoint} #{i}: {type(e).__name__}: {e}")
                longest_wait[0] = max(longest_wait[0], time.monotonic() - started)
        finally:
            await conn.close()

    async def main() -> dict[str, Any]:
        clients = [asyncio.create_task(client(n, ("writer", "rw")[n % 2])) for n in range(1, 9)]
        await asyncio.sleep(1.0)
        answer = await asyncio.to_thread(switchover, proxy, "pg1")
        await asyncio.gather(*clients)
        return answer

    answer = asyncio.run(main())
    record = answer["switchover"]
    assert (record["from"], record["to"], record["outcome"]) == ("pg0", "pg1", "completed")
    assert not errors, errors[:10]
    assert len(acknowledged) > 100
    cluster.primary_changed("pg1")
    present = {int(x) for x in cluster.sql("pg1", "select id from load_rows").split()}
    missing = set(acknowledged) - present
    assert not missing, f"{len(missing)} acknowledged rows are not on the new writer"
    assert longest_wait[0] < 5.0, f"a statement waited {longest_wait[0]:.2f} s"
    assert record["pause_ms"] <= 1000


# --- MariaDB ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def my_load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBCluster, ProxyProcess]]:
    with MariaDBCluster(replicas=2) as cluster:
        cluster.sql(cluster.primary_name, "CREATE TABLE load_rows (id BIGINT PRIMARY KEY, via VARCHAR(16))",
                    database=cluster.database)
        promotion = {"method": "sql", "user": cluster.promotion_user, "password": cluster.promotion_password}
        doc = drill_doc(my_proxy_config(cluster), promotion)
        with ProxyProcess(doc, tmp_path_factory.mktemp("my-load")) as proxy:
            wait_until(lambda: topology_writer(proxy) == cluster.primary_name, 20, "the proxy to know the writer")
            yield cluster, proxy


def test_my_switchover_under_load_loses_nothing_and_fails_nothing(
        my_load: tuple[MariaDBCluster, ProxyProcess]) -> None:
    cluster, proxy = my_load
    errors: list[str] = []
    acknowledged: list[int] = []
    lock = threading.Lock()
    old = cluster.primary_name
    new = next(i.name for i in cluster.instances if i.name != old)

    def client(n: int, endpoint: str) -> None:
        conn = pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                               password=cluster.app_password, database=cluster.database, autocommit=True,
                               connect_timeout=10, read_timeout=30)
        until = time.monotonic() + LOAD_S
        i = n * 1_000_000
        try:
            while time.monotonic() < until:
                i += 1
                try:
                    with conn.cursor() as cur:
                        if i % 3 == 0:
                            cur.execute("BEGIN")
                            cur.execute("INSERT INTO load_rows VALUES (%s, %s)", (i, endpoint))
                            cur.execute("COMMIT")
                        else:
                            cur.execute("INSERT INTO load_rows VALUES (%s, %s)", (i, endpoint))
                        cur.execute("SELECT 1")
                        cur.fetchall()
                    with lock:
                        acknowledged.append(i)
                except Exception as e:  # noqa: BLE001 - every error is a failure of this test
                    with lock:
                        errors.append(f"{endpoint} #{i}: {type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n, ("writer", "rw")[n % 2])) for n in range(1, 7)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    answer = switchover(proxy, new)
    for t in threads:
        t.join(60)
    record = answer["switchover"]
    assert (record["from"], record["to"], record["outcome"]) == (old, new, "completed")
    assert not errors, errors[:10]
    assert len(acknowledged) > 100
    present = {int(x) for x in cluster.sql(new, "SELECT id FROM load_rows", database=cluster.database).split()}
    missing = set(acknowledged) - present
    assert not missing, f"{len(missing)} acknowledged rows are not on the new writer"
    assert record["pause_ms"] <= 1000
