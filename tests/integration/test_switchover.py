"""Planned switchover of real clusters through the proxy: PostgreSQL and MariaDB, completed and
abandoned, from the CLI, the admin HTTP server and the console, and the failover drill a
simulated writer failure starts. Every test counts what the proxy acknowledged against what
the new writer holds. (Held statements under load are the sessions' part: tested with them.)"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import subprocess
import sys
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

REPO = Path(__file__).resolve().parents[2]
ADMIN = {"name": "admin", "password": "admin-secret"}


def admin_request(proxy: ProxyProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    host, port = proxy.doc["admin"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    # The admin server needs credentials once [[admin.users]] is set (basic auth as that user).
    basic = base64.b64encode(f"{ADMIN['name']}:{ADMIN['password']}".encode()).decode()
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Authorization": f"Basic {basic}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def cluster_doc(proxy: ProxyProcess) -> dict[str, Any]:
    status, doc = admin_request(proxy, "GET", "/topology")
    assert status == 200
    cluster: dict[str, Any] = doc["clusters"][0]
    return cluster


def instances(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in cluster_doc(proxy)["instances"]}


def drill_config(doc: dict[str, Any], promotion: dict[str, Any]) -> dict[str, Any]:
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}", "users": [ADMIN]}
    doc["clusters"][0].update(promotion=promotion, switchover_timeout_ms=3000, health_check_interval_ms=100)
    doc["clusters"] = doc["clusters"][:1]
    return doc


def all_up(proxy: ProxyProcess, writer: str) -> bool:
    c = cluster_doc(proxy)
    return c["writer"] == writer and all(i["health"] == "up" for i in c["instances"])


# --- PostgreSQL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresCluster, ProxyProcess]]:
    with PostgresCluster(replicas=2) as cluster:
        cluster.sql("pg0", "create table drill (id int primary key)", user=cluster.app_user)
        doc = drill_config(pg_proxy_config(cluster), {
            "method": "sql", "user": cluster.promotion_user, "password": cluster.promotion_password})
        with ProxyProcess(doc, tmp_path_factory.mktemp("pg-switchover")) as proxy:
            wait_until(lambda: all_up(proxy, "pg0"), 20, "the proxy to see every instance")
            yield cluster, proxy


def pg_run(proxy: ProxyProcess, cluster: PostgresCluster, *statements: str, endpoint: str = "writer",
           database: str | None = None, user: str | None = None, password: str | None = None) -> list[Any]:
    """Run statements through the proxy; the value of the last one."""
    async def go() -> list[Any]:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port(endpoint), user=user or cluster.app_user,
                                     password=password or cluster.app_password,
                                     database=database or cluster.database, ssl=False, timeout=10)
        try:
            out = []
            for sql in statements:
                out.append(await conn.fetchval(sql) if sql.lower().startswith("select") else await conn.execute(sql))
            return out
        finally:
            await conn.close()

    return asyncio.run(go())


def pg_insert(proxy: ProxyProcess, cluster: PostgresCluster, ids: range) -> None:
    pg_run(proxy, cluster, *(f"insert into drill values ({i})" for i in ids))


def streaming_from(cluster: PostgresCluster, primary: str) -> set[str]:
    out = cluster.sql(primary, "select application_name from pg_stat_replication where state = 'streaming'",
                      database="postgres")
    return set(out.split())


def test_pg_abandoned_when_the_candidate_does_not_catch_up(pg: tuple[PostgresCluster, ProxyProcess]) -> None:
    cluster, proxy = pg
    cluster.sql("pg2", "select pg_wal_replay_pause()", database="postgres")
    try:
        pg_insert(proxy, cluster, range(0, 10))
        status, answer = admin_request(proxy, "POST", "/switchover", {"to": "pg2"})
        assert status == 409, answer
        record = answer["switchover"]
        assert (record["from"], record["to"], record["outcome"]) == ("pg0", "pg2", "abandoned")
        assert "pg2 did not replay the old writer's WAL" in record["detail"]
        assert 3000 <= record["pause_ms"] < 6000
        assert cluster_doc(proxy)["last_switchover"] == record
        # Traffic resumes on the old writer, which takes writes again; pg1 streams from it again.
        assert cluster_doc(proxy)["writer"] == "pg0"
        pg_insert(proxy, cluster, range(10, 20))
        assert cluster.sql("pg0", "show default_transaction_read_only") == "off"
        wait_until(lambda: "pg1" in streaming_from(cluster, "pg0"), 20, "pg1 streaming from pg0 again")
    finally:
        cluster.sql("pg2", "select pg_wal_replay_resume()", database="postgres")
    cluster.wait_caught_up("pg1", "pg2", timeout=20)
    assert cluster.sql("pg2", "select count(*) from drill") == "20"


def test_pg_switchover_from_the_cli(pg: tuple[PostgresCluster, ProxyProcess]) -> None:
    cluster, proxy = pg
    pg_insert(proxy, cluster, range(100, 150))
    acknowledged = int(cluster.sql("pg0", "select count(*) from drill"))
    out = subprocess.run([sys.executable, "-m", "endpoint_proxy", "switchover", "--config", str(proxy.config_path),
                          "--to", "pg1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "switchover of cluster pg: pg0 -> pg1: completed, writes paused" in out.stdout
    c = cluster_doc(proxy)
    record = c["last_switchover"]
    assert (record["from"], record["to"], record["outcome"], record["reason"]) == ("pg0", "pg1", "completed",
                                                                                   "requested")
    assert record["pause_ms"] <= 1000
    assert c["writer"] == "pg1"
    inst = {i["name"]: i for i in c["instances"]}
    assert inst["pg0"]["role"] == "fenced" and inst["pg1"]["role"] == "writer" and inst["pg2"]["role"] == "reader"
    # The old writer stays up, refuses writes by default, and names the new writer for a restart as standby.
    assert cluster.sql("pg0", "show default_transaction_read_only") == "on"
    assert f"port={cluster.instance('pg1').port}" in cluster.sql("pg0", "show primary_conninfo")
    # The other replica streams from the new writer, and has everything.
    wait_until(lambda: "pg2" in streaming_from(cluster, "pg1"), 20, "pg2 streaming from pg1")
    cluster.primary_changed("pg1")
    cluster.wait_caught_up("pg2", timeout=20)
    # Nothing acknowledged was lost; new writes go to the new writer, reads to the replica.
    assert pg_run(proxy, cluster, "select count(*) from drill") == [acknowledged]
    port, = pg_run(proxy, cluster, "select inet_server_port()")
    assert port == cluster.instance("pg1").port
    pg_insert(proxy, cluster, range(150, 151))
    assert cluster.sql("pg1", "select count(*) from drill") == str(acknowledged + 1)
    assert pg_run(proxy, cluster, "select inet_server_port()", endpoint="reader") == [cluster.instance("pg2").port]
    assert cluster_doc(proxy)["endpoints"][1]["members"] == ["pg2"]


def test_pg_simulated_writer_failure_becomes_a_real_switchover(pg: tuple[PostgresCluster, ProxyProcess]) -> None:
    cluster, proxy = pg
    assert cluster_doc(proxy)["writer"] == "pg1"
    before = int(cluster.sql("pg1", "select count(*) from drill"))
    answer = pg_run(proxy, cluster, "SIMULATE INSTANCE FAILURE pg1 FOR 4 SECONDS", "SHOW FAULTS",
                    database="endpoint_proxy", user=ADMIN["name"], password=ADMIN["password"])
    assert answer[0].startswith("SIMULATE")
    wait_until(lambda: cluster_doc(proxy)["last_switchover"]["to"] == "pg2", 20, "pg2 promoted by the drill")
    record = cluster_doc(proxy)["last_switchover"]
    assert (record["from"], record["to"], record["outcome"], record["reason"]) == (
        "pg1", "pg2", "completed", "simulated failure of the writer")
    inst = instances(proxy)
    assert inst["pg1"]["health"] == "down" and "simulated instance failure" in inst["pg1"]["last_error"]
    # The fault lifts by itself: pg1 answers probes again, as a fenced old writer.
    wait_until(lambda: instances(proxy)["pg1"]["health"] == "up", 20, "pg1 back after the fault")
    assert instances(proxy)["pg1"]["role"] == "fenced"
    assert admin_request(proxy, "GET", "/faults") == (200, {"faults": []})
    cluster.primary_changed("pg2")
    assert pg_run(proxy, cluster, "select count(*) from drill") == [before]
    pg_insert(proxy, cluster, range(200, 201))
    assert cluster.sql("pg2", "select count(*) from drill") == str(before + 1)
    status, history = admin_request(proxy, "GET", "/history")
    kinds = [e["kind"] for e in history["clusters"][0]["events"]]
    for kind in ("fault_started", "switchover", "writer_changed", "fault_lifted"):
        assert kind in kinds


def test_pg_switchover_refused_without_a_replica(pg: tuple[PostgresCluster, ProxyProcess]) -> None:
    cluster, proxy = pg
    # pg0 and pg1 are fenced old writers now: nothing can be promoted.
    status, answer = admin_request(proxy, "POST", "/switchover", {})
    assert status == 409 and answer == {"ok": False, "error": "cluster pg has no healthy replica to promote"}
    assert cluster_doc(proxy)["writer"] == "pg2"


# --- MariaDB ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def my(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBCluster, ProxyProcess]]:
    with MariaDBCluster(replicas=2) as cluster:
        cluster.sql("my0", "CREATE TABLE drill (id INT PRIMARY KEY)")
        cluster.wait_caught_up("my1", "my2")
        doc = drill_config(my_proxy_config(cluster), {
            "method": "sql", "user": cluster.promotion_user, "password": cluster.promotion_password,
            "replication_user": cluster.replication_user, "replication_password": cluster.replication_password})
        with ProxyProcess(doc, tmp_path_factory.mktemp("my-switchover")) as proxy:
            wait_until(lambda: all_up(proxy, "my0"), 20, "the proxy to see every instance")
            yield cluster, proxy


def my_connect(proxy: ProxyProcess, cluster: MariaDBCluster, endpoint: str = "writer") -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), user=cluster.app_user,
                           password=cluster.app_password, database=cluster.database, autocommit=True,
                           connect_timeout=10, read_timeout=30)


def my_value(proxy: ProxyProcess, cluster: MariaDBCluster, sql: str, endpoint: str = "writer") -> Any:
    conn = my_connect(proxy, cluster, endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def my_insert(proxy: ProxyProcess, cluster: MariaDBCluster, ids: range) -> None:
    conn = my_connect(proxy, cluster)
    try:
        with conn.cursor() as cur:
            for i in ids:
                cur.execute(f"INSERT INTO drill VALUES ({i})")
    finally:
        conn.close()


def replicating_from(cluster: MariaDBCluster, name: str, primary: str) -> bool:
    s = cluster.replication_status(name)
    return (s.get("Master_Port") == str(cluster.instance(primary).port)
            and s.get("Slave_IO_Running") == "Yes" and s.get("Slave_SQL_Running") == "Yes")


def test_my_abandoned_when_the_candidate_does_not_catch_up(my: tuple[MariaDBCluster, ProxyProcess]) -> None:
    cluster, proxy = my
    cluster.sql("my2", "STOP SLAVE SQL_THREAD", database="")
    try:
        my_insert(proxy, cluster, range(0, 10))
        status, answer = admin_request(proxy, "POST", "/switchover", {"to": "my2"})
        assert status == 409, answer
        record = answer["switchover"]
        assert (record["from"], record["to"], record["outcome"]) == ("my0", "my2", "abandoned")
        assert "my2 did not apply the old writer's transactions" in record["detail"]
        wait_until(lambda: cluster_doc(proxy)["writer"] == "my0", 10, "my0 the writer again")
        assert cluster.sql("my0", "SELECT @@GLOBAL.read_only", database="") == "0"
        my_insert(proxy, cluster, range(10, 20))
    finally:
        cluster.sql("my2", "START SLAVE SQL_THREAD", database="")
    cluster.wait_caught_up("my1", "my2", timeout=20)
    assert cluster.sql("my2", "SELECT COUNT(*) FROM drill") == "20"


def test_my_switchover_and_back(my: tuple[MariaDBCluster, ProxyProcess]) -> None:
    cluster, proxy = my
    my_insert(proxy, cluster, range(100, 150))
    acknowledged = int(cluster.sql("my0", "SELECT COUNT(*) FROM drill"))
    status, answer = admin_request(proxy, "POST", "/switchover", {"to": "my1"})
    assert status == 200, answer
    record = answer["switchover"]
    assert (record["from"], record["to"], record["outcome"]) == ("my0", "my1", "completed")
    assert record["pause_ms"] <= 1000
    cluster.primary_changed("my1")
    assert cluster_doc(proxy)["writer"] == "my1"
    # The old writer became a read-only replica of the new one, and so did the other replica.
    assert cluster.sql("my0", "SELECT @@GLOBAL.read_only", database="") == "1"
    wait_until(lambda: replicating_from(cluster, "my0", "my1"), 20, "my0 replicating from my1")
    wait_until(lambda: replicating_from(cluster, "my2", "my1"), 20, "my2 replicating from my1")
    assert my_value(proxy, cluster, "SELECT COUNT(*) FROM drill") == acknowledged
    assert my_value(proxy, cluster, "SELECT @@port") == cluster.instance("my1").port
    my_insert(proxy, cluster, range(150, 151))
    cluster.wait_caught_up("my0", "my2", timeout=20)
    assert cluster.sql("my0", "SELECT COUNT(*) FROM drill") == str(acknowledged + 1)
    wait_until(lambda: instances(proxy)["my0"]["role"] == "reader", 10, "my0 a reader")

    # And back, from the CLI: the old primary, now a replica, can be promoted again.
    out = subprocess.run([sys.executable, "-m", "endpoint_proxy", "switchover", "--config", str(proxy.config_path),
                          "--to", "my0"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    cluster.primary_changed("my0")
    assert cluster_doc(proxy)["writer"] == "my0"
    wait_until(lambda: replicating_from(cluster, "my1", "my0"), 20, "my1 replicating from my0")
    wait_until(lambda: replicating_from(cluster, "my2", "my0"), 20, "my2 replicating from my0")
    my_insert(proxy, cluster, range(151, 152))
    cluster.wait_caught_up("my1", "my2", timeout=20)
    assert cluster.sql("my2", "SELECT COUNT(*) FROM drill") == str(acknowledged + 2)


def test_my_simulated_writer_failure_becomes_a_real_switchover(my: tuple[MariaDBCluster, ProxyProcess]) -> None:
    cluster, proxy = my
    writer = cluster_doc(proxy)["writer"]
    status, answer = admin_request(proxy, "POST", "/faults", {"kind": "instance_failure", "instance": writer,
                                                              "seconds": 4})
    assert status == 200, answer
    wait_until(lambda: cluster_doc(proxy)["last_switchover"]["from"] == writer, 20, "the drill's switchover")
    new = cluster_doc(proxy)["writer"]
    record = cluster_doc(proxy)["last_switchover"]
    assert (record["from"], record["to"], record["outcome"], record["reason"]) == (
        writer, new, "completed", "simulated failure of the writer")
    cluster.primary_changed(new)
    wait_until(lambda: instances(proxy)[writer]["health"] == "up", 20, "the old writer back after the fault")
    wait_until(lambda: instances(proxy)[writer]["role"] == "reader", 10, "the old writer a reader")
    wait_until(lambda: replicating_from(cluster, writer, new), 20, "the old writer replicating")
    count = int(cluster.sql(new, "SELECT COUNT(*) FROM drill"))
    my_insert(proxy, cluster, range(300, 301))
    cluster.wait_caught_up(timeout=20)
    assert cluster.sql(writer, "SELECT COUNT(*) FROM drill") == str(count + 1)
