#!/usr/bin/env python3
"""Memory per idle client: endpoint_proxy against PgBouncer, same clients, same run.

One run starts a local PostgreSQL primary (``endpoint_proxy.localcluster``), endpoint_proxy
(a writer endpoint in session mode, and one in transaction mode when ``--transaction``) and
PgBouncer (session and transaction pools), then for each target: opens N clients in a separate
process (each logs in and runs one statement, then sits idle), reads the target's resident
memory (VmRSS of its process tree) before and after, and reports the difference per client and
in all. The clients live in their own process so that this one stays small and the file
descriptor limit is theirs. ``--write-results`` appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _common
from _common import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    DEFAULT_RESULTS,
    LOOPBACK,
    REPO,
    BenchError,
    ProxyEndpoint,
    Service,
    append_results,
    free_port,
    log,
    machine_info,
    machine_line,
    markdown_table,
    proxy_config,
    server_version,
    terminate_as_interrupt,
)

CLIENT_SCRIPT = r'''
import asyncio, json, resource, sys
import asyncpg

async def main(port, n, batch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = []
    for start in range(0, n, batch):
        conns += await asyncio.gather(*(asyncpg.connect(host="127.0.0.1", port=port, user="app",
                                                        password="app-secret", database="app", ssl=False,
                                                        timeout=60, statement_cache_size=0)
                                        for _ in range(start, min(n, start + batch))))
    for start in range(0, n, batch):
        await asyncio.gather(*(c.fetchval("select 1") for c in conns[start:start + batch]))
    print(json.dumps({"open": len(conns)}), flush=True)
    sys.stdin.readline()  # hold them until told to go
    for c in conns:
        c.terminate()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
'''


def rss_kb(pid: int) -> int:
    """VmRSS of a process and its children (PgBouncer and the proxy are one process each)."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                pids += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def wait_login(service: Service, port: int) -> None:
    """Until a real login and query through ``port`` succeed (bounded)."""
    psql = shutil.which("psql") or "psql"
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "5"}
    deadline = time.monotonic() + 30
    while True:
        service.check_alive()
        out = subprocess.run([psql, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-Atc", "select 1", APP_DB],
                             env=env, capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{service.name} on port {port} refuses logins: {out.stderr.strip()}")
        time.sleep(0.3)


def measure(service: Service, port: int, clients: int, batch: int, python: str) -> dict[str, float]:
    time.sleep(1.0)
    before = rss_kb(service.proc.pid)
    proc = subprocess.Popen([python, "-c", CLIENT_SCRIPT, str(port), str(clients), str(batch)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise BenchError(f"the clients of {service.name} failed (exit {proc.returncode})")
    opened = json.loads(line)["open"]
    time.sleep(2.0)
    after = rss_kb(service.proc.pid)
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(120)
    return {"clients": opened, "before_kb": before, "after_kb": after,
            "per_client_kb": (after - before) / max(1, opened)}


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

    machine = machine_info()
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    session_needs = 0 if args.only_transaction else args.clients + 60
    extra_conf = {"max_connections": str(max(200, session_needs)), "shared_buffers": "128MB"}
    tmp = Path(tempfile.mkdtemp(prefix="idle-memory-"))
    tmp.chmod(0o711)  # PgBouncer runs as postgres and must reach its directory
    rows: list[list[str]] = []
    versions: dict[str, str] = {}
    try:
        with PostgresCluster(replicas=0, extra_conf=extra_conf) as cluster:
            primary = cluster.instance(cluster.primary_name)
            versions["PostgreSQL"] = server_version(primary.port)
            targets: list[tuple[str, str, Service, int]] = []
            if "proxy" in args.targets:
                endpoints = [ProxyEndpoint("session", free_port(), "writer")]
                if args.transaction:
                    endpoints.append(ProxyEndpoint("transaction", free_port(), "writer",
                                                   {"pool_mode": "transaction"}))
                settings: dict[str, str | int | bool] = {"health_check_interval_ms": 1000}
                if args.transaction:
                    settings["pool_size"] = args.pool_size
                cfg = proxy_config([(primary.name, LOOPBACK, primary.port)], endpoints,
                                   cluster_settings=settings)
                (tmp / "proxy").mkdir()
                svc = _common.start_proxy(tmp / "proxy", cfg, endpoints[0].port)
                wait_login(svc, endpoints[0].port)
                versions["endpoint_proxy"] = svc.version
                targets.append(("endpoint_proxy", "session", svc, endpoints[0].port))
                if args.transaction:
                    targets.append(("endpoint_proxy", "transaction", svc, endpoints[1].port))
            if "pgbouncer" in args.targets:
                for mode in ("session", "transaction") if args.transaction else ("session",):
                    if mode == "session" and args.only_transaction:
                        continue
                    (tmp / f"pgb-{mode}").mkdir()
                    svc = _common.start_pgbouncer(tmp / f"pgb-{mode}", {APP_DB: (LOOPBACK, primary.port)},
                                                  pool_mode=mode, pool_size=args.pool_size if mode == "transaction"
                                                  else args.clients + 10, max_client_conn=args.clients + 100)
                    wait_login(svc, svc.port)
                    versions["PgBouncer"] = svc.version
                    targets.append(("PgBouncer", mode, svc, svc.port))
            results = []
            try:
                for name, mode, svc, port in targets:
                    if mode == "session" and (args.only_transaction
                                              or args.clients + 60 > int(extra_conf["max_connections"])):
                        continue
                    log(f"{name} ({mode}): {args.clients} idle clients")
                    r = measure(svc, port, args.clients, args.batch, python)
                    results.append((name, mode, r))
                    rows.append([name, mode, f"{r['clients']:,}", f"{r['before_kb'] / 1024:.1f}",
                                 f"{r['after_kb'] / 1024:.1f}", f"{(r['after_kb'] - r['before_kb']) / 1024:.1f}",
                                 f"{r['per_client_kb']:.1f}"])
            finally:
                for _, _, svc, _ in {id(t[2]): t for t in targets}.values():
                    svc.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = ["target", "pool mode", "idle clients", "RSS before (MiB)", "RSS after (MiB)", "delta (MiB)",
              "per client (kB)"]
    if not rows:
        print("idle_memory: no target measured (--targets proxy,pgbouncer)", file=sys.stderr)
        return 1
    table = markdown_table(header, rows, text_columns=2)
    print(table)
    if args.write_results:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        vers = ", ".join(f"{k} {v}" for k, v in versions.items())
        section = (f"## {now} — memory per idle client, {args.clients} clients\n\n"
                   f"- Machine: {machine_line(machine)}\n- Versions: {vers}\n"
                   f"- Method: each client (asyncpg, in a separate process) logs in through the target, runs "
                   f"`select 1`, then sits idle; VmRSS of the target's process before and after; PgBouncer "
                   f"session pool sized for every client, transaction pools of {args.pool_size}\n\n{table}\n")
        append_results(args.results_file, section)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="clients connecting at once")
    parser.add_argument("--targets", type=lambda s: s.split(","), default=["proxy", "pgbouncer"])
    parser.add_argument("--transaction", action="store_true", help="also transaction-mode pools")
    parser.add_argument("--only-transaction", action="store_true",
                        help="transaction-mode pools alone (no session mode: no server connection per client)")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    args.transaction = args.transaction or args.only_transaction
    with terminate_as_interrupt():
        try:
            return run(args)
        except BenchError as e:
            print(f"idle_memory: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
