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
import contextlib
import datetime as dt
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "RESULTS.md"
ALL_TARGETS = ("direct", "proxy", "pgbouncer", "haproxy")

APP_USER = "app"
APP_PASSWORD = "app-secret"
APP_DB = "app"
MONITOR_USER = "monitor"
MONITOR_PASSWORD = "monitor"

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 20.0  # seconds a started target gets to accept a real login
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Helpers: ports, binaries, processes
# --------------------------------------------------------------------------


def free_port() -> int:
    """A port the OS considers free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def find_binary(name: str, candidates: Sequence[str] = ()) -> str | None:
    for cand in candidates:
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which(name)


def find_pgbench(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = find_binary("pgbench", ["/usr/lib/postgresql/15/bin/pgbench"])
    if found is None:
        raise BenchError("pgbench not found (install postgresql-contrib or pass --pgbench)")
    return found


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def version_number(text: str) -> str:
    """The first dotted version number in ``text`` (``"?"`` if none)."""
    m = re.search(r"\d+\.\d+(?:\.\d+)?(?:[-+~][\w.+~-]*)?", text)
    return m.group(0) if m else "?"


def pg_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PGPASSWORD=APP_PASSWORD,
        PGUSER=APP_USER,
        PGDATABASE=APP_DB,
        PGCONNECT_TIMEOUT="5",
        PGSSLMODE="disable",
        PGAPPNAME="pgbench_compare",
    )
    return env


def tail(path: Path, lines: int = 30) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(content[-lines:]) or "(empty log)"


@dataclass
class Service:
    """A subprocess started by this script, in its own process group."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    logfile: Path
    version: str = "?"

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; log {self.logfile}:\n" + tail(self.logfile))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session=True: the group id is our child's pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT)


def spawn(
    name: str,
    port: int,
    cmd: Sequence[str],
    logfile: Path,
    *,
    cwd: Path | None = None,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> Service:
    log(f"starting {name} on {LOOPBACK}:{port}: {' '.join(cmd)}")
    kwargs: dict[str, Any] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env = dict(env if env is not None else os.environ)
        env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            **kwargs,
        )
    return Service(name=name, port=port, proc=proc, logfile=logfile)


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
    deadline = time.monotonic() + READY_TIMEOUT
    cmd = [pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER,
           "-S", "-n", "-c", "1", "-t", "1", APP_DB]  # fmt: skip
    last = ""
    while True:
        if svc is not None:
            svc.check_alive()
        try:
            out = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0:
                log(f"{name} accepts logins on port {port}")
                return
            last = (out.stderr or out.stdout).strip()
        except subprocess.TimeoutExpired:
            last = "login attempt timed out"
        if time.monotonic() > deadline:
            extra = f"\nlog {svc.logfile}:\n{tail(svc.logfile)}" if svc is not None else ""
            raise BenchError(
                f"{name} on port {port} did not accept a login within {READY_TIMEOUT:.0f} s: {last}{extra}"
            )
        time.sleep(0.3)


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


@dataclass
class Backend:
    host: str
    port: int
    instances: list[tuple[str, str, int]]  # (name, host, port), primary first


def proxy_config(backend: Backend, port: int, workers: int) -> str:
    lines = [
        "[server]",
        f"workers = {workers}",
        "",
        "[logging]",
        'format = "console"',
        'level = "warning"',
        "",
        "[[clusters]]",
        'name = "bench"',
        'protocol = "postgresql"',
        "",
        "[clusters.monitor]",
        f'user = "{MONITOR_USER}"',
        f'password = "{MONITOR_PASSWORD}"',
        "",
        "[[clusters.users]]",
        f'name = "{APP_USER}"',
        f'password = "{APP_PASSWORD}"',
        "",
    ]
    for name, host, iport in backend.instances:
        lines += [
            "[[clusters.instances]]",
            f'name = "{name}"',
            f'host = "{host}"',
            f"port = {iport}",
            "",
        ]
    lines += [
        "[[clusters.endpoints]]",
        'name = "writer"',
        f'listen = "{LOOPBACK}:{port}"',
        'kind = "writer"',
        "",
    ]
    return "\n".join(lines)


def start_proxy(tmp: Path, backend: Backend, workers: int) -> Service:
    port = free_port()
    cfg = tmp / "endpoint-proxy.toml"
    cfg.write_text(proxy_config(backend, port, workers))
    cfg.chmod(0o600)
    exe = REPO / ".venv" / "bin" / "endpoint-proxy"
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python) if os.access(venv_python, os.X_OK) else sys.executable
    if os.access(exe, os.X_OK):
        cmd = [str(exe)]
    elif (REPO / "endpoint_proxy" / "__main__.py").exists():
        cmd = [python, "-m", "endpoint_proxy"]
    else:  # not installed as a package: call the console script's entry point
        cmd = [python, "-c", "import sys; from endpoint_proxy.cli import main; sys.exit(main())"]
    cmd += ["run", "--config", str(cfg)]
    svc = spawn("endpoint_proxy", port, cmd, tmp / "endpoint-proxy.log", cwd=REPO)
    svc.version = git_revision()
    return svc


def start_pgbouncer(tmp: Path, backend: Backend, pool_size: int) -> Service:
    binary = find_binary("pgbouncer", ["/usr/sbin/pgbouncer"])
    if binary is None:
        raise BenchError("pgbouncer not found: run benchmarks/setup.sh")
    port = free_port()
    d = tmp / "pgbouncer"
    d.mkdir()
    (d / "userlist.txt").write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n')
    (d / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"{APP_DB} = host={backend.host} port={backend.port} dbname={APP_DB}",
                "",
                "[pgbouncer]",
                f"listen_addr = {LOOPBACK}",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = scram-sha-256",
                f"auth_file = {d / 'userlist.txt'}",
                "pool_mode = transaction",
                f"default_pool_size = {pool_size}",
                f"max_db_connections = {pool_size}",
                "max_client_conn = 500",
                "ignore_startup_parameters = extra_float_digits",
                f"logfile = {d / 'pgbouncer.log'}",
                f"pidfile = {d / 'pgbouncer.pid'}",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        )
    )
    user: str | None = None
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root: run it as postgres, owning its dir.
        user = "postgres"
        pw = pwd.getpwnam(user)
        tmp.chmod(0o711)  # traversable, not listable
        for p in [d, *d.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
    (d / "userlist.txt").chmod(0o600)
    svc = spawn("pgbouncer", port, [binary, str(d / "pgbouncer.ini")], d / "stdout.log", user=user)
    svc.version = version_number(first_line([binary, "--version"]))
    return svc


def start_haproxy(tmp: Path, backend: Backend) -> Service:
    binary = find_binary("haproxy", ["/usr/sbin/haproxy"])
    if binary is None:
        raise BenchError("haproxy not found: run benchmarks/setup.sh")
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        "\n".join(
            [
                "global",
                "    maxconn 1000",
                "",
                "defaults",
                "    mode tcp",
                "    timeout connect 5s",
                "    timeout client 1h",
                "    timeout server 1h",
                "",
                "frontend pg_front",
                f"    bind {LOOPBACK}:{port}",
                "    default_backend pg_primary",
                "",
                "backend pg_primary",
                f"    server primary {backend.host}:{backend.port} maxconn 1000",
                "",
            ]
        )
    )
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=10, check=False)
    if check.returncode != 0:
        raise BenchError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
    svc = spawn("haproxy", port, [binary, "-db", "-f", str(cfg)], tmp / "haproxy.log")
    svc.version = version_number(first_line([binary, "-v"]))
    return svc


# --------------------------------------------------------------------------
# Machine description, git, results
# --------------------------------------------------------------------------


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "(no git)"
    return rev + ("+dirty" if dirty else "")


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        ncpu = os.cpu_count() or 0
    return {
        "nproc": str(ncpu),
        "cpu": cpu,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def server_version(port: int) -> str:
    psql = find_binary("psql")
    if psql is None:
        return "?"
    try:
        out = subprocess.run(
            [psql, "-h", LOOPBACK, "-p", str(port), "-Atc", "SHOW server_version"],
            env=pg_env(), capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "?"
    return version_number(out.stdout)


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
        f"- Machine: nproc {machine['nproc']}, CPU {machine['cpu']}, RAM {machine['ram']}, "
        f"kernel {machine['kernel']}, Python {machine['python']}",
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


def append_results(path: Path, section: str) -> None:
    if not path.exists() or path.stat().st_size == 0:
        header = (
            "# Benchmark results\n\n"
            "Appended by `benchmarks/pgbench_compare.py --write-results`. The machine is "
            "shared: absolute numbers drift between runs; ratios within one run hold.\n\n"
        )
        path.write_text(header + section)
        return
    with path.open("a") as f:
        existing = path.read_text()
        f.write(("" if existing.endswith("\n\n") else "\n") + section)


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


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
    args = parse_args(argv)
    try:
        with terminate_as_interrupt():
            return run(args)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
