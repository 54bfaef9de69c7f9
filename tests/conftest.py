"""Shared fixtures: one real PostgreSQL cluster per test session and proxies in front of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, pg_proxy_config


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A primary and two streaming replicas with TLS enabled; tests must not disturb it."""
    with PostgresCluster(replicas=2, ssl=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pg_proxy(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The proxy in front of the shared cluster with one endpoint of every connection-level kind."""
    primary = pg_cluster.primary_name
    pg_cluster.sql(primary, "create role md5user login password 'md5-secret'")
    pg_cluster.sql(primary, f"grant all on database {pg_cluster.database} to md5user")
    # A user function that writes: the readwrite endpoint must learn it from the catalog.
    pg_cluster.sql(primary, "create table if not exists bumps (n int)", user=pg_cluster.app_user)
    pg_cluster.sql(primary, "create or replace function app_bump() returns int language sql volatile "
                            "as 'insert into bumps values (1) returning n'", user=pg_cluster.app_user)
    doc = pg_proxy_config(pg_cluster)
    with ProxyProcess(doc, tmp_path_factory.mktemp("proxy")) as proxy:
        yield proxy
