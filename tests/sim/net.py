"""A network for the session simulator: connections whose delivery is a parameter.

A ``Link`` joins two ``MemoryConn`` ends (relay.net's ``Conn``: what the proxy's sessions read
and write). Each direction has a ``Delivery``: where the byte stream is cut into separate reads
(nowhere, every byte, at given offsets, at random sizes from a seed), how late each piece
arrives (use ``trio.testing.MockClock(autojump_threshold=0)`` so delays cost no wall time), and
whether the link breaks at some offset (the reader gets ``ConnectionResetError`` or EOF there,
the writer ``ConnectionResetError``). A cut is a promise: no read returns bytes from both sides
of it, so the receiver sees them in separate calls whatever it asks for.

``to_stream()`` gives a trio stream view of an end, so ``trio.SSLStream`` runs over it: the
PostgreSQL SSLRequest and the MySQL CLIENT_SSL upgrades go through the same cuts (of the
ciphertext).

A ``SocketLink`` gives the proxy's end as a real TCP socket (a ``RawConn``: what the relay hub
serves, from inside trio's I/O dispatch) and keeps the same deliveries: pump tasks move the
peer's bytes into the socket one piece at a time, each only once the proxy has read the one
before, so the hub's reads see the same cuts.
"""

from __future__ import annotations

import errno
import fcntl
import random
import socket
import struct
import termios
from collections import deque
from dataclasses import dataclass, replace

import trio

from endpoint_proxy.relay.net import Conn, RawConn

RST = "rst"  # the link breaks: the reader gets ConnectionResetError, the writer too
EOF = "eof"  # the writer's side closes there: the reader gets EOF, what follows is lost


@dataclass(frozen=True)
class Delivery:
    """How one direction delivers what is written into it.

    ``size``: pieces of this many bytes (1: one byte at a time); ``at``: cuts at these offsets
    of the direction's stream, nowhere else; ``seed``: pieces of random sizes in [low, high];
    none of them: whole (a read takes everything that has arrived, writes coalesce).
    ``delay``: seconds each piece arrives after the one before it (or after its write).
    ``reset_at``: the stream breaks after this many bytes (``reset``: RST or EOF).
    """

    size: int | None = None
    at: tuple[int, ...] = ()
    seed: int | None = None
    low: int = 1
    high: int = 64
    delay: float = 0.0
    reset_at: int | None = None
    reset: str = RST

    @property
    def cuts_writes(self) -> bool:
        """Whether the end of each write is a cut too (else successive writes may coalesce)."""
        return self.size is not None or self.seed is not None

    def describe(self) -> str:
        parts = []
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.at:
            parts.append(f"at={list(self.at)}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}[{self.low}..{self.high}]")
        if self.delay:
            parts.append(f"delay={self.delay}")
        if self.reset_at is not None:
            parts.append(f"{self.reset}@{self.reset_at}")
        return ",".join(parts) or "whole"


WHOLE = Delivery()
BYTEWISE = Delivery(size=1)


def split_at(*offsets: int) -> Delivery:
    return Delivery(at=tuple(offsets))


def random_sizes(seed: int, low: int = 1, high: int = 64) -> Delivery:
    return Delivery(seed=seed, low=low, high=high)


def delayed(delivery: Delivery, seconds: float) -> Delivery:
    return replace(delivery, delay=seconds)


class _Pipe:
    """One direction of a link: bytes written, not yet read, and where reads must stop."""

    def __init__(self, delivery: Delivery, name: str) -> None:
        self.delivery = delivery
        self.name = name
        self.rng = random.Random(delivery.seed)
        self.data = bytearray()  # written, not yet read
        self.read_at = 0  # stream offset of data[0]
        self.written = 0  # stream offset of the end of data
        # (stream offset where a piece ends, when it becomes visible, whether reads stop there)
        self.marks: deque[tuple[int, float, bool]] = deque()
        self.last_visible = 0.0
        self.eof = False  # the writer closed: after the data, reads return b""
        self.broken = False  # the link broke: after the data, reads raise ConnectionResetError
        self.reader_gone = False  # the reader closed: writes are dropped
        self.transcript = bytearray()  # everything that went in (for assertions and failures)
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _pieces(self, start: int, length: int) -> list[tuple[int, bool]]:
        """(end offset, hard) of the pieces of a write of ``length`` bytes at offset ``start``."""
        d = self.delivery
        end = start + length
        if d.size is not None or d.seed is not None:
            out = []
            pos = start
            while pos < end:
                step = d.size if d.size is not None else self.rng.randint(d.low, d.high)
                pos = min(end, pos + max(1, step))
                out.append((pos, True))
            return out
        cuts = [(k, True) for k in sorted(d.at) if start < k < end]
        return [*cuts, (end, False)]

    def write(self, data: bytes) -> None:
        """Take ``data`` (whole or up to the reset point); ConnectionResetError if it broke."""
        if self.broken:
            raise ConnectionResetError(errno.ECONNRESET, f"{self.name}: connection reset")
        if self.eof:
            raise OSError(errno.EPIPE, f"{self.name}: writing after close")
        limit = self.delivery.reset_at
        cut_short = limit is not None and self.written + len(data) > limit
        if cut_short:
            assert limit is not None
            data = data[: max(0, limit - self.written)]
        if data and not self.reader_gone:
            self.transcript += data
            now = trio.current_time()
            visible = max(self.last_visible, now)
            for end, hard in self._pieces(self.written, len(data)):
                visible += self.delivery.delay
                self.marks.append((end, visible, hard))
            self.last_visible = visible
            self.data += data
            self.written += len(data)
            self._wake()
        if cut_short:
            self.break_(self.delivery.reset)
            if self.delivery.reset == RST:
                raise ConnectionResetError(errno.ECONNRESET, f"{self.name}: connection reset")

    def break_(self, how: str = RST) -> None:
        if how == RST:
            self.broken = True
        else:
            self.eof = True
        self._wake()

    def close_writer(self) -> None:
        self.eof = True
        self._wake()

    def close_reader(self) -> None:
        self.reader_gone = True
        self.data.clear()
        self.marks.clear()
        self._wake()

    def _available(self, now: float) -> int:
        """How many bytes one read may take now."""
        limit = self.read_at
        for end, visible, hard in self.marks:
            if visible > now:
                break
            limit = end
            if hard:
                break
        return limit - self.read_at

    async def read(self, max_bytes: int) -> bytes:
        while True:
            if self.reader_gone:
                await trio.lowlevel.checkpoint()
                raise OSError(errno.EBADF, f"{self.name}: reading after close")
            if self.marks:
                end, visible, _ = self.marks[0]
                now = trio.current_time()
                if visible > now:
                    await trio.sleep_until(visible)
                    continue
                n = min(self._available(now), max_bytes)
                out = bytes(self.data[:n])
                del self.data[:n]
                self.read_at += n
                while self.marks and self.marks[0][0] <= self.read_at:
                    self.marks.popleft()
                await trio.lowlevel.checkpoint()
                return out
            if self.broken:
                await trio.lowlevel.checkpoint()
                raise ConnectionResetError(errno.ECONNRESET, f"{self.name}: connection reset")
            if self.eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._changed.wait()

    @property
    def at_end(self) -> bool:
        """Nothing left to read and nothing more will come."""
        return not self.marks and (self.eof or self.broken)


class MemoryConn(Conn):
    """One end of a ``Link``: a relay.net ``Conn`` the proxy reads and writes like a socket."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, name: str) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self.name = name
        self.closed = False
        self.spent = False  # handed over to a stream (TLS)

    def __repr__(self) -> str:
        return f"MemoryConn({self.name})"

    def _check(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, f"{self.name}: closed")

    async def recv_some(self, max_bytes: int) -> bytes:
        self._check()
        return await self.inbound.read(max_bytes)

    async def recv_into(self, buf: bytearray | memoryview) -> int:
        data = await self.recv_some(len(buf))
        buf[: len(data)] = data
        return len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        self.outbound.write(bytes(data))
        await trio.lowlevel.checkpoint()

    def peer_closed(self) -> bool:
        return self.inbound.at_end

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.outbound.close_writer()
        self.inbound.close_reader()
        await trio.lowlevel.checkpoint()

    def reset(self) -> None:
        """Break the link both ways now (an RST)."""
        self.inbound.break_(RST)
        self.outbound.break_(RST)

    def to_stream(self) -> trio.abc.Stream:
        self.closed = True
        self.spent = True
        return MemoryStream(self.inbound, self.outbound, self.name)


class MemoryStream(trio.abc.Stream):
    """A trio stream over one end of a link (what trio.SSLStream wraps)."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, name: str) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self.name = name
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.ClosedResourceError(self.name)
        try:
            self.outbound.write(bytes(data))
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError(self.name)
        try:
            return await self.inbound.read(max_bytes or 65536)
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbound.close_writer()
            self.inbound.close_reader()
        await trio.lowlevel.checkpoint()


class Link:
    """A connection between ``a`` (say, a client) and ``b`` (the proxy's end of it)."""

    def __init__(self, name: str, a_to_b: Delivery = WHOLE, b_to_a: Delivery = WHOLE) -> None:
        self.name = name
        self.forward = _Pipe(a_to_b, f"{name} >")
        self.back = _Pipe(b_to_a, f"{name} <")
        self.a: Conn = MemoryConn(self.back, self.forward, f"{name}:a")
        self.b: Conn = MemoryConn(self.forward, self.back, f"{name}:b")

    def reset(self) -> None:
        assert isinstance(self.a, MemoryConn)
        self.a.reset()

    def dump(self) -> str:
        return "\n".join(f"{pipe.name} ({len(pipe.transcript)} bytes): {bytes(pipe.transcript)[-400:]!r}"
                         for pipe in (self.forward, self.back))


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(peer's socket, proxy's socket), connected over loopback TCP (an RST is possible)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = socket.create_connection(listener.getsockname())
        proxy, _ = listener.accept()
    for sock in (peer, proxy):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    return peer, proxy


def _unread(sock: socket.socket) -> int:
    """Bytes the kernel holds for the socket's reader (0 once the socket is closed)."""
    if sock.fileno() < 0:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


# How often (virtual seconds) a pump looks whether the proxy has read its last piece.
_POLL_S = 0.0005


class SocketLink(Link):
    """A link whose proxy end (``a`` or ``b``, by ``proxy_end``) is a TCP socket (RawConn)."""

    def __init__(self, name: str, a_to_b: Delivery, b_to_a: Delivery, *, proxy_end: str,
                 nursery: trio.Nursery) -> None:
        self.name = name
        self.forward = _Pipe(a_to_b, f"{name} >")
        self.back = _Pipe(b_to_a, f"{name} <")
        peer_sock, proxy_sock = _tcp_pair()
        self.proxy_sock = proxy_sock
        proxy = RawConn(proxy_sock)
        if proxy_end == "b":
            self.a, self.b = MemoryConn(self.back, self.forward, f"{name}:a"), proxy
            to_proxy, from_proxy = self.forward, self.back
        else:
            self.a, self.b = proxy, MemoryConn(self.forward, self.back, f"{name}:b")
            to_proxy, from_proxy = self.back, self.forward
        nursery.start_soon(self._pump_in, to_proxy, peer_sock)
        nursery.start_soon(self._pump_out, peer_sock, from_proxy)

    def reset(self) -> None:
        raise NotImplementedError("break a socket link through its delivery (reset_at)")

    async def _pump_in(self, pipe: _Pipe, sock: socket.socket) -> None:
        """The peer's bytes into the socket, piece by piece."""
        cuts = pipe.delivery.cuts_writes or bool(pipe.delivery.at)
        try:
            while True:
                try:
                    data = await pipe.read(65536)
                except ConnectionResetError:
                    # An RST: close with a zero linger time.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                    return
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    return
                view = memoryview(data)
                while view:
                    try:
                        view = view[sock.send(view):]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                if cuts:
                    # The next piece goes only once the proxy has read this one: separate reads.
                    while _unread(self.proxy_sock):
                        await trio.sleep(_POLL_S)
        except OSError:
            pass  # the peer's socket is gone (closed after an RST, or by the other pump)

    async def _pump_out(self, sock: socket.socket, pipe: _Pipe) -> None:
        """What the proxy sends, to the peer."""
        try:
            while True:
                try:
                    await trio.lowlevel.wait_readable(sock)
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except (OSError, trio.ClosedResourceError):
                    pipe.break_(RST)
                    return
                if not data:
                    pipe.close_writer()
                    return
                try:
                    pipe.write(data)
                except OSError:
                    pass  # the peer is gone: drop it
        finally:
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)
                sock.close()
