"""Configuration: the TOML schema, its defaults and validation with the offending key path."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("postgresql", "mysql")
ENDPOINT_KINDS = ("writer", "reader", "readwrite", "custom", "instance")
CUSTOM_ROLES = ("reader", "any")
TLS_MODES = ("off", "optional", "required")
BACKEND_TLS_MODES = ("off", "prefer", "require")
CLIENT_AUTH_METHODS = ("scram-sha-256", "md5", "password")
MYSQL_CLIENT_AUTH_METHODS = ("mysql_native_password", "caching_sha2_password")
CONSISTENCY_MODES = ("eventual", "session")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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


@dataclass(frozen=True)
class AdminConfig:
    listen: Address | None = None
    # Who may log in to the admin console (any PostgreSQL endpoint, database "endpoint_proxy").
    users: tuple[UserConfig, ...] = ()


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


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


@dataclass(frozen=True)
class UserConfig:
    name: str
    password: str
    auth: str | None = None  # overrides the cluster's client_auth


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
    client_auth: str = "scram-sha-256"
    read_functions: tuple[str, ...] = ()
    write_functions: tuple[str, ...] = ()
    function_refresh_ms: int = 30_000
    allow_local_infile: bool = False  # mysql: let clients use LOAD DATA LOCAL INFILE

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


def _parse_user(t: _Table, methods: tuple[str, ...]) -> UserConfig:
    user = UserConfig(
        name=t.string("name"),
        password=t.get("password", str),
        auth=t.string("auth", None, methods),
    )
    t.check_unknown()
    return user


def _parse_instance(t: _Table) -> InstanceConfig:
    inst = InstanceConfig(
        name=t.string("name"),
        host=t.string("host"),
        port=t.integer("port", minimum=1, maximum=65535),
        weight=t.integer("weight", 1, minimum=0),
    )
    t.check_unknown()
    return inst


def _parse_endpoint(t: _Table, instance_names: set[str]) -> EndpointConfig:
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
            if n not in instance_names:
                raise ConfigError(f"{t.sub(key)}[{i}]", f"no instance named {n!r}")
        if has_members:
            if not names:
                raise ConfigError(t.sub("members"), "must name at least one instance")
            members = names
        else:
            excluded = names
    elif kind == "instance":
        instance = t.string("instance")
        if instance not in instance_names:
            raise ConfigError(t.sub("instance"), f"no instance named {instance!r}")
    consistency = "eventual"
    session_wait_ms = 100
    if kind == "readwrite":
        consistency = t.string("consistency", "eventual", CONSISTENCY_MODES)
        session_wait_ms = t.integer("session_wait_ms", 100, minimum=0, maximum=60_000)
    t.check_unknown()
    return EndpointConfig(
        name=name, listen=listen, kind=kind, tls=tls, role=role,
        members=members, excluded=excluded, instance=instance,
        consistency=consistency, session_wait_ms=session_wait_ms,
    )


def _parse_cluster(t: _Table) -> ClusterConfig:
    name = t.string("name")
    protocol = t.string("protocol", choices=PROTOCOLS)
    instances: list[InstanceConfig] = []
    for i, raw in enumerate(t.array("instances")):
        inst = _parse_instance(_Table(raw, f"{t.sub('instances')}[{i}]"))
        if any(o.name == inst.name for o in instances):
            raise ConfigError(f"{t.sub('instances')}[{i}].name", f"duplicate instance name {inst.name!r}")
        instances.append(inst)
    if not instances:
        raise ConfigError(t.sub("instances"), "a cluster needs at least one instance")
    names = {i.name for i in instances}
    auth_methods = MYSQL_CLIENT_AUTH_METHODS if protocol == "mysql" else CLIENT_AUTH_METHODS
    users: list[UserConfig] = []
    for i, raw in enumerate(t.array("users")):
        user = _parse_user(_Table(raw, f"{t.sub('users')}[{i}]"), auth_methods)
        if any(o.name == user.name for o in users):
            raise ConfigError(f"{t.sub('users')}[{i}].name", f"duplicate user {user.name!r}")
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
        monitor = Credentials(m.string("user"), m.get("password", str, ""))
        m.check_unknown()
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
        backend_tls=t.string("backend_tls", "off", BACKEND_TLS_MODES),
        client_auth=t.string("client_auth", auth_methods[0], auth_methods),
        allow_local_infile=t.boolean("allow_local_infile", False),
        read_functions=tuple(n.lower() for n in _names(t.array("read_functions"), t.sub("read_functions"))),
        write_functions=tuple(n.lower() for n in _names(t.array("write_functions"), t.sub("write_functions"))),
        function_refresh_ms=t.integer("function_refresh_ms", 30_000, minimum=0),
    )
    t.check_unknown()
    return cluster


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document; raises ConfigError naming the first bad key."""
    top = _Table(data, "")
    admin_t = top.table("admin")
    admin_listen = admin_t.string("listen", None)
    admin_users: list[UserConfig] = []
    for i, raw in enumerate(admin_t.array("users")):
        user_t = _Table(raw, f"admin.users[{i}]")
        user = UserConfig(name=user_t.string("name"), password=user_t.string("password"))
        user_t.check_unknown()
        if any(o.name == user.name for o in admin_users):
            raise ConfigError(f"admin.users[{i}].name", f"duplicate user {user.name!r}")
        admin_users.append(user)
    admin = AdminConfig(parse_address(admin_listen, "admin.listen") if admin_listen else None,
                        users=tuple(admin_users))
    admin_t.check_unknown()
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
    srv_t = top.table("server")
    server = ServerConfig(
        workers=srv_t.integer("workers", 1, minimum=1, maximum=64),
        startup_timeout_ms=srv_t.integer("startup_timeout_ms", 10_000, minimum=1),
        max_message_bytes=srv_t.integer("max_message_bytes", 0x3FFFFFFF, minimum=1024, maximum=0x3FFFFFFF),
        max_startup_bytes=srv_t.integer("max_startup_bytes", 10_000, minimum=64, maximum=1 << 20),
        connect_timeout_ms=srv_t.integer("connect_timeout_ms", 5_000, minimum=1),
        shutdown_timeout_ms=srv_t.integer("shutdown_timeout_ms", 30_000, minimum=0),
        state_file=srv_t.string("state_file", None),
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
        cluster = _parse_cluster(_Table(raw, f"clusters[{i}]"))
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
    top.check_unknown()
    return Config(clusters=tuple(clusters), admin=admin, logging=logging_cfg, tls=tls, server=server)


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
