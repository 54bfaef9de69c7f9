"""MySQL packet framing (3-byte length, 1-byte sequence id), 16 MiB splitting, and length-encoded values.

Rules of this file: no I/O, no copies of payloads nobody asked for. Two readers:

- ``PacketReader`` buffers a stream and hands out whole logical payloads, joining the
  fragments of a payload of 16 MiB - 1 or more; used where every packet matters
  (handshake, authentication, client commands, the proxy's own probe connections).
- ``PacketScanner`` walks a relayed stream header by header and asks a ``PacketSink``
  (``response.ResponseTracker``) at each packet's first byte whether it wants the payload;
  unwanted payloads are skipped by arithmetic. It is the hot path: a result row costs one
  loop iteration and one method call, and no allocation.

A payload of exactly 0xFFFFFF bytes is always followed by another fragment (possibly
empty): that is how the receiver knows the payload goes on. Sequence ids count packets,
fragments included, modulo 256.

Decoding helpers (``Cursor``, ``read_lenenc_*``) raise only ``MySQLProtocolError``: every
length is checked against the bytes left before anything is sliced or built from it.
"""

from __future__ import annotations

from typing import Final, Protocol

from ..errors import LocalProtocolError
from .errors import ER_NET_PACKET_TOO_LARGE, MySQLFrameError, MySQLProtocolError

HEADER_SIZE: Final = 4
# The largest fragment; a payload this long or longer continues in the next packet.
MAX_PACKET_LENGTH: Final = 0xFFFFFF
# MySQL's and MariaDB's ceiling for max_allowed_packet (1 GiB).
DEFAULT_MAX_PAYLOAD: Final = 1 << 30
# Before authentication nobody needs more: the handshake response with 64 KiB of attributes.
HANDSHAKE_MAX_PAYLOAD: Final = 1 << 17

Buffer = bytes | bytearray | memoryview

# Length-encoded integer prefixes.
LENENC_NULL: Final = 0xFB  # a NULL column value in a text row; not an integer
LENENC_2: Final = 0xFC
LENENC_3: Final = 0xFD
LENENC_8: Final = 0xFE
LENENC_INVALID: Final = 0xFF  # never an integer (it is the ERR packet header)


# --- packets ------------------------------------------------------------------------------------


def encode_packet(seq: int, payload: Buffer) -> bytes:
    """Frame one logical payload, split into 0xFFFFFF-byte fragments with consecutive sequence ids."""
    if not 0 <= seq <= 0xFF:
        raise LocalProtocolError(f"sequence id {seq} is not one byte")
    n = len(payload)
    if n < MAX_PACKET_LENGTH:
        return n.to_bytes(3, "little") + bytes((seq,)) + bytes(payload)
    view = memoryview(payload)
    parts: list[bytes] = []
    pos = 0
    while True:
        size = min(n - pos, MAX_PACKET_LENGTH)
        parts.append(size.to_bytes(3, "little") + bytes((seq,)))
        parts.append(bytes(view[pos : pos + size]))
        pos += size
        seq = (seq + 1) & 0xFF
        if size < MAX_PACKET_LENGTH:
            return b"".join(parts)


def fragment_count(payload_length: int) -> int:
    """How many packets a payload of this length takes (an exact multiple of 0xFFFFFF adds an empty one)."""
    return payload_length // MAX_PACKET_LENGTH + 1


def next_seq(seq: int, payload_length: int) -> int:
    """The sequence id after sending a payload of this length starting at ``seq``."""
    return (seq + fragment_count(payload_length)) & 0xFF


def _too_large(size: int, limit: int) -> MySQLFrameError:
    return MySQLFrameError(
        f"Got a packet bigger than the limit: {size} > {limit} bytes",
        errno=ER_NET_PACKET_TOO_LARGE,
    )


class PacketReader:
    """Buffers bytes and returns whole logical payloads; sizes are checked before any allocation.

    ``next_packet()`` returns ``(seq, payload)`` where ``seq`` is the sequence id of the
    payload's last fragment: a reply to it goes out with ``seq + 1``.
    """

    __slots__ = ("_buf", "max_payload")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload

    def feed(self, data: Buffer) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Everything not yet returned as a packet (handing over to a relay or a TLS layer)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_packet(self) -> tuple[int, bytes] | None:
        """The next logical payload as (seq of its last fragment, payload), or None when more bytes are needed."""
        buf = self._buf
        pos = 0
        total = 0
        seq = -1
        # Walk the fragment headers without consuming anything until the last one is complete.
        while True:
            if len(buf) - pos < HEADER_SIZE:
                return None
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            frag_seq = buf[pos + 3]
            if seq >= 0 and frag_seq != (seq + 1) & 0xFF:
                raise MySQLFrameError(f"Got packets out of order: fragment {frag_seq} after {seq}")
            seq = frag_seq
            total += length
            if total > self.max_payload:
                raise _too_large(total, self.max_payload)
            pos += HEADER_SIZE + length
            if len(buf) < pos:
                return None
            if length < MAX_PACKET_LENGTH:
                break
        if pos == HEADER_SIZE + total:
            payload = bytes(buf[HEADER_SIZE:pos])
        else:
            parts: list[bytes] = []
            at = 0
            while at < pos:
                length = buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16
                parts.append(bytes(buf[at + HEADER_SIZE : at + HEADER_SIZE + length]))
                at += HEADER_SIZE + length
            payload = b"".join(parts)
        del buf[:pos]
        return seq, payload


class PacketSink(Protocol):
    """What a ``PacketScanner`` reports packets to (``response.ResponseTracker`` is one)."""

    @property
    def done(self) -> bool:
        """True once the last packet of interest has been reported; the scanner stops after it."""
        ...

    def want(self, first: int, length: int) -> bool:
        """A logical packet starts: ``first`` is its first byte (-1 if empty), ``length`` its first fragment's length.

        Return True to receive the whole payload through ``packet()`` when it has passed.
        Return False and the packet is the sink's to account for now: it is skipped and never
        reported again.
        """
        ...

    def packet(self, payload: bytes) -> None:
        """The whole payload of a packet ``want`` asked for."""
        ...


class PacketScanner:
    """Walks a packet stream chunk by chunk, reporting each logical packet to a ``PacketSink``.

    ``scan(data, sink)`` returns how many bytes of ``data`` it consumed: all of them, or
    fewer when ``sink.done`` turned True at the end of a packet (the rest belongs to
    whatever comes next). State survives chunk boundaries: a header split over two reads,
    a payload skipped or collected over many, fragments of a payload of 16 MiB or more.
    ``seq`` is the sequence id of the last header seen.
    """

    __slots__ = ("max_payload", "seq", "_hdr", "_remaining", "_more", "_length", "_collect")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.seq = -1
        self._hdr = bytearray()  # a header split across chunks
        self._remaining = 0  # payload bytes of the current fragment still to pass; -1: first byte pending
        self._more = False  # the current fragment is 0xFFFFFF long: another fragment follows
        self._length = 0  # the length of the current logical packet's first fragment
        self._collect: bytearray | None = None  # a wanted payload being gathered

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a logical packet boundary."""
        return not self._hdr and self._remaining == 0 and not self._more

    def _start(self, first: int, length: int, sink: PacketSink) -> None:
        if sink.want(first, length):
            if length > self.max_payload:
                raise _too_large(length, self.max_payload)
            self._collect = bytearray()

    def _finish(self, sink: PacketSink) -> None:
        collect = self._collect
        if collect is not None:
            self._collect = None
            sink.packet(bytes(collect))

    def scan(self, data: Buffer, sink: PacketSink) -> int:
        if sink.done and self.at_boundary:
            return 0
        n = len(data)
        pos = 0
        while pos < n:
            remaining = self._remaining
            if remaining > 0:
                take = min(remaining, n - pos)
                collect = self._collect
                if collect is not None:
                    collect += data[pos : pos + take]
                pos += take
                self._remaining = remaining - take
                if take == remaining and not self._more:
                    self._finish(sink)
                    if sink.done:
                        return pos
                continue
            if remaining < 0:
                # The header of a new logical packet has passed; its first byte decides.
                self._remaining = self._length
                self._start(data[pos], self._length, sink)
                continue
            # At a header.
            if self._hdr or n - pos < HEADER_SIZE:
                take = min(HEADER_SIZE - len(self._hdr), n - pos)
                self._hdr += data[pos : pos + take]
                pos += take
                if len(self._hdr) < HEADER_SIZE:
                    continue
                hdr = self._hdr
                length = hdr[0] | hdr[1] << 8 | hdr[2] << 16
                self.seq = hdr[3]
                hdr.clear()
            else:
                length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                self.seq = data[pos + 3]
                pos += HEADER_SIZE
            continuation = self._more
            self._more = length == MAX_PACKET_LENGTH
            if continuation:
                collect = self._collect
                if collect is not None and len(collect) + length > self.max_payload:
                    raise _too_large(len(collect) + length, self.max_payload)
            elif length == 0:
                self._start(-1, 0, sink)
            elif pos < n:
                # Fast path: the first byte is here; a skipped row then costs no further iteration.
                self._start(data[pos], length, sink)
                if self._collect is None and pos + length <= n:
                    pos += length
                    if not self._more and sink.done:
                        return pos
                    continue
            else:
                self._length = length
                self._remaining = -1
                continue
            self._remaining = length
            if length == 0 and not self._more:
                self._finish(sink)
                if sink.done:
                    return pos
        return pos


# --- length-encoded values -------------------------------------------------------------------


def write_lenenc_int(value: int) -> bytes:
    """The shortest length-encoded form of an unsigned integer below 2**64."""
    if value < 0:
        raise LocalProtocolError(f"a length-encoded integer cannot be negative: {value}")
    if value < LENENC_NULL:
        return bytes((value,))
    if value < 1 << 16:
        return bytes((LENENC_2,)) + value.to_bytes(2, "little")
    if value < 1 << 24:
        return bytes((LENENC_3,)) + value.to_bytes(3, "little")
    if value < 1 << 64:
        return bytes((LENENC_8,)) + value.to_bytes(8, "little")
    raise LocalProtocolError(f"a length-encoded integer must be below 2**64: {value}")


def write_lenenc_str(data: Buffer) -> bytes:
    return write_lenenc_int(len(data)) + bytes(data)


def _malformed(what: str, reason: str) -> MySQLProtocolError:
    return MySQLProtocolError(f"Malformed communication packet ({what}): {reason}")


def read_lenenc_int(buf: Buffer, pos: int, what: str = "packet") -> tuple[int, int]:
    """A length-encoded integer at ``pos``: (value, position after it).

    0xFB (NULL) and 0xFF are not integers and raise, as does a value cut short.
    """
    if pos >= len(buf):
        raise _malformed(what, "truncated length-encoded integer")
    first = buf[pos]
    if first < LENENC_NULL:
        return first, pos + 1
    if first == LENENC_2:
        size = 2
    elif first == LENENC_3:
        size = 3
    elif first == LENENC_8:
        size = 8
    elif first == LENENC_NULL:
        raise _malformed(what, "NULL where a length-encoded integer belongs")
    else:
        raise _malformed(what, "0xFF is not a length-encoded integer")
    end = pos + 1 + size
    if end > len(buf):
        raise _malformed(what, "truncated length-encoded integer")
    return int.from_bytes(buf[pos + 1 : end], "little"), end


def read_lenenc_str(buf: Buffer, pos: int, what: str = "packet") -> tuple[bytes, int]:
    """A length-encoded string at ``pos``: (bytes, position after it)."""
    length, pos = read_lenenc_int(buf, pos, what)
    end = pos + length
    if end > len(buf):
        raise _malformed(what, f"length-encoded string of {length} bytes with {len(buf) - pos} left")
    return bytes(buf[pos:end]), end


def read_row_value(buf: Buffer, pos: int, what: str = "row") -> tuple[bytes | None, int]:
    """One column of a text result row: a length-encoded string, or None for 0xFB (NULL)."""
    if pos < len(buf) and buf[pos] == LENENC_NULL:
        return None, pos + 1
    return read_lenenc_str(buf, pos, what)


def write_row_value(value: Buffer | None) -> bytes:
    return bytes((LENENC_NULL,)) if value is None else write_lenenc_str(value)


# --- payload reading -------------------------------------------------------------------------

ENCODING: Final = "utf-8"
# Any bytes decode and re-encode to themselves: a latin1 name or query is relayed intact.
TEXT_ERRORS: Final = "surrogateescape"


def decode_text(data: Buffer) -> str:
    return bytes(data).decode(ENCODING, TEXT_ERRORS)


def encode_text(text: str) -> bytes:
    try:
        return text.encode(ENCODING, TEXT_ERRORS)
    except UnicodeEncodeError:
        raise LocalProtocolError(f"text cannot be encoded: {text!r}") from None


def nul_str(text: str) -> bytes:
    """A NUL-terminated string (string<NUL>)."""
    if "\0" in text:
        raise LocalProtocolError("a NUL-terminated string cannot contain NUL")
    return encode_text(text) + b"\0"


class Cursor:
    """Reads a payload front to back; every read checks the bytes left first."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.what = what

    def fail(self, reason: str) -> MySQLProtocolError:
        return _malformed(self.what, reason)

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def _need(self, n: int) -> None:
        if len(self.buf) - self.pos < n:
            raise self.fail("truncated")

    def uint(self, size: int) -> int:
        """A little-endian unsigned integer of ``size`` bytes (int<1>, int<2>, int<3>, int<4>, int<8>)."""
        self._need(size)
        value = int.from_bytes(self.buf[self.pos : self.pos + size], "little")
        self.pos += size
        return value

    def u8(self) -> int:
        self._need(1)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def lenenc_int(self) -> int:
        value, self.pos = read_lenenc_int(self.buf, self.pos, self.what)
        return value

    def lenenc_bytes(self) -> bytes:
        data, self.pos = read_lenenc_str(self.buf, self.pos, self.what)
        return data

    def lenenc_text(self) -> str:
        return decode_text(self.lenenc_bytes())

    def take(self, n: int) -> bytes:
        self._need(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def nul_bytes(self, *, optional_nul: bool = False) -> bytes:
        """string<NUL>; with ``optional_nul`` a string running to the end of the payload is accepted too."""
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            if not optional_nul:
                raise self.fail("unterminated string")
            return self.rest()
        data = self.buf[self.pos : end]
        self.pos = end + 1
        return data

    def nul_text(self, *, optional_nul: bool = False) -> str:
        return decode_text(self.nul_bytes(optional_nul=optional_nul))

    def rest(self) -> bytes:
        data = self.buf[self.pos :]
        self.pos = len(self.buf)
        return data

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} unexpected trailing bytes")
