"""Config of pooling, limits and session timeouts: defaults, bounds, and the key path of each error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from endpoint_proxy.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "clusters": [{
        "name": "app",
        "protocol": "postgresql",
        "users": [{"name": "app", "password": "s"}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 5432}],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:6432", "kind": "writer"}],
    }],
}


def doc_with(**changes: Any) -> dict[str, Any]:
    """BASE with keys set: ``cluster``, ``endpoint``, ``user``, ``server`` take dicts of keys."""
    doc = copy.deepcopy(BASE)
    cluster = doc["clusters"][0]
    cluster.update(changes.get("cluster", {}))
    cluster["endpoints"][0].update(changes.get("endpoint", {}))
    cluster["users"][0].update(changes.get("user", {}))
    if "server" in changes:
        doc["server"] = changes["server"]
    return doc


def test_defaults() -> None:
    cfg = parse_config(copy.deepcopy(BASE))
    c = cfg.clusters[0]
    assert (c.pool_size, c.min_pool_size, c.server_idle_timeout_ms, c.server_lifetime_ms) == (20, 0, 600_000, 3_600_000)
    assert (c.borrow_timeout_ms, c.max_prepared_statements) == (120_000, 200)
    assert (c.query_timeout_ms, c.idle_transaction_timeout_ms, c.client_idle_timeout_ms) == (0, 0, 0)
    assert (c.endpoints[0].pool_mode, c.endpoints[0].max_client_connections) == ("session", 0)
    assert c.users[0].max_connections == 0
    assert cfg.server.max_client_connections == 0


def test_every_key_is_read() -> None:
    cfg = parse_config(doc_with(
        cluster={"pool_size": 5, "min_pool_size": 2, "server_idle_timeout_ms": 1000, "server_lifetime_ms": 0,
                 "borrow_timeout_ms": 250, "max_prepared_statements": 50, "query_timeout_ms": 3000,
                 "idle_transaction_timeout_ms": 4000, "client_idle_timeout_ms": 5000},
        endpoint={"pool_mode": "transaction", "max_client_connections": 100},
        user={"max_connections": 7},
        server={"max_client_connections": 1000}))
    c = cfg.clusters[0]
    assert (c.pool_size, c.min_pool_size, c.server_idle_timeout_ms, c.server_lifetime_ms) == (5, 2, 1000, 0)
    assert (c.borrow_timeout_ms, c.max_prepared_statements) == (250, 50)
    assert (c.query_timeout_ms, c.idle_transaction_timeout_ms, c.client_idle_timeout_ms) == (3000, 4000, 5000)
    assert (c.endpoints[0].pool_mode, c.endpoints[0].max_client_connections) == ("transaction", 100)
    assert c.users[0].max_connections == 7
    assert cfg.server.max_client_connections == 1000


def test_min_pool_size_may_equal_pool_size() -> None:
    assert parse_config(doc_with(cluster={"pool_size": 3, "min_pool_size": 3})).clusters[0].min_pool_size == 3


@pytest.mark.parametrize(("changes", "key_path"), [
    ({"cluster": {"pool_size": 4, "min_pool_size": 5}}, "clusters[0].min_pool_size"),
    ({"cluster": {"min_pool_size": 21}}, "clusters[0].min_pool_size"),  # over the default pool_size
    ({"cluster": {"pool_size": 0}}, "clusters[0].pool_size"),
    ({"cluster": {"pool_size": 100_001}}, "clusters[0].pool_size"),
    ({"cluster": {"pool_size": "20"}}, "clusters[0].pool_size"),
    ({"cluster": {"min_pool_size": -1}}, "clusters[0].min_pool_size"),
    ({"cluster": {"server_idle_timeout_ms": -1}}, "clusters[0].server_idle_timeout_ms"),
    ({"cluster": {"server_lifetime_ms": -1}}, "clusters[0].server_lifetime_ms"),
    ({"cluster": {"borrow_timeout_ms": -5}}, "clusters[0].borrow_timeout_ms"),
    ({"cluster": {"borrow_timeout_ms": 1.5}}, "clusters[0].borrow_timeout_ms"),
    ({"cluster": {"max_prepared_statements": 0}}, "clusters[0].max_prepared_statements"),
    ({"cluster": {"query_timeout_ms": -1}}, "clusters[0].query_timeout_ms"),
    ({"cluster": {"idle_transaction_timeout_ms": True}}, "clusters[0].idle_transaction_timeout_ms"),
    ({"cluster": {"client_idle_timeout_ms": -1}}, "clusters[0].client_idle_timeout_ms"),
    ({"endpoint": {"pool_mode": "statement"}}, "clusters[0].endpoints[0].pool_mode"),
    ({"endpoint": {"max_client_connections": -1}}, "clusters[0].endpoints[0].max_client_connections"),
    ({"user": {"max_connections": -1}}, "clusters[0].users[0].max_connections"),
    ({"server": {"max_client_connections": -1}}, "server.max_client_connections"),
])
def test_bad_values_name_their_key(changes: dict[str, Any], key_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc_with(**changes))
    assert info.value.path == key_path


def test_min_pool_size_over_pool_size_says_so() -> None:
    with pytest.raises(ConfigError, match=r"must not exceed pool_size \(4\)"):
        parse_config(doc_with(cluster={"pool_size": 4, "min_pool_size": 5}))


@pytest.mark.parametrize("name", ["example-postgresql.toml", "example-mysql.toml"])
def test_the_examples_show_a_transaction_mode_endpoint_and_limits(name: str) -> None:
    cfg = load_config(REPO / "config" / name)
    cluster = cfg.clusters[0]
    pooled = [ep for ep in cluster.endpoints if ep.pool_mode == "transaction"]
    assert pooled and pooled[0].max_client_connections > 0
    assert cfg.server.max_client_connections > 0
    assert any(u.max_connections > 0 for u in cluster.users)
