"""Fencing remembers: an old primary that comes back writable while the new one is down is never the writer,
also after the proxy restarts with its state file."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: the test destroys it."""
    with PostgresCluster(replicas=1) as c:
        yield c


def _doc(cluster: PostgresCluster, state_file: Path | None) -> dict[str, Any]:
    doc = pg_proxy_config(cluster, failover_timeout_ms=1000)
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    if state_file is not None:
        doc["server"]["state_file"] = str(state_file)
    return doc


def _instances(proxy: ProxyProcess) -> tuple[str | None, dict[str, dict[str, Any]]]:
    with urllib.request.urlopen(f"http://{proxy.doc['admin']['listen']}/topology", timeout=10) as r:
        cluster = json.loads(r.read())["clusters"][0]
    return cluster["writer"], {i["name"]: i for i in cluster["instances"]}


def _fenced(proxy: ProxyProcess, name: str) -> bool:
    writer, instances = _instances(proxy)
    inst = instances[name]
    return writer is None and inst["health"] == "up" and inst["role"] == "fenced" and inst["fenced"] is True


def _never_writer(proxy: ProxyProcess, cluster: PostgresCluster, name: str, seconds: float) -> None:
    """For ``seconds`` (many probes), ``name`` stays fenced, and the writer endpoint finds no writer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert _fenced(proxy, name), _instances(proxy)
        time.sleep(0.1)
    assert _last_writer(proxy) != name

    async def connect() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port("writer"), user=cluster.app_user,
                                     password=cluster.app_password, database=cluster.database, ssl=False,
                                     timeout=10)
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(connect())
    assert info.value.sqlstate == "08006"  # no writer: failover_timeout_ms, then FATAL


def _events(log_text: str) -> list[tuple[str, str | None]]:
    found = []
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append((event.get("event"), event.get("instance")))
    return found


def _last_writer(proxy: ProxyProcess) -> str | None:
    writers = [i for e, i in _events(proxy.log()) if e == "writer_changed"]
    return writers[-1] if writers else None


def test_an_old_primary_back_while_the_new_one_is_down_is_fenced_across_restarts(
        cluster: PostgresCluster, tmp_path: Path) -> None:
    old, new = (i.name for i in cluster.instances)
    state_file = tmp_path / "state" / "proxy-state.json"
    state_file.parent.mkdir()
    (tmp_path / "one").mkdir()
    with ProxyProcess(_doc(cluster, state_file), tmp_path / "one") as proxy:
        wait_until(lambda: _instances(proxy)[0] == old, 10, "the first writer")
        cluster.kill(old)
        cluster.promote(new)
        wait_until(lambda: _instances(proxy)[0] == new, 10, "the promoted replica to be the writer")
        assert _instances(proxy)[1][new]["timeline"] == 2
        wait_until(lambda: '"timeline": 2' in state_file.read_text(), 5, "the state file to record timeline 2")
        # The new primary goes away; the old one comes back writable (its data directory still
        # says primary), on timeline 1.
        cluster.stop_instance(new)
        cluster.restart(old)
        wait_until(lambda: _fenced(proxy, old), 10, "the old primary to be fenced")
        assert '"instance_fenced"' in proxy.log()
        _never_writer(proxy, cluster, old, 2.0)

    # A restarted proxy reads what was seen from the state file: the old primary stays fenced.
    assert json.loads(state_file.read_text())["clusters"]["pg"] == {"timeline": 2, "instance": new}
    (tmp_path / "two").mkdir()
    with ProxyProcess(_doc(cluster, state_file), tmp_path / "two") as proxy:
        wait_until(lambda: _fenced(proxy, old), 10, "the old primary to be fenced after a restart")
        _never_writer(proxy, cluster, old, 2.0)
        # The new primary comes back: it is the writer again, the old one stays fenced.
        cluster.restart(new)
        wait_until(lambda: _instances(proxy)[0] == new, 10, "the new primary to be the writer again")
        assert _instances(proxy)[1][old]["role"] == "fenced"
        cluster.stop_instance(new)

    # Without the state file, a fresh proxy knows nothing better than timeline 1: the old
    # primary is the writer. (What the file is for.)
    (tmp_path / "three").mkdir()
    with ProxyProcess(_doc(cluster, None), tmp_path / "three") as proxy:
        wait_until(lambda: _instances(proxy)[0] == old, 10, "a proxy without memory to take the old primary")
