"""A cluster's pool registry: failover drains the pools of instances that leave their role, a reload
resizes pools without dropping clients, min_pool_size is kept by the sweeper, give_back never
blocks, borrow times are measured, and every pooled connection is counted once (MockClock)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from endpoint_proxy.config import ClusterConfig, parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.server.pools import SWEEP_INTERVAL_S, PoolTimeout, instances_to_drain
from endpoint_proxy.topology.state import TopologyEvent


def cluster_config(**keys: Any) -> ClusterConfig:
    return parse_config({"clusters": [{
        "name": "app", "protocol": "postgresql",
        "instances": [{"name": n, "host": "127.0.0.1", "port": p} for n, p in (("a", 1), ("b", 2), ("c", 3))],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer"}],
        **keys,
    }]}).clusters[0]


class Servers:
    """Connections are numbers; what was opened and closed, per instance."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.closed: list[int] = []
        self.refuse = False

    def opener(self) -> Any:
        async def open_conn() -> int:
            await trio.sleep(0.01)
            if self.refuse:
                raise OSError("connection refused")
            return next(self.ids)
        return open_conn

    async def close(self, conn: int) -> None:
        await trio.sleep(0.01)
        self.closed.append(conn)


@pytest.fixture
async def rt(nursery: trio.Nursery) -> AsyncIterator[ClusterRuntime]:
    runtime = ClusterRuntime(cluster_config(pool_size=3), ProxyMetrics().cluster("app"))
    runtime._nursery = nursery  # what run() sets: the cluster's background work goes there
    now = trio.current_time()
    runtime._apply(runtime.topology.probe_succeeded("a", now, in_recovery=False, timeline=1))
    runtime._apply(runtime.topology.probe_succeeded("b", now, in_recovery=True, timeline=1))
    runtime._apply(runtime.topology.probe_succeeded("c", now, in_recovery=True, timeline=1))
    assert runtime.topology.writer == "a"
    yield runtime


async def settle() -> None:
    """Let background closes finish (they take 10 ms of mock time)."""
    await trio.sleep(0.5)


async def borrow(rt: ClusterRuntime, servers: Servers, instance: str, user: str = "app") -> Any:
    return await rt.pools.borrow(instance, user, "app", servers.opener(), servers.close)


@pytest.mark.parametrize(("events", "before", "after", "drained"), [
    ([TopologyEvent("writer_changed", "b", "was a")], "a", "b", {"a", "b"}),
    ([TopologyEvent("instance_down", "a"), TopologyEvent("writer_changed", None, "was a")], "a", None, {"a"}),
    ([TopologyEvent("writer_changed", "a", "was None")], None, "a", {"a"}),
    ([TopologyEvent("instance_fenced", "c")], "a", "a", {"c"}),
    ([TopologyEvent("instance_down", "c")], "a", "a", {"c"}),
    ([TopologyEvent("replica_lagging", "c"), TopologyEvent("instance_up", "b")], "a", "a", set()),
])
def test_which_pools_a_topology_change_drains(events: list[TopologyEvent], before: str | None,
                                              after: str | None, drained: set[str]) -> None:
    assert instances_to_drain(events, before, after) == drained


async def test_a_writer_change_drains_the_old_and_the_new_writers_pools(
        rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    lent = await borrow(rt, servers, "a")
    idle = await borrow(rt, servers, "a")
    rt.pools.give_back(idle)
    on_b = await borrow(rt, servers, "b")
    rt.pools.give_back(on_b)
    on_c = await borrow(rt, servers, "c")
    rt.pools.give_back(on_c)
    assert rt.connections == {"a": 2, "b": 1, "c": 1}
    now = trio.current_time()
    rt._apply(rt.topology.probe_succeeded("a", now, in_recovery=True, timeline=1))  # demoted...
    rt._apply(rt.topology.probe_succeeded("b", now, in_recovery=False, timeline=2))  # ...b promoted
    assert rt.topology.writer == "b"
    await settle()
    assert sorted(servers.closed) == [idle.conn, on_b.conn]  # idle ones of a and b close now; c stays
    rt.pools.give_back(lent)  # the transaction on the old writer ends: its connection closes
    await settle()
    assert lent.conn in servers.closed and rt.connections == {"a": 0, "b": 0, "c": 1}
    fresh = await borrow(rt, servers, "a")
    assert fresh.conn not in (lent.conn, idle.conn)


async def test_an_instance_that_goes_down_has_its_pools_drained(
        rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    pooled = await borrow(rt, servers, "c")
    rt.pools.give_back(pooled)
    rt._apply(rt.topology.probe_failed("c", trio.current_time(), "connection refused"))
    await settle()
    assert servers.closed == [pooled.conn] and rt.connections["c"] == 0


async def test_a_reload_resizes_pools_without_dropping_clients(
        rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    lent = [await borrow(rt, servers, "a") for _ in range(3)]
    rt.pools.give_back(lent.pop())
    rt.apply_config(cluster_config(pool_size=1))
    await settle()
    assert servers.closed == [3]  # the idle one beyond the new size
    pool = next(iter(rt.pools.pools.values()))
    assert (pool.limits.size, pool.lent) == (1, 2)  # the two lent ones stay with their clients
    rt.pools.give_back(lent.pop())  # over the new size: closed
    await settle()
    assert servers.closed == [3, 2] and pool.total == 1
    rt.pools.give_back(lent.pop())  # within it: kept
    await settle()
    assert servers.closed == [3, 2] and len(pool.idle) == 1


async def test_a_moved_instance_is_drained_and_empty_pools_are_forgotten(
        rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    on_b = await borrow(rt, servers, "b")
    on_c = await borrow(rt, servers, "c")
    rt.pools.give_back(on_b)
    config = cluster_config(pool_size=3)
    moved = [i if i.name != "b" else type(i)(name="b", host="127.0.0.1", port=22) for i in config.instances
             if i.name != "c"]
    rt.apply_config(type(config)(**{**config.__dict__, "instances": tuple(moved)}))
    await settle()
    assert servers.closed == [on_b.conn]  # b moved: its idle connection closes
    rt.pools.give_back(on_c)  # c was removed: its lent connection closes when it comes back
    await trio.sleep(SWEEP_INTERVAL_S)
    rt.pools.sweep(trio.current_time())
    await settle()
    assert on_c.conn in servers.closed
    assert rt.pools.pools == {}  # nothing left in either pool: both go


async def test_a_pool_whose_opens_fail_does_not_stay(rt: ClusterRuntime,
                                                     autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    servers.refuse = True  # say, a database that does not exist
    for n in range(100):
        with pytest.raises(OSError):
            await rt.pools.borrow("a", "app", f"db{n}", servers.opener(), servers.close)
    rt.pools.sweep(trio.current_time())
    assert rt.pools.pools == {}


async def test_min_pool_size_is_kept_open_through_the_last_opener(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    rt = ClusterRuntime(cluster_config(pool_size=4, min_pool_size=2, server_idle_timeout_ms=5000),
                        ProxyMetrics().cluster("app"))
    rt._nursery = nursery
    rt._apply(rt.topology.probe_succeeded("a", trio.current_time(), in_recovery=False, timeline=1))
    nursery.start_soon(rt.pools.run)
    servers = Servers()
    first = await borrow(rt, servers, "a")
    rt.pools.give_back(first)
    await trio.sleep(SWEEP_INTERVAL_S * 1.5)
    pool = next(iter(rt.pools.pools.values()))
    assert pool.total == 2 and rt.connections["a"] == 2  # the second opened in the background
    await trio.sleep(60)  # idle far past the idle timeout: min_pool_size stays open
    assert pool.total == 2 and servers.closed == []
    rt.pools.drain_instance("a")
    await borrow(rt, servers, "a")  # used again...
    servers.refuse = True
    await trio.sleep(SWEEP_INTERVAL_S * 3)  # ...but the server refuses now: tried at each sweep, no crash
    assert pool.fill_error == "connection refused" and pool.total == 1
    servers.refuse = False
    await trio.sleep(SWEEP_INTERVAL_S * 1.5)
    assert pool.total == 2 and pool.fill_error is None


async def test_min_pool_size_is_not_opened_to_an_instance_that_is_down(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    rt = ClusterRuntime(cluster_config(pool_size=4, min_pool_size=3), ProxyMetrics().cluster("app"))
    rt._nursery = nursery
    rt._apply(rt.topology.probe_succeeded("b", trio.current_time(), in_recovery=True, timeline=1))
    servers = Servers()
    rt.pools.give_back(await borrow(rt, servers, "b"))
    rt._apply(rt.topology.probe_failed("b", trio.current_time(), "gone"))
    await borrow(rt, servers, "b")  # a borrow raced the failure: the pool has an opener again
    rt.pools.sweep(trio.current_time())
    await settle()
    assert next(iter(rt.pools.pools.values())).total == 1


async def test_give_back_never_waits_for_a_close(rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    closing: list[int] = []

    async def hung_close(conn: int) -> None:
        closing.append(conn)
        await trio.sleep_forever()  # a server that never answers the goodbye

    pooled = await rt.pools.borrow("a", "app", "app", Servers().opener(), hung_close)
    before = trio.current_time()
    rt.pools.give_back(pooled, reusable=False)  # synchronous: returns at once
    assert trio.current_time() == before
    await settle()
    assert closing == [pooled.conn] and rt.connections["a"] == 0


async def test_borrow_time_and_timeouts_are_measured(rt: ClusterRuntime,
                                                      autojump_clock: trio.testing.MockClock) -> None:
    rt.apply_config(cluster_config(pool_size=1, borrow_timeout_ms=500))
    servers = Servers()
    pooled = await borrow(rt, servers, "a")
    with pytest.raises(PoolTimeout):
        await borrow(rt, servers, "a")
    metrics = rt.metrics._metrics
    assert metrics.registry.get_sample_value("endpoint_proxy_errors_total",
                                             {"cluster": "app", "kind": "borrow_timeout"}) == 1
    histogram = rt.metrics.pool_borrow
    assert histogram.count == 1 and histogram.sum_ns == pytest.approx(10_000_000, rel=0.01)  # the open
    rt.pools.give_back(pooled)
    await borrow(rt, servers, "a")
    assert histogram.count == 2


async def test_forget_stops_counting(rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    pooled = await borrow(rt, servers, "a")
    rt.pools.forget(pooled)  # the session closes it itself
    assert rt.connections["a"] == 0 and rt.pools.status(trio.current_time())[0].in_use == 0


async def test_status_lists_every_pool(rt: ClusterRuntime, autojump_clock: trio.testing.MockClock) -> None:
    servers = Servers()
    await borrow(rt, servers, "b", user="zed")
    rt.pools.give_back(await borrow(rt, servers, "a"))
    rows = [s.to_json() for s in rt.pools.status(trio.current_time())]
    assert rows == [
        {"instance": "a", "user": "app", "database": "app", "size": 3, "in_use": 0, "idle": 1, "opening": 0,
         "waiting": 0, "longest_wait_ms": 0, "borrows": 1},
        {"instance": "b", "user": "zed", "database": "app", "size": 3, "in_use": 1, "idle": 0, "opening": 0,
         "waiting": 0, "longest_wait_ms": 0, "borrows": 1},
    ]
