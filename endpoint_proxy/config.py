"""Configuration: the TOML schema, its defaults and validation with the offending key path."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol.pg.auth import parse_scram_verifier

PROTOCOLS = ("postgresql", "mysql")
ENDPOINT_KINDS = ("writer", "reader", "readwrite", "custom", "instance")
CUSTOM_ROLES = ("reader", "any")
TLS_MODES = ("off", "optional", "required")
BACKEND_TLS_MODES = ("off", "prefer", "require", "verify-ca", "verify-full")
CLIENT_AUTH_METHODS = ("scram-sha-256", "md5", "password")
MYSQL_CLIENT_AUTH_METHODS = ("mysql_native_password", "caching_sha2_password")
# How the servers may ask the proxy to authenticate (backend_auth); the first tuple of each is the default.
PG_BACKEND_AUTH_METHODS = ("scram-sha-256", "md5", "password", "trust")
PG_BACKEND_AUTH_DEFAULT = ("scram-sha-256",)
MYSQL_BACKEND_AUTH_METHODS = ("mysql_native_password", "caching_sha2_password", "mysql_clear_password")
MYSQL_BACKEND_AUTH_DEFAULT = ("mysql_native_password", "caching_sha2_password")
CONSISTENCY_MODES = ("eventual", "session")
POOL_MODES = ("session", "transaction")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PROMOTION_METHODS = ("none", "sql", "command", "patroni")
# Bits of a PostgreSQL cancel key that name the proxy that issued it, when [[peers]] are set.
PEER_ID_MAX = 255


class ConfigError(ValueError):
    """A configuration value is missing or wrong; ``path`` names the key, e.g. ``clusters[0].name``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.detail = message


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


    @property
    def is_loopback(self) -> bool:
        """Only this host can reach it: localhost or a loopback IP (127.0.0.0/8, ::1)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name other than localhost may resolve anywhere


# --- secrets ---------------------------------------------------------------------------------

# Stored forms of a password, as the servers keep them (detected in a configured ``password``).
STORED_SCRAM = "scram-sha-256"  # SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey> (pg_authid)
STORED_MD5 = "md5"  # "md5" + md5(password + user) in hex (pg_authid)
STORED_MYSQL_NATIVE = "mysql_native_password"  # "*" + SHA1(SHA1(password)) in hex (mysql.user)

_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")
_MYSQL_NATIVE_HASH = re.compile(r"\*[0-9A-Fa-f]{40}")


@dataclass(frozen=True, slots=True)
class StoredPassword:
    """A password in the form a server stores it: the proxy can check a client against it
    (and, for SCRAM and mysql_native_password, log in with what the client proved) without
    ever knowing the password. ``text`` is the stored form itself; it never shows in a repr."""

    kind: str  # STORED_SCRAM | STORED_MD5 | STORED_MYSQL_NATIVE
    text: str = field(repr=False)

    def __str__(self) -> str:
        return f"<{self.kind} verifier>"


def parse_stored_password(text: str, protocol: str) -> StoredPassword | None:
    """The stored form ``text`` is, for a cluster of ``protocol`` ("postgresql" or "mysql"),
    or None when it is a plain password. Raises ValueError for a SCRAM verifier that does not
    parse (a typo must not turn it into a password nobody knows)."""
    if protocol == "mysql":
        if _MYSQL_NATIVE_HASH.fullmatch(text):
            return StoredPassword(STORED_MYSQL_NATIVE, text.upper())
        return None
    if text.startswith("SCRAM-SHA-256$"):
        parse_scram_verifier(text)  # ValueError when malformed
        return StoredPassword(STORED_SCRAM, text)
    if _MD5_HASH.fullmatch(text):
        return StoredPassword(STORED_MD5, text)
    return None


@dataclass(frozen=True)
class AdminConfig:
    listen: Address | None = None
    # Who may log in to the admin console (any PostgreSQL endpoint, database "endpoint_proxy")
    # and, with basic auth, to the admin HTTP server.
    users: tuple[UserConfig, ...] = ()
    # Bearer token for the admin HTTP server; with users or a token set, everything but
    # /healthz and /readyz (and /metrics when metrics_public) needs a credential.
    token: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    tls: bool = False  # serve the admin HTTP server over TLS with the [tls] files

    @property
    def requires_credentials(self) -> bool:
        return self.token is not None or bool(self.users)


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "console"
    level: str = "info"


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    workers: int = 1
    startup_timeout_ms: int = 10_000
    max_message_bytes: int = 0x3FFFFFFF
    max_startup_bytes: int = 10_000
    connect_timeout_ms: int = 5_000
    shutdown_timeout_ms: int = 30_000
    # Where fencing's memory (the highest timeline seen per cluster) survives restarts; None: memory only.
    state_file: str | None = None
    max_client_connections: int = 0  # client connections to all endpoints at once, per process (0: no limit)
    # This proxy's id among [[peers]] (carried in the cancel keys it hands out); None: no peering.
    peer_id: int | None = None


@dataclass(frozen=True)
class PeerConfig:
    """Another proxy of the same endpoints (``[[peers]]``): where CancelRequests for sessions
    it owns are forwarded (any of its PostgreSQL endpoints)."""

    id: int
    address: Address


@dataclass(frozen=True)
class Credentials:
    """A login the proxy makes on its own (the monitor): it needs the password itself."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class UserConfig:
    """Who may connect. ``password`` is the plain password when it is configured as one;
    None when only its stored form is (``stored``: a SCRAM verifier, md5 hash or MySQL
    native hash), and then the proxy logs in to the servers with what the client proves."""

    name: str
    password: str | None = field(default=None, repr=False)
    auth: str | None = None  # overrides the cluster's client_auth
    stored: StoredPassword | None = field(default=None, repr=False)
    max_connections: int = 0  # client connections of this user at once, per cluster (0: no limit)


@dataclass(frozen=True)
class InstanceConfig:
    name: str
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    listen: Address
    kind: str
    tls: str = "optional"
    role: str = "reader"  # custom endpoints
    members: tuple[str, ...] | None = None
    excluded: tuple[str, ...] | None = None
    instance: str | None = None
    consistency: str = "eventual"  # readwrite: "session" = read-your-writes
    session_wait_ms: int = 100  # readwrite, session consistency: how long a read waits for a replica
    # "session": a client keeps its server connections for its whole life; "transaction": it borrows
    # one from the pool for each transaction (or statement, or pipeline up to Sync) and gives it back.
    pool_mode: str = "session"
    max_client_connections: int = 0  # client connections to this endpoint at once (0: no limit)
    # PostgreSQL: let clients open replication connections (startup parameter "replication"; streaming
    # or logical replication protocol, passed through). Session-mode endpoints other than readwrite only.
    allow_replication: bool = False


@dataclass(frozen=True)
class PromotionConfig:
    """``[clusters.promotion]``: how a planned switchover promotes a replica (see README "Drills").

    ``none`` refuses switchovers; ``sql`` promotes, fences and re-points with SQL as ``user``;
    ``command`` runs ``command`` (argv; a TOML string runs through ``/bin/sh -c``) with the old
    and new writer in its environment."""

    method: str = "none"
    user: str | None = None
    password: str | None = None
    command: tuple[str, ...] | None = None
    # Replication credentials for CHANGE MASTER on an old MariaDB primary (and, for PostgreSQL,
    # instead of reusing the replicas' primary_conninfo).
    replication_user: str | None = None
    replication_password: str | None = None
    timeout_ms: int = 30_000  # promoting and seeing the new writer elected, after the hold


@dataclass(frozen=True)
class PatroniConfig:
    """``[clusters.patroni]``: Patroni, through etcd v3 (its HTTP/JSON gateway) or its REST API,
    is the cluster's HA authority: it names the members and, by its leader key, the writer."""

    scope: str | None = None
    namespace: str = "/service"
    etcd: tuple[str, ...] = ()  # "http://host:2379" ...
    rest: tuple[str, ...] = ()  # "http://host:8008" ... polled when etcd is not given or not reachable

    @property
    def prefix(self) -> str:
        """The store's key prefix of this cluster: ``<namespace>/<scope>/``."""
        return f"{self.namespace.rstrip('/')}/{self.scope}/"


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    protocol: str
    instances: tuple[InstanceConfig, ...]
    endpoints: tuple[EndpointConfig, ...]
    users: tuple[UserConfig, ...]
    monitor: Credentials | None = None
    health_check_interval_ms: int = 250
    max_replica_lag_ms: int = 1000
    failover_timeout_ms: int = 30_000
    reader_fallback_to_writer: bool = True
    backend_tls: str = "off"
    backend_ca_file: str | None = None  # verify-ca / verify-full: the CAs to trust (default: the system's)
    backend_auth: tuple[str, ...] = PG_BACKEND_AUTH_DEFAULT  # methods a server may ask the proxy for
    server_public_key_file: str | None = None  # mysql: RSA key for caching_sha2 full auth without TLS
    allow_public_key_retrieval: bool = False  # mysql: trust a key the server sends (MITM-able)
    client_auth: str = "scram-sha-256"
    auth_query: str | None = None  # postgresql: look up users not in [[users]] ($1 = the name)
    auth_cache_ms: int = 60_000
    auth_database: str = "postgres"
    read_functions: tuple[str, ...] = ()
    write_functions: tuple[str, ...] = ()
    function_refresh_ms: int = 30_000
    allow_local_infile: bool = False  # mysql: let clients use LOAD DATA LOCAL INFILE
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    # A switchover holds new writer work at most this long (running transactions finishing,
    # the candidate catching up) before it is abandoned and traffic resumes.
    switchover_timeout_ms: int = 10_000
    # Pools of server connections (endpoints with pool_mode = "transaction"): one per (instance, user,
    # database). 0 for a timeout or lifetime means never.
    pool_size: int = 20
    min_pool_size: int = 0
    server_idle_timeout_ms: int = 600_000
    server_lifetime_ms: int = 3_600_000
    borrow_timeout_ms: int = 120_000  # a client waiting longer for a pooled connection gets 53300 / 1040
    max_prepared_statements: int = 200  # per pooled server connection (least recently used ones go)
    # Session limits (every endpoint; 0: none): cancel a statement running longer (57014); end a session
    # idle inside a transaction (25P03) or idle at all (57P05) longer than this.
    query_timeout_ms: int = 0
    idle_transaction_timeout_ms: int = 0
    client_idle_timeout_ms: int = 0
    patroni: PatroniConfig | None = None

    def user(self, name: str) -> UserConfig | None:
        for u in self.users:
            if u.name == name:
                return u
        return None

    def instance_named(self, name: str) -> InstanceConfig:
        for i in self.instances:
            if i.name == name:
                return i
        raise KeyError(name)


@dataclass(frozen=True)
class Config:
    clusters: tuple[ClusterConfig, ...]
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    peers: tuple[PeerConfig, ...] = ()


# --- parsing helpers -------------------------------------------------------------------------


class _Table:
    """A TOML table being read, remembering its path and which keys were used."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.data: dict[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required or default is ...:
                raise ConfigError(self.sub(key), "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept it where a number is meant.
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(self.sub(key), f"must be {_kind_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(self.sub(key), f"must be {_kind_name(kinds)}")
        return value

    def string(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> Any:
        value = self.get(key, str, default)
        if value is None:
            return None
        if choices is not None and value not in choices:
            raise ConfigError(self.sub(key), f"must be one of {', '.join(choices)} (got {value!r})")
        if choices is None and isinstance(value, str) and value == "" and default is ...:
            raise ConfigError(self.sub(key), "must not be empty")
        return value

    def integer(self, key: str, default: Any = ..., minimum: int = 0, maximum: int | None = None) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            raise ConfigError(self.sub(key), f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.sub(key), f"must be at most {maximum}")
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self.get(key, bool, default))

    def array(self, key: str) -> list[Any]:
        value = self.get(key, list, [])
        return list(value)

    def table(self, key: str) -> _Table:
        return _Table(self.get(key, dict, {}), self.sub(key))

    def check_unknown(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise ConfigError(self.sub(key), "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_address(value: str, path: str) -> Address:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(path, f"must be host:port (got {value!r})")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(path, f"port must be 0..65535 (got {port})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Address(host, port)


def _names(values: list[Any], path: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{path}[{i}]", "must be a non-empty string")
        out.append(v)
    return tuple(out)


def read_secret(t: _Table, key: str, environ: Mapping[str, str], *, required: bool = True) -> str | None:
    """A secret given as ``key`` itself, ``<key>_file`` (a file's text, one trailing newline
    removed) or ``<key>_env`` (an environment variable): at most one of them (exactly one
    when ``required``). The value never appears in an error message."""
    given = [k for k in (key, f"{key}_file", f"{key}_env") if k in t.data]
    for k in (key, f"{key}_file", f"{key}_env"):
        t.used.add(k)
    if len(given) > 1:
        raise ConfigError(t.sub(given[1]), f"give only one of {', '.join(given)}")
    if not given:
        if required:
            raise ConfigError(t.sub(key), f"is required (or {key}_file, or {key}_env)")
        return None
    which = given[0]
    value = t.data[which]
    if not isinstance(value, str):
        raise ConfigError(t.sub(which), "must be a string")
    if which == key:
        return value
    if not value:
        raise ConfigError(t.sub(which), "must not be empty")
    if which.endswith("_env"):
        if value not in environ:
            raise ConfigError(t.sub(which), f"environment variable {value} is not set")
        return environ[value]
    try:
        text = Path(value).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(t.sub(which), f"file not found: {value}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(t.sub(which), f"cannot read {value}: {reason}") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _parse_password(t: _Table, protocol: str, environ: Mapping[str, str]) -> tuple[str | None, StoredPassword | None]:
    text = read_secret(t, "password", environ)
    assert text is not None
    try:
        stored = parse_stored_password(text, protocol)
    except ValueError:
        raise ConfigError(t.sub("password"), "starts like a SCRAM-SHA-256 verifier but is not one: "
                          "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>") from None
    return (None, stored) if stored is not None else (text, None)


def _parse_user(t: _Table, protocol: str, methods: tuple[str, ...], environ: Mapping[str, str]) -> UserConfig:
    name = t.string("name")
    password, stored = _parse_password(t, protocol, environ)
    user = UserConfig(name=name, password=password, auth=t.string("auth", None, methods), stored=stored,
                      max_connections=t.integer("max_connections", 0, minimum=0))
    t.check_unknown()
    return user


# Which stored forms can check a client of each method (the plain password can check any).
_CHECKS: dict[str, tuple[str, ...]] = {
    "scram-sha-256": (STORED_SCRAM,),
    "md5": (STORED_MD5,),
    # A SCRAM verifier could check a cleartext password too, at the price of PBKDF2 per login.
    "password": (STORED_MD5,),
    "mysql_native_password": (STORED_MYSQL_NATIVE,),
    "caching_sha2_password": (),
}


_STORED_NAMES = {STORED_SCRAM: "a SCRAM-SHA-256 verifier", STORED_MD5: "an md5 hash",
                 STORED_MYSQL_NATIVE: "a mysql_native_password hash"}


def _check_user_method(user: UserConfig, method: str, path: str) -> None:
    if user.stored is None or user.stored.kind in _CHECKS[method]:
        return
    usable = " or ".join(("the password", *(_STORED_NAMES[k] for k in _CHECKS[method])))
    raise ConfigError(path, f"{_STORED_NAMES[user.stored.kind]} cannot check {method} logins: "
                            f"give {usable}")


def _parse_instance(t: _Table) -> InstanceConfig:
    inst = InstanceConfig(
        name=t.string("name"),
        host=t.string("host"),
        port=t.integer("port", minimum=1, maximum=65535),
        weight=t.integer("weight", 1, minimum=0),
    )
    t.check_unknown()
    return inst


def _parse_endpoint(t: _Table, instance_names: set[str] | None) -> EndpointConfig:
    name = t.string("name")
    listen = parse_address(t.string("listen"), t.sub("listen"))
    kind = t.string("kind", choices=ENDPOINT_KINDS)
    tls = t.string("tls", "optional", TLS_MODES)
    role = "reader"
    members: tuple[str, ...] | None = None
    excluded: tuple[str, ...] | None = None
    instance: str | None = None
    if kind == "custom":
        role = t.string("role", "reader", CUSTOM_ROLES)
        has_members = "members" in t.data
        has_excluded = "excluded" in t.data
        if has_members == has_excluded:
            raise ConfigError(t.sub("members"), "a custom endpoint needs exactly one of members or excluded")
        key = "members" if has_members else "excluded"
        names = _names(t.array(key), t.sub(key))
        for i, n in enumerate(names):
            if instance_names is not None and n not in instance_names:
                raise ConfigError(f"{t.sub(key)}[{i}]", f"no instance named {n!r}")
        if has_members:
            if not names:
                raise ConfigError(t.sub("members"), "must name at least one instance")
            members = names
        else:
            excluded = names
    elif kind == "instance":
        instance = t.string("instance")
        if instance_names is not None and instance not in instance_names:
            raise ConfigError(t.sub("instance"), f"no instance named {instance!r}")
    consistency = "eventual"
    session_wait_ms = 100
    if kind == "readwrite":
        consistency = t.string("consistency", "eventual", CONSISTENCY_MODES)
        session_wait_ms = t.integer("session_wait_ms", 100, minimum=0, maximum=60_000)
    pool_mode = t.string("pool_mode", "session", POOL_MODES)
    max_client_connections = t.integer("max_client_connections", 0, minimum=0)
    allow_replication = t.boolean("allow_replication", False)
    if allow_replication and (kind == "readwrite" or pool_mode == "transaction"):
        raise ConfigError(t.sub("allow_replication"), "a replication connection needs a server connection of its "
                          "own: not on readwrite or transaction-mode endpoints")
    t.check_unknown()
    return EndpointConfig(
        name=name, listen=listen, kind=kind, tls=tls, role=role,
        members=members, excluded=excluded, instance=instance,
        consistency=consistency, session_wait_ms=session_wait_ms,
        pool_mode=pool_mode, max_client_connections=max_client_connections, allow_replication=allow_replication,
    )


def _file(t: _Table, key: str) -> str | None:
    value: str | None = t.string(key, None)
    if value is not None and not Path(value).is_file():
        raise ConfigError(t.sub(key), f"file not found: {value}")
    return value


def _choices(t: _Table, key: str, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    if key not in t.data:
        t.used.add(key)
        return default
    values = _names(t.array(key), t.sub(key))
    if not values:
        raise ConfigError(t.sub(key), "must name at least one method")
    for i, v in enumerate(values):
        if v not in allowed:
            raise ConfigError(f"{t.sub(key)}[{i}]", f"must be one of {', '.join(allowed)} (got {v!r})")
    return tuple(dict.fromkeys(values))


def _parse_cluster(t: _Table, environ: Mapping[str, str]) -> ClusterConfig:
    name = t.string("name")
    protocol = t.string("protocol", choices=PROTOCOLS)
    instances: list[InstanceConfig] = []
    for i, raw in enumerate(t.array("instances")):
        inst = _parse_instance(_Table(raw, f"{t.sub('instances')}[{i}]"))
        if any(o.name == inst.name for o in instances):
            raise ConfigError(f"{t.sub('instances')}[{i}].name", f"duplicate instance name {inst.name!r}")
        instances.append(inst)
    patroni = _parse_patroni(t.table("patroni"), protocol) if "patroni" in t.data else None
    t.used.add("patroni")
    if not instances and patroni is None:
        raise ConfigError(t.sub("instances"), "a cluster needs at least one instance (or [clusters.patroni])")
    # With Patroni the members are named by it, at run time: endpoints may name any of them.
    names: set[str] | None = {i.name for i in instances} if patroni is None else None
    auth_methods = MYSQL_CLIENT_AUTH_METHODS if protocol == "mysql" else CLIENT_AUTH_METHODS
    client_auth = t.string("client_auth", auth_methods[0], auth_methods)
    users: list[UserConfig] = []
    for i, raw in enumerate(t.array("users")):
        where = f"{t.sub('users')}[{i}]"
        user = _parse_user(_Table(raw, where), protocol, auth_methods, environ)
        if any(o.name == user.name for o in users):
            raise ConfigError(f"{where}.name", f"duplicate user {user.name!r}")
        _check_user_method(user, user.auth or client_auth, f"{where}.password")
        users.append(user)
    endpoints: list[EndpointConfig] = []
    for i, raw in enumerate(t.array("endpoints")):
        ep = _parse_endpoint(_Table(raw, f"{t.sub('endpoints')}[{i}]"), names)
        if any(o.name == ep.name for o in endpoints):
            raise ConfigError(f"{t.sub('endpoints')}[{i}].name", f"duplicate endpoint name {ep.name!r}")
        endpoints.append(ep)
    monitor = None
    if "monitor" in t.data:
        m = t.table("monitor")
        monitor_password = read_secret(m, "password", environ, required=False) or ""
        if parse_stored_password(monitor_password, protocol) is not None:
            raise ConfigError(m.sub("password"), "the monitor logs in on its own: it needs the password, "
                              "not a verifier (use password_file or password_env to keep it out of this file)")
        monitor = Credentials(m.string("user"), monitor_password)
        m.check_unknown()
    mysql = protocol == "mysql"
    backend_tls = t.string("backend_tls", "off", BACKEND_TLS_MODES)
    backend_ca_file = _file(t, "backend_ca_file")
    if backend_ca_file is not None and not backend_tls.startswith("verify-"):
        raise ConfigError(t.sub("backend_ca_file"), 'is used only with backend_tls = "verify-ca" or "verify-full"')
    backend_methods = MYSQL_BACKEND_AUTH_METHODS if mysql else PG_BACKEND_AUTH_METHODS
    backend_default = MYSQL_BACKEND_AUTH_DEFAULT if mysql else PG_BACKEND_AUTH_DEFAULT
    backend_auth = _choices(t, "backend_auth", backend_methods, backend_default)
    public_key_file = _file(t, "server_public_key_file")
    retrieval = t.boolean("allow_public_key_retrieval", False)
    if not mysql and (public_key_file is not None or retrieval):
        key = "server_public_key_file" if public_key_file is not None else "allow_public_key_retrieval"
        raise ConfigError(t.sub(key), "is for MySQL clusters (caching_sha2_password)")
    auth_query = t.string("auth_query", None)
    if auth_query is not None:
        if mysql:
            raise ConfigError(t.sub("auth_query"), "is for PostgreSQL clusters")
        if "$1" not in auth_query:
            raise ConfigError(t.sub("auth_query"), "must take the user name as its parameter $1")
        if client_auth == "password":
            raise ConfigError(t.sub("auth_query"), "needs client_auth scram-sha-256 or md5: the proxy logs in "
                              "to the servers with what the client proves, which cleartext cannot pass on")
    cluster = ClusterConfig(
        name=name,
        protocol=protocol,
        instances=tuple(instances),
        endpoints=tuple(endpoints),
        users=tuple(users),
        monitor=monitor,
        health_check_interval_ms=t.integer("health_check_interval_ms", 250, minimum=10),
        max_replica_lag_ms=t.integer("max_replica_lag_ms", 1000, minimum=0),
        failover_timeout_ms=t.integer("failover_timeout_ms", 30_000, minimum=0),
        reader_fallback_to_writer=t.boolean("reader_fallback_to_writer", True),
        backend_tls=backend_tls,
        backend_ca_file=backend_ca_file,
        backend_auth=backend_auth,
        server_public_key_file=public_key_file,
        allow_public_key_retrieval=retrieval,
        client_auth=client_auth,
        auth_query=auth_query,
        auth_cache_ms=t.integer("auth_cache_ms", 60_000, minimum=0, maximum=86_400_000),
        auth_database=t.string("auth_database", "postgres"),
        allow_local_infile=t.boolean("allow_local_infile", False),
        read_functions=tuple(n.lower() for n in _names(t.array("read_functions"), t.sub("read_functions"))),
        write_functions=tuple(n.lower() for n in _names(t.array("write_functions"), t.sub("write_functions"))),
        function_refresh_ms=t.integer("function_refresh_ms", 30_000, minimum=0),
        patroni=patroni,
        **_parse_drills(t, environ),
        **_parse_pooling(t),
    )
    t.check_unknown()
    if cluster.promotion.method == "patroni" and patroni is None:
        raise ConfigError(t.sub("promotion.method"), 'method = "patroni" needs [clusters.patroni]')
    return cluster


def _parse_pooling(t: _Table) -> dict[str, Any]:
    pool_size = t.integer("pool_size", 20, minimum=1, maximum=100_000)
    min_pool_size = t.integer("min_pool_size", 0, minimum=0)
    if min_pool_size > pool_size:
        raise ConfigError(t.sub("min_pool_size"), f"must not exceed pool_size ({pool_size})")
    return {
        "pool_size": pool_size,
        "min_pool_size": min_pool_size,
        "server_idle_timeout_ms": t.integer("server_idle_timeout_ms", 600_000, minimum=0),
        "server_lifetime_ms": t.integer("server_lifetime_ms", 3_600_000, minimum=0),
        "borrow_timeout_ms": t.integer("borrow_timeout_ms", 120_000, minimum=0),
        "max_prepared_statements": t.integer("max_prepared_statements", 200, minimum=1, maximum=100_000),
        "query_timeout_ms": t.integer("query_timeout_ms", 0, minimum=0),
        "idle_transaction_timeout_ms": t.integer("idle_transaction_timeout_ms", 0, minimum=0),
        "client_idle_timeout_ms": t.integer("client_idle_timeout_ms", 0, minimum=0),
    }


def _urls(t: _Table, key: str) -> tuple[str, ...]:
    urls = _names(t.array(key), t.sub(key))
    for i, url in enumerate(urls):
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise ConfigError(f"{t.sub(key)}[{i}]", f"must be an http:// or https:// URL (got {url!r})")
    return tuple(u.rstrip("/") for u in urls)


def _parse_patroni(t: _Table, protocol: str) -> PatroniConfig:
    if protocol != "postgresql":
        raise ConfigError(t.path, "Patroni manages PostgreSQL clusters")
    etcd = _urls(t, "etcd")
    rest = _urls(t, "rest")
    scope = t.string("scope", None)
    namespace = t.string("namespace", "/service")
    if not namespace.startswith("/"):
        raise ConfigError(t.sub("namespace"), f"must start with / (got {namespace!r})")
    if not etcd and not rest:
        raise ConfigError(t.sub("etcd"), "give etcd (its client URLs), rest (Patroni's REST API URLs), or both")
    if etcd and not scope:
        raise ConfigError(t.sub("scope"), "is required with etcd (Patroni's scope: the cluster's name in the store)")
    t.check_unknown()
    return PatroniConfig(scope=scope, namespace=namespace, etcd=etcd, rest=rest)


def _parse_promotion(t: _Table, environ: Mapping[str, str]) -> PromotionConfig:
    method = t.string("method", "none", PROMOTION_METHODS)
    user = t.string("user", None)
    password = read_secret(t, "password", environ, required=False)
    replication_user = t.string("replication_user", None)
    replication_password = read_secret(t, "replication_password", environ, required=False)
    command: tuple[str, ...] | None = None
    if "command" in t.data:
        raw = t.get("command", (str, list))
        if isinstance(raw, str):
            if not raw.strip():
                raise ConfigError(t.sub("command"), "must not be empty")
            command = ("/bin/sh", "-c", raw)
        else:
            command = _names(raw, t.sub("command"))
            if not command:
                raise ConfigError(t.sub("command"), "must not be empty")
    if method == "sql" and user is None:
        raise ConfigError(t.sub("user"), 'method = "sql" needs the user the proxy promotes with')
    if method == "command" and command is None:
        raise ConfigError(t.sub("command"), 'method = "command" needs the command to run')
    if method != "command" and command is not None:
        raise ConfigError(t.sub("command"), 'is only used with method = "command"')
    promotion = PromotionConfig(
        method=method, user=user, password=password, command=command,
        replication_user=replication_user, replication_password=replication_password,
        timeout_ms=t.integer("timeout_ms", 30_000, minimum=1),
    )
    t.check_unknown()
    return promotion


def _parse_drills(t: _Table, environ: Mapping[str, str]) -> dict[str, Any]:
    """The cluster keys of planned switchovers: ``[clusters.promotion]`` and ``switchover_timeout_ms``."""
    promotion = _parse_promotion(t.table("promotion"), environ) if "promotion" in t.data else PromotionConfig()
    return {"promotion": promotion,
            "switchover_timeout_ms": t.integer("switchover_timeout_ms", 10_000, minimum=0)}


def _parse_admin(admin_t: _Table, environ: Mapping[str, str]) -> AdminConfig:
    admin_listen = admin_t.string("listen", None)
    admin_users: list[UserConfig] = []
    for i, raw in enumerate(admin_t.array("users")):
        user_t = _Table(raw, f"admin.users[{i}]")
        name = user_t.string("name")
        password, stored = _parse_password(user_t, "postgresql", environ)
        if stored is not None and stored.kind != STORED_SCRAM:
            raise ConfigError(user_t.sub("password"), "admin users log in with SCRAM-SHA-256: give the "
                              "password or its SCRAM-SHA-256 verifier")
        if password == "":
            raise ConfigError(user_t.sub("password"), "must not be empty")
        user = UserConfig(name=name, password=password, stored=stored)
        user_t.check_unknown()
        if any(o.name == user.name for o in admin_users):
            raise ConfigError(f"admin.users[{i}].name", f"duplicate user {user.name!r}")
        admin_users.append(user)
    token = read_secret(admin_t, "token", environ, required=False)
    if token == "":
        given = next(k for k in ("token", "token_file", "token_env") if k in admin_t.data)
        raise ConfigError(admin_t.sub(given), "must not be empty")
    admin = AdminConfig(parse_address(admin_listen, "admin.listen") if admin_listen else None,
                        users=tuple(admin_users), token=token,
                        metrics_public=admin_t.boolean("metrics_public", False),
                        tls=admin_t.boolean("tls", False))
    admin_t.check_unknown()
    if admin.listen is not None and not admin.listen.is_loopback and not admin.requires_credentials:
        raise ConfigError("admin.listen", f"{admin.listen} is not a loopback address: set admin.token "
                          "(or token_file, token_env) or [[admin.users]] so that not anyone who can "
                          "reach it can reload the proxy")
    return admin


def parse_config(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document; raises ConfigError naming the first bad key.

    ``environ`` (default: the process environment) resolves ``*_env`` keys; ``*_file`` keys
    are read here."""
    env = os.environ if environ is None else environ
    top = _Table(data, "")
    admin = _parse_admin(top.table("admin"), env)
    log_t = top.table("logging")
    logging_cfg = LoggingConfig(
        format=log_t.string("format", "console", LOG_FORMATS),
        level=log_t.string("level", "info", LOG_LEVELS),
    )
    log_t.check_unknown()
    tls_t = top.table("tls")
    tls = TlsConfig(cert_file=tls_t.string("cert_file", None), key_file=tls_t.string("key_file", None))
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("tls.key_file" if tls.key_file is None else "tls.cert_file",
                          "cert_file and key_file go together")
    for key in ("cert_file", "key_file"):
        value = getattr(tls, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"tls.{key}", f"file not found: {value}")
    tls_t.check_unknown()
    if admin.tls and tls.cert_file is None:
        raise ConfigError("admin.tls", "needs [tls] cert_file and key_file")
    srv_t = top.table("server")
    server = ServerConfig(
        workers=srv_t.integer("workers", 1, minimum=1, maximum=64),
        startup_timeout_ms=srv_t.integer("startup_timeout_ms", 10_000, minimum=1),
        max_message_bytes=srv_t.integer("max_message_bytes", 0x3FFFFFFF, minimum=1024, maximum=0x3FFFFFFF),
        max_startup_bytes=srv_t.integer("max_startup_bytes", 10_000, minimum=64, maximum=1 << 20),
        connect_timeout_ms=srv_t.integer("connect_timeout_ms", 5_000, minimum=1),
        shutdown_timeout_ms=srv_t.integer("shutdown_timeout_ms", 30_000, minimum=0),
        state_file=srv_t.string("state_file", None),
        max_client_connections=srv_t.integer("max_client_connections", 0, minimum=0),
        peer_id=srv_t.integer("peer_id", None, minimum=0, maximum=PEER_ID_MAX) if "peer_id" in srv_t.data else None,
    )
    if server.state_file is not None:
        state_path = Path(server.state_file)
        if server.state_file == "" or state_path.is_dir():
            raise ConfigError("server.state_file", "must name a file")
        if not state_path.parent.is_dir():
            raise ConfigError("server.state_file", f"directory not found: {state_path.parent}")
    srv_t.check_unknown()
    clusters: list[ClusterConfig] = []
    raw_clusters = top.array("clusters")
    if not raw_clusters:
        raise ConfigError("clusters", "at least one [[clusters]] table is required")
    listens: dict[Address, str] = {}
    for i, raw in enumerate(raw_clusters):
        cluster = _parse_cluster(_Table(raw, f"clusters[{i}]"), env)
        if any(c.name == cluster.name for c in clusters):
            raise ConfigError(f"clusters[{i}].name", f"duplicate cluster name {cluster.name!r}")
        for j, ep in enumerate(cluster.endpoints):
            where = f"clusters[{i}].endpoints[{j}]"
            if ep.listen.port != 0 and ep.listen in listens:
                raise ConfigError(f"{where}.listen", f"{ep.listen} is already used by {listens[ep.listen]}")
            listens[ep.listen] = where
            if ep.tls == "required" and tls.cert_file is None:
                raise ConfigError(f"{where}.tls", "tls = \"required\" needs [tls] cert_file and key_file")
        for j, user in enumerate(cluster.users):
            method = user.auth or cluster.client_auth
            if method == "password" and tls.cert_file is None:
                raise ConfigError(f"clusters[{i}].users[{j}].auth" if user.auth else f"clusters[{i}].client_auth",
                                  "cleartext password authentication is only offered over TLS: set [tls]")
        clusters.append(cluster)
    peers = _parse_peers(top, server)
    top.check_unknown()
    return Config(clusters=tuple(clusters), admin=admin, logging=logging_cfg, tls=tls, server=server, peers=peers)


def _parse_peers(top: _Table, server: ServerConfig) -> tuple[PeerConfig, ...]:
    """``[[peers]]``: ``id`` and ``address`` of each proxy of the same endpoints (this one may be
    listed too: every proxy can share one list). Needs ``server.peer_id``."""
    peers: list[PeerConfig] = []
    for i, raw in enumerate(top.array("peers")):
        pt = _Table(raw, f"peers[{i}]")
        peer = PeerConfig(id=pt.integer("id", minimum=0, maximum=PEER_ID_MAX),
                          address=parse_address(pt.string("address"), pt.sub("address")))
        pt.check_unknown()
        if any(p.id == peer.id for p in peers):
            raise ConfigError(f"peers[{i}].id", f"duplicate peer id {peer.id}")
        peers.append(peer)
    if peers and server.peer_id is None:
        raise ConfigError("server.peer_id", "is required with [[peers]]: this proxy's own id")
    return tuple(peers)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; raises ConfigError (path "" for file-level problems)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError("", f"{path}: cannot read: {e.strerror}") from None
    return parse_config(data)
