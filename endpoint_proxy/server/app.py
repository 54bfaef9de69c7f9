"""The proxy process: listeners per endpoint, cluster monitors, cancel routing between workers."""

from __future__ import annotations

import itertools
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import trio

from ..config import Address, ClusterConfig, Config, EndpointConfig
from ..protocol.pg.startup import CancelRequest, encode_cancel_request, parse_startup_packet
from .admin import AdminServer
from .cluster import ClusterRuntime
from .metrics import EndpointMetrics, ProxyMetrics
from .my_session import MySession
from .net import RawConn
from .pg_backend import send_cancel
from .pg_session import CancelRegistry, PgSession, SessionContext

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


class Proxy:
    """One worker process's proxy. ``workers`` > 1 means siblings share the listening ports."""

    def __init__(self, config: Config, *, worker_index: int = 0, workers: int = 1,
                 runtime_dir: str | None = None) -> None:
        self.config = config
        self.worker_index = worker_index
        self.workers = workers
        self.runtime_dir = runtime_dir
        self.tls_context = make_server_tls_context(config)
        self.metrics = ProxyMetrics()
        self.clusters = {c.name: ClusterRuntime(c, self.metrics.cluster(c.name)) for c in config.clusters}
        self.metrics.watch(lambda: self.clusters.values())
        # Called by POST /reload on the admin server; None answers 404 there.
        self.reload_hook: Callable[[], Awaitable[object]] | None = None
        self.cancels = CancelRegistry(worker_index)
        self.bound: dict[str, Address] = {}  # endpoint name -> actual listening address
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[tuple[socket.socket, ClusterRuntime, EndpointConfig]] = []
        admin_sock: socket.socket | None = None
        try:
            if self.config.admin.listen is not None and self.worker_index == 0:
                admin_sock = open_listener(self.config.admin.listen, reuse_port=False)
                self.bound["admin"] = Address(*admin_sock.getsockname()[:2])
            for cluster in self.clusters.values():
                await trio.to_thread.run_sync(cluster.prepare_secrets)
                for ep in cluster.config.endpoints:
                    sock = open_listener(ep.listen, reuse_port=self.workers > 1)
                    host, port = sock.getsockname()[:2]
                    self.bound[f"{cluster.config.name}/{ep.name}"] = Address(host, port)
                    self.bound.setdefault(ep.name, Address(host, port))
                    listeners.append((sock, cluster, ep))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if admin_sock is not None:
                    await nursery.start(AdminServer(self, reload=self.reload_hook).serve, admin_sock)
                    log.info("admin_listening", address=str(self.bound["admin"]))
                for cluster in self.clusters.values():
                    await nursery.start(cluster.run)
                if self.workers > 1 and self.runtime_dir:
                    await nursery.start(self._serve_cancel_forwarding)
                for sock, cluster, ep in listeners:
                    nursery.start_soon(self._accept_loop, sock, cluster, ep)
                    log.info("endpoint_listening", cluster=cluster.config.name, endpoint=ep.name,
                             kind=ep.kind, address=str(self.bound[f"{cluster.config.name}/{ep.name}"]),
                             worker=self.worker_index)
                task_status.started(self)
        finally:
            for sock, _, _ in listeners:
                sock.close()
            if admin_sock is not None:
                admin_sock.close()

    def _context(self, cluster: ClusterRuntime, ep: EndpointConfig) -> SessionContext:
        srv = self.config.server
        return SessionContext(
            cluster=cluster, endpoint=ep, tls_context=self.tls_context, cancels=self.cancels,
            startup_timeout_s=srv.startup_timeout_ms / 1000,
            max_startup_bytes=srv.max_startup_bytes,
            max_message_bytes=srv.max_message_bytes,
            connect_timeout_s=srv.connect_timeout_ms / 1000,
            cancel_handler=self.handle_cancel,
        )

    async def _accept_loop(self, sock: socket.socket, cluster: ClusterRuntime, ep: EndpointConfig) -> None:
        ctx = self._context(cluster, ep)
        counts = cluster.metrics.endpoint(ep.name)
        async with trio.open_nursery() as sessions:
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as e:
                    # EMFILE and friends: back off instead of spinning.
                    log.warning("accept_failed", endpoint=ep.name, error=str(e))
                    await trio.sleep(0.1)
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                session_class = MySession if cluster.config.protocol == "mysql" else PgSession
                sessions.start_soon(self._session, session_class(ctx, conn, next(self._ids)), counts)

    @staticmethod
    async def _session(session: PgSession | MySession, counts: EndpointMetrics) -> None:
        counts.client_connected()
        try:
            await session.run()
        except Exception:
            # A bug in one session must never take the listener (and every other session) down.
            log.exception("session_crashed", endpoint=session.ctx.endpoint.name)
            session.ctx.cluster.metrics.error("session_crashed")
        finally:
            counts.client_disconnected()

    # --- cancels ------------------------------------------------------------------------------

    def handle_cancel(self, request: CancelRequest) -> None:
        """A CancelRequest arrived: deliver it to the backend it names, wherever its session is."""
        assert self._nursery is not None
        self._nursery.start_soon(self._deliver_cancel, request)

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


def cluster_for_endpoint(config: Config, name: str) -> tuple[ClusterConfig, EndpointConfig]:
    for c in config.clusters:
        for ep in c.endpoints:
            if ep.name == name:
                return c, ep
    raise KeyError(name)
