"""A MySQL/MariaDB client session: login, the first backend, then the core's actions over the relay.

The decisions are ``sessioncore.mysql.MySessionCore``'s; this shell greets and authenticates
the client, opens and replays backends, runs KILL and COM_CHANGE_USER, asks the monitor for
verdicts, and moves bytes (``SessionShell``). On a transaction-mode endpoint it borrows a
server connection of the cluster's pools (server/pools.py) for each command that needs one,
brings it to the session's state by the core's plan, and gives it back when the core says so.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog
import trio

from ...config import UserConfig
from ...protocol.errors import ProtocolError
from ...protocol.mysql import commands as c
from ...protocol.mysql import constants as k
from ...protocol.mysql.errors import MySQLProtocolError
from ...protocol.mysql.framing import PacketReader, encode_packet, read_row_value
from ...protocol.mysql.packets import OkPacket, err_packet
from ...protocol.mysql.response import ResponseTracker
from ...relay.net import Conn, RawConn, send_quietly
from ...sessioncore.actions import (
    MAIN,
    READER,
    WRITER,
    Attach,
    AttachError,
    BackendFacts,
    CatchUp,
    Detach,
    Lost,
    WaitGate,
)
from ...sessioncore.my_pool_plan import Plan, PooledMark
from ...sessioncore.mysql import BORROW, ER_CON_COUNT, ChangeUser, DropParked, Kill, MySessionCore, Prepare, Release
from ..admission import Ticket
from ..pool import PoolKey
from ..pools import Pooled, PoolTimeout
from ..session import faults
from ..session.backends import BackendSet
from ..session.context import SessionContext
from ..session.env import SessionEnv
from ..session.info import SessionInfo, session_state
from ..session.shell import NETWORK_ERRORS, SessionShell
from .backend import (
    MyBackendConnection,
    MyBackendError,
    MyGreeting,
    MyProbeConnection,
    greet_my_backend,
    login_my_backend,
)
from .login import PER_LEG, Fatal, MyLogin, change_user, login

log = structlog.get_logger("endpoint_proxy.mysql")

_QUIT = encode_packet(0, bytes((c.COM_QUIT,)))
ER_NO_ROUTE = 1105
ER_KILL_DENIED = 1095


class NoRoute(Exception):
    pass


class MySession(SessionShell):
    __slots__ = ("ctx", "peer", "session_id", "connection_id", "metrics", "draining", "user", "login",
                 "backends", "env", "_core", "pooled", "lent", "pool_database", "ticket", "err_seq")

    ctx: SessionContext
    core: MySessionCore

    def __init__(self, ctx: SessionContext, sock: socket.socket | Conn, session_id: int) -> None:
        super().__init__(ctx.hub)
        self.ctx = ctx
        self.peer: str | None = None
        if isinstance(sock, Conn):
            self.client: Conn = sock  # a transport of a test's in-memory network
        else:
            self.client = RawConn(sock)
            try:
                host, port = sock.getpeername()[:2]
                self.peer = f"{host}:{port}"
            except OSError:
                pass
        self.session_id = session_id
        self.connection_id = 1_000_000_000 + session_id  # until a server's thread id is known
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self.draining = False
        self.user: UserConfig | None = None
        self.login: MyLogin | None = None
        self.backends: BackendSet[MyBackendConnection] = BackendSet(ctx.cluster)
        self.env = SessionEnv(ctx.cluster, ctx.endpoint, self.metrics)
        self.backends.owner = self
        self._core: MySessionCore | None = None
        self.ticket: Ticket | None = None  # counts it against the connection limits (login admits)
        self.err_seq = 0  # the sequence number an error packet of ours takes (after the login: its OK's)
        # Transaction mode: the pooled connection borrowed now (also ``backends.active``), and the
        # database of the pools this session borrows from (its login's).
        self.pooled = ctx.endpoint.pool_mode == "transaction"
        self.lent: Pooled[MyBackendConnection] | None = None
        self.pool_database = ""

    # --- what the proxy asks of a session -----------------------------------------------------

    @property
    def log(self) -> Any:
        """This session's logger (bound when used: most sessions never log)."""
        return log.bind(conn=self.session_id, endpoint=self.ctx.endpoint.name)

    def idle(self) -> bool:
        return self._core is not None and self._core.idle

    def drain(self) -> None:
        self.draining = True
        if self._core is not None and self._core.drain():
            self.wake()

    def session_info(self) -> SessionInfo:
        core = self._core
        backend = self.backends.active
        transaction = "I"
        if core is not None:
            transaction = "E" if core.failed_tx else ("T" if core.in_transaction else "I")
        return SessionInfo(
            cluster=self.ctx.cluster.config.name, endpoint=self.ctx.endpoint.name, id=self.connection_id,
            user=self.user.name if self.user is not None else None,
            database=core.state.schema if core is not None else None,
            instance=backend.instance if backend is not None else None,
            state=session_state(logged_in=core is not None, busy=core is not None and core.busy,
                                transaction=transaction),
            client=self.peer)

    # --- the janitor's view (server/janitor.py Timed) ------------------------------------------

    def activity(self) -> tuple[int, bool, bool] | None:
        """(commands begun so far, a command in flight, inside a transaction); None during login."""
        core = self._core
        if core is None:
            return None
        return core.requests, core.busy, core.in_transaction

    def cancel_running(self) -> None:
        """query_timeout_ms: KILL QUERY the statement in flight, as this session's user, from a
        connection of its own (the server answers the client with 1317)."""
        core, backend = self._core, self.backends.active
        nursery = self.ctx.cluster.nursery
        if core is None or not core.busy or backend is None or nursery is None:
            return
        thread = backend.thread_id

        def still() -> bool:
            active = self.backends.active
            return active is backend and active.thread_id == thread and self._core is not None and self._core.busy

        async def kill() -> None:
            await self._run_as_user(backend.instance, f"KILL QUERY {int(thread)}", 0, still=still, fresh=True)

        nursery.start_soon(kill)

    def expire(self, reason: str) -> None:
        """A session timeout: the client gets MySQL's own disconnect error (4031), and the
        session ends (a transaction it holds is rolled back as its connection closes)."""
        if self._core is None:
            return
        what = "inside a transaction" if reason == "idle_transaction" else "idle"
        self._core.expire(4031, "HY000", f"The client was disconnected by the server because of inactivity "
                                         f"({what} too long: endpoint_proxy's timeout)")
        self.wake()

    def backend_conn(self) -> Conn | None:
        backend = self.backends.active
        return backend.conn if backend is not None else None

    def current_thread(self) -> tuple[str, int] | None:
        """(instance, server thread id) of the active backend: what a KILL of this session hits."""
        backend = self.backends.active
        return (backend.instance, backend.thread_id) if backend is not None else None

    # --- the session ---------------------------------------------------------------------------

    async def start(self) -> bool:
        cluster = self.ctx.cluster
        greeting: MyGreeting | None = None
        try:
            with trio.move_on_after(self.ctx.startup_timeout_s) as scope:
                # Transaction mode keeps the proxy's own id: the session has no server connection of
                # its own, so CONNECTION_ID() names whichever it borrowed for that statement, and KILL
                # of this id is mapped to the connection it has borrowed at the time.
                greeting = None if self.pooled else await self._greet_first()
                if greeting is not None:
                    self.connection_id = greeting.hello.connection_id
                cluster.mysql_sessions[self.connection_id] = self
                result = await login(self.ctx, self, self.log, connection_id=self.connection_id,
                                     server_version=greeting.hello.server_version if greeting else None)
            if scope.cancelled_caught:
                cluster.metrics.error("startup_timeout")
                self.log.info("startup_timeout", timeout_ms=int(self.ctx.startup_timeout_s * 1000))
                return False
            self.login, self.user = result, result.user
            self.err_seq = result.ok_seq
            await self._attach_first(result, greeting)
            greeting = None
            return True
        finally:
            if greeting is not None and not greeting.conn.closed:
                await greeting.conn.aclose()  # greeted for a login that never came

    async def failed(self, error: Exception) -> bool:
        cluster = self.ctx.cluster
        if isinstance(error, Fatal):
            cluster.metrics.error("auth_failed" if error.errno == 1045 else "session_fatal")
            self.log.info("session_refused", errno=error.errno, error=str(error))
            await send_quietly(self.client, error.raw or encode_packet(
                error.seq or self.err_seq, err_packet(error.errno, error.sqlstate, str(error))))
        elif isinstance(error, MySQLProtocolError):
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=error.message)
            await send_quietly(self.client, encode_packet(self.err_seq, err_packet(error.errno, error.sqlstate,
                                                                                   error.message)))
        elif isinstance(error, ProtocolError):
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=error.message)
        elif not isinstance(error, NETWORK_ERRORS):
            return False
        return True

    async def finish(self) -> None:
        await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if self.ticket is not None:
                self.ticket.release()
            self.ctx.cluster.mysql_sessions.pop(self.connection_id, None)
            if self._core is not None:
                self._core.end()
            if self.lent is not None:
                self._give_back(reusable=self._core is not None and self._core.parting())
            await self.backends.close_all(_QUIT)
            await self.client.aclose()

    async def _greet_first(self) -> MyGreeting | None:
        """The first backend's greeting, if one can be had now: its thread id is the client's."""
        cluster = self.ctx.cluster
        role = WRITER if self.ctx.endpoint.kind == "readwrite" else MAIN
        decision = cluster.route(self.env.rule(role))
        if decision.instance is None:
            return None
        try:
            if faults.refused(cluster, self.env.rule(role), decision.instance):
                return None
            with trio.fail_after(self.ctx.connect_timeout_s):
                return await greet_my_backend(cluster.config.instance_named(decision.instance).address,
                                              dial=self.ctx.dial)
        except (MyBackendError, OSError, trio.TooSlowError, trio.BrokenResourceError):
            return None

    async def _attach_first(self, result: MyLogin, greeting: MyGreeting | None) -> None:
        if self.pooled:
            await self._login_pooled(result)
            return
        ctx = self.ctx
        cluster = ctx.cluster
        readwrite = ctx.endpoint.kind == "readwrite"
        role = WRITER if readwrite else MAIN
        backend: MyBackendConnection | None = None
        if greeting is not None:
            name = self._instance_at(greeting)
            try:
                with trio.fail_after(ctx.connect_timeout_s):
                    backend = await self._login_backend(name, greeting, result.schema)
            except MyBackendError as e:
                if e.err_payload is not None and e.errno != 1043:
                    raw = encode_packet(result.ok_seq, e.err_payload)
                    raise Fatal(e.errno, e.sqlstate, e.message, raw=raw) from None
                backend = None  # the greeted connection went away meanwhile: open another
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError):
                backend = None
        if backend is None:
            try:
                backend = await self._open(role, cluster.config.failover_timeout_ms / 1000, schema=result.schema)
            except NoRoute as e:
                raise Fatal(ER_NO_ROUTE, "HY000", str(e), seq=result.ok_seq) from None
            except MyBackendError as e:
                refusal = encode_packet(result.ok_seq, e.err_payload) if e.err_payload else None
                raise Fatal(e.errno, e.sqlstate, e.message, seq=result.ok_seq, raw=refusal) from None
        self.backends.activate(role, backend)
        self._core = self.core = MySessionCore(
            self.env, self._facts(backend), capabilities=result.capabilities, status=backend.status,
            readwrite=readwrite, session_consistency=ctx.endpoint.consistency == "session",
            max_payload=ctx.max_message_bytes, allow_local_infile=cluster.config.allow_local_infile,
            schema=result.schema, charset=result.character_set)
        if self.draining:
            self.core.drain()
        ok = OkPacket(status=backend.status or k.SERVER_STATUS_AUTOCOMMIT)
        await self.client.send_all(encode_packet(result.ok_seq, ok.encode(result.capabilities)))
        self.log.debug("session_attached", instance=backend.instance, thread=backend.thread_id)

    async def _login_pooled(self, result: MyLogin) -> None:
        """Transaction mode: the session starts with no server connection. Unless the pool it will
        borrow from has connections already (the server took this user and database), one is
        borrowed now, opened with the client's credential, so that a server's refusal reaches the
        client as its login's answer; it goes back at once."""
        ctx = self.ctx
        cluster = ctx.cluster
        readwrite = ctx.endpoint.kind == "readwrite"
        role = WRITER if readwrite else MAIN
        self.pool_database = result.schema or ""
        status = k.SERVER_STATUS_AUTOCOMMIT
        if not self._pool_in_use(role):
            try:
                pooled, _, _ = await self._borrow(role, cluster.config.failover_timeout_ms / 1000, fit=False)
            except NoRoute as e:
                raise Fatal(ER_NO_ROUTE, "HY000", str(e), seq=result.ok_seq) from None
            except PoolTimeout:
                raise Fatal(ER_CON_COUNT, "08004", self._pool_timeout_message(), seq=result.ok_seq) from None
            except MyBackendError as e:
                refusal = encode_packet(result.ok_seq, e.err_payload) if e.err_payload else None
                raise Fatal(e.errno, e.sqlstate, e.message, seq=result.ok_seq, raw=refusal) from None
            status = pooled.conn.status or status
            self._give_back(reusable=True)
        self._core = self.core = MySessionCore(
            self.env, None, capabilities=result.capabilities, status=status, readwrite=readwrite,
            session_consistency=ctx.endpoint.consistency == "session", max_payload=ctx.max_message_bytes,
            allow_local_infile=cluster.config.allow_local_infile, schema=result.schema,
            charset=result.character_set, pooled=True, max_prepared=cluster.config.max_prepared_statements)
        if self.draining:
            self.core.drain()
        ok = OkPacket(status=status)
        await self.client.send_all(encode_packet(result.ok_seq, ok.encode(result.capabilities)))

    def _pool_in_use(self, role: str) -> bool:
        """Whether the pool this session's next borrow would use has connections already.
        (Read from the registry's table: PoolRegistry has no call for it.)"""
        assert self.user is not None
        cluster = self.ctx.cluster
        instance = cluster.route(self.env.rule(role)).instance
        if instance is None:
            return False
        pool = cluster.pools.pools.get(PoolKey(instance, self.user.name, self.pool_database))
        return pool is not None and pool.total > 0

    def _pool_timeout_message(self) -> str:
        return ("Too many connections: no server connection free within borrow_timeout_ms "
                f"({self.ctx.cluster.config.borrow_timeout_ms} ms)")

    def _instance_at(self, greeting: MyGreeting) -> str:
        for inst in self.ctx.cluster.config.instances:
            if inst.address == greeting.address:
                return inst.name
        raise MyBackendError("the greeted instance left the configuration")

    @staticmethod
    def _facts(backend: MyBackendConnection) -> BackendFacts:
        return BackendFacts(backend.instance, backend.in_recovery)

    # --- backends ------------------------------------------------------------------------------

    async def _login_backend(self, name: str, greeting: MyGreeting, schema: str | None, *,
                             count: bool = True) -> MyBackendConnection:
        """``count``: as a session backend (a pooled one is counted by its pool)."""
        assert self.login is not None and self.user is not None
        cluster = self.ctx.cluster
        backend = await login_my_backend(
            name, greeting, user=self.user.name, database=schema,
            capabilities=(self.login.capabilities & ~PER_LEG) | k.CLIENT_CONNECT_WITH_DB,
            character_set=self.login.character_set, connect_attrs=self.login.attrs,
            credential=cluster.my_backend_credential(self.user.name, self.login.stage1),
            security=cluster.backend_security)
        backend.in_recovery = bool(cluster.topology.instances[name].in_recovery)
        faults.with_toxics(cluster, backend)
        return self.backends.count(backend) if count else backend

    async def _open(self, role: str, timeout_s: float, exclude: frozenset[str] = frozenset(), *,
                    schema: str | None, held: bool = False) -> MyBackendConnection:
        """Route, connect and log in. Raises NoRoute, or MyBackendError with ``err_payload`` when
        the server refused the login (its ERR goes to the client)."""
        cluster = self.ctx.cluster
        rule = self.env.rule(role)
        attempts: dict[str, int] = {}
        deadline = trio.current_time() + timeout_s
        while True:
            decision = await cluster.wait_for_route(rule, max(0.0, deadline - trio.current_time()), held=held,
                                                    exclude=exclude)
            name = decision.instance
            if name is None or attempts.get(name, 0) >= 2:
                raise NoRoute(f"endpoint {self.ctx.endpoint.name}: {decision.reason or 'no instance is available'}")
            attempts[name] = attempts.get(name, 0) + 1
            try:
                if faults.refused(cluster, rule, name):
                    exclude = exclude | {name}  # a simulated dead replica: the next one, unreported
                    continue
                with trio.fail_after(self.ctx.connect_timeout_s):
                    greeting = await greet_my_backend(cluster.config.instance_named(name).address, name,
                                                      dial=self.ctx.dial)
                    return await self._login_backend(name, greeting, schema)
            except MyBackendError as e:
                if e.err_payload is not None:
                    raise
                error = e.message
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
                error = str(e) or "connect timed out"
            cluster.backend_failed(name, error)
            if not (await cluster.verdict(name)).up:
                exclude = exclude | {name}

    # --- transaction mode: the pools -------------------------------------------------------------

    async def _borrow(self, role: str, timeout_s: float, exclude: frozenset[str] = frozenset(), *,
                      fit: bool = True) -> tuple[Pooled[MyBackendConnection], Plan | None, bool]:
        """Route, then borrow a connection of that instance's pool for this user and database,
        brought to the session's state (``fit``); returns it, the plan that ran and whether all of
        it did. Raises NoRoute, PoolTimeout, or MyBackendError with ``err_payload`` when the
        server refused a login (its ERR goes to the client)."""
        assert self.user is not None
        cluster = self.ctx.cluster
        rule = self.env.rule(role)
        failures: dict[str, int] = {}
        misfits = 0
        deadline = trio.current_time() + timeout_s
        while True:
            decision = await cluster.wait_for_route(rule, max(0.0, deadline - trio.current_time()), held=True,
                                                    exclude=exclude)
            name = decision.instance
            if name is None or failures.get(name, 0) >= 2:
                raise NoRoute(f"endpoint {self.ctx.endpoint.name}: {decision.reason or 'no instance is available'}")
            try:
                if faults.refused(cluster, rule, name):
                    exclude = exclude | {name}  # a simulated dead replica: the next one, unreported
                    continue
                self.lent = await cluster.pools.borrow(name, self.user.name, self.pool_database,
                                                       partial(self._open_pooled, name), _close_pooled)
            except MyBackendError as e:
                if e.err_payload is not None:
                    raise
                error = e.message
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
                error = str(e) or "connect timed out"
            else:
                fitted = await self._fit(self.lent, fit)
                if fitted is not None:
                    return self.lent, *fitted
                misfits += 1  # closed: the next idle one, or a new one
                if misfits > cluster.config.pool_size + 1:
                    raise MyBackendError("no pooled server connection could be brought to the session's state")
                continue
            failures[name] = failures.get(name, 0) + 1
            cluster.backend_failed(name, error)
            if not (await cluster.verdict(name)).up:
                exclude = exclude | {name}

    async def _open_pooled(self, name: str) -> MyBackendConnection:
        """A new connection for a pool, logged in as this session's user into its pool's database."""
        cluster = self.ctx.cluster
        with trio.fail_after(self.ctx.connect_timeout_s):
            greeting = await greet_my_backend(cluster.config.instance_named(name).address, name)
            return await self._login_backend(name, greeting, self.pool_database or None, count=False)

    def _variant(self) -> tuple[int, int]:
        """What a pooled connection was logged in with that a session cannot change afterwards: the
        capabilities (they shape the server's answers: EOF packets, found rows, multi-results, ...)
        and the character set of the handshake."""
        assert self.login is not None
        return (self.login.capabilities & ~PER_LEG) | k.CLIENT_CONNECT_WITH_DB, self.login.character_set

    async def _fit(self, pooled: Pooled[MyBackendConnection], fit: bool) -> tuple[Plan | None, bool] | None:
        """Make a borrowed connection this session's: None when it cannot be (it was logged in for
        other capabilities or another character set, the server closed it while idle, it broke
        meanwhile, or it is in a database and the session in none): it is closed."""
        backend = pooled.conn
        mark = pooled.mark
        if not isinstance(mark, PooledMark):
            mark = pooled.mark = PooledMark.fresh(self._variant(), self.pool_database or None)
        if mark.variant != self._variant() or backend.conn.peer_closed():
            await self._discard()
            return None
        instance = self.ctx.cluster.topology.instances.get(backend.instance)
        if instance is not None:
            backend.in_recovery = bool(instance.in_recovery)  # (its role when it was opened may be past)
        faults.with_toxics(self.ctx.cluster, backend)
        if not fit:
            return None, True
        plan = self.core.pool_plan(mark)
        complete = True
        try:
            if plan is not None and plan.commands and not await self._run_plan(backend, plan):
                plan = self.core.pool_plan(mark, reset=True)
                if plan is not None:
                    complete = await self._run_plan(backend, plan)
        except (*NETWORK_ERRORS, MySQLProtocolError):
            plan = None
        if plan is None:
            await self._discard()
            return None
        return plan, complete

    async def _run_plan(self, backend: MyBackendConnection, plan: Plan) -> bool:
        """Run a plan's commands; False at the first the server refused."""
        for command in plan.commands:
            tracker, _ = await self._exchange(backend, command)
            if tracker.error is not None:
                self.log.info("pool_state_error", errno=tracker.error.errno, error=tracker.error.message,
                              reset=plan.reset)
                return False
        return True

    async def _discard(self) -> None:
        """Close the borrowed connection (it no longer counts in its pool)."""
        pooled, self.lent = self.lent, None
        if pooled is not None:
            self.ctx.cluster.pools.forget(pooled)
            await _close_pooled(pooled.conn)

    def _give_back(self, *, reusable: bool) -> None:
        """The borrowed connection goes back to its pool (closed there unless ``reusable``)."""
        pooled, self.lent = self.lent, None
        active = self.backends.active
        if active is not None and pooled is not None and active is pooled.conn:
            self.backends.release_active()
        if pooled is not None:
            self.ctx.cluster.pools.give_back(pooled, reusable=reusable)

    async def _borrow_attach(self, action: Attach) -> None:
        core = self.core
        try:
            held = await self._held_reader(action.role)
            if held is not None:
                pooled, plan, complete = held
            else:
                pooled, plan, complete = await self._borrow(
                    action.role, self.ctx.cluster.config.failover_timeout_ms / 1000, action.exclude)
        except PoolTimeout:
            core.attach_failed(AttachError("pool_timeout", str(ER_CON_COUNT), self._pool_timeout_message()))
            return
        except NoRoute as e:
            core.attach_failed(AttachError("no_route", str(ER_NO_ROUTE), str(e)))
            return
        except MyBackendError as e:
            core.attach_failed(AttachError("refused" if e.err_payload else "failed", str(e.errno), e.message,
                                           e.err_payload))
            return
        backend = pooled.conn
        assert isinstance(pooled.mark, PooledMark)
        self.backends.activate(action.role, backend)
        if action.reason not in (BORROW, "readwrite"):
            self.log.info("session_reattached", instance=backend.instance, thread=backend.thread_id,
                          reason=action.reason)
        core.borrowed(self._facts(backend), pooled.mark, status=backend.status, plan=plan, complete=complete)

    async def _held_reader(self, role: str) -> tuple[Pooled[MyBackendConnection], Plan | None, bool] | None:
        """The replica connection session consistency waited on (still lent), made the session's for
        the read it waited for; None when there is none (or it cannot serve)."""
        pooled = self.lent
        if pooled is None or self.backends.active is not None:
            return None
        if role != READER:
            self._give_back(reusable=True)
            return None
        fitted = await self._fit(pooled, True)
        return (pooled, *fitted) if fitted is not None else None

    def take_fault(self, backend: MyBackendConnection) -> None:
        """A fault started on a backend's instance (BackendSet.fault): apply it now."""
        faults.take_fault(self.ctx.cluster, backend)
        self.wake()

    async def handle(self, action: object) -> None:
        if isinstance(action, Release):
            self._give_back(reusable=action.reusable)
        elif isinstance(action, Attach):
            await (self._borrow_attach(action) if self.pooled else self._attach(action))
        elif isinstance(action, Detach):
            if action.park:
                self.backends.park()
            else:
                await self.backends.close(self.backends.release_active(), _QUIT)
        elif isinstance(action, Lost):
            await self._lost(action.instance)
        elif isinstance(action, Prepare):
            await self._prepare(action)
        elif isinstance(action, Kill):
            await self._kill(action)
        elif isinstance(action, ChangeUser):
            await self._change_user(action.payload)
        elif isinstance(action, DropParked):
            for role in list(self.backends.parked):
                await self.backends.close(self.backends.take_parked(role), _QUIT)
        elif isinstance(action, CatchUp):
            self.core.caught_up(await (self._caught_up_pooled() if self.pooled else self._caught_up()))
        elif isinstance(action, WaitGate):
            await self.ctx.cluster.drills.gate.wait_open()
            self.core.gate_opened()

    async def _lost(self, instance: str) -> None:
        backend = self.backends.release_active()
        pooled, self.lent = self.lent, None
        if pooled is not None:
            self.ctx.cluster.pools.forget(pooled)  # (closed here, below)
        await self.backends.close(backend)
        was_writer = backend is not None and not backend.in_recovery
        self.ctx.cluster.backend_failed(instance, "session backend connection lost")
        verdict = await self.ctx.cluster.verdict(instance)
        self.core.verdict(verdict.same_role(was_writer))
        outcome = self.core.loss_outcome
        self.log.info("session_backend_lost", instance=instance, outcome=outcome.value if outcome else None)

    async def _attach(self, action: Attach) -> None:
        core, role = self.core, action.role
        cluster = self.ctx.cluster
        backend = self.backends.take_parked(role)
        if backend is not None:
            if backend.conn.peer_closed() or not self.env.placement_ok(role, backend.instance):
                await self.backends.close(backend, _QUIT)
                backend = None
            else:
                try:
                    await self._replay(backend, role, fresh=False)
                except (*NETWORK_ERRORS, MyBackendError, MySQLProtocolError):
                    await self.backends.close(backend)
                    backend = None
        if backend is None:
            timeout = cluster.config.failover_timeout_ms / 1000
            try:
                backend = await self._open(role, timeout, action.exclude, schema=core.state.schema, held=True)
                await self._replay(backend, role, fresh=True)
            except NoRoute as e:
                core.attach_failed(AttachError("no_route", str(ER_NO_ROUTE), f"{e} (waited {timeout * 1000:.0f} ms)"))
                return
            except MyBackendError as e:
                core.attach_failed(AttachError("refused" if e.err_payload else "failed", str(e.errno), e.message,
                                               e.err_payload))
                return
            except (*NETWORK_ERRORS, MySQLProtocolError) as e:
                if backend is not None:
                    await self.backends.close(backend)
                core.attach_failed(AttachError("failed", "2013", f"could not re-attach the session: {e}"))
                return
            if action.reason != "readwrite":
                self.log.info("session_reattached", instance=backend.instance, thread=backend.thread_id,
                              reason=action.reason)
        self.backends.activate(role, backend)
        core.attached_backend(self._facts(backend), status=backend.status)

    async def _replay(self, backend: MyBackendConnection, role: str, *, fresh: bool) -> None:
        for command in self.core.replay_plan(role, fresh, schema_known=self.core.state.schema if fresh else None):
            if command[0] == c.COM_STMT_CLOSE:
                await backend.conn.send_all(encode_packet(0, command))  # no answer
                continue
            tracker, _ = await self._exchange(backend, command)
            if tracker.error is not None:
                self.log.info("session_replay_error", errno=tracker.error.errno, error=tracker.error.message)

    async def _exchange(self, backend: MyBackendConnection, command: bytes) -> tuple[ResponseTracker, bytes]:
        """Run one command of our own on an idle backend; returns its tracker and the raw response."""
        tracker = ResponseTracker(command[0], backend.capabilities)
        await backend.conn.send_all(encode_packet(0, command))
        raw = bytearray()
        reader = PacketReader()
        buf = bytearray(8192)
        while not tracker.done:
            n = await backend.conn.recv_into(buf)
            if n == 0:
                raise ConnectionResetError("the server closed the connection")
            reader.feed(memoryview(buf)[:n])
            while not tracker.done and (packet := reader.next_packet()) is not None:
                seq, payload = packet
                tracker.feed(payload)
                raw += encode_packet(seq, payload)
        if tracker.status is not None:
            backend.status = tracker.status
        return tracker, bytes(raw)

    async def _prepare(self, action: Prepare) -> None:
        backend = self.backends.active
        backend_id = None
        if backend is not None:
            try:
                if action.schema is not None:
                    backend_id = await self._prepare_in(backend, action.schema, action.sql)
                else:
                    tracker, _ = await self._exchange(
                        backend, bytes((c.COM_STMT_PREPARE,)) + action.sql.encode("utf-8", "surrogateescape"))
                    if tracker.prepare_ok is not None:
                        backend_id = tracker.prepare_ok.statement_id
            except (*NETWORK_ERRORS, MySQLProtocolError):
                self.core.prepared(action.client_id, None)
                self.core.server_eof()
                return
        self.core.prepared(action.client_id, backend_id)

    async def _prepare_in(self, backend: MyBackendConnection, schema: str, sql: str) -> int | None:
        """Transaction mode: prepare a statement in the database the client prepared it in (its
        tables resolve there), then return to the session's."""
        current = self.core.state.schema
        tracker, _ = await self._exchange(backend, bytes((c.COM_INIT_DB,)) + _text(schema))
        if tracker.error is not None:
            return None
        tracker, _ = await self._exchange(backend, bytes((c.COM_STMT_PREPARE,)) + _text(sql))
        backend_id = tracker.prepare_ok.statement_id if tracker.prepare_ok is not None else None
        if current is not None:
            back, _ = await self._exchange(backend, bytes((c.COM_INIT_DB,)) + _text(current))
            if back.error is not None:
                raise MySQLProtocolError(f"could not return to database {current}: {back.error.message}")
        return backend_id

    async def _kill(self, action: Kill) -> None:
        """KILL [QUERY|CONNECTION] n: n is the id a client saw (its handshake's, CONNECTION_ID()).
        It is mapped to where that session runs now, and the server decides whether this user
        may kill it (1095 otherwise), as it would directly."""
        cluster = self.ctx.cluster
        target = action.target
        session = cluster.mysql_sessions.get(target)
        where = session.current_thread() if isinstance(session, MySession) else None
        if session is not None and where is None:
            # That session has no server connection right now: nothing runs to be killed. (No server
            # decides who may end it, so only its own user may, as without the CONNECTION ADMIN right.)
            if isinstance(session, MySession) and session.user is not None and self.user is not None \
                    and session.user.name != self.user.name:
                await self._send_client(encode_packet(action.seq, err_packet(
                    ER_KILL_DENIED, "HY000", f"You are not owner of thread {target}")))
                return
            if action.what == "CONNECTION" and isinstance(session, MySession):
                session.core.closing = True
                session.wake_close()
            self.core.reply_ok(action.seq - 1)
            return
        instance: str | None
        if where is not None:
            instance, thread = where
        else:
            # Not a session of this proxy's: a server thread id, on the instance this session uses.
            active = self.backends.active
            thread = target
            if active is not None:
                instance = active.instance
            else:
                instance = self.ctx.cluster.route(self.env.rule(self.core.role)).instance if self.pooled else None
        sql = f"KILL {action.what} {int(thread)}"
        still = None
        if isinstance(session, MySession) and session.pooled:
            # A pooled session may give its connection back, and another borrow it, while the KILL
            # connection opens: it is checked again right before the KILL goes.
            def still() -> bool:
                return session.current_thread() == where
        answer = await self._run_as_user(instance, sql, action.seq, still=still)
        await self._send_client(answer)

    def wake_close(self) -> None:
        self.closed = True
        self.wake()

    async def _run_as_user(self, instance: str | None, sql: str, seq: int, *,
                           still: Callable[[], bool] | None = None, fresh: bool = False) -> bytes:
        """Run a statement as this session's user on ``instance`` and return the answer for the
        client (OK or the server's ERR) at sequence ``seq``. ``still``: asked right before it goes;
        False answers OK without running it (what it was for has gone)."""
        assert self.user is not None and self.login is not None
        if instance is None:
            return encode_packet(seq, err_packet(ER_NO_ROUTE, "HY000", "no instance is available"))
        active = self.backends.active
        try:
            if active is not None and active.instance == instance and not fresh:
                if still is not None and not still():
                    return encode_packet(seq, OkPacket(status=active.status).encode(self.login.capabilities))
                tracker, raw = await self._exchange(active, bytes((c.COM_QUERY,)) + sql.encode())
                if tracker.error is not None:
                    return encode_packet(seq, err_packet(tracker.error.errno, tracker.error.sqlstate,
                                                         tracker.error.message))
                return encode_packet(seq, OkPacket(status=active.status).encode(self.login.capabilities))
            cluster = self.ctx.cluster
            with trio.fail_after(self.ctx.connect_timeout_s):
                probe = await MyProbeConnection.open(
                    instance, cluster.config.instance_named(instance).address, user=self.user.name, password=None,
                    credential=cluster.my_backend_credential(self.user.name, self.login.stage1),
                    security=cluster.backend_security)
            try:
                if still is None or still():
                    await probe.query(sql)
            finally:
                with trio.CancelScope(shield=True):
                    await probe.aclose()
        except MyBackendError as e:
            if e.err_payload is not None:
                return encode_packet(seq, e.err_payload)
            return encode_packet(seq, err_packet(1094, "HY000", f"{sql}: {e.message}"))
        except (*NETWORK_ERRORS, trio.TooSlowError) as e:
            return encode_packet(seq, err_packet(1094, "HY000", f"{sql}: {e}"))
        status = self.core.status if self._core is not None else k.SERVER_STATUS_AUTOCOMMIT
        return encode_packet(seq, OkPacket(status=status).encode(self.login.capabilities))

    async def _send_client(self, data: bytes) -> None:
        try:
            await self.client.send_all(data)
        except NETWORK_ERRORS:
            self.closed = True

    async def _change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER: authenticate the new user, then start the session over on a backend
        logged in as that user."""
        assert self.login is not None
        try:
            request, user, seq, stage1 = await change_user(self.ctx, self.client, payload,
                                                           self.login.capabilities, self.login.nonce, self.log)
        except Fatal as e:
            await send_quietly(self.client, encode_packet(e.seq, err_packet(e.errno, e.sqlstate, str(e))))
            self.closed = True
            return
        refusal = self.ticket.admit_user(user) if self.ticket is not None else None
        if refusal is not None:  # the new user has all its connections: the session stays the old user's
            errno, sqlstate, message = refusal.mysql_error
            await self._send_client(encode_packet(seq, err_packet(errno, sqlstate, message)))
            return
        if self.lent is not None:
            self._give_back(reusable=False)  # the old user's session: a pin or a transaction held it
            self.core.let_go()
        await self.backends.close_all(_QUIT)
        self.user = user
        self.login.stage1 = stage1
        if request.character_set:
            self.login.character_set = request.character_set
        if request.connect_attrs is not None:
            self.login.attrs = request.connect_attrs
        core = self.core
        if self.pooled:
            await self._user_changed_pooled(request.database or None, seq)
            return
        core.user_changed(request.database or None)
        core.attached = False
        role = core.role
        try:
            backend = await self._open(role, self.ctx.cluster.config.failover_timeout_ms / 1000,
                                       schema=core.state.schema, held=True)
        except NoRoute as e:
            await self._send_client(encode_packet(seq, err_packet(ER_NO_ROUTE, "HY000", str(e))))
            return
        except MyBackendError as e:
            await self._send_client(encode_packet(seq, e.err_payload or err_packet(e.errno, e.sqlstate, e.message)))
            return
        self.backends.activate(role, backend)
        core.attached_backend(self._facts(backend), status=backend.status, role=role)
        await self._send_client(encode_packet(seq, OkPacket(status=backend.status).encode(self.login.capabilities)))

    async def _user_changed_pooled(self, schema: str | None, seq: int) -> None:
        """Transaction mode: the session starts over as the new user, borrowing from that user's
        pools (checked as at login)."""
        assert self.login is not None
        core = self.core
        core.user_changed(schema)
        self.pool_database = schema or ""
        status = k.SERVER_STATUS_AUTOCOMMIT
        if not self._pool_in_use(core.role):
            try:
                pooled, _, _ = await self._borrow(core.role, self.ctx.cluster.config.failover_timeout_ms / 1000,
                                                  fit=False)
            except NoRoute as e:
                await self._send_client(encode_packet(seq, err_packet(ER_NO_ROUTE, "HY000", str(e))))
                return
            except PoolTimeout:
                await self._send_client(encode_packet(seq, err_packet(ER_CON_COUNT, "08004",
                                                                      self._pool_timeout_message())))
                return
            except MyBackendError as e:
                await self._send_client(encode_packet(seq, e.err_payload or err_packet(e.errno, e.sqlstate,
                                                                                         e.message)))
                return
            status = pooled.conn.status or status
            self._give_back(reusable=True)
        core.status = status
        await self._send_client(encode_packet(seq, OkPacket(status=status).encode(self.login.capabilities)))

    async def _caught_up(self) -> bool:
        """Session consistency through GTIDs: the replica waits (MASTER_GTID_WAIT, bounded) for the
        writer's position after this session's writes; False reads on the writer."""
        writer = self.backends.parked.get(WRITER)
        if writer is None:
            return True
        try:
            _, raw = await self._exchange(writer, bytes((c.COM_QUERY,)) + b"SELECT @@gtid_binlog_pos")
            position = _first_text_value(raw)
            reader = self.backends.take_parked(READER)
            if reader is not None and (reader.conn.peer_closed() or not self.env.placement_ok(READER,
                                                                                               reader.instance)):
                await self.backends.close(reader, _QUIT)
                reader = None
            if reader is None:
                reader = await self._open(READER, 0.0, schema=self.core.state.schema)
                self.core.marks.pop(READER, None)
            self.backends.keep(READER, reader)
            if not reader.in_recovery:
                return True
            wait_s = self.ctx.endpoint.session_wait_ms / 1000
            query = f"SELECT MASTER_GTID_WAIT('{position}', {wait_s:.3f})"
            _, raw = await self._exchange(reader, bytes((c.COM_QUERY,)) + query.encode())
            return _first_text_value(raw) == "0"
        except (NoRoute, MyBackendError, MySQLProtocolError, *NETWORK_ERRORS):
            return False


    async def _caught_up_pooled(self) -> bool:
        """Session consistency in transaction mode: the writer's position from a connection of its pool,
        then the wait on a replica connection that stays lent for the read (``_held_reader``)."""
        try:
            await self._borrow(WRITER, self.ctx.cluster.config.failover_timeout_ms / 1000, fit=False)
            assert self.lent is not None
            _, raw = await self._exchange(self.lent.conn, bytes((c.COM_QUERY,)) + b"SELECT @@gtid_binlog_pos")
            self._give_back(reusable=True)  # (a read of a global: nothing of the session's on it)
            position = _first_text_value(raw)
            await self._borrow(READER, 0.0, fit=False)
            assert self.lent is not None
            reader = self.lent.conn
            if not reader.in_recovery:
                return True
            wait_s = self.ctx.endpoint.session_wait_ms / 1000
            query = f"SELECT MASTER_GTID_WAIT('{position}', {wait_s:.3f})"
            _, raw = await self._exchange(reader, bytes((c.COM_QUERY,)) + query.encode())
            return _first_text_value(raw) == "0"
        except (NoRoute, PoolTimeout, MyBackendError, MySQLProtocolError, *NETWORK_ERRORS):
            await self._discard()
            return False


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


async def _close_pooled(backend: MyBackendConnection) -> None:
    """How a pool says goodbye to one of its connections: COM_QUIT (bounded), then close."""
    with trio.CancelScope(shield=True):
        if not backend.conn.closed:
            with trio.move_on_after(0.5):
                try:
                    await backend.conn.send_all(_QUIT)
                except NETWORK_ERRORS:
                    pass
        await backend.conn.aclose()


def _first_text_value(raw: bytes) -> str | None:
    """The first column of the first row of a raw text result (column count, definitions, row)."""
    reader = PacketReader()
    reader.feed(raw)
    packets = []
    while (p := reader.next_packet()) is not None:
        packets.append(p[1])
    for payload in packets[2:]:
        if payload and payload[0] in (0xFE, 0xFF) and len(payload) < 9:
            continue
        value, _ = read_row_value(payload, 0)
        return None if value is None else value.decode()
    return None
