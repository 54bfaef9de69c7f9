"""The pytest plugin for harnesses: ``ep_cluster``, a local cluster with the proxy in front.

Installed with ``pip install endpoint_proxy[testing]`` it loads by itself (a ``pytest11``
entry point). A test asks for ``ep_cluster`` and gets an ``EpCluster`` (see harness.py)::

    def test_orders_survive_a_switchover(ep_cluster):
        url = ep_cluster.dsn("writer")          # postgresql://app:...@127.0.0.1:PORT/app
        ...
        ep_cluster.switchover()                 # planned: held writes, no client errors
        ep_cluster.inject("latency", instance="pg1", latency_ms=50, seconds=5)
        new = ep_cluster.crash(ep_cluster.writer)   # kill -9, a replica is promoted
        assert ep_cluster.wait_for_writer() == new

The fixture is session scoped: one cluster per distinct set of parameters for the whole
run (a test that switches over or crashes changes it for the tests after). Parameters come
from indirect parametrization — a protocol name or a dict of ``protocol``, ``replicas``,
``endpoints`` (names, or tables with ``name`` and ``kind``) and ``options`` (more cluster
keys of the proxy config)::

    @pytest.mark.parametrize("ep_cluster", ["postgresql", "mysql"], indirect=True)

and otherwise from ``--ep-protocol`` / ``--ep-replicas`` (or the ini keys ``ep_protocol`` /
``ep_replicas``); the defaults are PostgreSQL with two replicas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from .harness import DEFAULT_ENDPOINTS, EpCluster, SwitchoverFailed

__all__ = ["EpCluster", "SwitchoverFailed", "ep_cluster", "ep_cluster_pool"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("endpoint_proxy", "endpoint_proxy test clusters (ep_cluster)")
    group.addoption("--ep-protocol", default=None, choices=("postgresql", "mysql"),
                    help="protocol of ep_cluster when a test does not parametrize it (default: postgresql)")
    group.addoption("--ep-replicas", type=int, default=None, help="replicas of ep_cluster (default: 2)")
    parser.addini("ep_protocol", "protocol of ep_cluster: postgresql or mysql", default="postgresql")
    parser.addini("ep_replicas", "replicas of ep_cluster", default="2")


class ClusterPool:
    """One running EpCluster per distinct parameter set, all stopped at the end of the session."""

    def __init__(self) -> None:
        self._clusters: dict[str, EpCluster] = {}

    def get(self, spec: Mapping[str, Any]) -> EpCluster:
        key = json.dumps(spec, sort_keys=True, default=str)
        cluster = self._clusters.get(key)
        if cluster is None:
            cluster = EpCluster(spec["protocol"], spec["replicas"], spec["endpoints"],
                                cluster_options=spec.get("options"))
            cluster.start()
            self._clusters[key] = cluster
        return cluster

    def stop_all(self) -> None:
        clusters, self._clusters = list(self._clusters.values()), {}
        for cluster in clusters:
            cluster.stop()


def _spec(config: pytest.Config, param: object) -> dict[str, Any]:
    protocol = config.getoption("--ep-protocol") or config.getini("ep_protocol") or "postgresql"
    replicas = config.getoption("--ep-replicas")
    spec: dict[str, Any] = {
        "protocol": protocol,
        "replicas": int(replicas if replicas is not None else config.getini("ep_replicas") or 2),
        "endpoints": list(DEFAULT_ENDPOINTS),
        "options": {},
    }
    if isinstance(param, str):
        spec["protocol"] = param
    elif isinstance(param, Mapping):
        unknown = set(param) - set(spec)
        if unknown:
            raise pytest.UsageError(f"ep_cluster: unknown parameters {sorted(unknown)}; "
                                    "use protocol, replicas, endpoints, options")
        spec.update(param)
    elif param is not None:
        raise pytest.UsageError(f"ep_cluster: parametrize with a protocol name or a dict, not {param!r}")
    return spec


@pytest.fixture(scope="session")
def ep_cluster_pool() -> Iterator[ClusterPool]:
    """The clusters ``ep_cluster`` started, stopped when the session ends."""
    pool = ClusterPool()
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def ep_cluster(request: pytest.FixtureRequest, ep_cluster_pool: ClusterPool) -> EpCluster:
    """A local cluster behind the proxy (see the module docstring)."""
    return ep_cluster_pool.get(_spec(request.config, getattr(request, "param", None)))
