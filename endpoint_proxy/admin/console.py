"""The admin console: PgBouncer-style commands over the PostgreSQL protocol.

A PostgreSQL client that connects to any PostgreSQL endpoint with the database name
``endpoint_proxy`` (``CONSOLE_DATABASE``) is not routed to a server: the session hands it to
``serve_pg_console`` right after its StartupMessage, which authenticates it with
SCRAM-SHA-256 against ``[[admin.users]]`` and then answers simple-protocol queries itself::

    psql -h 127.0.0.1 -p 6432 -U admin endpoint_proxy -c 'SHOW INSTANCES'

Commands (case-insensitive, an optional trailing ``;``, several in one query string run in
order and stop at the first error): ``SHOW CLUSTERS``, ``SHOW INSTANCES``, ``SHOW ENDPOINTS``,
``SHOW SESSIONS``, ``SHOW POOLS``, ``SHOW FAULTS``, ``SHOW HELP``, ``RELOAD``, and the drills:
``SWITCHOVER [cluster] [TO instance]``, ``SIMULATE ...`` (drills/faults.py has the grammar),
``CLEAR FAULTS`` and ``CLEAR FAULT <id>``. Every result column is text (type oid 25);
unknown values are NULL. Anything else is an ERROR (42601, or 0A000 for an unsupported
``SHOW``) and the session goes on. Extended-protocol messages get one ERROR ("the admin
console speaks the simple query protocol only") and are skipped up to Sync, as a server
skips them after an error. The topology comes from the same functions as the admin HTTP
server's ``/topology``, so the two never disagree.
"""

from __future__ import annotations

import functools
import secrets
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog
import trio

from .. import __version__
from ..config import UserConfig
from ..drills.faults import Fault, FaultError
from ..drills.switchover import ABANDONED, SwitchoverRefused
from ..protocol.errors import AuthenticationError, FrameError, ProtocolError
from ..protocol.pg import messages as m
from ..protocol.pg.auth import ScramSecret, ScramServerAuth, make_scram_secret, parse_scram_verifier
from ..protocol.pg.framing import FrameReader
from ..protocol.pg.startup import StartupMessage
from ..relay.net import Conn
from ..server.session.info import SessionInfo
from . import drills
from .http import AdminSource, topology_document

log = structlog.get_logger("endpoint_proxy.console")


# After login the console accepts messages up to this size (a query is a few bytes).
CONSOLE_MAX_MESSAGE_BYTES: Final = 1 << 20
TEXT_OID: Final = 25
SIMPLE_PROTOCOL_ONLY: Final = "the admin console speaks the simple query protocol only"

# psql and drivers look at these after AuthenticationOk. server_version is a plausible
# PostgreSQL version (libpq parses the leading number) naming the proxy after it.
SERVER_VERSION: Final = f"14.0 (endpoint_proxy {__version__} admin console)"
_PARAMETERS: Final = (
    ("server_version", SERVER_VERSION),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "off"),
)

_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


# --- what the console needs from the proxy -----------------------------------------------------


class ConsoleState(AdminSource, Protocol):
    """What the console reads from the proxy, at each command (a reload may swap clusters).

    From ``AdminSource``: ``clusters``, ``bound`` (listening addresses, for SHOW ENDPOINTS)
    and ``metrics`` (cluster status); the proxy already offers them to the admin HTTP server.
    """

    @property
    def admin_users(self) -> Mapping[str, ScramSecret]:
        """The SCRAM verifiers of ``[[admin.users]]`` by name, read at each login (an
        ``AdminUsers`` keeps them cached across reloads)."""
        ...

    def sessions(self) -> Iterable[SessionInfo]:
        """The client sessions open now (the console's own may be left out)."""
        ...

    async def reload(self) -> object:
        """Re-read the configuration. Raises (ConfigError or any Exception, with a message)
        when it fails; a returned list of strings (what changed) is sent as NOTICEs."""
        ...


class AdminUsers(Mapping[str, ScramSecret]):
    """``[[admin.users]]`` as SCRAM verifiers, each derived once per password (PBKDF2 is slow
    on purpose: call ``prepare`` in a thread; a lookup derives a missing one on the spot)."""

    def __init__(self, users: Iterable[UserConfig] = (), previous: AdminUsers | None = None) -> None:
        self._users = {u.name: u for u in users}
        self._secrets: dict[str, ScramSecret] = {}
        for name, user in self._users.items():
            if user.stored is not None:  # configured as a SCRAM verifier: nothing to derive
                self._secrets[name] = parse_scram_verifier(user.stored.text)
            elif previous is not None and previous._users.get(name) == user and name in previous._secrets:
                self._secrets[name] = previous._secrets[name]

    def user(self, name: str) -> UserConfig | None:
        return self._users.get(name)

    def updated(self, users: Iterable[UserConfig]) -> AdminUsers:
        """The users of a new configuration, keeping the verifiers of unchanged passwords."""
        return AdminUsers(users, previous=self)

    def prepare(self) -> None:
        """Derive every verifier now (and the decoy for unknown users). A password SCRAM
        cannot use (SASLprep refuses it) is skipped here; nobody can log in with it."""
        _decoy_secret()
        for name in self._users:
            try:
                self[name]
            except ValueError:
                log.warning("console_user_unusable", user=name)

    def __getitem__(self, name: str) -> ScramSecret:
        secret = self._secrets.get(name)
        if secret is None:
            secret = make_scram_secret(self._users[name].password or "")  # KeyError for a stranger
            self._secrets[name] = secret
        return secret

    def __iter__(self) -> Iterator[str]:
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)


@functools.cache
def _decoy_secret() -> ScramSecret:
    """A verifier nobody knows the password of: unknown users go through the same exchange."""
    return make_scram_secret(secrets.token_urlsafe(24))


# --- results -----------------------------------------------------------------------------------


class ConsoleError(Exception):
    """A command failed: an ErrorResponse (severity ERROR); the session goes on."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint

    def encode(self) -> bytes:
        if self.hint:
            return m.error_response("ERROR", self.sqlstate, self.message, hint=self.hint)
        return m.error_response("ERROR", self.sqlstate, self.message)


Value = str | int | float | bool | None


@dataclass(frozen=True)
class Result:
    """A command's answer: rows of text columns (when ``columns``), notices, the command tag."""

    tag: str
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Value, ...], ...] = ()
    notices: tuple[str, ...] = ()

    def encode(self) -> bytes:
        out = [m.notice_response("NOTICE", "00000", n) for n in self.notices]
        if self.columns:
            out.append(m.RowDescription(tuple(m.Field(c, type_oid=TEXT_OID) for c in self.columns)).encode())
            out.extend(m.DataRow(tuple(_text(v) for v in row)).encode() for row in self.rows)
        out.append(m.CommandComplete(self.tag).encode())
        return b"".join(out)


def _text(value: Value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    return str(value).encode("utf-8", "surrogateescape")


def _show(columns: Sequence[str], rows: Iterable[Sequence[Value]]) -> Result:
    return Result("SHOW", tuple(columns), tuple(tuple(r) for r in rows))


# --- the commands (reading the state, no I/O) -----------------------------------------------------


def _topology(state: ConsoleState) -> list[dict[str, Any]]:
    clusters: list[dict[str, Any]] = topology_document(state, trio.current_time())["clusters"]
    return clusters


def show_clusters(state: ConsoleState) -> Result:
    def authority(c: dict[str, Any], key: str) -> Value:
        value: Value = c["authority"][key] if c.get("authority") else None
        return value

    return _show(("name", "protocol", "status", "writer", "instances", "endpoints", "authority", "authority_status",
                  "leader", "revision"),
                 ((c["name"], c["protocol"], c["status"], c["writer"], len(c["instances"]), len(c["endpoints"]),
                   authority(c, "source"), authority(c, "status"), authority(c, "leader"), authority(c, "revision"))
                  for c in _topology(state)))


def show_instances(state: ConsoleState) -> Result:
    return _show(("cluster", "name", "address", "role", "health", "lag_bytes", "lag_ms", "timeline", "fenced",
                  "connections", "last_error"),
                 ((c["name"], i["name"], i["address"], i["role"], i["health"], i["lag_bytes"], i["lag_ms"],
                   i["timeline"], i["fenced"], i["connections"], i["last_error"])
                  for c in _topology(state) for i in c["instances"]))


def show_endpoints(state: ConsoleState) -> Result:
    rows: list[tuple[Value, ...]] = []
    for c in _topology(state):
        runtime = state.clusters.get(c["name"])
        configs = {ep.name: ep for ep in runtime.config.endpoints} if runtime is not None else {}
        for e in c["endpoints"]:
            ep = configs.get(e["name"])
            rows.append((c["name"], e["name"], e["kind"], e["listen"], ",".join(e["members"]),
                         ep.tls if ep is not None else None,
                         ep.consistency if ep is not None and ep.kind == "readwrite" else None,
                         e["statements"], e["p50_ms"], e["p99_ms"]))
    return _show(("cluster", "name", "kind", "listen", "members", "tls", "consistency", "statements", "p50_ms",
                  "p99_ms"), rows)


def show_sessions(state: ConsoleState) -> Result:
    sessions = sorted(state.sessions(), key=lambda s: (s.cluster, s.id))
    return _show(("cluster", "endpoint", "id", "user", "database", "instance", "state", "client", "pinned"),
                 ((s.cluster, s.endpoint, s.id, s.user, s.database, s.instance, s.state, s.client, s.pinned)
                  for s in sessions))


POOL_COLUMNS: Final = ("cluster", "instance", "user", "database", "size", "in_use", "idle", "opening", "waiting",
                       "longest_wait_ms", "borrows")


def show_pools(state: ConsoleState) -> Result:
    """One row per pool of server connections (transaction-mode endpoints), as /topology's ``pools``."""
    return _show(POOL_COLUMNS, ((c["name"], *(p[col] for col in POOL_COLUMNS[1:]))
                                for c in _topology(state) for p in c["pools"]))


FAULT_COLUMNS: Final = ("id", "cluster", "kind", "instance", "description", "expires_in_s")


def _fault_rows(faults: Iterable[Fault]) -> list[tuple[Value, ...]]:
    now = trio.current_time()
    return [(f.id, f.cluster, f.kind.value, f.instance, f.spec.describe(), round(max(0.0, f.expires_at - now), 1))
            for f in faults]


def show_faults(state: ConsoleState) -> Result:
    return _show(FAULT_COLUMNS, _fault_rows(drills.active_faults(state.clusters)))


HELP: Final = (
    ("SHOW CLUSTERS", "each cluster: protocol, status, writer, number of instances and endpoints"),
    ("SHOW INSTANCES", "each instance: address, role, health, replication lag, timeline, connections"),
    ("SHOW ENDPOINTS", "each endpoint: kind, listening address, the instances it routes to now"),
    ("SHOW SESSIONS", "each client session: endpoint, user, database, instance, state, why it is pinned"),
    ("SHOW POOLS", "each pool of server connections: size, in use, idle, opening, waiting clients, longest wait"),
    ("SHOW FAULTS", "the injected faults now active, and when each lifts"),
    ("SHOW HELP", "this list"),
    ("RELOAD", "re-read the configuration file"),
    ("SWITCHOVER [cluster] [TO instance]", "planned switchover: hold new writes, promote the replica, resume"),
    ("SIMULATE INSTANCE FAILURE <name> FOR <n> SECONDS", "the instance looks dead through the proxy"),
    ("SIMULATE <p> PERCENT READ REPLICA FAILURE [TO <name>] FOR <n> SECONDS", "that share of reader routings fail"),
    ("SIMULATE LATENCY <ms> [JITTER <ms>] TO <name> FOR <n> SECONDS", "delay the instance's server traffic"),
    ("SIMULATE BANDWIDTH <kB/s> TO <name> FOR <n> SECONDS", "throttle the instance's server traffic"),
    ("SIMULATE SLICER [SIZE <bytes>] [VARIATION <bytes>] [DELAY <ms>] TO <name> FOR <n> SECONDS",
     "deliver the instance's bytes in small pieces"),
    ("SIMULATE RESET [AFTER <ms>] TO <name> FOR <n> SECONDS", "reset the instance's server connections"),
    ("SIMULATE REPLICA LAG <name> <ms> FOR <n> SECONDS", "treat the replica as that far behind"),
    ("CLEAR FAULTS | CLEAR FAULT <id>", "lift injected faults now"),
)


def show_help(state: ConsoleState) -> Result:
    return _show(("command", "description"), HELP)


SHOW_COMMANDS: Final[dict[str, Callable[[ConsoleState], Result]]] = {
    "CLUSTERS": show_clusters,
    "INSTANCES": show_instances,
    "ENDPOINTS": show_endpoints,
    "SESSIONS": show_sessions,
    "POOLS": show_pools,
    "FAULTS": show_faults,
    "HELP": show_help,
}

_HINT = "SHOW HELP lists the commands."


def split_commands(sql: str) -> list[str]:
    """The commands of a query string: split at ';', whitespace collapsed, empty ones dropped."""
    return [" ".join(part.split()) for part in sql.split(";") if part.strip()]


async def run_command(state: ConsoleState, command: str) -> Result:
    """One command (already split and collapsed); raises ConsoleError."""
    words = command.upper().split(" ")
    if words[0] == "SHOW":
        if len(words) == 1:
            raise ConsoleError("42601", "SHOW needs a topic", _HINT)
        show = SHOW_COMMANDS.get(words[1]) if len(words) == 2 else None
        if show is None:
            raise ConsoleError("0A000", f"unsupported admin console command: {command}", _HINT)
        return show(state)
    if words == ["RELOAD"]:
        return await _reload(state)
    if words[0] == "SWITCHOVER":
        return await _switchover(state, command.split(" ")[1:])
    if words[0] == "SIMULATE":
        try:
            faults = drills.inject_command(state.clusters, command)
        except FaultError as e:
            raise ConsoleError("22023", str(e), "SHOW HELP lists the SIMULATE commands.") from None
        return Result("SIMULATE", FAULT_COLUMNS, tuple(_fault_rows(faults)))
    if words[0] == "CLEAR":
        return _clear(state, words)
    raise ConsoleError("42601", f"unrecognized admin console command: {command}", _HINT)


async def _switchover(state: ConsoleState, args: list[str]) -> Result:
    """SWITCHOVER [cluster] [TO instance]: a row when it completed; an ERROR (55000 refused,
    55006 abandoned, 58000 a step failed) otherwise."""
    cluster: str | None = None
    to: str | None = None
    if args and args[0].upper() != "TO":
        cluster, args = args[0], args[1:]
    if args:
        if len(args) != 2 or args[0].upper() != "TO":
            raise ConsoleError("42601", "usage: SWITCHOVER [cluster] [TO instance]")
        to = args[1]
    try:
        record = await drills.switchover(state.clusters, cluster, to)
    except SwitchoverRefused as e:
        raise ConsoleError("55000", f"switchover refused: {e}") from None
    if not record.ok:
        sqlstate = "55006" if record.outcome == ABANDONED else "58000"
        raise ConsoleError(sqlstate, f"switchover of cluster {record.cluster} from {record.from_} to {record.to} "
                                     f"{record.outcome} after {record.pause_ms} ms: {record.detail}")
    return Result("SWITCHOVER", ("cluster", "from", "to", "outcome", "pause_ms", "detail"),
                  ((record.cluster, record.from_, record.to, record.outcome, record.pause_ms, record.detail),))


def _clear(state: ConsoleState, words: list[str]) -> Result:
    if words == ["CLEAR", "FAULTS"]:
        removed = drills.clear(state.clusters)
    elif len(words) == 3 and words[1] == "FAULT" and words[2].isdigit():
        removed = drills.clear(state.clusters, int(words[2]))
        if not removed:
            raise ConsoleError("42704", f"no active fault #{words[2]}", "SHOW FAULTS lists them.")
    else:
        raise ConsoleError("42601", "usage: CLEAR FAULTS | CLEAR FAULT <id>")
    return Result("CLEAR", notices=tuple(f"cleared fault #{f.id}: {f.spec.describe()}" for f in removed))


async def _reload(state: ConsoleState) -> Result:
    try:
        outcome = await state.reload()
    except NotImplementedError as e:
        raise ConsoleError("0A000", str(e) or "this proxy cannot reload its configuration") from None
    except Exception as e:  # a bad configuration, a port that cannot be bound, ...
        raise ConsoleError("F0000", f"reload failed: {e or type(e).__name__}") from None
    notices: tuple[str, ...] = ()
    if isinstance(outcome, list | tuple) and all(isinstance(x, str) for x in outcome):
        notices = tuple(outcome)
    return Result("RELOAD", notices=notices)


# --- the connection ------------------------------------------------------------------------------


def _show_type(type_: int) -> str:
    return repr(chr(type_)) if 32 <= type_ < 127 else str(type_)


class _ClientGone(Exception):
    pass


class _Conversation:
    def __init__(self, client: Conn, reader: FrameReader, buf: bytearray, state: ConsoleState,
                 user: str) -> None:
        self.client = client
        self.reader = reader
        self.buf = buf
        self.state = state
        self.user = user
        self.log = log.bind(user=user)
        self.skipping = False  # after an extended-protocol message: skip up to Sync

    async def read(self) -> None:
        n = await self.client.recv_into(self.buf)
        if n == 0:
            raise _ClientGone
        self.reader.feed(memoryview(self.buf)[:n])

    async def next_message(self) -> tuple[int, bytes]:
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            await self.read()

    async def run(self) -> None:
        while True:
            type_, payload = await self.next_message()
            reply = await self.handle(type_, payload)
            if reply is None:
                return
            if reply:
                await self.client.send_all(reply)

    async def handle(self, type_: int, payload: bytes) -> bytes | None:
        """The answer to one message; None ends the session."""
        ready = m.ReadyForQuery("I").encode()
        t = chr(type_)
        if t == "X":
            return None
        if t == "S":
            self.skipping = False
            return ready
        if t in "PBDEC":
            if self.skipping:
                return b""
            self.skipping = True
            return m.error_response("ERROR", "0A000", SIMPLE_PROTOCOL_ONLY)
        if t == "F":  # FunctionCall: its own round trip, answered like a query
            return m.error_response("ERROR", "0A000", SIMPLE_PROTOCOL_ONLY) + ready
        if t in "Hdcf":  # Flush; stray COPY messages, which a server ignores too
            return b""
        if t == "Q":
            if self.skipping:
                return b""
            return await self.query(m.Query.decode(payload).sql) + ready
        raise ProtocolError(f"invalid frontend message type {_show_type(type_)}")

    async def query(self, sql: str) -> bytes:
        commands = split_commands(sql)
        if not commands:
            return m.EmptyQueryResponse().encode()
        out: list[bytes] = []
        for command in commands:
            # SHOW is what monitoring scripts poll: log it only at debug; RELOAD and drills always.
            if command.upper() == "RELOAD":
                self.log.info("console_reload")
            elif command.split(" ")[0].upper() in ("SWITCHOVER", "SIMULATE", "CLEAR"):
                self.log.info("console_command", command=command)
            else:
                self.log.debug("console_command", command=command)
            try:
                out.append((await run_command(self.state, command)).encode())
            except ConsoleError as e:
                out.append(e.encode())
                break
            except Exception:
                self.log.exception("console_command_failed", command=command)
                out.append(m.error_response("ERROR", "XX000", "internal error; see the proxy's log"))
                break
        return b"".join(out)


async def _authenticate(client: Conn, startup: StartupMessage, reader: FrameReader, buf: bytearray,
                        state: ConsoleState) -> bool:
    """SCRAM-SHA-256 against the admin user's verifier; an unknown user gets a decoy verifier
    and the same 28P01 as a wrong password. False (after a FATAL) when the login failed."""
    user = startup.user
    try:
        secret: ScramSecret | None = state.admin_users.get(user)
    except ValueError:  # a password SCRAM cannot use (SASLprep): nobody logs in with it
        log.warning("console_user_unusable", user=user)
        secret = None
    auth = ScramServerAuth(user, secret if secret is not None else _decoy_secret())
    await client.send_all(auth.start())
    while True:
        type_ = reader.peek_type()
        if type_ is not None and type_ != ord("p"):
            raise ProtocolError(f"expected a password response, got message type {_show_type(type_)}")
        msg = reader.next_message()
        if msg is None:
            n = await client.recv_into(buf)
            if n == 0:
                raise _ClientGone
            reader.feed(memoryview(buf)[:n])
            continue
        try:
            reply, done = auth.step(msg[1])
        except AuthenticationError as e:
            log.info("console_auth_failed", user=user)
            await client.send_all(m.error_response("FATAL", e.sqlstate, e.message))
            return False
        if done and secret is None:  # cannot happen (nobody knows the decoy's password)
            await client.send_all(m.error_response("FATAL", "28P01",
                                                   f'password authentication failed for user "{user}"'))
            return False
        await client.send_all(reply)
        if done:
            return True


def _welcome(startup: StartupMessage) -> bytes:
    """After AuthenticationOk: parameters, keys (random: a cancel finds nothing), ready."""
    params = [*_PARAMETERS,
              ("application_name", startup.parameters.get("application_name", "")),
              ("session_authorization", startup.user)]
    return b"".join([*(m.ParameterStatus(k, v).encode() for k, v in params),
                     m.BackendKeyData(secrets.randbits(31), secrets.randbits(32)).encode(),
                     m.ReadyForQuery("I").encode()])


async def serve_pg_console(client: Conn, startup: StartupMessage, reader: FrameReader, buf: bytearray,
                           state: ConsoleState, *, auth_timeout_s: float = 10.0) -> None:
    """Serve one admin console connection whose StartupMessage has just been read.

    Authenticates the user (within ``auth_timeout_s``: pass the endpoint's startup timeout;
    the console session itself then has no deadline), answers commands until the client
    sends Terminate or leaves, and closes ``client``. ``reader`` may hold bytes the client
    sent after the StartupMessage; ``buf`` is a receive buffer. Raises nothing for anything
    the client does: a malformed message gets a FATAL, a vanished client is just gone.
    """
    logged_in = False
    try:
        with trio.move_on_after(auth_timeout_s):
            logged_in = await _authenticate(client, startup, reader, buf, state)
        if not logged_in:
            return
        log.info("console_login", user=startup.user)
        await client.send_all(_welcome(startup))
        reader.max_length = max(reader.max_length, CONSOLE_MAX_MESSAGE_BYTES)
        await _Conversation(client, reader, buf, state, startup.user).run()
    except FrameError as e:
        log.info("console_protocol_error", error=e.message)
    except ProtocolError as e:
        log.info("console_protocol_error", error=e.message)
        with trio.move_on_after(1):
            try:
                await client.send_all(m.error_response("FATAL", e.sqlstate, e.message))
            except _NETWORK_ERRORS:
                pass
    except (_ClientGone, *_NETWORK_ERRORS):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
