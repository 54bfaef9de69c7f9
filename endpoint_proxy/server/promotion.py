"""Promoting a replica in a planned switchover: SQL for PostgreSQL and MariaDB, or a command.

A ``Promotion`` runs in four steps, which the switchover orchestrator (``server.drills``)
calls while it holds new writer work at the gate:

1. ``prepare(deadline)``: fence the old writer and wait until the candidate has replayed
   everything it wrote. ``CatchUpTimeout`` when the deadline passes first: the switchover
   is abandoned and ``rollback`` undoes the fence.
2. ``promote(deadline)``: make the candidate the writer.
3. ``rollback()``: undo ``prepare`` (only before ``promote``); best effort.
4. ``follow(deadline)``: after the gate reopened, point what is left at the new writer.
   Problems here do not fail the switchover; they are written to ``notes``.

PostgreSQL (method "sql"): the old writer gets ``ALTER SYSTEM SET
default_transaction_read_only = on`` and a reload; its WAL insert position is read; the other
replicas are re-pointed at the candidate *before* it is promoted (``primary_conninfo`` with
host and port changed, then a reload; they cascade from it and follow its promotion to the new
timeline, so none can have WAL the candidate lacks); the candidate replays up to the old
writer's position and the others' received positions, then ``pg_promote()``. The old writer
cannot become a standby without a restart: it stays up, read-only by default, and the proxy
fences it (lower timeline); its ``primary_conninfo`` is set to the new writer, so restarting
it with a ``standby.signal`` (after ``pg_rewind`` if it diverged) makes it a replica.

MariaDB (method "sql"): ``SET GLOBAL read_only = 1`` on the old writer, its
``@@gtid_binlog_pos``, ``MASTER_GTID_WAIT`` on the candidate, then ``STOP SLAVE; RESET SLAVE
ALL; SET GLOBAL read_only = 0`` there; the other replicas get ``CHANGE MASTER`` to it with
``MASTER_USE_GTID = slave_pos``; the old writer too when ``replication_user`` is configured
(else it stays read-only, out of replication, and leaves reader endpoints by the lag rule).

Method "command": the operator's command does everything; the proxy holds writes while it
runs and waits for its monitor to see the new writer. Its environment: EP_CLUSTER,
EP_PROTOCOL, EP_OLD_WRITER (+ _HOST, _PORT), EP_NEW_WRITER (+ _HOST, _PORT), EP_REPLICAS (the
other instances, comma-separated), EP_PROMOTION_USER/EP_PROMOTION_PASSWORD when configured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import structlog
import trio

from ..config import ClusterConfig, InstanceConfig
from ..drills.promotion_sql import build_conninfo, change_master_sql, mysql_literal, pg_literal, rewrite_conninfo
from ..protocol.errors import ProtocolError
from .mysql.backend import MyBackendError, MyProbeConnection
from .pg.backend import BackendError, ProbeConnection

log = structlog.get_logger("endpoint_proxy.promotion")

STATEMENT_TIMEOUT_S = 10.0  # one promotion statement (not the catch-up wait)
CONNECT_TIMEOUT_S = 5.0
_POLL_S = 0.005  # how often the candidate's replay position is read while it catches up
_ER_LOCK_WAIT_TIMEOUT = 1205

_IO_ERRORS = (OSError, BackendError, MyBackendError, ProtocolError, trio.TooSlowError, IndexError, ValueError)


class PromotionError(Exception):
    """A promotion step failed; the message names the instance and the step."""


class CatchUpTimeout(PromotionError):
    """The old writer could not be fenced, or the candidate did not catch up, in time."""


class Promotion(Protocol):
    notes: list[str]

    async def prepare(self, deadline: float) -> None: ...

    async def promote(self, deadline: float) -> None: ...

    async def rollback(self) -> None: ...

    async def follow(self, deadline: float) -> None: ...

    async def aclose(self) -> None: ...


def make_promotion(config: ClusterConfig, old: str, new: str) -> Promotion:
    """The promotion the cluster's ``[clusters.promotion]`` asks for, from ``old`` to ``new``."""
    method = config.promotion.method
    if method == "command":
        return CommandPromotion(config, old, new)
    if method == "sql":
        return MySqlPromotion(config, old, new) if config.protocol == "mysql" else PgSqlPromotion(config, old, new)
    raise PromotionError(f"promotion method {method!r} cannot promote")


class _SqlPromotion:
    """What both SQL promotions share: one admin connection per instance, opened on demand."""

    def __init__(self, config: ClusterConfig, old: str, new: str) -> None:
        self.config = config
        self.old = config.instance_named(old)
        self.new = config.instance_named(new)
        self.others = [i for i in config.instances if i.name not in (old, new)]
        self.notes: list[str] = []
        self._conns: dict[str, Any] = {}
        self.fenced = False
        self.promoted = False

    async def _open(self, inst: InstanceConfig) -> Any:
        raise NotImplementedError

    async def conn(self, inst: InstanceConfig, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
        conn = self._conns.get(inst.name)
        if conn is None:
            try:
                with trio.fail_after(timeout_s):
                    conn = await self._open(inst)
            except _IO_ERRORS as e:
                raise PromotionError(f"{inst.name}: cannot connect as the promotion user: {_text(e)}") from None
            self._conns[inst.name] = conn
        return conn

    async def run(self, inst: InstanceConfig, sql: str, timeout_s: float = STATEMENT_TIMEOUT_S) -> list[Any]:
        """Rows of one statement on an instance; PromotionError naming both on failure."""
        conn = await self.conn(inst)
        try:
            with trio.fail_after(max(0.1, timeout_s)):
                rows: list[Any] = await conn.query(sql)
                return rows
        except _IO_ERRORS as e:
            self._conns.pop(inst.name, None)
            with trio.CancelScope(shield=True):
                await _close_quietly(conn)
            raise PromotionError(f"{inst.name}: {sql.split(' (')[0][:80]}: {_text(e)}") from None

    async def value(self, inst: InstanceConfig, sql: str, timeout_s: float = STATEMENT_TIMEOUT_S) -> str | None:
        rows = await self.run(inst, sql, timeout_s)
        if not rows or not rows[0]:
            raise PromotionError(f"{inst.name}: {sql[:80]}: no row")
        value: str | None = rows[0][0]
        return value

    async def best_effort(self, inst: InstanceConfig, *statements: str) -> bool:
        """Run statements in order; a failure becomes a note (and a log line), not an error."""
        try:
            for sql in statements:
                await self.run(inst, sql)
        except PromotionError as e:
            self.notes.append(str(e))
            log.warning("promotion_step_failed", cluster=self.config.name, error=str(e))
            return False
        return True

    async def aclose(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        with trio.CancelScope(shield=True):
            for conn in conns:
                await _close_quietly(conn)


async def _close_quietly(conn: Any) -> None:
    with trio.move_on_after(1):
        try:
            await conn.aclose()
        except _IO_ERRORS:
            pass


def _text(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    return str(e) or type(e).__name__


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - trio.current_time())


class PgSqlPromotion(_SqlPromotion):
    """PostgreSQL over SQL (see the module docstring)."""

    def __init__(self, config: ClusterConfig, old: str, new: str) -> None:
        super().__init__(config, old, new)
        self._template: str | None = None  # the candidate's primary_conninfo (points at the old writer)
        self._repointed: list[tuple[InstanceConfig, str]] = []  # (replica, its original primary_conninfo)

    async def _open(self, inst: InstanceConfig) -> ProbeConnection:
        p = self.config.promotion
        return await ProbeConnection.open(inst.name, inst.address, user=p.user or "postgres", password=p.password,
                                          database="postgres", tls_mode=self.config.backend_tls)

    def _conninfo_for(self, replica: InstanceConfig, current: str | None) -> str:
        """primary_conninfo that points ``replica`` at the candidate."""
        p = self.config.promotion
        if p.replication_user is not None:
            return build_conninfo(self.new.host, self.new.port, p.replication_user, p.replication_password,
                                  replica.name)
        if current:
            return rewrite_conninfo(current, self.new.host, self.new.port)
        if self._template:
            return rewrite_conninfo(self._template, self.new.host, self.new.port, application_name=replica.name)
        raise PromotionError(f"{replica.name}: no primary_conninfo to start from; set "
                             "[clusters.promotion] replication_user")

    async def prepare(self, deadline: float) -> None:
        if await self.value(self.old, "select pg_is_in_recovery()") != "f":
            raise PromotionError(f"{self.old.name} is in recovery: it is not the primary")
        rows = await self.run(self.new, "select pg_is_in_recovery(), current_setting('primary_conninfo')")
        if rows[0][0] != "t":
            raise PromotionError(f"{self.new.name} is not in recovery: it is not a replica")
        self._template = rows[0][1]
        await self.run(self.old, "ALTER SYSTEM SET default_transaction_read_only = on")
        self.fenced = True
        await self.run(self.old, "SELECT pg_reload_conf()")
        lsn = await self.value(self.old, "select pg_current_wal_insert_lsn()")
        assert lsn is not None
        targets = [lsn]
        for inst in self.others:
            received = await self._cascade(inst)
            if received:
                targets.append(received)
        await self._catch_up(targets, deadline)

    async def _cascade(self, inst: InstanceConfig) -> str | None:
        """Point a replica at the candidate; returns what it had received from the old writer."""
        try:
            rows = await self.run(inst, "select pg_is_in_recovery(), current_setting('primary_conninfo')")
            if rows[0][0] != "t":
                self.notes.append(f"{inst.name}: not a replica, left alone")
                return None
            original = rows[0][1] or ""
            conninfo = self._conninfo_for(inst, original)
            receiver = "select coalesce((select pid::text from pg_stat_wal_receiver), '')"
            before = await self.value(inst, receiver)
            await self.run(inst, f"ALTER SYSTEM SET primary_conninfo = {pg_literal(conninfo)}")
            self._repointed.append((inst, original))
            await self.run(inst, "SELECT pg_reload_conf()")
            # The reload stops its WAL receiver (a new one starts with the new conninfo): once
            # the old one is gone, what it received from the old writer is final.
            if before:
                with trio.move_on_after(STATEMENT_TIMEOUT_S):
                    while await self.value(inst, receiver) == before:
                        await trio.sleep(_POLL_S)
            return await self.value(inst, "select pg_last_wal_receive_lsn()")
        except PromotionError as e:
            self.notes.append(f"{inst.name}: not re-pointed: {e}")
            log.warning("promotion_step_failed", cluster=self.config.name, error=str(e))
            return None

    async def _catch_up(self, targets: Sequence[str], deadline: float) -> None:
        condition = " and ".join(f"pg_last_wal_replay_lsn() >= {pg_literal(t)}::pg_lsn" for t in targets)
        while True:
            if await self.value(self.new, f"select {condition}") == "t":
                return
            if trio.current_time() >= deadline:
                raise CatchUpTimeout(f"{self.new.name} did not replay the old writer's WAL (up to {targets[0]}) "
                                     "in time")
            await trio.sleep(_POLL_S)

    async def promote(self, deadline: float) -> None:
        await self.run(self.new, "ALTER SYSTEM RESET default_transaction_read_only")
        await self.run(self.new, "SELECT pg_reload_conf()")
        wait_s = max(1, int(_remaining(deadline)))
        try:
            if await self.value(self.new, f"SELECT pg_promote(true, {wait_s})", wait_s + STATEMENT_TIMEOUT_S) != "t":
                raise PromotionError(f"{self.new.name}: pg_promote() did not finish within {wait_s} s")
        except PromotionError:
            # Promoted or not? Only a candidate still in recovery lets rollback undo the rest.
            try:
                self.promoted = await self.value(self.new, "select pg_is_in_recovery()") != "t"
            except PromotionError:
                self.promoted = True  # unknown: leave the fence in place
            raise
        self.promoted = True

    async def rollback(self) -> None:
        if self.promoted:
            self.notes.append(f"{self.new.name} may have been promoted: the old writer stays fenced")
            return
        for inst, original in self._repointed:
            await self.best_effort(inst, f"ALTER SYSTEM SET primary_conninfo = {pg_literal(original)}",
                                   "SELECT pg_reload_conf()")
        if self.fenced:
            await self.best_effort(self.old, "ALTER SYSTEM RESET default_transaction_read_only",
                                   "SELECT pg_reload_conf()")

    async def follow(self, deadline: float) -> None:
        try:
            conninfo = self._conninfo_for(self.old, None)
        except PromotionError as e:
            self.notes.append(str(e))
            return
        if await self.best_effort(self.old, f"ALTER SYSTEM SET primary_conninfo = {pg_literal(conninfo)}",
                                  "SELECT pg_reload_conf()"):
            self.notes.append(f"{self.old.name} stays up read-only (default_transaction_read_only) and fenced; "
                              f"restart it as a standby to make it a replica of {self.new.name}")


class MySqlPromotion(_SqlPromotion):
    """MariaDB over SQL with GTID replication (see the module docstring)."""

    def __init__(self, config: ClusterConfig, old: str, new: str) -> None:
        super().__init__(config, old, new)
        self._stopped = False  # the candidate's STOP SLAVE ran
        self._reset = False  # ... and its RESET SLAVE ALL

    async def _open(self, inst: InstanceConfig) -> MyProbeConnection:
        p = self.config.promotion
        return await MyProbeConnection.open(inst.name, inst.address, user=p.user or "root", password=p.password,
                                            tls_mode=self.config.backend_tls)

    async def prepare(self, deadline: float) -> None:
        if await self.value(self.old, "SELECT @@GLOBAL.read_only") not in ("0", "OFF"):
            raise PromotionError(f"{self.old.name} is read-only: it is not the primary")
        if not await self.run(self.new, "SHOW SLAVE STATUS"):
            raise PromotionError(f"{self.new.name} is not configured as a replica")
        await self._fence(_remaining(deadline))
        position = await self.value(self.old, "SELECT @@GLOBAL.gtid_binlog_pos") or ""
        if not position:
            return
        remaining = _remaining(deadline)
        result = await self.value(self.new, f"SELECT MASTER_GTID_WAIT({mysql_literal(position)}, {remaining:.3f})",
                                  remaining + STATEMENT_TIMEOUT_S)
        if result == "-1":
            raise CatchUpTimeout(f"{self.new.name} did not apply the old writer's transactions (up to {position}) "
                                 "in time")
        if result != "0":
            raise PromotionError(f"{self.new.name}: MASTER_GTID_WAIT answered {result!r}")

    async def _fence(self, remaining: float) -> None:
        """read_only = 1 waits for running transactions to commit (a global read lock): bounded
        by lock_wait_timeout and our own clock, a wait that runs out abandons the switchover."""
        await self.run(self.old, f"SET SESSION lock_wait_timeout = {max(1, int(remaining))}")
        conn = await self.conn(self.old)
        try:
            with trio.fail_after(remaining + 1):
                await conn.query("SET GLOBAL read_only = 1")
        except (trio.TooSlowError, MyBackendError) as e:
            timed_out = isinstance(e, trio.TooSlowError) or e.errno == _ER_LOCK_WAIT_TIMEOUT
            if isinstance(e, trio.TooSlowError) or e.errno >= 2000:  # our side: the connection is spent
                self._conns.pop(self.old.name, None)
                with trio.CancelScope(shield=True):
                    await _close_quietly(conn)
            error = CatchUpTimeout if timed_out else PromotionError
            raise error(f"{self.old.name}: SET GLOBAL read_only = 1: {_text(e)}") from None
        except _IO_ERRORS as e:
            self._conns.pop(self.old.name, None)
            raise PromotionError(f"{self.old.name}: SET GLOBAL read_only = 1: {_text(e)}") from None
        self.fenced = True

    async def promote(self, deadline: float) -> None:
        await self.run(self.new, "STOP SLAVE")
        self._stopped = True
        await self.run(self.new, "RESET SLAVE ALL")
        self._reset = True
        await self.run(self.new, "SET GLOBAL read_only = 0")
        self.promoted = True

    async def rollback(self) -> None:
        """Before the candidate became writable: it replicates from the old writer again, and
        the old writer takes writes again."""
        if self.promoted or not self.fenced:
            return
        p = self.config.promotion
        if self._reset:
            back = change_master_sql(self.old.host, self.old.port, p.replication_user, p.replication_password)
            await self.best_effort(self.new, back, "START SLAVE")
        elif self._stopped:
            await self.best_effort(self.new, "START SLAVE")
        await self.best_effort(self.old, "SET GLOBAL read_only = 0")

    async def follow(self, deadline: float) -> None:
        p = self.config.promotion
        change = change_master_sql(self.new.host, self.new.port, p.replication_user, p.replication_password)
        for inst in self.others:
            try:
                replica = bool(await self.run(inst, "SHOW SLAVE STATUS", CONNECT_TIMEOUT_S))
            except PromotionError as e:
                self.notes.append(f"{inst.name}: not re-pointed: {e}")
                continue
            if not replica:
                self.notes.append(f"{inst.name}: not a replica, left alone")
                continue
            await self.best_effort(inst, "STOP SLAVE", change, "START SLAVE")
        if p.replication_user is None:
            self.notes.append(f"{self.old.name} stays read-only and out of replication: set [clusters.promotion] "
                              "replication_user to have it follow the new writer")
            return
        await self.best_effort(self.old, "STOP SLAVE", "SET GLOBAL gtid_slave_pos = @@GLOBAL.gtid_binlog_pos",
                               change, "START SLAVE")


class CommandPromotion:
    """The operator's command promotes (see the module docstring)."""

    def __init__(self, config: ClusterConfig, old: str, new: str) -> None:
        self.config = config
        self.old = config.instance_named(old)
        self.new = config.instance_named(new)
        self.notes: list[str] = []

    def environment(self) -> dict[str, str]:
        c, p = self.config, self.config.promotion
        env = {
            "EP_CLUSTER": c.name,
            "EP_PROTOCOL": c.protocol,
            "EP_OLD_WRITER": self.old.name,
            "EP_OLD_WRITER_HOST": self.old.host,
            "EP_OLD_WRITER_PORT": str(self.old.port),
            "EP_NEW_WRITER": self.new.name,
            "EP_NEW_WRITER_HOST": self.new.host,
            "EP_NEW_WRITER_PORT": str(self.new.port),
            "EP_REPLICAS": ",".join(i.name for i in c.instances if i.name not in (self.old.name, self.new.name)),
        }
        if p.user is not None:
            env["EP_PROMOTION_USER"] = p.user
        if p.password is not None:
            env["EP_PROMOTION_PASSWORD"] = p.password
        return env

    async def prepare(self, deadline: float) -> None:
        return None

    async def promote(self, deadline: float) -> None:
        command = self.config.promotion.command
        assert command is not None
        timeout = _remaining(deadline)
        try:
            with trio.fail_after(max(0.1, timeout)):
                done = await trio.run_process(list(command), env={**os.environ, **self.environment()},
                                              capture_stdout=True, capture_stderr=True, check=False,
                                              stdin=b"")
        except trio.TooSlowError:
            raise PromotionError(f"the promotion command did not finish within {timeout:.0f} s") from None
        except OSError as e:
            raise PromotionError(f"the promotion command cannot run: {e}") from None
        if done.returncode != 0:
            tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
            raise PromotionError(f"the promotion command exited with status {done.returncode}"
                                 + (f": {' / '.join(tail)}" if tail else ""))

    async def rollback(self) -> None:
        return None

    async def follow(self, deadline: float) -> None:
        return None

    async def aclose(self) -> None:
        return None
