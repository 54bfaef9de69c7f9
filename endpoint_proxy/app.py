"""The proxy process: listeners per endpoint, cluster monitors, reload, cancel routing between workers."""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import select
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from .admin.collectors import FaultsCollector, HubCollector, LatencyCollector, PoolCollector, TopologyCollector
from .admin.console import AdminUsers, serve_pg_console
from .admin.http import AdminAccess, AdminServer
from .config import Address, ClusterConfig, Config, ConfigError, EndpointConfig, load_config
from .protocol.pg.framing import FrameReader
from .protocol.pg.startup import CancelRequest, StartupMessage, encode_cancel_request, parse_startup_packet
from .relay.hub import Hub
from .relay.net import Conn, RawConn
from .server.acceptwatch import AcceptWatch, accept_backlog
from .server.admission import Admission
from .server.cluster import ClusterRuntime, StagedCredentials
from .server.janitor import Janitor
from .server.metrics import ProxyMetrics
from .server.pg.backend import send_cancel
from .server.pg.session import PgSession
from .server.session.context import CancelRegistry, SessionContext
from .server.session.info import SessionInfo
from .server.state_file import StateFile

if TYPE_CHECKING:
    from .server.mysql.session import MySession

log = structlog.get_logger("endpoint_proxy.server")


def make_server_tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.cert_file is None or config.tls.key_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ctx


# How long a listener's accept queue may hold connections nobody takes before /healthz fails.
STUCK_ACCEPT_S = 5.0
# How long worker 0 waits for a sibling's answer during a reload.
CONTROL_TIMEOUT_S = 30.0


def open_listener(address: Address, *, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Listener:
    """One endpoint's listening socket, its session context and its accept loop."""

    def __init__(self, cluster: ClusterRuntime, ctx: SessionContext, sock: socket.socket) -> None:
        self.cluster = cluster
        self.ctx = ctx
        self.sock = sock
        self.scope = trio.CancelScope()
        self.watch = AcceptWatch(STUCK_ACCEPT_S)  # the accept loop counts; /healthz looks

    @property
    def endpoint(self) -> EndpointConfig:
        return self.ctx.endpoint

    def stop_accepting(self) -> None:
        self.scope.cancel()
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (ValueError, OSError, RuntimeError):
            pass

    def close(self) -> None:
        self.stop_accepting()
        self.sock.close()

    def take_waiting(self) -> list[socket.socket]:
        """The connections already in the accept queue (before a close would reset them)."""
        taken: list[socket.socket] = []
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError:
                return taken
            taken.append(conn)


@dataclass
class _PreparedReload:
    """Everything of a reload that can fail, done; nothing applied yet (``Proxy._prepare``)."""

    new: Config
    opened: dict[tuple[str, str], socket.socket] = field(default_factory=dict)
    # Listener sockets of ours that got SO_REUSEPORT so that their port's new address could
    # be bound beside them (unset again if the reload is abandoned).
    shared: list[socket.socket] = field(default_factory=list)
    tls_context: ssl.SSLContext | None = None
    admin_users: AdminUsers | None = None
    added: dict[str, ClusterRuntime] = field(default_factory=dict)
    staged: dict[str, StagedCredentials] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ReloadError(Exception):
    """A reload was refused (by this worker or a sibling); nothing changed anywhere."""


class ProxyConsole:
    """The proxy as the admin console sees it (``admin_console.ConsoleState``)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.admin_users = AdminUsers(proxy.config.admin.users)

    @property
    def clusters(self) -> dict[str, ClusterRuntime]:
        return self.proxy.clusters

    @property
    def bound(self) -> dict[str, Address]:
        return self.proxy.bound

    @property
    def metrics(self) -> ProxyMetrics:
        return self.proxy.metrics

    def sessions(self) -> list[SessionInfo]:
        infos = []
        for session in list(self.proxy.sessions):
            info = session.session_info()
            if info is None:
                continue
            if info.pinned is None and session.env.pin is not None:
                info = dataclasses.replace(info, pinned=session.env.pin)  # what the core reported to the env
            infos.append(info)
        return infos

    async def reload(self) -> object:
        if self.proxy.reload_hook is None:
            raise NotImplementedError("the proxy was started without a configuration file to re-read")
        return await self.proxy.reload_hook()


class Proxy:
    """One worker process's proxy. ``workers`` > 1 means siblings share the listening ports."""

    def __init__(self, config: Config, *, worker_index: int = 0, workers: int = 1,
                 runtime_dir: str | None = None, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.worker_index = worker_index
        self.workers = workers
        self.runtime_dir = runtime_dir
        self.tls_context = make_server_tls_context(config)
        self.metrics = ProxyMetrics()
        # Fencing's memory, shared by the clusters (and, through the file, by worker processes).
        self.state = StateFile(config.server.state_file)
        self.state.load()
        self.clusters = {c.name: ClusterRuntime(c, self.metrics.cluster(c.name), state=self.state)
                         for c in config.clusters}
        self.metrics.registry.register(TopologyCollector(lambda: self.clusters.values()))
        self.metrics.registry.register(LatencyCollector(lambda: self.clusters.values()))
        self.metrics.registry.register(FaultsCollector(lambda: self.clusters.values()))
        self.metrics.registry.register(PoolCollector(lambda: self.clusters.values()))
        # Called by POST /reload on the admin server; None answers 404 there.
        self.reload_hook: Callable[[], Awaitable[object]] | None = self.reload_from_file if config_path else None
        # Cancel keys are 32 random bits, but for this proxy's peer id with [[peers]] (8 bits); a
        # cancel a worker does not know is asked of the other workers.
        self.cancels = CancelRegistry(worker_index, worker_bits=0, peer_id=config.server.peer_id)
        self.cancel_limiter = CancelLimiter()
        # Client connection limits ([server] and endpoint max_client_connections, users'
        # max_connections), counted per process; [server] changes need a restart.
        self.admission = Admission(config.server.max_client_connections)
        # Session timeouts (query, idle in transaction, client idle), from each session's cluster.
        self.janitor = Janitor(lambda: self.sessions, lambda s: s.ctx.cluster.config,
                               lambda: [c.config for c in self.clusters.values()])
        self.bound: dict[str, Address] = {}  # endpoint name -> actual listening address
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._session_nursery: trio.Nursery | None = None
        self._listeners: dict[tuple[str, str], _Listener] = {}
        self.sessions: set[PgSession | MySession] = set()
        self._sessions_changed = trio.Event()
        self._reload_lock = trio.Lock()
        self.draining = False
        self.console = ProxyConsole(self)
        self.hub: Hub | None = None  # made in run(): an epoll belongs to one process
        self.metrics.registry.register(HubCollector(lambda: self.hub))

    async def serve_console(self, client: Conn, startup: StartupMessage, reader: FrameReader, buf: bytearray,
                            auth_timeout_s: float) -> None:
        await serve_pg_console(client, startup, reader, buf, self.console, auth_timeout_s=auth_timeout_s)

    def _open_listener(self, cluster: ClusterRuntime, ep: EndpointConfig) -> _Listener:
        sock = open_listener(ep.listen, reuse_port=self.workers > 1)
        return _Listener(cluster, self._context(cluster, ep), sock)

    def _register(self, listener: _Listener) -> None:
        name = (listener.cluster.config.name, listener.endpoint.name)
        self._listeners[name] = listener
        host, port = listener.sock.getsockname()[:2]
        self.bound[f"{name[0]}/{name[1]}"] = Address(host, port)
        self.bound.setdefault(name[1], Address(host, port))
        assert self._nursery is not None
        self._nursery.start_soon(self._accept_loop, listener)
        log.info("endpoint_listening", cluster=name[0], endpoint=name[1], kind=listener.endpoint.kind,
                 address=str(self.bound[f"{name[0]}/{name[1]}"]), worker=self.worker_index)

    async def run(self, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        pending: list[_Listener] = []
        admin_sock: socket.socket | None = None
        if hasattr(select, "epoll"):
            self.hub = Hub()
        try:
            if self.config.admin.listen is not None and self.worker_index == 0:
                admin_sock = open_listener(self.config.admin.listen, reuse_port=False)
                self.bound["admin"] = Address(*admin_sock.getsockname()[:2])
            await trio.to_thread.run_sync(self.console.admin_users.prepare)
            for cluster in self.clusters.values():
                await trio.to_thread.run_sync(cluster.prepare_secrets)
                for ep in cluster.config.endpoints:
                    pending.append(self._open_listener(cluster, ep))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.hub is not None:
                    await nursery.start(self.hub.run)
                self._session_nursery = await nursery.start(self._hold_sessions)
                nursery.start_soon(self.janitor.run)
                if admin_sock is not None:
                    admin = AdminServer(self, reload=self.reload_hook, access=self.admin_access,
                                        tls_context=self.admin_tls_context, liveness=self.stuck_endpoints)
                    await nursery.start(admin.serve, admin_sock)
                    log.info("admin_listening", address=str(self.bound["admin"]),
                             tls=self.config.admin.tls, credentials=self.config.admin.requires_credentials)
                for cluster in self.clusters.values():
                    await nursery.start(cluster.run)
                if self.workers > 1 and self.runtime_dir:
                    await nursery.start(self._serve_cancel_forwarding)
                    await nursery.start(self._serve_control)
                for listener in pending:
                    self._register(listener)
                pending = []
                task_status.started(self)
        finally:
            for listener in [*pending, *self._listeners.values()]:
                listener.sock.close()
            if admin_sock is not None:
                admin_sock.close()

    def admin_access(self) -> AdminAccess:
        admin = self.config.admin
        return AdminAccess(token=admin.token, users={u.name: u for u in admin.users},
                           metrics_public=admin.metrics_public)

    def admin_tls_context(self) -> ssl.SSLContext | None:
        return self.tls_context if self.config.admin.tls else None

    def stuck_endpoints(self) -> list[str]:
        """Endpoints whose accept queue holds connections that no accept loop has taken for
        STUCK_ACCEPT_S (what /healthz fails on); each observation feeds the listener's watch."""
        now = trio.current_time()
        stuck = []
        for (cname, ename), listener in list(self._listeners.items()):
            backlog = accept_backlog(listener.sock)
            if listener.watch.observe(backlog, now):
                address = self.bound.get(f"{cname}/{ename}", listener.endpoint.listen)
                stuck.append(f"endpoint {cname}/{ename} ({address}): {backlog} connection(s) wait in the"
                             f" accept queue and none was accepted for {listener.watch.stuck_after_s:g} s")
        if stuck:
            log.error("endpoint_not_accepting", problems=stuck, worker=self.worker_index)
        return stuck

    async def _hold_sessions(self, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
        """Sessions live here, not under their listener: closing a listener (reload, shutdown)
        leaves its sessions running."""
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()

    def _context(self, cluster: ClusterRuntime, ep: EndpointConfig) -> SessionContext:
        srv = self.config.server
        return SessionContext(
            cluster=cluster, endpoint=ep, tls_context=self.tls_context, cancels=self.cancels,
            startup_timeout_s=srv.startup_timeout_ms / 1000,
            max_startup_bytes=srv.max_startup_bytes,
            max_message_bytes=srv.max_message_bytes,
            connect_timeout_s=srv.connect_timeout_ms / 1000,
            cancel_handler=self.handle_cancel,
            console=self.serve_console,
            hub=self.hub,
            session_ended=self._session_ended,
        )

    async def _accept_loop(self, listener: _Listener) -> None:
        sock = listener.sock
        with listener.scope:
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as e:
                    # EMFILE and friends: back off instead of spinning.
                    log.warning("accept_failed", endpoint=listener.endpoint.name, error=str(e))
                    await trio.sleep(0.1)
                    continue
                listener.watch.accepted += 1
                self._start_session(listener, conn)

    def _start_session(self, listener: _Listener, conn: socket.socket) -> None:
        cluster = listener.cluster
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (tests), or already reset: the session finds out
        assert self._session_nursery is not None
        ticket = self.admission.ticket(cluster.config.name)
        session: PgSession | MySession
        try:
            if cluster.config.protocol == "mysql":
                # Imported with the first MySQL client: a PostgreSQL-only proxy never loads them.
                from .server.mysql.login import refuse as refuse_mysql
                from .server.mysql.session import MySession

                # MySQL answers a connection over the limit in place of its greeting: before the
                # session would contact a server for one. PostgreSQL's login admits the ticket
                # after the StartupMessage (cancel requests and the console are not counted).
                refusal = ticket.admit(listener.endpoint)
                if refusal is not None:
                    cluster.metrics.error("connection_limit")
                    self._session_nursery.start_soon(refuse_mysql, RawConn(conn), refusal)
                    return
                session = MySession(listener.ctx, conn, next(self._ids))
            else:
                session = PgSession(listener.ctx, conn, next(self._ids))
            session.ticket = ticket
            # The session's own run is the task (no frame of ours under it, no cancel scope of its
            # own: memory of every idle session); it ends with _session_ended.
            self._session_nursery.start_soon(session.run, name="session")  # one name string for all
        except RuntimeError:  # the proxy is stopping: its session nursery takes no more
            ticket.release()
            conn.close()
            return
        session.metrics.client_connected()
        self.sessions.add(session)

    def _session_ended(self, session: PgSession | MySession, error: Exception | None) -> None:
        """A session's task ends (SessionContext.session_ended); ``error``: a bug in it, which
        must never take the listener (and every other session) down."""
        if error is not None:
            log.error("session_crashed", endpoint=session.ctx.endpoint.name, exc_info=error)
            session.ctx.cluster.metrics.error("session_crashed")
        session.env.closed()  # a pin it still held stops counting
        if session.ticket is not None:
            session.ticket.release()  # the session's own _close did already, unless it crashed first
        self.sessions.discard(session)
        self._sessions_changed.set()
        self._sessions_changed = trio.Event()
        session.metrics.client_disconnected()

    # --- live reload --------------------------------------------------------------------------

    async def reload_from_file(self) -> list[str]:
        """SIGHUP, POST /reload and the console's RELOAD: read the config file again and apply
        it, in every worker process (see reload)."""
        assert self.config_path is not None
        if self._coordinated_elsewhere():
            return await self._ask_worker_zero({"op": "reload_file"})
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("config_reload_failed", error=str(e))
            raise
        return await self.reload(new)

    async def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without dropping sessions it does not affect, all or
        nothing: in this process and, with worker processes, in every one of them.

        Endpoints added get a listener, removed ones lose theirs (their sessions run on),
        moved ones get the new address bound before the old one closes, changed ones take
        the new rule (sessions re-check their placement at their next statement). Instances,
        users and cluster settings change in place (ClusterRuntime.apply_config); new
        passwords and verifiers apply to the next logins, to clients and to servers. The
        [tls] certificate and key are read again. Everything that can fail — reading the
        certificates, binding, preparing secrets, in every worker — happens before anything
        changes; any failure leaves every worker as it was. Settings of [server] and [admin]
        listen need a restart; a change there is logged.
        """
        if self._coordinated_elsewhere():
            return await self._ask_worker_zero({"op": "reload", "config": new})
        async with self._reload_lock:
            try:
                changes = await self._reload_everywhere(new)
            except Exception as e:
                log.error("config_reload_failed", error=str(e))
                raise
            log.info("config_reloaded", changes=changes)
            return changes

    def _coordinated_elsewhere(self) -> bool:
        return self.workers > 1 and self.runtime_dir is not None and self.worker_index != 0

    async def _reload_everywhere(self, new: Config) -> list[str]:
        """Prepare in this worker and every sibling; commit everywhere only if all succeeded."""
        prepared = await self._prepare(new)
        siblings: list[_ControlClient] = []
        try:
            if self.workers > 1 and self.runtime_dir is not None:
                for index in range(1, self.workers):
                    client = _ControlClient(self._control_socket_path(index), index)
                    siblings.append(client)
                    with trio.fail_after(CONTROL_TIMEOUT_S):
                        await client.request({"op": "prepare", "config": new})
        except BaseException as e:
            self._abort(prepared)
            with trio.CancelScope(shield=True):
                for client in siblings:
                    await client.finish({"op": "abort"})
            if isinstance(e, trio.TooSlowError):
                raise ReloadError(f"worker {siblings[-1].index} did not answer the reload in time") from None
            raise
        decision = "abort"
        try:
            changes = await self._commit(prepared)
            decision = "commit"
        finally:
            with trio.CancelScope(shield=True):
                for client in siblings:  # never leave a sibling waiting, holding its reload lock
                    await client.finish({"op": decision})
        return changes

    async def _prepare(self, new: Config) -> _PreparedReload:
        """Do everything of a reload that can fail; on failure undo it and raise."""
        prepared = _PreparedReload(new)
        try:
            await self._prepare_steps(prepared)
        except BaseException:
            self._abort(prepared)
            raise
        return prepared

    async def _prepare_steps(self, prepared: _PreparedReload) -> None:
        new, old = prepared.new, self.config
        if old.server != new.server:
            prepared.notes.append("[server] changed: takes effect at restart")
        if old.admin.listen != new.admin.listen:
            prepared.notes.append("[admin] listen changed: takes effect at restart")
        try:
            prepared.tls_context = await trio.to_thread.run_sync(make_server_tls_context, new)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ReloadError(f"[tls]: cannot use the certificate or key: {e}") from None
        if old.admin.users != new.admin.users:
            prepared.admin_users = self.console.admin_users.updated(new.admin.users)
            await trio.to_thread.run_sync(prepared.admin_users.prepare)
        self._open_new_listeners(prepared)
        for cc in new.clusters:
            runtime = self.clusters.get(cc.name)
            try:
                if runtime is None:
                    runtime = ClusterRuntime(cc, self.metrics.cluster(cc.name), state=self.state)
                    prepared.added[cc.name] = runtime
                    await trio.to_thread.run_sync(runtime.prepare_secrets)
                else:
                    prepared.staged[cc.name] = await trio.to_thread.run_sync(runtime.stage_credentials, cc)
            except (OSError, ValueError) as e:
                raise ReloadError(f"cluster {cc.name}: {e}") from None

    def _open_new_listeners(self, prepared: _PreparedReload) -> None:
        """Bind every new or moved endpoint's address while the old listeners still listen."""
        new_keys = {(c.name, ep.name): ep for c in prepared.new.clusters for ep in c.endpoints}
        # Listeners this reload takes away (moved or removed): their ports may be shared for
        # the moment of the swap; ones that stay may not.
        leaving = [lst for key, lst in self._listeners.items()
                   if key not in new_keys or new_keys[key].listen != lst.endpoint.listen]
        for key, ep in new_keys.items():
            current = self._listeners.get(key)
            if current is not None and current.endpoint.listen == ep.listen:
                continue
            share = ep.listen.port != 0 and any(lst.endpoint.listen.port == ep.listen.port for lst in leaving)
            if share:
                for lst in leaving:
                    if lst.endpoint.listen.port == ep.listen.port and lst.sock not in prepared.shared \
                            and not lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                        lst.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        prepared.shared.append(lst.sock)
            try:
                prepared.opened[key] = open_listener(ep.listen, reuse_port=self.workers > 1 or share)
            except OSError as e:
                raise ReloadError(f"endpoint {key[1]}: cannot listen on {ep.listen}: {e.strerror or e}") from None

    def _abort(self, prepared: _PreparedReload) -> None:
        """Undo a prepared reload: close what it opened, give the old sockets back their flags."""
        for sock in prepared.opened.values():
            sock.close()
        prepared.opened.clear()
        for sock in prepared.shared:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            except OSError:
                pass
        prepared.shared.clear()

    async def _commit(self, prepared: _PreparedReload) -> list[str]:
        """Apply a prepared reload (nothing here fails on a configuration)."""
        new = prepared.new
        changes = list(prepared.notes)
        assert self._nursery is not None
        new_clusters = {c.name: c for c in new.clusters}
        for name in list(self.clusters):
            if name not in new_clusters:
                for key in [k for k in self._listeners if k[0] == name]:
                    self._listeners.pop(key).close()
                del self.clusters[name]  # its sessions drain; its monitors stop with them
                changes.append(f"cluster {name} removed")
        self.tls_context = prepared.tls_context
        if new.tls != self.config.tls or new.tls.cert_file is not None:
            changes.append("[tls] certificate and key read again" if new.tls.cert_file else "[tls] removed")
        for name, rt in prepared.added.items():
            self.clusters[name] = rt
            await self._nursery.start(rt.run)
            changes.append(f"cluster {name} added")
        for name, cc in new_clusters.items():
            rt = self.clusters[name]
            if name not in prepared.added:
                changes += self._update_cluster(rt, cc, prepared.staged[name])
            changes += self._update_endpoints(rt, cc, prepared)
        for listener in self._listeners.values():
            listener.ctx.tls_context = self.tls_context
        if prepared.admin_users is not None:
            self.console.admin_users = prepared.admin_users
            changes.append("admin users changed")
        if (new.admin.token, new.admin.metrics_public, new.admin.tls) != (
                self.config.admin.token, self.config.admin.metrics_public, self.config.admin.tls):
            changes.append("admin access changed")
        self.config = new
        return changes

    def _update_cluster(self, rt: ClusterRuntime, cc: ClusterConfig, staged: StagedCredentials) -> list[str]:
        changes = []
        if rt.config.protocol != cc.protocol:
            changes.append(f"cluster {cc.name}: protocol change takes effect at restart")
        changes += [f"cluster {cc.name}: {c}" for c in rt.apply_config(cc)]
        rt.install_credentials(staged)
        return changes

    def _update_endpoints(self, rt: ClusterRuntime, cc: ClusterConfig, prepared: _PreparedReload) -> list[str]:
        changes = []
        name = cc.name
        new_eps = {ep.name: ep for ep in cc.endpoints}
        for key in [k for k in self._listeners if k[0] == name and k[1] not in new_eps]:
            self._listeners.pop(key).close()
            changes.append(f"endpoint {key[1]} removed")
        for ep in cc.endpoints:
            key = (name, ep.name)
            new_sock = prepared.opened.pop(key, None)
            if new_sock is not None:
                old_listener = self._listeners.pop(key, None)
                listener = _Listener(rt, self._context(rt, ep), new_sock)
                self._register(listener)
                if old_listener is not None:
                    self._retire(old_listener, listener)
                changes.append(f"endpoint {ep.name} {'moved' if old_listener else 'added'}")
            elif self._listeners[key].endpoint != ep:
                self._listeners[key].ctx.endpoint = ep
                changes.append(f"endpoint {ep.name} changed")
        return changes

    def _retire(self, old: _Listener, successor: _Listener) -> None:
        """Close a moved endpoint's old listener; connections already in its accept queue are
        served (by the endpoint's new rule), not reset."""
        old.stop_accepting()
        for conn in old.take_waiting():
            self._start_session(successor, conn)
        old.sock.close()

    # --- worker processes: one reload for all ---------------------------------------------------

    def _control_socket_path(self, worker: int) -> str:
        assert self.runtime_dir is not None
        return os.path.join(self.runtime_dir, f"control-{worker}.sock")

    async def _ask_worker_zero(self, message: dict[str, Any]) -> list[str]:
        """A worker other than 0 got a reload: worker 0 runs it for all."""
        client = _ControlClient(self._control_socket_path(0), 0)
        try:
            answer = await client.request(message)
        finally:
            await client.aclose()
        changes: list[str] = answer.get("changes", [])
        return changes

    async def _serve_control(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload requests between workers (a unix socket in the private runtime directory)."""
        path = self._control_socket_path(self.worker_index)
        Path(path).unlink(missing_ok=True)
        lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await lsock.bind(path)
        lsock.listen(16)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await lsock.accept()
                    nursery.start_soon(self._control_session, _Channel(conn))
        finally:
            lsock.close()

    async def _control_session(self, channel: _Channel) -> None:
        try:
            message = await channel.receive()
            op = message.get("op")
            if op == "prepare" and self.worker_index != 0:
                await self._prepared_by_worker_zero(channel, message["config"])
            elif op in ("reload", "reload_file") and self.worker_index == 0:
                try:
                    if op == "reload":
                        changes = await self.reload(message["config"])
                    else:
                        changes = await self.reload_from_file()
                except Exception as e:
                    await channel.send({"ok": False, "error": str(e) or type(e).__name__})
                else:
                    await channel.send({"ok": True, "changes": changes})
            else:
                await channel.send({"ok": False, "error": f"worker {self.worker_index} cannot {op!r}"})
        except (OSError, EOFError, pickle.UnpicklingError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.warning("control_failed", worker=self.worker_index, error=str(e) or type(e).__name__)
        finally:
            channel.close()

    async def _prepared_by_worker_zero(self, channel: _Channel, new: Config) -> None:
        """Prepare a reload, say so, then commit or abort as worker 0 decides (abort if it is gone)."""
        async with self._reload_lock:
            try:
                prepared = await self._prepare(new)
            except Exception as e:
                log.error("config_reload_failed", error=str(e), worker=self.worker_index)
                await channel.send({"ok": False, "error": f"worker {self.worker_index}: {e}"})
                return
            decision: dict[str, Any] = {}
            try:
                await channel.send({"ok": True})
                with trio.move_on_after(2 * CONTROL_TIMEOUT_S):  # worker 0 gone quiet: abort
                    decision = await channel.receive()
            finally:
                if decision.get("op") == "commit":
                    changes = await self._commit(prepared)
                    log.info("config_reloaded", changes=changes, worker=self.worker_index)
                    await channel.send({"ok": True, "changes": changes})
                else:
                    self._abort(prepared)

    # --- graceful shutdown --------------------------------------------------------------------

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; let running statements and open transactions finish (up to
        ``timeout_s``), closing each session as it becomes idle; then close what is left."""
        self.draining = True
        for listener in list(self._listeners.values()):
            listener.close()
        log.info("shutdown_started", sessions=len(self.sessions), timeout_ms=int(timeout_s * 1000))
        for session in list(self.sessions):
            session.drain()
        with trio.move_on_after(timeout_s):
            while self.sessions:
                changed = self._sessions_changed
                await changed.wait()
        if self.sessions:
            log.info("shutdown_forced", sessions=len(self.sessions))
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # --- cancels ------------------------------------------------------------------------------

    async def handle_cancel(self, request: CancelRequest, source: str | None = None) -> bool:
        """A CancelRequest arrived from ``source`` (an IP address): deliver it to the backend it
        names, wherever its session is; return once the server has taken it (or after a bounded
        wait). False when no session of this proxy has that key (the caller counts it). Past
        CancelLimiter's limit of unknown keys, a source's cancels are dropped for a while: a
        32-bit key cannot be guessed at that rate."""
        now = trio.current_time()
        peer_source = source is not None and any(p.address.host == source for p in self.config.peers)
        if source is not None and not peer_source and self.cancel_limiter.blocked(source, now):
            return False
        found = await self._deliver_cancel(request)
        if not found and source is not None and not peer_source:
            self.cancel_limiter.unknown(source, now)
        return found

    async def _deliver_cancel(self, request: CancelRequest, *, forwarded: bool = False) -> bool:
        peer = self.cancels.peer_of(request.secret_key)
        if peer is not None and peer != self.cancels.peer_id and not forwarded:
            await self._forward_to_peer(peer, request)
            return True  # that proxy decides
        found = False
        try:
            with trio.move_on_after(5):
                target = self.cancels.lookup(request.process_id, request.secret_key)
                if target is not None:
                    found = True
                    await send_cancel(target.address, target.process_id, target.secret_key)
                elif self.cancels.known(request.process_id, request.secret_key):
                    found = True  # the session has no server connection now: nothing runs to cancel
                elif not forwarded and self.workers > 1 and self.runtime_dir:
                    found = await self._ask_workers(request)
        except OSError as e:
            log.info("cancel_failed", error=str(e))
        return found

    async def _ask_workers(self, request: CancelRequest) -> bool:
        """Hand a cancel this worker does not know to the others; True if one of them had it."""
        answers: list[bool] = []

        async def ask(worker: int) -> None:
            try:
                answers.append(await self._forward_cancel(worker, request))
            except OSError:
                pass  # that worker is gone

        async with trio.open_nursery() as nursery:
            for worker in range(self.workers):
                if worker != self.worker_index:
                    nursery.start_soon(ask, worker)
        return any(answers)

    async def _forward_to_peer(self, peer: int, request: CancelRequest) -> None:
        """A cancel for a session of another proxy ([[peers]]): send it there as a client would
        (a CancelRequest on its endpoint) and wait until that proxy closes the connection, which
        it does once the server took the cancel. An unknown peer id is ignored, as an unknown
        key is."""
        address = next((p.address for p in self.config.peers if p.id == peer), None)
        if address is None:
            log.info("cancel_unknown_peer", peer=peer)
            return
        try:
            with trio.move_on_after(5):
                stream = await trio.open_tcp_stream(address.host, address.port)
                async with stream:
                    await stream.send_all(encode_cancel_request(request.process_id, request.secret_key))
                    await stream.receive_some(1)
        except (OSError, trio.BrokenResourceError) as e:
            log.info("cancel_failed", peer=peer, address=str(address), error=str(e) or type(e).__name__)

    def _cancel_socket_path(self, worker: int) -> str:
        assert self.runtime_dir is not None
        return os.path.join(self.runtime_dir, f"cancel-{worker}.sock")

    async def _forward_cancel(self, worker: int, request: CancelRequest) -> bool:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(self._cancel_socket_path(worker))
            await sock.send(encode_cancel_request(request.process_id, request.secret_key))
            # The worker answers once the server has taken the cancel: 1 if the key was its.
            return await sock.recv(1) == b"1"

    async def _serve_cancel_forwarding(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self._cancel_socket_path(self.worker_index)
        Path(path).unlink(missing_ok=True)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(64)
        lsock.setblocking(False)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(lsock)
                        continue
                    nursery.start_soon(self._read_forwarded_cancel, RawConn(conn))
        finally:
            lsock.close()

    async def _read_forwarded_cancel(self, conn: RawConn) -> None:
        buf = bytearray(16)
        got = 0
        try:
            with trio.move_on_after(2):
                while got < 16:
                    n = await conn.recv_into(memoryview(buf)[got:])
                    if n == 0:
                        return
                    got += n
                packet = parse_startup_packet(bytes(buf[4:16]))
                if isinstance(packet, CancelRequest):
                    found = await self._deliver_cancel(packet, forwarded=True)
                    await conn.send_all(b"1" if found else b"0")
        except Exception as e:  # a forwarded cancel is best effort
            log.info("cancel_failed", error=str(e))
        finally:
            await conn.aclose()


class CancelLimiter:
    """Unknown cancel keys per source address: past ``limit`` within ``window_s``, that source's
    cancels are dropped until the window has passed (the clock is trio's, given by the caller)."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, max_sources: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_sources = max_sources
        self._seen: dict[str, list[float]] = {}

    def _recent(self, source: str, now: float) -> list[float]:
        times = [t for t in self._seen.get(source, ()) if now - t < self.window_s]
        if times:
            self._seen[source] = times
        else:
            self._seen.pop(source, None)
        return times

    def blocked(self, source: str, now: float) -> bool:
        return len(self._recent(source, now)) >= self.limit

    def unknown(self, source: str, now: float) -> None:
        if source not in self._seen and len(self._seen) >= self.max_sources:
            for old in list(self._seen)[: len(self._seen) // 2]:
                self._recent(old, now)  # forget what has aged out, so the table stays bounded
            if len(self._seen) >= self.max_sources:
                self._seen.pop(next(iter(self._seen)))
        self._seen.setdefault(source, []).append(now)


class _Channel:
    """Length-prefixed pickles over a unix socket between this program's own worker processes
    (the socket lives in a private 0700 directory: only the same user reaches it)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def send(self, message: dict[str, Any]) -> None:
        data = pickle.dumps(message)
        await self._send_all(struct.pack("!I", len(data)) + data)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def receive(self) -> dict[str, Any]:
        (length,) = struct.unpack("!I", await self._exactly(4))
        message = pickle.loads(await self._exactly(length))
        if not isinstance(message, dict):
            raise EOFError("not a control message")
        return message

    async def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("the other worker closed the control connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


class _ControlClient:
    """Worker 0's (or a sibling's) side of one control conversation."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index
        self.channel: _Channel | None = None

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send, wait for the answer; raise ReloadError when it is a refusal."""
        if self.channel is None:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise ReloadError(f"worker {self.index} is unreachable: {e.strerror or e}") from None
            self.channel = _Channel(sock)
        try:
            await self.channel.send(message)
            answer = await self.channel.receive()
        except (OSError, EOFError, trio.BrokenResourceError) as e:
            raise ReloadError(f"worker {self.index} failed during the reload: {e}") from None
        if not answer.get("ok"):
            raise ReloadError(str(answer.get("error", f"worker {self.index} refused the reload")))
        return answer

    async def finish(self, message: dict[str, Any]) -> None:
        """Tell a prepared sibling the decision (best effort, bounded), then hang up."""
        try:
            if self.channel is not None:
                with trio.move_on_after(CONTROL_TIMEOUT_S):
                    await self.channel.send(message)
                    if message.get("op") == "commit":
                        await self.channel.receive()
        except (OSError, EOFError, trio.BrokenResourceError) as e:
            log.warning("control_failed", worker=self.index, error=str(e) or type(e).__name__)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
