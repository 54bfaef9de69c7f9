"""What operators see of the pools: SHOW POOLS, /topology's ``pools`` and the pool metrics agree
with the pools' live counts (a waiting client's wait included)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from endpoint_proxy.admin.collectors import PoolCollector
from endpoint_proxy.admin.console import run_command
from endpoint_proxy.admin.http import topology_document
from endpoint_proxy.config import Address, parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.server.session.info import SessionInfo

CONFIG = parse_config({"clusters": [{
    "name": "app", "protocol": "postgresql", "pool_size": 2,
    "instances": [{"name": "a", "host": "127.0.0.1", "port": 1}, {"name": "b", "host": "127.0.0.1", "port": 2}],
    "endpoints": [{"name": "w", "listen": "127.0.0.1:0", "kind": "writer", "pool_mode": "transaction"}],
}]})


@dataclass
class State:
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    clusters: dict[str, ClusterRuntime] = field(default_factory=dict)
    bound: dict[str, Address] = field(default_factory=dict)
    admin_users: dict[str, Any] = field(default_factory=dict)

    def sessions(self) -> Iterable[SessionInfo]:
        return []

    async def reload(self) -> object:
        return None


async def test_show_pools_topology_and_metrics_agree(nursery: trio.Nursery,
                                                     autojump_clock: trio.testing.MockClock) -> None:
    state = State()
    rt = state.clusters["app"] = ClusterRuntime(CONFIG.clusters[0], state.metrics.cluster("app"))
    state.metrics.registry.register(PoolCollector(lambda: state.clusters.values()))
    ids = itertools.count(1)

    async def open_conn() -> int:
        await trio.sleep(0.25)  # opening takes a moment: the borrow histogram sees it
        return next(ids)

    async def close(conn: int) -> None:
        pass

    assert (await run_command(state, "SHOW POOLS")).rows == ()  # no pool until a first borrow
    lent = [await rt.pools.borrow("a", "app", "shop", open_conn, close) for _ in range(2)]
    rt.pools.give_back(await rt.pools.borrow("b", "app", "shop", open_conn, close))
    nursery.start_soon(rt.pools.borrow, "a", "app", "shop", open_conn, close)  # a full pool: waits
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(1.5)

    result = await run_command(state, "SHOW POOLS")
    assert result.columns == ("cluster", "instance", "user", "database", "size", "in_use", "idle", "opening",
                              "waiting", "longest_wait_ms", "borrows")
    assert result.rows == (("app", "a", "app", "shop", 2, 2, 0, 0, 1, 1500, 2),
                           ("app", "b", "app", "shop", 2, 0, 1, 0, 0, 0, 1))

    (cluster,) = topology_document(state, trio.current_time())["clusters"]
    assert cluster["pools"] == [dict(zip(result.columns[1:], row[1:], strict=True)) for row in result.rows]

    def sample(name: str, **labels: str) -> float | None:
        return state.metrics.registry.get_sample_value(name, {"cluster": "app", **labels})

    a = {"instance": "a", "user": "app", "database": "shop"}
    assert sample("endpoint_proxy_pool_connections", state="in_use", **a) == 2
    assert sample("endpoint_proxy_pool_connections", state="idle", **a) == 0
    assert sample("endpoint_proxy_pool_connections", state="opening", **a) == 0
    assert sample("endpoint_proxy_pool_connections", state="idle", instance="b", user="app", database="shop") == 1
    assert sample("endpoint_proxy_pool_waiting_clients", **a) == 1
    assert sample("endpoint_proxy_pool_borrow_seconds_count") == 3
    assert sample("endpoint_proxy_pool_borrow_seconds_bucket", le="0.25") == 3
    assert sample("endpoint_proxy_pool_borrow_seconds_bucket", le="0.1") == 0
    assert sample("endpoint_proxy_pool_borrow_seconds_sum") == 0.75

    rt.pools.give_back(lent[0])  # the waiter gets it
    await trio.testing.wait_all_tasks_blocked()
    assert sample("endpoint_proxy_pool_waiting_clients", **a) == 0
    assert sample("endpoint_proxy_pool_borrow_seconds_count") == 4
    assert sample("endpoint_proxy_pool_borrow_seconds_bucket", le="1") == 3  # it waited 1.5 s
