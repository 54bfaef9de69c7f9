"""A throwaway local Patroni cluster: one etcd and N Patroni nodes (PostgreSQL) on free ports.

Patroni runs from a virtualenv of its own, made once by ``ensure_patroni`` with the system's
``/usr/bin/python3`` (a Python under /root is not readable by the ``postgres`` OS user that
Patroni runs as) in a directory that user can read: PATRONI_VENV, or
$ENDPOINT_PROXY_PATRONI_VENV. etcd is Debian's ``etcd-server`` (``/usr/bin/etcd``).

Nodes are ``pg0``... (Patroni member names); ``pg0`` bootstraps the cluster and is the first
leader. Patroni's ``ttl`` is 20 s (its minimum): a crashed leader's key expires after that;
``delete_leader_key`` ends the wait at once (a new leader within ~0.3 s).
"""

from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ._base import LocalClusterBase
from ._proc import _alive, _free_ports, _port_accepts, _signal, _wait_until
from .postgresql import PROMOTION_PASSWORD, PROMOTION_USER, REPLICATION_USER, SUPERUSER, postgres_bin_dir

__all__ = ["PATRONI_REQUIREMENTS", "PatroniCluster", "PatroniNode", "ensure_patroni", "patroni_venv"]

HOST = "127.0.0.1"
PATRONI_REQUIREMENTS = ("patroni[etcd3]==4.1.5", "psycopg2-binary==2.9.13")
PATRONI_VENV = Path("/var/lib/endpoint-proxy/patroni-4.1.5")
SCOPE = "ep"
NAMESPACE = "/service"
TTL_S = 20
LOOP_WAIT_S = 2
_OS_USER = "postgres"


def patroni_venv() -> Path:
    override = os.environ.get("ENDPOINT_PROXY_PATRONI_VENV")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return PATRONI_VENV
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "endpoint-proxy" / "patroni-4.1.5"


def ensure_patroni(venv: Path | None = None) -> Path:
    """The ``patroni`` executable, installing it into its virtualenv first if needed
    (idempotent; concurrent callers wait for one install). Raises RuntimeError with pip's
    output when it cannot be installed."""
    venv = venv or patroni_venv()
    patroni = venv / "bin" / "patroni"
    stamp = venv / ".endpoint-proxy-installed"
    wanted = " ".join(PATRONI_REQUIREMENTS)
    if patroni.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return patroni
    venv.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(venv.parent, 0o755)
    with open(venv.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if patroni.is_file() and stamp.is_file() and stamp.read_text() == wanted:
            return patroni
        python = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else shutil.which("python3") or "python3"
        steps = [[python, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *PATRONI_REQUIREMENTS]]
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"cannot install Patroni ({' '.join(argv)}): {done.stderr.strip()[-2000:]}")
        stamp.write_text(wanted)
    return patroni


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").is_file() else None)
    if found is None:
        raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
    return found


@dataclass
class PatroniNode:
    """One Patroni node and its PostgreSQL server."""

    name: str
    port: int  # PostgreSQL
    rest_port: int
    data_dir: Path
    node_dir: Path
    log_file: Path = field(default=Path(), repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = HOST

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    def pid(self) -> int | None:
        """The postmaster's pid (None when PostgreSQL is not running)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def patroni_pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    def patroni_pids(self) -> list[int]:
        """Patroni's own process and, when run through ``runuser``, that wrapper (signals to
        the wrapper alone do not reach Patroni)."""
        pid = self.patroni_pid()
        if pid is None:
            return []
        return [pid, *_children(pid)]


class PatroniCluster(LocalClusterBase[PatroniNode]):
    """etcd and ``nodes`` Patroni nodes in a temporary directory; a context manager.

    The app user (``app``/``app-secret``), database ``app``, the monitor user and the
    replication user are those of ``PostgresCluster``."""

    def __init__(self, nodes: int = 3, *, base_dir: str | Path | None = None, database: str = "app",
                 app_user: str = "app", app_password: str = "app-secret", monitor_user: str = "monitor",
                 monitor_password: str = "monitor", tags: dict[str, dict[str, Any]] | None = None) -> None:
        self.node_count = nodes
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.database = database
        self.app_user = app_user
        self.app_password = app_password
        self.monitor_user = monitor_user
        self.monitor_password = monitor_password
        self.tags = dict(tags or {})
        self.scope = SCOPE
        self.namespace = NAMESPACE
        self.instances: list[PatroniNode] = []
        self.primary_name = "pg0"
        self.root_dir: Path | None = None
        self._created_root = False
        self._as_root = os.geteuid() == 0
        self.etcd_port = 0
        self._etcd: subprocess.Popen[bytes] | None = None
        self._patroni: Path | None = None
        self._bin_dir = postgres_bin_dir()

    # --- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> PatroniCluster:
        self.start()
        return self

    def start(self, timeout: float = 90.0) -> None:
        """Start etcd and every node; return once there is a leader, the app's roles exist and
        every replica streams."""
        if self.root_dir is not None:
            raise RuntimeError("cluster already started")
        try:
            self._patroni = ensure_patroni()
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        root = self._make_root()
        ports = _free_ports(2 + 2 * self.node_count)
        self.etcd_port, etcd_peer = ports[0], ports[1]
        self._start_etcd(root, etcd_peer)
        for i in range(self.node_count):
            node_dir = root / f"pg{i}"
            node_dir.mkdir()
            self._chown(node_dir)
            self.instances.append(PatroniNode(
                name=f"pg{i}", port=ports[2 + 2 * i], rest_port=ports[3 + 2 * i],
                data_dir=node_dir / "data", node_dir=node_dir, log_file=node_dir / "patroni.log"))
        first = self.instances[0]
        self._start_node(first)
        self.wait_leader(timeout=timeout, expect=first.name)
        self._bootstrap_sql(first)
        for node in self.instances[1:]:
            self._start_node(node)
        self.wait_streaming(timeout=timeout)

    def stop(self) -> None:
        """Stop every node (Patroni stops its PostgreSQL), then etcd; delete the directory.
        Idempotent; never raises for a process already gone."""
        for node in self.instances:
            for pid in node.patroni_pids():
                _signal(pid, signal.SIGCONT)
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for node in self.instances:
            if node.process is not None:
                try:
                    node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    for child in reversed(node.patroni_pids()):
                        _signal(child, signal.SIGKILL)
            postmaster = node.pid()
            if postmaster is not None:  # Patroni killed earlier: its PostgreSQL runs on alone
                _signal(postmaster, signal.SIGCONT)
                _signal(postmaster, signal.SIGQUIT)
                try:
                    _wait_until(functools.partial(_dead, postmaster), 10, lambda: "postgres did not stop")
                except TimeoutError:
                    _signal(postmaster, signal.SIGKILL)
        if self._etcd is not None and self._etcd.poll() is None:
            _signal(self._etcd.pid, signal.SIGCONT)
            self._etcd.terminate()
            try:
                self._etcd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._etcd.kill()
        self._remove_root()

    # --- what tests and the demo use -------------------------------------------------------------

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_port}"

    @property
    def rest_urls(self) -> list[str]:
        return [n.rest_url for n in self.instances]

    def node(self, name: str) -> PatroniNode:
        return self.instance(name)

    def dsn(self, name: str, *, user: str | None = None, password: str | None = None,
            database: str | None = None) -> str:
        node = self.node(name)
        user = user or self.app_user
        if password is None:
            password = {self.app_user: self.app_password, self.monitor_user: self.monitor_password,
                        PROMOTION_USER: PROMOTION_PASSWORD}.get(user)
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        return f"postgresql://{auth}@{HOST}:{node.port}/{quote(database or self.database, safe='')}"

    def sql(self, name: str, query: str, *, database: str | None = None, timeout: float = 30.0) -> str:
        """``psql -At`` as the superuser over the node's unix socket."""
        node = self.node(name)
        argv = [str(self._bin_dir / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", str(node.node_dir), "-p", str(node.port), "-U", SUPERUSER, "-d", database or self.database,
                "-c", query]
        done = subprocess.run(self._command(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"})
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {query[:60]}: {done.stderr.strip()}")
        return done.stdout.strip()

    def rest(self, name: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, str]:
        """A request to a node's REST API: (status, text)."""
        node = self.node(name)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(node.rest_url + path, data=data, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def etcd(self, op: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
        request = urllib.request.Request(f"{self.etcd_url}/v3/{op}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def leader(self) -> str | None:
        """The leader key's value, from etcd."""
        key = f"{self.namespace}/{self.scope}/leader"
        answer = self.etcd("kv/range", {"key": base64.b64encode(key.encode()).decode()})
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    def delete_leader_key(self) -> None:
        key = f"{self.namespace}/{self.scope}/leader"
        self.etcd("kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})

    def wait_leader(self, *, timeout: float = 60.0, expect: str | None = None, other_than: str | None = None) -> str:
        """Wait until a leader holds the key and its PostgreSQL accepts writes; its name."""
        found: list[str] = []

        def ready() -> bool:
            try:
                name = self.leader()
            except OSError:
                return False
            if name is None or (expect is not None and name != expect) or name == other_than:
                return False
            if self.node(name).pid() is None:
                return False
            try:
                if self.sql(name, "select pg_is_in_recovery()", database="postgres", timeout=5) != "f":
                    return False
            except (RuntimeError, subprocess.TimeoutExpired):
                return False
            found[:] = [name]
            return True

        _wait_until(ready, timeout, lambda: "no leader in time\n" + "\n".join(self._log_tail(n, 15)
                                                                                for n in self.instances), 0.05)
        self.primary_name = found[0]
        return found[0]

    def wait_streaming(self, *, timeout: float = 60.0) -> None:
        """Wait until every running node but the leader streams from it."""
        def ready() -> bool:
            leader = self.leader()
            if leader is None:
                return False
            want = {n.name for n in self.instances if n.name != leader and n.patroni_pid() is not None}
            try:
                rows = self.sql(leader, "select application_name from pg_stat_replication where state = 'streaming'",
                                database="postgres", timeout=5)
            except (RuntimeError, subprocess.TimeoutExpired):
                return False
            return want <= set(rows.split())

        _wait_until(ready, timeout, lambda: "replicas not streaming in time\n" + "\n".join(
            self._log_tail(n, 15) for n in self.instances), 0.1)

    def switchover(self, candidate: str, leader: str | None = None) -> tuple[int, str]:
        """Patroni's own switchover (``POST /switchover`` on the leader's REST API)."""
        leader = leader or self.leader()
        assert leader is not None
        return self.rest(leader, "/switchover", {"leader": leader, "candidate": candidate}, timeout=60)

    def kill(self, name: str) -> None:
        """kill -9 of Patroni and of PostgreSQL (a crash of the node)."""
        self.kill_patroni(name)
        node = self.node(name)
        pid = node.pid()
        if pid is not None:
            _signal(pid, signal.SIGKILL)
            for child in _children(pid):
                _signal(child, signal.SIGKILL)
        _wait_until(lambda: not _port_accepts(node.port), 10, lambda: f"{name}: port still accepts")

    def kill_patroni(self, name: str) -> None:
        """kill -9 of Patroni alone: its PostgreSQL runs on (as primary, if it was the leader)."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            for pid in reversed(node.patroni_pids()):
                _signal(pid, signal.SIGKILL)
            node.process.wait(timeout=10)

    def restart(self, name: str) -> None:
        """Start a killed node's Patroni again (it rejoins as a replica, rewinding if needed)."""
        node = self.node(name)
        pid = node.pid()
        if pid is not None:  # PostgreSQL left running by a Patroni-only kill: stop it first
            _signal(pid, signal.SIGINT)
            _wait_until(lambda: node.pid() is None, 30, lambda: f"{name}: postgres did not stop")
        self._start_node(node)

    def stop_store(self) -> None:
        """SIGSTOP etcd and every Patroni (a store outage: nothing answers; PostgreSQL runs on)."""
        self._signal_store(signal.SIGSTOP)

    def resume_store(self) -> None:
        self._signal_store(signal.SIGCONT)

    def _signal_store(self, sig: signal.Signals) -> None:
        pids = [pid for n in self.instances for pid in n.patroni_pids()]
        if self._etcd is not None and self._etcd.poll() is None:
            pids.append(self._etcd.pid)
        for pid in pids:
            _signal(pid, sig)

    # --- internals -------------------------------------------------------------------------------

    def _make_root(self) -> Path:
        if self.base_dir is None:
            root = Path(tempfile.mkdtemp(prefix="ep-patroni-"))
            self._created_root = True
        else:
            root = self.base_dir.absolute()
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise RuntimeError(f"base_dir {root} is not empty")
        os.chmod(root, 0o755)
        self.root_dir = root
        return root

    def _chown(self, path: Path) -> None:
        if self._as_root:
            shutil.chown(path, user=_OS_USER, group=_OS_USER)

    def _command(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", _OS_USER, "--", *argv] if self._as_root else argv

    def _start_etcd(self, root: Path, peer_port: int) -> None:
        data = root / "etcd"
        client, peer = self.etcd_url, f"http://{HOST}:{peer_port}"
        argv = [etcd_binary(), "--name", "ep", "--data-dir", str(data), "--listen-client-urls", client,
                "--advertise-client-urls", client, "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer, "--initial-cluster", f"ep={peer}",
                "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", str(root / "etcd.log")]
        env = {**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")}
        self._etcd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True, env=env)

        def up() -> bool:
            try:
                self.etcd("kv/range", {"key": base64.b64encode(b"/").decode()}, timeout=1)
                return True
            except OSError:
                return False

        _wait_until(up, 20, lambda: f"etcd did not answer on {client}")

    def _node_config(self, node: PatroniNode) -> dict[str, Any]:
        hba = ["local all all trust", "local replication all trust",
               f"host replication {REPLICATION_USER} 127.0.0.1/32 trust",
               f"host all {SUPERUSER} 127.0.0.1/32 trust",
               "host all all 127.0.0.1/32 scram-sha-256"]
        parameters = {
            "max_connections": 300, "shared_buffers": "32MB", "fsync": "off", "synchronous_commit": "off",
            "full_page_writes": "off", "wal_level": "replica", "max_wal_senders": 10, "max_replication_slots": 10,
            "wal_keep_size": "256MB", "hot_standby": "on", "hot_standby_feedback": "on", "wal_writer_delay": "10ms",
            "wal_receiver_status_interval": "1s", "wal_retrieve_retry_interval": "200ms", "wal_log_hints": "on",
            "password_encryption": "scram-sha-256", "unix_socket_permissions": "0777",
            "log_line_prefix": "%m [%p] %q%a ",
        }
        return {
            "scope": self.scope, "namespace": self.namespace, "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"{HOST}:{node.rest_port}", "connect_address": f"{HOST}:{node.rest_port}"},
            "etcd3": {"hosts": [f"{HOST}:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {"ttl": TTL_S, "loop_wait": LOOP_WAIT_S, "retry_timeout": 5,
                        "maximum_lag_on_failover": 1048576, "failsafe_mode": True,
                        "postgresql": {"use_pg_rewind": True, "parameters": parameters}},
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
                "pg_hba": hba,
            },
            "postgresql": {
                "listen": f"{HOST}:{node.port}", "connect_address": f"{HOST}:{node.port}",
                "data_dir": str(node.data_dir), "bin_dir": str(self._bin_dir),
                "pgpass": str(node.node_dir / "pgpass"), "use_unix_socket": True,
                "parameters": {"unix_socket_directories": str(node.node_dir)},
                "authentication": {"superuser": {"username": SUPERUSER},
                                   "replication": {"username": REPLICATION_USER},
                                   "rewind": {"username": SUPERUSER}},
                "basebackup": [{"checkpoint": "fast"}],
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
                "pg_hba": hba,
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False,
                     **self.tags.get(node.name, {})},
        }

    def _start_node(self, node: PatroniNode) -> None:
        assert self._patroni is not None
        config = node.node_dir / "patroni.yml"
        config.write_text(json.dumps(self._node_config(node), indent=1))  # JSON is YAML
        self._chown(config)
        log = open(node.node_dir / "patroni.out", "ab")
        try:
            node.process = subprocess.Popen(self._command([str(self._patroni), str(config)]), cwd=node.node_dir,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        node.log_file = node.node_dir / "patroni.out"

    def _bootstrap_sql(self, node: PatroniNode) -> None:
        app, mon = self.app_user, self.monitor_user
        statements = [
            f"CREATE ROLE {REPLICATION_USER} WITH LOGIN REPLICATION" if not self._role_exists(node, REPLICATION_USER)
            else "SELECT 1",
            f"CREATE ROLE {app} WITH LOGIN PASSWORD '{self.app_password}'",
            f"CREATE ROLE {mon} WITH LOGIN PASSWORD '{self.monitor_password}'",
            f"GRANT pg_monitor TO {mon}",
            f"CREATE DATABASE {self.database} OWNER {app}",
            f"GRANT CONNECT ON DATABASE postgres TO {app}, {mon}",
        ]
        for statement in statements:
            self.sql(node.name, statement, database="postgres")

    def _role_exists(self, node: PatroniNode, role: str) -> bool:
        query = f"select count(*) from pg_roles where rolname = '{role}'"
        return self.sql(node.name, query, database="postgres") == "1"


def _dead(pid: int) -> bool:
    return not _alive(pid)


def _children(ppid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rfind(")") + 2:].split()
            if len(rest) > 1 and rest[1] == str(ppid):
                out.append(int(entry.name))
    return out
