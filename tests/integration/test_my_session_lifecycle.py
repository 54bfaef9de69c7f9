"""How a MySQL session ends, as it would directly: KILL from another connection, wait_timeout.

The thread id a client sees in its handshake, in CONNECTION_ID() and in SHOW PROCESSLIST agree
(the session's first server connection's own), so that a client can KILL its own sessions; the
server decides who may kill what (1095 for another user's session).
"""

from __future__ import annotations

import time
from typing import Any

import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from tests.fixtures.proxy import ProxyProcess

pytestmark = pytest.mark.integration

LOST = {2006, 2013, 1927, 4031}  # gone away, lost, killed, disconnected for inactivity


def connect(port: int, cluster: MariaDBCluster, **kw: Any) -> pymysql.Connection:
    kw.setdefault("user", cluster.app_user)
    kw.setdefault("password", cluster.app_password)
    return pymysql.connect(host="127.0.0.1", port=port, database=cluster.database, connect_timeout=10,
                           read_timeout=30, autocommit=True, **kw)


def one(conn: pymysql.Connection, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        return row[0] if row else None


def ports(proxy: ProxyProcess, cluster: MariaDBCluster) -> dict[str, int]:
    return {"direct": cluster.instance(cluster.primary_name).port, "proxy": proxy.port("writer")}


def test_the_thread_id_a_client_sees_is_the_servers(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    conn = connect(my_proxy.port("writer"), my_cluster)
    other = connect(my_proxy.port("writer"), my_cluster)
    try:
        handshake = conn.thread_id()
        assert one(conn, "SELECT CONNECTION_ID()") == handshake
        assert one(other, f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {handshake}") == 1
    finally:
        conn.close()
        other.close()


@pytest.mark.parametrize("where", ["direct", "proxy"])
def test_kill_connection_from_another_session_ends_it(my_proxy: ProxyProcess, my_cluster: MariaDBCluster,
                                                      where: str) -> None:
    port = ports(my_proxy, my_cluster)[where]
    victim = connect(port, my_cluster)
    killer = connect(port, my_cluster)
    try:
        victim_id = victim.thread_id()
        one(victim, "SELECT 1")
        with killer.cursor() as cur:
            cur.execute(f"KILL CONNECTION {victim_id}")
        with pytest.raises(pymysql.err.OperationalError) as info:
            for _ in range(50):  # the close may take a moment to reach the client
                one(victim, "SELECT 1")
                time.sleep(0.05)
        assert info.value.args[0] in LOST
        assert one(killer, "SELECT 2") == 2  # the killer goes on
    finally:
        killer.close()


@pytest.mark.parametrize("where", ["direct", "proxy"])
def test_kill_of_another_users_session_is_refused_by_the_server(my_proxy: ProxyProcess,
                                                                my_cluster: MariaDBCluster, where: str) -> None:
    port = ports(my_proxy, my_cluster)[where]
    victim = connect(port, my_cluster)
    killer = connect(port, my_cluster, user="sha2user", password="sha2-secret")
    try:
        with pytest.raises(pymysql.err.OperationalError) as info, killer.cursor() as cur:
            cur.execute(f"KILL QUERY {victim.thread_id()}")
        assert info.value.args[0] == 1095  # "You are not owner of thread"
        assert one(victim, "SELECT 3") == 3
    finally:
        victim.close()
        killer.close()


@pytest.mark.parametrize("where", ["direct", "proxy"])
def test_a_wait_timeout_close_reaches_the_client(my_proxy: ProxyProcess, my_cluster: MariaDBCluster,
                                                 where: str) -> None:
    conn = connect(ports(my_proxy, my_cluster)[where], my_cluster)
    one(conn, "SET SESSION wait_timeout = 1")
    time.sleep(2.5)  # the server's own idle timeout is what is being tested
    with pytest.raises(pymysql.err.OperationalError) as info:
        one(conn, "SELECT 1")
    assert info.value.args[0] in LOST
