"""A PostgreSQL session's server connections in session mode: route and open, replay, verdicts,
our own requests on an idle backend, the consistency wait (part of ``PgSession``)."""

from __future__ import annotations

import ssl
from typing import Any

import structlog
import trio

from ...config import Address, UserConfig
from ...protocol.pg import messages as m
from ...protocol.pg.auth import ScramKeys
from ...protocol.pg.framing import FrameReader
from ...sessioncore.actions import READER, WRITER, Attach, AttachError, BackendFacts
from ...sessioncore.pg import PgSessionCore, is_fatal
from ..pool import Pooled
from ..session import faults
from ..session.backends import BackendSet
from ..session.context import CancelTarget, SessionContext
from ..session.env import SessionEnv
from ..session.shell import NETWORK_ERRORS, SessionShell
from .backend import BackendConnection, BackendError, open_backend, send_cancel

log = structlog.get_logger("endpoint_proxy.session")

TERMINATE = m.Terminate().encode()


class NoRoute(Exception):
    pass


class Refused(Exception):
    """The server itself refused the login; its ErrorResponse is ``raw``."""

    def __init__(self, sqlstate: str, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.raw = raw


class PgBackends(SessionShell):
    """What a PostgreSQL session does with its server connections (session mode)."""

    # The session's attributes (PgSession.__init__ sets them).
    __slots__ = ("ctx", "session_id", "user", "backend_params", "backends", "env", "cancel_key", "draining",
                 "_login", "_core", "_pooled", "_waiter", "_waiting_for")

    ctx: SessionContext
    core: PgSessionCore
    _core: PgSessionCore | None
    session_id: int
    user: UserConfig | None
    backend_params: dict[str, str]
    backends: BackendSet[BackendConnection]
    env: SessionEnv
    cancel_key: tuple[int, int] | None
    draining: bool
    _login: ScramKeys | None
    _pooled: Pooled[BackendConnection] | None
    _waiter: Any  # transaction mode: this session's place in a full pool's line (PoolRegistry.wait_quick)
    _waiting_for: Attach | None  # the Attach that place is for

    @staticmethod
    def _facts(backend: BackendConnection) -> BackendFacts:
        return BackendFacts(backend.instance, backend.in_recovery, backend.status,
                            tuple(backend.parameters.items()))

    @staticmethod
    def _cancel_target(backend: BackendConnection) -> CancelTarget:
        target = backend.cancel_target
        if isinstance(target, CancelTarget) and target.process_id == backend.process_id:
            return target
        assert backend.address is not None
        target = backend.cancel_target = CancelTarget(backend.address, backend.process_id, backend.secret_key)
        return target

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
                faults.with_toxics(cluster, backend)
                return self.backends.count(backend)
            cluster.backend_failed(name, error)
            verdict = await cluster.verdict(name)
            if not verdict.up:
                exclude = exclude | {name}

    def take_fault(self, backend: BackendConnection) -> None:
        """A fault started on a backend's instance (BackendSet.fault): apply it now."""
        faults.take_fault(self.ctx.cluster, backend)
        self.wake()

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
                await self.backends.close(backend, TERMINATE)
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
            await self.backends.close(reader, TERMINATE)
            reader = None
        if reader is None:
            try:
                reader = await self._open(READER, 0.0)
            except (NoRoute, Refused):
                return False
            self.core.marks.pop(READER, None)  # the Attach that follows replays everything
        self.backends.keep(READER, reader)
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

    @property
    def log(self) -> Any:
        """This session's logger (bound when used: most sessions never log)."""
        return log.bind(conn=self.session_id, endpoint=self.ctx.endpoint.name)

    async def _forget(self, pooled: Pooled[BackendConnection]) -> None:
        """A borrowed connection that must not go back: it leaves its pool and closes."""
        self.ctx.cluster.pools.forget(pooled)
        await close_pooled(pooled.conn)


async def cancel_quietly(address: Address, process_id: int, secret_key: int) -> None:
    try:
        with trio.move_on_after(5):
            await send_cancel(address, process_id, secret_key)
    except (OSError, trio.BrokenResourceError):
        pass  # the statement ended meanwhile, or the server is gone: nothing to cancel


async def close_pooled(backend: BackendConnection) -> None:
    """Say goodbye to a pooled connection and close it (bounded: a hung server cannot hold us)."""
    with trio.CancelScope(shield=True):
        if not backend.conn.closed:
            with trio.move_on_after(0.5):
                try:
                    await backend.conn.send_all(TERMINATE)
                except NETWORK_ERRORS:
                    pass
        await backend.conn.aclose()

