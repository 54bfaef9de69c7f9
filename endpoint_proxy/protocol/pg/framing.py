"""PostgreSQL v3 message framing: typed headers (1-byte type, 4-byte length) and startup packets.

Rules of this file: no I/O, no copies of message bodies that nobody asked for. Two readers:

- ``FrameReader`` buffers a stream and hands out whole messages; used where every message
  matters (startup, authentication, the proxy's own probe connections).
- ``MessageScanner`` walks a relayed stream header by header, skipping bodies by arithmetic,
  and returns only the messages whose type the caller asked for. It is the hot path: a
  20,000-row result costs one loop iteration per row header and no allocation per row.
"""

from __future__ import annotations

import struct

from ..errors import FrameError

_HEADER = struct.Struct(">BI")  # type byte, length (counting itself)

# A message length counts itself (4 bytes); anything smaller is impossible.
MIN_LENGTH = 4
# PostgreSQL's own limit for a message (MaxAllocSize is 1 GiB - 1).
DEFAULT_MAX_LENGTH = 0x3FFFFFFF
# Before authentication nobody needs more than this (PostgreSQL allows 10000 for startup).
STARTUP_MAX_LENGTH = 10000


def frame(type_: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One typed message: type byte, length (counting itself), payload."""
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + bytes(payload)


def frame_untyped(payload: bytes | bytearray | memoryview) -> bytes:
    """A startup-phase packet: length (counting itself), payload."""
    return (len(payload) + 4).to_bytes(4, "big") + bytes(payload)


def check_length(length: int, max_length: int) -> None:
    if length < MIN_LENGTH:
        raise FrameError(f"invalid message length {length}")
    if length > max_length:
        raise FrameError(f"message length {length} exceeds the limit of {max_length}")


class FrameReader:
    """Buffers bytes and returns whole messages; the length is checked before any allocation."""

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self._buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Everything not yet returned as a message (handing over to a relay)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def peek_type(self) -> int | None:
        """The type byte of the next message, as soon as it has arrived."""
        return self._buf[0] if self._buf else None

    def next_message(self) -> tuple[int, bytes] | None:
        """The next typed message as (type, payload), or None when more bytes are needed."""
        buf = self._buf
        if len(buf) < 5:
            return None
        length = int.from_bytes(buf[1:5], "big")
        check_length(length, self.max_length)
        end = length + 1
        if len(buf) < end:
            return None
        type_ = buf[0]
        payload = bytes(buf[5:end])
        del buf[:end]
        return type_, payload

    def next_startup(self) -> bytes | None:
        """The next untyped (startup-phase) packet's payload, or None when more bytes are needed."""
        buf = self._buf
        if len(buf) < 4:
            return None
        length = int.from_bytes(buf[0:4], "big")
        check_length(length + 0, self.max_length)
        if length < 8:
            # Every startup-phase packet carries at least a 4-byte code after its length.
            raise FrameError(f"invalid startup packet length {length}")
        if len(buf) < length:
            return None
        payload = bytes(buf[4:length])
        del buf[:length]
        return payload


_TABLES: dict[bytes, bytes] = {}


class MessageScanner:
    """Walks a message stream chunk by chunk; returns (type, payload, end) for the wanted types
    only, ``end`` being the offset in the chunk just past the message's last byte (where the
    next message starts: a request boundary, when the message ends a request).

    State survives chunk boundaries: a header split over two reads, a body skipped over
    many reads, a wanted payload collected over several.
    """

    __slots__ = ("_wanted", "max_length", "_skip", "_hdr", "_collect", "_need", "_ctype")

    def __init__(self, wanted: bytes, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        table = _TABLES.get(wanted)
        if table is None:  # one lookup table per set of types, shared by every scanner
            flags = bytearray(256)
            for t in wanted:
                flags[t] = 1
            table = _TABLES[wanted] = bytes(flags)
        self._wanted = table
        self.max_length = max_length
        self._skip = 0  # body bytes of an unwanted message still to pass
        self._hdr = b""  # a header split across chunks (bytes: an idle scanner holds no buffer)
        self._collect: bytearray | None = None  # a wanted payload being gathered
        self._need = 0
        self._ctype = 0

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a message boundary."""
        return not self._skip and not self._hdr and self._collect is None

    def scan_whole(self, data: bytes | bytearray | memoryview) -> tuple[list[tuple[int, bytes, int]], int]:
        """For a scanner at a message boundary: the wanted messages of the longest prefix of
        ``data`` made of whole messages, and that prefix's length. The rest is not consumed (the
        caller keeps it and passes it again with what follows)."""
        assert not self._skip and not self._hdr and self._collect is None  # (at_boundary, inlined)
        out: list[tuple[int, bytes, int]] = []
        n = len(data)
        pos = 0
        wanted = self._wanted
        max_length = self.max_length
        while pos + 5 <= n:
            type_, length = _HEADER.unpack_from(data, pos)
            if length < MIN_LENGTH or length > max_length:
                check_length(length, max_length)
            end = pos + 1 + length
            if end > n:
                break
            if wanted[type_]:
                out.append((type_, bytes(data[pos + 5 : end]), end))
            pos = end
        return out, pos

    def scan(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes, int]]:
        out: list[tuple[int, bytes, int]] = []
        n = len(data)
        pos = 0
        wanted = self._wanted
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            collect = self._collect
            if collect is not None:
                take = min(self._need - len(collect), n - pos)
                collect += data[pos : pos + take]
                pos += take
                if len(collect) == self._need:
                    out.append((self._ctype, bytes(collect), pos))
                    self._collect = None
                continue
            if not self._hdr:
                # The common case: whole headers in this chunk. A tight loop, one struct
                # unpack per message, no state stored until the chunk runs out.
                max_length = self.max_length
                while pos + 5 <= n:
                    type_, length = _HEADER.unpack_from(data, pos)
                    if length < MIN_LENGTH or length > max_length:
                        check_length(length, max_length)
                    end = pos + 1 + length
                    if wanted[type_]:
                        if end > n:
                            break
                        out.append((type_, bytes(data[pos + 5 : end]), end))
                    elif end > n:
                        self._skip = end - n
                        return out
                    pos = end
                if pos >= n:
                    break
            if self._hdr or n - pos < 5:
                take = min(5 - len(self._hdr), n - pos)
                self._hdr += data[pos : pos + take]
                pos += take
                if len(self._hdr) < 5:
                    continue
                type_ = self._hdr[0]
                length = int.from_bytes(self._hdr[1:5], "big")
                self._hdr = b""
            else:
                type_ = data[pos]
                length = int.from_bytes(data[pos + 1 : pos + 5], "big")
                pos += 5
            if length < MIN_LENGTH or length > self.max_length:
                check_length(length, self.max_length)
            body = length - 4
            if not wanted[type_]:
                self._skip = body
                continue
            if n - pos >= body:
                out.append((type_, bytes(data[pos : pos + body]), pos + body))
                pos += body
            else:
                self._collect = bytearray()
                self._need = body
                self._ctype = type_
        return out
