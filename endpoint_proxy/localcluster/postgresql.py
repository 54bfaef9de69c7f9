"""A throwaway local PostgreSQL cluster (one primary, N streaming replicas) on free ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ._base import LocalClusterBase
from ._proc import _alive, _free_ports, _port_accepts, _signal, _wait_until
from .certs import self_signed_pem

__all__ = [
    "PgCommandError",
    "PgInstance",
    "PostgresCluster",
    "postgres_bin_dir",
]

HOST = "127.0.0.1"
SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
PROMOTION_USER = "promoter"  # what the proxy's SQL promotion logs in as
PROMOTION_PASSWORD = "promoter-secret"
_OS_USER = "postgres"  # the OS account servers run under when we are root
_CONF_FILE = "endpoint_proxy.conf"  # included from postgresql.conf; rewritten per instance
_SHUTDOWN_MODES = ("smart", "fast", "immediate")


class PgCommandError(subprocess.CalledProcessError):
    """A PostgreSQL client or server command failed; the message carries its stderr."""

    def __str__(self) -> str:
        cmd = " ".join(str(a) for a in self.cmd) if isinstance(self.cmd, list) else str(self.cmd)
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else ""
        return f"command {cmd!r} exited with status {self.returncode}: {err or '(no stderr)'}"


def postgres_bin_dir() -> Path:
    """The directory holding initdb/pg_ctl/postgres: $ENDPOINT_PROXY_PG_BIN, else the newest
    /usr/lib/postgresql/<version>/bin."""
    override = os.environ.get("ENDPOINT_PROXY_PG_BIN")
    if override:
        path = Path(override)
        if not (path / "postgres").is_file():
            raise RuntimeError(f"ENDPOINT_PROXY_PG_BIN={override!r} has no 'postgres' binary")
        return path
    found: list[tuple[tuple[int, ...], Path]] = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for entry in root.iterdir():
            if not (entry / "bin" / "postgres").is_file():
                continue
            try:
                version = tuple(int(p) for p in entry.name.split("."))
            except ValueError:
                continue
            found.append((version, entry / "bin"))
    if not found:
        raise RuntimeError(
            "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin; "
            "install them or set ENDPOINT_PROXY_PG_BIN"
        )
    return max(found)[1]


@dataclass
class PgInstance:
    """One server of the local cluster."""

    name: str
    host: str
    port: int
    data_dir: Path
    socket_dir: Path = field(default=Path(), repr=False)
    log_file: Path = field(default=Path(), repr=False)

    def pid(self) -> int | None:
        """The postmaster's pid, from postmaster.pid; None if the server is not running."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            pid = int(first)
        except (OSError, ValueError):
            return None
        if not _alive(pid):
            return None
        # A stale postmaster.pid may name a recycled pid: make sure it is our postmaster.
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = None
        if cwd is not None:
            return pid if Path(cwd) == self.data_dir.resolve() else None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm.startswith("postgres") else None


def _child_pids(ppid: int) -> list[int]:
    children: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 1 and rest[1] == str(ppid):
            children.append(int(entry.name))
    return children


def _conf_value(value: str) -> str:
    """Quote a postgresql.conf value unless the caller already quoted it."""
    if value.startswith("'"):
        return value
    return "'" + value.replace("'", "''") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PostgresCluster(LocalClusterBase[PgInstance]):
    """A PostgreSQL primary (``pg0``) and ``replicas`` streaming replicas (``pg1``...) in a
    temporary directory, listening on free loopback ports.

    Synchronous and subprocess based; usable as a context manager. When run as root the
    servers and client tools run as the ``postgres`` OS user (via ``runuser``).
    """

    def __init__(
        self,
        replicas: int = 2,
        *,
        base_dir: str | Path | None = None,
        database: str = "app",
        app_user: str = "app",
        app_password: str = "app-secret",
        monitor_user: str = "monitor",
        monitor_password: str = "monitor",
        extra_conf: dict[str, str] | None = None,
        replica_conf: dict[str, str] | None = None,
        ssl: bool = False,
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.replicas = replicas
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.database = database
        self.app_user = app_user
        self.app_password = app_password
        self.monitor_user = monitor_user
        self.monitor_password = monitor_password
        # The proxy's [clusters.promotion] method = "sql" user: promote, reload, ALTER SYSTEM
        # of primary_conninfo and default_transaction_read_only (PostgreSQL 15 grants; a
        # superuser before 15).
        self.promotion_user = PROMOTION_USER
        self.promotion_password = PROMOTION_PASSWORD
        self.extra_conf = dict(extra_conf or {})
        self.replica_conf = dict(replica_conf or {})
        self.ssl = ssl
        self.bin_dir = postgres_bin_dir()
        self.instances: list[PgInstance] = []
        self.primary_name = "pg0"
        self.root_dir: Path | None = None
        self._created_root = False
        self._as_root = os.geteuid() == 0
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._env.update(LC_ALL="C", PGCLIENTENCODING="UTF8", PGCONNECT_TIMEOUT="10")

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def start(self) -> None:
        """Create, configure and start the primary and the replicas; return once every
        replica streams from the primary."""
        if self.root_dir is not None:
            raise RuntimeError("cluster already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        root = self._make_root()
        ports = _free_ports(self.replicas + 1)
        self.instances = []
        for i, port in enumerate(ports):
            inst_dir = root / f"pg{i}"
            inst_dir.mkdir()
            self._chown(inst_dir)
            self.instances.append(
                PgInstance(
                    name=f"pg{i}",
                    host=HOST,
                    port=port,
                    data_dir=inst_dir / "data",
                    socket_dir=inst_dir,
                    log_file=inst_dir / "postgresql.log",
                )
            )
        self.primary_name = "pg0"
        if self.ssl:
            self._make_certificate(root / "ssl")

        primary = self.instances[0]
        self._run(
            [
                self._bin("initdb"),
                "-D", str(primary.data_dir),
                "-U", SUPERUSER,
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )  # fmt: skip
        with (primary.data_dir / "postgresql.conf").open("a") as f:
            f.write(f"\n# endpoint_proxy local cluster settings\ninclude '{_CONF_FILE}'\n")
        self._write(primary.data_dir / "pg_hba.conf", self._hba())
        self._write_instance_conf(primary, replica=False)
        self._start_fresh(primary)
        self._bootstrap_sql(primary)

        replicas = self.instances[1:]
        if not replicas:
            return
        self._run_many(
            [
                [
                    self._bin("pg_basebackup"),
                    "-h", HOST,
                    "-p", str(primary.port),
                    "-U", REPLICATION_USER,
                    "-D", str(r.data_dir),
                    "-c", "fast",
                    "-X", "stream",
                    "-R",
                    "--no-sync",
                ]
                for r in replicas
            ],
            timeout=120,
        )  # fmt: skip
        for r in replicas:
            self._write_instance_conf(r, replica=True)
            self._set_primary_conninfo(r, primary)
        self._start_fresh_many(replicas)
        self.wait_streaming(*(r.name for r in replicas), primary=primary.name, timeout=30)

    def stop(self) -> None:
        """Stop every server (fast shutdown, SIGKILL if stuck) and delete the directory.
        Idempotent; never raises because a server is already gone."""
        running: list[tuple[PgInstance, int]] = []
        for inst in self.instances:
            pid = inst.pid()
            if pid is None:
                continue
            self._signal_tree(pid, signal.SIGCONT)
            _signal(pid, signal.SIGINT)  # fast shutdown
            running.append((inst, pid))
        deadline = time.monotonic() + 15
        for _inst, pid in running:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                try:
                    self._kill_tree(pid)
                except TimeoutError:
                    pass  # unkillable (uninterruptible sleep): nothing more we can do
        self._remove_root()

    # ----------------------------------------------------------------- accessors

    @property
    def ssl_cert(self) -> Path:
        """The server certificate (self-signed, so also the CA a client should trust)."""
        return self._ssl_dir() / "server.crt"

    @property
    def ssl_key(self) -> Path:
        return self._ssl_dir() / "server.key"

    def _ssl_dir(self) -> Path:
        if not self.ssl:
            raise RuntimeError("cluster was created with ssl=False")
        if self.root_dir is None:
            raise RuntimeError("cluster not started")
        return self.root_dir / "ssl"

    def dsn(
        self,
        name: str,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
    ) -> str:
        """A TCP libpq URI for an instance; defaults to the app user, its password and the app
        database. The password of the app and monitor users is filled in when not given."""
        inst = self.instance(name)
        user = user or self.app_user
        if password is None:
            password = {
                self.app_user: self.app_password,
                self.monitor_user: self.monitor_password,
                self.promotion_user: self.promotion_password,
            }.get(user)
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        db = quote(database or self.database, safe="")
        return f"postgresql://{auth}@{inst.host}:{inst.port}/{db}"

    def sql(
        self,
        name: str,
        query: str,
        *,
        user: str | None = None,
        database: str | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Run ``query`` with ``psql -At`` over the instance's unix socket (trust auth) as the
        superuser or ``user``, in ``database`` (default: the app database); return stdout
        stripped. Raises PgCommandError (with stderr) on failure, TimeoutError if it hangs."""
        inst = self.instance(name)
        argv = [
            self._bin("psql"),
            "-X", "-A", "-t", "-q",
            "-v", "ON_ERROR_STOP=1",
            "-h", str(inst.socket_dir),
            "-p", str(inst.port),
            "-U", user or SUPERUSER,
            "-d", database or self.database,
            "-c", query,
        ]  # fmt: skip
        return self._run(argv, timeout=timeout).stdout.strip()

    # ----------------------------------------------------------------- faults

    def kill(self, name: str) -> None:
        """SIGKILL the postmaster and all its children (a crash); return once the port refuses
        connections."""
        inst = self.instance(name)
        pid = inst.pid()
        if pid is not None:
            self._kill_tree(pid)
        _wait_until(
            lambda: not _port_accepts(inst.port),
            10,
            lambda: f"{name}: port {inst.port} still accepts connections after SIGKILL",
        )

    def sigstop(self, name: str) -> None:
        """SIGSTOP the postmaster and all its children (a hung server)."""
        self._signal_tree(self._running_pid(name), signal.SIGSTOP)

    def sigcont(self, name: str) -> None:
        self._signal_tree(self._running_pid(name), signal.SIGCONT)

    def stop_instance(self, name: str, mode: str = "fast") -> None:
        """Shut one server down with ``pg_ctl stop -m MODE``; SIGKILL it if that fails."""
        if mode not in _SHUTDOWN_MODES:
            raise ValueError(f"mode must be one of {_SHUTDOWN_MODES}, not {mode!r}")
        inst = self.instance(name)
        pid = inst.pid()
        if pid is None:
            return
        self._signal_tree(pid, signal.SIGCONT)
        try:
            self._run(
                [
                    self._bin("pg_ctl"),
                    "stop",
                    "-D",
                    str(inst.data_dir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "30",
                ],
                timeout=40,
            )
        except (PgCommandError, TimeoutError):
            self.kill(name)

    def restart(self, name: str) -> None:
        """Start a killed or stopped server again on its data directory (stopping it first if
        it runs); return once it accepts connections."""
        inst = self.instance(name)
        if inst.pid() is not None:
            self.stop_instance(name)
        self._pg_ctl_start(inst)

    def promote(self, name: str) -> None:
        """Promote a replica and wait until it is out of recovery; it becomes primary_name."""
        inst = self.instance(name)
        self._run(
            [self._bin("pg_ctl"), "promote", "-D", str(inst.data_dir), "-w", "-t", "30"],
            timeout=40,
        )
        _wait_until(
            lambda: self._in_recovery(inst) is False,
            30,
            lambda: f"{name} still in recovery after promotion\n{self._log_tail(inst)}",
        )
        self.primary_name = name

    def primary_changed(self, name: str) -> None:
        """Record that ``name`` became the primary by other means (a switchover through the proxy)."""
        self.primary_name = self.instance(name).name

    def follow(self, replica: str, new_primary: str) -> None:
        """Make ``replica`` stream from ``new_primary`` (following timeline switches).

        A running standby gets ALTER SYSTEM + reload; a stopped server, a server that is not a
        standby (an old primary) or one that does not reconnect in time is restarted as a
        standby. A server whose WAL went past the new primary's fork point cannot follow it
        (no pg_rewind: full_page_writes is off): TimeoutError with its log.
        """
        r = self.instance(replica)
        p = self.instance(new_primary)
        if r is p:
            raise ValueError("an instance cannot follow itself")
        conninfo = self._conninfo(p, r.name)
        self._write_instance_conf(r, replica=True)
        if r.pid() is not None and self._in_recovery(r):
            self.sql(
                r.name,
                f"ALTER SYSTEM SET primary_conninfo = {_sql_literal(conninfo)}",
                database="postgres",
            )
            self.sql(r.name, "SELECT pg_reload_conf()", database="postgres")
            try:
                self.wait_streaming(r.name, primary=p.name, timeout=10)
                return
            except TimeoutError:
                pass
        if r.pid() is not None:
            self.stop_instance(r.name)
        self._set_primary_conninfo(r, p)
        self._write(r.data_dir / "standby.signal", "")
        self._pg_ctl_start(r)
        self.wait_streaming(r.name, primary=p.name, timeout=30)

    # ----------------------------------------------------------------- waiting

    def wait_streaming(self, *replicas: str, primary: str | None = None, timeout: float = 30.0) -> None:
        """Wait until pg_stat_replication on ``primary`` (default: the current primary) shows
        each replica (by application_name = instance name) in state 'streaming'."""
        p = self.instance(primary or self.primary_name)
        wanted = set(replicas)
        seen: set[str] = set()

        def ready() -> bool:
            nonlocal seen
            try:
                out = self.sql(
                    p.name,
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                    database="postgres",
                    timeout=10,
                )
            except (PgCommandError, TimeoutError):
                return False
            seen = set(out.split())
            return wanted <= seen

        def describe() -> str:
            missing = sorted(wanted - seen)
            logs = "\n".join(self._log_tail(self.instance(m)) for m in missing)
            return (
                f"replicas {missing} not streaming from {p.name} after {timeout}s (streaming: {sorted(seen)})\n{logs}"
            )

        _wait_until(ready, timeout, describe, interval=0.05)

    def wait_caught_up(self, *replicas: str, timeout: float = 10.0) -> None:
        """Wait until each replica (default: all but the primary) has replayed the primary's
        current WAL position."""
        names = replicas or tuple(i.name for i in self.instances if i.name != self.primary_name)
        lsn = self.sql(self.primary_name, "SELECT pg_current_wal_lsn()", database="postgres")
        for name in names:
            query = f"SELECT pg_last_wal_replay_lsn() >= {_sql_literal(lsn)}::pg_lsn"

            def caught_up(name: str = name, query: str = query) -> bool:
                try:
                    return self.sql(name, query, database="postgres", timeout=10) == "t"
                except (PgCommandError, TimeoutError):
                    return False

            def describe(name: str = name) -> str:
                return f"{name} has not replayed up to {lsn} within {timeout}s"

            _wait_until(caught_up, timeout, describe)

    # ----------------------------------------------------------------- internals

    def _bin(self, tool: str) -> str:
        return str(self.bin_dir / tool)

    def _make_root(self) -> Path:
        if self.base_dir is None:
            root = Path(tempfile.mkdtemp(prefix="ep-pg-"))
            self._created_root = True
        else:
            root = self.base_dir.absolute()
            if root.exists():
                if any(root.iterdir()):
                    raise RuntimeError(f"base_dir {root} is not empty")
                self._created_root = False
            else:
                root.mkdir(parents=True)
                self._created_root = True
        self.root_dir = root
        # unix socket paths are limited to 107 bytes: <root>/pgN/.s.PGSQL.NNNNN
        if len(str(root)) > 80:
            raise RuntimeError(f"cluster directory path too long for unix sockets: {root}")
        if self._created_root:
            os.chmod(root, 0o700)
            self._chown(root)
        return root

    def _chown(self, path: Path) -> None:
        if self._as_root:
            shutil.chown(path, user=_OS_USER, group=_OS_USER)

    def _write(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        os.chmod(path, mode)
        self._chown(path)

    def _command(self, argv: Sequence[str]) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", _OS_USER, "--", *argv]
        return list(argv)

    def _spawn(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self._command(argv),
            cwd=self.root_dir or "/",
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def _finish(
        self, proc: subprocess.Popen[str], argv: Sequence[str], deadline: float
    ) -> subprocess.CompletedProcess[str]:
        try:
            out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise TimeoutError(f"command did not finish in time: {' '.join(argv)}") from None
        if proc.returncode != 0:
            raise PgCommandError(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def _run(self, argv: Sequence[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self._finish(self._spawn(argv), argv, time.monotonic() + timeout)

    def _run_many(self, argvs: Iterable[Sequence[str]], *, timeout: float = 60.0) -> None:
        """Run commands concurrently; raise the first failure after all have finished."""
        deadline = time.monotonic() + timeout
        procs = [(argv, self._spawn(argv)) for argv in argvs]
        error: BaseException | None = None
        for argv, proc in procs:
            try:
                self._finish(proc, argv, deadline)
            except (PgCommandError, TimeoutError) as exc:
                error = error or exc
        if error is not None:
            raise error

    def _hba(self) -> str:
        return (
            "# TYPE  DATABASE     USER        ADDRESS        METHOD\n"
            "local   all          all                        trust\n"
            "local   replication  all                        trust\n"
            f"host    replication  {REPLICATION_USER}  127.0.0.1/32   trust\n"
            f"host    replication  {REPLICATION_USER}  ::1/128        trust\n"
            "host    all          all         127.0.0.1/32   scram-sha-256\n"
            "host    all          all         ::1/128        scram-sha-256\n"
        )

    def _write_instance_conf(self, inst: PgInstance, *, replica: bool) -> None:
        settings: dict[str, str] = {
            "listen_addresses": HOST,
            "port": str(inst.port),
            "unix_socket_directories": str(inst.socket_dir),
            "unix_socket_permissions": "0777",
            "cluster_name": inst.name,
            "password_encryption": "scram-sha-256",
            "max_connections": "300",
            "shared_buffers": "32MB",
            "huge_pages": "off",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "wal_keep_size": "256MB",
            "max_wal_size": "1GB",
            "checkpoint_timeout": "30min",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            # Asynchronous commits reach replicas only once the WAL writer flushes them.
            "wal_writer_delay": "10ms",
            "wal_receiver_status_interval": "1s",
            "wal_retrieve_retry_interval": "200ms",
            "wal_sender_timeout": "10s",
            "wal_receiver_timeout": "10s",
            "recovery_target_timeline": "latest",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%a ",
        }
        if self.ssl and self.root_dir is not None:
            settings["ssl"] = "on"
            settings["ssl_cert_file"] = str(self.root_dir / "ssl" / "server.crt")
            settings["ssl_key_file"] = str(self.root_dir / "ssl" / "server.key")
        settings.update(self.extra_conf)
        if replica:
            settings.update(self.replica_conf)
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())
        self._write(inst.data_dir / _CONF_FILE, text)

    def _conninfo(self, primary: PgInstance, application_name: str) -> str:
        return f"host={primary.host} port={primary.port} user={REPLICATION_USER} application_name={application_name}"

    def _set_primary_conninfo(self, inst: PgInstance, primary: PgInstance) -> None:
        """Point a stopped server's postgresql.auto.conf at ``primary``."""
        auto = inst.data_dir / "postgresql.auto.conf"
        try:
            lines = auto.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        lines = [ln for ln in lines if not re.match(r"\s*primary_conninfo\s*=", ln)]
        lines.append(f"primary_conninfo = {_conf_value(self._conninfo(primary, inst.name))}")
        self._write(auto, "\n".join(lines) + "\n")

    def _bootstrap_sql(self, primary: PgInstance) -> None:
        app, mon, db = (
            _sql_ident(self.app_user),
            _sql_ident(self.monitor_user),
            _sql_ident(self.database),
        )
        statements = [
            f"CREATE ROLE {_sql_ident(REPLICATION_USER)} WITH LOGIN REPLICATION",
            f"CREATE ROLE {app} WITH LOGIN PASSWORD {_sql_literal(self.app_password)}",
            f"CREATE ROLE {mon} WITH LOGIN PASSWORD {_sql_literal(self.monitor_password)}",
            f"GRANT pg_monitor TO {mon}",
            *self._promotion_role_sql(),
            f"GRANT CONNECT ON DATABASE postgres TO {app}, {mon}",
        ]
        if self.database != "postgres":
            statements.append(f"CREATE DATABASE {db} OWNER {app}")
        argv = [
            self._bin("psql"),
            "-X", "-q",
            "-v", "ON_ERROR_STOP=1",
            "-h", str(primary.socket_dir),
            "-p", str(primary.port),
            "-U", SUPERUSER,
            "-d", "postgres",
        ]  # fmt: skip
        for statement in statements:
            argv += ["-c", statement]
        self._run(argv, timeout=60)

    def _promotion_role_sql(self) -> list[str]:
        role = _sql_ident(self.promotion_user)
        grants = (
            f"GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO {role}; "
            f"GRANT EXECUTE ON FUNCTION pg_reload_conf() TO {role}; "
            f"GRANT ALTER SYSTEM ON PARAMETER primary_conninfo, default_transaction_read_only TO {role}"
        )
        # GRANT ALTER SYSTEM ON PARAMETER is new in PostgreSQL 15; before it, a superuser.
        branch = (
            "DO $$ BEGIN IF current_setting('server_version_num')::int >= 150000 "
            f"THEN EXECUTE {_sql_literal(grants)}; ELSE EXECUTE {_sql_literal(f'ALTER ROLE {role} SUPERUSER')}; "
            "END IF; END $$"
        )
        return [
            f"CREATE ROLE {role} WITH LOGIN PASSWORD {_sql_literal(self.promotion_password)}",
            f"GRANT pg_monitor TO {role}",
            f"GRANT CONNECT ON DATABASE postgres TO {role}",
            branch,
        ]

    def _pg_ctl_start_argv(self, inst: PgInstance) -> list[str]:
        return [
            self._bin("pg_ctl"), "start",
            "-D", str(inst.data_dir),
            "-l", str(inst.log_file),
            "-w", "-t", "60", "-s",
        ]  # fmt: skip

    def _pg_ctl_start(self, inst: PgInstance) -> None:
        self._remove_stale_lock_files(inst)
        try:
            self._run(self._pg_ctl_start_argv(inst), timeout=70)
        except (PgCommandError, TimeoutError) as exc:
            raise RuntimeError(f"{inst.name} failed to start: {exc}\n{self._log_tail(inst)}") from exc

    def _start_fresh(self, inst: PgInstance) -> None:
        self._start_fresh_many([inst])

    def _start_fresh_many(self, insts: list[PgInstance]) -> None:
        """Start new servers concurrently; one that lost its port to another process in the
        meantime gets a new port and another try."""
        pending = list(insts)
        for attempt in range(3):
            offsets = {i.name: self._log_size(i) for i in pending}
            procs = [(i, self._spawn(self._pg_ctl_start_argv(i))) for i in pending]
            deadline = time.monotonic() + 70
            failed: list[tuple[PgInstance, BaseException]] = []
            for inst, proc in procs:
                try:
                    self._finish(proc, self._pg_ctl_start_argv(inst), deadline)
                except (PgCommandError, TimeoutError) as exc:
                    failed.append((inst, exc))
            if not failed:
                return
            retry: list[PgInstance] = []
            for inst, error in failed:
                fresh_log = self._log_text(inst)[offsets[inst.name] :]
                if attempt < 2 and "could not bind" in fresh_log and inst.pid() is None:
                    inst.port = _free_ports(1)[0]
                    self._write_instance_conf(inst, replica=inst.name != "pg0")
                    retry.append(inst)
                else:
                    raise RuntimeError(f"{inst.name} failed to start: {error}\n{self._log_tail(inst)}") from error
            pending = retry

    @staticmethod
    def _remove_stale_lock_files(inst: PgInstance) -> None:
        """Drop postmaster.pid and the socket lock file of a dead server. The server's own
        stale-lock check uses kill(pid, 0), which succeeds on a zombie: a SIGKILLed postmaster
        re-parented to a lazily reaping init would otherwise block the restart."""
        if inst.pid() is not None:
            return
        (inst.data_dir / "postmaster.pid").unlink(missing_ok=True)
        (inst.socket_dir / f".s.PGSQL.{inst.port}.lock").unlink(missing_ok=True)

    def _in_recovery(self, inst: PgInstance) -> bool | None:
        try:
            out = self.sql(inst.name, "SELECT pg_is_in_recovery()", database="postgres", timeout=10)
        except (PgCommandError, TimeoutError):
            return None
        return {"t": True, "f": False}.get(out)

    @staticmethod
    def _signal_tree(pid: int, sig: signal.Signals) -> None:
        if sig == signal.SIGCONT:
            for child in _child_pids(pid):
                _signal(child, sig)
            _signal(pid, sig)
            return
        # Stop the postmaster first so that it cannot fork while we signal its children.
        _signal(pid, signal.SIGSTOP)
        for child in _child_pids(pid):
            _signal(child, sig)
        _signal(pid, sig)

    def _kill_tree(self, pid: int) -> None:
        _signal(pid, signal.SIGSTOP)
        victims = [pid, *_child_pids(pid)]
        for victim in victims:
            _signal(victim, signal.SIGKILL)
        _wait_until(
            lambda: not any(_alive(v) for v in victims),
            10,
            lambda: f"processes {[v for v in victims if _alive(v)]} survived SIGKILL",
            interval=0.01,
        )

    def _make_certificate(self, ssl_dir: Path) -> None:
        ssl_dir.mkdir()
        os.chmod(ssl_dir, 0o755)
        self._chown(ssl_dir)
        cert_pem, key_pem = self_signed_pem()
        self._write(ssl_dir / "server.crt", cert_pem, 0o644)
        self._write(ssl_dir / "server.key", key_pem, 0o600)
