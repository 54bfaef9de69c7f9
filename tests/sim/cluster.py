"""The simulated cluster: a parsed configuration, a ClusterRuntime whose monitor asks the
simulation (not servers) what each instance is, fake servers, and the dialer sessions use.

``Sim`` owns the in-memory network: every client connection and every backend connection a
session opens is a ``Link`` whose deliveries come from the simulation's settings, so one
setting cuts every stream of that direction the same way. The monitor is ClusterRuntime's own
loop (``monitor_instance``) with ``probe_once`` answered from ``roles``: a session that loses a
backend asks ``cluster.verdict(name)``, which waits for a probe, which reads ``roles`` — the
test decides the verdict by setting ``roles`` before it breaks the connection.
"""

from __future__ import annotations

import functools
import ssl
import tempfile
from pathlib import Path
from typing import Any

import trio

from endpoint_proxy.config import ClusterConfig, parse_config
from endpoint_proxy.localcluster.certs import write_self_signed
from endpoint_proxy.protocol.mysql.auth import native_password_hash
from endpoint_proxy.protocol.pg.auth import (
    ScramKeys,
    ScramSecret,
    format_scram_verifier,
    make_scram_secret,
    scram_keys_from_password,
)
from endpoint_proxy.relay.hub import Hub
from endpoint_proxy.relay.net import Conn
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.mysql.session import MySession
from endpoint_proxy.server.pg.session import PgSession
from endpoint_proxy.server.session.context import CancelRegistry, SessionContext
from endpoint_proxy.topology.state import ProbeResult

from .myserver import MyInstance
from .net import WHOLE, Delivery, Link, SocketLink
from .pgserver import PgInstance

WRITER, REPLICA, DOWN = "writer", "replica", "down"
USER = "app"
PROBE_S = 0.0005  # how long a simulated probe takes
PASSWORD = "app-secret"


@functools.cache
def _tls_files() -> tuple[str, str]:
    directory = Path(tempfile.mkdtemp(prefix="sim-tls-"))
    cert, key = write_self_signed(directory)
    return str(cert), str(key)


def server_tls_context() -> ssl.SSLContext:
    """A server-side context with a self-signed certificate (made once per test run)."""
    cert, key = _tls_files()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


@functools.cache
def scram_secret() -> tuple[ScramSecret, ScramKeys]:
    """The user's verifier (what servers and the proxy keep) and its keys (what the client proves
    with): PBKDF2 once per test run."""
    secret = make_scram_secret(PASSWORD, salt=b"sim-salt-0123456")
    return secret, scram_keys_from_password(PASSWORD, secret.salt, secret.iterations)


def native_hash() -> bytes:
    return native_password_hash(PASSWORD)


class SimRuntime(ClusterRuntime):
    """A ClusterRuntime whose probes read the simulation's ``roles`` instead of servers."""

    def __init__(self, config: ClusterConfig, roles: dict[str, str]) -> None:
        super().__init__(config)
        self.roles = roles
        self.timelines = {name: 1 for name in roles}
        self.probes = 0

    async def probe_once(self, name: str, conn: Any) -> Any:
        # A probe is a round trip: it takes time (ClusterRuntime.verdict tells probes apart by
        # their time, so probes at one instant of the mock clock would look like one).
        await trio.sleep(PROBE_S)
        self.probes += 1
        role = self.roles.get(name, DOWN)
        now = trio.current_time()
        if role == DOWN:
            self._apply(self.topology.probe_failed(name, now, "sim: down"))
        elif role == WRITER:
            result = ProbeResult(in_recovery=False, timeline=self.timelines[name], current_lsn=1000)
            self._apply(self.topology.probe_succeeded(name, now, result=result))
        else:
            result = ProbeResult(in_recovery=True, receive_lsn=1000, replay_lsn=1000)
            self._apply(self.topology.probe_succeeded(name, now, result=result))
        return None


def cluster_doc(protocol: str, roles: dict[str, str], endpoints: list[dict[str, Any]],
                **overrides: Any) -> dict[str, Any]:
    mysql = protocol == "mysql"
    secret, _ = scram_secret()
    stored = "*" + native_hash().hex().upper() if mysql else format_scram_verifier(secret)
    doc: dict[str, Any] = {
        "name": "sim",
        "protocol": protocol,
        "health_check_interval_ms": 250,
        "failover_timeout_ms": 3000,
        "users": [{"name": USER, "password": stored}],
        "instances": [{"name": name, "host": f"10.0.0.{i + 1}", "port": 3306 if mysql else 5432}
                      for i, name in enumerate(roles)],
        "endpoints": endpoints,
    }
    if not mysql:
        doc["backend_auth"] = ["scram-sha-256", "trust"]
    doc.update(overrides)
    return doc


# Sessions are handed their client connection directly: the listen addresses are never bound.
ENDPOINTS = [
    {"name": "writer", "listen": "127.0.0.1:1", "kind": "writer"},
    {"name": "reader", "listen": "127.0.0.1:2", "kind": "reader"},
    {"name": "rw", "listen": "127.0.0.1:3", "kind": "readwrite"},
]


class Sim:
    """One simulated cluster with its fake servers, and the sessions opened against it."""

    # "memory": MemoryConn ends (the shell's reader tasks); "hub": TCP sockets served by the relay
    # hub. Tests choose with the ``transport`` fixture (conftest.py).
    transport = "memory"

    def __init__(self, protocol: str, roles: dict[str, str] | None = None, *,
                 endpoints: list[dict[str, Any]] | None = None, scram_backends: bool = False,
                 tls_backends: bool = False, **overrides: Any) -> None:
        self.protocol = protocol
        self.hub: Hub | None = None
        self.mysql = protocol == "mysql"
        roles = dict(roles or {"w": WRITER, "r1": REPLICA})
        doc = cluster_doc(protocol, roles, endpoints or ENDPOINTS, **overrides)
        self.config = parse_config({"clusters": [doc]}).clusters[0]
        self.cluster = SimRuntime(self.config, roles)
        self.roles = self.cluster.roles
        self.tls = server_tls_context()
        secret, self.keys = scram_secret()
        self.servers: dict[str, Any] = {}
        for i, name in enumerate(roles):
            tls = self.tls if tls_backends else None
            if self.mysql:
                self.servers[name] = MyInstance(name, in_recovery=roles[name] == REPLICA, password_hash=native_hash(),
                                                tls_context=tls, thread_base=100 * (i + 1))
            else:
                self.servers[name] = PgInstance(name, in_recovery=roles[name] == REPLICA,
                                                secret=secret if scram_backends else None, tls_context=tls,
                                                pid_base=1000 * (i + 1))
        # How the backend streams are delivered: server -> proxy and proxy -> server.
        self.from_server: Delivery = WHOLE
        self.to_server: Delivery = WHOLE
        self.links: list[Link] = []
        self.backend_links: list[Link] = []
        self.cancels = CancelRegistry()
        self._nursery: trio.Nursery | None = None
        self._ids = 0
        self.running = 0  # sessions and server connections not finished yet
        self._finished = trio.Event()

    # --- running ---------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the monitor (one loop per instance) and wait for a first probe of each."""
        self._nursery = nursery
        if self.transport == "hub":
            self.hub = Hub()
            await nursery.start(self.hub.run)
        for name in self.roles:
            nursery.start_soon(self.cluster.monitor_instance, name)
        while any(st.last_probe_at is None for st in self.cluster.topology.instances.values()):
            await trio.sleep(0.001)

    def set_roles(self, **roles: str) -> None:
        """What the monitor will see from now on (a new writer gets a newer timeline)."""
        for name, role in roles.items():
            if role == WRITER and self.roles.get(name) != WRITER:
                self.cluster.timelines[name] = max(self.cluster.timelines.values()) + 1
            self.roles[name] = role
            self.servers[name].in_recovery = role == REPLICA

    async def settle(self) -> None:
        """Probe every instance now and wait until the topology reflects ``roles``."""
        before = self.cluster.probes
        self.cluster.request_probe()
        while self.cluster.probes < before + len(self.roles):
            await trio.sleep(0.001)

    def context(self, endpoint: str) -> SessionContext:
        ep = next(e for e in self.config.endpoints if e.name == endpoint)
        return SessionContext(cluster=self.cluster, endpoint=ep, tls_context=self.tls, cancels=self.cancels,
                              startup_timeout_s=10.0, max_startup_bytes=10_000, max_message_bytes=0x3FFFFFFF,
                              connect_timeout_s=5.0, dial=self.dial, hub=self.hub)

    async def dial(self, host: str, port: int) -> Conn:
        name = next(i.name for i in self.config.instances if i.host == host and i.port == port)
        if self.roles.get(name) == DOWN:
            raise ConnectionRefusedError(f"sim: {name} is down")
        link = self._link(f"proxy-{name}", self.to_server, self.from_server, proxy_end="a")
        self.links.append(link)
        self.backend_links.append(link)
        assert self._nursery is not None
        self.running += 1
        self._nursery.start_soon(self._serve, name, link)
        return link.a

    def _link(self, name: str, a_to_b: Delivery, b_to_a: Delivery, *, proxy_end: str) -> Link:
        if self.transport == "hub":
            assert self._nursery is not None
            return SocketLink(name, a_to_b, b_to_a, proxy_end=proxy_end, nursery=self._nursery)
        return Link(name, a_to_b, b_to_a)

    async def _serve(self, name: str, link: Link) -> None:
        try:
            await self.servers[name].serve(link.b)
        finally:
            self._ended()

    def session(self, endpoint: str, to_proxy: Delivery = WHOLE,
                from_proxy: Delivery = WHOLE) -> tuple[Conn, PgSession | MySession, Link]:
        """Open a client connection to ``endpoint`` and start its session; returns the client's end."""
        assert self._nursery is not None
        self._ids += 1
        link = self._link(f"client{self._ids}-{endpoint}", to_proxy, from_proxy, proxy_end="b")
        self.links.append(link)
        cls = MySession if self.mysql else PgSession
        session = cls(self.context(endpoint), link.b, self._ids)
        self.running += 1
        self._nursery.start_soon(self._run, session)
        return link.a, session, link

    async def _run(self, session: PgSession | MySession) -> None:
        try:
            await session.run()
        finally:
            self._ended()

    def _ended(self) -> None:
        self.running -= 1
        self._finished.set()
        self._finished = trio.Event()

    async def sessions_done(self) -> None:
        """Wait until every session (and the server end of every backend connection) has ended;
        then nothing may be left counted or open."""
        while self.running:
            await self._finished.wait()
        cluster = self.cluster
        assert not +cluster.connections, f"backends still counted: {cluster.connections}"
        assert not +cluster.inflight, f"requests still counted: {cluster.inflight}"
        for link in self.backend_links:
            # The proxy's end (a) has closed (or the link broke): nothing leaks.
            assert link.forward.eof or link.forward.broken, f"a backend connection left open: {link.name}"

    def dump(self) -> str:
        return "\n".join(link.dump() for link in self.links[-6:])
