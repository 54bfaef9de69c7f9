"""A PostgreSQL client session: login, the first backend, then the core's actions over the relay.

The decisions are ``sessioncore.pg.PgSessionCore``'s; this shell logs the client in, opens
and replays backends, asks the monitor for verdicts, and moves bytes (``SessionShell``).
"""

from __future__ import annotations

import functools
import secrets
import socket
import ssl
from typing import Any

import structlog
import trio

from ...config import Address, UserConfig
from ...protocol.errors import FrameError, ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import ScramKeys, ScramServerAuth
from ...protocol.pg.framing import FrameReader
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
    PrepareStatements,
    Release,
    WaitGate,
)
from ...sessioncore.pg import PgSessionCore, dialect_of, is_fatal
from ...sessioncore.pg_pool import PooledMark, StartupError, startup_settings
from ..pool import Pooled, PoolTimeout
from ..session import faults
from ..session.backends import BackendSet
from ..session.context import CancelTarget, SessionContext
from ..session.env import SessionEnv
from ..session.info import SessionInfo, session_state
from ..session.shell import NETWORK_ERRORS, SessionShell
from .backend import BackendConnection, BackendError, open_backend, send_cancel
from .login import Fatal, login

log = structlog.get_logger("endpoint_proxy.session")

# Startup parameters that belong to the connection, not to the backend session.
_NOT_FORWARDED = frozenset({"user"})
_TERMINATE = m.Terminate().encode()


class NoRoute(Exception):
    pass


class Refused(Exception):
    """The server itself refused the login; its ErrorResponse is ``raw``."""

    def __init__(self, sqlstate: str, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.raw = raw


class PgSession(SessionShell):
    __slots__ = ("ctx", "peer", "session_id", "metrics", "scope", "draining", "is_console", "user", "backend_params",
                 "backends", "env", "cancel_key", "_login", "_core", "_pooled")

    core: PgSessionCore

    def __init__(self, ctx: SessionContext, sock: socket.socket, session_id: int) -> None:
        super().__init__(ctx.hub)
        self.ctx = ctx
        self.client = RawConn(sock)
        try:
            host, port = sock.getpeername()[:2]
            self.peer: str | None = str(Address(host, port))
        except OSError:
            self.peer = None
        self.session_id = session_id
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self.scope = trio.CancelScope()  # the proxy runs the session inside it
        self.draining = False
        self.is_console = False
        self.user: UserConfig | None = None
        self.backend_params: dict[str, str] = {}
        self.backends: BackendSet[BackendConnection] = BackendSet(ctx.cluster)
        self.env = SessionEnv(ctx.cluster, ctx.endpoint, self.metrics)
        self.backends.on_fault = self._fault
        self.cancel_key: tuple[int, int] | None = None
        self._login: ScramKeys | None = None  # SCRAM keys of the client's own login (passthrough)
        self._core: PgSessionCore | None = None
        self._pooled: Pooled[BackendConnection] | None = None  # transaction mode: the borrowed connection

    # --- what the proxy asks of a session -----------------------------------------------------

    @property
    def log(self) -> Any:
        """This session's logger (bound when used: most sessions never log)."""
        return log.bind(conn=self.session_id, endpoint=self.ctx.endpoint.name)

    def idle(self) -> bool:
        return self._core is not None and self._core.idle

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else as soon as the session becomes idle."""
        self.draining = True
        if self.is_console:
            self.scope.cancel()
        elif self._core is not None and self._core.drain():
            self.wake()

    def session_info(self) -> SessionInfo | None:
        """This session for the admin console's SHOW SESSIONS (None for a console session)."""
        if self.is_console:
            return None
        core = self._core
        backend = self.backends.active
        return SessionInfo(
            cluster=self.ctx.cluster.config.name, endpoint=self.ctx.endpoint.name, id=self.session_id,
            user=self.user.name if self.user is not None else None, database=self.backend_params.get("database"),
            instance=backend.instance if backend is not None else None,
            state=session_state(logged_in=core is not None, busy=core is not None and core.busy,
                                transaction=core.status if core is not None else "I"),
            client=self.peer)

    # --- the janitor's view (server/janitor.py Timed) ------------------------------------------

    def activity(self) -> tuple[int, bool, bool]:
        """(requests begun so far, a request in flight, inside a transaction)."""
        core = self._core
        if core is None or self.is_console:
            return 0, False, False
        return core.requests, core.busy, core.status in ("T", "E")

    def cancel_running(self) -> None:
        """query_timeout_ms: cancel the statement in flight (the server answers it with 57014)."""
        core, backend = self._core, self.backends.active
        nursery = self.ctx.cluster.nursery
        if core is None or not core.busy or backend is None or backend.address is None or nursery is None:
            return
        nursery.start_soon(_cancel_quietly, backend.address, backend.process_id, backend.secret_key)

    def expire(self, reason: str) -> None:
        """A session timeout: the client is told why, and the session ends."""
        if self._core is None:
            return
        if reason == "idle_transaction":
            self._core.expire("25P03", "terminating connection due to idle-in-transaction timeout")
        else:
            self._core.expire("57P05", "terminating connection due to idle-session timeout")
        self.wake()

    def backend_conn(self) -> Conn | None:
        backend = self.backends.active
        return backend.conn if backend is not None else None

    # --- the session ---------------------------------------------------------------------------

    async def run(self) -> None:
        cluster = self.ctx.cluster
        try:
            result = None
            with trio.move_on_after(self.ctx.startup_timeout_s):
                result = await login(self.ctx, self, self.log)
            if result is None:
                cluster.metrics.error("startup_timeout")
                return
            if result.console is not None and result.startup is not None and self.ctx.console is not None:
                # Outside the startup deadline: the console applies it to its login only.
                self.is_console = True
                reader, buf = result.console
                await self.ctx.console(self.client, result.startup, reader, buf, self.ctx.startup_timeout_s)
                return
            if result.startup is None:
                return
            assert result.user is not None
            self.user = result.user
            # Only what later server logins need of the client's exchange: its SCRAM keys.
            self._login = result.auth.passthrough_keys() if isinstance(result.auth, ScramServerAuth) else None
            await self._attach_first(result.startup.user, result.startup.parameters)
            leftover = result.leftover
            del result  # the login's objects go now: this frame lives as long as the session
            if leftover:
                await self._feed_leftover(leftover)
            del leftover
            await self.relay()
        except Fatal as e:
            cluster.metrics.error("auth_failed" if e.sqlstate.startswith("28") else "session_fatal")
            await send_quietly(self.client, e.raw or m.error_response("FATAL", e.sqlstate, str(e)))
        except FrameError as e:
            # An impossible length: close at once, allocate nothing, say nothing more.
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message)
        except ProtocolError as e:
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=e.message, sqlstate=e.sqlstate)
            await send_quietly(self.client, m.error_response("FATAL", e.sqlstate, e.message))
        except NETWORK_ERRORS:
            pass
        finally:
            await self._close()

    async def _feed_leftover(self, data: bytes) -> None:
        from ...sessioncore.actions import FORWARD

        if self.core.client_data(data) == FORWARD:
            conn = self.backend_conn()
            assert conn is not None
            await conn.send_all(data)

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if self._core is not None:
                self._core.end()
            if self.cancel_key is not None:
                self.ctx.cancels.withdraw(*self.cancel_key)
            if self._pooled is not None:
                # Back to the pool only if nothing of this session is left on it.
                core = self._core
                clean = core is not None and core.idle and core.state.pinned_by is None and core.smap is not None \
                    and core.smap.drained and not core.batch_open
                await self._let_go(clean)
            await self.backends.close_all()
            await self.client.aclose()

    async def _attach_first(self, user_name: str, parameters: dict[str, str]) -> None:
        """The first backend, during startup: any failure is FATAL, as a server's would be."""
        ctx = self.ctx
        cluster = ctx.cluster
        params = {k: v for k, v in parameters.items() if k not in _NOT_FORWARDED and not k.startswith("_pq_.")}
        params.setdefault("database", user_name)
        self.backend_params = params
        self.env.database = params["database"]
        readwrite = ctx.endpoint.kind == "readwrite"
        role = WRITER if readwrite else MAIN
        if ctx.endpoint.pool_mode == "transaction":
            await self._login_pooled(role, parameters)
            return
        try:
            backend = await self._open(role, cluster.config.failover_timeout_ms / 1000)
        except NoRoute as e:
            raise Fatal("08006", str(e)) from None
        except Refused as e:
            raise Fatal(e.sqlstate, str(e), raw=e.raw) from None
        self.backends.activate(role, backend)
        if readwrite:
            await cluster.ensure_functions(params["database"])
        secret = ctx.cancels.issue(backend.process_id, self._cancel_target(backend))
        self.cancel_key = (backend.process_id, secret)
        self._core = self.core = PgSessionCore(
            self.env, BackendFacts(backend.instance, backend.in_recovery, backend.status), readwrite=readwrite,
            session_consistency=ctx.endpoint.consistency == "session", max_message_bytes=ctx.max_message_bytes,
            client_params=None if readwrite else backend.parameters)  # readwrite: the client sees two servers
        if self.draining:
            self.core.drain()
        hello = (backend.startup_messages + m.BackendKeyData(backend.process_id, secret).encode()
                 + m.ReadyForQuery(backend.status).encode())
        backend.startup_messages = b""
        await self.client.send_all(hello)
        self.log.debug("session_attached", instance=backend.instance, pid=backend.process_id)

    async def _login_pooled(self, role: str, parameters: dict[str, str]) -> None:
        """Transaction mode: the client is told what a server connection of the pool says, with
        its own startup values set; then the connection goes back until the first request."""
        ctx = self.ctx
        cluster = ctx.cluster
        try:
            startup = startup_settings(parameters)
        except StartupError as e:
            raise Fatal("08P01", str(e)) from None
        readwrite = role == WRITER
        if readwrite:
            await cluster.ensure_functions(self.env.database)
        self._core = self.core = core = PgSessionCore(
            self.env, BackendFacts("", False), readwrite=readwrite,
            session_consistency=ctx.endpoint.consistency == "session", max_message_bytes=ctx.max_message_bytes,
            client_params={}, pooled=True, startup=startup, max_prepared=cluster.config.max_prepared_statements)
        try:
            pooled = await self._borrow(role, cluster.config.failover_timeout_ms / 1000)
        except NoRoute as e:
            raise Fatal("08006", str(e)) from None
        except Refused as e:
            raise Fatal(e.sqlstate, str(e), raw=e.raw) from None
        except PoolTimeout as e:
            raise Fatal("53300", str(e)) from None
        backend = pooled.conn
        self._pooled = pooled  # from here on, the session's to give back (_close)
        self.backends.activate(role, backend)
        try:
            plan = core.pooled_plan(pooled.mark)  # type: ignore[arg-type]
            if plan.expected_ready:
                await self._exchange(backend, plan.batch, plan.expected_ready)
        except (*NETWORK_ERRORS, BackendError) as e:
            await self._let_go(False)
            raise Fatal("08006", f"could not set up the server connection: {e}") from None
        core.client_params.update(backend.parameters)
        core.state.dialect = dialect_of(core.client_params)
        core._attaching = role
        core.attached_backend(self._facts(backend), mark=pooled.mark,  # type: ignore[arg-type]
                              conn_params=backend.parameters)
        # A process id of our own: the client's requests run on whichever connection is free.
        pid = secrets.randbelow((1 << 31) - 2) + 1
        secret = ctx.cancels.issue(pid, None)
        self.cancel_key = (pid, secret)
        if self.draining:
            core.drain()
        core.release_now()
        hello = (b"".join(m.ParameterStatus(k, v).encode() for k, v in core.client_params.items())
                 + m.BackendKeyData(pid, secret).encode() + m.ReadyForQuery("I").encode())
        await self.client.send_all(hello)

    # --- transaction mode: borrowed connections -----------------------------------------------

    async def _connect(self, name: str) -> BackendConnection:
        """A new connection of a pool: the user and database only (the client's own settings are
        SETs, applied by difference)."""
        ctx = self.ctx
        cluster = ctx.cluster
        assert self.user is not None
        address = cluster.config.instance_named(name).address
        with trio.fail_after(ctx.connect_timeout_s):
            backend = await open_backend(name, address, {"database": self.env.database}, user=self.user.name,
                                         credential=cluster.pg_backend_credential(self.user.name, self._login),
                                         security=cluster.backend_security)
        backend.address = address
        backend.startup_messages = b""
        faults.with_toxics(cluster, backend)
        return backend

    async def _borrow(self, role: str, timeout_s: float, exclude: frozenset[str] = frozenset(),
                      *, held: bool = False) -> Pooled[BackendConnection]:
        """Route, then borrow from that instance's pool (opening a connection if the pool may).
        Raises NoRoute, Refused, or PoolTimeout (borrow_timeout_ms)."""
        ctx = self.ctx
        cluster = ctx.cluster
        assert self.user is not None
        rule = self.env.rule(role)
        attempts: dict[str, int] = {}
        stale = 0
        deadline = trio.current_time() + timeout_s
        while True:
            remaining = max(0.0, deadline - trio.current_time())
            decision = await cluster.wait_for_route(rule, remaining, held=held, exclude=exclude)
            name = decision.instance
            if name is None or attempts.get(name, 0) >= 2:
                raise NoRoute(f"endpoint {ctx.endpoint.name}: {decision.reason or 'no instance is available'}")
            if faults.refused(cluster, rule, name):
                exclude = exclude | {name}
                continue
            try:
                pooled: Pooled[BackendConnection] = await cluster.pools.borrow(
                    name, self.user.name, self.env.database, functools.partial(self._connect, name), _close_pooled)
            except BackendError as e:
                if e.raw_error is not None:
                    raise Refused(e.sqlstate, str(e), e.raw_error) from None
                error = str(e)
            except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as e:
                error = str(e) or "connect timed out"
            else:
                backend = pooled.conn
                if backend.conn.peer_closed() and stale < 100:
                    stale += 1  # the server closed it while idle (a restart, a terminate): the next one
                    await self._forget(pooled)
                    continue
                backend.in_recovery = bool(cluster.topology.instances[name].in_recovery)
                if pooled.mark is None:
                    pooled.mark = PooledMark()
                return pooled
            attempts[name] = attempts.get(name, 0) + 1
            cluster.backend_failed(name, error)
            verdict = await cluster.verdict(name)
            if not verdict.up:
                exclude = exclude | {name}

    async def _forget(self, pooled: Pooled[BackendConnection]) -> None:
        """A borrowed connection that must not go back: it leaves its pool and closes."""
        self.ctx.cluster.pools.forget(pooled)
        await _close_pooled(pooled.conn)

    async def _let_go(self, reusable: bool) -> None:
        """The session lets go of its borrowed connection (back to the pool, or closed)."""
        pooled, self._pooled = self._pooled, None
        if self.backends.active is not None and pooled is not None and self.backends.active is pooled.conn:
            self.backends.release_active()
        if pooled is None:
            return
        if reusable:
            self.ctx.cluster.pools.give_back(pooled)
        else:
            await self._forget(pooled)

    async def _release(self, action: Release) -> None:
        pooled = self._pooled
        if pooled is None:
            return
        if self.cancel_key is not None:
            self.ctx.cancels.retarget(*self.cancel_key, None)
        reusable = True
        if action.expected_ready:
            try:
                await self._exchange(pooled.conn, action.cleanup, action.expected_ready)
            except (*NETWORK_ERRORS, BackendError):
                reusable = False
        await self._let_go(reusable)

    async def _attach_pooled(self, action: Attach) -> None:
        core, role = self.core, action.role
        cluster = self.ctx.cluster
        timeout = cluster.config.failover_timeout_ms / 1000
        try:
            pooled = await self._borrow(role, timeout, action.exclude, held=True)
        except NoRoute as e:
            core.attach_failed(AttachError("no_route", "57P03", f"{e} (waited {timeout * 1000:.0f} ms)"))
            return
        except Refused as e:
            core.attach_failed(AttachError("refused", e.sqlstate, str(e), e.raw))
            return
        except PoolTimeout as e:
            core.attach_failed(AttachError("busy", "53300", str(e)))
            return
        backend = pooled.conn
        self._pooled = pooled
        self.backends.activate(role, backend)
        plan = core.pooled_plan(pooled.mark)  # type: ignore[arg-type]
        if plan.expected_ready:
            try:
                await self._exchange(backend, plan.batch, plan.expected_ready)
            except (*NETWORK_ERRORS, BackendError) as e:
                await self._let_go(False)
                core.attach_failed(AttachError("failed", "08006", f"could not set up a server connection: {e}"))
                return
        if self.cancel_key is not None:
            self.ctx.cancels.retarget(*self.cancel_key, self._cancel_target(backend))
        core.attached_backend(self._facts(backend), mark=pooled.mark,  # type: ignore[arg-type]
                              conn_params=backend.parameters)

    async def _prepare(self, action: PrepareStatements) -> None:
        """Prepare statements on the borrowed connection before the client's message that uses them
        (nothing is owed on it: the core waited). A refusal goes to the client in that message's place."""
        backend = self.backends.active
        assert backend is not None
        results: list[tuple[bytes, bool]] = []
        error = b""
        batch = b"".join(_parse_message(name, body) for name, body in action.statements) + m.Flush().encode()
        try:
            await backend.conn.send_all(batch)
            reader = FrameReader()
            buf = bytearray(8192)
            while len(results) < len(action.statements):
                msg = reader.next_message()
                if msg is None:
                    n = await backend.conn.recv_into(buf)
                    if n == 0:
                        raise ConnectionResetError("the server closed the connection")
                    reader.feed(memoryview(buf)[:n])
                    continue
                type_, payload = msg
                name = action.statements[len(results)][0]
                if type_ == ord("1"):
                    results.append((name, True))
                elif type_ == ord("E"):
                    if is_fatal(payload):
                        raise ConnectionResetError("the server ended the connection")
                    results.append((name, False))
                    error = _frame(type_, payload)
                    break  # the server skips the rest up to the client's Sync
        except NETWORK_ERRORS + (ConnectionResetError,):
            self.core.server_eof()
            return
        self.core.prepared(results, error)

    @staticmethod
    def _facts(backend: BackendConnection) -> BackendFacts:
        return BackendFacts(backend.instance, backend.in_recovery, backend.status,
                            tuple(backend.parameters.items()))

    @staticmethod
    def _cancel_target(backend: BackendConnection) -> CancelTarget:
        assert backend.address is not None
        return CancelTarget(backend.address, backend.process_id, backend.secret_key)

    # --- backends ------------------------------------------------------------------------------

    async def _open(self, role: str, timeout_s: float, exclude: frozenset[str] = frozenset(),
                    *, held: bool = False) -> BackendConnection:
        """Route and connect. Raises NoRoute when nothing qualified in time, Refused when the
        server itself said no. A connection that fails is not a verdict on its instance: the
        monitor is asked, and the instance is tried again while it stays eligible."""
        ctx = self.ctx
        cluster = ctx.cluster
        user = self.user
        assert user is not None
        rule = self.env.rule(role)
        attempts: dict[str, int] = {}
        deadline = trio.current_time() + timeout_s
        while True:
            remaining = max(0.0, deadline - trio.current_time())
            decision = await cluster.wait_for_route(rule, remaining, held=held, exclude=exclude)
            name = decision.instance
            if name is None or attempts.get(name, 0) >= 2:
                raise NoRoute(f"endpoint {ctx.endpoint.name}: {decision.reason or 'no instance is available'}")
            attempts[name] = attempts.get(name, 0) + 1
            address = cluster.config.instance_named(name).address
            try:
                if faults.refused(cluster, rule, name):
                    exclude = exclude | {name}  # a simulated dead replica: the next one, unreported
                    continue
                with trio.fail_after(ctx.connect_timeout_s):
                    backend = await open_backend(name, address, self.backend_params, user=user.name,
                                                 credential=cluster.pg_backend_credential(user.name, self._login),
                                                 security=cluster.backend_security)
            except BackendError as e:
                if e.raw_error is not None:
                    raise Refused(e.sqlstate, str(e), e.raw_error) from None
                error = str(e)
            except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as e:
                error = str(e) or "connect timed out"
            else:
                backend.address = address
                backend.in_recovery = bool(cluster.topology.instances[name].in_recovery)
                faults.with_toxics(cluster, backend)
                return self.backends.count(backend)
            cluster.backend_failed(name, error)
            verdict = await cluster.verdict(name)
            if not verdict.up:
                exclude = exclude | {name}

    def _fault(self, backend: BackendConnection) -> None:
        """A fault started on a backend's instance (BackendSet.on_fault): apply it now."""
        faults.take_fault(self.ctx.cluster, backend)
        self.wake()

    async def handle(self, action: object) -> None:
        if isinstance(action, Release):
            await self._release(action)
        elif isinstance(action, Attach):
            if self._core is not None and self._core.smap is not None:
                await self._attach_pooled(action)
            else:
                await self._attach(action)
        elif isinstance(action, PrepareStatements):
            await self._prepare(action)
        elif isinstance(action, Detach):
            if action.park:
                self.backends.park()
            else:
                await self.backends.close(self.backends.release_active(), _TERMINATE)
        elif isinstance(action, Lost):
            await self._lost(action.instance)
        elif isinstance(action, CatchUp):
            self.core.caught_up(await self._caught_up())
        elif isinstance(action, WaitGate):
            await self.ctx.cluster.drills.gate.wait_open()
            self.core.gate_opened()

    async def _lost(self, instance: str) -> None:
        pooled, self._pooled = self._pooled, None
        backend = self.backends.release_active()
        if pooled is not None:
            await self._forget(pooled)
        else:
            await self.backends.close(backend)
        was_writer = backend is not None and not backend.in_recovery
        self.ctx.cluster.backend_failed(instance, "session backend connection lost")
        verdict = await self.ctx.cluster.verdict(instance)
        self.core.verdict(verdict.same_role(was_writer))
        self.log.info("session_backend_lost", instance=instance, outcome=str(self.core.loss_outcome.value)
                      if self.core.loss_outcome else None)

    async def _attach(self, action: Attach) -> None:
        core, role = self.core, action.role
        cluster = self.ctx.cluster
        backend = self.backends.take_parked(role)
        if backend is not None:
            if backend.conn.peer_closed() or not self.env.placement_ok(role, backend.instance):
                await self.backends.close(backend, _TERMINATE)
                backend = None
            else:
                try:
                    await self._replay(backend, role, fresh=False)
                except (*NETWORK_ERRORS, BackendError):
                    await self.backends.close(backend)
                    backend = None
        if backend is None:
            timeout = cluster.config.failover_timeout_ms / 1000
            try:
                backend = await self._open(role, timeout, action.exclude, held=True)
            except NoRoute as e:
                core.attach_failed(AttachError("no_route", "57P03", f"{e} (waited {timeout * 1000:.0f} ms)"))
                return
            except Refused as e:
                core.attach_failed(AttachError("refused", e.sqlstate, str(e), e.raw))
                return
            try:
                await self._replay(backend, role, fresh=True)
            except (*NETWORK_ERRORS, BackendError) as e:
                await self.backends.close(backend)
                core.attach_failed(AttachError("failed", "08006", f"could not re-attach the session: {e}"))
                return
            if action.reason != "readwrite":
                self.log.info("session_reattached", instance=backend.instance, pid=backend.process_id,
                              reason=action.reason)
        self.backends.activate(role, backend)
        if self.cancel_key is not None:
            self.ctx.cancels.retarget(*self.cancel_key, self._cancel_target(backend))
        core.attached_backend(self._facts(backend))

    async def _replay(self, backend: BackendConnection, role: str, *, fresh: bool) -> None:
        plan = self.core.replay_plan(role, fresh)
        if plan.expected_ready:
            await self._exchange(backend, plan.batch, plan.expected_ready)

    async def _exchange(self, backend: BackendConnection, batch: bytes, expected_ready: int,
                        collect: list[tuple[str | None, ...]] | None = None) -> None:
        """Send our own requests to an idle backend nobody else reads, and consume the answers up
        to ``expected_ready`` ReadyForQuery messages; errors are logged, rows kept in ``collect``."""
        await backend.conn.send_all(batch)
        reader = FrameReader()
        buf = bytearray(8192)
        while expected_ready:
            msg = reader.next_message()
            if msg is None:
                n = await backend.conn.recv_into(buf)
                if n == 0:
                    raise ConnectionResetError("the server closed the connection")
                reader.feed(memoryview(buf)[:n])
                continue
            type_, payload = msg
            if type_ == ord("Z"):
                expected_ready -= 1
                backend.status = chr(payload[0])
            elif type_ == ord("S"):
                ps = m.decode_backend(type_, payload)
                assert isinstance(ps, m.ParameterStatus)
                backend.parameters[ps.name] = ps.value
            elif type_ == ord("D") and collect is not None:
                row = m.decode_backend(type_, payload)
                assert isinstance(row, m.DataRow)
                collect.append(tuple(v.decode() if v is not None else None for v in row.values))
            elif type_ == ord("E"):
                err = m.decode_backend(type_, payload)
                assert isinstance(err, m.ErrorResponse)
                if is_fatal(payload):
                    raise ConnectionResetError(err.message)
                self.log.info("session_replay_error", sqlstate=err.sqlstate, error=err.message)

    async def _caught_up(self) -> bool:
        """Session consistency: does a replica have everything this session wrote? Asks the
        (parked) writer backend for its WAL position, then the reader backend for its replay
        position, waiting up to the endpoint's session_wait_ms. False reads on the writer."""
        writer = self.backends.parked.get(WRITER)
        if writer is None:
            return True  # no writer connection (failover): nothing of ours to wait for
        rows: list[tuple[str | None, ...]] = []
        try:
            await self._exchange(writer, m.Query("select pg_current_wal_insert_lsn() - '0/0'").encode(), 1, rows)
        except (*NETWORK_ERRORS, BackendError):
            return True
        target = int(float(rows[0][0] or 0)) if rows else 0
        reader = self.backends.take_parked(READER)
        if reader is not None and (reader.conn.peer_closed() or not self.env.placement_ok(READER, reader.instance)):
            await self.backends.close(reader, _TERMINATE)
            reader = None
        if reader is None:
            try:
                reader = await self._open(READER, 0.0)
            except (NoRoute, Refused):
                return False
            self.core.marks.pop(READER, None)  # the Attach that follows replays everything
        self.backends.parked[READER] = reader
        if not reader.in_recovery:
            return True  # the "reader" is the writer itself (fallback)
        deadline = trio.current_time() + self.ctx.endpoint.session_wait_ms / 1000
        while True:
            if reader.lsn_reached >= target:
                return True
            rows = []
            try:
                await self._exchange(reader, m.Query("select pg_last_wal_replay_lsn() - '0/0'").encode(), 1, rows)
            except (*NETWORK_ERRORS, BackendError):
                return False
            reader.lsn_reached = int(float(rows[0][0] or 0)) if rows and rows[0][0] else 0
            if reader.lsn_reached >= target:
                continue
            if trio.current_time() >= deadline:
                self.log.debug("session_read_on_writer", lsn=target, replayed=reader.lsn_reached)
                return False
            await trio.sleep(0.002)


def _frame(type_: int, payload: bytes) -> bytes:
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + payload


def _parse_message(name: bytes, body: bytes) -> bytes:
    return _frame(ord("P"), name + b"\0" + body)


async def _close_pooled(backend: BackendConnection) -> None:
    """Say goodbye to a pooled connection and close it (bounded: a hung server cannot hold us)."""
    with trio.CancelScope(shield=True):
        if not backend.conn.closed:
            with trio.move_on_after(0.5):
                try:
                    await backend.conn.send_all(_TERMINATE)
                except NETWORK_ERRORS:
                    pass
        await backend.conn.aclose()


async def _cancel_quietly(address: Address, process_id: int, secret_key: int) -> None:
    try:
        with trio.move_on_after(5):
            await send_cancel(address, process_id, secret_key)
    except (OSError, trio.BrokenResourceError):
        pass  # the statement ended meanwhile, or the server is gone: nothing to cancel
