"""A PostgreSQL session's borrowed connections in transaction mode: login on a pooled connection,
borrow and give back, statements prepared before use (part of ``PgSession``)."""

from __future__ import annotations

import functools
import secrets
import ssl
from typing import Any

import trio

from ...protocol.pg import messages as m
from ...protocol.pg.framing import FrameReader
from ...relay.net import RawConn
from ...sessioncore.actions import READER, WRITER, Attach, AttachError, BackendFacts, PrepareStatements, Release
from ...sessioncore.pg import PgSessionCore, dialect_of, is_fatal
from ...sessioncore.pg_pool import PooledMark, StartupError, shared, startup_settings
from ..pool import Pooled, PoolTimeout
from ..session import faults
from ..session.context import CancelTarget
from ..session.shell import NETWORK_ERRORS
from .backend import BackendConnection, BackendError, open_backend
from .backends import NoRoute, PgBackends, Refused, close_pooled
from .login import Fatal


class PgPooling(PgBackends):
    """Transaction mode (``pool_mode = "transaction"``)."""

    __slots__ = ()

    def cancel_target(self) -> CancelTarget | None:
        """Where the client's cancel key cancels now: the connection it holds for the request
        under way (none between requests, nor while the proxy sets a connection up)."""
        pooled = self._pooled
        if pooled is None or self._core is None or not self._core.attached:
            return None
        return self._cancel_target(pooled.conn)

    @staticmethod
    def _pooled_facts(backend: BackendConnection) -> BackendFacts:
        """Facts of a borrowed connection (its ParameterStatus values go to the core as they are)."""
        facts = backend.facts
        if (not isinstance(facts, BackendFacts) or facts.in_recovery != backend.in_recovery
                or facts.status != backend.status):
            facts = backend.facts = BackendFacts(backend.instance, backend.in_recovery, backend.status)
        return facts

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
        core.client_params = shared(dict(backend.parameters))  # one copy for the sessions that see the same
        core.state.dialect = dialect_of(core.client_params)
        core._attaching = role
        core.attached_backend(self._pooled_facts(backend), mark=pooled.mark,  # type: ignore[arg-type]
                              conn_params=backend.parameters)
        # A process id of our own: the client's requests run on whichever connection is free.
        pid = secrets.randbelow((1 << 31) - 2) + 1
        secret = ctx.cancels.issue(pid, self)  # (cancel_target: where a cancel goes, when it comes)
        self.cancel_key = (pid, secret)
        if self.draining:
            core.drain()
        core.release_now()
        hello = (b"".join(m.ParameterStatus(k, v).encode() for k, v in core.client_params.items())
                 + m.BackendKeyData(pid, secret).encode() + m.ReadyForQuery("I").encode())
        await self.client.send_all(hello)

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
                                         security=cluster.backend_security, dial=ctx.dial)
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
                    name, self.user.name, self.env.database, functools.partial(self._connect, name), close_pooled)
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
        reusable = True
        if action.expected_ready:
            try:
                await self._exchange(pooled.conn, action.cleanup, action.expected_ready)
            except (*NETWORK_ERRORS, BackendError):
                reusable = False
        await self._let_go(reusable)

    async def _caught_up(self) -> bool:
        """Session consistency in transaction mode: the writer's WAL position now (at least what
        this session committed), from a pooled writer connection; then a pooled replica
        connection's replay position, waiting up to session_wait_ms. False reads on the writer."""
        if self._core is None or self._core.smap is None:
            return await super()._caught_up()
        try:
            writer = await self._borrow(WRITER, 0.0)
        except (NoRoute, Refused, PoolTimeout):
            return True  # no writer now (failover): nothing of ours to wait for
        lsn = await self._pooled_lsn(writer, "select pg_current_wal_insert_lsn() - '0/0'")
        if lsn is None:
            return False
        try:
            reader = await self._borrow(READER, 0.0)
        except (NoRoute, Refused, PoolTimeout):
            return False
        if not reader.conn.in_recovery:
            self.ctx.cluster.pools.give_back(reader)
            return True  # the "reader" is the writer itself (fallback)
        deadline = trio.current_time() + self.ctx.endpoint.session_wait_ms / 1000
        while True:
            replayed = await self._pooled_lsn(reader, "select pg_last_wal_replay_lsn() - '0/0'", keep=True)
            if replayed is None:
                return False
            if replayed >= lsn:
                # This replica has it: the read runs here (the Attach that follows takes it over).
                self._pooled = reader
                self.backends.activate(READER, reader.conn)
                return True
            if trio.current_time() >= deadline:
                self.ctx.cluster.pools.give_back(reader)
                return False
            await trio.sleep(0.002)

    async def _pooled_lsn(self, pooled: Pooled[BackendConnection], sql: str, *, keep: bool = False) -> int | None:
        """A WAL position asked of a borrowed connection (given back unless ``keep``); None when
        it failed (the connection is then closed)."""
        rows: list[tuple[str | None, ...]] = []
        try:
            await self._exchange(pooled.conn, m.Query(sql).encode(), 1, rows)
        except (*NETWORK_ERRORS, BackendError):
            await self._forget(pooled)
            return None
        if not keep:
            self.ctx.cluster.pools.give_back(pooled)
        return int(float(rows[0][0])) if rows and rows[0][0] else 0

    # --- quick steps, from inside a hub callback (SessionShell.quick) ---------------------------

    def quick(self, action: object) -> bool:
        if isinstance(action, Release):
            return self._release_now(action)
        if isinstance(action, Attach) and action.reason == "borrow":
            return self._borrow_now(action)
        return False

    def _release_now(self, action: Release) -> bool:
        """Give the connection back without waiting: nothing to send it first."""
        pooled, hub, client = self._pooled, self.hub, self.client
        if action.expected_ready or pooled is None or hub is None or not isinstance(client, RawConn):
            return False
        if not hub.is_parked(client.fd):
            return False  # parked on the server alone: letting it go here would leave nothing to wake the task by
        conn = pooled.conn.conn
        if isinstance(conn, RawConn):
            hub.unpark_fd(conn.fd, conn.sock)  # another session may borrow it in this very round
        self._pooled = None
        self.backends.release_active()
        self.ctx.cluster.pools.give_back(pooled)
        return True

    def _borrow_now(self, action: Attach) -> bool:
        """Borrow an idle connection of the routed instance's pool without waiting, when one is
        there and the session's state is what it has; otherwise the task borrows (``_attach_pooled``:
        it takes over a connection taken here whose state needs setting up)."""
        hub, client = self.hub, self.client
        if hub is None or not isinstance(client, RawConn) or self._pooled is not None or self.user is None:
            return False
        cluster = self.ctx.cluster
        rule = self.env.rule(action.role)
        name = cluster.route(rule, action.exclude).instance
        if name is None or cluster.failure_pending(name) or faults.refused(cluster, rule, name):
            return False
        got = cluster.pools.borrow_quick(name, self.user.name, self.env.database, self)
        if got is None:
            return False  # a pool with room: the task opens a connection
        if type(got) is tuple:
            # A full pool: wait in its line without waking the task (``granted`` runs when a
            # connection comes back).
            self._waiter = got
            self._waiting_for = action
            return True
        return self._take(got, action)  # type: ignore[arg-type]

    def _take(self, pooled: Pooled[BackendConnection], action: Attach) -> bool:
        """Make a borrowed connection the session's; True when it is ready (attached, parked in
        the hub), False when the task must set it up first."""
        hub, client, core = self.hub, self.client, self.core
        assert hub is not None and isinstance(client, RawConn)
        cluster = self.ctx.cluster
        backend = pooled.conn
        conn = backend.conn
        self._pooled = pooled
        self.backends.activate(action.role, backend)
        if not isinstance(conn, RawConn) or (not hub.is_kept(conn.fd, conn.sock) and conn.peer_closed()):
            return False  # the task finds it closed and borrows another
        # (Kept in the hub: the connection said nothing and did not close as of the hub's last
        # batch, which would have shown it, so no peek system call. Like PgBouncer, which checks
        # a server connection only after server_check_delay idle, a close later than that batch
        # is met by the request itself.)
        backend.in_recovery = bool(cluster.topology.instances[backend.instance].in_recovery)
        if pooled.mark is None:
            pooled.mark = PooledMark()
        if core.pooled_plan(pooled.mark).expected_ready:  # type: ignore[arg-type]
            return False  # the task sets it up (and parks its descriptor)
        if not hub.park_more(conn.fd, self._on_server, client.fd, conn.sock):
            return False
        core.attached_backend(self._pooled_facts(backend), mark=pooled.mark,  # type: ignore[arg-type]
                              conn_params=backend.parameters)
        return True

    # --- waiting in a full pool's line without a task (pool.QuickWaiter) ------------------------

    def granted(self, pooled: Pooled[Any]) -> bool:
        """A connection comes back to the pool and is this session's: attach it and send the
        held request at once (the caller is another session, or the pool's upkeep)."""
        action, self._waiting_for, self._waiter = self._waiting_for, None, None
        hub, client = self.hub, self.client
        if action is None or self.closed or hub is None or not isinstance(client, RawConn):
            return False
        if not hub.is_parked(client.fd):
            self._stash = action  # the task is up (or asleep, woken now): it borrows itself
            self.wake()
            return False
        if not self._take(pooled, action):
            self._stash = action  # the task sets it up
            self.wake()
            return True
        if self._attend() is not None:
            self.wake()
        return True

    def may_open(self) -> None:
        """A place freed up in the pool: the task borrows, and opens a connection."""
        self._back_to_task()

    def expired(self) -> None:
        """The borrow timeout passed in line: the request gets 53300, the session goes on."""
        action, self._waiting_for, self._waiter = self._waiting_for, None, None
        if action is None or self.closed:
            return
        self.core.attach_failed(AttachError("busy", "53300", "no server connection of pool within "
                                                             f"{self.ctx.cluster.config.borrow_timeout_ms} ms"))
        self.wake()

    def _back_to_task(self) -> None:
        action, self._waiting_for, self._waiter = self._waiting_for, None, None
        if action is not None and not self.closed:
            self._stash = action
            self.wake()

    def leave_line(self) -> None:
        """The session ends while in a pool's line: it leaves it."""
        if self._waiter is not None:
            self.ctx.cluster.pools.cancel_quick(self._waiter)
            self._waiter = self._waiting_for = None

    async def _attach_pooled(self, action: Attach) -> None:
        core, role = self.core, action.role
        cluster = self.ctx.cluster
        timeout = cluster.config.failover_timeout_ms / 1000
        if self._pooled is not None and self.backends.active is self._pooled.conn:
            if self._pooled.conn.conn.peer_closed():
                await self._let_go(False)  # taken while idle, and found closed: another one
            else:
                await self._set_up(self._pooled, role)  # taken in a hub callback; its state needs setting up
                return
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
        self._pooled = pooled
        self.backends.activate(role, pooled.conn)
        await self._set_up(pooled, role)

    async def _set_up(self, pooled: Pooled[BackendConnection], role: str) -> None:
        """Bring a borrowed connection (the active backend now) to the session's state, then attach."""
        core = self.core
        backend = pooled.conn
        plan = core.pooled_plan(pooled.mark)  # type: ignore[arg-type]
        if plan.expected_ready:
            try:
                await self._exchange(backend, plan.batch, plan.expected_ready)
            except (*NETWORK_ERRORS, BackendError) as e:
                await self._let_go(False)
                core.attach_failed(AttachError("failed", "08006", f"could not set up a server connection: {e}"))
                return
        core.attached_backend(self._pooled_facts(backend), mark=pooled.mark,  # type: ignore[arg-type]
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


def _frame(type_: int, payload: bytes) -> bytes:
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + payload


def _parse_message(name: bytes, body: bytes) -> bytes:
    return _frame(ord("P"), name + b"\0" + body)

