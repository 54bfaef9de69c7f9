#!/usr/bin/env python3
"""A planned switchover under load: endpoint_proxy's ``POST /switchover`` vs PgBouncer PAUSE/RESUME.

PostgreSQL: a local cluster (primary pg0, replica pg1), ``pgbench`` (tpcb-like, 16 clients)
through the proxy's writer endpoint, and a probe writer (asyncpg, one session, one autocommit
insert of its sequence number every ~1 ms). ``--switch-at`` seconds into the run the proxy is
asked to switch the writer over to pg1 (admin server, ``POST /switchover``). Afterwards: the
longest gap between two acknowledged probe writes and the p99 of the gaps, pgbench's exit
status and failed transactions, the probe's errors, the proxy's own ``pause_ms``, and whether
every acknowledged probe row is on the new primary (queried directly).

MariaDB: the same with ``sysbench oltp_read_write --threads=16`` and a pymysql probe.

PgBouncer (PostgreSQL only, ``--skip-pgbouncer`` to leave out): a fresh cluster, PgBouncer in
transaction mode in front of pg0, the same pgbench and probe through it; the switchover is done
by hand on its admin console: ``PAUSE``, stop pg0 (fast shutdown: it ships its last WAL to the
replica), promote pg1, point the ``[databases]`` entry at pg1 and ``RELOAD``, ``RESUME``.

``--write-results`` appends the result to ``benchmarks/RESULTS.md``. Everything it starts is
stopped on exit, Ctrl-C and errors included. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py (this script's directory is on sys.path)
import asyncpg
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
    pg_env,
    proxy_config,
    run_main,
    server_version,
    tail,
    version_number,
)

ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"
PROBE_TABLE = "switchover_probe"
HEALTH_CHECK_MS = 100
SWITCHOVER_TIMEOUT_MS = 5000
PROBE_INTERVAL_S = 0.001
PROBE_OP_TIMEOUT_S = 30.0
PG_CLIENTS, PG_JOBS = 16, 4
MY_THREADS = 16

FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
PROGRESS_RE = re.compile(r"^progress: ")
SB_TRANSACTIONS_RE = re.compile(r"^\s*transactions:\s+(\d+)\s+\(([0-9.]+) per sec\.\)", re.MULTILINE)
SB_ERRORS_RE = re.compile(r"^\s*ignored errors:\s+(\d+)", re.MULTILINE)
SB_RECONNECTS_RE = re.compile(r"^\s*reconnects:\s+(\d+)", re.MULTILINE)
SB_REPEATED_RE = re.compile(r"^\(last message repeated (\d+) times\)")
PG_ABORTED_RE = re.compile(r"^client \d+ aborted")
QUIET_LOG_RE = re.compile(r"\[(?:info|debug)\s*\]")  # the proxy's console log: lines below warning


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class Probe:
    """What the probe writer saw: acknowledged ids with their completion time (monotonic)."""

    acked: list[tuple[int, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reconnects: int = 0

    def gaps(self) -> list[float]:
        ts = [t for _, t in self.acked]
        return [b - a for a, b in zip(ts, ts[1:], strict=False)]

    def max_gap(self) -> tuple[float, float | None]:
        """The longest gap (s) and when it began (monotonic)."""
        best, at = 0.0, None
        for (_, a), (_, b) in zip(self.acked, self.acked[1:], strict=False):
            if b - a > best:
                best, at = b - a, a
        return best, at

    def p99_gap(self) -> float:
        gs = sorted(self.gaps())
        if not gs:
            return 0.0
        return gs[min(len(gs) - 1, int(0.99 * len(gs)))]


@dataclass
class Outcome:
    """One switchover under load."""

    name: str  # "proxy (PostgreSQL)" ...
    load_tool: str
    load_status: int | None = None
    load_txns: int = 0
    load_tps: float | None = None
    load_failed: int = 0  # pgbench failed transactions / sysbench ignored errors
    load_reconnects: int | None = None  # sysbench only
    load_died: int = 0  # pgbench clients aborted / sysbench threads that failed
    load_errors: list[str] = field(default_factory=list)
    probe: Probe = field(default_factory=Probe)
    switch_s: float | None = None  # wall time of the switchover (request, or the manual steps)
    switch_start: float | None = None  # monotonic
    pause_ms: float | None = None  # the proxy's own record
    switch_outcome: str = "?"
    switch_detail: str = ""
    missing: int | None = None  # acknowledged probe rows not on the new primary
    log_problems: tuple[int, list[str]] = (0, [])


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


# --------------------------------------------------------------------------
# Proxy config and admin API
# --------------------------------------------------------------------------


def switchover_proxy_config(instances: Sequence[tuple[str, str, int]], writer_port: int, admin_port: int,
                            protocol: str, promotion_user: str, promotion_password: str,
                            log_level: str) -> str:  # fmt: skip
    text = proxy_config(
        instances,
        [ProxyEndpoint("writer", writer_port, "writer")],
        workers=1,
        log_level=log_level,
        cluster_settings={"health_check_interval_ms": HEALTH_CHECK_MS, "switchover_timeout_ms": SWITCHOVER_TIMEOUT_MS},
        protocol=protocol,
    )
    q = _common._toml_value
    admin = "\n".join([
        "[admin]",
        f'listen = "{LOOPBACK}:{admin_port}"',
        f"users = [{{name = {q(ADMIN_USER)}, password = {q(ADMIN_PASSWORD)}}}]",
        "",
        "[[clusters]]",
    ])  # fmt: skip
    promotion = (f"promotion = {{method = \"sql\", user = {q(promotion_user)}, "
                 f"password = {q(promotion_password)}}}")  # fmt: skip
    text = text.replace("[[clusters]]", admin, 1)
    proto_line = f"protocol = {q(protocol)}"
    return text.replace(proto_line, proto_line + "\n" + promotion, 1)


def admin_request(port: int, method: str, path: str, body: dict[str, Any] | None = None,
                  timeout: float = 60.0) -> tuple[int, dict[str, Any]]:  # fmt: skip
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    basic = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Authorization": f"Basic {basic}", "Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"raw": raw.decode("utf-8", "replace")}
    return resp.status, doc


def wait_writer(svc: Service, admin_port: int, want: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last: Any = None
    while time.monotonic() < deadline:
        svc.check_alive()
        with contextlib.suppress(OSError, ValueError):
            status, doc = admin_request(admin_port, "GET", "/topology", timeout=5)
            last = doc
            if status == 200 and doc.get("clusters") and doc["clusters"][0].get("writer") == want:
                log(f"the proxy knows {want} as the writer")
                return
        time.sleep(0.2)
    raise BenchError(f"the proxy did not report {want} as writer in {READY_TIMEOUT:.0f} s: {last}\n{tail(svc.logfile)}")


def proxy_switchover(admin_port: int, to: str, res: Outcome) -> None:
    res.switch_start = time.monotonic()
    try:
        status, doc = admin_request(admin_port, "POST", "/switchover", {"to": to}, timeout=120)
    except OSError as exc:
        res.switch_s = time.monotonic() - res.switch_start
        res.switch_outcome = f"request failed: {exc}"
        return
    res.switch_s = time.monotonic() - res.switch_start
    record = doc.get("switchover") if isinstance(doc, dict) else None
    if status != 200 or not isinstance(record, dict):
        res.switch_outcome = f"HTTP {status}"
        res.switch_detail = json.dumps(doc)[:500]
        return
    res.switch_outcome = str(record.get("outcome"))
    pause = record.get("pause_ms")
    res.pause_ms = float(pause) / 1000 if isinstance(pause, int | float) else None
    res.switch_detail = json.dumps(record)[:500]


def proxy_log_problems(svc: Service, limit: int = 8) -> tuple[int, list[str]]:
    try:
        lines = [ln for ln in svc.logfile.read_text(errors="replace").splitlines()
                 if ln.strip() and not QUIET_LOG_RE.search(ln)]  # fmt: skip
    except OSError:
        return 0, []
    return len(lines), lines[:limit]


# --------------------------------------------------------------------------
# Probe writers (a thread each)
# --------------------------------------------------------------------------


class PgProbe(threading.Thread):
    """One asyncpg session inserting its sequence number every ~1 ms (simple protocol: works
    through PgBouncer's transaction mode as well); reconnects after an error."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.result = Probe()
        self.stop_event = threading.Event()
        self.started_ok = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(host=LOOPBACK, port=self.port, user=APP_USER, password=APP_PASSWORD,
                                     database=APP_DB, ssl=False, timeout=10, statement_cache_size=0)  # fmt: skip

    async def _main(self) -> None:
        res, conn, n = self.result, None, 0
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = await self._connect()
                n += 1
                await asyncio.wait_for(conn.execute(f"insert into {PROBE_TABLE} (id) values ({n})"), PROBE_OP_TIMEOUT_S)
                res.acked.append((n, time.monotonic()))
                self.started_ok.set()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                res.errors.append(f"#{n} {time.monotonic():.3f}: {type(exc).__name__}: {exc}")
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                    conn = None
                    res.reconnects += 1
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(PROBE_INTERVAL_S)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)


class MyProbe(threading.Thread):
    """One pymysql session (autocommit) inserting its sequence number every ~1 ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.result = Probe()
        self.stop_event = threading.Event()
        self.started_ok = threading.Event()

    def run(self) -> None:
        res, conn, n = self.result, None, 0
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = pymysql.connect(host=LOOPBACK, port=self.port, user=APP_USER, password=APP_PASSWORD,
                                           database=APP_DB, autocommit=True, connect_timeout=10,
                                           read_timeout=int(PROBE_OP_TIMEOUT_S), write_timeout=10)  # fmt: skip
                n += 1
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {PROBE_TABLE} (id) VALUES ({n})")
                res.acked.append((n, time.monotonic()))
                self.started_ok.set()
            except (pymysql.MySQLError, OSError) as exc:
                res.errors.append(f"#{n} {time.monotonic():.3f}: {type(exc).__name__}: {exc}")
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                    res.reconnects += 1
                time.sleep(0.05)
                continue
            time.sleep(PROBE_INTERVAL_S)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


# --------------------------------------------------------------------------
# Load generators
# --------------------------------------------------------------------------


def find_pgbench(explicit: str | None) -> str:
    found = explicit or find_binary("pgbench", ["/usr/lib/postgresql/15/bin/pgbench"])
    if found is None:
        raise BenchError("pgbench not found (install postgresql-contrib or pass --pgbench)")
    return found


def pgbench_init(pgbench: str, port: int, scale: int) -> None:
    log(f"pgbench -i -s {scale} against the primary (port {port})")
    cmd = [pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-i", "-s", str(scale), "-q", APP_DB]
    out = subprocess.run(cmd, env=pg_env("switchover-bench"), capture_output=True, text=True, timeout=600,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        raise BenchError(f"pgbench -i failed (status {out.returncode}):\n{out.stderr[-3000:]}")


def start_pgbench(pgbench: str, port: int, duration: int, tmp: Path, tag: str) -> subprocess.Popen[bytes]:
    cmd = [pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-n",
           "-c", str(PG_CLIENTS), "-j", str(PG_JOBS), "-T", str(duration), "-P", "1", APP_DB]  # fmt: skip
    log(f"{tag}: {' '.join(cmd)}")
    with (tmp / f"{tag}.out").open("wb") as out, (tmp / f"{tag}.err").open("wb") as err:
        return subprocess.Popen(cmd, env=pg_env("switchover-bench"), stdout=out, stderr=err, start_new_session=True)


def sysbench_base(args: argparse.Namespace, port: int) -> list[str]:
    return [
        "--db-driver=mysql", f"--mysql-host={LOOPBACK}", f"--mysql-port={port}", f"--mysql-user={APP_USER}",
        f"--mysql-password={APP_PASSWORD}", f"--mysql-db={APP_DB}", "--mysql-ssl=off",
        f"--tables={args.tables}", f"--table-size={args.table_size}",
    ]  # fmt: skip


def start_sysbench(binary: str, args: argparse.Namespace, port: int, tmp: Path, tag: str,
                   ps_mode: str) -> subprocess.Popen[bytes]:  # fmt: skip
    cmd = [binary, "oltp_read_write", *sysbench_base(args, port), f"--threads={MY_THREADS}", f"--db-ps-mode={ps_mode}",
           f"--time={args.duration}", "--events=0", "--report-interval=1", "--mysql-ignore-errors=1213",
           "run"]  # fmt: skip
    log(f"{tag}: {' '.join(c for c in cmd if not c.startswith('--mysql-password='))}")
    with (tmp / f"{tag}.out").open("wb") as out, (tmp / f"{tag}.err").open("wb") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)


def wait_load(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


def read_pgbench(res: Outcome, tmp: Path, tag: str, status: int) -> None:
    out = (tmp / f"{tag}.out").read_text(errors="replace")
    err = (tmp / f"{tag}.err").read_text(errors="replace")
    res.load_status = status
    m = FAILED_RE.search(out)
    res.load_failed = int(m.group(1)) if m else 0
    m = PROCESSED_RE.search(out)
    res.load_txns = int(m.group(1)) if m else 0
    m = TPS_RE.search(out)
    res.load_tps = float(m.group(1)) if m else None
    res.load_errors = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS_RE.match(ln)]
    res.load_died = sum(1 for ln in res.load_errors if PG_ABORTED_RE.match(ln))


def read_sysbench(res: Outcome, tmp: Path, tag: str, status: int) -> None:
    out = (tmp / f"{tag}.out").read_text(errors="replace")
    err = (tmp / f"{tag}.err").read_text(errors="replace")
    res.load_status = status
    t, ign, rec = SB_TRANSACTIONS_RE.search(out), SB_ERRORS_RE.search(out), SB_RECONNECTS_RE.search(out)
    res.load_txns = int(t.group(1)) if t else 0
    res.load_tps = float(t.group(2)) if t else None
    res.load_failed = int(ign.group(1)) if ign else 0
    res.load_reconnects = int(rec.group(1)) if rec else None
    res.load_errors = [ln.strip() for ln in (out + "\n" + err).splitlines()
                       if "FATAL" in ln or ("error" in ln.lower() and "ignored errors" not in ln)]  # fmt: skip
    # A thread that hits an error it does not ignore ends with "`thread_run' function failed";
    # sysbench folds identical consecutive messages into "(last message repeated N times)".
    previous_failed = False
    for ln in out.splitlines():
        m = SB_REPEATED_RE.match(ln.strip())
        if m and previous_failed:
            res.load_died += int(m.group(1))
            continue
        previous_failed = "thread_run' function failed" in ln
        res.load_died += previous_failed


def wait_probe(probe: PgProbe | MyProbe, what: str) -> None:
    if not probe.started_ok.wait(READY_TIMEOUT):
        raise BenchError(f"the probe writer made no write through {what} in {READY_TIMEOUT:.0f} s: "
                         f"{probe.result.errors[-3:]}")  # fmt: skip


def run_under_load(res: Outcome, args: argparse.Namespace, start_load: Callable[[], subprocess.Popen[bytes]],
                   probe: PgProbe | MyProbe, switch: Callable[[], None],
                   services: Sequence[Service]) -> int:  # fmt: skip
    """Start the load and the probe, run ``switch`` at --switch-at, wait for the load to end."""
    probe.start()
    wait_probe(probe, res.name)
    proc = start_load()
    t0 = time.monotonic()
    try:
        time.sleep(max(0.0, t0 + args.switch_at - time.monotonic()))
        if proc.poll() is not None:
            raise BenchError(f"{res.load_tool} ended before the switchover (status {proc.returncode})")
        log(f"{res.name}: switchover at {time.monotonic() - t0:.1f} s into the run")
        switch()
        log(f"{res.name}: switchover {res.switch_outcome} in {res.switch_s or 0:.2f} s"
            + (f", proxy pause_ms {res.pause_ms * 1000:.0f}" if res.pause_ms is not None else ""))  # fmt: skip
        status = wait_load(proc, max(5.0, t0 + args.duration + 60 - time.monotonic()))
    finally:
        if proc.poll() is None:
            wait_load(proc, 0.1)
        probe.stop_event.set()
        probe.join(PROBE_OP_TIMEOUT_S + 10)
    for svc in services:
        svc.check_alive()
    res.probe = probe.result
    return status


# --------------------------------------------------------------------------
# PostgreSQL: proxy and PgBouncer
# --------------------------------------------------------------------------


def pg_missing(port: int, acked: list[tuple[int, float]]) -> int:
    async def ids() -> set[int]:
        conn = await asyncpg.connect(host=LOOPBACK, port=port, user=APP_USER, password=APP_PASSWORD,
                                     database=APP_DB, ssl=False, timeout=10)  # fmt: skip
        try:
            return {r[0] for r in await conn.fetch(f"select id from {PROBE_TABLE}")}
        finally:
            await conn.close()

    present = asyncio.run(ids())
    return sum(1 for i, _ in acked if i not in present)


def pg_writable(port: int) -> bool:
    async def check() -> bool:
        conn = await asyncpg.connect(host=LOOPBACK, port=port, user=APP_USER, password=APP_PASSWORD,
                                     database=APP_DB, ssl=False, timeout=5)  # fmt: skip
        try:
            return not await conn.fetchval("select pg_is_in_recovery()")
        finally:
            await conn.close()

    try:
        return asyncio.run(check())
    except (asyncpg.PostgresError, OSError, TimeoutError):
        return False


def pg_cluster(args: argparse.Namespace, pgbench: str, versions: dict[str, str]) -> Any:
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

    cluster = PostgresCluster(replicas=1, extra_conf={"max_connections": "200", "shared_buffers": "128MB"})
    cluster.start()
    try:
        port = int(cluster.instance("pg0").port)
        deadline = time.monotonic() + READY_TIMEOUT
        while server_version(port) == "?" and time.monotonic() < deadline:
            time.sleep(0.3)
        versions["PostgreSQL"] = server_version(port)
        versions["pgbench"] = version_number(first_line([pgbench, "--version"]))
        pgbench_init(pgbench, port, args.scale)
        cluster.sql("pg0", f"create table {PROBE_TABLE} (id bigint primary key, at timestamptz default now())",
                    user=APP_USER)  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    return cluster


def pg_proxy(args: argparse.Namespace, pgbench: str, tmp: Path, versions: dict[str, str]) -> Outcome:
    res = Outcome("proxy (PostgreSQL)", "pgbench")
    cluster = pg_cluster(args, pgbench, versions)
    try:
        insts = [(i.name, i.host, int(i.port)) for i in cluster.instances]
        wport, aport = free_port(), free_port()
        d = tmp / "pgproxy"
        d.mkdir()
        text = switchover_proxy_config(insts, wport, aport, "postgresql", cluster.promotion_user,
                                       cluster.promotion_password, args.proxy_log_level)  # fmt: skip
        proxy = _common.start_proxy(d, text, wport)
        versions["endpoint_proxy"] = proxy.version
        try:
            wait_writer(proxy, aport, "pg0")
            status = run_under_load(
                res, args, lambda: start_pgbench(pgbench, wport, args.duration, tmp, "pg-proxy"),
                PgProbe(wport), lambda: proxy_switchover(aport, "pg1", res), [proxy],
            )  # fmt: skip
            read_pgbench(res, tmp, "pg-proxy", status)
        finally:
            proxy.stop()
            res.log_problems = proxy_log_problems(proxy)
        res.missing = pg_missing(int(cluster.instance("pg1").port), res.probe.acked)
    finally:
        cluster.stop()
    return res


def pgb_admin(port: int, command: str) -> None:
    psql = find_binary("psql", ["/usr/lib/postgresql/15/bin/psql"])
    if psql is None:
        raise BenchError("psql not found")
    out = subprocess.run([psql, "-X", "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-d", "pgbouncer",
                          "-c", command], env=pg_env("switchover-bench"), capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    if out.returncode != 0:
        raise BenchError(f"PgBouncer admin console: {command} failed: {out.stderr.strip()}")


def pg_pgbouncer(args: argparse.Namespace, pgbench: str, tmp: Path, versions: dict[str, str]) -> Outcome:
    res = Outcome("PgBouncer PAUSE/RESUME (PostgreSQL)", "pgbench")
    cluster = pg_cluster(args, pgbench, versions)
    try:
        old, new = cluster.instance("pg0"), cluster.instance("pg1")
        d = tmp / "pgb"
        d.mkdir()
        pgb = _common.start_pgbouncer(d, {APP_DB: (old.host, int(old.port))}, pool_mode="transaction",
                                      pool_size=20, max_client_conn=200)  # fmt: skip
        versions["PgBouncer"] = pgb.version
        ini = d / "pgbouncer" / "pgbouncer.ini"
        try:
            # The admin console: app as an admin user, then a reload (SIGHUP) to read it.
            time.sleep(0.5)
            ini.write_text(ini.read_text() + f"admin_users = {APP_USER}\n")
            os.kill(pgb.proc.pid, signal.SIGHUP)
            time.sleep(0.5)
            pgb.check_alive()

            def switch() -> None:
                res.switch_start = time.monotonic()
                steps: list[str] = []
                t = time.monotonic()
                pgb_admin(pgb.port, "PAUSE")
                steps.append(f"PAUSE {time.monotonic() - t:.2f} s")
                t = time.monotonic()
                cluster.stop_instance("pg0")
                steps.append(f"stop pg0 {time.monotonic() - t:.2f} s")
                t = time.monotonic()
                cluster.promote("pg1")
                while not pg_writable(int(new.port)):
                    time.sleep(0.01)
                steps.append(f"promote pg1 {time.monotonic() - t:.2f} s")
                t = time.monotonic()
                ini.write_text(ini.read_text().replace(f"port={old.port} ", f"port={new.port} "))
                pgb_admin(pgb.port, "RELOAD")
                pgb_admin(pgb.port, "RESUME")
                steps.append(f"RELOAD + RESUME {time.monotonic() - t:.2f} s")
                res.switch_s = time.monotonic() - res.switch_start
                res.switch_outcome = "completed"
                res.switch_detail = ", ".join(steps)

            status = run_under_load(
                res, args, lambda: start_pgbench(pgbench, pgb.port, args.duration, tmp, "pg-pgbouncer"),
                PgProbe(pgb.port), switch, [pgb],
            )  # fmt: skip
            read_pgbench(res, tmp, "pg-pgbouncer", status)
        finally:
            pgb.stop()
            res.log_problems = pgbouncer_problems(d / "pgbouncer" / "pgbouncer.log")
        res.missing = pg_missing(int(new.port), res.probe.acked)
    finally:
        cluster.stop()
    return res


def pgbouncer_problems(path: Path, limit: int = 8) -> tuple[int, list[str]]:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if " WARNING " in ln or " ERROR " in ln]
    except OSError:
        return 0, []
    return len(lines), lines[:limit]


# --------------------------------------------------------------------------
# MariaDB: proxy
# --------------------------------------------------------------------------


def my_connect(port: int) -> pymysql.Connection:
    return pymysql.connect(host=LOOPBACK, port=port, user=APP_USER, password=APP_PASSWORD, database=APP_DB,
                           connect_timeout=5, read_timeout=30, write_timeout=10, autocommit=True)  # fmt: skip


def my_proxy(args: argparse.Namespace, tmp: Path, versions: dict[str, str], ps_mode: str) -> Outcome:
    from endpoint_proxy.localcluster.mariadb import MariaDBCluster

    binary = find_binary("sysbench")
    if binary is None:
        raise BenchError("sysbench not found: run benchmarks/setup.sh")
    res = Outcome(f"proxy (MariaDB, --db-ps-mode={ps_mode})", "sysbench")
    tag = f"my-proxy-ps-{ps_mode}"
    extra_conf = {"innodb_buffer_pool_size": "128M", "max_connections": "200"}
    with MariaDBCluster(replicas=1, extra_conf=extra_conf) as cluster:
        old = cluster.primary_name
        new = next(i.name for i in cluster.instances if i.name != old)
        pport = int(cluster.instance(old).port)
        log(f"sysbench prepare: {args.tables} tables of {args.table_size} rows on {old}")
        prep = subprocess.run([binary, "oltp_read_write", *sysbench_base(args, pport), "--threads=2", "prepare"],
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        if prep.returncode != 0:
            raise BenchError(f"sysbench prepare failed:\n{prep.stdout[-2000:]}{prep.stderr[-2000:]}")
        conn = my_connect(pport)
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {PROBE_TABLE} (id BIGINT PRIMARY KEY, at TIMESTAMP(6) DEFAULT NOW(6))")
            cur.execute("SELECT VERSION()")
            versions["MariaDB"] = version_number(str(cur.fetchone()[0]))
        conn.close()
        versions["sysbench"] = version_number(first_line([binary, "--version"]))
        cluster.wait_caught_up(new, timeout=60)
        insts = [(i.name, i.host, int(i.port)) for i in cluster.instances]
        wport, aport = free_port(), free_port()
        d = tmp / tag
        d.mkdir()
        text = switchover_proxy_config(insts, wport, aport, "mysql", cluster.promotion_user,
                                       cluster.promotion_password, args.proxy_log_level)  # fmt: skip
        proxy = _common.start_proxy(d, text, wport)
        versions["endpoint_proxy"] = proxy.version
        try:
            wait_writer(proxy, aport, old)
            status = run_under_load(
                res, args, lambda: start_sysbench(binary, args, wport, tmp, tag, ps_mode),
                MyProbe(wport), lambda: proxy_switchover(aport, new, res), [proxy],
            )  # fmt: skip
            read_sysbench(res, tmp, tag, status)
        finally:
            proxy.stop()
            res.log_problems = proxy_log_problems(proxy)
        conn = my_connect(int(cluster.instance(new).port))
        with conn.cursor() as cur:
            cur.execute(f"SELECT id FROM {PROBE_TABLE}")
            present = {int(r[0]) for r in cur.fetchall()}
        conn.close()
        res.missing = sum(1 for i, _ in res.probe.acked if i not in present)
    return res


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

HEADER = ["setup", "switchover (s)", "proxy pause_ms", "probe max gap (ms)", "probe p99 gap (ms)", "probe writes",
          "probe errors", "acked rows missing", "load", "load exit", "failed txns / ignored errors",
          "clients aborted / threads died", "reconnects", "load tps"]  # fmt: skip


def table(results: Sequence[Outcome]) -> str:
    rows = []
    for r in results:
        gap, _ = r.probe.max_gap()
        rows.append([
            r.name,
            f"{r.switch_s:.2f}" if r.switch_s is not None else "-",
            f"{r.pause_ms * 1000:.0f}" if r.pause_ms is not None else "n/a",
            fmt_ms(gap),
            fmt_ms(r.probe.p99_gap()),
            f"{len(r.probe.acked):,}",
            str(len(r.probe.errors)),
            str(r.missing) if r.missing is not None else "?",
            r.load_tool,
            str(r.load_status),
            str(r.load_failed),
            str(r.load_died),
            str(r.load_reconnects) if r.load_reconnects is not None else "n/a",
            f"{r.load_tps:,.0f}" if r.load_tps is not None else "-",
        ])  # fmt: skip
    return markdown_table(HEADER, rows)


def notes(r: Outcome) -> list[str]:
    gap, at = r.probe.max_gap()
    lines = [f"{r.name}: switchover {r.switch_outcome}"
             + (f" ({r.switch_detail})" if r.switch_detail else "")]  # fmt: skip
    if at is not None and r.switch_start is not None:
        lines.append(f"  longest probe gap {gap * 1000:.1f} ms, beginning {at - r.switch_start:+.2f} s from the "
                     "switchover request")  # fmt: skip
    if r.probe.errors:
        lines.append(f"  probe errors ({len(r.probe.errors)}, {r.probe.reconnects} reconnects): "
                     + " | ".join(r.probe.errors[:3]))  # fmt: skip
    if r.load_errors:
        lines.append(f"  {r.load_tool} errors ({len(r.load_errors)} lines): " + " | ".join(r.load_errors[:3]))
    n, first = r.log_problems
    if n:
        lines.append(f"  log ({n} warning/error lines): " + " | ".join(ln[:300] for ln in first[:3]))
    return lines


def parameters_line(args: argparse.Namespace) -> str:
    return (
        f"pgbench tpcb-like -c {PG_CLIENTS} -j {PG_JOBS} -T {args.duration} -P 1 (scale {args.scale}); "
        f"sysbench oltp_read_write --threads={MY_THREADS} --time={args.duration} "
        f"--db-ps-mode={'/'.join(args.sysbench_ps_modes)} (one run each) "
        f"({args.tables} tables × {args.table_size} rows, --mysql-ignore-errors=1213); "
        f"switchover {args.switch_at:g} s into the run; one replica; probe: one session, autocommit insert of "
        f"its sequence number every ~{PROBE_INTERVAL_S * 1000:g} ms; proxy: writer endpoint, 1 worker, "
        f"health_check_interval_ms={HEALTH_CHECK_MS}, switchover_timeout_ms={SWITCHOVER_TIMEOUT_MS}, promotion "
        "method sql; PgBouncer: pool_mode=transaction, pool 20, PAUSE → stop old primary → promote → edit ini + "
        "RELOAD → RESUME by hand; all on 127.0.0.1 TCP"
    )


DEFINITIONS = (
    "switchover: the POST /switchover request's duration (proxy) or the manual steps' (PgBouncer); "
    "proxy pause_ms: the proxy's own record of how long it held new writer work; probe max/p99 gap: longest "
    "and 99th-percentile time between two consecutive acknowledged probe inserts (the ~1 ms pacing included); "
    "acked rows missing: acknowledged probe ids not on the new primary (read directly); failed txns / errors: "
    "pgbench's \"number of failed transactions\", sysbench's ignored errors (only 1213 deadlocks are ignored); "
    "clients aborted / threads died: pgbench clients aborted, sysbench threads ended by an error; "
    "load tps: over the whole run (a sysbench run whose threads died has none)"
)


def results_section(results: Sequence[Outcome], args: argparse.Namespace, machine: dict[str, str],
                    versions: dict[str, str]) -> str:  # fmt: skip
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now} — planned switchover under load (switchover_compare.py)",
        "",
        f"- Machine: {machine_line(machine)}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- Parameters: {parameters_line(args)}",
        f"- Columns: {DEFINITIONS}",
        "",
        table(results),
        "",
    ]
    for r in results:
        ns = notes(r)
        lines.append(f"- {ns[0]}")
        lines += [f"  - {n.strip()}" for n in ns[1:]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Planned switchover under load: endpoint_proxy vs PgBouncer PAUSE/RESUME")
    p.add_argument("--only", choices=("pg", "mysql"), help="only PostgreSQL or only MariaDB")
    p.add_argument("--duration", type=int, default=10, help="seconds of load per run (10)")
    p.add_argument("--switch-at", type=float, default=3.0, help="seconds into the load the switchover starts (3)")
    p.add_argument("--skip-pgbouncer", action="store_true", help="leave out the PgBouncer comparison")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (10)")
    p.add_argument("--tables", type=int, default=4, help="sysbench tables (4)")
    p.add_argument("--table-size", type=int, default=10000, help="sysbench rows per table (10000)")
    p.add_argument("--sysbench-ps-modes", default="auto,disable",
                   help="sysbench --db-ps-mode values, one MariaDB run each (auto,disable)")  # fmt: skip
    p.add_argument("--proxy-log-level", default="warning", help="the proxy's [logging] level (warning)")
    p.add_argument("--pgbench", help="pgbench binary")
    p.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    args.sysbench_ps_modes = [m.strip() for m in args.sysbench_ps_modes.split(",") if m.strip()]
    if not args.sysbench_ps_modes or set(args.sysbench_ps_modes) - {"auto", "disable"}:
        p.error("--sysbench-ps-modes: a comma-separated subset of auto,disable")
    if args.duration < 3 or not 0 < args.switch_at < args.duration - 1:
        p.error("--duration must be at least 3 and --switch-at within the run (at least 1 s before its end)")
    return args


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    machine = machine_info()
    versions: dict[str, str] = {"asyncpg": asyncpg.__version__, "PyMySQL": pymysql.__version__}
    tmp = Path(tempfile.mkdtemp(prefix="switchover-compare-"))
    tmp.chmod(0o711)  # traversable, not listable: PgBouncer runs as postgres when we are root
    results: list[Outcome] = []
    log(f"temp dir {tmp}")
    try:
        if args.only in (None, "pg"):
            pgbench = find_pgbench(args.pgbench)
            results.append(pg_proxy(args, pgbench, tmp, versions))
            if not args.skip_pgbouncer:
                results.append(pg_pgbouncer(args, pgbench, tmp, versions))
        if args.only in (None, "mysql"):
            for ps_mode in args.sysbench_ps_modes:
                results.append(my_proxy(args, tmp, versions, ps_mode))
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"planned switchover under load; nproc {machine['nproc']}, {machine['cpu']}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(parameters_line(args))
    print()
    print(table(results))
    print()
    for r in results:
        print("\n".join(notes(r)))
    if args.write_results:
        append_results(args.results_file, results_section(results, args, machine, versions))
        log(f"appended results to {args.results_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv, also=(pymysql.MySQLError,))


if __name__ == "__main__":
    sys.exit(main())
