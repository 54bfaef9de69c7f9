#!/usr/bin/env python3
"""Transaction-mode pooling: many clients on a small pool, endpoint_proxy vs PgBouncer (and direct).

PostgreSQL: a local cluster (primary only), ``pgbench -i`` once, then ``pgbench -S`` with 200
clients against endpoint_proxy's writer endpoint in ``pool_mode = "transaction"`` (cluster
``pool_size = 20``) with ``-M prepared`` and ``-M extended``, against PgBouncer in transaction
mode (``default_pool_size = 20``) with ``-M extended`` (1.18 cannot carry named prepared statements
across transactions) and against PostgreSQL itself with ``-M prepared``, interleaved and repeated.
Besides tps, failed transactions and latency it samples the middleman's CPU time
(``/proc/<pid>/stat`` utime+stime of its process group) over the steady part of each run
(pgbench's progress reports) and divides it by the transactions of that window.

MySQL: a local MariaDB primary, sysbench tables prepared once, then ``sysbench oltp_read_write
--db-ps-mode=auto --threads=64`` directly and through an endpoint_proxy MySQL writer endpoint in
transaction mode (``pool_size = 8``); only deadlocks (1213) are ignored, so any other error stops
the run and is reported; the server's ``Innodb_deadlocks`` delta is shown next to sysbench's count.

``--only pg|mysql`` runs one half. Everything it starts is stopped on exit, Ctrl-C and errors
included. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    markdown_table,
    mysql_login,
    pgbench_login,
    proxy_config,
    run_main,
    server_version,
    version_number,
    wait_for_login,
)

# (target name, what pgbench's -M is, which service: None = the server itself)
PG_TARGETS = {
    "direct-prepared": ("prepared", None),
    "proxy-prepared": ("prepared", "proxy"),
    "proxy-extended": ("extended", "proxy"),
    "pgbouncer-extended": ("extended", "pgbouncer"),
    "pgbouncer-prepared": ("prepared", "pgbouncer"),  # PgBouncer >= 1.21, max_prepared_statements set
}
MY_TARGETS = ("direct", "proxy")
PG_RATIOS = (("proxy-prepared", "pgbouncer-prepared"), ("proxy-prepared", "pgbouncer-extended"),
             ("proxy-extended", "pgbouncer-extended"), ("proxy-prepared", "direct-prepared"),
             ("pgbouncer-prepared", "direct-prepared"), ("pgbouncer-extended", "direct-prepared"))  # fmt: skip
PG_CPU_RATIOS = (("proxy-prepared", "pgbouncer-prepared"), ("proxy-extended", "pgbouncer-extended"),
                 ("proxy-prepared", "pgbouncer-extended"))  # fmt: skip

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
CONNECT_RE = re.compile(r"^initial connection time = ([0-9.]+) ms", re.MULTILINE)
PROGRESS_RE = re.compile(r"^progress: ([0-9.]+) s, ([0-9.]+) tps")

SB_QUERIES_RE = re.compile(r"^\s*queries:\s+(\d+)\s+\(([0-9.]+) per sec\.\)", re.MULTILINE)
SB_TRANSACTIONS_RE = re.compile(r"^\s*transactions:\s+(\d+)\s+\(([0-9.]+) per sec\.\)", re.MULTILINE)
SB_ERRORS_RE = re.compile(r"^\s*ignored errors:\s+(\d+)", re.MULTILINE)
SB_RECONNECTS_RE = re.compile(r"^\s*reconnects:\s+(\d+)", re.MULTILINE)
SB_LAT_AVG_RE = re.compile(r"^\s*avg:\s+([0-9.]+)", re.MULTILINE)
SB_LAT_P95_RE = re.compile(r"^\s*95th percentile:\s+([0-9.]+)", re.MULTILINE)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pg_env() -> dict[str, str]:
    return _common.pg_env("pool_compare")


# --------------------------------------------------------------------------
# CPU time of a process group
# --------------------------------------------------------------------------


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid`` (the services run in their own)."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        # fields[0] is the state (field 3 of proc(5)): pgrp is field 5, utime 14, stime 15
        if len(fields) > 12 and int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def cpu_sampler(svc: Service | None) -> Callable[[], float] | None:
    if svc is None:
        return None
    pgid = svc.proc.pid  # start_new_session=True: the group id is our child's pid
    return lambda: group_cpu_seconds(pgid)


# --------------------------------------------------------------------------
# pgbench
# --------------------------------------------------------------------------


def find_pgbench(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = find_binary("pgbench", ["/usr/lib/postgresql/15/bin/pgbench"])
    if found is None:
        raise BenchError("pgbench not found (install postgresql-contrib or pass --pgbench)")
    return found


@dataclass
class PgRun:
    tps: float | None  # None: no summary (hung, killed)
    latency_ms: float | None
    processed: int
    failed: int
    aborted_clients: int
    status: int
    cpu_us_per_txn: float | None
    connect_ms: float | None = None  # pgbench's "initial connection time" (all clients' logins)
    errors: list[str] = field(default_factory=list)  # pgbench's stderr lines other than progress


def pgbench_run(pgbench: str, port: int, mode: str, args: argparse.Namespace, svc: Service | None,
                tmp: Path) -> PgRun:  # fmt: skip
    """One ``pgbench -S -M mode`` run; the middleman's CPU is sampled at each progress report."""
    cmd = [
        pgbench,
        "-h", LOOPBACK, "-p", str(port), "-U", APP_USER,
        "-S", "-n", "-M", mode,
        "-c", str(args.clients), "-j", str(args.jobs),
        "-T", str(args.duration), "-P", "1",
        APP_DB,
    ]  # fmt: skip
    sample = cpu_sampler(svc)
    out_path = tmp / "pgbench.out"
    timeout = args.duration + 60
    with out_path.open("wb") as out:
        proc = subprocess.Popen(cmd, env=pg_env(), stdout=out, stderr=subprocess.PIPE, start_new_session=True)
    cpu0 = sample() if sample else 0.0
    # (seconds since start per pgbench, tps of the interval, our CPU sample when the line arrived)
    progress: list[tuple[float, float, float]] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    hung = False
    assert proc.stderr is not None
    # A watchdog: pgbench that outlives its -T by a minute is stuck (a hang through a pool).
    killer = _watchdog(proc, deadline)
    try:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            m = PROGRESS_RE.match(line)
            if m:
                progress.append((float(m.group(1)), float(m.group(2)), sample() if sample else 0.0))
            elif line.strip():
                errors.append(line)
        status = proc.wait()
    finally:
        hung = killer()
    cpu1 = sample() if sample else 0.0
    stdout = out_path.read_text(errors="replace")
    if hung:
        errors.append(f"pgbench did not finish within {timeout} s (-T {args.duration}): killed")
    m = TPS_RE.search(stdout)
    lat, processed, failed = LAT_RE.search(stdout), PROCESSED_RE.search(stdout), FAILED_RE.search(stdout)
    cpu_us: float | None = None
    if sample is not None:
        # The steady part: from the second progress report to the last (all clients connected,
        # SCRAM logins done); else the whole run.
        if len(progress) >= 4:
            window = progress[1:]
            txns = sum(tps * (t - prev_t) for (prev_t, _, _), (t, tps, _) in zip(window, window[1:], strict=False))
            cpu = window[-1][2] - window[0][2]
        else:
            txns = float(processed.group(1)) if processed else 0.0
            cpu = cpu1 - cpu0
        cpu_us = cpu / txns * 1e6 if txns > 0 else None
    return PgRun(
        tps=float(m.group(1)) if m else None,
        latency_ms=float(lat.group(1)) if lat else None,
        processed=int(processed.group(1)) if processed else 0,
        failed=int(failed.group(1)) if failed else 0,
        aborted_clients=sum(1 for e in errors if re.search(r"^client \d+ aborted", e)),
        status=status,
        cpu_us_per_txn=cpu_us,
        connect_ms=float(conn.group(1)) if (conn := CONNECT_RE.search(stdout)) else None,
        errors=errors,
    )


def _watchdog(proc: subprocess.Popen[bytes], deadline: float) -> Callable[[], bool]:
    """Kill ``proc``'s group at ``deadline`` (from a timer thread); the returned function stops
    the timer and says whether it fired."""
    import threading

    fired = threading.Event()
    done = threading.Event()

    def watch() -> None:
        if not done.wait(max(0.0, deadline - time.monotonic())):
            fired.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    t = threading.Thread(target=watch, daemon=True)
    t.start()

    def stop() -> bool:
        done.set()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        t.join()
        return fired.is_set()

    return stop


def pgbench_init(pgbench: str, port: int, scale: int) -> None:
    log(f"pgbench -i -s {scale} against the primary (port {port})")
    cmd = [pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-i", "-s", str(scale), "-q", APP_DB]
    try:
        out = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("pgbench -i did not finish in 900 s") from exc
    if out.returncode != 0:
        raise BenchError(f"pgbench -i failed (status {out.returncode}):\n{out.stderr[-3000:]}")


def pg_wait_ready(pgbench: str, svc: Service | None, port: int, name: str) -> None:
    """Wait until a real login and query through ``port`` succeed (bounded)."""
    wait_for_login(svc, port, name, lambda: pgbench_login(pgbench, port, pg_env()))


def log_lines(svc: Service, limit: int = 8) -> tuple[int, list[str]]:
    """The number of lines in a service's log and the first ``limit`` of them (the proxy logs at
    ``warning``: every line is a warning or an error)."""
    try:
        lines = [ln for ln in svc.logfile.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return 0, []
    return len(lines), lines[:limit]


# --------------------------------------------------------------------------
# PostgreSQL half
# --------------------------------------------------------------------------


@dataclass
class PgResults:
    targets: list[str]
    runs: dict[str, list[PgRun]] = field(default_factory=dict)
    proxy_log: tuple[int, list[str]] = (0, [])
    pgbouncer_log: tuple[int, list[str]] = (0, [])

    def median(self, target: str, attr: str) -> float | None:
        vs = [getattr(r, attr) for r in self.runs.get(target, []) if getattr(r, attr) is not None]
        return statistics.median(vs) if vs else None

    def total(self, target: str, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.runs.get(target, []))


def pg_measure(args: argparse.Namespace, pgbench: str, tmp: Path, res: PgResults, versions: dict[str, str]) -> None:
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

    # Room for the direct clients, both pools and the proxy's monitor connections at once.
    max_connections = max(300, args.clients + 2 * args.pool_size + 50)
    extra_conf = {"max_connections": str(max_connections), "shared_buffers": "256MB"}
    if "pgbouncer-prepared" in res.targets:
        version = version_number(first_line([_common.pgbouncer_binary(), "--version"]))
        if not _common.pgbouncer_supports_prepared(version):
            if not args.pg_targets_given:
                res.targets.remove("pgbouncer-prepared")
                log(f"PgBouncer {version} has no max_prepared_statements (1.21+): pgbouncer-prepared left out "
                    "(benchmarks/setup.sh --pgbouncer-source builds 1.24)")  # fmt: skip
            else:
                raise BenchError(f"pgbouncer-prepared needs PgBouncer 1.21 or newer, found {version} "
                                 "(benchmarks/setup.sh --pgbouncer-source builds 1.24, or set PGBOUNCER)")  # fmt: skip
    with PostgresCluster(replicas=0, extra_conf=extra_conf) as cluster:
        primary = cluster.instance(cluster.primary_name)
        host, port = primary.host, int(primary.port)
        log(f"PostgreSQL primary {host}:{port}, max_connections {max_connections}")
        deadline = time.monotonic() + READY_TIMEOUT
        while server_version(port) == "?" and time.monotonic() < deadline:
            time.sleep(0.3)
        pgbench_init(pgbench, port, args.scale)
        versions["PostgreSQL"] = server_version(port)
        versions["pgbench"] = version_number(first_line([pgbench, "--version"]))
        services: dict[str, Service] = {}
        ports: dict[str | None, int] = {None: port}
        try:
            wanted = {PG_TARGETS[t][1] for t in res.targets}
            if "proxy" in wanted:
                pport = free_port()
                (tmp / "proxy").mkdir()
                text = proxy_config(
                    [(primary.name, host, port)],
                    [ProxyEndpoint("pooled", pport, "writer", {"pool_mode": "transaction"})],
                    workers=args.proxy_workers,
                    cluster_settings={"pool_size": args.pool_size},
                )
                services["proxy"] = _common.start_proxy(tmp / "proxy", text, pport)
                versions["endpoint_proxy"] = services["proxy"].version
            if "pgbouncer" in wanted:
                (tmp / "pgb").mkdir()
                services["pgbouncer"] = _common.start_pgbouncer(
                    tmp / "pgb", {APP_DB: (host, port)}, pool_mode="transaction", pool_size=args.pool_size,
                    max_client_conn=max(300, args.clients + 100),
                    max_prepared_statements=args.max_prepared_statements if "pgbouncer-prepared" in res.targets else 0,
                )  # fmt: skip
                versions["PgBouncer"] = services["pgbouncer"].version
            for name, svc in services.items():
                ports[name] = svc.port
                pg_wait_ready(pgbench, svc, svc.port, name)
            if args.warmup > 0:
                log(f"warm-up: direct -c 2 -M prepared for {args.warmup} s (not recorded)")
                subprocess.run([pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-S", "-n", "-M", "prepared",
                                "-c", "2", "-j", "2", "-T", str(args.warmup), APP_DB],
                               env=pg_env(), capture_output=True, timeout=args.warmup + 60, check=False)  # fmt: skip
            total, n = args.repeat * len(res.targets), 0
            for rep in range(args.repeat):
                for target in res.targets:
                    n += 1
                    mode, which = PG_TARGETS[target]
                    for svc in services.values():
                        svc.check_alive()
                    svc = services.get(which) if which else None
                    r = pgbench_run(pgbench, ports[which], mode, args, svc, tmp)
                    res.runs.setdefault(target, []).append(r)
                    tps = f"{r.tps:,.0f} tps" if r.tps is not None else "no tps"
                    cpu = f", {r.cpu_us_per_txn:.1f} µs CPU/txn" if r.cpu_us_per_txn is not None else ""
                    lat = f", latency {r.latency_ms:.3f} ms" if r.latency_ms is not None else ""
                    bad = (f", status {r.status}, {r.failed} failed, {r.aborted_clients} clients aborted"
                           if r.status or r.failed or r.aborted_clients else "")  # fmt: skip
                    log(f"[{n}/{total}] rep {rep + 1}/{args.repeat} {target}: {tps}{lat}{cpu}{bad}")
                    for e in r.errors[:5]:
                        log(f"    pgbench: {e}")
            for svc in services.values():
                svc.check_alive()
        finally:
            for svc in services.values():
                svc.stop()
            if "proxy" in services:
                res.proxy_log = log_lines(services["proxy"])
            if "pgbouncer" in services:
                res.pgbouncer_log = _pgbouncer_problems(tmp / "pgb" / "pgbouncer" / "pgbouncer.log")


def _pgbouncer_problems(path: Path, limit: int = 8) -> tuple[int, list[str]]:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if " WARNING " in ln or " ERROR " in ln]
    except OSError:
        return 0, []
    return len(lines), lines[:limit]


def pg_table(res: PgResults) -> str:
    header = ["target", "pgbench -M", "tps", "failed txns", "clients aborted", "latency avg (ms)",
              "middleman CPU µs/txn", "connect all (ms)"]  # fmt: skip
    rows = []
    for t in res.targets:
        if t not in res.runs:
            continue
        tps, lat, cpu = res.median(t, "tps"), res.median(t, "latency_ms"), res.median(t, "cpu_us_per_txn")
        connect = res.median(t, "connect_ms")
        rows.append([
            t, PG_TARGETS[t][0],
            f"{tps:,.0f}" if tps is not None else "-",
            str(res.total(t, "failed")),
            str(res.total(t, "aborted_clients")),
            f"{lat:.2f}" if lat is not None else "-",
            f"{cpu:.1f}" if cpu is not None else "-",
            f"{connect:,.0f}" if connect is not None else "-",
        ])  # fmt: skip
    return markdown_table(header, rows, 2)


def pg_ratios(res: PgResults) -> list[str]:
    lines = []
    for a, b in PG_RATIOS:
        va, vb = res.median(a, "tps"), res.median(b, "tps")
        if va is not None and vb:
            lines.append(f"{a}/{b} tps: {va / vb:.2f}")
    for a, b in PG_CPU_RATIOS:
        ca, cb = res.median(a, "cpu_us_per_txn"), res.median(b, "cpu_us_per_txn")
        if ca is not None and cb:
            lines.append(f"{a}/{b} CPU per txn: {ca / cb:.2f}")
    return lines


def pg_raw(res: PgResults) -> list[str]:
    out = []
    for t in res.targets:
        rs = res.runs.get(t, [])
        if rs:
            cells = [
                (f"{r.tps:,.0f}" if r.tps is not None else "none")
                + (f" ({r.cpu_us_per_txn:.1f} µs)" if r.cpu_us_per_txn is not None else "")
                for r in rs
            ]
            out.append(f"  - {t}: " + ", ".join(cells))
    return out


def pg_problems(res: PgResults) -> list[str]:
    out = []
    for t in res.targets:
        for i, r in enumerate(res.runs.get(t, []), 1):
            if r.status or r.failed or r.aborted_clients or r.tps is None:
                first = "; ".join(r.errors[:3]) or "(no stderr)"
                out.append(f"{t} run {i}: pgbench status {r.status}, {r.failed} failed transactions, "
                           f"{r.aborted_clients} clients aborted; stderr: {first}")  # fmt: skip
    for name, (count, lines) in (("proxy", res.proxy_log), ("PgBouncer", res.pgbouncer_log)):
        if count:
            out.append(f"{name} log: {count} warning/error lines, first: " + " | ".join(lines[:3]))
    return out


# --------------------------------------------------------------------------
# MySQL half
# --------------------------------------------------------------------------


@dataclass
class MyRun:
    ok: bool
    tps: float | None
    qps: float | None
    transactions: int
    ignored_errors: int
    reconnects: int
    server_deadlocks: int | None
    latency_avg_ms: float | None
    latency_p95_ms: float | None
    cpu_us_per_txn: float | None
    errors: list[str] = field(default_factory=list)


@dataclass
class MyResults:
    targets: list[str]
    runs: dict[str, list[MyRun]] = field(default_factory=dict)
    proxy_log: tuple[int, list[str]] = (0, [])

    def median(self, target: str, attr: str) -> float | None:
        vs = [getattr(r, attr) for r in self.runs.get(target, []) if r.ok and getattr(r, attr) is not None]
        return statistics.median(vs) if vs else None

    def total(self, target: str, attr: str) -> int:
        return sum(getattr(r, attr) or 0 for r in self.runs.get(target, []))


def find_sysbench(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = find_binary("sysbench")
    if found is None:
        raise BenchError("sysbench not found: run benchmarks/setup.sh (or pass --sysbench)")
    return found


def sysbench_base(args: argparse.Namespace, port: int) -> list[str]:
    return [
        "--db-driver=mysql", f"--mysql-host={LOOPBACK}", f"--mysql-port={port}", f"--mysql-user={APP_USER}",
        f"--mysql-password={APP_PASSWORD}", f"--mysql-db={APP_DB}", "--mysql-ssl=off",
        f"--tables={args.tables}", f"--table-size={args.table_size}",
    ]  # fmt: skip


def my_connect(port: int) -> pymysql.Connection:
    return pymysql.connect(host=LOOPBACK, port=port, user=APP_USER, password=APP_PASSWORD, database=APP_DB,
                           connect_timeout=5, read_timeout=10, write_timeout=10, autocommit=True)  # fmt: skip


def innodb_deadlocks(port: int) -> int | None:
    try:
        conn = my_connect(port)
    except pymysql.MySQLError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
            row = cur.fetchone()
    except pymysql.MySQLError:
        return None
    finally:
        conn.close()
    return int(row[1]) if row else None


def my_wait_ready(svc: Service | None, port: int, name: str) -> None:
    wait_for_login(svc, port, name, lambda: mysql_login(lambda: my_connect(port)))


def sysbench_run(binary: str, args: argparse.Namespace, port: int, primary_port: int, svc: Service | None) -> MyRun:
    cmd = [binary, "oltp_read_write", *sysbench_base(args, port), "--db-ps-mode=auto",
           f"--threads={args.my_threads}", f"--time={args.duration}", "--events=0", "--report-interval=0",
           "--mysql-ignore-errors=1213", "run"]  # fmt: skip
    sample = cpu_sampler(svc)
    dl0 = innodb_deadlocks(primary_port)
    cpu0 = sample() if sample else 0.0
    timeout = args.duration + 60
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        stdout, stderr, status = out.stdout, out.stderr, out.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = f"sysbench did not finish within {timeout} s (--time {args.duration}): killed"
        status = -1
    cpu1 = sample() if sample else 0.0
    dl1 = innodb_deadlocks(primary_port)
    q, t = SB_QUERIES_RE.search(stdout), SB_TRANSACTIONS_RE.search(stdout)
    ign, rec = SB_ERRORS_RE.search(stdout), SB_RECONNECTS_RE.search(stdout)
    avg, p95 = SB_LAT_AVG_RE.search(stdout), SB_LAT_P95_RE.search(stdout)
    errors = [ln.strip() for ln in (stdout + "\n" + stderr).splitlines()
              if "FATAL" in ln or "did not finish" in ln
              or ("error" in ln.lower() and "ignored errors" not in ln)]  # fmt: skip
    txns = int(t.group(1)) if t else 0
    return MyRun(
        ok=status == 0 and t is not None,
        tps=float(t.group(2)) if t else None,
        qps=float(q.group(2)) if q else None,
        transactions=txns,
        ignored_errors=int(ign.group(1)) if ign else 0,
        reconnects=int(rec.group(1)) if rec else 0,
        server_deadlocks=dl1 - dl0 if dl0 is not None and dl1 is not None else None,
        latency_avg_ms=float(avg.group(1)) if avg else None,
        latency_p95_ms=float(p95.group(1)) if p95 else None,
        cpu_us_per_txn=(cpu1 - cpu0) / txns * 1e6 if sample and txns else None,
        errors=errors if status == 0 else errors or [f"sysbench status {status}: {(stdout + stderr)[-300:]}"],
    )


def my_measure(args: argparse.Namespace, binary: str, tmp: Path, res: MyResults, versions: dict[str, str]) -> None:
    from endpoint_proxy.localcluster.mariadb import MariaDBCluster

    extra_conf = {"innodb_buffer_pool_size": "256M",
                  "max_connections": str(max(300, 2 * args.my_threads + args.my_pool_size + 50))}  # fmt: skip
    with MariaDBCluster(replicas=0, extra_conf=extra_conf) as cluster:
        primary = cluster.instance(cluster.primary_name)
        host, port = primary.host, int(primary.port)
        log(f"MariaDB primary {host}:{port}")
        my_wait_ready(None, port, "MariaDB primary")
        log(f"sysbench prepare: {args.tables} tables of {args.table_size} rows on the primary")
        prep = subprocess.run([binary, "oltp_read_write", *sysbench_base(args, port), "--threads=4", "prepare"],
                              capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        if prep.returncode != 0:
            raise BenchError(f"sysbench prepare failed:\n{prep.stdout[-2000:]}{prep.stderr[-2000:]}")
        with contextlib.suppress(pymysql.MySQLError):
            conn = my_connect(port)
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                versions["MariaDB"] = version_number(str(cur.fetchone()[0]))
            conn.close()
        versions["sysbench"] = version_number(first_line([binary, "--version"]))
        ports: dict[str, int] = {"direct": port}
        proxy: Service | None = None
        try:
            if "proxy" in res.targets:
                pport = free_port()
                (tmp / "myproxy").mkdir()
                text = proxy_config(
                    [(primary.name, host, port)],
                    [ProxyEndpoint("pooled", pport, "writer", {"pool_mode": "transaction"})],
                    workers=args.proxy_workers,
                    cluster_settings={"pool_size": args.my_pool_size},
                    protocol="mysql",
                )
                proxy = _common.start_proxy(tmp / "myproxy", text, pport)
                versions["endpoint_proxy"] = proxy.version
                my_wait_ready(proxy, pport, "endpoint_proxy (mysql)")
                ports["proxy"] = pport
            if args.warmup > 0:
                log(f"warm-up: direct oltp_read_write, 4 threads for {args.warmup} s (not recorded)")
                subprocess.run([binary, "oltp_read_write", *sysbench_base(args, port), "--threads=4",
                                f"--time={args.warmup}", "--events=0", "run"],
                               capture_output=True, timeout=args.warmup + 60, check=False)  # fmt: skip
            total, n = args.repeat * len(res.targets), 0
            for rep in range(args.repeat):
                for target in res.targets:
                    n += 1
                    if proxy is not None:
                        proxy.check_alive()
                    svc = proxy if target == "proxy" else None
                    r = sysbench_run(binary, args, ports[target], port, svc)
                    res.runs.setdefault(target, []).append(r)
                    cpu = f", {r.cpu_us_per_txn:.0f} µs CPU/txn" if r.cpu_us_per_txn is not None else ""
                    log(f"[{n}/{total}] rep {rep + 1}/{args.repeat} {target}: "
                        f"{'ok' if r.ok else 'FAILED'}, {r.tps or 0:,.0f} tps, {r.qps or 0:,.0f} qps, "
                        f"{r.ignored_errors} ignored errors (server deadlocks {r.server_deadlocks}), "
                        f"{r.reconnects} reconnects{cpu}")  # fmt: skip
                    for e in r.errors[:5]:
                        log(f"    sysbench: {e}")
            if proxy is not None:
                proxy.check_alive()
        finally:
            if proxy is not None:
                proxy.stop()
                res.proxy_log = log_lines(proxy)


def my_table(res: MyResults) -> str:
    header = ["target", "tps", "qps", "ignored errors (1213)", "server deadlocks", "reconnects", "failed runs",
              "latency avg (ms)", "p95 (ms)", "proxy CPU µs/txn"]  # fmt: skip
    rows = []
    for t in res.targets:
        rs = res.runs.get(t, [])
        if not rs:
            continue
        vals = {a: res.median(t, a) for a in ("tps", "qps", "latency_avg_ms", "latency_p95_ms", "cpu_us_per_txn")}
        dls = [r.server_deadlocks for r in rs if r.server_deadlocks is not None]
        rows.append([
            t,
            f"{vals['tps']:,.0f}" if vals["tps"] is not None else "-",
            f"{vals['qps']:,.0f}" if vals["qps"] is not None else "-",
            str(res.total(t, "ignored_errors")),
            str(sum(dls)) if dls else "?",
            str(res.total(t, "reconnects")),
            f"{sum(1 for r in rs if not r.ok)}/{len(rs)}",
            f"{vals['latency_avg_ms']:.2f}" if vals["latency_avg_ms"] is not None else "-",
            f"{vals['latency_p95_ms']:.2f}" if vals["latency_p95_ms"] is not None else "-",
            f"{vals['cpu_us_per_txn']:.0f}" if vals["cpu_us_per_txn"] is not None else "-",
        ])  # fmt: skip
    return markdown_table(header, rows)


def my_verdict(res: MyResults) -> list[str]:
    lines = []
    a, b = res.median("proxy", "tps"), res.median("direct", "tps")
    if a is not None and b:
        lines.append(f"proxy/direct tps: {a / b:.2f}")
    rs = res.runs.get("proxy", [])
    if rs:
        failed = [r for r in rs if not r.ok]
        extra = [r for r in rs if r.server_deadlocks is not None and r.ignored_errors > r.server_deadlocks]
        ok = not failed and not extra and not any(r.reconnects for r in rs)
        detail = []
        if failed:
            detail.append(f"{len(failed)} run(s) stopped by an error: " + "; ".join(failed[0].errors[:3]))
        if extra:
            detail.append("sysbench counted more 1213 errors than the server's Innodb_deadlocks")
        if any(r.reconnects for r in rs):
            detail.append("sysbench reconnected")
        lines.append("errors through the proxy other than server-reported deadlocks: "
                     + ("none" if ok else "YES — " + "; ".join(detail)))  # fmt: skip
    count, first = res.proxy_log
    if count:
        lines.append(f"proxy log: {count} warning/error lines, first: " + " | ".join(first[:3]))
    return lines


def my_raw(res: MyResults) -> list[str]:
    return [f"  - {t}: " + ", ".join(f"{r.tps or 0:,.0f} tps/{r.qps or 0:,.0f} qps" + ("" if r.ok else " FAILED")
                                     for r in res.runs[t])
            for t in res.targets if t in res.runs]  # fmt: skip


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="transaction-mode pooling: endpoint_proxy vs PgBouncer (pgbench), "
                                            "endpoint_proxy MySQL (sysbench oltp_read_write)")  # fmt: skip
    p.add_argument("--only", choices=("pg", "mysql"), default=None, help="run only one half (default: both)")
    p.add_argument("--duration", type=int, default=15, help="seconds per pgbench/sysbench run (15)")
    p.add_argument("--repeat", type=int, default=1, help="runs per target, interleaved; median kept (1)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded direct run before measuring, s (3)")
    p.add_argument("--proxy-workers", type=int, default=1, help="endpoint_proxy [server] workers (1)")
    p.add_argument("--clients", type=int, default=200, help="pgbench -c (200)")
    p.add_argument("--jobs", type=int, default=8, help="pgbench -j (8)")
    p.add_argument("--pool-size", type=int, default=20, help="PostgreSQL pool size: proxy and PgBouncer (20)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (10)")
    p.add_argument("--pg-targets", default=None, help="subset of: " + ",".join(PG_TARGETS) + " (default: all; "
                   "pgbouncer-prepared only with PgBouncer 1.21+)")
    p.add_argument("--max-prepared-statements", type=int, default=200,
                   help="PgBouncer max_prepared_statements for pgbouncer-prepared (200)")
    p.add_argument("--my-threads", type=int, default=64, help="sysbench --threads (64)")
    p.add_argument("--my-pool-size", type=int, default=8, help="MySQL pool size of the proxy (8)")
    p.add_argument("--my-targets", default=",".join(MY_TARGETS), help="subset of: " + ",".join(MY_TARGETS))
    p.add_argument("--tables", type=int, default=4, help="sysbench --tables (4)")
    p.add_argument("--table-size", type=int, default=10_000, help="sysbench --table-size (10000)")
    p.add_argument("--pgbench", default=None, help="pgbench binary (default: auto)")
    p.add_argument("--sysbench", default=None, help="sysbench binary (default: from PATH)")
    p.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    args.pg_targets_given = args.pg_targets is not None
    if args.pg_targets is None:
        args.pg_targets = ",".join(PG_TARGETS)
    for opt, allowed in (("pg_targets", tuple(PG_TARGETS)), ("my_targets", MY_TARGETS)):
        chosen = [v.strip() for v in getattr(args, opt).split(",") if v.strip()]
        unknown = [v for v in chosen if v not in allowed]
        if unknown or not chosen:
            p.error(f"--{opt.replace('_', '-')}: unknown {unknown}; choose from {','.join(allowed)}")
        setattr(args, opt, [v for v in allowed if v in chosen])
    positive = (args.duration, args.repeat, args.proxy_workers, args.clients, args.jobs, args.pool_size, args.scale,
                args.my_threads, args.my_pool_size, args.tables, args.table_size,
                args.max_prepared_statements)  # fmt: skip
    if min(positive) < 1 or args.warmup < 0:
        p.error("counts and durations must be positive (--warmup may be 0)")
    if args.jobs > args.clients:
        p.error("--jobs must not exceed --clients")
    return args


def pg_parameters(args: argparse.Namespace) -> str:
    return (
        f"`pgbench -S -n -M {{prepared|extended}} -c {args.clients} -j {args.jobs} -T {args.duration} -P 1`, "
        f"scale {args.scale}, repeat {args.repeat} (median shown), interleaved ({', '.join(args.pg_targets)}); "
        f"proxy: writer endpoint pool_mode=transaction, pool_size={args.pool_size}, workers {args.proxy_workers}; "
        f"PgBouncer: pool_mode=transaction, default_pool_size={args.pool_size}, max_client_conn="
        f"{max(300, args.clients + 100)}, max_prepared_statements={args.max_prepared_statements} for "
        "pgbouncer-prepared (1.21+; before 1.21 only -M extended works through it); PostgreSQL primary "
        "only, shared_buffers 256MB; all on 127.0.0.1 TCP. CPU µs/txn: utime+stime of the middleman's process "
        "group from the 2nd to the last 1 s progress report, over the transactions of those reports"
    )


def my_parameters(args: argparse.Namespace) -> str:
    return (
        f"`sysbench oltp_read_write --db-ps-mode=auto --threads={args.my_threads} --time={args.duration} "
        f"--mysql-ignore-errors=1213`, --tables={args.tables} --table-size={args.table_size} (prepared once, "
        f"directly), repeat {args.repeat} (median shown), interleaved ({', '.join(args.my_targets)}); proxy: "
        f"protocol mysql, writer endpoint pool_mode=transaction, pool_size={args.my_pool_size}, workers "
        f"{args.proxy_workers}; MariaDB primary only, innodb_buffer_pool_size 256M; server deadlocks = "
        "Innodb_deadlocks delta over the run; CPU µs/txn over the whole run"
    )


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="pool-compare-"))
    tmp.chmod(0o711)  # PgBouncer runs as postgres and must reach its directory
    versions: dict[str, str] = {}
    pg = PgResults(targets=args.pg_targets) if args.only in (None, "pg") else None
    my = MyResults(targets=args.my_targets) if args.only in (None, "mysql") else None
    log(f"temp dir {tmp}")
    try:
        if pg is not None:
            pg_measure(args, find_pgbench(args.pgbench), tmp, pg, versions)
        if my is not None:
            my_measure(args, find_sysbench(args.sysbench), tmp, my, versions)
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    print()
    print(f"pool_compare; nproc {machine['nproc']}, {machine['cpu']}; {vers}")
    section = []
    if pg is not None:
        body = [pg_table(pg), "", *(f"- {x}" for x in pg_ratios(pg)), *(f"- problem: {x}" for x in pg_problems(pg))]
        print("\nPostgreSQL: " + pg_parameters(args) + "\n")
        print("\n".join(body))
        section += ["### PostgreSQL: pgbench -S, transaction pools", "", f"- Parameters: {pg_parameters(args)}", "",
                    *body, ""]  # fmt: skip
        if args.repeat > 1:
            section += ["- tps (CPU µs/txn) of each repetition:", *pg_raw(pg), ""]
    if my is not None:
        body = [my_table(my), "", *(f"- {x}" for x in my_verdict(my))]
        print("\nMySQL: " + my_parameters(args) + "\n")
        print("\n".join(body))
        section += ["### MariaDB: sysbench oltp_read_write, transaction pool", "",
                    f"- Parameters: {my_parameters(args)}", "", *body, ""]  # fmt: skip
        if args.repeat > 1:
            section += ["- each repetition:", *my_raw(my), ""]
    if args.write_results:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        head = [f"## {now} — pool_compare.py: transaction-mode pooling", "",
                f"- Machine: {machine_line(machine)}", f"- Versions: {vers}", ""]  # fmt: skip
        append_results(args.results_file, "\n".join(head + section).rstrip("\n") + "\n")
        log(f"appended results to {args.results_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
