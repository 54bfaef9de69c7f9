#!/usr/bin/env python3
"""Read/write splitting: the readwrite endpoint vs the writer endpoint vs the primary directly.

One run starts a local PostgreSQL cluster (primary pg0, streaming replicas pg1 and pg2,
``endpoint_proxy.localcluster``), initialises pgbench tables once, and starts one
endpoint_proxy with three endpoints: ``writer``, ``readwrite`` (consistency eventual) and
``readwrite`` with ``consistency = "session"``. It then runs three pgbench workloads
(all ``-M prepared``, ``--clients`` clients, autocommit statements):

- ``select``: ``pgbench -S`` (one primary-key SELECT per transaction): the cost of
  classifying each statement, and the reads now served by the replicas;
- ``mixed``: 9 primary-key SELECTs and 1 UPDATE of pgbench_accounts per transaction;
- ``update-select``: ``UPDATE`` a row, then ``SELECT`` the same row: the cost of session
  consistency (read-your-writes), which must wait for a replica to replay the update or
  send the read to the writer.

Targets are interleaved per workload (direct, writer, readwrite, rw-session). It prints
tps, ratios, the share of statements the proxy sent to replicas (from its admin
``/metrics``) and, for ``update-select``, the share of reads that did not see the
session's own update (from a separate untimed probe run). ``--write-results`` appends
the result to ``benchmarks/RESULTS.md``.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import _common  # benchmarks/_common.py (this script's directory is on sys.path)
from _common import (
    APP_DB,
    APP_USER,
    DEFAULT_RESULTS,
    LOOPBACK,
    REPO,
    BenchError,
    ProxyEndpoint,
    Service,
    append_results,
    fetch_metrics,
    find_binary,
    first_line,
    free_port,
    log,
    machine_info,
    machine_line,
    markdown_table,
    metric_value,
    pgbench_login,
    proxy_config,
    run_main,
    server_version,
    version_number,
    wait_for_login,
)

if TYPE_CHECKING:
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

ALL_TARGETS = ("direct", "writer", "readwrite", "rw-session")
PROXY_ENDPOINTS = {"writer": "writer", "readwrite": "rw", "rw-session": "rw_session"}  # target -> endpoint name

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)

STALE_TABLE = "rw_bench_stale"
ROWS_PER_SCALE = 100_000  # pgbench_accounts rows per unit of scale


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    targets: tuple[str, ...]
    builtin: str | None = None  # a pgbench builtin option (-S), or else a custom script
    stale_probe: bool = False  # measure reads that miss the session's own write (untimed)


WORKLOADS = (
    Workload(
        "select", "pgbench -S: 1 primary-key SELECT per transaction", ("direct", "writer", "readwrite"), builtin="-S"
    ),  # fmt: skip
    Workload(
        "mixed",
        "9 primary-key SELECTs + 1 UPDATE of pgbench_accounts per transaction, autocommit",
        ("direct", "writer", "readwrite", "rw-session"),
    ),  # fmt: skip
    Workload(
        "update-select",
        "UPDATE a row, then SELECT the same row; two autocommit statements",
        ("direct", "writer", "readwrite", "rw-session"),
        stale_probe=True,
    ),  # fmt: skip
)
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)


def mixed_script(rows: int) -> str:
    lines: list[str] = []
    for i in range(1, 10):
        lines += [f"\\set aid{i} random(1, {rows})", f"SELECT abalance FROM pgbench_accounts WHERE aid = :aid{i};"]
    lines += [
        f"\\set aid random(1, {rows})",
        "\\set delta random(-5000, 5000)",
        "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;",
    ]
    return "\n".join(lines) + "\n"


def update_select_script(rows: int) -> str:
    return (
        f"\\set aid random(1, {rows})\n"
        "\\set delta random(1, 1000)\n"
        "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n"
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
    )


def stale_probe_script(rows: int) -> str:
    """update-select, checking that the SELECT sees the UPDATE (delta is never 0); a stale read
    inserts a row into the stale table. Two clients updating the same row between the two
    statements would count too: with 100,000 rows per scale unit that is negligible."""
    return (
        f"\\set aid random(1, {rows})\n"
        "\\set delta random(1, 1000)\n"
        "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid RETURNING abalance AS expected "
        "\\gset\n"
        "SELECT abalance AS got FROM pgbench_accounts WHERE aid = :aid \\gset\n"
        "\\if :got != :expected\n"
        f"INSERT INTO {STALE_TABLE} DEFAULT VALUES;\n"
        "\\endif\n"
    )


# --------------------------------------------------------------------------
# pgbench
# --------------------------------------------------------------------------


def pg_env() -> dict[str, str]:
    return _common.pg_env("readwrite_compare")


def find_pgbench(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = find_binary("pgbench", ["/usr/lib/postgresql/15/bin/pgbench"])
    if found is None:
        raise BenchError("pgbench not found (install postgresql-contrib or pass --pgbench)")
    return found


@dataclass
class RunResult:
    tps: float
    latency_ms: float | None
    replica_share: float | None = None  # statements the proxy routed to a replica / all it routed


def pgbench(pgbench_bin: str, port: int, args: Sequence[str], timeout: float) -> str:
    cmd = [pgbench_bin, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-n", *args, APP_DB]
    try:
        out = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"pgbench did not finish in {timeout:.0f} s: {' '.join(cmd)}") from exc
    if out.returncode != 0:
        raise BenchError(
            f"pgbench failed (status {out.returncode}): {' '.join(cmd)}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return out.stdout


def workload_args(w: Workload, scripts: dict[str, Path]) -> list[str]:
    if w.builtin is not None:
        return [w.builtin]
    return ["-f", str(scripts[w.name])]


def timed_run(pgbench_bin: str, port: int, wargs: Sequence[str], clients: int, duration: int) -> RunResult:
    args = [*wargs, "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(duration)]
    stdout = pgbench(pgbench_bin, port, args, duration + 60)
    m = TPS_RE.search(stdout)
    if m is None:
        raise BenchError(f"no tps line in pgbench's output:\n{stdout[-2000:]}")
    lat = LAT_RE.search(stdout)
    return RunResult(tps=float(m.group(1)), latency_ms=float(lat.group(1)) if lat else None)


def pgbench_init(pgbench_bin: str, port: int, scale: int) -> None:
    log(f"pgbench -i -s {scale} against the primary (port {port})")
    pgbench(pgbench_bin, port, ["-i", "-s", str(scale), "-q"], 900)


def wait_ready(pgbench_bin: str, svc: Service | None, port: int, name: str) -> None:
    """Wait until a real login and query through ``port`` succeed (bounded)."""
    wait_for_login(svc, port, name, lambda: pgbench_login(pgbench_bin, port, pg_env()))


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class Results:
    workloads: list[Workload]
    runs: dict[tuple[str, str], list[RunResult]] = field(default_factory=dict)  # (workload, target)
    stale: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # -> (stale reads, reads)

    def median(self, workload: str, target: str) -> float | None:
        rs = self.runs.get((workload, target))
        return statistics.median(r.tps for r in rs) if rs else None

    def median_latency(self, workload: str, target: str) -> float | None:
        vs = [r.latency_ms for r in self.runs.get((workload, target), []) if r.latency_ms is not None]
        return statistics.median(vs) if vs else None

    def replica_share(self, workload: str, target: str) -> float | None:
        vs = [r.replica_share for r in self.runs.get((workload, target), []) if r.replica_share is not None]
        return statistics.median(vs) if vs else None


RATIOS = (
    ("writer", "direct"),
    ("readwrite", "writer"),
    ("readwrite", "direct"),
    ("rw-session", "readwrite"),
    ("rw-session", "writer"),
)


def render_tps_table(res: Results) -> str:
    header = ["workload", *(f"{t} tps" for t in ALL_TARGETS), *(f"{a}/{b}" for a, b in RATIOS)]
    rows: list[list[str]] = []
    for w in res.workloads:
        row = [w.name]
        for t in ALL_TARGETS:
            v = res.median(w.name, t)
            row.append(f"{v:,.0f}" if v is not None else "-")
        for a, b in RATIOS:
            va, vb = res.median(w.name, a), res.median(w.name, b)
            row.append(f"{va / vb:.2f}" if va is not None and vb else "-")
        rows.append(row)
    return markdown_table(header, rows)


def render_detail_table(res: Results) -> str:
    header = ["workload", "target", "tps", "latency (ms)", "to replicas", "stale reads"]
    rows: list[list[str]] = []
    for w in res.workloads:
        for t in w.targets:
            tps = res.median(w.name, t)
            if tps is None:
                continue
            lat = res.median_latency(w.name, t)
            share = res.replica_share(w.name, t)
            stale = res.stale.get((w.name, t))
            rows.append([
                w.name,
                t,
                f"{tps:,.0f}",
                f"{lat:.3f}" if lat is not None else "-",
                f"{share:.0%}" if share is not None else "-",
                f"{stale[0]:,}/{stale[1]:,} ({stale[0] / stale[1]:.1%})" if stale and stale[1] else "-",
            ])  # fmt: skip
    return markdown_table(header, rows, 2)


def render_raw(res: Results) -> list[str]:
    return [
        f"  - {w.name} {t}: " + ", ".join(f"{r.tps:,.0f}" for r in res.runs[(w.name, t)])
        for w in res.workloads
        for t in w.targets
        if (w.name, t) in res.runs
    ]


def parameters_line(args: argparse.Namespace) -> str:
    return (
        f"`pgbench -n -M prepared -c {args.clients} -j {min(args.clients, 2)} -T {args.duration}`, "
        f"scale {args.scale}, repeat {args.repeat} (median shown), warm-up {args.warmup} s, "
        "targets interleaved per workload; primary pg0 + 2 streaming replicas, "
        f"synchronous_commit={args.synchronous_commit}; one proxy (workers {args.proxy_workers}) with a writer "
        "endpoint, a readwrite endpoint (consistency eventual) and a readwrite endpoint (consistency session, "
        f"session_wait_ms={args.session_wait_ms}); stale-read probe {args.probe_transactions} transactions per "
        "client, untimed; all on 127.0.0.1 TCP"
    )


COLUMNS = (
    "direct: the primary itself; writer: the proxy's writer endpoint; readwrite: readwrite endpoint, "
    "consistency eventual; rw-session: readwrite endpoint, consistency session. "
    "to replicas: statements (or transactions) the proxy routed to a replica, from its "
    "`endpoint_proxy_statements_total{route}`; stale reads: in a separate untimed run of update-select, "
    "SELECTs that did not see the session's own UPDATE just before."
)


def workload_lines(res: Results) -> list[str]:
    return [f"  - {w.name}: {w.description}" for w in res.workloads]


def results_section(res: Results, args: argparse.Namespace, machine: dict[str, str], versions: dict[str, str]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    lines = [
        f"## {now} — read/write splitting: readwrite vs writer endpoint, c={args.clients}",
        "",
        f"- Machine: {machine_line(machine)}",
        f"- Versions: {vers}",
        f"- Parameters: {parameters_line(args)}",
        "- Workloads:",
        *workload_lines(res),
        f"- Columns: {COLUMNS}",
        "",
        render_tps_table(res),
        "",
        render_detail_table(res),
        "",
    ]
    if args.repeat > 1:
        lines += ["- tps of each repetition:", *render_raw(res), ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class Proxy:
    svc: Service
    ports: dict[str, int]  # target -> port
    admin_port: int


def start_proxy(tmp: Path, cluster: PostgresCluster, args: argparse.Namespace) -> Proxy:
    ports = {t: free_port() for t in PROXY_ENDPOINTS}
    admin_port = free_port()
    instances = [(i.name, i.host, int(i.port)) for i in cluster.instances]
    endpoints = [
        ProxyEndpoint(PROXY_ENDPOINTS["writer"], ports["writer"], "writer"),
        ProxyEndpoint(PROXY_ENDPOINTS["readwrite"], ports["readwrite"], "readwrite", {"consistency": "eventual"}),
        ProxyEndpoint(
            PROXY_ENDPOINTS["rw-session"],
            ports["rw-session"],
            "readwrite",
            {"consistency": "session", "session_wait_ms": args.session_wait_ms},
        ),
    ]
    text = proxy_config(instances, endpoints, workers=args.proxy_workers, admin_port=admin_port)
    svc = _common.start_proxy(tmp, text, ports["writer"])
    return Proxy(svc, ports, admin_port)


def routed(proxy: Proxy, target: str) -> tuple[float, float]:
    """(statements routed to a replica, to the writer) so far by the target's endpoint."""
    samples = fetch_metrics(proxy.admin_port)
    name = "endpoint_proxy_statements_total"
    endpoint = PROXY_ENDPOINTS[target]
    return (
        metric_value(samples, name, endpoint=endpoint, route="reader"),
        metric_value(samples, name, endpoint=endpoint, route="writer"),
    )


def stale_probe(
    pgbench_bin: str, port: int, cluster: PostgresCluster, script: Path, clients: int, transactions: int
) -> tuple[int, int]:
    """Run the stale-read probe; (stale reads, reads)."""
    primary = cluster.primary_name
    cluster.sql(primary, f"TRUNCATE {STALE_TABLE}", user=APP_USER)
    args = ["-f", str(script), "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
            "-t", str(transactions)]  # fmt: skip
    pgbench(pgbench_bin, port, args, 300)
    stale = int(cluster.sql(primary, f"SELECT count(*) FROM {STALE_TABLE}", user=APP_USER) or 0)
    return stale, clients * transactions


def measure(
    args: argparse.Namespace,
    pgbench_bin: str,
    tmp: Path,
    cluster: PostgresCluster,
    res: Results,
    versions: dict[str, str],
) -> None:
    rows = ROWS_PER_SCALE * args.scale
    scripts = {
        "mixed": tmp / "mixed.sql",
        "update-select": tmp / "update_select.sql",
        "stale-probe": tmp / "stale_probe.sql",
    }
    scripts["mixed"].write_text(mixed_script(rows))
    scripts["update-select"].write_text(update_select_script(rows))
    scripts["stale-probe"].write_text(stale_probe_script(rows))

    primary = cluster.instance(cluster.primary_name)
    proxy = start_proxy(tmp, cluster, args)
    versions["endpoint_proxy"] = proxy.svc.version
    ports = {"direct": int(primary.port), **proxy.ports}
    try:
        for target, port in proxy.ports.items():
            wait_ready(pgbench_bin, proxy.svc, port, f"proxy endpoint {PROXY_ENDPOINTS[target]}")
        if args.warmup > 0:
            for target in ("direct", "readwrite"):
                log(f"warm-up: {target} -S c=4 for {args.warmup} s (not recorded)")
                timed_run(pgbench_bin, ports[target], ["-S"], 4, args.warmup)

        total = sum(len(w.targets) for w in res.workloads) * args.repeat
        n = 0
        for w in res.workloads:
            wargs = workload_args(w, scripts)
            for rep in range(args.repeat):
                for target in w.targets:
                    n += 1
                    proxy.svc.check_alive()
                    cluster.wait_caught_up(timeout=60)  # every run starts with replicas caught up
                    before = routed(proxy, target) if target in PROXY_ENDPOINTS else None
                    r = timed_run(pgbench_bin, ports[target], wargs, args.clients, args.duration)
                    if before is not None:
                        reader, writer = routed(proxy, target)
                        reader, writer = reader - before[0], writer - before[1]
                        r.replica_share = reader / (reader + writer) if reader + writer else None
                    res.runs.setdefault((w.name, target), []).append(r)
                    share = f", {r.replica_share:.0%} to replicas" if r.replica_share is not None else ""
                    lat = f", latency {r.latency_ms:.3f} ms" if r.latency_ms is not None else ""
                    log(f"[{n}/{total}] {w.name} rep {rep + 1}/{args.repeat} {target}: {r.tps:,.0f} tps{lat}{share}")
            if w.stale_probe and args.probe_transactions > 0:
                for target in w.targets:
                    if target == "direct":
                        continue
                    cluster.wait_caught_up(timeout=60)
                    stale, reads = stale_probe(pgbench_bin, ports[target], cluster, scripts["stale-probe"],
                                               args.clients, args.probe_transactions)  # fmt: skip
                    res.stale[(w.name, target)] = (stale, reads)
                    log(f"stale-read probe {target}: {stale}/{reads} reads missed the session's own update")
        proxy.svc.check_alive()
    finally:
        proxy.svc.stop()


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="pgbench through endpoint_proxy's readwrite endpoint vs its writer endpoint vs direct",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (10)")
    p.add_argument("--clients", type=int, default=16, help="pgbench clients (16)")
    p.add_argument("--repeat", type=int, default=1, help="runs per (workload, target); median kept (1)")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                   help="comma-separated subset of: " + ",".join(WORKLOAD_NAMES))  # fmt: skip
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (10)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded -S warm-up, direct and readwrite, s (3)")
    p.add_argument("--proxy-workers", type=int, default=1, help="endpoint_proxy workers (1)")
    p.add_argument(
        "--session-wait-ms",
        type=int,
        default=100,
        help="session_wait_ms of the session-consistency endpoint (100, the proxy's default)",
    )
    p.add_argument("--synchronous-commit", default="on", choices=("on", "off", "local", "remote_write"),
                   help="synchronous_commit of the cluster (on, PostgreSQL's default)")  # fmt: skip
    p.add_argument(
        "--probe-transactions",
        type=int,
        default=200,
        help="update-select stale-read probe: transactions per client, untimed (200; 0 to skip)",
    )
    p.add_argument("--pgbench", default=None, help="pgbench binary (default: auto)")
    p.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs, scripts and logs")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOAD_NAMES]
    if unknown or not names:
        p.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOAD_NAMES)}")
    args.workload_list = [w for w in WORKLOADS if w.name in names]
    if args.duration < 1 or args.repeat < 1 or args.clients < 1 or args.scale < 1 or args.proxy_workers < 1:
        p.error("--duration, --repeat, --clients, --scale and --proxy-workers must be positive")
    if args.warmup < 0 or args.session_wait_ms < 0 or args.probe_transactions < 0:
        p.error("--warmup, --session-wait-ms and --probe-transactions must not be negative")
    return args


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

    pgbench_bin = find_pgbench(args.pgbench)
    machine = machine_info()
    extra_conf = {
        "max_connections": str(max(300, 8 * args.clients + 50)),
        "shared_buffers": "256MB",
        "synchronous_commit": args.synchronous_commit,
    }
    tmp = Path(tempfile.mkdtemp(prefix="readwrite-compare-"))
    versions: dict[str, str] = {}
    res = Results(workloads=args.workload_list)
    log(f"temp dir {tmp}; workloads {','.join(w.name for w in res.workloads)}; c={args.clients}")
    try:
        with PostgresCluster(replicas=2, extra_conf=extra_conf) as cluster:
            primary = cluster.instance(cluster.primary_name)
            log(f"cluster up: primary {primary.host}:{primary.port}")
            pgbench_init(pgbench_bin, int(primary.port), args.scale)
            cluster.sql(cluster.primary_name, f"CREATE TABLE {STALE_TABLE} (id bigserial PRIMARY KEY)", user=APP_USER)
            cluster.sql(cluster.primary_name, "VACUUM ANALYZE", user=APP_USER, timeout=300)
            cluster.wait_caught_up(timeout=120)
            versions["PostgreSQL"] = server_version(int(primary.port))
            versions["pgbench"] = version_number(first_line([pgbench_bin, "--version"]))
            measure(args, pgbench_bin, tmp, cluster, res, versions)
    finally:
        if args.keep_tmp:
            log(f"configs, scripts and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"read/write splitting, c={args.clients}; nproc {machine['nproc']}, {machine['cpu']}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(parameters_line(args))
    for line in workload_lines(res):
        print(line)
    print()
    print(render_tps_table(res))
    print()
    print(render_detail_table(res))
    if args.write_results:
        append_results(args.results_file, results_section(res, args, machine, versions))
        log(f"appended results to {args.results_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
