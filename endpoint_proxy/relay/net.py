"""Byte transports for the relay: raw non-blocking sockets on trio's I/O manager, or a trio stream (TLS).

Why not trio's SocketStream everywhere: its cost is per call (checkpoints, a scheduler
pass each time), and a relay makes many small calls. ``RawConn`` tries the syscall first
and only waits when the kernel says EAGAIN, so a ready socket costs one syscall.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

# A raw connection yields to the scheduler at least this often even when data keeps coming,
# so a flood on one session cannot starve the others.
_YIELD_EVERY = 64
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class Conn:
    """What the relay needs of a connection."""

    closed: bool = False

    def peer_closed(self) -> bool:
        """Without waiting: has the peer closed, reset or spoken on a connection that should be
        silent? (False when unsure.)"""
        return False

    async def recv_into(self, buf: bytearray | memoryview) -> int:
        raise NotImplementedError

    async def recv_into_after_wait(self, buf: bytearray | memoryview) -> int:
        return await self.recv_into(buf)

    async def recv_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` in a new bytes object (b"" at the end of the stream): for readers
        that must not hold a buffer between reads."""
        raise NotImplementedError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def to_stream(self) -> trio.abc.Stream:
        """Hand the connection over to a trio stream (for a TLS upgrade); this object is spent."""
        raise NotImplementedError

    @property
    def is_tls(self) -> bool:
        return False


# Opens a connection to (host, port): ``connect_tcp``, or a test's in-memory network.
Dialer = Callable[[str, int], Awaitable[Conn]]


class RawConn(Conn):
    __slots__ = ("sock", "fd", "_spins", "closed")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()  # (read on every borrow and give-back: no method call)
        self._spins = 0
        self.closed = False

    async def recv_into(self, buf: bytearray | memoryview) -> int:
        sock = self.sock
        self._spins += 1
        if self._spins >= _YIELD_EVERY:
            self._spins = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return sock.recv_into(buf)
            except BlockingIOError:
                self._spins = 0
                await trio.lowlevel.wait_readable(sock)
            except InterruptedError:
                continue

    async def recv_some(self, max_bytes: int) -> bytes:
        sock = self.sock
        while True:
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
            except InterruptedError:
                continue

    def peer_closed(self) -> bool:
        """For a connection that should be silent (an idle, parked backend): has the peer closed
        or reset it, or said anything unasked? A server about to close sends its reason first
        (PostgreSQL's FATAL, MySQL's ERR): bytes waiting here mean the connection is done."""
        try:
            self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # end of stream (b"") or unasked bytes

    async def recv_into_after_wait(self, buf: bytearray | memoryview) -> int:
        """Like recv_into, but wait for readiness first: for when the peer surely has not
        answered yet (we just sent it a whole request), which saves a recv that would fail."""
        self._spins = 0
        await trio.lowlevel.wait_readable(self.sock)
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return await self.recv_into(buf)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)  # the usual case: the kernel takes it all at once
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except InterruptedError:
                continue
            view = view[sent:]

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (ValueError, OSError):
            pass
        self.sock.close()

    def to_stream(self) -> trio.SocketStream:
        """Hand the socket over to a trio stream (for a TLS upgrade); this object is spent."""
        self.closed = True
        return trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))


class StreamConn(Conn):
    """A trio stream (TLS); costlier per call, used only where TLS is on."""

    __slots__ = ("stream", "closed")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.closed = False

    async def recv_some(self, max_bytes: int) -> bytes:
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectionResetError(str(e)) from e

    async def recv_into(self, buf: bytearray | memoryview) -> int:
        try:
            data = await self.stream.receive_some(len(buf))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectionResetError(str(e)) from e
        n = len(data)
        buf[:n] = data
        return n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectionResetError(str(e)) from e

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    @property
    def is_tls(self) -> bool:
        return True


async def connect_tcp(host: str, port: int) -> RawConn:
    """Open a TCP connection without trio's stream layer; raises OSError on failure."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
            return RawConn(sock)
        except BaseException as e:
            try:
                trio.lowlevel.notify_closing(sock)
            except (ValueError, OSError):
                pass
            sock.close()
            if isinstance(e, OSError):
                last = e
                continue
            raise
    raise last or OSError(f"cannot resolve {host}:{port}")


def unverified_client_context() -> ssl.SSLContext:
    """TLS to a server without checking its certificate (libpq's sslmode=require, MySQL's REQUIRED)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def start_tls_client(conn: Conn, ctx: ssl.SSLContext | None, server_hostname: str | None) -> StreamConn:
    """TLS over an open connection. On failure the connection is closed here: the stream owned it."""
    sock = conn.sock if isinstance(conn, RawConn) else None
    inner = conn.to_stream()
    stream = trio.SSLStream(inner, ctx or unverified_client_context(), server_hostname=server_hostname)
    try:
        await stream.do_handshake()
    except BaseException:
        if sock is None:
            await trio.aclose_forcefully(inner)
            raise
        try:
            trio.lowlevel.notify_closing(sock)
        except (ValueError, OSError):
            pass
        sock.close()
        raise
    return StreamConn(stream)


async def send_quietly(conn: Conn, data: bytes, timeout_s: float = 1.0) -> None:
    """Best effort, bounded: a last word (an error) to a peer that may already be gone."""
    with trio.move_on_after(timeout_s):
        try:
            await conn.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass


class _PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read off the socket: a MySQL client starts
    its TLS handshake right behind the SSLRequest, without waiting for an answer."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def start_tls_server(conn: Conn, ctx: ssl.SSLContext, initial: bytes = b"") -> StreamConn:
    """TLS on an accepted connection; ``initial`` is handshake data the client already sent."""
    inner = conn.to_stream()
    stream = trio.SSLStream(_PrefixedStream(inner, initial) if initial else inner, ctx, server_side=True)
    await stream.do_handshake()
    return StreamConn(stream)
