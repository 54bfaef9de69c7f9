"""A PostgreSQL client session: login, the first backend, then the core's actions over the relay.

The decisions are ``sessioncore.pg.PgSessionCore``'s; this shell logs the client in, opens
and replays backends, asks the monitor for verdicts, and moves bytes (``SessionShell``).
"""

from __future__ import annotations

import socket

import trio

from ...config import Address, UserConfig
from ...protocol.errors import FrameError, ProtocolError
from ...protocol.pg import messages as m
from ...protocol.pg.auth import ScramKeys, ScramServerAuth
from ...relay.net import Conn, RawConn, send_quietly
from ...sessioncore.actions import (
    MAIN,
    WRITER,
    Attach,
    BackendFacts,
    CatchUp,
    Detach,
    Lost,
    PrepareStatements,
    Release,
    WaitGate,
)
from ...sessioncore.pg import PgSessionCore
from ..admission import Ticket
from ..pool import Pooled
from ..session.backends import BackendSet
from ..session.context import SessionContext
from ..session.env import SessionEnv
from ..session.info import SessionInfo, session_state
from ..session.shell import NETWORK_ERRORS
from .backend import BackendConnection
from .backends import TERMINATE, NoRoute, Refused, cancel_quietly
from .login import Fatal, login
from .pooled import PgPooling

# Startup parameters that belong to the connection, not to the backend session.
_NOT_FORWARDED = frozenset({"user"})


_NO_PARAMS: dict[str, str] = {}  # never changed: replaced at login


class PgSession(PgPooling):
    __slots__ = ("peer", "metrics", "scope", "is_console", "ticket")

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
        self.metrics = ctx.cluster.metrics.endpoint(ctx.endpoint.name)
        self.scope: trio.CancelScope | None = None  # the console's, while it serves (drain cancels it)
        self.draining = False
        self.is_console = False
        self.user: UserConfig | None = None
        self.backend_params: dict[str, str] = _NO_PARAMS  # session mode: what its server logins send
        self.backends: BackendSet[BackendConnection] = BackendSet(ctx.cluster)
        self.env = SessionEnv(ctx.cluster, ctx.endpoint, self.metrics)
        self.backends.owner = self
        self.cancel_key: tuple[int, int] | None = None
        self._login: ScramKeys | None = None  # SCRAM keys of the client's own login (passthrough)
        self._core: PgSessionCore | None = None
        self._pooled: Pooled[BackendConnection] | None = None  # transaction mode: the borrowed connection
        self._waiter = None
        self._waiting_for = None
        self.ticket: Ticket | None = None  # counts it against the connection limits (login admits)

    # --- what the proxy asks of a session -----------------------------------------------------


    def idle(self) -> bool:
        return self._core is not None and self._core.idle

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else as soon as the session becomes idle."""
        self.draining = True
        if self.is_console:
            if self.scope is not None:
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
            user=self.user.name if self.user is not None else None, database=self.env.database or None,
            instance=backend.instance if backend is not None else None,
            state=session_state(logged_in=core is not None, busy=core is not None and core.busy,
                                transaction=core.status if core is not None else "I"),
            client=self.peer)

    # --- the janitor's view (server/janitor.py Timed) ------------------------------------------

    def activity(self) -> tuple[int, bool, bool] | None:
        """(requests begun so far, a request in flight, inside a transaction); None during login
        and for the admin console (no timeouts apply)."""
        core = self._core
        if core is None or self.is_console:
            return None
        return core.requests, core.busy, core.status in ("T", "E")

    def cancel_running(self) -> None:
        """query_timeout_ms: cancel the statement in flight (the server answers it with 57014)."""
        core, backend = self._core, self.backends.active
        nursery = self.ctx.cluster.nursery
        if core is None or not core.busy or backend is None or backend.address is None or nursery is None:
            return
        nursery.start_soon(cancel_quietly, backend.address, backend.process_id, backend.secret_key)

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

    async def start(self) -> bool:
        ctx = self.ctx
        result = None
        with trio.move_on_after(ctx.startup_timeout_s):
            result = await login(ctx, self, self.log)
        if result is None:
            ctx.cluster.metrics.error("startup_timeout")
            self.log.info("startup_timeout", timeout_ms=int(ctx.startup_timeout_s * 1000))
            return False
        if result.console is not None and result.startup is not None and ctx.console is not None:
            # Outside the startup deadline: the console applies it to its login only.
            self.is_console = True
            reader, buf = result.console
            with trio.CancelScope() as self.scope:
                if self.draining:
                    return False
                await ctx.console(self.client, result.startup, reader, buf, ctx.startup_timeout_s)
            return False
        if result.startup is None:
            return False
        assert result.user is not None
        self.user = result.user
        # Only what later server logins need of the client's exchange: its SCRAM keys.
        self._login = result.auth.passthrough_keys() if isinstance(result.auth, ScramServerAuth) else None
        await self._attach_first(result.startup.user, result.startup.parameters)
        leftover = result.leftover
        del result  # the login's objects go now
        if leftover:
            await self._feed_leftover(leftover)
        return True

    async def failed(self, error: Exception) -> bool:
        cluster = self.ctx.cluster
        if isinstance(error, Fatal):
            cluster.metrics.error("auth_failed" if error.sqlstate.startswith("28") else "session_fatal")
            self.log.info("session_refused", sqlstate=error.sqlstate, error=str(error))
            await send_quietly(self.client, error.raw or m.error_response("FATAL", error.sqlstate, str(error)))
        elif isinstance(error, FrameError):
            # An impossible length: close at once, allocate nothing, say nothing more.
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=error.message)
        elif isinstance(error, ProtocolError):
            cluster.metrics.error("client_protocol")
            self.log.info("client_protocol_error", error=error.message, sqlstate=error.sqlstate)
            await send_quietly(self.client, m.error_response("FATAL", error.sqlstate, error.message))
        elif not isinstance(error, NETWORK_ERRORS):
            return False
        return True

    async def finish(self) -> None:
        await self._close()

    async def _feed_leftover(self, data: bytes) -> None:
        from ...sessioncore.actions import FORWARD

        if self.core.client_data(data) == FORWARD:
            conn = self.backend_conn()
            assert conn is not None
            await conn.send_all(data)

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if self.ticket is not None:
                self.ticket.release()
            if self._core is not None:
                self._core.end()
            if self.cancel_key is not None:
                self.ctx.cancels.withdraw(*self.cancel_key)
            self.leave_line()
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
        self.env.database = params["database"]
        readwrite = ctx.endpoint.kind == "readwrite"
        role = WRITER if readwrite else MAIN
        if ctx.endpoint.pool_mode == "transaction":
            # Pooled: connections are opened for the pool (user and database); the client's
            # other parameters are settings (pg_pool.startup_settings), kept once for all alike.
            await self._login_pooled(role, parameters)
            return
        self.backend_params = params
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
                await self.backends.close(self.backends.release_active(), TERMINATE)
        elif isinstance(action, Lost):
            await self._lost(action.instance)
        elif isinstance(action, CatchUp):
            self.core.caught_up(await self._caught_up())
        elif isinstance(action, WaitGate):
            await self.ctx.cluster.drills.gate.wait_open()
            self.core.gate_opened()
