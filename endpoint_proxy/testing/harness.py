"""A local cluster with the proxy in front, driven from a test: ``EpCluster`` (no pytest needed).

The proxy runs as a child process (``python -m endpoint_proxy run``), as it runs in
production: a test's own event loop, signal handlers, logging and GIL stay its own, and a
crash of either side cannot take the other down. The cluster is the local-cluster module's
(real PostgreSQL or MariaDB servers on free loopback ports, in a temporary directory).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

from ..localcluster.mariadb import MariaDBCluster
from ..localcluster.postgresql import PostgresCluster

PROTOCOLS = ("postgresql", "mysql")
DEFAULT_ENDPOINTS = ("writer", "reader", "readwrite")
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-secret"
CLUSTER_NAME = "ep"

T = TypeVar("T")


class SwitchoverFailed(AssertionError):
    """A switchover through the proxy was refused, abandoned or failed; ``answer`` is the
    proxy's JSON."""

    def __init__(self, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.answer = dict(answer)


def endpoint_table(endpoint: str | Mapping[str, Any], port: int) -> dict[str, Any]:
    """An endpoint of the proxy config: a name (``writer``, ``reader``, ``readwrite`` are also
    their kind) or a table with ``name`` and ``kind`` and the endpoint keys of the config."""
    if isinstance(endpoint, str):
        if endpoint not in ("writer", "reader", "readwrite"):
            raise ValueError(f"endpoint {endpoint!r}: give a table with its kind, e.g. "
                             f'{{"name": "{endpoint}", "kind": "instance", "instance": "pg1"}}')
        return {"name": endpoint, "listen": f"127.0.0.1:{port}", "kind": endpoint}
    table = dict(endpoint)
    if "name" not in table or "kind" not in table:
        raise ValueError(f"endpoint {table!r}: name and kind are required")
    table.setdefault("listen", f"127.0.0.1:{port}")
    return table


def toml_dumps(doc: Mapping[str, Any]) -> str:
    """TOML for a config document: tables, arrays of tables, strings, numbers, booleans and
    arrays of those (all the proxy's config uses)."""
    lines: list[str] = []
    _toml_table(lines, [], doc)
    return "\n".join(lines) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    for key, value in table.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        sub = [*path, _toml_key(key)]
        if isinstance(value, Mapping):
            lines.append(f"\n[{'.'.join(sub)}]")
            _toml_table(lines, sub, value)
        elif _is_table_array(value):
            for item in value:
                lines.append(f"\n[[{'.'.join(sub)}]]")
                _toml_table(lines, sub, item)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, KeyError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}"
                               + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


class EpCluster:
    """A local PostgreSQL or MariaDB cluster (a primary and ``replicas`` replicas) behind the
    proxy, with ``endpoints`` (default: ``writer``, ``reader``, ``readwrite``).

    Use as a context manager, or ``start()``/``stop()``. The proxy promotes with SQL (planned
    switchovers work), checks every 100 ms, and serves its admin HTTP on a free port."""

    def __init__(self, protocol: str = "postgresql", replicas: int = 2,
                 endpoints: Sequence[str | Mapping[str, Any]] = DEFAULT_ENDPOINTS, *,
                 cluster_options: Mapping[str, Any] | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
        self.protocol = protocol
        self.replicas = replicas
        self.endpoint_specs = tuple(endpoints)
        self.cluster_options = dict(cluster_options or {})
        self.local: PostgresCluster | MariaDBCluster | None = None
        self.workdir: Path | None = None
        self.config: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashed: set[str] = set()

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> EpCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> EpCluster:
        """Start the servers and the proxy; return once the proxy has a writer and every
        endpoint accepts connections."""
        try:
            self.local = (MariaDBCluster(replicas=self.replicas) if self.protocol == "mysql"
                          else PostgresCluster(replicas=self.replicas))
            self.local.start()
            self.workdir = Path(tempfile.mkdtemp(prefix="ep-cluster-"))
            self.config = self._config()
            config_path = self.workdir / "proxy.toml"
            config_path.write_text(toml_dumps(self.config))
            with open(self.workdir / "proxy.log", "wb") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "endpoint_proxy", "run", "--config", str(config_path)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._wait_ready(60)
        except BaseException:
            log = self.log()
            self.stop()
            if log:
                sys.stderr.write(f"--- endpoint_proxy log ---\n{log[-4000:]}\n")
            raise
        return self

    def stop(self) -> None:
        """Stop the proxy and the servers and remove their files (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        local, self.local = self.local, None
        if local is not None:
            local.stop()
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _config(self) -> dict[str, Any]:
        local = self._local()
        promotion: dict[str, Any] = {"method": "sql", "user": local.promotion_user,
                                     "password": local.promotion_password}
        if isinstance(local, MariaDBCluster):
            promotion.update(replication_user=local.replication_user,
                             replication_password=local.replication_password)
        cluster: dict[str, Any] = {
            "name": CLUSTER_NAME,
            "protocol": self.protocol,
            "health_check_interval_ms": 100,
            "failover_timeout_ms": 30_000,
            "switchover_timeout_ms": 10_000,
            "monitor": {"user": local.monitor_user, "password": local.monitor_password},
            "users": [{"name": local.app_user, "password": local.app_password}],
            "promotion": promotion,
            "instances": [{"name": i.name, "host": i.host, "port": i.port} for i in local.instances],
            "endpoints": [endpoint_table(e, _free_port()) for e in self.endpoint_specs],
            **self.cluster_options,
        }
        return {
            "logging": {"format": "json", "level": "info"},
            "admin": {"listen": f"127.0.0.1:{_free_port()}",
                      "users": [{"name": ADMIN_USER, "password": ADMIN_PASSWORD}]},
            "clusters": [cluster],
        }

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited with status {self.proc.returncode}:\n{self.log()[-4000:]}")
            status, _ = self._request("GET", "/readyz")
            return status == 200 and all(self._accepts(self.port(e["name"])) for e in self._endpoints())

        _wait(ready, timeout, "the proxy to be ready")

    @staticmethod
    def _accepts(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _local(self) -> PostgresCluster | MariaDBCluster:
        if self.local is None:
            raise RuntimeError("the cluster is not running")
        return self.local

    def _endpoints(self) -> list[dict[str, Any]]:
        endpoints: list[dict[str, Any]] = self.config["clusters"][0]["endpoints"]
        return endpoints

    def log(self) -> str:
        """The proxy's log so far (JSON lines)."""
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "proxy.log").read_text(errors="replace")
        except OSError:
            return ""

    # --- connecting ---------------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self._local().app_user

    @property
    def password(self) -> str:
        return self._local().app_password

    @property
    def database(self) -> str:
        return self._local().database

    @property
    def instances(self) -> list[str]:
        return [i.name for i in self._local().instances]

    def port(self, endpoint: str = "writer") -> int:
        for e in self._endpoints():
            if e["name"] == endpoint:
                return int(str(e["listen"]).rsplit(":", 1)[1])
        raise KeyError(f"no endpoint named {endpoint!r} (endpoints: {', '.join(e['name'] for e in self._endpoints())})")

    def dsn(self, endpoint: str = "writer", *, user: str | None = None, password: str | None = None,
            database: str | None = None) -> str:
        """A URL for an endpoint that client libraries accept: ``postgresql://user:pw@host:port/db``
        (libpq, psycopg, asyncpg, SQLAlchemy) or ``mysql://...`` (SQLAlchemy, mysqlclient URL parsers)."""
        scheme = "mysql" if self.protocol == "mysql" else "postgresql"
        auth = quote(user or self.user, safe="") + ":" + quote(password if password is not None else self.password,
                                                                safe="")
        return f"{scheme}://{auth}@127.0.0.1:{self.port(endpoint)}/{quote(database or self.database, safe='')}"

    def connect_args(self, endpoint: str = "writer") -> dict[str, Any]:
        """host, port, user, password, database: keyword arguments for drivers that take no URL
        (``pymysql.connect(**ep_cluster.connect_args("writer"))``)."""
        return {"host": "127.0.0.1", "port": self.port(endpoint), "user": self.user, "password": self.password,
                "database": self.database}

    # --- the admin plane ----------------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        return f"http://{self.config['admin']['listen']}/"

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                 timeout: float = 120.0) -> tuple[int, Any]:
        host, port = str(self.config["admin"]["listen"]).rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        basic = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json", "Authorization": f"Basic {basic}"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def topology(self) -> dict[str, Any]:
        """The proxy's view of the cluster: the cluster entry of ``GET /topology``."""
        status, doc = self._request("GET", "/topology")
        if status != 200:
            raise RuntimeError(f"GET /topology answered {status}: {doc}")
        cluster: dict[str, Any] = doc["clusters"][0]
        return cluster

    @property
    def writer(self) -> str | None:
        """The writer the proxy routes to now (None while it knows none)."""
        writer: str | None = self.topology()["writer"]
        return writer

    def wait_for_writer(self, timeout: float = 30.0) -> str:
        """Wait until the proxy knows a writer that is up (not one crashed through this object)
        and return its name."""
        def usable() -> str | None:
            writer = self.writer
            return writer if writer is not None and writer not in self.crashed else None

        return _wait(usable, timeout, "a writer")

    def switchover(self, to: str | None = None, *, timeout: float = 120.0) -> dict[str, Any]:
        """A planned switchover through the proxy (``POST /switchover``); returns its record
        (``from``, ``to``, ``outcome``, ``pause_ms``...). Raises SwitchoverFailed unless it
        completed."""
        status, answer = self._request("POST", "/switchover", {"to": to} if to else {}, timeout)
        if status != 200 or not isinstance(answer, dict) or not answer.get("ok"):
            raise SwitchoverFailed(f"switchover answered {status}: {answer}",
                                   answer if isinstance(answer, dict) else {})
        record: dict[str, Any] = answer["switchover"]
        self._local().primary_changed(record["to"])
        return record

    def inject(self, kind: str, **args: Any) -> dict[str, Any]:
        """Inject a fault (``POST /faults``): ``kind`` is one of instance_failure,
        read_replica_failure, latency, bandwidth, slicer, reset, replica_lag, with its
        parameters (``instance=``, ``seconds=`` (default 10), ``latency_ms=``...); or a whole
        ``SIMULATE ...`` command. Returns the fault (with its ``id``)."""
        if kind.upper().startswith("SIMULATE "):
            body: dict[str, Any] = {"command": kind}
        else:
            body = {"kind": kind, "seconds": 10, **args}
        status, answer = self._request("POST", "/faults", body)
        if status != 200:
            raise ValueError(f"the proxy refused the fault: {answer}")
        fault: dict[str, Any] = answer["faults"][0]
        return fault

    def faults(self) -> list[dict[str, Any]]:
        status, answer = self._request("GET", "/faults")
        faults: list[dict[str, Any]] = answer["faults"]
        return faults

    def clear_faults(self) -> None:
        self._request("DELETE", "/faults")

    # --- the servers ---------------------------------------------------------------------------------

    def sql(self, instance: str, query: str) -> str:
        """Run SQL on one instance directly (not through the proxy), as the app user; stdout text."""
        local = self._local()
        return local.sql(instance, query, user=local.app_user)

    def crash(self, instance: str, *, promote: bool | None = None) -> str | None:
        """Kill -9 an instance. When it was the primary (and ``promote`` is not False), play
        the HA authority as Aurora does: promote the most caught-up replica (as the proxy saw
        them) and point the other replicas at it; returns the new primary's name (None when
        nothing was promoted). Like Aurora, no acknowledged write is lost: before killing a
        primary this waits (up to 10 s) until the replicas have replayed it. The crashed
        instance stays down until ``restart``."""
        local = self._local()
        was_primary = instance == local.primary_name
        replicas: dict[str, int | None] = {i["name"]: i["lag_bytes"] for i in self.topology()["instances"]
                                           if i["role"] == "reader" and i["health"] == "up" and i["name"] != instance}
        if was_primary and replicas:
            # Aurora loses no acknowledged write in a crash (shared storage): let the replicas
            # replay what the primary has before it dies.
            try:
                local.wait_caught_up(*replicas, timeout=10)
            except (TimeoutError, OSError, subprocess.CalledProcessError):
                pass
        local.kill(instance)
        self.crashed.add(instance)
        if not was_primary or promote is False or not replicas:
            return None
        new: str = min(replicas, key=lambda n: (replicas[n] is None, replicas[n] or 0))
        local.promote(new)
        for other in replicas:
            if other != new:
                local.follow(other, new)
        return new

    def restart(self, instance: str) -> None:
        """Start a crashed (or stopped) instance again as a replica of the current primary."""
        local = self._local()
        local.follow(instance, local.primary_name)
        self.crashed.discard(instance)
