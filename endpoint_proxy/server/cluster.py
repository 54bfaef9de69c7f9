"""A cluster at run time: its topology, the monitor tasks that probe it, and connection counts."""

from __future__ import annotations

import contextlib
import math
import secrets
from collections import Counter
from typing import Any

import structlog
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from ..config import ClusterConfig, EndpointConfig, UserConfig
from ..protocol.errors import ProtocolError
from ..protocol.mysql.auth import caching_sha2_digest, native_password_hash
from ..protocol.pg.auth import ScramSecret, make_scram_secret
from ..routing.endpoints import Route, route
from ..routing.pg_classify import FunctionPolicy
from ..topology.state import ClusterTopology, ProbeResult, TopologyEvent
from .drills import ClusterDrills
from .metrics import ClusterMetrics, ProxyMetrics
from .mysql.backend import MyBackendError, MyProbeConnection
from .mysql.probe import probe_mariadb
from .pg.backend import BackendError, ProbeConnection

log = structlog.get_logger("endpoint_proxy.cluster")

# What the monitor asks each PostgreSQL instance: role, WAL positions as byte counts, the
# age of the last replayed transaction, and (on a writable instance) its timeline.
PG_PROBE_SQL = """
select pg_is_in_recovery(),
       case when pg_is_in_recovery() then null else pg_current_wal_lsn() - '0/0' end,
       pg_last_wal_receive_lsn() - '0/0',
       pg_last_wal_replay_lsn() - '0/0',
       coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0),
       case when pg_is_in_recovery() then null
            else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end
"""


# User functions that may write: volatile ones outside the system schemas.
VOLATILE_FUNCTIONS_SQL = r"""
select coalesce(string_agg(distinct lower(p.proname), E'\x1f'), '')
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where p.provolatile = 'v' and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname not like 'pg\_toast%'
"""


def parse_probe_row(row: tuple[str | None, ...]) -> ProbeResult:
    def num(v: str | None) -> int | None:
        return None if v is None else int(float(v))

    return ProbeResult(
        in_recovery=row[0] == "t",
        current_lsn=num(row[1]),
        receive_lsn=num(row[2]),
        replay_lsn=num(row[3]),
        replay_age_s=float(row[4] or 0),
        timeline=num(row[5]),
    )


class ClusterRuntime:
    def __init__(self, config: ClusterConfig, metrics: ClusterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else ProxyMetrics().cluster(config.name)
        self.topology = ClusterTopology(tuple(i.name for i in config.instances),
                                        max_replica_lag_ms=config.max_replica_lag_ms)
        self.connections: Counter[str] = Counter()  # open session backends per instance
        self.inflight: Counter[str] = Counter()  # requests running per instance
        self._changed = trio.Event()
        self._probe_now: dict[str, trio.Event] = {i.name: trio.Event() for i in config.instances}
        self._scram: dict[str, ScramSecret] = {}
        # A secret for users that do not exist, so their exchange looks like any other.
        self._unknown_user_secret = make_scram_secret(secrets.token_urlsafe(24))
        self.weights = {i.name: i.weight for i in config.instances}
        self._rotation = 0
        # Per database: the user functions that may write (volatile, from the writer's catalog).
        self._functions: dict[str, tuple[FunctionPolicy, float]] = {}
        self._functions_loading: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._monitor_scopes: dict[str, trio.CancelScope] = {}
        # MySQL: password verifiers per user (native SHA1(SHA1()), caching_sha2 SHA256(SHA256())),
        # the RSA key for caching_sha2's full path without TLS, the server version to announce,
        # and the live sessions by connection id (for KILL).
        self._mysql_secrets: dict[str, tuple[bytes, bytes]] = {}
        self._rsa_key: rsa.RSAPrivateKey | None = None
        self.mysql_server_version: str | None = None
        self.mysql_sessions: dict[int, Any] = {}
        # Switchovers, injected faults, the writer gate, the status page's series (server/drills.py).
        self.drills = ClusterDrills(self)

    # --- credentials --------------------------------------------------------------------------

    def scram_secret(self, user: UserConfig | None) -> ScramSecret:
        """The SCRAM verifier of a configured user, derived once (PBKDF2 is slow on purpose)."""
        if user is None:
            return self._unknown_user_secret
        secret = self._scram.get(user.name)
        if secret is None:
            secret = make_scram_secret(user.password)
            self._scram[user.name] = secret
        return secret

    def prepare_secrets(self) -> None:
        if self.config.protocol == "mysql":
            for user in self.config.users:
                self.mysql_secrets(user)
            if self.config.client_auth == "caching_sha2_password" or any(
                    u.auth == "caching_sha2_password" for u in self.config.users):
                self.rsa_key()
            return
        for user in self.config.users:
            self.scram_secret(user)

    def mysql_secrets(self, user: UserConfig | None) -> tuple[bytes, bytes]:
        """(native password hash, caching_sha2 digest) of a user; an unknown user gets
        random ones, so its exchange looks like any other and fails with 1045."""
        if user is None:
            junk = secrets.token_bytes(32)
            return native_password_hash(junk), caching_sha2_digest(junk)
        entry = self._mysql_secrets.get(user.name)
        if entry is None:
            entry = (native_password_hash(user.password), caching_sha2_digest(user.password))
            self._mysql_secrets[user.name] = entry
        return entry

    def rsa_key(self) -> rsa.RSAPrivateKey:
        if self._rsa_key is None:
            self._rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._rsa_key

    def monitor_credentials(self) -> tuple[str, str | None]:
        if self.config.monitor is not None:
            return self.config.monitor.user, self.config.monitor.password
        if self.config.users:
            return self.config.users[0].name, self.config.users[0].password
        return "postgres", None

    # --- routing ------------------------------------------------------------------------------

    def load(self) -> dict[str, float]:
        """Requests in flight per instance, then (as a fraction, to break ties) open backends."""
        return {n: self.inflight[n] + self.connections[n] / 1e6 for n in self.topology.instance_names}

    def route(self, endpoint: EndpointConfig) -> Route:
        self._rotation += 1
        return route(endpoint, self.topology, self.load(),
                     fallback_to_writer=self.config.reader_fallback_to_writer,
                     weights=self.weights, rotation=self._rotation)

    async def wait_for_route(self, endpoint: EndpointConfig, timeout_s: float, *, held: bool = False) -> Route:
        """Route now; if nothing qualifies, ask for fresh probes and wait up to ``timeout_s``.

        ``held``: the caller is a statement (not a new connection); while it waits for a
        writer it shows in the held-statement metrics."""
        decision = self.route(endpoint)
        if decision.instance is not None:
            return decision
        hold = self.metrics.holding() if held and decision.needs_writer else contextlib.nullcontext()
        with hold, trio.move_on_after(timeout_s):
            while decision.instance is None:
                changed = self._changed
                self.request_probe()
                await changed.wait()
                decision = self.route(endpoint)
        return decision

    def function_policy(self, database: str) -> FunctionPolicy:
        """The classifier's function knowledge for a database: config lists plus the writer's
        volatile user functions (refreshed in the background every function_refresh_ms)."""
        entry = self._functions.get(database)
        now = trio.current_time()
        refresh_s = self.config.function_refresh_ms / 1000
        if entry is None or (refresh_s and now - entry[1] > refresh_s):
            if database not in self._functions_loading and self._nursery is not None:
                self._functions_loading[database] = trio.Event()
                self._nursery.start_soon(self._load_functions, database)
        if entry is None:
            return FunctionPolicy(frozenset(self.config.read_functions), frozenset(self.config.write_functions))
        return entry[0]

    async def ensure_functions(self, database: str, timeout_s: float = 2.0) -> None:
        """Wait (bounded) for the first catalog read of a database."""
        self.function_policy(database)
        loading = self._functions_loading.get(database)
        if loading is not None and database not in self._functions:
            with trio.move_on_after(timeout_s):
                await loading.wait()

    async def _load_functions(self, database: str) -> None:
        writer = self.topology.writer
        volatile: frozenset[str] = frozenset()
        try:
            if writer is not None:
                inst = self.config.instance_named(writer)
                user, password = self.monitor_credentials()
                with trio.fail_after(5):
                    conn = await ProbeConnection.open(writer, inst.address, user=user, password=password,
                                                      database=database, tls_mode=self.config.backend_tls)
                    try:
                        rows = await conn.query(VOLATILE_FUNCTIONS_SQL)
                    finally:
                        await conn.aclose()
                volatile = frozenset(n for n in (rows[0][0] or "").split("\x1f") if n)
        except (OSError, BackendError, trio.TooSlowError, IndexError) as e:
            log.info("function_catalog_failed", cluster=self.config.name, database=database, error=str(e))
        finally:
            policy = FunctionPolicy(frozenset(self.config.read_functions),
                                    frozenset(self.config.write_functions) | volatile)
            self._functions[database] = (policy, trio.current_time())
            self._functions_loading.pop(database).set()

    def request_probe(self, name: str | None = None) -> None:
        """Probe one instance (or all) now instead of at the next interval."""
        for n, ev in self._probe_now.items():
            if name is None or n == name:
                ev.set()

    def backend_failed(self, name: str, error: str) -> None:
        """A session could not reach an instance: stop routing there and probe it at once."""
        log.info("backend_failed", cluster=self.config.name, instance=name, error=error)
        self.metrics.error("backend_failed")
        self._apply(self.topology.mark_suspect(name, trio.current_time(), error))
        self.request_probe(name)

    # --- monitor ------------------------------------------------------------------------------

    def _apply(self, events: list[TopologyEvent]) -> None:
        for ev in events:
            log.info(ev.kind, cluster=self.config.name, instance=ev.instance, detail=ev.detail)
        if events:
            self.metrics.topology_changed(events, trio.current_time())
            self.drills.note_topology(events)
        # Every probe result wakes waiters: a route may now exist, or a wait may give up.
        self._changed.set()
        self._changed = trio.Event()

    async def probe_once(self, name: str, conn: Any) -> Any:
        """One probe over the instance's persistent monitor connection (opened when needed);
        returns the connection to keep, or None after a failure."""
        inst = self.config.instance_named(name)
        timeout = max(1.0, 4 * self.config.health_check_interval_ms / 1000)
        user, password = self.monitor_credentials()
        mysql = self.config.protocol == "mysql"
        try:
            with trio.fail_after(timeout):
                self.drills.check_probe(name)  # an injected INSTANCE FAILURE fails the probe here
                if mysql:
                    if conn is None:
                        conn = await MyProbeConnection.open(name, inst.address, user=user, password=password,
                                                            tls_mode=self.config.backend_tls)
                    result = await probe_mariadb(conn)
                    if self.mysql_server_version is None or not result.in_recovery:
                        self.mysql_server_version = conn.backend.server_version
                else:
                    if conn is None:
                        conn = await ProbeConnection.open(name, inst.address, user=user, password=password,
                                                          tls_mode=self.config.backend_tls)
                    rows = await conn.query(PG_PROBE_SQL)
                    result = parse_probe_row(rows[0])
            self._apply(self.topology.probe_succeeded(name, trio.current_time(), result=result))
            return conn
        except (OSError, BackendError, MyBackendError, ProtocolError, trio.TooSlowError, IndexError,
                ValueError) as e:
            reason = "probe timed out" if isinstance(e, trio.TooSlowError) else str(e) or type(e).__name__
            self.metrics.error("probe_failed")
            self._apply(self.topology.probe_failed(name, trio.current_time(), reason))
            if conn is not None:
                with trio.CancelScope(shield=True):
                    await conn.backend.conn.aclose()
            return None

    async def monitor_instance(self, name: str) -> None:
        conn: Any = None
        scope = self._monitor_scopes[name] = trio.CancelScope()
        try:
            with scope:
                while True:
                    self._probe_now[name] = trio.Event()
                    conn = await self.probe_once(name, conn)
                    with trio.move_on_after(self.config.health_check_interval_ms / 1000):
                        await self._probe_now[name].wait()
        finally:
            if self._monitor_scopes.get(name) is scope:
                del self._monitor_scopes[name]
            if conn is not None:
                with trio.CancelScope(shield=True):
                    await conn.aclose()

    def apply_config(self, new: ClusterConfig) -> list[str]:
        """Live reload: take a changed configuration of this cluster. Instances added start
        being monitored; removed ones (or ones whose address changed) leave the topology, so
        their sessions move at their next statement; changed passwords take effect for new
        logins. Returns a description of what changed, for the log."""
        old = self.config
        changes: list[str] = []
        old_addr = {i.name: (i.host, i.port) for i in old.instances}
        new_addr = {i.name: (i.host, i.port) for i in new.instances}
        gone = [n for n in old_addr if new_addr.get(n) != old_addr[n]]
        added = [n for n in new_addr if old_addr.get(n) != new_addr[n]]
        self.config = new
        for name in gone:
            scope = self._monitor_scopes.pop(name, None)
            if scope is not None:
                scope.cancel()
            self._probe_now.pop(name, None)
            changes.append(f"instance {name} removed" if name not in new_addr else f"instance {name} moved")
        self.topology.set_instances(tuple(i.name for i in new.instances))
        self.topology.max_replica_lag_ms = new.max_replica_lag_ms
        for name in added:
            self._probe_now[name] = trio.Event()
            if self._nursery is not None:
                self._nursery.start_soon(self.monitor_instance, name)
            if name not in gone:
                changes.append(f"instance {name} added")
        self.weights = {i.name: i.weight for i in new.instances}
        old_users = {u.name: u for u in old.users}
        for user in new.users:
            if old_users.get(user.name) != user:
                self._scram.pop(user.name, None)
                self._mysql_secrets.pop(user.name, None)
                changes.append(f"user {user.name} {'changed' if user.name in old_users else 'added'}")
        for name in old_users.keys() - {u.name for u in new.users}:
            self._scram.pop(name, None)
            self._mysql_secrets.pop(name, None)
            changes.append(f"user {name} removed")
        self._functions.clear()
        # Endpoint rules may have changed too: make every session re-check its placement.
        self.topology.generation += 1
        self._changed.set()
        self._changed = trio.Event()
        return changes

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe every instance once, then keep monitoring; reports started after the first round."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first = [self._changed]
            for inst in self.config.instances:
                nursery.start_soon(self.monitor_instance, inst.name)
            nursery.start_soon(self.drills.run)
            # Wait (bounded) until every instance has an answer, so the first clients route well.
            with trio.move_on_after(max(2.0, 8 * self.config.health_check_interval_ms / 1000)):
                while any(st.last_probe_at is None for st in self.topology.instances.values()):
                    await first[0].wait()
                    first[0] = self._changed
            task_status.started()
            await trio.sleep(math.inf)
