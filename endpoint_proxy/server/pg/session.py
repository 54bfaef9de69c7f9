"""A PostgreSQL client session: login, the first backend, then the core's actions over the relay.

The decisions are ``sessioncore.pg.PgSessionCore``'s; this shell logs the client in, opens
and replays backends, asks the monitor for verdicts, and moves bytes (``SessionShell``).
"""

from __future__ import annotations

import socket
import ssl

import structlog
import trio

from ...config import Address, UserConfig
from ...protocol.errors import FrameError, ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import ServerAuth
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
)
from ...sessioncore.pg import PgSessionCore, is_fatal
from ..session.backends import BackendSet
from ..session.context import CancelTarget, SessionContext
from ..session.env import SessionEnv
from ..session.info import SessionInfo, session_state
from ..session.shell import NETWORK_ERRORS, SessionShell
from .backend import BackendConnection, BackendError, open_backend
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
    core: PgSessionCore

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
                self.peer = str(Address(host, port))
            except OSError:
                pass
        self.session_id = session_id
        self.log = log.bind(conn=session_id, endpoint=ctx.endpoint.name)
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self.scope = trio.CancelScope()  # the proxy runs the session inside it
        self.draining = False
        self.is_console = False
        self.user: UserConfig | None = None
        self.backend_params: dict[str, str] = {}
        self.backends: BackendSet[BackendConnection] = BackendSet(ctx.cluster)
        self.env = SessionEnv(ctx.cluster, ctx.endpoint, self.metrics)
        self.cancel_key: tuple[int, int] | None = None
        self._login: ServerAuth | None = None  # the client's finished authentication exchange
        self._core: PgSessionCore | None = None

    # --- what the proxy asks of a session -----------------------------------------------------

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
            self.user, self._login = result.user, result.auth
            await self._attach_first(result.startup.user, result.startup.parameters)
            if result.leftover:
                await self._feed_leftover(result.leftover)
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
            self.env, self._facts(backend), readwrite=readwrite,
            session_consistency=ctx.endpoint.consistency == "session", max_message_bytes=ctx.max_message_bytes)
        if self.draining:
            self.core.drain()
        hello = (backend.startup_messages + m.BackendKeyData(backend.process_id, secret).encode()
                 + m.ReadyForQuery(backend.status).encode())
        await self.client.send_all(hello)
        self.log.debug("session_attached", instance=backend.instance, pid=backend.process_id)

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
                with trio.fail_after(ctx.connect_timeout_s):
                    backend = await open_backend(name, address, self.backend_params, user=user.name,
                                                 credential=cluster.pg_backend_credential(user.name, self._login),
                                                 security=cluster.backend_security, dial=ctx.dial)
            except BackendError as e:
                if e.raw_error is not None:
                    raise Refused(e.sqlstate, str(e), e.raw_error) from None
                error = str(e)
            except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as e:
                error = str(e) or "connect timed out"
            else:
                backend.address = address
                backend.in_recovery = bool(cluster.topology.instances[name].in_recovery)
                return self.backends.count(backend)
            cluster.backend_failed(name, error)
            verdict = await cluster.verdict(name)
            if not verdict.up:
                exclude = exclude | {name}

    async def handle(self, action: object) -> None:
        if isinstance(action, Attach):
            await self._attach(action)
        elif isinstance(action, Detach):
            if action.park:
                self.backends.park()
            else:
                await self.backends.close(self.backends.release_active(), _TERMINATE)
        elif isinstance(action, Lost):
            await self._lost(action.instance)
        elif isinstance(action, CatchUp):
            self.core.caught_up(await self._caught_up())

    async def _lost(self, instance: str) -> None:
        backend = self.backends.release_active()
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
