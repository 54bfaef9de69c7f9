"""Shared fixtures: one real PostgreSQL cluster per test session and proxies in front of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from endpoint_proxy.localcluster.certs import write_self_signed
from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.patroni import PatroniCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, my_proxy_config, pg_proxy_config


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A primary and two streaming replicas with TLS enabled; tests must not disturb it."""
    with PostgresCluster(replicas=2, ssl=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """etcd and three Patroni nodes (pg0 the first leader; pg2 tagged noloadbalance). Tests that
    fail a node over (tests/integration/test_patroni.py) leave it with every node running and
    streaming again, but the leader may be any node: ask ``leader()``."""
    with PatroniCluster(3, tags={"pg2": {"noloadbalance": True}}) as cluster:
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
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    with ProxyProcess(doc, tmp_path_factory.mktemp("proxy")) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def my_cluster() -> Iterator[MariaDBCluster]:
    """A MariaDB primary and two GTID replicas; tests must not disturb it."""
    with MariaDBCluster(replicas=2, extra_conf={"max_allowed_packet": "64M"}) as cluster:
        primary = cluster.primary_name
        cluster.sql(primary, "CREATE USER 'sha2user'@'%' IDENTIFIED BY 'sha2-secret'")
        cluster.sql(primary, f"GRANT ALL ON {cluster.database}.* TO 'sha2user'@'%'")
        cluster.sql(primary, "CREATE TABLE items (id INT PRIMARY KEY, v VARCHAR(64))", database=cluster.database)
        cluster.wait_caught_up(*[i.name for i in cluster.instances if i.name != primary])
        yield cluster


@pytest.fixture(scope="session")
def my_proxy(my_cluster: MariaDBCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("myproxy")
    cert, key = write_self_signed(workdir)
    doc = my_proxy_config(my_cluster)
    doc["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    with ProxyProcess(doc, workdir) as proxy:
        yield proxy


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test a compiled module that is older than its source: the edit would not run."""
    from endpoint_proxy import compiled

    summary = compiled.summary()
    if summary.startswith("stale"):
        pytest.exit(f"endpoint_proxy: {summary}", returncode=2)
