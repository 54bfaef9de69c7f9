"""A throwaway local MariaDB cluster (one primary, N GTID replicas) on free ports.

Replication is GTID based (domain 0, ``gtid_strict_mode=1``, ``log_slave_updates`` on every
server, so every server's binlog holds every transaction). All servers start from fresh,
empty installs; the users and the app database are created on the primary only and reach the
replicas through replication, which each replica follows with ``MASTER_USE_GTID=slave_pos``
from an empty position. Replicas run with ``read_only=1``; the app user gets error 1290 there,
but root (which has READ_ONLY ADMIN) could still write, and any write made directly on a
replica gets a local GTID that strict mode then refuses to reconcile: don't. ``promote``
lets the SQL thread apply what was already received, then ``STOP SLAVE; RESET SLAVE ALL;
SET GLOBAL read_only=0``: the new primary continues the same domain with its own server id.
``follow`` re-points a server with ``MASTER_USE_GTID=slave_pos``; a server that is not
configured as a replica (an old primary) first takes its ``gtid_binlog_pos`` as its slave
position, so it can rejoin only if the new primary's binlog already holds every transaction
it wrote (strict mode refuses otherwise: error 1236). A restarted server keeps its role: an old
primary comes back writable (split brain, as in real life), a replica resumes replicating.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._base import LocalClusterBase
from ._proc import _alive, _free_ports, _port_accepts, _proc_state, _signal, _wait_until

__all__ = [
    "MariaDBCluster",
    "MyCommandError",
    "MyInstance",
    "mariadb_bin",
]

HOST = "127.0.0.1"
ROOT_USER = "root"
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "replicator-secret"
PROMOTION_USER = "promoter"  # what the proxy's SQL promotion logs in as
PROMOTION_PASSWORD = "promoter-secret"
# read_only, STOP/CHANGE MASTER and gtid_slave_pos, SHOW SLAVE STATUS, the binlog position, and
# RESET SLAVE ALL (which wants RELOAD).
PROMOTION_GRANTS = "READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, SLAVE MONITOR, BINLOG MONITOR, REPLICATION CLIENT, RELOAD"
_USER_HOSTS = ("%", "127.0.0.1", "localhost")
_SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/usr/local/mysql/bin")
_ERRNO_RE = re.compile(r"^ERROR (\d+)", re.MULTILINE)
_VERTICAL_RE = re.compile(r"^\s*(\w+):(?: (.*))?$")
_BIND_FAILURE = ("Address already in use", "Bind on TCP/IP port")


class MyCommandError(subprocess.CalledProcessError):
    """A MariaDB client or server command failed; the message carries its stderr."""

    def __str__(self) -> str:
        cmd = " ".join(str(a) for a in self.cmd) if isinstance(self.cmd, list) else str(self.cmd)
        return f"command {cmd!r} exited with status {self.returncode}: {self.error_text or '(no stderr)'}"

    @property
    def error_text(self) -> str:
        return (self.stderr or "").strip() if isinstance(self.stderr, str) else ""

    @property
    def errno(self) -> int | None:
        """The server error number from the client's ``ERROR NNNN (SQLSTATE)`` line, if any."""
        m = _ERRNO_RE.search(self.error_text)
        return int(m.group(1)) if m else None


def mariadb_bin(tool: str) -> Path:
    """The path of a MariaDB program (``mariadbd``, ``mariadb``, ``mariadb-install-db``...):
    from the directory $ENDPOINT_PROXY_MARIADB_BIN if set, else the usual system directories
    and $PATH."""
    override = os.environ.get("ENDPOINT_PROXY_MARIADB_BIN")
    if override:
        path = Path(override) / tool
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(f"ENDPOINT_PROXY_MARIADB_BIN={override!r} has no {tool!r} program")
        return path
    for directory in _SEARCH_DIRS:
        path = Path(directory) / tool
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(tool)
    if found:
        return Path(found)
    raise RuntimeError(
        f"MariaDB program {tool!r} not found in {', '.join(_SEARCH_DIRS)} or $PATH; "
        "install MariaDB or set ENDPOINT_PROXY_MARIADB_BIN"
    )


@dataclass
class MyInstance:
    """One server of the local cluster."""

    name: str
    host: str
    port: int
    data_dir: Path
    socket: Path
    server_id: int = field(default=0, repr=False)
    log_file: Path = field(default=Path(), repr=False)
    pid_file: Path = field(default=Path(), repr=False)
    read_only: bool = field(default=False, repr=False)  # started with --read-only=1 (a replica)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def pid(self) -> int | None:
        """The server's pid; None if it is not running (a SIGSTOPped server is running)."""
        if self._process is not None:
            if self._process.poll() is None and _alive(self._process.pid):
                return self._process.pid
            self._process = None  # reaped
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _alive(pid):
            return None
        # A stale pid file may name a recycled pid: make sure it is our server (it chdirs to
        # its data directory).
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
        return pid if comm.startswith(("mariadbd", "mysqld")) else None


def _greets(path: Path, timeout: float = 1.0) -> bool:
    """Whether a server answers on the unix socket ``path`` with a protocol-10 handshake."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            head = b""
            while len(head) < 5:
                chunk = s.recv(5 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    return head[4] == 10


def _sql_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return "`" + value.replace("`", "``") + "`"


def _account(user: str, host: str) -> str:
    return f"{_sql_literal(user)}@{_sql_literal(host)}"


class _ServerExited(Exception):
    pass


class MariaDBCluster(LocalClusterBase[MyInstance]):
    """A MariaDB primary (``my0``) and ``replicas`` GTID replicas (``my1``...) in a temporary
    directory, listening on free loopback ports.

    Synchronous and subprocess based; usable as a context manager. Root logs in without a
    password over each server's unix socket only; every other account uses TCP with a password
    (``mysql_native_password``).
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
        # The proxy's [clusters.promotion] method = "sql" credentials, and what an old primary
        # needs to follow a new one (CHANGE MASTER ... MASTER_USER, MASTER_PASSWORD).
        self.promotion_user = PROMOTION_USER
        self.promotion_password = PROMOTION_PASSWORD
        self.replication_user = REPLICATION_USER
        self.replication_password = REPLICATION_PASSWORD
        self.extra_conf = dict(extra_conf or {})
        self.replica_conf = dict(replica_conf or {})
        self.server_bin = mariadb_bin("mariadbd")
        self.client_bin = mariadb_bin("mariadb")
        self.install_bin = mariadb_bin("mariadb-install-db")
        self.instances: list[MyInstance] = []
        self.primary_name = "my0"
        self.root_dir: Path | None = None
        self._created_root = False
        self._as_root = os.geteuid() == 0
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}
        self._env["LC_ALL"] = "C"

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> MariaDBCluster:
        self.start()
        return self

    def start(self) -> None:
        """Install and start every server, create the users and the database on the primary
        and point the replicas at it; return once every replica replicates and has caught up."""
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
            inst_dir = root / f"my{i}"
            inst_dir.mkdir()
            # A private tmpdir: concurrent installs sharing /tmp trip over each other's temp tables.
            (inst_dir / "tmp").mkdir()
            self.instances.append(
                MyInstance(
                    name=f"my{i}",
                    host=HOST,
                    port=port,
                    data_dir=inst_dir / "data",
                    socket=inst_dir / "mariadb.sock",
                    server_id=i + 1,
                    log_file=inst_dir / "mariadbd.log",
                    pid_file=inst_dir / "mariadbd.pid",
                    read_only=i > 0,
                )
            )
        self.primary_name = "my0"
        self._run_many([self._install_argv(inst) for inst in self.instances], timeout=120)
        self._start_servers(self.instances)

        primary, replicas = self.instances[0], self.instances[1:]
        self._bootstrap_sql(primary)
        for r in replicas:
            self._client(r, self._change_master_sql(primary) + "; START SLAVE", database="")
        self.wait_replicating(*(r.name for r in replicas), timeout=30)
        self.wait_caught_up(*(r.name for r in replicas), timeout=30)

    def stop(self) -> None:
        """Stop every server (SIGTERM, SIGKILL if stuck) and delete the directory. Idempotent;
        never raises because a server is already gone."""
        running: list[tuple[MyInstance, int]] = []
        for inst in self.instances:
            pid = inst.pid()
            if pid is None:
                continue
            _signal(pid, signal.SIGCONT)
            _signal(pid, signal.SIGTERM)
            running.append((inst, pid))
        deadline = time.monotonic() + 15
        for inst, pid in running:
            while inst.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            if inst.pid() is not None:
                try:
                    self._kill_process(inst, pid)
                except TimeoutError:
                    pass  # unkillable (uninterruptible sleep): nothing more we can do
        self._remove_root()

    # ----------------------------------------------------------------- accessors

    def _password_for(self, user: str) -> str | None:
        return {
            self.app_user: self.app_password,
            self.monitor_user: self.monitor_password,
            REPLICATION_USER: REPLICATION_PASSWORD,
            PROMOTION_USER: PROMOTION_PASSWORD,
        }.get(user)

    def dsn(
        self,
        name: str,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect(**kw)`` (TCP): host, port, user, password,
        database. Defaults to the app user, its password and the app database; the password of
        the app, monitor and replication users is filled in when not given."""
        inst = self.instance(name)
        user = user or self.app_user
        if password is None:
            password = self._password_for(user) or ""
        return {
            "host": inst.host,
            "port": inst.port,
            "user": user,
            "password": password,
            "database": self.database if database is None else database,
        }

    def sql(
        self,
        name: str,
        query: str,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Run ``query`` (one or more ``;``-separated statements) with the ``mariadb`` client in
        batch mode (``-N -B``: tab-separated, no header, NULL as ``NULL``) and return stdout
        stripped. As root over the unix socket by default; as ``user`` over TCP with its
        password otherwise. ``database`` defaults to the app database (``""``: none). Raises
        MyCommandError (with stderr and ``errno``) on failure, TimeoutError if it hangs."""
        inst = self.instance(name)
        return self._client(inst, query, user=user, password=password, database=database, timeout=timeout)

    def replication_status(self, name: str, *, timeout: float = 10.0) -> dict[str, str]:
        """``SHOW SLAVE STATUS`` as a dict (Slave_IO_Running, Last_IO_Error, Gtid_IO_Pos...);
        empty if the server is not configured as a replica."""
        out = self._client(self.instance(name), "SHOW SLAVE STATUS", database="", vertical=True, timeout=timeout)
        status: dict[str, str] = {}
        for line in out.splitlines():
            m = _VERTICAL_RE.match(line)
            if m:
                status[m.group(1)] = m.group(2) or ""
        return status

    # ----------------------------------------------------------------- faults

    def kill(self, name: str) -> None:
        """SIGKILL the server (a crash); return once its port refuses connections."""
        inst = self.instance(name)
        pid = inst.pid()
        if pid is not None:
            self._kill_process(inst, pid)
        _wait_until(
            lambda: not _port_accepts(inst.port),
            10,
            lambda: f"{name}: port {inst.port} still accepts connections after SIGKILL",
        )

    def sigstop(self, name: str) -> None:
        """SIGSTOP the server (a hung server: connections are accepted by the kernel but never
        greeted)."""
        pid = self._running_pid(name)
        _signal(pid, signal.SIGSTOP)
        _wait_until(
            lambda: _proc_state(pid) in ("T", "t", None),
            5,
            lambda: f"{name} (pid {pid}) did not stop",
            interval=0.005,
        )

    def sigcont(self, name: str) -> None:
        _signal(self._running_pid(name), signal.SIGCONT)

    def stop_instance(self, name: str) -> None:
        """Shut one server down cleanly (SIGTERM); SIGKILL it if that takes more than 30 s."""
        inst = self.instance(name)
        pid = inst.pid()
        if pid is None:
            return
        _signal(pid, signal.SIGCONT)
        _signal(pid, signal.SIGTERM)
        try:
            _wait_until(lambda: inst.pid() is None, 30, lambda: f"{name} did not shut down")
        except TimeoutError:
            self.kill(name)

    def restart(self, name: str) -> None:
        """Start a killed or stopped server again with the same data directory, port and
        options (stopping it first if it runs); return once it accepts connections."""
        inst = self.instance(name)
        if inst.pid() is not None:
            self.stop_instance(name)
        self._start_servers([inst], retry_ports=False)

    def promote(self, name: str, *, timeout: float = 30.0) -> None:
        """Make a replica the primary: stop fetching, let the SQL thread apply what it already
        received, then ``STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only=0``. It becomes
        primary_name (and stays writable across restarts)."""
        inst = self.instance(name)
        if self.replication_status(name):
            self._client(inst, "STOP SLAVE IO_THREAD", database="")

            def applied() -> bool:
                s = self.replication_status(name)
                return (
                    s.get("Slave_SQL_Running") != "Yes"
                    or s.get("Slave_SQL_Running_State", "").startswith("Slave has read all relay log")
                    or (
                        s.get("Relay_Master_Log_File") == s.get("Master_Log_File")
                        and s.get("Exec_Master_Log_Pos") == s.get("Read_Master_Log_Pos")
                    )
                )

            _wait_until(applied, timeout, lambda: f"{name}: relay log not applied within {timeout}s")
        self._client(inst, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0", database="")
        inst.read_only = False
        self.primary_name = name

    def primary_changed(self, name: str) -> None:
        """Record that ``name`` became the primary by other means (a switchover through the
        proxy): restarts then keep the roles the servers have now."""
        for inst in self.instances:
            inst.read_only = inst.name != name
        self.primary_name = self.instance(name).name

    def follow(self, replica: str, new_primary: str, *, timeout: float = 30.0) -> None:
        """Make ``replica`` (read_only=1) replicate from ``new_primary`` with GTID, starting it
        first if it is down; return once both replication threads run. A server not configured
        as a replica (an old primary) starts from its own ``gtid_binlog_pos``."""
        r = self.instance(replica)
        p = self.instance(new_primary)
        if r is p:
            raise ValueError("an instance cannot follow itself")
        r.read_only = True
        if r.pid() is None:
            self.restart(r.name)
        else:
            self._client(r, "SET GLOBAL read_only = 1", database="")
        statements = ["STOP SLAVE"]
        if not self.replication_status(r.name):
            statements.append("SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos")
        statements += [self._change_master_sql(p), "START SLAVE"]
        self._client(r, "; ".join(statements), database="")
        self.wait_replicating(r.name, timeout=timeout)

    # ----------------------------------------------------------------- waiting

    def wait_replicating(self, *replicas: str, timeout: float = 30.0) -> None:
        """Wait until each replica (default: all but the primary) shows Slave_IO_Running and
        Slave_SQL_Running = Yes. A thread that stopped with an error raises RuntimeError at once."""
        names = replicas or tuple(i.name for i in self.instances if i.name != self.primary_name)
        deadline = time.monotonic() + timeout
        for name in names:
            self._wait_replicating_one(name, max(0.0, deadline - time.monotonic()), timeout)

    def _wait_replicating_one(self, name: str, remaining: float, timeout: float) -> None:
        last: dict[str, str] = {}

        def running() -> bool:
            nonlocal last
            try:
                last = self.replication_status(name)
            except (MyCommandError, TimeoutError):
                return False
            io, sql = last.get("Slave_IO_Running"), last.get("Slave_SQL_Running")
            if (io == "No" and last.get("Last_IO_Errno", "0") != "0") or (
                sql == "No" and last.get("Last_SQL_Errno", "0") != "0"
            ):
                raise RuntimeError(f"{name}: replication stopped: {self._describe_status(last)}")
            return io == "Yes" and sql == "Yes"

        def describe() -> str:
            return f"{name} not replicating after {timeout}s: {self._describe_status(last)}"

        _wait_until(running, remaining, describe)

    def wait_caught_up(self, *replicas: str, timeout: float = 10.0) -> None:
        """Wait until each replica (default: all but the primary) has applied the primary's
        current ``@@gtid_binlog_pos`` (``MASTER_GTID_WAIT``)."""
        names = replicas or tuple(i.name for i in self.instances if i.name != self.primary_name)
        pos = self._client(self.primary, "SELECT @@gtid_binlog_pos", database="")
        if not pos:
            return
        deadline = time.monotonic() + timeout
        for name in names:
            remaining = max(0.0, deadline - time.monotonic())
            result = self._client(
                self.instance(name),
                f"SELECT MASTER_GTID_WAIT({_sql_literal(pos)}, {remaining:.3f})",
                database="",
                timeout=remaining + 10,
            )
            if result != "0":
                status = self._describe_status(self.replication_status(name))
                raise TimeoutError(f"{name} has not applied {pos} within {timeout}s: {status}")

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _describe_status(s: dict[str, str]) -> str:
        if not s:
            return "not configured as a replica"
        keys = (
            "Master_Port",
            "Slave_IO_Running",
            "Slave_SQL_Running",
            "Last_IO_Errno",
            "Last_IO_Error",
            "Last_SQL_Errno",
            "Last_SQL_Error",
            "Gtid_IO_Pos",
        )
        return ", ".join(f"{k}={s.get(k, '')!r}" for k in keys)

    def _make_root(self) -> Path:
        if self.base_dir is None:
            root = Path(tempfile.mkdtemp(prefix="ep-my-"))
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
        # unix socket paths are limited to 107 bytes: <root>/myN/mariadb.sock
        if len(str(root)) > 80:
            raise RuntimeError(f"cluster directory path too long for unix sockets: {root}")
        if self._created_root:
            os.chmod(root, 0o700)
        return root

    def _user_options(self) -> list[str]:
        # mariadbd refuses to run as root unless told to.
        return ["--user=root"] if self._as_root else []

    def _install_argv(self, inst: MyInstance) -> list[str]:
        # An install outside the system prefix needs its basedir to find its share files.
        basedir = [f"--basedir={self.server_bin.parent.parent}"] if os.environ.get("ENDPOINT_PROXY_MARIADB_BIN") else []
        return [
            str(self.install_bin),
            "--no-defaults",
            *self._user_options(),
            *basedir,
            f"--datadir={inst.data_dir}",
            f"--tmpdir={inst.data_dir.parent / 'tmp'}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=8M",
        ]

    def _server_argv(self, inst: MyInstance) -> list[str]:
        argv = [
            str(self.server_bin),
            "--no-defaults",
            *self._user_options(),
            f"--datadir={inst.data_dir}",
            f"--tmpdir={inst.data_dir.parent / 'tmp'}",
            f"--socket={inst.socket}",
            f"--port={inst.port}",
            f"--bind-address={HOST}",
            f"--pid-file={inst.pid_file}",
            f"--log-error={inst.log_file}",
            f"--server-id={inst.server_id}",
            "--log-bin=mariadb-bin",
            "--relay-log=relay-bin",
            "--log-slave-updates",
            "--binlog-format=ROW",
            "--gtid-strict-mode=1",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=8M",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--sync-binlog=0",
            "--max-connections=300",
            "--slave-net-timeout=10",
            f"--report-host={HOST}",
            f"--report-port={inst.port}",
            f"--read-only={1 if inst.read_only else 0}",
        ]
        settings = dict(self.extra_conf)
        if inst.read_only:
            settings.update(self.replica_conf)
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        return argv

    def _change_master_sql(self, primary: MyInstance) -> str:
        return (
            f"CHANGE MASTER TO MASTER_HOST={_sql_literal(primary.host)}, MASTER_PORT={primary.port}, "
            f"MASTER_USER={_sql_literal(REPLICATION_USER)}, MASTER_PASSWORD={_sql_literal(REPLICATION_PASSWORD)}, "
            "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, MASTER_HEARTBEAT_PERIOD=1"
        )

    def _bootstrap_sql(self, primary: MyInstance) -> None:
        # Root keeps only its unix-socket account; TCP logins all need a password.
        hosts = self._client(
            primary, "SELECT host FROM mysql.user WHERE user = 'root' AND host <> 'localhost'", database=""
        ).split()
        statements = [f"DROP USER {_account(ROOT_USER, h)}" for h in hosts]
        statements.append(f"CREATE DATABASE {_sql_ident(self.database)}")
        accounts = [
            (self.app_user, self.app_password, f"ALL PRIVILEGES ON {_sql_ident(self.database)}.*"),
            (self.monitor_user, self.monitor_password, "REPLICATION CLIENT, SLAVE MONITOR, PROCESS ON *.*"),
            (REPLICATION_USER, REPLICATION_PASSWORD, "REPLICATION SLAVE ON *.*"),
            (PROMOTION_USER, PROMOTION_PASSWORD, f"{PROMOTION_GRANTS} ON *.*"),
        ]
        for user, password, grant in accounts:
            for host in _USER_HOSTS:
                statements.append(f"CREATE USER {_account(user, host)} IDENTIFIED BY {_sql_literal(password)}")
                statements.append(f"GRANT {grant} TO {_account(user, host)}")
        self._client(primary, ";\n".join(statements), database="", timeout=60)

    def _client(
        self,
        inst: MyInstance,
        query: str,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        vertical: bool = False,
        timeout: float = 30.0,
    ) -> str:
        argv = [str(self.client_bin), "--no-defaults"]
        env = self._env
        if user is None or user == ROOT_USER:
            argv += ["--protocol=SOCKET", f"--socket={inst.socket}", f"--user={ROOT_USER}"]
        else:
            argv += ["--protocol=TCP", f"--host={inst.host}", f"--port={inst.port}", f"--user={user}"]
            if password is None:
                password = self._password_for(user)
            if password is not None:
                env = {**self._env, "MYSQL_PWD": password}  # kept out of the command line
        argv += ["--connect-timeout=10", *(["-E"] if vertical else ["-N", "-B"]), f"--execute={query}"]
        db = self.database if database is None else database
        if db:
            argv.append(f"--database={db}")
        return self._run(argv, timeout=timeout, env=env).stdout.strip()

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(argv),
            cwd=self.root_dir or "/",
            env=env or self._env,
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
            shown = [a for a in argv if not a.startswith("--execute=")]
            raise TimeoutError(f"command did not finish in time: {' '.join(shown)}") from None
        if proc.returncode != 0:
            raise MyCommandError(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def _run(
        self, argv: Sequence[str], *, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self._finish(self._spawn(argv, env), argv, time.monotonic() + timeout)

    def _run_many(self, argvs: Iterable[Sequence[str]], *, timeout: float = 60.0) -> None:
        """Run commands concurrently; raise the first failure after all have finished."""
        deadline = time.monotonic() + timeout
        procs = [(argv, self._spawn(argv)) for argv in argvs]
        error: BaseException | None = None
        for argv, proc in procs:
            try:
                self._finish(proc, argv, deadline)
            except (MyCommandError, TimeoutError) as exc:
                error = error or exc
        if error is not None:
            raise error

    def _spawn_server(self, inst: MyInstance) -> None:
        # Leftovers of a crashed server; mariadbd would cope, but a stale pid file confuses pid().
        inst.pid_file.unlink(missing_ok=True)
        inst.socket.unlink(missing_ok=True)
        with inst.log_file.open("ab") as log:
            inst._process = subprocess.Popen(
                self._server_argv(inst),
                cwd=inst.data_dir.parent,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, inst: MyInstance, deadline: float) -> None:
        while True:
            proc = inst._process
            if proc is None or proc.poll() is not None:
                raise _ServerExited(f"{inst.name} exited during startup")
            if inst.socket.exists() and _greets(inst.socket):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{inst.name} did not accept connections in time\n{self._log_tail(inst)}")
            time.sleep(0.02)

    def _start_servers(self, insts: list[MyInstance], *, retry_ports: bool = True) -> None:
        """Start servers concurrently and wait until each greets on its unix socket; with
        ``retry_ports``, one that lost its port to another process meanwhile gets a new port
        and another try."""
        pending = list(insts)
        for attempt in range(3):
            offsets = {i.name: self._log_size(i) for i in pending}
            for inst in pending:
                self._spawn_server(inst)
            deadline = time.monotonic() + 60
            retry: list[MyInstance] = []
            for inst in pending:
                try:
                    self._wait_ready(inst, deadline)
                except _ServerExited as exc:
                    fresh_log = self._log_text(inst)[offsets[inst.name] :]
                    if retry_ports and attempt < 2 and any(s in fresh_log for s in _BIND_FAILURE):
                        inst.port = _free_ports(1)[0]
                        retry.append(inst)
                    else:
                        raise RuntimeError(f"{inst.name} failed to start\n{self._log_tail(inst)}") from exc
            if not retry:
                return
            pending = retry

    @staticmethod
    def _kill_process(inst: MyInstance, pid: int) -> None:
        _signal(pid, signal.SIGKILL)
        _wait_until(
            lambda: inst.pid() is None and not _alive(pid),
            10,
            lambda: f"{inst.name}: pid {pid} survived SIGKILL",
            interval=0.01,
        )

