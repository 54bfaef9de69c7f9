#!/usr/bin/env python3
"""Compare pgbench -S throughput: direct, endpoint_proxy, PgBouncer, HAProxy.

One run starts a local PostgreSQL cluster (``endpoint_proxy.localcluster``),
initialises pgbench tables once, starts endpoint_proxy (writer endpoint),
PgBouncer (transaction mode) and HAProxy (tcp mode) on free loopback ports,
then measures ``pgbench -S`` at each client count against every target,
interleaved (for each c: direct, proxy, pgbouncer, haproxy) so that drift of
a shared machine spreads over all targets. It prints a table of tps and
ratios and, with ``--write-results``, appends it to ``benchmarks/RESULTS.md``
with the date and machine.

Everything it starts is stopped on exit, Ctrl-C and errors included.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py (this script's directory is on sys.path)
from _common import (
    APP_DB,
    APP_USER,
    DEFAULT_RESULTS,
    LOOPBACK,
    READY_TIMEOUT,
    REPO,
    BenchError,
    ProxyEndpoint,
    Service,
    append_results,
    find_binary,
    first_line,
    free_port,
    log,
    machine_info,
    machine_line,
    pgbench_login,
    proxy_config,
    run_main,
    server_version,
    version_number,
    wait_for_login,
)

ALL_TARGETS = ("direct", "proxy", "pgbouncer", "haproxy")
TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


def pg_env() -> dict[str, str]:
    return _common.pg_env("pgbench_compare")


def find_pgbench(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = find_binary("pgbench", ["/usr/lib/postgresql/15/bin/pgbench"])
    if found is None:
        raise BenchError("pgbench not found (install postgresql-contrib or pass --pgbench)")
    return found


# --------------------------------------------------------------------------
# pgbench
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    tps: float
    latency_ms: float | None


def pgbench_run(pgbench: str, port: int, clients: int, duration: int) -> RunResult:
    cmd = [
        pgbench,
        "-h", LOOPBACK, "-p", str(port), "-U", APP_USER,
        "-S", "-n",
        "-c", str(clients), "-j", str(min(clients, 2)),
        "-T", str(duration),
        APP_DB,
    ]  # fmt: skip
    try:
        out = subprocess.run(
            cmd,
            env=pg_env(),
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"pgbench did not finish in {duration + 60} s: {' '.join(cmd)}") from exc
    m = TPS_RE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise BenchError(
            f"pgbench failed (status {out.returncode}): {' '.join(cmd)}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    lat = LAT_RE.search(out.stdout)
    return RunResult(tps=float(m.group(1)), latency_ms=float(lat.group(1)) if lat else None)


def pgbench_init(pgbench: str, port: int, scale: int) -> None:
    log(f"pgbench -i -s {scale} against the primary (port {port})")
    cmd = [pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER,
           "-i", "-s", str(scale), "-q", APP_DB]  # fmt: skip
    try:
        out = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("pgbench -i did not finish in 900 s") from exc
    if out.returncode != 0:
        raise BenchError(f"pgbench -i failed (status {out.returncode}):\n{out.stderr[-3000:]}")


def wait_ready(pgbench: str, svc: Service | None, port: int, name: str) -> None:
    """Wait until a real login and query through ``port`` succeed (bounded)."""
    wait_for_login(svc, port, name, lambda: pgbench_login(pgbench, port, pg_env()))


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


@dataclass
class Backend:
    host: str
    port: int
    instances: list[tuple[str, str, int]]  # (name, host, port), primary first


def start_proxy(tmp: Path, backend: Backend, workers: int) -> Service:
    port = free_port()
    text = proxy_config(backend.instances, [ProxyEndpoint("writer", port, "writer")], workers=workers)
    return _common.start_proxy(tmp, text, port)


def start_pgbouncer(tmp: Path, backend: Backend, pool_size: int) -> Service:
    return _common.start_pgbouncer(
        tmp, {APP_DB: (backend.host, backend.port)}, pool_mode="transaction", pool_size=pool_size
    )


def start_haproxy(tmp: Path, backend: Backend) -> Service:
    return _common.start_haproxy(tmp, {"pg": (backend.host, backend.port)})


# --------------------------------------------------------------------------
# Machine description, git, results
# --------------------------------------------------------------------------


@dataclass
class Results:
    clients: list[int]
    targets: list[str]
    # runs[(target, clients)] -> tps of each repetition
    runs: dict[tuple[str, int], list[RunResult]] = field(default_factory=dict)

    def median(self, target: str, clients: int) -> float | None:
        rs = self.runs.get((target, clients))
        return statistics.median(r.tps for r in rs) if rs else None

    def median_latency(self, target: str, clients: int) -> float | None:
        rs = [r.latency_ms for r in self.runs.get((target, clients), []) if r.latency_ms]
        return statistics.median(rs) if rs else None


RATIOS = (
    ("proxy", "direct"),
    ("proxy", "pgbouncer"),
    ("proxy", "haproxy"),
    ("pgbouncer", "direct"),
    ("haproxy", "direct"),
)


def render_table(res: Results) -> str:
    targets = [t for t in ALL_TARGETS if t in res.targets]
    ratios = [(a, b) for a, b in RATIOS if a in targets and b in targets]
    header = ["clients", *(f"{t} tps" for t in targets), *(f"{a}/{b}" for a, b in ratios)]
    rows: list[list[str]] = []
    for c in res.clients:
        row = [str(c)]
        for t in targets:
            v = res.median(t, c)
            row.append(f"{v:,.0f}" if v is not None else "-")
        for a, b in ratios:
            va, vb = res.median(a, c), res.median(b, c)
            row.append(f"{va / vb:.2f}" if va is not None and vb else "-")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def render_latency(res: Results) -> str:
    targets = [t for t in ALL_TARGETS if t in res.targets]
    parts = []
    for c in res.clients:
        cells = []
        for t in targets:
            v = res.median_latency(t, c)
            cells.append(f"{t} {v:.3f}" if v is not None else f"{t} -")
        parts.append(f"c={c}: " + ", ".join(cells))
    return "; ".join(parts)


def render_raw(res: Results) -> list[str]:
    lines = []
    for c in res.clients:
        for t in ALL_TARGETS:
            rs = res.runs.get((t, c))
            if rs:
                lines.append(f"  - c={c} {t}: " + ", ".join(f"{r.tps:,.0f}" for r in rs))
    return lines


def results_section(res: Results, args: argparse.Namespace, machine: dict[str, str], versions: dict[str, str]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    clients = "/".join(str(c) for c in res.clients)
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    lines = [
        f"## {now} — pgbench -S, c={clients}",
        "",
        f"- Machine: {machine_line(machine)}",
        f"- Versions: {vers}",
        f"- Parameters: `pgbench -S -n -c C -j min(C,2) -T {args.duration}`, scale {args.scale}, "
        f"repeat {args.repeat} (median shown), warm-up {args.warmup} s, "
        f"order interleaved per c ({', '.join(res.targets)}), "
        f"proxy workers {args.proxy_workers}, replicas {args.replicas}, "
        f"PgBouncer pool_mode=transaction default_pool_size={args.pgbouncer_pool_size}, "
        "HAProxy mode tcp; all on 127.0.0.1 TCP",
        f"- Median latency (ms): {render_latency(res)}",
        "",
        render_table(res),
        "",
    ]
    if args.repeat > 1:
        lines += ["- tps of each repetition:", *render_raw(res), ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="pgbench -S tps: direct vs endpoint_proxy vs PgBouncer vs HAProxy",
    )
    p.add_argument("--duration", type=int, default=15, help="seconds per pgbench run (15)")
    p.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of: " + ",".join(ALL_TARGETS),
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per (c, target); median kept")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (10)")
    p.add_argument("--warmup", type=int, default=5, help="unrecorded direct warm-up, s (5)")
    p.add_argument("--proxy-workers", type=int, default=2, help="endpoint_proxy workers (2)")
    p.add_argument("--replicas", type=int, default=0, help="replicas in the local cluster (0)")
    p.add_argument("--pgbouncer-pool-size", type=int, default=64, help="default_pool_size (64)")
    p.add_argument("--pgbench", default=None, help="pgbench binary (default: auto)")
    p.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error("--clients must be comma-separated integers")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.targets = [t for t in ALL_TARGETS if t in targets]
    if args.duration < 1 or args.repeat < 1 or not args.clients or min(args.clients) < 1:
        p.error("--duration, --repeat and --clients must be positive")
    return args


def cluster_backend(cluster: Any) -> Backend:
    primary = cluster.instance(cluster.primary_name)
    instances = [(primary.name, primary.host, int(primary.port))]
    instances += [(i.name, i.host, int(i.port)) for i in cluster.instances if i.name != primary.name]
    return Backend(host=primary.host, port=int(primary.port), instances=instances)


def measure(
    args: argparse.Namespace,
    pgbench: str,
    tmp: Path,
    backend: Backend,
    res: Results,
    versions: dict[str, str],
) -> None:
    """Start the middlemen, run the interleaved pgbench series, stop the middlemen."""
    ports: dict[str, int] = {}
    if "direct" in args.targets:
        ports["direct"] = backend.port
    starters: dict[str, Callable[[], Service]] = {
        "proxy": lambda: start_proxy(tmp, backend, args.proxy_workers),
        "pgbouncer": lambda: start_pgbouncer(tmp, backend, args.pgbouncer_pool_size),
        "haproxy": lambda: start_haproxy(tmp, backend),
    }
    services: list[Service] = []
    try:
        for target, start in starters.items():
            if target in args.targets:
                svc = start()
                services.append(svc)
                ports[target] = svc.port
                versions[target] = svc.version
        for svc in services:
            wait_ready(pgbench, svc, svc.port, svc.name)

        if args.warmup > 0:
            log(f"warm-up: direct c=2 for {args.warmup} s (not recorded)")
            pgbench_run(pgbench, backend.port, 2, args.warmup)

        total = len(args.clients) * args.repeat * len(args.targets)
        n = 0
        for c in args.clients:
            for rep in range(args.repeat):
                for target in args.targets:
                    n += 1
                    for svc in services:
                        svc.check_alive()
                    r = pgbench_run(pgbench, ports[target], c, args.duration)
                    res.runs.setdefault((target, c), []).append(r)
                    lat = f", latency {r.latency_ms:.3f} ms" if r.latency_ms else ""
                    log(f"[{n}/{total}] c={c} rep {rep + 1}/{args.repeat} {target}: {r.tps:,.0f} tps{lat}")
    finally:
        # Before the cluster stops, so the middlemen see no server going away.
        for svc in reversed(services):
            svc.stop()


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

    pgbench = find_pgbench(args.pgbench)
    machine = machine_info()
    max_c = max(args.clients)
    # Room for the direct run, PgBouncer's pool and the proxy's backends at once.
    max_connections = max(300, 2 * max_c + args.pgbouncer_pool_size + 50)
    extra_conf = {"max_connections": str(max_connections), "shared_buffers": "256MB"}

    tmp = Path(tempfile.mkdtemp(prefix="pgbench-compare-"))
    versions: dict[str, str] = {}
    res = Results(clients=args.clients, targets=args.targets)
    log(f"temp dir {tmp}; targets {','.join(args.targets)}; clients {args.clients}")
    try:
        with PostgresCluster(replicas=args.replicas, extra_conf=extra_conf) as cluster:
            backend = cluster_backend(cluster)
            log(f"cluster up: primary {backend.host}:{backend.port}")
            wait_ready_direct(backend.port)
            pgbench_init(pgbench, backend.port, args.scale)
            versions["PostgreSQL"] = server_version(backend.port)
            versions["pgbench"] = version_number(first_line([pgbench, "--version"]))
            measure(args, pgbench, tmp, backend, res, versions)
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    print()
    print(
        f"pgbench -S -T {args.duration}, scale {args.scale}, repeat {args.repeat} (median), "
        f"proxy workers {args.proxy_workers}; nproc {machine['nproc']}, {machine['cpu']}"
    )
    print(vers)
    print()
    print(render_table(res))
    print()
    print(f"median latency (ms): {render_latency(res)}")
    if args.write_results:
        append_results(args.results_file, results_section(res, args, machine, versions))
        log(f"appended results to {args.results_file}")
    return 0


def wait_ready_direct(port: int) -> None:
    """Like wait_ready, for the primary (no tables yet: a bare login and query)."""
    psql = find_binary("psql")
    if psql is None:
        return  # the cluster module already waited for it to start
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            out = subprocess.run(
                [psql, "-h", LOOPBACK, "-p", str(port), "-Atc", "SELECT 1"],
                env=pg_env(), capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            if out.returncode == 0:
                return
            last = out.stderr.strip()
        except subprocess.TimeoutExpired:
            last = "login attempt timed out"
        if time.monotonic() > deadline:
            raise BenchError(f"primary on port {port} refuses app logins: {last}")
        time.sleep(0.3)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
