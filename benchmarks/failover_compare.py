#!/usr/bin/env python3
"""Failover under load: endpoint_proxy vs PgBouncer vs HAProxy when the primary is killed.

For each target a fresh local cluster (primary pg0, replicas pg1 and pg2) is started, the
target is put in front of it, and asyncpg load runs for a bounded time: writer workers
inserting in autocommit through the writer address, reader workers selecting through the
reader address, and idle sessions holding a SET value and a prepared statement. After a
warm-up pg0 is killed (SIGKILL of the whole server), pg1 is promoted after
``--promote-delay`` seconds and pg2 follows it; the load keeps running ``--after`` seconds
more. PgBouncer and HAProxy are not reconfigured: they cannot follow a promotion by
themselves, which is what the comparison shows.

It prints, per target, how long the outage lasted, how many operations failed, whether the
idle sessions kept their state, and for the proxy whether it meets the bar (first write at
most 2 s after the promotion, no error on idle sessions, no failed read on the reader
endpoint). ``--write-results`` appends the result to ``benchmarks/RESULTS.md``.

Everything it starts is stopped on exit, Ctrl-C and errors included.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common  # benchmarks/_common.py (this script's directory is on sys.path)
import asyncpg
from _common import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    DEFAULT_RESULTS,
    LOOPBACK,
    READY_TIMEOUT,
    REPO,
    BenchError,
    ProxyEndpoint,
    Service,
    append_results,
    free_port,
    log,
    machine_info,
    machine_line,
    proxy_config,
    run_main,
    server_version,
    tail,
)

if TYPE_CHECKING:
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

ALL_TARGETS = ("proxy", "pgbouncer", "haproxy")
OLD_PRIMARY, NEW_PRIMARY, OTHER_REPLICA = "pg0", "pg1", "pg2"

TABLE = "failover_bench"
INSERT_SQL = f"insert into {TABLE} (worker, n) values ($1, $2)"
SELECT_SQL = f"select max(id) from {TABLE}"
IDLE_SETTING = "bench.tag"  # a custom setting each idle session SETs to its own value
IDLE_SQL = f"select current_setting('{IDLE_SETTING}', true)"

PROXY_HEALTH_CHECK_MS = 250
PROXY_FAILOVER_TIMEOUT_MS = 30_000
BACKOFF_S = 0.1  # pause after a failed operation or connection attempt
READER_ALIAS = f"{APP_DB}_ro"  # PgBouncer's database name for the replica

# The bar for the proxy.
BAR_FIRST_WRITE_S = 2.0

# Proxy log events worth counting after the kill.
SESSION_EVENTS = ("session_backend_lost", "session_reattached", "request_retried", "session_replay_error")


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """A moment of the timeline, on the monotonic clock (for durations) and the wall clock
    (to compare with the proxy's log timestamps)."""

    mono: float
    wall: float

    @staticmethod
    def now() -> Mark:
        return Mark(time.monotonic(), time.time())


@dataclass
class OpStats:
    """Operations of one kind of worker (writers or readers), all timed on the monotonic clock."""

    ok: int = 0
    failed: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    ok_ends: list[float] = field(default_factory=list)  # completion time of each successful op
    max_ok_latency: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # failed ops and connects by kind
    acked: list[tuple[int, int]] | None = None  # (worker, n) of each successful op, when tracked

    def succeeded(self, start: float, end: float, worker: int, n: int) -> None:
        self.ok += 1
        self.ok_ends.append(end)
        self.max_ok_latency = max(self.max_ok_latency, end - start)
        if self.acked is not None:
            self.acked.append((worker, n))

    def first_ok_after(self, t: float) -> float | None:
        return min((e for e in self.ok_ends if e > t), default=None)

    def max_stall(self, start: float, end: float) -> tuple[float, bool]:
        """The longest time without a successful op in [start, end]; True when it lasts
        until ``end`` (the stall had not ended when the run stopped)."""
        ends = sorted(e for e in self.ok_ends if start <= e <= end)
        if not ends:
            return end - start, True
        points = [start, *ends]
        gap = max((b - a for a, b in zip(points, points[1:], strict=False)), default=0.0)
        final = end - ends[-1]
        if final > gap:
            return final, True
        return gap, False


@dataclass
class IdleOutcome:
    ok: bool  # the statement ran
    kept: bool  # and returned the session's own SET value
    latency: float
    error: str = ""


@dataclass
class TargetResult:
    target: str
    version: str
    writes: OpStats
    reads: OpStats
    idle: list[IdleOutcome]
    load_start: Mark
    kill: Mark
    killed: Mark
    promote: Mark
    promoted: Mark
    end: Mark
    follow_error: str | None = None
    detection_s: float | None = None
    detection_event: str = ""
    proxy_new_writer_s: float | None = None  # promotion start -> proxy logs writer_changed to pg1
    proxy_events: Counter[str] = field(default_factory=Counter)
    duplicate_rows: int | None = None  # rows of the table on the new primary with the same (worker, n)
    acked_missing: int | None = None  # acknowledged inserts absent from the new primary

    @property
    def first_write_after_promotion(self) -> float | None:
        first = self.writes.first_ok_after(self.killed.mono)
        return None if first is None else first - self.promote.mono

    @property
    def first_write_after_kill(self) -> float | None:
        first = self.writes.first_ok_after(self.killed.mono)
        return None if first is None else first - self.kill.mono

    @property
    def idle_errors(self) -> int:
        return sum(1 for o in self.idle if not (o.ok and o.kept))

    @property
    def idle_kept(self) -> int:
        return sum(1 for o in self.idle if o.kept)

    def write_stall(self) -> tuple[float, bool]:
        return self.writes.max_stall(self.load_start.mono, self.end.mono)

    def bar(self) -> tuple[bool, list[str]]:
        """Whether the issue's bar is met, and what misses it."""
        misses: list[str] = []
        first = self.first_write_after_promotion
        if first is None:
            misses.append("no successful write after the promotion")
        elif first > BAR_FIRST_WRITE_S:
            misses.append(f"first write {first:.2f} s after the promotion (> {BAR_FIRST_WRITE_S:.0f} s)")
        if self.idle_errors:
            misses.append(f"{self.idle_errors} idle-session errors")
        if self.reads.failed:
            misses.append(f"{self.reads.failed} failed reads")
        return not misses, misses


# --------------------------------------------------------------------------
# Load (asyncpg on asyncio, in a child process)
# --------------------------------------------------------------------------
#
# The load runs in a forked child process so that the fault steps of the parent (kill,
# promote and follow scan /proc and run psql) never hold the load generator's GIL: a stalled
# client would send nothing while the primary dies and hide what happens to statements in
# flight. Both processes time with time.monotonic(), which is system-wide on Linux.
#
# Messages, as tuples: parent -> child ("status",), ("idle_check", timeout_s), ("stop",);
# child -> parent ("ready", load_start), ("status", writes_ok, reads_ok, errors),
# ("result", writes, reads, idle_outcomes), ("error", text).


@dataclass(frozen=True)
class Address:
    port: int
    database: str


@dataclass(frozen=True)
class LoadPlan:
    writer: Address
    reader: Address
    writers: int
    readers: int
    idle: int
    op_timeout: float
    max_seconds: float  # the child stops on its own after this long, whatever the parent does


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}({sqlstate})" if sqlstate else type(exc).__name__


async def connect(addr: Address, timeout: float) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=LOOPBACK,
        port=addr.port,
        user=APP_USER,
        password=APP_PASSWORD,
        database=addr.database,
        ssl=False,
        timeout=timeout,
    )


Op = Callable[[asyncpg.Connection, int, int], Awaitable[object]]


async def insert_op(conn: asyncpg.Connection, worker: int, n: int) -> object:
    return await conn.execute(INSERT_SQL, worker, n)


async def select_op(conn: asyncpg.Connection, worker: int, n: int) -> object:
    return await conn.fetchval(SELECT_SQL)


@dataclass
class Load:
    """What the workers share: the stop flag they check before each operation and their open
    connections (so that stopping can close them, whatever a worker is waiting for).

    Stopping does not rely on task cancellation alone: asyncpg turns a cancelled query into a
    CancelRequest and waits for the server's answer, which may never come during a failover.
    """

    op_timeout: float
    stopping: bool = False
    conns: dict[tuple[str, int], asyncpg.Connection] = field(default_factory=dict)

    async def stop(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        """Stop the workers: flag, let the current operations end (bounded), then close the
        connections and cancel what is left; never waits more than about op_timeout + 2 s."""
        self.stopping = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.op_timeout + 0.5)
        else:
            pending = set()
        for conn in self.conns.values():
            conn.terminate()
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.5)


async def worker_loop(kind: str, wid: int, addr: Address, op: Op, stats: OpStats, load: Load) -> None:
    """Run ``op`` in a loop on one persistent connection until ``load.stopping``; reconnect
    (after a short pause) when the connection is lost or an op times out."""
    conn: asyncpg.Connection | None = None
    connected_before = False
    n = 0
    key = (kind, wid)
    try:
        while not load.stopping:
            if conn is None:
                try:
                    conn = await connect(addr, load.op_timeout)
                except Exception as exc:  # noqa: BLE001 - any failure to connect is counted
                    if load.stopping:
                        break
                    stats.connect_failures += 1
                    stats.errors[f"connect: {describe_error(exc)}"] += 1
                    await asyncio.sleep(BACKOFF_S)
                    continue
                load.conns[key] = conn
                if connected_before:
                    stats.reconnects += 1
                connected_before = True
            n += 1
            start = time.monotonic()
            try:
                # asyncio.timeout, not wait_for: wait_for of Python 3.11 can swallow a cancellation.
                async with asyncio.timeout(load.op_timeout):
                    await op(conn, wid, n)
            except Exception as exc:  # noqa: BLE001 - every failed op is counted
                if load.stopping:
                    break  # closed by Load.stop: not a failure of the target
                stats.failed += 1
                stats.errors[describe_error(exc)] += 1
                if isinstance(exc, TimeoutError) or conn.is_closed():
                    conn.terminate()
                    load.conns.pop(key, None)
                    conn = None
                await asyncio.sleep(BACKOFF_S)
                continue
            stats.succeeded(start, time.monotonic(), wid, n)
    finally:
        load.conns.pop(key, None)
        if conn is not None:
            conn.terminate()


@dataclass
class IdleSession:
    conn: asyncpg.Connection
    stmt: Any  # asyncpg PreparedStatement
    expected: str


async def open_idle(i: int, addr: Address, timeout: float) -> IdleSession:
    conn = await connect(addr, timeout)
    expected = f"idle-{i}"
    await conn.execute(f"SET {IDLE_SETTING} = '{expected}'")
    stmt = await conn.prepare(IDLE_SQL)
    value = await stmt.fetchval()
    if value != expected:
        raise BenchError(f"idle session {i}: {IDLE_SETTING} is {value!r} right after SET {expected!r}")
    return IdleSession(conn, stmt, expected)


async def check_idle(session: IdleSession, timeout: float) -> IdleOutcome:
    """One statement on an idle session: the prepared statement reading its SET value."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            value = await session.stmt.fetchval()
    except Exception as exc:  # noqa: BLE001 - every failure is the result
        return IdleOutcome(False, False, time.monotonic() - start, describe_error(exc))
    kept = value == session.expected
    return IdleOutcome(True, kept, time.monotonic() - start, "" if kept else f"value {value!r}")


async def check_all_idle(idle: list[IdleSession], timeout: float) -> list[IdleOutcome]:
    return list(await asyncio.gather(*(check_idle(s, timeout) for s in idle)))


async def wait_ready(addr: Address, name: str) -> None:
    """Wait until a real login and query through ``addr`` succeed (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            conn = await connect(addr, 5.0)
            try:
                async with asyncio.timeout(5.0):
                    await conn.fetchval(SELECT_SQL)
            finally:
                conn.terminate()
            return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            if time.monotonic() > deadline:
                raise BenchError(f"{name} on port {addr.port} did not accept a login within "
                                 f"{READY_TIMEOUT:.0f} s: {describe_error(exc)}: {exc}") from exc  # fmt: skip
        await asyncio.sleep(0.3)


async def run_load(pipe: Connection, plan: LoadPlan) -> None:
    """The child's work: wait for the target, open the idle sessions, run the workers and
    answer the parent's messages until it says stop (or the pipe closes, or max_seconds)."""
    deadline = time.monotonic() + plan.max_seconds
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def on_readable() -> None:
        try:
            while pipe.poll():
                inbox.put_nowait(pipe.recv())
        except (EOFError, OSError):  # the parent is gone
            loop.remove_reader(pipe.fileno())
            inbox.put_nowait(("stop",))

    loop.add_reader(pipe.fileno(), on_readable)
    await wait_ready(plan.writer, "writer address")
    await wait_ready(plan.reader, "reader address")
    writes, reads = OpStats(acked=[]), OpStats()
    load = Load(plan.op_timeout)
    idle: list[IdleSession] = []
    tasks: list[asyncio.Task[None]] = []
    outcomes: list[IdleOutcome] = []
    try:
        for i in range(plan.idle):
            idle.append(await open_idle(i, plan.writer, plan.op_timeout))
        load_start = time.monotonic()
        tasks += [asyncio.create_task(worker_loop("writer", w, plan.writer, insert_op, writes, load))
                  for w in range(plan.writers)]  # fmt: skip
        tasks += [asyncio.create_task(worker_loop("reader", r, plan.reader, select_op, reads, load))
                  for r in range(plan.readers)]  # fmt: skip
        pipe.send(("ready", load_start))
        idle_task: asyncio.Task[list[IdleOutcome]] | None = None
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    msg = await inbox.get()
            except TimeoutError:
                break
            if msg[0] == "status":
                errors = {**writes.errors, **{f"read {k}": v for k, v in reads.errors.items()}}
                pipe.send(("status", writes.ok, reads.ok, errors))
            elif msg[0] == "idle_check":
                idle_task = asyncio.create_task(check_all_idle(idle, float(msg[1])))
            elif msg[0] == "stop":
                break
        if idle_task is not None:
            outcomes = await idle_task
    finally:
        await load.stop(tasks)
        for s in idle:
            s.conn.terminate()
    pipe.send(("result", writes, reads, outcomes))


def load_process(pipe: Connection, plan: LoadPlan) -> None:
    """Entry point of the forked child."""
    # Ctrl-C reaches the whole process group: the parent handles it and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        asyncio.run(run_load(pipe, plan))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        with contextlib.suppress(OSError):
            pipe.send(("error", f"{describe_error(exc)}: {exc}"))
        raise


class LoadProcess:
    """The parent's handle on the load child."""

    def __init__(self, plan: LoadPlan, services: Sequence[Service]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipe, child_end = ctx.Pipe()
        self.services = services
        self.proc = ctx.Process(target=load_process, args=(child_end, plan), name="failover-load", daemon=True)
        self.proc.start()
        child_end.close()

    def send(self, *msg: object) -> None:
        self.pipe.send(msg)

    def receive(self, kind: str, timeout: float) -> tuple[Any, ...]:
        """The next message (which must be ``kind``), checking meanwhile that the child and the
        target are alive."""
        deadline = time.monotonic() + timeout
        while True:
            for svc in self.services:
                svc.check_alive()
            if self.pipe.poll(0.2):
                try:
                    msg: tuple[Any, ...] = self.pipe.recv()
                except EOFError:
                    raise BenchError(f"the load process exited (status {self.proc.exitcode})") from None
                if msg[0] == "error":
                    logs = "".join(f"\nlog {svc.logfile}:\n{tail(svc.logfile)}" for svc in self.services)
                    raise BenchError(f"load process: {msg[1]}{logs}")
                if msg[0] != kind:
                    raise BenchError(f"load process: expected {kind!r}, got {msg[0]!r}")
                return msg
            if not self.proc.is_alive() and not self.pipe.poll():
                raise BenchError(f"the load process exited (status {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise BenchError(f"the load process did not answer {kind!r} within {timeout:.0f} s")

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.pipe.close()


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


@dataclass
class Deployed:
    """A started target: its services and the writer and reader addresses."""

    services: list[Service]
    writer: Address
    reader: Address
    version: str
    proxy_log: Path | None = None


def instance_list(cluster: PostgresCluster) -> list[tuple[str, str, int]]:
    return [(i.name, i.host, int(i.port)) for i in cluster.instances]


def deploy(target: str, args: argparse.Namespace, tmp: Path, cluster: PostgresCluster) -> Deployed:
    primary = cluster.instance(OLD_PRIMARY)
    replica = cluster.instance(NEW_PRIMARY)
    if target == "proxy":
        wport, rport = free_port(), free_port()
        text = proxy_config(
            instance_list(cluster),
            [ProxyEndpoint("writer", wport, "writer"), ProxyEndpoint("reader", rport, "reader")],
            workers=args.proxy_workers,
            log_format="json",
            log_level="info",
            cluster_settings={
                "health_check_interval_ms": PROXY_HEALTH_CHECK_MS,
                "failover_timeout_ms": PROXY_FAILOVER_TIMEOUT_MS,
            },
        )
        svc = _common.start_proxy(tmp, text, wport)
        return Deployed([svc], Address(wport, APP_DB), Address(rport, APP_DB), svc.version, proxy_log=svc.logfile)
    if target == "pgbouncer":
        clients = args.writers + args.readers + args.idle
        svc = _common.start_pgbouncer(
            tmp,
            {APP_DB: (primary.host, int(primary.port)), READER_ALIAS: (replica.host, int(replica.port))},
            pool_mode="session",
            pool_size=max(64, clients + 16),
        )
        return Deployed([svc], Address(svc.port, APP_DB), Address(svc.port, READER_ALIAS), svc.version)
    if target == "haproxy":
        svc = _common.start_haproxy(
            tmp, {"writer": (primary.host, int(primary.port)), "reader": (replica.host, int(replica.port))}
        )
        return Deployed(
            [svc], Address(svc.ports["writer"], APP_DB), Address(svc.ports["reader"], APP_DB), svc.version
        )
    raise BenchError(f"unknown target {target}")


def proxy_log_events(path: Path) -> list[tuple[float, str, str | None, str]]:
    """(wall time, event, instance, detail) of each JSON line of the proxy's log."""
    events: list[tuple[float, str, str | None, str]] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
            when = dt.datetime.fromisoformat(str(doc["timestamp"])).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(doc, dict) and "event" in doc:
            inst = doc.get("instance")
            events.append((when, str(doc["event"]), None if inst is None else str(inst), str(doc.get("detail", ""))))
    return events


def analyse_proxy_log(res: TargetResult, path: Path) -> None:
    """Detection time (kill -> the first instance_down of pg0 or writer_changed away from it),
    the time the proxy saw the new writer, and counts of session events after the kill."""
    for when, event, inst, detail in proxy_log_events(path):
        if when < res.kill.wall:
            continue
        lost_pg0 = (event == "instance_down" and inst == OLD_PRIMARY) or (
            event == "writer_changed" and detail == f"was {OLD_PRIMARY}"
        )
        if lost_pg0 and res.detection_s is None:
            res.detection_s = when - res.kill.wall
            res.detection_event = event
        if event == "writer_changed" and inst == NEW_PRIMARY and res.proxy_new_writer_s is None:
            res.proxy_new_writer_s = when - res.promote.wall
        if event in SESSION_EVENTS:
            res.proxy_events[event] += 1


def check_rows(res: TargetResult, cluster: PostgresCluster) -> None:
    """Compare the table on the new primary with the acknowledged inserts: duplicates would
    mean a write was run twice; missing acknowledged writes are the asynchronous replication's
    loss at failover (the local cluster runs synchronous_commit = off), not the middleman's."""
    try:
        out = cluster.sql(NEW_PRIMARY, f"select worker, n from {TABLE}", timeout=60)
    except (subprocess.CalledProcessError, TimeoutError) as exc:  # PgCommandError included
        log(f"warning: could not read {TABLE} on {NEW_PRIMARY}: {exc}")
        return
    rows = [tuple(int(v) for v in line.split("|")) for line in out.splitlines() if line]
    present = set(rows)
    res.duplicate_rows = len(rows) - len(present)
    acked = set(res.writes.acked or [])
    res.acked_missing = len(acked - present)


def measure_target(target: str, args: argparse.Namespace, tmp: Path, versions: dict[str, str]) -> TargetResult:
    from endpoint_proxy.localcluster.postgresql import PostgresCluster

    log(f"=== {target}: starting a fresh cluster (primary + 2 replicas)")
    with PostgresCluster(replicas=2) as cluster:
        cluster.sql(
            OLD_PRIMARY,
            f"create table {TABLE} (id bigserial primary key, worker int not null, n int not null, "
            "at timestamptz not null default now())",
            user=APP_USER,
        )
        cluster.wait_caught_up(timeout=20)
        versions.setdefault("PostgreSQL", server_version(cluster.instance(OLD_PRIMARY).port))
        ttmp = tmp / target
        ttmp.mkdir()
        deployed = deploy(target, args, ttmp, cluster)
        load: LoadProcess | None = None
        try:
            plan = LoadPlan(
                writer=deployed.writer,
                reader=deployed.reader,
                writers=args.writers,
                readers=args.readers,
                idle=args.idle,
                op_timeout=args.op_timeout,
                max_seconds=READY_TIMEOUT * 2 + args.warmup + args.promote_delay + args.after + 120,
            )
            load = LoadProcess(plan, deployed.services)
            _, load_start_mono = load.receive("ready", READY_TIMEOUT * 2 + args.op_timeout * (args.idle + 1))
            load_start = Mark(load_start_mono, time.time() - (time.monotonic() - load_start_mono))
            log(f"{target}: load running (writer port {deployed.writer.port}, reader port {deployed.reader.port})")
            time.sleep(max(0.0, load_start.mono + args.warmup - time.monotonic()))
            load.send("status")
            _, writes_ok, reads_ok, errors = load.receive("status", 10)
            if not writes_ok or (args.readers and not reads_ok):
                raise BenchError(f"{target}: {writes_ok} writes and {reads_ok} reads in the warm-up; errors {errors}")
            log(f"warm-up done: {writes_ok} writes, {reads_ok} reads; killing {OLD_PRIMARY}")

            kill = Mark.now()
            cluster.kill(OLD_PRIMARY)
            killed = Mark.now()
            log(f"{OLD_PRIMARY} killed ({killed.mono - kill.mono:.2f} s)")
            time.sleep(max(0.0, killed.mono + args.promote_delay - time.monotonic()))
            promote = Mark.now()
            cluster.promote(NEW_PRIMARY)
            promoted = Mark.now()
            log(f"{NEW_PRIMARY} promoted ({promoted.mono - promote.mono:.2f} s)")
            follow_error: str | None = None
            try:
                cluster.follow(OTHER_REPLICA, NEW_PRIMARY)
                log(f"{OTHER_REPLICA} follows {NEW_PRIMARY} ({time.monotonic() - promoted.mono:.2f} s)")
            except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:  # PgCommandError included
                follow_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log(f"{OTHER_REPLICA} could not follow {NEW_PRIMARY}: {follow_error}")

            # Each idle session runs one statement now, while the load goes on.
            load.send("idle_check", max(args.op_timeout, promote.mono + args.after - time.monotonic()))
            time.sleep(max(0.0, promote.mono + args.after - time.monotonic()))
            end = Mark.now()
            load.send("stop")
            _, writes, reads, idle = load.receive("result", args.op_timeout + args.after + 15)
            log(f"load stopped: {writes.ok} writes, {reads.ok} reads")
            for svc in deployed.services:
                svc.check_alive()
        finally:
            if load is not None:
                load.close()
            for svc in reversed(deployed.services):
                svc.stop()
        res = TargetResult(
            target=target,
            version=deployed.version,
            writes=writes,
            reads=reads,
            idle=idle,
            load_start=load_start,
            kill=kill,
            killed=killed,
            promote=promote,
            promoted=promoted,
            end=end,
            follow_error=follow_error,
        )
        check_rows(res, cluster)
    if deployed.proxy_log is not None:
        analyse_proxy_log(res, deployed.proxy_log)
    log(f"{target}: {summary_sentence(res, args)}")
    return res


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def seconds(v: float | None, none: str = "never") -> str:
    return none if v is None else f"{v:.2f}"


def top_errors(errors: Counter[str], n: int = 3) -> str:
    return ", ".join(f"{kind} ×{count}" for kind, count in errors.most_common(n))


def summary_sentence(res: TargetResult, args: argparse.Namespace) -> str:
    parts: list[str] = []
    if res.detection_s is not None:
        parts.append(f"logged {OLD_PRIMARY} lost {res.detection_s:.2f} s after the kill ({res.detection_event})")
    if res.proxy_new_writer_s is not None:
        parts.append(f"logged {NEW_PRIMARY} as writer {res.proxy_new_writer_s:.2f} s after the promotion began")
    first = res.first_write_after_promotion
    if first is not None:
        after_kill = res.first_write_after_kill or 0.0
        parts.append(f"the first write succeeded {first:.2f} s after the promotion began ({after_kill:.2f} s after "
                     "the kill)")  # fmt: skip
    else:
        why = "" if res.target == "proxy" else f" (it still points at {OLD_PRIMARY})"
        parts.append(f"writes never recovered in the {args.after:g} s after the promotion{why}")
    werr = top_errors(res.writes.errors)
    parts.append(
        f"{res.writes.failed} writes failed and {res.writes.connect_failures} writer connection attempts failed"
        + (f" ({werr})" if werr else "")
        + f", {res.writes.reconnects} writer reconnections, slowest successful write {res.writes.max_ok_latency:.2f} s"
    )
    rerr = top_errors(res.reads.errors)
    parts.append(f"{res.reads.failed} reads failed" + (f" ({rerr})" if rerr else ""))
    idle_err = Counter(o.error for o in res.idle if o.error)
    parts.append(
        f"{res.idle_kept}/{len(res.idle)} idle sessions kept their SET value"
        + (f" ({top_errors(idle_err)})" if idle_err else "")
        + (f", slowest {max(o.latency for o in res.idle):.2f} s" if res.idle else "")
    )
    if res.duplicate_rows is not None and res.acked_missing is not None:
        parts.append(f"on {NEW_PRIMARY} afterwards: {res.duplicate_rows} duplicated inserts, {res.acked_missing} "
                     "acknowledged inserts missing (lost by the asynchronous replication)")  # fmt: skip
    if res.proxy_events:
        parts.append("proxy log: " + ", ".join(f"{k} ×{v}" for k, v in sorted(res.proxy_events.items())))
    if res.follow_error:
        parts.append(f"{OTHER_REPLICA} did not follow {NEW_PRIMARY}: {res.follow_error}")
    return "; ".join(parts) + "."


TABLE_HEADER = (
    "target", "detect (s)", "promote→1st write (s)", "kill→1st write (s)", "max write stall (s)",
    "write errors", "writer conn fails", "failed reads", "idle errors", "SET kept", "writes", "reads", "bar",
)  # fmt: skip


def table_row(res: TargetResult) -> list[str]:
    stall, open_ended = res.write_stall()
    if res.target == "proxy":
        passed, _ = res.bar()
        bar = "PASS" if passed else "FAIL"
    else:
        bar = "n/a"
    return [
        res.target,
        seconds(res.detection_s, "n/a"),
        seconds(res.first_write_after_promotion),
        seconds(res.first_write_after_kill),
        ("≥ " if open_ended else "") + f"{stall:.2f}",
        str(res.writes.failed),
        str(res.writes.connect_failures),
        str(res.reads.failed),
        str(res.idle_errors),
        f"{res.idle_kept}/{len(res.idle)}",
        f"{res.writes.ok:,}",
        f"{res.reads.ok:,}",
        bar,
    ]


def render_table(results: Sequence[TargetResult]) -> str:
    rows = [table_row(r) for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(TABLE_HEADER)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths, strict=True))) + " |"  # fmt: skip

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(TABLE_HEADER), sep, *(fmt(r) for r in rows)])


def bar_line(res: TargetResult) -> str:
    passed, misses = res.bar()
    criteria = (f"first write ≤ {BAR_FIRST_WRITE_S:.0f} s after the promotion, 0 errors on idle sessions, "
                "0 failed reads on the reader endpoint")  # fmt: skip
    if passed:
        return f"proxy: PASS ({criteria})"
    return f"proxy: FAIL ({'; '.join(misses)}; the bar: {criteria})"


def parameters_line(args: argparse.Namespace) -> str:
    return (
        f"{args.writers} writers (autocommit insert loop), {args.readers} readers (select), {args.idle} idle "
        f"sessions (SET + prepared statement, one statement after the failover); warm-up {args.warmup:g} s, "
        f"kill -9 of {OLD_PRIMARY}, promote {NEW_PRIMARY} {args.promote_delay:g} s later and make "
        f"{OTHER_REPLICA} follow it, load until {args.after:g} s after the promotion began; "
        f"op timeout {args.op_timeout:g} s, reconnect pause {BACKOFF_S:g} s; "
        f"proxy workers {args.proxy_workers}, health_check_interval_ms={PROXY_HEALTH_CHECK_MS}, "
        f"failover_timeout_ms={PROXY_FAILOVER_TIMEOUT_MS}, writer + reader endpoints; "
        f"PgBouncer pool_mode=session, {APP_DB} -> {OLD_PRIMARY} and {READER_ALIAS} -> {NEW_PRIMARY}; "
        f"HAProxy mode tcp, no health checks, one frontend -> {OLD_PRIMARY} and one -> {NEW_PRIMARY}; "
        "PgBouncer and HAProxy are not reconfigured after the promotion; all on 127.0.0.1 TCP"
    )


DEFINITIONS = (
    "detect: kill → the proxy's first log event saying pg0 is gone (instance_down of pg0, or writer_changed "
    "away from it); promote→1st write: start of `pg_ctl promote` → first successful insert completed after "
    "the kill; max write stall: longest time without any successful insert (≥: still stalled at the end); "
    "write errors / failed reads: statements that failed; writer conn fails: failed (re)connection attempts; "
    "idle errors: idle sessions whose statement failed or returned another SET value."
)


def results_section(
    results: Sequence[TargetResult], args: argparse.Namespace, machine: dict[str, str], versions: dict[str, str]
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    lines = [
        f"## {now} — failover under load: kill -9 of the primary ({', '.join(r.target for r in results)})",
        "",
        f"- Machine: {machine_line(machine)}",
        f"- Versions: {vers}",
        f"- Parameters: {parameters_line(args)}",
        f"- Columns: {DEFINITIONS}",
        "",
        render_table(results),
        "",
    ]
    lines += [f"- {r.target}: {summary_sentence(r, args)}" for r in results]
    proxy = [r for r in results if r.target == "proxy"]
    if proxy:
        lines += [f"- Bar — {bar_line(proxy[0])}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Failover under load (kill -9 of the primary): endpoint_proxy vs PgBouncer vs HAProxy",
    )
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma-separated subset of: " + ",".join(ALL_TARGETS))  # fmt: skip
    p.add_argument("--writers", type=int, default=4, help="writer workers (4)")
    p.add_argument("--readers", type=int, default=4, help="reader workers (4)")
    p.add_argument("--idle", type=int, default=20, help="idle sessions (20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the kill (3)")
    p.add_argument("--promote-delay", type=float, default=1.0, help="seconds from the kill to the promotion (1)")
    p.add_argument("--after", type=float, default=8.0, help="seconds of load after the promotion began (8)")
    p.add_argument("--op-timeout", type=float, default=5.0,
                   help="seconds an operation or connection attempt may take before it counts as failed (5)")
    p.add_argument("--proxy-workers", type=int, default=1, help="endpoint_proxy workers (1)")
    p.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.targets = [t for t in ALL_TARGETS if t in targets]
    if min(args.writers, args.readers, args.idle) < 0 or args.writers < 1:
        p.error("--writers must be positive, --readers and --idle not negative")
    if args.warmup <= 0 or args.promote_delay < 0 or args.after <= 0 or args.op_timeout <= 0:
        p.error("--warmup, --after and --op-timeout must be positive, --promote-delay not negative")
    if args.proxy_workers < 1:
        p.error("--proxy-workers must be positive")
    return args


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    machine = machine_info()
    versions: dict[str, str] = {"asyncpg": asyncpg.__version__}
    tmp = Path(tempfile.mkdtemp(prefix="failover-compare-"))
    tmp.chmod(0o711)  # traversable, not listable: PgBouncer runs as postgres when we are root
    results: list[TargetResult] = []
    log(f"temp dir {tmp}; targets {','.join(args.targets)}")
    try:
        for target in args.targets:
            res = measure_target(target, args, tmp, versions)
            versions[target] = res.version
            results.append(res)
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"failover under load; nproc {machine['nproc']}, {machine['cpu']}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(parameters_line(args))
    print()
    print(render_table(results))
    print()
    for r in results:
        print(f"{r.target}: {summary_sentence(r, args)}")
    proxy = [r for r in results if r.target == "proxy"]
    if proxy:
        print()
        print(bar_line(proxy[0]))
    if args.write_results:
        append_results(args.results_file, results_section(results, args, machine, versions))
        log(f"appended results to {args.results_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
