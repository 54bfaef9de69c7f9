"""Helpers shared by the benchmark scripts: ports, processes, the middlemen (endpoint_proxy,
PgBouncer, HAProxy) with their configs, machine description and RESULTS.md."""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "RESULTS.md"

APP_USER = "app"
APP_PASSWORD = "app-secret"
APP_DB = "app"
MONITOR_USER = "monitor"
MONITOR_PASSWORD = "monitor"

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 20.0  # seconds a started target gets to accept a real login
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Ports, binaries, versions
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


def pg_env(application_name: str) -> dict[str, str]:
    """Environment for libpq tools (psql, pgbench) logging in as the app user."""
    env = dict(os.environ)
    env.update(
        PGPASSWORD=APP_PASSWORD,
        PGUSER=APP_USER,
        PGDATABASE=APP_DB,
        PGCONNECT_TIMEOUT="5",
        PGSSLMODE="disable",
        PGAPPNAME=application_name,
    )
    return env


def server_version(port: int) -> str:
    """``SHOW server_version`` of the server on ``port`` (``"?"`` if psql is missing or fails)."""
    psql = find_binary("psql")
    if psql is None:
        return "?"
    try:
        out = subprocess.run(
            [psql, "-h", LOOPBACK, "-p", str(port), "-Atc", "SHOW server_version"],
            env=pg_env("benchmark"), capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "?"
    return version_number(out.stdout)


def tail(path: Path, lines: int = 30) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(content[-lines:]) or "(empty log)"


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


@dataclass
class Service:
    """A subprocess started by a benchmark, in its own process group.

    ``port`` is its (first) listening port; ``ports`` names every listening port when it
    has more than one (HAProxy frontends).
    """

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    logfile: Path
    version: str = "?"
    ports: dict[str, int] = field(default_factory=dict)

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


def run_main(parse_args: Callable[[Sequence[str] | None], Any], run: Callable[[Any], int],
             argv: Sequence[str] | None, also: tuple[type[Exception], ...] = ()) -> int:
    """A benchmark script's ``main``: its arguments, then ``run`` with SIGTERM/SIGHUP as Ctrl-C.
    A failed set-up step (BenchError; a cluster step's RuntimeError, TimeoutError or failed
    command; ``also``) exits 1 with its message, an interruption 130 (whatever was started is
    stopped by the script's own cleanup)."""
    args = parse_args(argv)
    setup_errors: tuple[type[Exception], ...] = (RuntimeError, TimeoutError, subprocess.CalledProcessError, *also)
    try:
        with terminate_as_interrupt():
            return run(args)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except setup_errors as exc:  # a cluster step failed
        log(f"error: {type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


def wait_for_login(svc: Service | None, port: int, name: str, attempt: Callable[[], str | None]) -> None:
    """Until ``attempt`` (a real login and query through ``port``: None when it worked, else why
    not) succeeds, bounded by READY_TIMEOUT; ``svc`` must stay alive meanwhile."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if svc is not None:
            svc.check_alive()
        last = attempt()
        if last is None:
            log(f"{name} accepts logins on port {port}")
            return
        if time.monotonic() > deadline:
            extra = f"\nlog {svc.logfile}:\n{tail(svc.logfile)}" if svc is not None else ""
            raise BenchError(
                f"{name} on port {port} did not accept a login within {READY_TIMEOUT:.0f} s: {last}{extra}"
            )
        time.sleep(0.3)


def pgbench_login(pgbench: str, port: int, env: Mapping[str, str]) -> str | None:
    """One ``pgbench -S`` transaction through ``port`` (for wait_for_login)."""
    cmd = [pgbench, "-h", LOOPBACK, "-p", str(port), "-U", APP_USER, "-S", "-n", "-c", "1", "-t", "1", APP_DB]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return "login attempt timed out"
    return None if out.returncode == 0 else (out.stderr or out.stdout).strip()


def mysql_login(connect: Callable[[], Any]) -> str | None:
    """``SELECT 1`` on a pymysql connection made by ``connect`` (for wait_for_login)."""
    import pymysql  # (only the MySQL benchmarks need it)

    try:
        conn = connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
        finally:
            conn.close()
    except pymysql.MySQLError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------
# endpoint_proxy
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyEndpoint:
    """One ``[[clusters.endpoints]]`` table; ``options`` are its other keys (``consistency =
    "session"``, ``session_wait_ms``, ``role``, ``instance``...)."""

    name: str
    port: int
    kind: str  # writer | reader | readwrite | custom | instance
    options: Mapping[str, str | int | bool] = field(default_factory=dict, hash=False)


def _toml_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proxy_config(
    instances: Sequence[tuple[str, str, int]],
    endpoints: Sequence[ProxyEndpoint],
    *,
    workers: int = 1,
    log_format: str = "console",
    log_level: str = "warning",
    cluster_settings: Mapping[str, str | int | bool] | None = None,
    protocol: str = "postgresql",
    admin_port: int | None = None,
) -> str:
    """The TOML config of one ``bench`` cluster with users app and monitor.

    ``instances`` are (name, host, port); ``cluster_settings`` are extra keys of the
    ``[[clusters]]`` table (``health_check_interval_ms = 250`` and the like); ``protocol`` is
    ``"postgresql"`` or ``"mysql"``; ``admin_port`` turns on the admin HTTP server on the loopback.
    """
    lines = [
        "[server]",
        f"workers = {workers}",
        "",
        "[logging]",
        f"format = {_toml_value(log_format)}",
        f"level = {_toml_value(log_level)}",
        "",
    ]
    if admin_port is not None:
        lines += ["[admin]", f'listen = "{LOOPBACK}:{admin_port}"', ""]
    lines += [
        "[[clusters]]",
        'name = "bench"',
        f"protocol = {_toml_value(protocol)}",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in (cluster_settings or {}).items()]
    lines += [
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
    for name, host, iport in instances:
        lines += [
            "[[clusters.instances]]",
            f'name = "{name}"',
            f'host = "{host}"',
            f"port = {iport}",
            "",
        ]
    for ep in endpoints:
        lines += [
            "[[clusters.endpoints]]",
            f"name = {_toml_value(ep.name)}",
            f'listen = "{LOOPBACK}:{ep.port}"',
            f"kind = {_toml_value(ep.kind)}",
            *(f"{key} = {_toml_value(value)}" for key, value in ep.options.items()),
            "",
        ]
    return "\n".join(lines)


def proxy_command() -> list[str]:
    """How to start the proxy from this checkout: the venv's console script if installed."""
    exe = REPO / ".venv" / "bin" / "endpoint-proxy"
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python) if os.access(venv_python, os.X_OK) else sys.executable
    if os.access(exe, os.X_OK):
        return [str(exe)]
    if (REPO / "endpoint_proxy" / "__main__.py").exists():
        return [python, "-m", "endpoint_proxy"]
    # not installed as a package: call the console script's entry point
    return [python, "-c", "import sys; from endpoint_proxy.cli import main; sys.exit(main())"]


def start_proxy(tmp: Path, config_text: str, port: int, *, name: str = "endpoint_proxy") -> Service:
    """Write ``config_text`` to ``tmp/endpoint-proxy.toml`` and run the proxy on it; its
    stdout and stderr go to ``tmp/endpoint-proxy.log``."""
    cfg = tmp / "endpoint-proxy.toml"
    cfg.write_text(config_text)
    cfg.chmod(0o600)
    cmd = [*proxy_command(), "run", "--config", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    svc = spawn(name, port, cmd, tmp / "endpoint-proxy.log", cwd=REPO, env=env)
    svc.version = git_revision()
    return svc


# --------------------------------------------------------------------------
# PgBouncer and HAProxy
# --------------------------------------------------------------------------


def pgbouncer_binary() -> str:
    """``$PGBOUNCER`` if set (a PgBouncer built elsewhere, e.g. by ``setup.sh --pgbouncer-source``),
    else the one ``setup.sh --pgbouncer-source`` built in ``benchmarks/.pgbouncer``, else Debian's."""
    explicit = os.environ.get("PGBOUNCER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BenchError(f"PGBOUNCER={explicit} is not an executable file")
        return explicit
    built = REPO / "benchmarks" / ".pgbouncer" / "bin" / "pgbouncer"
    binary = find_binary("pgbouncer", [str(built), "/usr/sbin/pgbouncer"])
    if binary is None:
        raise BenchError("pgbouncer not found: run benchmarks/setup.sh")
    return binary


def pgbouncer_supports_prepared(version: str) -> bool:
    """PgBouncer 1.21 brought ``max_prepared_statements`` (named prepared statements in
    transaction mode)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (1, 21)


def start_pgbouncer(
    tmp: Path,
    databases: Mapping[str, tuple[str, int]],
    *,
    pool_mode: str,
    pool_size: int,
    max_client_conn: int = 500,
    max_prepared_statements: int = 0,
) -> Service:
    """PgBouncer on a free port, one ``[databases]`` entry per item of ``databases``
    (client-side name -> server host, port; the server database is always ``app``).
    Config, auth file, log and pidfile live in ``tmp/pgbouncer``. ``max_prepared_statements``
    (PgBouncer 1.21 and newer) is written only when not 0."""
    binary = pgbouncer_binary()
    port = free_port()
    d = tmp / "pgbouncer"
    d.mkdir()
    (d / "userlist.txt").write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n')
    db_lines = [f"{alias} = host={host} port={dport} dbname={APP_DB}" for alias, (host, dport) in databases.items()]
    (d / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                *db_lines,
                "",
                "[pgbouncer]",
                f"listen_addr = {LOOPBACK}",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = scram-sha-256",
                f"auth_file = {d / 'userlist.txt'}",
                f"pool_mode = {pool_mode}",
                f"default_pool_size = {pool_size}",
                f"max_db_connections = {pool_size}",
                f"max_client_conn = {max_client_conn}",
                "ignore_startup_parameters = extra_float_digits",
                f"logfile = {d / 'pgbouncer.log'}",
                f"pidfile = {d / 'pgbouncer.pid'}",
                "log_connections = 0",
                "log_disconnections = 0",
                *([f"max_prepared_statements = {max_prepared_statements}"] if max_prepared_statements else []),
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
    svc.ports = {alias: port for alias in databases}
    return svc


def start_haproxy(tmp: Path, frontends: Mapping[str, tuple[str, int]]) -> Service:
    """HAProxy in tcp mode with one frontend on a free port per item of ``frontends``
    (name -> server host, port), each with one backend server and no health checks."""
    binary = find_binary("haproxy", ["/usr/sbin/haproxy"])
    if binary is None:
        raise BenchError("haproxy not found: run benchmarks/setup.sh")
    ports = {name: free_port() for name in frontends}
    lines = [
        "global",
        "    maxconn 1000",
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        "",
    ]
    for name, (host, port) in frontends.items():
        lines += [
            f"frontend {name}_front",
            f"    bind {LOOPBACK}:{ports[name]}",
            f"    default_backend {name}_back",
            "",
            f"backend {name}_back",
            f"    server {name} {host}:{port} maxconn 1000",
            "",
        ]
    cfg = tmp / "haproxy.cfg"
    cfg.write_text("\n".join(lines))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=10, check=False)
    if check.returncode != 0:
        raise BenchError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
    first = next(iter(ports.values()))
    svc = spawn("haproxy", first, [binary, "-db", "-f", str(cfg)], tmp / "haproxy.log")
    svc.version = version_number(first_line([binary, "-v"]))
    svc.ports = ports
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


def machine_line(machine: Mapping[str, str]) -> str:
    return (
        f"nproc {machine['nproc']}, CPU {machine['cpu']}, RAM {machine['ram']}, "
        f"kernel {machine['kernel']}, Python {machine['python']}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i >= text_columns else c.ljust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths, strict=True))) + " |"  # fmt: skip

    sep = "|" + "|".join(("-" * (w + 2)) if i < text_columns else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|"  # fmt: skip
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def append_results(path: Path, section: str) -> None:
    """Append ``section`` to the results file, creating it with a header if needed."""
    if not path.exists() or path.stat().st_size == 0:
        header = (
            "# Benchmark results\n\n"
            "Appended by the `--write-results` option of the scripts in `benchmarks/`. The machine is "
            "shared: absolute numbers drift between runs; ratios within one run hold.\n\n"
        )
        path.write_text(header + section)
        return
    existing = path.read_text()
    with path.open("a") as f:
        f.write(("" if existing.endswith("\n\n") else "\n") + section)


# --------------------------------------------------------------------------
# The proxy's admin HTTP server
# --------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, frozenset[tuple[str, str]]]  # (metric name, labels)


def fetch_metrics(port: int, timeout: float = 5.0) -> dict[Sample, float]:
    """The samples of the proxy's ``GET /metrics`` on the admin port (Prometheus text format)."""
    url = f"http://{LOOPBACK}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError as exc:
        raise BenchError(f"could not read {url}: {exc}") from exc
    samples: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            continue
        labels = frozenset(_LABEL_RE.findall(m.group(2) or ""))
        try:
            samples[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return samples


def metric_value(samples: Mapping[Sample, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
