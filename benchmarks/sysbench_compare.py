#!/usr/bin/env python3
"""Compare sysbench throughput on MariaDB: direct, endpoint_proxy (writer endpoint), HAProxy.

One run starts a local MariaDB cluster (primary my0, GTID replicas my1 and my2,
``endpoint_proxy.localcluster.mariadb``), prepares the sysbench tables once directly on
the primary, starts endpoint_proxy (a ``protocol = "mysql"`` cluster with a writer
endpoint) and HAProxy (tcp mode, in front of the primary) on free loopback ports, then
runs ``oltp_point_select`` and ``oltp_read_only`` against each target, interleaved (for
each test: direct, proxy, haproxy) so that drift of a shared machine spreads over all
targets. It prints queries per second, the ratios proxy/direct and proxy/haproxy, and
whether the proxy meets the bar (at least half HAProxy's qps at 16 threads).
``--write-results`` appends the result to ``benchmarks/RESULTS.md``.

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

import _common  # benchmarks/_common.py (this script's directory is on sys.path)
import pymysql
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
    find_binary,
    first_line,
    free_port,
    log,
    machine_info,
    machine_line,
    markdown_table,
    mysql_login,
    proxy_config,
    run_main,
    version_number,
    wait_for_login,
)

ALL_TARGETS = ("direct", "proxy", "haproxy")
ALL_TESTS = ("oltp_point_select", "oltp_read_only")

# The bar: the proxy's qps at least this fraction of HAProxy's, at BAR_THREADS threads.
BAR_RATIO = 0.5
BAR_THREADS = 16

QUERIES_RE = re.compile(r"^\s*queries:\s+(\d+)\s+\(([0-9.]+) per sec\.\)", re.MULTILINE)
TRANSACTIONS_RE = re.compile(r"^\s*transactions:\s+(\d+)\s+\(([0-9.]+) per sec\.\)", re.MULTILINE)
ERRORS_RE = re.compile(r"^\s*ignored errors:\s+(\d+)", re.MULTILINE)
LAT_AVG_RE = re.compile(r"^\s*avg:\s+([0-9.]+)", re.MULTILINE)
LAT_P95_RE = re.compile(r"^\s*95th percentile:\s+([0-9.]+)", re.MULTILINE)


# --------------------------------------------------------------------------
# sysbench
# --------------------------------------------------------------------------


def find_sysbench(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = find_binary("sysbench")
    if found is None:
        raise BenchError("sysbench not found: run benchmarks/setup.sh (or pass --sysbench)")
    return found


@dataclass
class RunResult:
    qps: float
    tps: float
    latency_avg_ms: float | None
    latency_p95_ms: float | None
    ignored_errors: int


def sysbench_args(args: argparse.Namespace, port: int) -> list[str]:
    return [
        "--db-driver=mysql",
        f"--mysql-host={LOOPBACK}",
        f"--mysql-port={port}",
        f"--mysql-user={APP_USER}",
        f"--mysql-password={APP_PASSWORD}",
        f"--mysql-db={APP_DB}",
        "--mysql-ssl=off",
        f"--tables={args.tables}",
        f"--table-size={args.table_size}",
    ]


def sysbench(cmd: Sequence[str], timeout: float) -> str:
    shown = " ".join(c for c in cmd if not c.startswith("--mysql-password="))
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"sysbench did not finish in {timeout:.0f} s: {shown}") from exc
    if out.returncode != 0:
        raise BenchError(
            f"sysbench failed (status {out.returncode}): {shown}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return out.stdout


def sysbench_prepare(binary: str, args: argparse.Namespace, port: int) -> None:
    log(f"sysbench prepare: {args.tables} tables of {args.table_size} rows on the primary (port {port})")
    sysbench([binary, "oltp_read_only", *sysbench_args(args, port), f"--threads={min(args.tables, 4)}", "prepare"], 900)


def sysbench_run(binary: str, args: argparse.Namespace, test: str, port: int, threads: int, seconds: int) -> RunResult:
    cmd = [
        binary,
        test,
        *sysbench_args(args, port),
        f"--threads={threads}",
        f"--time={seconds}",
        "--events=0",
        "--report-interval=0",
        "run",
    ]
    stdout = sysbench(cmd, seconds + 60)
    q, t = QUERIES_RE.search(stdout), TRANSACTIONS_RE.search(stdout)
    if q is None or t is None:
        raise BenchError(f"no queries/transactions lines in sysbench's output:\n{stdout[-2000:]}")
    avg, p95, errors = LAT_AVG_RE.search(stdout), LAT_P95_RE.search(stdout), ERRORS_RE.search(stdout)
    return RunResult(
        qps=float(q.group(2)),
        tps=float(t.group(2)),
        latency_avg_ms=float(avg.group(1)) if avg else None,
        latency_p95_ms=float(p95.group(1)) if p95 else None,
        ignored_errors=int(errors.group(1)) if errors else 0,
    )


def wait_ready(svc: Service | None, port: int, name: str) -> None:
    """Wait until a real login and query through ``port`` succeed (bounded)."""

    def connect() -> pymysql.Connection:
        return pymysql.connect(host=LOOPBACK, port=port, user=APP_USER, password=APP_PASSWORD, database=APP_DB,
                               connect_timeout=5, read_timeout=5, write_timeout=5)

    wait_for_login(svc, port, name, lambda: mysql_login(connect))


def mariadb_version(port: int) -> str:
    try:
        conn = pymysql.connect(
            host=LOOPBACK, port=port, user=APP_USER, password=APP_PASSWORD, database=APP_DB, connect_timeout=5
        )
    except pymysql.MySQLError:
        return "?"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
    finally:
        conn.close()
    return version_number(str(row[0])) if row else "?"


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class Results:
    tests: list[str]
    targets: list[str]
    runs: dict[tuple[str, str], list[RunResult]] = field(default_factory=dict)  # (test, target)

    def median(self, test: str, target: str, attr: str = "qps") -> float | None:
        vs = [getattr(r, attr) for r in self.runs.get((test, target), []) if getattr(r, attr) is not None]
        return statistics.median(vs) if vs else None

    def ratio(self, test: str, a: str, b: str) -> float | None:
        va, vb = self.median(test, a), self.median(test, b)
        return va / vb if va is not None and vb else None

    def errors(self, test: str, target: str) -> int:
        return sum(r.ignored_errors for r in self.runs.get((test, target), []))


RATIOS = (("proxy", "direct"), ("proxy", "haproxy"), ("haproxy", "direct"))


def render_table(res: Results) -> str:
    ratios = [(a, b) for a, b in RATIOS if a in res.targets and b in res.targets]
    header = ["test", *(f"{t} qps" for t in res.targets), *(f"{a}/{b}" for a, b in ratios)]
    rows: list[list[str]] = []
    for test in res.tests:
        row = [test]
        for t in res.targets:
            v = res.median(test, t)
            row.append(f"{v:,.0f}" if v is not None else "-")
        for a, b in ratios:
            r = res.ratio(test, a, b)
            row.append(f"{r:.2f}" if r is not None else "-")
        rows.append(row)
    return markdown_table(header, rows)


def render_detail(res: Results) -> str:
    header = ["test", "target", "qps", "tps", "latency avg (ms)", "latency p95 (ms)", "ignored errors"]
    rows: list[list[str]] = []
    for test in res.tests:
        for t in res.targets:
            qps = res.median(test, t)
            if qps is None:
                continue
            tps = res.median(test, t, "tps")
            avg = res.median(test, t, "latency_avg_ms")
            p95 = res.median(test, t, "latency_p95_ms")
            rows.append(
                [
                    test,
                    t,
                    f"{qps:,.0f}",
                    f"{tps:,.0f}" if tps is not None else "-",
                    f"{avg:.2f}" if avg is not None else "-",
                    f"{p95:.2f}" if p95 is not None else "-",
                    str(res.errors(test, t)),
                ]
            )
    return markdown_table(header, rows, 2)


def render_raw(res: Results) -> list[str]:
    return [
        f"  - {test} {t}: " + ", ".join(f"{r.qps:,.0f}" for r in res.runs[(test, t)])
        for test in res.tests
        for t in res.targets
        if (test, t) in res.runs
    ]


def bar_lines(res: Results, threads: int) -> tuple[bool | None, list[str]]:
    """PASS/FAIL per test (proxy qps ≥ BAR_RATIO × HAProxy's); None when not measurable."""
    if "proxy" not in res.targets or "haproxy" not in res.targets:
        return None, ["bar: not checked (needs the proxy and haproxy targets)"]
    note = "" if threads == BAR_THREADS else f" (the bar is defined at {BAR_THREADS} threads; this run used {threads})"
    lines: list[str] = []
    ok = True
    for test in res.tests:
        r = res.ratio(test, "proxy", "haproxy")
        passed = r is not None and r >= BAR_RATIO
        ok = ok and passed
        shown = f"{r:.2f}" if r is not None else "-"
        lines.append(
            f"{test}: {'PASS' if passed else 'FAIL'} — proxy/haproxy {shown} (bar ≥ {BAR_RATIO:.1f}× HAProxy's qps "
            f"at {BAR_THREADS} threads){note}"
        )
    return ok, lines


def parameters_line(args: argparse.Namespace) -> str:
    return (
        f"`sysbench TEST --threads={args.threads} --time={args.time}`, --tables={args.tables} "
        f"--table-size={args.table_size} (prepared once on the primary), prepared statements (--db-ps-mode=auto), "
        f"repeat {args.repeat} (median shown), warm-up {args.warmup} s, order interleaved per test "
        f"({', '.join(args.targets)}); MariaDB primary my0 + 2 GTID replicas; proxy workers {args.proxy_workers}, "
        "writer endpoint, protocol mysql; HAProxy mode tcp in front of the primary; all on 127.0.0.1 TCP"
    )


def results_section(res: Results, args: argparse.Namespace, machine: dict[str, str], versions: dict[str, str]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    _, bars = bar_lines(res, args.threads)
    lines = [
        f"## {now} — sysbench on MariaDB ({', '.join(res.tests)}), {args.threads} threads",
        "",
        f"- Machine: {machine_line(machine)}",
        f"- Versions: {vers}",
        f"- Parameters: {parameters_line(args)}",
        "- qps: sysbench's `queries: N (X per sec.)`, every statement counted: oltp_point_select runs 1 query "
        "per transaction, oltp_read_only 16 (BEGIN, 10 point selects, 4 range selects, COMMIT)",
        "",
        render_table(res),
        "",
        render_detail(res),
        "",
        *(f"- Bar — {b}" for b in bars),
    ]
    if args.repeat > 1:
        lines += ["- qps of each repetition:", *render_raw(res)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sysbench qps on MariaDB: direct vs endpoint_proxy vs HAProxy")
    p.add_argument("--time", type=int, default=10, help="seconds per sysbench run (10)")
    p.add_argument("--threads", type=int, default=BAR_THREADS, help=f"sysbench threads ({BAR_THREADS})")
    p.add_argument("--tests", default=",".join(ALL_TESTS), help="comma-separated subset of: " + ",".join(ALL_TESTS))
    p.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help="comma-separated subset of: " + ",".join(ALL_TARGETS)
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per (test, target); median kept (1)")
    p.add_argument("--tables", type=int, default=4, help="sysbench --tables (4)")
    p.add_argument("--table-size", type=int, default=10_000, help="sysbench --table-size (10000)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded direct oltp_point_select run, s (3)")
    p.add_argument("--proxy-workers", type=int, default=1, help="endpoint_proxy workers (1)")
    p.add_argument("--sysbench", default=None, help="sysbench binary (default: from PATH)")
    p.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    for opt, allowed in (("tests", ALL_TESTS), ("targets", ALL_TARGETS)):
        chosen = [v.strip() for v in getattr(args, opt).split(",") if v.strip()]
        unknown = [v for v in chosen if v not in allowed]
        if unknown or not chosen:
            p.error(f"--{opt}: unknown {unknown}; choose from {','.join(allowed)}")
        setattr(args, opt, [v for v in allowed if v in chosen])
    if min(args.time, args.threads, args.repeat, args.tables, args.table_size, args.proxy_workers) < 1:
        p.error("--time, --threads, --repeat, --tables, --table-size and --proxy-workers must be positive")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    return args


def start_proxy(tmp: Path, instances: list[tuple[str, str, int]], workers: int) -> Service:
    port = free_port()
    text = proxy_config(instances, [ProxyEndpoint("writer", port, "writer")], workers=workers, protocol="mysql")
    return _common.start_proxy(tmp, text, port)


def measure(
    args: argparse.Namespace,
    binary: str,
    tmp: Path,
    instances: list[tuple[str, str, int]],
    res: Results,
    versions: dict[str, str],
) -> None:
    """Start the middlemen, run the interleaved sysbench series, stop the middlemen."""
    _, host, primary_port = instances[0]
    ports: dict[str, int] = {"direct": primary_port}
    services: list[Service] = []
    try:
        if "proxy" in args.targets:
            svc = start_proxy(tmp, instances, args.proxy_workers)
            services.append(svc)
            ports["proxy"] = svc.port
            versions["endpoint_proxy"] = svc.version
        if "haproxy" in args.targets:
            svc = _common.start_haproxy(tmp, {"mysql": (host, primary_port)})
            services.append(svc)
            ports["haproxy"] = svc.port
            versions["HAProxy"] = svc.version
        for svc in services:
            wait_ready(svc, svc.port, svc.name)

        if args.warmup > 0:
            log(f"warm-up: direct oltp_point_select, {args.threads} threads for {args.warmup} s (not recorded)")
            sysbench_run(binary, args, "oltp_point_select", primary_port, args.threads, args.warmup)

        total = len(args.tests) * args.repeat * len(args.targets)
        n = 0
        for test in args.tests:
            for rep in range(args.repeat):
                for target in args.targets:
                    n += 1
                    for svc in services:
                        svc.check_alive()
                    r = sysbench_run(binary, args, test, ports[target], args.threads, args.time)
                    res.runs.setdefault((test, target), []).append(r)
                    errs = f", {r.ignored_errors} ignored errors" if r.ignored_errors else ""
                    log(
                        f"[{n}/{total}] {test} rep {rep + 1}/{args.repeat} {target}: {r.qps:,.0f} qps, "
                        f"{r.tps:,.0f} tps, latency avg {r.latency_avg_ms} ms{errs}"
                    )
        for svc in services:
            svc.check_alive()
    finally:
        for svc in reversed(services):
            svc.stop()


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from endpoint_proxy.localcluster.mariadb import MariaDBCluster

    binary = find_sysbench(args.sysbench)
    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="sysbench-compare-"))
    versions: dict[str, str] = {}
    res = Results(tests=args.tests, targets=args.targets)
    log(f"temp dir {tmp}; tests {','.join(args.tests)}; targets {','.join(args.targets)}; threads {args.threads}")
    # Room for the data set in the buffer pool, and for the proxy's and sysbench's connections.
    extra_conf = {"innodb_buffer_pool_size": "256M", "max_connections": str(max(300, 4 * args.threads + 50))}
    try:
        with MariaDBCluster(replicas=2, extra_conf=extra_conf) as cluster:
            instances = [(i.name, i.host, int(i.port)) for i in cluster.instances]
            primary = cluster.instance(cluster.primary_name)
            instances.sort(key=lambda i: i[0] != primary.name)  # the primary first
            log(f"cluster up: primary {primary.host}:{primary.port}")
            wait_ready(None, int(primary.port), "primary")
            sysbench_prepare(binary, args, int(primary.port))
            cluster.wait_caught_up(timeout=120)
            versions["MariaDB"] = mariadb_version(int(primary.port))
            versions["sysbench"] = version_number(first_line([binary, "--version"]))
            measure(args, binary, tmp, instances, res, versions)
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    ok, bars = bar_lines(res, args.threads)
    print()
    print(f"sysbench on MariaDB, {args.threads} threads; nproc {machine['nproc']}, {machine['cpu']}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(parameters_line(args))
    print()
    print(render_table(res))
    print()
    print(render_detail(res))
    print()
    for b in bars:
        print(b)
    if ok is not None:
        print(f"bar overall: {'PASS' if ok else 'FAIL'}")
    if args.write_results:
        append_results(args.results_file, results_section(res, args, machine, versions))
        log(f"appended results to {args.results_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
