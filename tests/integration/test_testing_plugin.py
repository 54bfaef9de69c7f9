"""The pytest plugin as an application's suite uses it: pytest runs a sample test file that only
knows the ``ep_cluster`` fixture, against PostgreSQL and MariaDB, with the plugin found through
its ``pytest11`` entry point (as after ``pip install endpoint_proxy[testing]``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SAMPLE = '''
"""An application's own tests, written against ep_cluster only."""
import asyncio
from urllib.parse import unquote, urlsplit

import asyncpg
import pymysql
import pytest

BOTH = pytest.mark.parametrize("ep_cluster", ["postgresql", "mysql"], indirect=True)


def run(ep_cluster, endpoint, sql):
    """One statement through an endpoint, connecting with the URL the fixture gives."""
    url = ep_cluster.dsn(endpoint)
    if url.startswith("postgresql://"):
        async def go():
            conn = await asyncpg.connect(url, ssl=False)
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()
        return asyncio.run(go())
    u = urlsplit(url)
    assert u.scheme == "mysql"
    conn = pymysql.connect(host=u.hostname, port=u.port, user=unquote(u.username), password=unquote(u.password),
                           database=u.path[1:], autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


@BOTH
def test_orders_survive_a_switchover(ep_cluster):
    run(ep_cluster, "writer", "create table orders (id int primary key)")
    run(ep_cluster, "writer", "insert into orders values (1)")
    before = ep_cluster.writer
    record = ep_cluster.switchover()
    assert record["outcome"] == "completed" and record["from"] == before and record["pause_ms"] < 1000
    assert ep_cluster.wait_for_writer() == record["to"] != before
    run(ep_cluster, "writer", "insert into orders values (2)")
    assert run(ep_cluster, "writer", "select count(*) from orders") == 2


@BOTH
def test_a_lagging_replica_leaves_the_reader_endpoint(ep_cluster):
    topology = ep_cluster.topology()
    replicas = [i["name"] for i in topology["instances"] if i["role"] == "reader"]
    fault = ep_cluster.inject("replica_lag", instance=replicas[0], lag_ms=60000, seconds=30)
    assert fault["kind"] == "replica_lag" and [f["id"] for f in ep_cluster.faults()] == [fault["id"]]
    reader = lambda: next(e for e in ep_cluster.topology()["endpoints"] if e["name"] == "reader")["members"]
    deadline = 50
    while replicas[0] in reader() and deadline:
        deadline -= 1
        asyncio.run(asyncio.sleep(0.1))
    assert replicas[0] not in reader()
    ep_cluster.clear_faults()
    assert ep_cluster.faults() == []


@BOTH
def test_a_crashed_writer_is_replaced(ep_cluster):
    old = ep_cluster.wait_for_writer()
    new = ep_cluster.crash(old)
    assert new is not None and new != old
    assert ep_cluster.wait_for_writer() == new
    run(ep_cluster, "writer", "insert into orders values (3)")
    assert run(ep_cluster, "writer", "select count(*) from orders") == 3


def test_default_is_postgresql_with_the_three_endpoints(ep_cluster):
    assert ep_cluster.protocol == "postgresql"
    assert [e["name"] for e in ep_cluster.topology()["endpoints"]] == ["writer", "reader", "readwrite"]
    assert ep_cluster.dsn("readwrite").startswith("postgresql://app:app-secret@127.0.0.1:")
'''


def entry_point_dist(site: Path) -> None:
    """A distribution on the path whose only content is the pyproject's pytest11 entry point,
    as pip would install it: pytest must find the plugin through it alone."""
    with open(REPO / "pyproject.toml", "rb") as f:
        entry_points = tomllib.load(f)["project"]["entry-points"]["pytest11"]
    dist = site / "endpoint_proxy_plugin_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: endpoint-proxy-plugin-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items()))


def readme_example() -> str:
    """The worked example of README's plugin section, as printed."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n# test_orders.py")
    return text[start + len("```python\n"):text.index("```\n", start + 10)]


def run_suite(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "app"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: none of our conftest or settings
    for name, text in files.items():
        (project / name).write_text(text)
    entry_point_dist(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "site")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)


def test_a_sample_suite_runs_against_both_protocols(tmp_path: Path) -> None:
    out = run_suite(tmp_path, {"test_app.py": SAMPLE})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "7 passed" in out.stdout, out.stdout[-3000:]


def test_the_readme_example_runs_as_printed(tmp_path: Path) -> None:
    out = run_suite(tmp_path, {"test_orders.py": readme_example()})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "3 passed" in out.stdout, out.stdout[-3000:]
