#!/usr/bin/env python3
"""Patroni as the HA authority: endpoint_proxy vs HAProxy with Patroni's REST health checks.

One local Patroni cluster (etcd + 3 nodes, endpoint_proxy.localcluster.patroni) serves every
step; both targets are in front of it at the same time:

- ``proxy``: endpoint_proxy following Patroni's etcd (``[clusters.patroni]``), ``promotion =
  "patroni"``;
- ``haproxy``: the usual setup, a tcp frontend whose servers are checked with ``GET /primary``
  on Patroni's REST API (``inter 1s fall 1 rise 1``, ``on-marked-down shutdown-sessions``).

Steps (each leaves the cluster whole again):

1. **switchover under pgbench c=16**: through the proxy (``POST /switchover`` on its admin
   API, method patroni) with ``pgbench -c 16`` on its writer endpoint; then through HAProxy
   (Patroni's own ``POST /switchover``) with the same pgbench on HAProxy. Reported: pgbench's
   errors (aborted clients, failed transactions), the write pause (largest gap between two
   acknowledged writes of a probe session) and Patroni's own switchover time (its request to
   the new leader accepting writes, polled directly).
2. **crash of the leader**: kill -9 of Patroni and PostgreSQL, then the leader key deleted
   (as its lease expiry would, ~20 s later). Writers through both targets; reported: from the
   new leader accepting writes (polled directly every 2 ms) to the first write acknowledged
   through each target, and errors on idle sessions (connected before, used after).
3. **Patroni killed alone**: the old primary stays up and writable (split brain, no watchdog);
   the leader key is deleted and another node promoted. Writers through both targets; reported:
   writes that reached the old primary after the key moved.

``--write-results`` appends the tables to ``benchmarks/RESULTS.md``. Needs etcd-server and
haproxy (benchmarks/setup.sh, scripts/bootstrap.sh --test); run as root (Patroni runs as the
``postgres`` user).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py (this script's directory is on sys.path)
import asyncpg
from _common import (
    DEFAULT_RESULTS,
    LOOPBACK,
    REPO,
    BenchError,
    Service,
    append_results,
    find_binary,
    free_port,
    log,
    machine_info,
    machine_line,
    markdown_table,
    spawn,
    start_proxy,
)

sys.path.insert(0, str(REPO))
from endpoint_proxy.localcluster.patroni import PatroniCluster  # noqa: E402

ADMIN = ("admin", "admin-secret")


# --- targets ----------------------------------------------------------------------------------------


def proxy_config(cluster: PatroniCluster, port: int, admin_port: int) -> str:
    return f"""
[logging]
format = "json"
level = "info"

[admin]
listen = "{LOOPBACK}:{admin_port}"
[[admin.users]]
name = "{ADMIN[0]}"
password = "{ADMIN[1]}"

[[clusters]]
name = "ha"
protocol = "postgresql"
health_check_interval_ms = 100
failover_timeout_ms = 60000
switchover_timeout_ms = 10000

[clusters.monitor]
user = "{cluster.monitor_user}"
password = "{cluster.monitor_password}"

[[clusters.users]]
name = "{cluster.app_user}"
password = "{cluster.app_password}"

[clusters.patroni]
scope = "{cluster.scope}"
namespace = "{cluster.namespace}"
etcd = ["{cluster.etcd_url}"]
rest = {json.dumps(cluster.rest_urls)}

[clusters.promotion]
method = "patroni"

[[clusters.endpoints]]
name = "writer"
listen = "{LOOPBACK}:{port}"
kind = "writer"
"""


def start_haproxy(tmp: Path, cluster: PatroniCluster, port: int) -> Service:
    """HAProxy as Patroni's documentation sets it up: tcp, servers checked on /primary."""
    binary = find_binary("haproxy", ["/usr/sbin/haproxy"])
    if binary is None:
        raise BenchError("haproxy not found: run benchmarks/setup.sh")
    servers = [f"    server {n.name} {LOOPBACK}:{n.port} maxconn 1000 check port {n.rest_port}"
               for n in cluster.instances]
    text = "\n".join([
        "global", "    maxconn 1000", "",
        "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 1h", "    timeout server 1h",
        "    timeout check 1s", "",
        "frontend writer_front", f"    bind {LOOPBACK}:{port}", "    default_backend primary", "",
        "backend primary", "    option httpchk GET /primary", "    http-check expect status 200",
        "    default-server inter 1s fall 1 rise 1 on-marked-down shutdown-sessions", *servers, ""])
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(text)
    svc = spawn("haproxy", port, [binary, "-db", "-f", str(cfg)], tmp / "haproxy.log")
    svc.version = _common.version_number(_common.first_line([binary, "-v"]))
    return svc


def admin_post(port: int, path: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", data=json.dumps(body).encode(), method="POST")
    request.add_header("Authorization", "Basic " + base64.b64encode(":".join(ADMIN).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# --- load -------------------------------------------------------------------------------------------


def url(cluster: PatroniCluster, port: int) -> str:
    return f"postgresql://{cluster.app_user}:{cluster.app_password}@{LOOPBACK}:{port}/{cluster.database}"


class Writer:
    """Sessions writing in a loop through one target; reconnect after an error, as apps do."""

    def __init__(self, name: str, dsn: str, sessions: int) -> None:
        self.name, self.dsn, self.sessions = name, dsn, sessions
        self.acks: list[float] = []  # time.time() of each acknowledged write
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.sessions)))

    async def _one(self, i: int) -> None:
        conn: asyncpg.Connection | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncpg.connect(self.dsn), 5)
                await asyncio.wait_for(conn.execute("insert into bench_writes (src) values ($1)", self.name), 30)
                self.acks.append(time.time())
            except Exception as e:  # noqa: BLE001 - any failure a client sees is an error to count
                self.errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                conn = None
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.002)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def largest_gap(self, after: float) -> float:
        acks = sorted(a for a in self.acks if a >= after - 5)
        gaps = [b - a for a, b in zip(acks, acks[1:], strict=False) if b >= after]
        return max(gaps, default=float("nan"))

    def first_after(self, t: float) -> float | None:
        return min((a for a in self.acks if a >= t), default=None)


async def first_writable(cluster: PatroniCluster, exclude: str, timeout: float = 60) -> tuple[str, float]:
    """Poll every other node directly every 2 ms; (name, time.time()) of the first that accepts writes."""
    conns = {}
    for node in cluster.instances:
        if node.name != exclude:
            conns[node.name] = await asyncpg.connect(
                f"postgresql://{cluster.monitor_user}:{cluster.monitor_password}@{LOOPBACK}:{node.port}/postgres")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, conn in conns.items():
                with contextlib.suppress(asyncpg.PostgresError, OSError):
                    if await conn.fetchval("select not pg_is_in_recovery()"):
                        return name, time.time()
            await asyncio.sleep(0.002)
        raise BenchError("no node became writable in time")
    finally:
        for conn in conns.values():
            with contextlib.suppress(Exception):
                await conn.close()


def pgbench(dsn: str, seconds: int, script: Path, clients: int = 16) -> subprocess.Popen[str]:
    binary = find_binary("pgbench", ["/usr/lib/postgresql/15/bin/pgbench"])
    if binary is None:
        raise BenchError("pgbench not found")
    return subprocess.Popen([binary, "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", str(script), dsn],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pgbench_summary(output: str, code: int) -> tuple[int, int]:
    """(transactions processed, errors: aborted clients and failed transactions; a failed run
    that says neither counts as one)."""
    done = re.search(r"number of transactions actually processed: (\d+)", output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    errors = len(re.findall(r"client \d+ aborted", output)) + (int(failed.group(1)) if failed else 0)
    if code != 0 and errors == 0:
        errors = 1
    return int(done.group(1)) if done else 0, errors


async def wait_accepting(port: int, service: Service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise BenchError(f"{service.name} does not accept on {port}")


def restore(cluster: PatroniCluster, name: str) -> None:
    cluster.restart(name)
    cluster.wait_streaming(timeout=120)


# --- steps ------------------------------------------------------------------------------------------


async def switchover_step(cluster: PatroniCluster, target: str, port: int, admin_port: int,
                          tmp: Path, seconds: int) -> dict[str, Any]:
    old = cluster.wait_leader()
    candidate = next(n.name for n in cluster.instances if n.name != old)
    script = tmp / "insert.sql"
    script.write_text(f"insert into bench_writes (src) values ('pgbench-{target}');\n")
    bench = pgbench(url(cluster, port), seconds, script)
    probe = Writer(target, url(cluster, port), 1)
    probe_task = asyncio.create_task(probe.run())
    await asyncio.sleep(seconds / 3)
    started = time.time()
    writable = asyncio.create_task(first_writable(cluster, old))
    if target == "proxy":
        status, answer = await asyncio.to_thread(admin_post, admin_port, "/switchover", {"to": candidate})
        record = answer.get("switchover") or {}
        pause = record.get("pause_ms")
        if status != 200:
            raise BenchError(f"proxy switchover failed: {answer}")
    else:
        status, text = await asyncio.to_thread(cluster.switchover, candidate, old)
        pause = None
        if status != 200:
            raise BenchError(f"Patroni switchover failed: {text}")
    new, writable_at = await writable
    output, _ = await asyncio.to_thread(bench.communicate)
    probe.stop.set()
    await probe_task
    processed, errors = pgbench_summary(output, bench.returncode)
    await asyncio.to_thread(cluster.wait_streaming, timeout=120)
    return {"target": target, "from": old, "to": new, "pgbench_tx": processed, "pgbench_errors": errors,
            "probe_errors": len(probe.errors), "gap_ms": round(probe.largest_gap(started) * 1000),
            "pause_ms": pause, "patroni_s": round(writable_at - started, 2)}


async def crash_step(cluster: PatroniCluster, targets: dict[str, int]) -> list[dict[str, Any]]:
    old = cluster.wait_leader()
    writers = {name: Writer(name, url(cluster, port), 4) for name, port in targets.items()}
    idle = {name: [await asyncpg.connect(url(cluster, port)) for _ in range(4)] for name, port in targets.items()}
    for conns in idle.values():
        for conn in conns:
            await conn.execute("set application_name = 'idle'")
    tasks = [asyncio.create_task(w.run()) for w in writers.values()]
    await asyncio.sleep(2)
    writable = asyncio.create_task(first_writable(cluster, old))
    await asyncio.to_thread(cluster.kill, old)
    await asyncio.to_thread(cluster.delete_leader_key)
    new, writable_at = await writable
    await asyncio.sleep(4)
    idle_errors = {}
    for name, conns in idle.items():
        errors = 0
        for conn in conns:
            try:
                await asyncio.wait_for(conn.execute("insert into bench_writes (src) values ('idle')"), 30)
            except Exception:  # noqa: BLE001 - see Writer
                errors += 1
            with contextlib.suppress(Exception):
                await conn.close()
        idle_errors[name] = errors
    for w in writers.values():
        w.stop.set()
    await asyncio.gather(*tasks)
    rows = []
    for name, w in writers.items():
        first = w.first_after(writable_at)
        rows.append({"target": name, "from": old, "to": new,
                     "first_write_ms": None if first is None else round((first - writable_at) * 1000, 1),
                     "idle_errors": idle_errors[name], "writer_errors": len(w.errors)})
    await asyncio.to_thread(restore, cluster, old)
    return rows


def proxy_saw_key_deleted(logfile: Path, old: str) -> float | None:
    """When the proxy logged the leader key's deletion (authority_leader, was ``old``), epoch s."""
    seen = None
    for line in logfile.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "authority_leader" and event.get("leader") is None and event.get("was") == old:
                stamp = event["timestamp"].replace("Z", "+00:00")
                seen = dt.datetime.fromisoformat(stamp).timestamp()
    return seen


async def patroni_kill_step(cluster: PatroniCluster, targets: dict[str, int], proxy_log: Path
                            ) -> list[dict[str, Any]]:
    old = cluster.wait_leader()
    writers = {name: Writer(name, url(cluster, port), 4) for name, port in targets.items()}
    tasks = [asyncio.create_task(w.run()) for w in writers.values()]
    await asyncio.sleep(2)
    await asyncio.to_thread(cluster.kill_patroni, old)
    await asyncio.to_thread(cluster.delete_leader_key)
    moved = time.time()
    new, _ = await first_writable(cluster, old)
    await asyncio.sleep(5)
    for w in writers.values():
        w.stop.set()
    await asyncio.gather(*tasks)
    rows = []
    seen = proxy_saw_key_deleted(proxy_log, old)
    for name, w in writers.items():
        late, last = cluster.sql(old, f"select count(*), coalesce(extract(epoch from max(at)), 0) from bench_writes "
                                      f"where src = '{name}' and at > to_timestamp({moved})").split("|")
        after_seen = None
        if name == "proxy" and seen is not None:
            after_seen = int(cluster.sql(old, f"select count(*) from bench_writes where src = '{name}' "
                                              f"and at > to_timestamp({seen})"))
        rows.append({"target": name, "old": old, "new": new, "late_writes": int(late),
                     "last_late_ms": round((float(last) - moved) * 1000) if int(late) else None,
                     "after_seen": after_seen, "seen_ms": None if seen is None else round((seen - moved) * 1000, 1),
                     "writer_errors": len(w.errors), "acked": len(w.acks)})
    await asyncio.to_thread(restore, cluster, old)
    return rows


# --- main -------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="ep-bench-patroni-") as tmp_name, PatroniCluster(3) as cluster:
        tmp = Path(tmp_name)
        leader = cluster.wait_leader()
        cluster.sql(leader, "create table bench_writes (id bigserial primary key, src text, "
                            "at timestamptz default clock_timestamp())")
        cluster.sql(leader, f"alter table bench_writes owner to {cluster.app_user}")
        proxy_port, admin_port, haproxy_port = free_port(), free_port(), free_port()
        proxy = start_proxy(tmp, proxy_config(cluster, proxy_port, admin_port), proxy_port)
        haproxy = start_haproxy(tmp, cluster, haproxy_port)
        try:
            await wait_accepting(proxy_port, proxy)
            await asyncio.sleep(2)
            targets = {"proxy": proxy_port, "haproxy": haproxy_port}
            log("step 1: switchover under pgbench c=16")
            switchovers = [await switchover_step(cluster, "proxy", proxy_port, admin_port, tmp, args.duration),
                           await switchover_step(cluster, "haproxy", haproxy_port, admin_port, tmp, args.duration)]
            log(f"  {switchovers}")
            log("step 2: crash of the leader, leader key deleted")
            crashes = await crash_step(cluster, targets)
            log(f"  {crashes}")
            log("step 3: Patroni killed alone on the leader")
            kills = await patroni_kill_step(cluster, targets, proxy.logfile)
            log(f"  {kills}")
        finally:
            proxy.stop()
            haproxy.stop()
        return report(switchovers, crashes, kills, haproxy.version)


def report(switchovers: list[dict[str, Any]], crashes: list[dict[str, Any]], kills: list[dict[str, Any]],
           haproxy_version: str) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"## Patroni as the HA authority ({when})\n",
             f"`benchmarks/patroni_compare.py`, revision {_common.git_revision()}; "
             f"{machine_line(machine_info())}; Patroni 4.1.5, etcd 3.4, HAProxy {haproxy_version} "
             "(`option httpchk GET /primary`, `inter 1s fall 1 rise 1`, `on-marked-down shutdown-sessions`).\n",
             "Switchover under `pgbench -c 16` (insert per transaction). Through the proxy: its `POST /switchover` "
             "(method patroni); through HAProxy: Patroni's own `POST /switchover`. `gap_ms`: the largest gap between "
             "two acknowledged writes of a probe session; `pause_ms`: the proxy's gate; `patroni_s`: from the request "
             "to the new leader accepting writes.\n",
             markdown_table(["target", "from -> to", "pgbench tx", "pgbench errors", "probe errors", "gap_ms",
                             "pause_ms", "patroni_s"],
                            [[r["target"], f"{r['from']} -> {r['to']}", cell(r["pgbench_tx"]),
                              cell(r["pgbench_errors"]), cell(r["probe_errors"]), cell(r["gap_ms"]),
                              cell(r["pause_ms"]), cell(r["patroni_s"])]
                             for r in switchovers]) + "\n",
             "Crash of the leader (kill -9 of Patroni and PostgreSQL, leader key deleted). `first_write_ms`: from the "
             "new leader accepting writes (polled directly every 2 ms) to the first write acknowledged through the "
             "target; `idle_errors`: of 4 idle sessions connected before, used after; `writer_errors`: of 4 writing "
             "sessions (which reconnect after an error).\n",
             markdown_table(["target", "from -> to", "first_write_ms", "idle_errors", "writer_errors"],
                            [[r["target"], f"{r['from']} -> {r['to']}", cell(r["first_write_ms"]),
                              cell(r["idle_errors"]), cell(r["writer_errors"])] for r in crashes]) + "\n",
             "Patroni killed alone on the leader (its PostgreSQL stays up and writable), leader key deleted, another "
             "node promoted; 4 writing sessions per target. `late_writes`: rows that reached the old primary after "
             "the key moved (the benchmark's delete returned), `last_late_ms`: the last of them, after the move; "
             "`seen_ms`: when the proxy logged the deletion (its watch), after the move; `after_seen`: rows that "
             "reached the old primary through the proxy after that.\n",
             markdown_table(["target", "old -> new", "late_writes", "last_late_ms", "seen_ms", "after_seen", "acked",
                             "writer_errors"],
                            [[r["target"], f"{r['old']} -> {r['new']}", cell(r["late_writes"]), cell(r["last_late_ms"]),
                              cell(r["seen_ms"]), cell(r["after_seen"]), cell(r["acked"]), cell(r["writer_errors"])]
                             for r in kills]) + "\n"]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=15, help="pgbench seconds per switchover")
    parser.add_argument("--write-results", action="store_true", help=f"append to {DEFAULT_RESULTS}")
    args = parser.parse_args()
    text = asyncio.run(main_async(args))
    print(text)
    if args.write_results:
        append_results(DEFAULT_RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
