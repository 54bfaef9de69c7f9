"""The proxy process: listeners per endpoint, cluster monitors, cancel routing between workers."""

from __future__ import annotations

import itertools
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import trio

from .admin.collectors import HubCollector, TopologyCollector
from .admin.console import AdminUsers, serve_pg_console
from .admin.http import AdminServer
from .config import Address, Config, ConfigError, EndpointConfig, load_config
from .protocol.pg.framing import FrameReader
from .protocol.pg.startup import CancelRequest, StartupMessage, encode_cancel_request, parse_startup_packet
from .relay.hub import Hub
from .relay.net import Conn, RawConn
from .server.cluster import ClusterRuntime
from .server.metrics import EndpointMetrics, ProxyMetrics
from .server.mysql.session import MySession
from .server.pg.backend import send_cancel
from .server.pg.session import PgSession
from .server.session.context import CancelRegistry, SessionContext
from .server.session.info import SessionInfo
from .server.state_file import StateFile

log = structlog.get_logger("endpoint_proxy.server")


def make_server_tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.cert_file is None or config.tls.key_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ctx


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

    @property
    def endpoint(self) -> EndpointConfig:
        return self.ctx.endpoint

    def close(self) -> None:
        self.scope.cancel()
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (ValueError, OSError, RuntimeError):
            pass
        self.sock.close()


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
        infos = (s.session_info() for s in list(self.proxy.sessions))
        return [i for i in infos if i is not None]

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
        # Called by POST /reload on the admin server; None answers 404 there.
        self.reload_hook: Callable[[], Awaitable[object]] | None = self.reload_from_file if config_path else None
        self.cancels = CancelRegistry(worker_index)
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
                if admin_sock is not None:
                    await nursery.start(AdminServer(self, reload=self.reload_hook).serve, admin_sock)
                    log.info("admin_listening", address=str(self.bound["admin"]))
                for cluster in self.clusters.values():
                    await nursery.start(cluster.run)
                if self.workers > 1 and self.runtime_dir:
                    await nursery.start(self._serve_cancel_forwarding)
                for listener in pending:
                    self._register(listener)
                pending = []
                task_status.started(self)
        finally:
            for listener in [*pending, *self._listeners.values()]:
                listener.sock.close()
            if admin_sock is not None:
                admin_sock.close()

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
        )

    async def _accept_loop(self, listener: _Listener) -> None:
        sock = listener.sock
        cluster = listener.cluster
        counts = cluster.metrics.endpoint(listener.endpoint.name)
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
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                session_class = MySession if cluster.config.protocol == "mysql" else PgSession
                assert self._session_nursery is not None
                self._session_nursery.start_soon(
                    self._session, session_class(listener.ctx, conn, next(self._ids)), counts)

    async def _session(self, session: PgSession | MySession, counts: EndpointMetrics) -> None:
        counts.client_connected()
        self.sessions.add(session)
        try:
            with session.scope:
                await session.run()
        except Exception:
            # A bug in one session must never take the listener (and every other session) down.
            log.exception("session_crashed", endpoint=session.ctx.endpoint.name)
            session.ctx.cluster.metrics.error("session_crashed")
        finally:
            self.sessions.discard(session)
            self._sessions_changed.set()
            self._sessions_changed = trio.Event()
            counts.client_disconnected()

    # --- live reload --------------------------------------------------------------------------

    async def reload_from_file(self) -> list[str]:
        """SIGHUP and POST /reload: read the config file again and apply it (see reload)."""
        assert self.config_path is not None
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("config_reload_failed", error=str(e))
            raise
        return await self.reload(new)

    async def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without dropping sessions it does not affect.

        Endpoints added get a listener, removed ones lose theirs (their sessions run on),
        changed ones take the new rule (sessions re-check their placement at their next
        statement). Instances, users and cluster settings change in place (see
        ClusterRuntime.apply_config). Listen addresses are opened before anything changes,
        so a reload that cannot bind leaves the old configuration whole. Settings of
        [server], [tls] and [admin] need a restart; a change there is logged.
        """
        async with self._reload_lock:
            try:
                changes = await self._reload(new)
            except Exception as e:
                log.error("config_reload_failed", error=str(e))
                raise
            log.info("config_reloaded", changes=changes)
            return changes

    async def _reload(self, new: Config) -> list[str]:
        old = self.config
        changes: list[str] = []
        for section in ("server", "tls"):
            if getattr(old, section) != getattr(new, section):
                changes.append(f"[{section}] changed: takes effect at restart")
        if old.admin.listen != new.admin.listen:
            changes.append("[admin] listen changed: takes effect at restart")
        admin_users = None
        if old.admin.users != new.admin.users:
            admin_users = self.console.admin_users.updated(new.admin.users)
            await trio.to_thread.run_sync(admin_users.prepare)
        new_clusters = {c.name: c for c in new.clusters}
        # 1. Everything that can fail, before anything changes: new listeners, new secrets.
        opened: dict[tuple[str, str], socket.socket] = {}
        try:
            for cname, cc in new_clusters.items():
                for ep in cc.endpoints:
                    key = (cname, ep.name)
                    current = self._listeners.get(key)
                    if current is None or current.endpoint.listen != ep.listen:
                        if current is not None and current.endpoint.listen.port == ep.listen.port:
                            current.close()  # same port, new host: free it first
                            self._listeners.pop(key)
                        opened[key] = open_listener(ep.listen, reuse_port=self.workers > 1)
        except OSError as e:
            for sock in opened.values():
                sock.close()
            raise OSError(e.errno, f"cannot listen: {e.strerror or e}") from None
        added_runtimes = {name: ClusterRuntime(cc, self.metrics.cluster(name), state=self.state)
                          for name, cc in new_clusters.items() if name not in self.clusters}
        for rt in added_runtimes.values():
            await trio.to_thread.run_sync(rt.prepare_secrets)
        # 2. Apply.
        assert self._nursery is not None
        for name in list(self.clusters):
            if name not in new_clusters:
                for key in [k for k in self._listeners if k[0] == name]:
                    self._listeners.pop(key).close()
                del self.clusters[name]  # its sessions drain; its monitors stop with them
                changes.append(f"cluster {name} removed")
        for name, rt in added_runtimes.items():
            self.clusters[name] = rt
            await self._nursery.start(rt.run)
            changes.append(f"cluster {name} added")
        for name, cc in new_clusters.items():
            rt = self.clusters[name]
            if name not in added_runtimes:
                if rt.config.protocol != cc.protocol:
                    changes.append(f"cluster {name}: protocol change takes effect at restart")
                changes += [f"cluster {name}: {c}" for c in rt.apply_config(cc)]
            new_eps = {ep.name: ep for ep in cc.endpoints}
            for key in [k for k in self._listeners if k[0] == name and k[1] not in new_eps]:
                self._listeners.pop(key).close()
                changes.append(f"endpoint {key[1]} removed")
            for ep in cc.endpoints:
                key = (name, ep.name)
                new_sock = opened.pop(key, None)
                if new_sock is not None:
                    old_listener = self._listeners.pop(key, None)
                    if old_listener is not None:
                        old_listener.close()
                    self._register(_Listener(rt, self._context(rt, ep), new_sock))
                    changes.append(f"endpoint {ep.name} {'moved' if old_listener else 'added'}")
                elif self._listeners[key].endpoint != ep:
                    self._listeners[key].ctx.endpoint = ep
                    changes.append(f"endpoint {ep.name} changed")
        if admin_users is not None:
            self.console.admin_users = admin_users
            changes.append("admin users changed")
        self.config = new
        return changes

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

    async def handle_cancel(self, request: CancelRequest) -> None:
        """A CancelRequest arrived: deliver it to the backend it names, wherever its session
        is; return once the server has taken it (or after a bounded wait)."""
        await self._deliver_cancel(request)

    async def _deliver_cancel(self, request: CancelRequest) -> None:
        owner = self.cancels.owner_of(request.secret_key)
        try:
            with trio.move_on_after(5):
                if owner != self.worker_index and self.workers > 1 and self.runtime_dir:
                    await self._forward_cancel(owner, request)
                    return
                target = self.cancels.lookup(request.process_id, request.secret_key)
                if target is None:
                    return  # like PostgreSQL: an unknown key is ignored silently
                await send_cancel(target.address, target.process_id, target.secret_key)
        except OSError as e:
            log.info("cancel_failed", error=str(e))

    def _cancel_socket_path(self, worker: int) -> str:
        assert self.runtime_dir is not None
        return os.path.join(self.runtime_dir, f"cancel-{worker}.sock")

    async def _forward_cancel(self, worker: int, request: CancelRequest) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(self._cancel_socket_path(worker))
            await sock.send(encode_cancel_request(request.process_id, request.secret_key))
            await sock.recv(1)  # the owner closes once the server has taken the cancel

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
                    await self._deliver_cancel(packet)
        except Exception as e:  # a forwarded cancel is best effort
            log.info("cancel_failed", error=str(e))
        finally:
            await conn.aclose()
