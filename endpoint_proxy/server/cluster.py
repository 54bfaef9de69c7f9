"""A cluster at run time: its topology, the monitor tasks that probe it, and connection counts."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from ..config import (
    STORED_MD5,
    STORED_MYSQL_NATIVE,
    STORED_SCRAM,
    ClusterConfig,
    EndpointConfig,
    InstanceConfig,
    StoredPassword,
    UserConfig,
    parse_stored_password,
)
from ..protocol.errors import ProtocolError
from ..protocol.mysql.auth import MyCredential, caching_sha2_digest, native_password_hash, parse_native_hash
from ..protocol.pg.auth import (
    CleartextServerAuth,
    Md5ServerAuth,
    PgCredential,
    ScramKeys,
    ScramSecret,
    ScramServerAuth,
    ServerAuth,
    make_scram_secret,
    md5_stored_hash,
    parse_scram_verifier,
)
from ..routing.endpoints import Route, route
from ..routing.pg_classify import FunctionPolicy
from ..topology.pg_probe import PG_PROBE_SQL, VOLATILE_FUNCTIONS_SQL, parse_function_names, parse_probe_row
from ..topology.state import AuthorityConstraint, ClusterTopology, Health, ProbeResult, TopologyEvent
from ..topology.verdict import Verdict, verdict_of
from .backend_security import BackendSecurity, make_backend_security
from .drills import ClusterDrills
from .metrics import ClusterMetrics, ProxyMetrics
from .mysql.backend import MyBackendError, MyProbeConnection
from .mysql.probe import probe_mariadb
from .patroni import PatroniAuthority, PatroniPromotion
from .pg.backend import BackendError, ProbeConnection
from .pools import PoolRegistry
from .promotion import Promotion, make_promotion
from .state_file import StateFile

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa


def _new_rsa_key() -> rsa.RSAPrivateKey:
    """The key caching_sha2_password clients encrypt passwords with (cryptography imported only
    when one is needed: most proxies never do)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)

log = structlog.get_logger("endpoint_proxy.cluster")

# Endpoint kinds whose route is the writer (routing.endpoints.route reads no load for them).
_WRITER_KINDS = frozenset(("writer", "readwrite"))
_NO_LOAD: dict[str, float] = {}

# auth_query answers kept at most (least recently used go first), and how long one may run.
AUTH_CACHE_ENTRIES = 10_000
AUTH_QUERY_TIMEOUT_S = 5.0


class AuthQueryError(Exception):
    """auth_query could not be run (no writer, the query failed): the login cannot be judged."""


@dataclass
class StagedCredentials:
    """What a configuration's credentials cost to prepare (PBKDF2, RSA, reading key files),
    computed off the event loop before a reload commits (``ClusterRuntime.stage_credentials``)."""

    security: BackendSecurity
    scram: dict[str, tuple[UserConfig, ScramSecret]] = field(default_factory=dict)
    mysql: dict[str, tuple[UserConfig, tuple[bytes, bytes]]] = field(default_factory=dict)
    rsa_key: rsa.RSAPrivateKey | None = None



# How much longer than a probe may take verdict() waits, by default, for a fresh one.
VERDICT_MARGIN_S: Final = 0.5
# An instance that has never answered (at proxy start, or just added) gets this long for its
# first probe: the servers and the machine are often busy then, and a slow first answer is
# not a failure worth an instance_down. Nothing routes to an instance before its first
# answer, and once it has answered every probe has the normal timeout, so no failure is
# detected later for it.
FIRST_PROBE_TIMEOUT_S: Final = 5.0
# When the HA authority names a new leader, the proxy probes it this often until it accepts
# writes (the leader key moves ~0.1 s before the server does), for at most CONFIRM_LEADER_S.
CONFIRM_POLL_S: Final = 0.005
CONFIRM_LEADER_S: Final = 60.0
# Errors a probe expects from a server that is down or broken; anything else is logged with
# its traceback too (once per new error), as it may be a bug of ours.
_EXPECTED_PROBE_ERRORS: Final = (OSError, BackendError, MyBackendError, ProtocolError, ValueError)


def describe_error(e: BaseException) -> str:
    """A probe's error for last_error and the log: the proxy's own errors say what happened;
    anything else is named by its type too (a bare KeyError's message is just a key)."""
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    text = str(e)
    if isinstance(e, BackendError | MyBackendError | ProtocolError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class ClusterRuntime:
    def __init__(self, config: ClusterConfig, metrics: ClusterMetrics | None = None, *,
                 state: StateFile | None = None) -> None:
        self.config = config
        self.configured = config  # as configured; ``config`` has Patroni's members as its instances
        self.metrics = metrics if metrics is not None else ProxyMetrics().cluster(config.name)
        self.topology = ClusterTopology(tuple(i.name for i in config.instances),
                                        max_replica_lag_ms=config.max_replica_lag_ms)
        self.connections: Counter[str] = Counter()  # open session backends per instance
        self.inflight: Counter[str] = Counter()  # requests running per instance
        self._changed = trio.Event()
        self._probe_now: dict[str, trio.Event] = {i.name: trio.Event() for i in config.instances}
        # Verifiers per user name, with the UserConfig they were made from (a reload that
        # changes the user makes a new one).
        self._scram: dict[str, tuple[UserConfig, ScramSecret]] = {}
        # A secret for users that do not exist, so their exchange looks like any other.
        self._unknown_user_secret = make_scram_secret(secrets.token_urlsafe(24))
        self.backend_security: BackendSecurity = make_backend_security(config)
        # auth_query: verifiers by user name (None: no such user) with their expiry time.
        self._auth_cache: OrderedDict[str, tuple[float, StoredPassword | None]] = OrderedDict()
        self._auth_pending: dict[str, trio.Event] = {}
        self._auth_lock = trio.Lock()
        self._auth_conn: tuple[str, ProbeConnection] | None = None  # (instance, connection)
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
        self._mysql_secrets: dict[str, tuple[UserConfig, tuple[bytes, bytes]]] = {}
        self._rsa_key: rsa.RSAPrivateKey | None = None
        self.mysql_server_version: str | None = None
        self.mysql_sessions: dict[int, Any] = {}
        # Switchovers, injected faults, the writer gate, the status page's series (server/drills.py).
        self.drills = ClusterDrills(self)
        # Pools of server connections for transaction-mode endpoints (server/pools.py).
        self.pools = PoolRegistry(self)
        self.drills.make_promotion = self._make_promotion
        # Patroni as the HA authority ([clusters.patroni]): the members and the leader key.
        self.patroni: PatroniAuthority | None = None
        self._patroni_scope: trio.CancelScope | None = None
        self._confirming: str | None = None  # the leader a fast confirmation loop probes now
        self.writer_changed_at: float | None = None  # wall clock of the last writer change
        if config.patroni is not None:
            self.patroni = self._new_authority(config)
            self.topology.set_authority(AuthorityConstraint(None, "patroni"))
        # Per instance, the session backends open on it: what to call when a fault starts there
        # (a session wraps the connection in the fault's toxics, or sees it reset).
        self.live_backends: dict[str, dict[int, Any]] = {}  # instance -> {id(backend): its BackendSet}
        # Probe sequence numbers per instance: probes started, and the last one finished.
        self._probes_started: Counter[str] = Counter()
        self._probes_finished: Counter[str] = Counter()
        # Per instance: the probe a session's reported failure waits for (see backend_failed).
        self._reported: dict[str, int] = {}
        # Fencing's memory: seeded from the state file, written back when it rises.
        self.state = state if state is not None else StateFile(None)
        recorded = self.state.recorded(config.name)
        if recorded is not None:
            self.topology.remember(recorded)
        self._recorded_mark = self.topology.high_water

    # --- credentials --------------------------------------------------------------------------
    #
    # What a session calls (the proxy never needs a user's plain password):
    #   user = cluster.config.user(name) or await cluster.find_user(name)   # None: unknown
    #   auth = cluster.pg_server_auth(name, user, method)   # or my_server_auth secrets below
    #   ... run the exchange ...
    #   credential = cluster.pg_backend_credential(name, auth)              # at each server login
    #   open_backend(..., user=name, credential=credential, security=cluster.backend_security)

    def scram_secret(self, user: UserConfig | None) -> ScramSecret:
        """The SCRAM verifier of a user: the configured one, or one derived once from the
        password (PBKDF2 is slow on purpose: ``prepare_secrets`` does it off the event loop).
        An unknown user, or one with only an md5 hash, gets a verifier nobody can match."""
        if user is None:
            return self._unknown_user_secret
        if user.stored is not None:
            if user.stored.kind == STORED_SCRAM:
                return parse_scram_verifier(user.stored.text)
            return self._unknown_user_secret
        entry = self._scram.get(user.name)
        if entry is None or entry[0] != user:
            entry = (user, make_scram_secret(user.password or ""))
            self._scram[user.name] = entry
        return entry[1]

    def md5_hash(self, user: UserConfig | None) -> str:
        """What PostgreSQL stores for md5 ('md5' + md5(password + name)); random for an unknown user."""
        if user is None:
            return "md5" + secrets.token_hex(16)
        if user.stored is not None:
            return user.stored.text if user.stored.kind == STORED_MD5 else "md5" + secrets.token_hex(16)
        return md5_stored_hash(user.name, user.password or "")

    def client_method(self, user: UserConfig | None) -> str:
        """How a PostgreSQL client authenticates: the user's ``auth``, else ``client_auth``;
        md5 becomes SCRAM for a user known by a SCRAM verifier only (as PostgreSQL does)."""
        method = (user.auth if user is not None and user.auth else None) or self.config.client_auth
        if method == "md5" and user is not None and user.stored is not None and user.stored.kind == STORED_SCRAM:
            return "scram-sha-256"
        return method

    def pg_server_auth(self, name: str, user: UserConfig | None, method: str) -> ServerAuth:
        """The exchange that checks a PostgreSQL client (``method`` from ``client_method``;
        the caller refuses cleartext without TLS). An unknown user goes through the same
        exchange and fails like a wrong password."""
        if method == "password":
            if user is not None and user.password is not None:
                return CleartextServerAuth(name, user.password)
            return CleartextServerAuth(name, md5_hash=self.md5_hash(user))
        if method == "md5":
            if user is not None and user.password is not None:
                return Md5ServerAuth(name, user.password)
            return Md5ServerAuth(name, md5_hash=self.md5_hash(user))
        return ScramServerAuth(name, self.scram_secret(user))

    def pg_backend_credential(self, name: str, login: ServerAuth | ScramKeys | None = None) -> PgCredential:
        """What to log in to a server with for user ``name``, now: the configured password
        (a reload's rotation applies to the next server login), its md5 hash, and the SCRAM
        keys of the client's own login (``login``: its finished ``ScramServerAuth``, or the
        keys taken from it), which log in wherever the server keeps the same verifier."""
        keys = login.passthrough_keys() if isinstance(login, ScramServerAuth) else (
            login if isinstance(login, ScramKeys) else None)
        user = self.config.user(name)
        password = user.password if user is not None else None
        md5 = None
        if user is not None and user.stored is not None and user.stored.kind == STORED_MD5:
            md5 = user.stored.text
        elif user is None:
            cached = self._auth_cache.get(name)
            stored = cached[1] if cached is not None else None
            md5 = stored.text if stored is not None and stored.kind == STORED_MD5 else None
        return PgCredential(password=password, md5_hash=md5, scram_keys=keys)

    def my_backend_credential(self, name: str, native_stage1: bytes | None = None) -> MyCredential:
        """MySQL: the configured password (now), or SHA1(password) from the client's own
        mysql_native_password login (``NativePasswordServerAuth.passthrough_stage1()``)."""
        user = self.config.user(name)
        password = user.password if user is not None else None
        return MyCredential(password=password, native_stage1=native_stage1 if password is None else None)

    def stage_credentials(self, config: ClusterConfig) -> StagedCredentials:
        """Everything costly about a configuration's credentials, computed without touching
        this runtime (run it in a thread): verifiers derived from passwords, the RSA key for
        caching_sha2, the backend TLS context and public key. Raises OSError or ssl.SSLError
        when a file cannot be used."""
        staged = StagedCredentials(security=make_backend_security(config))
        for user in config.users:
            if user.password is None:
                continue
            if config.protocol == "mysql":
                old_my = self._mysql_secrets.get(user.name)
                staged.mysql[user.name] = old_my if old_my is not None and old_my[0] == user else (
                    user, (native_password_hash(user.password), caching_sha2_digest(user.password)))
            else:
                old = self._scram.get(user.name)
                staged.scram[user.name] = old if old is not None and old[0] == user else (
                    user, make_scram_secret(user.password))
        if config.protocol == "mysql" and self._rsa_key is None and (
                config.client_auth == "caching_sha2_password"
                or any(u.auth == "caching_sha2_password" for u in config.users)):
            staged.rsa_key = _new_rsa_key()
        return staged

    def install_credentials(self, staged: StagedCredentials) -> None:
        """Take what ``stage_credentials`` made (cannot fail: part of a reload's commit)."""
        self.backend_security = staged.security
        self._scram.update(staged.scram)
        self._mysql_secrets.update(staged.mysql)
        if staged.rsa_key is not None and self._rsa_key is None:
            self._rsa_key = staged.rsa_key
        self._auth_cache.clear()  # auth_query or auth_cache_ms may have changed

    def prepare_secrets(self) -> None:
        """Derive every configured user's secrets now (call in a thread at startup)."""
        self.install_credentials(self.stage_credentials(self.config))

    def mysql_secrets(self, user: UserConfig | None) -> tuple[bytes, bytes]:
        """(native password hash, caching_sha2 digest) of a user; an unknown user gets
        random ones, so its exchange looks like any other and fails with 1045. A user known
        by its native hash only has a random caching_sha2 digest (config allows it only
        mysql_native_password)."""
        if user is None:
            junk = secrets.token_bytes(32)
            return native_password_hash(junk), caching_sha2_digest(junk)
        if user.stored is not None:
            native = (parse_native_hash(user.stored.text) if user.stored.kind == STORED_MYSQL_NATIVE
                      else native_password_hash(secrets.token_bytes(32)))
            return native, caching_sha2_digest(secrets.token_bytes(32))
        entry = self._mysql_secrets.get(user.name)
        if entry is None or entry[0] != user:
            password = user.password or ""
            entry = (user, (native_password_hash(password), caching_sha2_digest(password)))
            self._mysql_secrets[user.name] = entry
        return entry[1]

    def rsa_key(self) -> rsa.RSAPrivateKey:
        if self._rsa_key is None:
            self._rsa_key = _new_rsa_key()
        return self._rsa_key

    def monitor_credentials(self) -> tuple[str, str | None]:
        """The monitor's login: [clusters.monitor], else the first user that has a password."""
        if self.config.monitor is not None:
            return self.config.monitor.user, self.config.monitor.password
        for user in self.config.users:
            if user.password is not None:
                return user.name, user.password
        return "postgres", None

    # --- auth_query: users not in the configuration ---------------------------------------------

    async def find_user(self, name: str) -> UserConfig | None:
        """A configured user, else (with auth_query) one the writer knows, by its stored
        verifier; None when there is no such user. Raises AuthQueryError when auth_query
        cannot be run (the login cannot be judged: answer it like an unavailable server)."""
        user = self.config.user(name)
        if user is not None or self.config.auth_query is None:
            return user
        stored = await self.lookup_user(name)
        return None if stored is None else UserConfig(name=name, stored=stored)

    async def lookup_user(self, name: str) -> StoredPassword | None:
        """The verifier auth_query returns for ``name`` (None: no such user, or no usable
        verifier), run on the writer as the monitor user and cached for auth_cache_ms (a
        bounded cache; concurrent lookups of one name run the query once)."""
        if self.config.auth_query is None:
            return None
        while True:
            hit = self._auth_cache.get(name)
            if hit is not None and hit[0] > trio.current_time():
                self._auth_cache.move_to_end(name)
                return hit[1]
            pending = self._auth_pending.get(name)
            if pending is None:
                break
            await pending.wait()
            if name not in self._auth_cache:  # the lookup we waited for failed
                raise AuthQueryError(f"auth_query for user {name!r} failed")
        done = self._auth_pending[name] = trio.Event()
        try:
            stored = await self._run_auth_query(name)
            self._auth_cache[name] = (trio.current_time() + self.config.auth_cache_ms / 1000, stored)
            self._auth_cache.move_to_end(name)
            while len(self._auth_cache) > AUTH_CACHE_ENTRIES:
                self._auth_cache.popitem(last=False)
            return stored
        finally:
            del self._auth_pending[name]
            done.set()

    async def _run_auth_query(self, name: str) -> StoredPassword | None:
        query = self.config.auth_query
        assert query is not None
        async with self._auth_lock:
            writer = self.topology.writer
            if writer is None:
                raise AuthQueryError("auth_query: no writer is known")
            try:
                with trio.fail_after(AUTH_QUERY_TIMEOUT_S):
                    conn = await self._auth_connection(writer)
                    rows = await conn.query_params(query, (name,))
            except (OSError, BackendError, ProtocolError, trio.TooSlowError) as e:
                await self._close_auth_connection()
                reason = "timed out" if isinstance(e, trio.TooSlowError) else str(e) or type(e).__name__
                log.warning("auth_query_failed", cluster=self.config.name, instance=writer, error=reason)
                raise AuthQueryError(f"auth_query failed on {writer}: {reason}") from None
        return self._auth_row(name, rows)

    def _auth_row(self, name: str, rows: list[tuple[str | None, ...]]) -> StoredPassword | None:
        if not rows:
            return None
        row = rows[0]
        if len(row) < 2 or row[0] != name or row[1] is None:
            return None
        try:
            stored = parse_stored_password(row[1], "postgresql")
        except ValueError:
            stored = None
        if stored is None:
            log.warning("auth_query_unusable", cluster=self.config.name, user=name,
                        detail="the second column is neither a SCRAM-SHA-256 verifier nor an md5 hash")
        return stored

    async def _auth_connection(self, writer: str) -> ProbeConnection:
        if self._auth_conn is not None and self._auth_conn[0] != writer:
            await self._close_auth_connection()  # the writer changed: ask the new one
        if self._auth_conn is None:
            user, password = self.monitor_credentials()
            inst = self.config.instance_named(writer)
            conn = await ProbeConnection.open(writer, inst.address, user=user, password=password,
                                              database=self.config.auth_database, security=self.backend_security)
            self._auth_conn = (writer, conn)
        return self._auth_conn[1]

    async def _close_auth_connection(self) -> None:
        if self._auth_conn is not None:
            conn = self._auth_conn[1]
            self._auth_conn = None
            with trio.CancelScope(shield=True):
                await conn.aclose()

    # --- routing ------------------------------------------------------------------------------

    def load(self) -> dict[str, float]:
        """Requests in flight per instance, then (as a fraction, to break ties) open backends."""
        return {n: self.inflight[n] + self.connections[n] / 1e6 for n in self.topology.instance_names}

    def route(self, endpoint: EndpointConfig, exclude: AbstractSet[str] = frozenset()) -> Route:
        """Where a connection of ``endpoint`` goes now; ``exclude``: instances the caller could
        not reach, passed over without marking anything (see routing.endpoints.route)."""
        self._rotation += 1
        load = _NO_LOAD if endpoint.kind in _WRITER_KINDS else self.load()  # (the writer's route needs none)
        return route(endpoint, self.topology, load,
                     fallback_to_writer=self.config.reader_fallback_to_writer,
                     weights=self.weights, rotation=self._rotation, exclude=exclude)

    async def wait_for_route(self, endpoint: EndpointConfig, timeout_s: float, *, held: bool = False,
                             exclude: AbstractSet[str] = frozenset()) -> Route:
        """Route now; if nothing qualifies, ask for fresh probes and wait up to ``timeout_s``.

        An instance a session reported with backend_failed is not handed out until a probe
        started after that report has answered (at most a probe timeout): the probe decides
        whether it still qualifies. On timeout the last decision is returned (its instance
        None, or one whose probe has not answered yet).

        ``held``: the caller is a statement (not a new connection); while it waits for a
        writer it shows in the held-statement metrics. ``exclude``: see route()."""
        decision = self.route(endpoint, exclude)
        if decision.instance is not None and not self._failure_pending(decision.instance):
            return decision
        probed = holding = False
        with contextlib.ExitStack() as stack, trio.move_on_after(timeout_s):
            while True:
                changed = self._changed
                decision = self.route(endpoint, exclude)
                if decision.instance is not None:
                    if not self._failure_pending(decision.instance):
                        return decision
                else:
                    if not probed:
                        self.request_probe()
                        probed = True
                    if held and decision.needs_writer and not holding:
                        stack.enter_context(self.metrics.holding())
                        holding = True
                await changed.wait()
        return decision

    @property
    def probe_timeout_s(self) -> float:
        """How long a probe of an instance that has answered before may take: a hung server
        is then down as fast as a dead one."""
        return max(1.0, 4 * self.config.health_check_interval_ms / 1000)

    async def verdict(self, name: str, timeout_s: float | None = None) -> Verdict:
        """Probe ``name`` now and return what a probe that started after this call found.

        A probe already under way does not count (it may predate what the caller saw). If no
        such probe finishes within ``timeout_s`` (default: the probe timeout plus
        VERDICT_MARGIN_S), the last known state, with ``fresh`` False. Changes nothing by
        itself: the probe's result goes into the topology like any other."""
        if name not in self._probe_now:
            return verdict_of(self.topology, name, fresh=False)  # not monitored (any more)
        wanted = self._probes_started[name] + 1
        self.request_probe(name)
        if timeout_s is None:
            timeout_s = self.probe_timeout_s + VERDICT_MARGIN_S
        fresh = False
        with trio.move_on_after(timeout_s):
            while self._probes_finished[name] < wanted and name in self._probe_now:
                await self._changed.wait()
            fresh = self._probes_finished[name] >= wanted
        return verdict_of(self.topology, name, fresh=fresh)

    def failure_pending(self, name: str) -> bool:
        """Whether a session reported ``name`` failed and no probe since has answered (see
        wait_for_route): not to be handed out yet."""
        return name in self._reported and self._failure_pending(name)

    def _failure_pending(self, name: str) -> bool:
        """A session reported ``name`` failing and no probe started after that has answered."""
        wanted = self._reported.get(name)
        if wanted is None:
            return False
        if self._probes_finished[name] >= wanted or name not in self._probe_now:
            del self._reported[name]
            return False
        return True

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
        """Read the writer's volatile user functions; any failure (no writer, a server that
        breaks the protocol, names in no known encoding...) falls back to the configured
        lists with a log line."""
        volatile: frozenset[str] = frozenset()
        try:
            volatile = await self._read_volatile_functions(database)
        except Exception as e:  # noqa: BLE001 - whatever the server does, the catalog is optional
            log.warning("function_catalog_failed", cluster=self.config.name, database=database,
                        error=describe_error(e), detail="using read_functions and write_functions only")
        finally:
            policy = FunctionPolicy(frozenset(self.config.read_functions),
                                    frozenset(self.config.write_functions) | volatile)
            self._functions[database] = (policy, trio.current_time())
            self._functions_loading.pop(database).set()

    async def _read_volatile_functions(self, database: str) -> frozenset[str]:
        writer = self.topology.writer
        if writer is None:
            return frozenset()
        inst = self.config.instance_named(writer)
        user, password = self.monitor_credentials()
        with trio.fail_after(5):
            conn = await ProbeConnection.open(writer, inst.address, user=user, password=password,
                                              database=database, security=self.backend_security)
            try:
                return parse_function_names(await conn.query(VOLATILE_FUNCTIONS_SQL))
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await _close_quietly(conn)

    def request_probe(self, name: str | None = None) -> None:
        """Probe one instance (or all) now instead of at the next interval."""
        for n, ev in self._probe_now.items():
            if name is None or n == name:
                ev.set()

    def faults_changed(self, instance: str | None) -> None:
        """A fault started on ``instance`` (None: on every instance): tell the sessions whose
        server connections it concerns."""
        names = list(self.live_backends) if instance is None else [instance]
        for name in names:
            for backend_id, owner in list(self.live_backends.get(name, {}).items()):
                owner.fault(backend_id)

    def backend_failed(self, name: str, error: str) -> None:
        """A session could not reach an instance, or lost its connection there. This changes
        no role and no health: it asks for a probe of the instance at once, and until that
        probe answers wait_for_route does not hand the instance out (route() still does).
        A session that must know the outcome awaits verdict()."""
        log.info("backend_failed", cluster=self.config.name, instance=name, error=error)
        self.metrics.error("backend_failed")
        if name not in self._probe_now:
            return  # not monitored (any more): nothing to probe
        self._reported[name] = max(self._reported.get(name, 0), self._probes_started[name] + 1)
        self.request_probe(name)

    # --- monitor ------------------------------------------------------------------------------

    def _apply(self, events: list[TopologyEvent]) -> None:
        for ev in events:
            log.info(ev.kind, cluster=self.config.name, instance=ev.instance, detail=ev.detail)
            if ev.kind == "writer_changed":
                self.writer_changed_at = time.time()
        if events:
            self.metrics.topology_changed(events, trio.current_time())
            self.drills.note_topology(events)
            self.pools.note_topology(events)
        self._record_high_water()
        # Every probe result wakes waiters: a route may now exist, or a wait may give up.
        self._wake()

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where the cluster's background work runs (None before ``run``)."""
        return self._nursery

    def _wake(self) -> None:
        """Wake everything waiting for a change (routes, verdicts)."""
        self._changed.set()
        self._changed = trio.Event()

    def _record_high_water(self) -> None:
        """Hand a risen high-water mark to the state file (its write runs in a thread)."""
        mark = self.topology.high_water
        if mark is None or mark == self._recorded_mark:
            return
        self._recorded_mark = mark
        if self.state.path is not None and self._nursery is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self.state.record, self.config.name, mark)
        else:
            self.state.record(self.config.name, mark)

    def _probe_timeout(self, name: str) -> float:
        st = self.topology.instances.get(name)
        if st is None or st.health is Health.UNKNOWN:
            return max(self.probe_timeout_s, FIRST_PROBE_TIMEOUT_S)
        return self.probe_timeout_s

    async def probe_once(self, name: str, conn: Any) -> Any:
        """One probe over the instance's persistent monitor connection (opened when needed);
        returns the connection to keep, or None after a failure.

        Whatever goes wrong — the network, a server that breaks the protocol or sends
        garbage, a failed TLS handshake, a value that does not parse, a bug of ours — is a
        failed probe with a clear last_error; nothing escapes to end the monitor."""
        self._probes_started[name] += 1
        timeout = self._probe_timeout(name)
        try:
            with trio.fail_after(timeout):
                self.drills.check_probe(name)  # an injected INSTANCE FAILURE fails the probe here
                if conn is None:
                    conn = await self._open_probe(name)
                result = await self._ask(conn)
        except Exception as e:  # noqa: BLE001 - see the docstring
            error = describe_error(e)
            if isinstance(e, trio.TooSlowError):
                error = f"probe timed out after {timeout:g} s"
            self._probe_failed(name, e, error)
            if conn is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await _close_quietly(conn, graceful=False)
            return None
        self._probes_finished[name] = self._probes_started[name]
        self._apply(self.topology.probe_succeeded(name, trio.current_time(), result=result))
        return conn

    async def _open_probe(self, name: str) -> Any:
        inst = self.config.instance_named(name)
        user, password = self.monitor_credentials()
        security = self.backend_security
        if self.config.protocol == "mysql":
            return await MyProbeConnection.open(name, inst.address, user=user, password=password, security=security)
        return await ProbeConnection.open(name, inst.address, user=user, password=password, security=security)

    async def _ask(self, conn: Any) -> ProbeResult:
        """The probe's question on an open monitor connection, its answer parsed."""
        if isinstance(conn, MyProbeConnection):
            result = await probe_mariadb(conn)
            if self.mysql_server_version is None or not result.in_recovery:
                self.mysql_server_version = conn.backend.server_version
            return result
        return parse_probe_row(await conn.query(PG_PROBE_SQL))

    def _probe_failed(self, name: str, e: Exception, error: str) -> None:
        st = self.topology.instances.get(name)
        if not isinstance(e, _EXPECTED_PROBE_ERRORS + (trio.TooSlowError,)) and (st is None or st.last_error != error):
            # Not what a dead or broken server causes: worth a traceback, once per new error.
            log.warning("probe_error", cluster=self.config.name, instance=name, error=error, exc_info=e)
        self._probes_finished[name] = self._probes_started[name]
        self.metrics.error("probe_failed")
        self._apply(self.topology.probe_failed(name, trio.current_time(), error))

    async def monitor_instance(self, name: str) -> None:
        conn: Any = None
        scope = self._monitor_scopes[name] = trio.CancelScope()
        try:
            with scope:
                while True:
                    self._probe_now[name] = trio.Event()
                    try:
                        conn = await self.probe_once(name, conn)
                    except Exception as e:  # noqa: BLE001 - a bug of ours must not end the monitor
                        log.exception("monitor_error", cluster=self.config.name, instance=name,
                                      error=describe_error(e))
                        self._probes_finished[name] = self._probes_started[name]
                        self._wake()
                        if conn is not None:
                            with trio.CancelScope(shield=True), trio.move_on_after(1):
                                await _close_quietly(conn, graceful=False)
                        conn = None
                    with trio.move_on_after(self.config.health_check_interval_ms / 1000):
                        await self._probe_now[name].wait()
        finally:
            if self._monitor_scopes.get(name) is scope:
                del self._monitor_scopes[name]
            if conn is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await _close_quietly(conn)

    def apply_config(self, new: ClusterConfig) -> list[str]:
        """Live reload: take a changed configuration of this cluster. Instances added start
        being monitored; removed ones (or ones whose address changed) leave the topology, so
        their sessions move at their next statement; changed passwords take effect for new
        logins. With [clusters.patroni] the instances stay Patroni's members (configured ones
        only override a member's address or weight). Returns a description of what changed,
        for the log."""
        old = self.config
        changes = self._reconfigure_authority(new)
        self.configured = new
        changes += self._set_instances(self._effective(new))
        old_addr = {i.name: (i.host, i.port) for i in old.instances}
        new_addr = {i.name: (i.host, i.port) for i in self.config.instances}
        gone = [n for n in old_addr if new_addr.get(n) != old_addr[n]]
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
        self.pools.configure(gone)  # new pool limits; pools of removed or moved instances drained
        if self.pools.limits() != PoolRegistry.limits_of(old):
            changes.append("pool limits changed")
        # Endpoint rules may have changed too: make every session re-check its placement.
        self.topology.generation += 1
        self._wake()
        return changes

    def _set_instances(self, new: ClusterConfig) -> list[str]:
        """Make ``new`` (with its instances) the running configuration: monitors start for
        instances added, stop for those removed or moved."""
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
        self._apply(self.topology.set_instances(tuple(i.name for i in new.instances)))
        self.topology.max_replica_lag_ms = new.max_replica_lag_ms
        for name in added:
            self._probe_now[name] = trio.Event()
            if self._nursery is not None:
                self._nursery.start_soon(self.monitor_instance, name)
            if name not in gone:
                changes.append(f"instance {name} added")
        self.weights = {i.name: i.weight for i in new.instances}
        return changes

    # --- Patroni as the HA authority ------------------------------------------------------------

    def _new_authority(self, config: ClusterConfig) -> PatroniAuthority:
        assert config.patroni is not None
        return PatroniAuthority(config.name, config.patroni, interval_s=config.health_check_interval_ms / 1000,
                                on_change=self._authority_changed)

    def _effective(self, configured: ClusterConfig) -> ClusterConfig:
        """The configuration with the instances the cluster has now: Patroni's members (by
        name, in name order; a configured instance of the same name gives its address and
        weight) once the store has answered, else the configured ones."""
        if configured.patroni is None or self.patroni is None or not self.patroni.known:
            return configured
        overrides = {i.name: i for i in configured.instances}
        members = self.patroni.view.members
        instances = tuple(overrides.get(name) or InstanceConfig(name, members[name].host, members[name].port)
                          for name in sorted(members))
        return dataclasses.replace(configured, instances=instances)

    def _reconfigure_authority(self, new: ClusterConfig) -> list[str]:
        if new.patroni == self.configured.patroni:
            return []
        if self._patroni_scope is not None:
            self._patroni_scope.cancel()
            self._patroni_scope = None
        if new.patroni is None:
            self.patroni = None
            self._apply(self.topology.set_authority(None))
            self.topology.set_no_readers(frozenset())
            return ["[clusters.patroni] removed: the proxy elects the writer from its probes"]
        self.patroni = self._new_authority(new)
        self._apply(self.topology.set_authority(AuthorityConstraint(None, "patroni")))
        if self._nursery is not None:
            self._nursery.start_soon(self._run_authority, self.patroni)
        return ["[clusters.patroni] changed: following the store again"]

    async def _run_authority(self, authority: PatroniAuthority) -> None:
        with trio.CancelScope() as scope:
            self._patroni_scope = scope
            await authority.run()

    def _authority_changed(self) -> None:
        """The store said something new (or went quiet): follow its members and its leader."""
        authority = self.patroni
        if authority is None:
            return
        view = authority.view
        effective = self._effective(self.configured)
        if effective.instances != self.config.instances:
            for change in self._set_instances(effective):
                log.info("membership_changed", cluster=self.config.name, change=change)
        self.topology.set_no_readers(frozenset(n for n, m in view.members.items() if m.noloadbalance))
        constraint = AuthorityConstraint(view.leader, "patroni")
        if constraint != self.topology.authority:
            self._apply(self.topology.set_authority(constraint))
        if view.leader is not None and self.topology.writer != view.leader:
            self._confirm_leader(view.leader)
        self._wake()

    def _confirm_leader(self, leader: str) -> None:
        """Probe the named leader every CONFIRM_POLL_S until it accepts writes: held
        statements go to it as soon as it does, not at the next check interval."""
        if self._confirming == leader or self._nursery is None:
            return
        self._confirming = leader
        self._nursery.start_soon(self._confirm_loop, leader)

    async def _confirm_loop(self, leader: str) -> None:
        try:
            with trio.move_on_after(CONFIRM_LEADER_S):
                while True:
                    authority = self.topology.authority
                    if authority is None or authority.leader != leader or self.topology.writer == leader:
                        return
                    self.request_probe(leader)
                    await trio.sleep(CONFIRM_POLL_S)
        finally:
            if self._confirming == leader:
                self._confirming = None

    def _make_promotion(self, config: ClusterConfig, old: str, new: str) -> Promotion:
        if config.promotion.method == "patroni":
            urls = self.patroni.api_urls(first=old) if self.patroni is not None else []
            return PatroniPromotion(config, old, new, urls)
        return make_promotion(config, old, new)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe every instance once, then keep monitoring; reports started after the first round."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first = [self._changed]
            for inst in self.config.instances:
                nursery.start_soon(self.monitor_instance, inst.name)
            nursery.start_soon(self.drills.run)
            nursery.start_soon(self.pools.run)
            if self.patroni is not None:
                nursery.start_soon(self._run_authority, self.patroni)
            # Wait (bounded) until the authority (if any) and every instance has an answer, so
            # the first clients route well.
            with trio.move_on_after(max(2.0, 8 * self.config.health_check_interval_ms / 1000)):
                while (self.patroni is not None and not self.patroni.known) or any(
                        st.last_probe_at is None for st in self.topology.instances.values()):
                    await first[0].wait()
                    first[0] = self._changed
            task_status.started()
            await trio.sleep(math.inf)


async def _close_quietly(conn: Any, *, graceful: bool = True) -> None:
    """Close a probe connection; a server that is gone or broken cannot make this fail.
    ``graceful``: say goodbye first (Terminate / COM_QUIT), bounded."""
    try:
        if graceful:
            await conn.aclose()
        else:
            await conn.backend.conn.aclose()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
