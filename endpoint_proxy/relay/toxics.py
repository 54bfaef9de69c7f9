"""Toxics on server connections: a ``Conn`` wrapper that delays, throttles, slices or resets bytes.

What an injected fault does to the traffic of one instance (Toxiproxy's toxics, applied in
the proxy): ``ToxicConn`` asks its ``source`` at every call what applies now (a ``Toxics``,
or None for nothing: then it is a plain pass-through), so faults that start or lift while
the connection is open take effect at its next read or write.

- latency (+ jitter): each piece of data from the server is delivered ``latency ± jitter``
  ms after it arrived. Pieces keep their order and are pipelined: while one waits, the next
  is already read (on a plain socket; a TLS stream cannot be read ahead safely, so there
  each read waits in turn).
- bandwidth: both directions are held to the rate, in pieces of a tenth of a second.
- slicer: data from the server is delivered in pieces of ``size ± variation`` bytes with
  ``delay`` ms between them.
- reset, and INSTANCE FAILURE (``failed``): the connection is closed with a TCP RST (on a
  plain socket) and the call raises ConnectionResetError, as a dying server would.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import deque
from collections.abc import Callable

import trio

from ..drills.faults import Toxics
from .net import Conn, RawConn

# How much a latency toxic reads ahead of the caller at most (bytes).
READ_AHEAD_LIMIT = 1 << 20

ToxicSource = Callable[[], Toxics | None]


class ToxicConn(Conn):
    """``inner`` with the toxics ``source()`` names applied (see the module docstring).

    ``read_ahead``: read further server data while a delayed piece waits (default: unless
    ``inner`` is TLS). ``rng`` draws jitter and slice sizes (seed it in tests)."""

    def __init__(self, inner: Conn, source: ToxicSource, *, rng: random.Random | None = None,
                 read_ahead: bool | None = None) -> None:
        self.inner = inner
        self.source = source
        self.rng = rng or random.Random()
        self.read_ahead = (not inner.is_tls) if read_ahead is None else read_ahead
        self.opened_at = trio.current_time()
        self.closed = False
        self.was_reset = False
        # Data read from the server and not yet delivered: (deliver no earlier than, bytes);
        # b"" is the server's end of stream.
        self._held: deque[tuple[float, bytes]] = deque()
        self._held_bytes = 0
        self._recv_free_at = 0.0  # bandwidth: when the next piece may be delivered
        self._send_free_at = 0.0

    @property
    def is_tls(self) -> bool:
        return self.inner.is_tls

    def peer_closed(self) -> bool:
        if self._held:
            return self._held[0][1] == b""
        return self.inner.peer_closed()

    # --- reading ---------------------------------------------------------------------------

    async def recv_into(self, buf: bytearray | memoryview) -> int:
        toxics = self.source()
        if toxics is None and not self._held:
            return await self.inner.recv_into(buf)
        await self._check_reset(toxics)
        if not self._held:
            await self._read_one(len(buf), toxics)
        await self._wait_for_head(toxics)
        due, data = self._held[0]
        if not data:
            return 0  # end of stream: stays at the head, every later read sees it too
        n = min(len(buf), len(data), self._piece_limit(toxics))
        buf[:n] = data[:n]
        self._held_bytes -= n
        now = trio.current_time()
        if n == len(data):
            self._held.popleft()
        else:
            later = now + (toxics.slice_delay_ms / 1000 if toxics is not None and toxics.slice_size else 0.0)
            self._held[0] = (max(due, later), data[n:])
        if toxics is not None and toxics.bytes_per_second:
            self._recv_free_at = max(now, self._recv_free_at) + n / toxics.bytes_per_second
        return n

    def _piece_limit(self, toxics: Toxics | None) -> int:
        limit = 1 << 30
        if toxics is None:
            return limit
        if toxics.slice_size:
            spread = toxics.slice_variation
            limit = max(1, toxics.slice_size + (self.rng.randint(-spread, spread) if spread else 0))
        if toxics.bytes_per_second:
            limit = min(limit, max(1, int(toxics.bytes_per_second / 10)))
        return limit

    def _delay_s(self, toxics: Toxics | None) -> float:
        if toxics is None or not (toxics.latency_ms or toxics.jitter_ms):
            return 0.0
        jitter = self.rng.uniform(-toxics.jitter_ms, toxics.jitter_ms) if toxics.jitter_ms else 0.0
        return max(0.0, toxics.latency_ms + jitter) / 1000

    async def _read_one(self, size: int, toxics: Toxics | None) -> None:
        """Read one piece from the server (waiting for it), stamped with its delivery time;
        a reset that falls due meanwhile wins."""
        tmp = bytearray(max(1, size))
        with trio.move_on_at(self._reset_due(toxics)):
            n = await self.inner.recv_into(tmp)
            self._hold(bytes(tmp[:n]), toxics)
            return
        await self._reset()

    def _hold(self, data: bytes, toxics: Toxics | None) -> None:
        self._held.append((trio.current_time() + self._delay_s(toxics), data))
        self._held_bytes += len(data)

    async def _wait_for_head(self, toxics: Toxics | None) -> None:
        """Wait until the first held piece may go (its latency, the bandwidth), reading
        ahead meanwhile so that later pieces' delays run concurrently."""
        while True:
            due = max(self._held[0][0], self._recv_free_at if toxics and toxics.bytes_per_second else 0.0)
            reset_due = self._reset_due(toxics)
            now = trio.current_time()
            if reset_due <= now:
                await self._reset()
            if due <= now:
                return
            can_read_ahead = (self.read_ahead and self._held[-1][1] != b""
                              and self._held_bytes < READ_AHEAD_LIMIT)
            if not can_read_ahead:
                await trio.sleep_until(min(due, reset_due))
                continue
            tmp = bytearray(65536)
            with trio.move_on_at(min(due, reset_due)):
                n = await self.inner.recv_into(tmp)
                self._hold(bytes(tmp[:n]), toxics)

    # --- writing ---------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        toxics = self.source()
        if toxics is None:
            await self.inner.send_all(data)
            return
        await self._check_reset(toxics)
        rate = toxics.bytes_per_second
        if not rate:
            await self.inner.send_all(data)
            return
        view = memoryview(data)
        step = max(1, int(rate / 10))
        while view:
            now = trio.current_time()
            if self._send_free_at > now:
                with trio.move_on_at(self._reset_due(toxics)):
                    await trio.sleep_until(self._send_free_at)
                await self._check_reset(toxics)
            piece, view = view[:step], view[step:]
            await self.inner.send_all(piece)
            self._send_free_at = max(trio.current_time(), self._send_free_at) + len(piece) / rate

    # --- reset -----------------------------------------------------------------------------

    def _reset_due(self, toxics: Toxics | None) -> float:
        if toxics is None:
            return float("inf")
        if toxics.failed:
            return float("-inf")
        if toxics.reset_after_ms is None:
            return float("inf")
        return max(self.opened_at, toxics.reset_since) + toxics.reset_after_ms / 1000

    async def _check_reset(self, toxics: Toxics | None) -> None:
        if self._reset_due(toxics) <= trio.current_time():
            await self._reset()

    async def _reset(self) -> None:
        """Close with a RST where we can, and fail the caller as a dead server would."""
        self.was_reset = True
        inner = self.inner
        if isinstance(inner, RawConn) and not inner.closed:
            try:
                inner.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        await self.aclose()
        raise ConnectionResetError("connection reset by peer (injected fault)")

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._held.clear()
        await self.inner.aclose()
