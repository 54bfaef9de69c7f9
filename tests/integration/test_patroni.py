"""Patroni and etcd as the HA authority, against a real etcd and three real Patroni nodes.

One Patroni cluster serves the whole module (``patroni_cluster``, session-scoped); two proxies
follow it (A and B, peers of each other). Tests that fail a node over run last, each leaving
every node running and streaming again. Crash tests delete the leader key after the kill (as
the lease expiry would ~20 s later); one test waits for the real lease expiry.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from endpoint_proxy.localcluster.patroni import PatroniCluster
from tests.fixtures.proxy import ProxyProcess, patroni_proxy_config, wait_until

pytestmark = pytest.mark.integration


def admin(proxy: ProxyProcess, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
    host, port = proxy.doc["admin"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    basic = base64.b64encode(b"admin:admin-secret").decode()
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, {"Authorization": f"Basic {basic}"})
        response = conn.getresponse()
        text = response.read()
        return response.status, (json.loads(text) if text.startswith((b"{", b"[")) else text.decode())
    finally:
        conn.close()


def topo(proxy: ProxyProcess) -> dict[str, Any]:
    status, doc = admin(proxy, "GET", "/topology")
    assert status == 200
    cluster: dict[str, Any] = doc["clusters"][0]
    return cluster


def endpoint_members(proxy: ProxyProcess, name: str) -> list[str]:
    return next(e["members"] for e in topo(proxy)["endpoints"] if e["name"] == name)


def dsn(proxy: ProxyProcess, endpoint: str = "writer") -> str:
    return f"postgresql://app:app-secret@127.0.0.1:{proxy.port(endpoint)}/app"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def fetchval(url: str, query: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def settled(cluster: PatroniCluster, *proxies: ProxyProcess) -> str:
    """Wait until Patroni has a leader and every proxy routes writes to it with all members up."""
    leader = cluster.wait_leader()

    def agree() -> bool:
        for proxy in proxies:
            c = topo(proxy)
            if c["writer"] != leader or len(c["instances"]) != len(cluster.instances):
                return False
            if any(i["health"] != "up" for i in c["instances"]):
                return False
        return True

    wait_until(agree, 30, f"the proxies to route to {leader} with every member up")
    return leader


@pytest.fixture(scope="module")
def proxies(patroni_cluster: PatroniCluster, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two proxies of one endpoint (separate configs), each listing both as [[peers]]."""
    docs = [patroni_proxy_config(patroni_cluster, peer_id=1), patroni_proxy_config(patroni_cluster, peer_id=2)]
    peers = [{"id": i + 1, "address": doc["clusters"][0]["endpoints"][0]["listen"]} for i, doc in enumerate(docs)]
    for doc in docs:
        doc["peers"] = peers
    leader = patroni_cluster.wait_leader()
    patroni_cluster.sql(leader, "create table if not exists ha_writes "
                        "(id bigserial primary key, session int, n int, at timestamptz default clock_timestamp())")
    patroni_cluster.sql(leader, "alter table ha_writes owner to app")
    with ProxyProcess(docs[0], tmp_path_factory.mktemp("proxy-a")) as a, \
            ProxyProcess(docs[1], tmp_path_factory.mktemp("proxy-b")) as b:
        settled(patroni_cluster, a, b)
        yield a, b


# --- discovery and the fencing token --------------------------------------------------------------


def test_members_and_the_writer_come_from_patroni(patroni_cluster: PatroniCluster,
                                                  proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, _ = proxies
    leader = settled(patroni_cluster, a)
    c = topo(a)
    assert sorted(i["name"] for i in c["instances"]) == ["pg0", "pg1", "pg2"]
    addresses = {i["name"]: i["address"] for i in c["instances"]}
    assert addresses == {n.name: f"127.0.0.1:{n.port}" for n in patroni_cluster.instances}
    authority = c["authority"]
    assert (authority["source"], authority["status"], authority["leader"]) == ("etcd", "fresh", leader)
    assert isinstance(authority["revision"], int) and authority["revision"] > 0
    port = run(fetchval(dsn(a), "select inet_server_port()"))
    assert port == patroni_cluster.node(leader).port
    # noloadbalance keeps pg2 out of the reader endpoint, whatever its state.
    replicas = sorted(n.name for n in patroni_cluster.instances if n.name not in (leader, "pg2"))
    assert endpoint_members(a, "reader") == replicas
    status, metrics = admin(a, "GET", "/metrics")
    assert f'endpoint_proxy_authority_revision{{cluster="ha",source="etcd"}} {float(authority["revision"])}' in metrics
    status, ready = admin(a, "GET", "/readyz")
    assert (status, ready["authority"]) == (200, {"ha": "fresh"})


def test_rest_only_follows_patroni_too(patroni_cluster: PatroniCluster, tmp_path: Path) -> None:
    doc = patroni_proxy_config(patroni_cluster, etcd=False, rest=True)
    with ProxyProcess(doc, tmp_path) as proxy:
        leader = settled(patroni_cluster, proxy)
        c = topo(proxy)
        assert (c["authority"]["source"], c["authority"]["leader"], c["writer"]) == ("rest", leader, leader)
        assert run(fetchval(dsn(proxy), "select inet_server_port()")) == patroni_cluster.node(leader).port


# --- switchover through Patroni, cross-proxy cancel --------------------------------------------------


async def _writers(url: str, sessions: int, stop: asyncio.Event, acked: list[int], errors: list[str]) -> None:
    async def one(i: int) -> None:
        conn = await asyncpg.connect(url)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                try:
                    await conn.execute("insert into ha_writes (session, n) values ($1, $2)", i, n)
                    acked.append(1)
                except (asyncpg.PostgresError, OSError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    await asyncio.gather(*(one(i) for i in range(sessions)))


def _count(cluster: PatroniCluster, leader: str) -> int:
    return int(cluster.sql(leader, "select count(*) from ha_writes"))


def test_switchover_through_patroni_under_load_loses_nothing(
        patroni_cluster: PatroniCluster, proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = proxies
    old = settled(patroni_cluster, a, b)
    candidate = next(n.name for n in patroni_cluster.instances if n.name not in (old, "pg2"))
    before = _count(patroni_cluster, old)
    acked: list[int] = []
    errors: list[str] = []
    result: dict[str, Any] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_writers(dsn(a), 8, stop, acked, errors))
        await asyncio.sleep(0.5)
        result["answer"] = await asyncio.to_thread(admin, a, "POST", "/switchover", {"to": candidate})
        await asyncio.sleep(0.5)
        stop.set()
        await load

    run(scenario())
    status, answer = result["answer"]
    assert status == 200, answer
    record = answer["switchover"]
    assert (record["from"], record["to"], record["outcome"]) == (old, candidate, "completed")
    assert errors == []
    new = settled(patroni_cluster, a, b)
    assert new == candidate
    assert _count(patroni_cluster, new) - before == len(acked)


def test_a_cancel_that_reaches_the_other_proxy_cancels_the_statement(
        proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = proxies

    async def scenario() -> str:
        conn = await asyncpg.connect(dsn(a))
        try:
            # The key asyncpg was handed by proxy A; send its CancelRequest to proxy B.
            pid, secret = conn._protocol.backend_pid, conn._protocol.backend_secret
            assert secret & 0xFF == 1  # proxy A's peer id is in the key
            sleeper = asyncio.create_task(conn.execute("select pg_sleep(30)"))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_send_cancel, b.port("writer"), pid, secret)
            try:
                await asyncio.wait_for(sleeper, 10)
            except asyncpg.QueryCanceledError as e:
                return str(e)
            return "not canceled"
        finally:
            await conn.close()

    started = time.monotonic()
    assert "cancel" in run(scenario())
    assert time.monotonic() - started < 8


def _send_cancel(port: int, pid: int, secret: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack("!IIII", 16, 80877102, pid, secret & 0xFFFFFFFF))
        s.recv(1)  # the proxy closes once the server took the cancel


# --- store outage -----------------------------------------------------------------------------------


def test_a_store_outage_keeps_the_writer_and_says_stale(
        patroni_cluster: PatroniCluster, proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, _ = proxies
    leader = settled(patroni_cluster, a)
    patroni_cluster.stop_store()
    try:
        wait_until(lambda: topo(a)["authority"]["status"] == "stale", 10, "the authority to go stale")
        status, ready = admin(a, "GET", "/readyz")
        assert (status, ready["ready"], ready["authority"]) == (200, True, {"ha": "stale"})
        assert topo(a)["writer"] == leader
        assert run(fetchval(dsn(a), "insert into ha_writes (session, n) values (-1, 1) returning n")) == 1
    finally:
        patroni_cluster.resume_store()
    wait_until(lambda: topo(a)["authority"]["status"] == "fresh", 15, "the authority to answer again")
    assert topo(a)["writer"] == leader


# --- failures: crash, split brain, membership, lease expiry ------------------------------------------


def test_a_crash_of_the_leader_moves_both_proxies_together_and_idle_sessions_see_nothing(
        patroni_cluster: PatroniCluster, proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = proxies
    old = settled(patroni_cluster, a, b)
    result: dict[str, Any] = {}

    async def scenario() -> None:
        conns = [await asyncpg.connect(dsn(a)) for _ in range(4)]
        try:
            for conn in conns:
                await conn.execute("set application_name = 'idle-through-crash'")
            await asyncio.to_thread(patroni_cluster.kill, old)
            await asyncio.to_thread(patroni_cluster.delete_leader_key)
            started = time.monotonic()
            ports = await asyncio.gather(*(c.fetchval("select inet_server_port()") for c in conns))
            result["waited"] = time.monotonic() - started
            result["ports"] = set(ports)
            names = await asyncio.gather(*(c.fetchval("show application_name") for c in conns))
            result["names"] = set(names)
            result["writes"] = await conns[0].fetchval("insert into ha_writes (session, n) values (-2, 1) returning n")
        finally:
            for conn in conns:
                await conn.close()

    run(scenario())
    new = patroni_cluster.wait_leader(other_than=old)
    assert result["ports"] == {patroni_cluster.node(new).port}
    assert result["names"] == {"idle-through-crash"} and result["writes"] == 1
    assert result["waited"] < 15
    # Both proxies moved to the new writer within 100 ms of each other.
    wait_until(lambda: topo(a)["writer"] == new and topo(b)["writer"] == new, 10, "both proxies on the new writer")
    changed = [topo(p)["writer_changed_at"] for p in (a, b)]
    assert abs(changed[0] - changed[1]) < 0.1, changed
    revision = topo(a)["authority"]["revision"]
    assert revision == topo(b)["authority"]["revision"]
    # Membership follows the store: the dead node's member key goes (as its lease would), then
    # it comes back when the node restarts.
    key = f"{patroni_cluster.namespace}/{patroni_cluster.scope}/members/{old}"
    patroni_cluster.etcd("kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})
    wait_until(lambda: old not in {i["name"] for i in topo(a)["instances"]}, 10, f"{old} to leave the topology")
    patroni_cluster.restart(old)
    patroni_cluster.wait_streaming(timeout=60)
    settled(patroni_cluster, a, b)


def test_patroni_killed_alone_leaves_a_writable_old_primary_that_gets_no_writes(
        patroni_cluster: PatroniCluster, proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, _ = proxies
    old = settled(patroni_cluster, a)
    errors: list[str] = []
    acked: list[int] = []
    moved: list[float] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_writers(dsn(a), 4, stop, acked, errors))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(patroni_cluster.kill_patroni, old)
        await asyncio.to_thread(patroni_cluster.delete_leader_key)
        moved.append(time.time())
        await asyncio.to_thread(patroni_cluster.wait_leader, other_than=old)
        await asyncio.sleep(1.0)
        stop.set()
        await load

    run(scenario())
    new = patroni_cluster.wait_leader(other_than=old)
    # The old primary is still up and writable (split brain: no watchdog) ...
    assert patroni_cluster.sql(old, "select pg_is_in_recovery()") == "f"
    # ... but no write through the proxy reached it after the key moved.
    late = int(patroni_cluster.sql(old, "select count(*) from ha_writes where session >= 0 "
                                        f"and at > to_timestamp({moved[0] + 0.05})"))
    assert late == 0
    roles = {i["name"]: i["role"] for i in topo(a)["instances"]}
    assert (roles[old], roles[new]) == ("fenced", "writer")
    assert len(acked) > 0
    patroni_cluster.restart(old)
    patroni_cluster.wait_streaming(timeout=60)
    settled(patroni_cluster, a)


def test_a_crash_without_help_fails_over_when_the_lease_expires(
        patroni_cluster: PatroniCluster, proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, _ = proxies
    old = settled(patroni_cluster, a)
    patroni_cluster.kill(old)
    started = time.monotonic()
    # A statement waits (held) for the new writer instead of failing.
    port = run(fetchval(dsn(a), "select inet_server_port()"))
    new = patroni_cluster.wait_leader(other_than=old)
    assert port == patroni_cluster.node(new).port
    assert 10 < time.monotonic() - started < 30  # Patroni's ttl is 20 s
    patroni_cluster.restart(old)
    patroni_cluster.wait_streaming(timeout=60)
    settled(patroni_cluster, a)
