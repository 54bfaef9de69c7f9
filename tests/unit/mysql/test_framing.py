"""Packet framing and length-encoded values: vectors fed whole and byte by byte, 16 MiB splits, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import FrameError, LocalProtocolError, ProtocolError
from endpoint_proxy.protocol.mysql.errors import ER_NET_PACKET_TOO_LARGE, MySQLFrameError, MySQLProtocolError
from endpoint_proxy.protocol.mysql.framing import (
    MAX_PACKET_LENGTH,
    PacketReader,
    PacketScanner,
    encode_packet,
    fragment_count,
    next_seq,
    read_lenenc_int,
    read_lenenc_str,
    read_row_value,
    write_lenenc_int,
    write_lenenc_str,
    write_row_value,
)

from .strategies import h

ROUND_TRIP = settings(max_examples=60, deadline=None)


def read_all(stream: bytes, *, bytewise: bool = False, max_payload: int = 1 << 30) -> list[tuple[int, bytes]]:
    reader = PacketReader(max_payload)
    out: list[tuple[int, bytes]] = []
    chunks = [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]
    for chunk in chunks:
        reader.feed(chunk)
        while (packet := reader.next_packet()) is not None:
            out.append(packet)
    assert reader.buffered == 0
    return out


# --- packets ------------------------------------------------------------------------------------

# (wire, [(seq, payload)]) -- COM_QUERY "select @@version_comment limit 1" from the protocol docs.
VECTORS: list[tuple[bytes, list[tuple[int, bytes]]]] = [
    (
        h("21 00 00 00 03", "73656c65637420404076657273696f6e5f636f6d6d656e74206c696d69742031"),
        [(0, b"\x03select @@version_comment limit 1")],
    ),
    (h("01 00 00 00 0e"), [(0, b"\x0e")]),  # COM_PING
    (h("07 00 00 02 00 00 00 02 00 00 00"), [(2, h("00 00 00 02 00 00 00"))]),  # an OK packet
    (h("00 00 00 05"), [(5, b"")]),  # an empty payload (as LOCAL INFILE's end marker)
    (h("01 00 00 ff 0e 01 00 00 00 0e"), [(255, b"\x0e"), (0, b"\x0e")]),  # seq wraps
]


@pytest.mark.parametrize(("stream", "packets"), VECTORS)
@pytest.mark.parametrize("bytewise", [False, True])
def test_vectors_decode(stream: bytes, packets: list[tuple[int, bytes]], bytewise: bool) -> None:
    assert read_all(stream, bytewise=bytewise) == packets


@pytest.mark.parametrize(("stream", "packets"), VECTORS)
def test_vectors_encode(stream: bytes, packets: list[tuple[int, bytes]]) -> None:
    assert b"".join(encode_packet(seq, payload) for seq, payload in packets) == stream


@pytest.mark.parametrize("size", [MAX_PACKET_LENGTH - 1, MAX_PACKET_LENGTH, MAX_PACKET_LENGTH + 10])
def test_16mib_split_and_join(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream = encode_packet(7, payload)
    frags = fragment_count(size)
    assert frags == (1 if size < MAX_PACKET_LENGTH else 2)
    assert len(stream) == size + 4 * frags
    if size >= MAX_PACKET_LENGTH:
        # The first fragment is full; the next carries the rest (empty for exactly 0xFFFFFF).
        assert stream[:4] == h("ff ff ff 07")
        rest = size - MAX_PACKET_LENGTH
        assert stream[4 + MAX_PACKET_LENGTH : 8 + MAX_PACKET_LENGTH] == rest.to_bytes(3, "little") + b"\x08"
    assert next_seq(7, size) == 7 + frags
    # Fed in a few large uneven chunks, then followed by another packet.
    reader = PacketReader()
    stream += encode_packet(next_seq(7, size), b"\x0e")
    got: list[tuple[int, bytes]] = []
    for i in range(0, len(stream), 5_000_011):
        reader.feed(stream[i : i + 5_000_011])
        while (packet := reader.next_packet()) is not None:
            got.append(packet)
    assert len(got) == 2
    assert got[0][0] == 7 + frags - 1  # the last fragment's sequence id
    assert got[0][1] == payload
    assert got[1] == (7 + frags, b"\x0e")


def test_a_payload_of_exactly_twice_the_maximum_needs_three_fragments() -> None:
    assert fragment_count(2 * MAX_PACKET_LENGTH) == 3
    assert next_seq(0xFE, 2 * MAX_PACKET_LENGTH) == 1


def test_fragments_out_of_order_are_refused() -> None:
    stream = h("ff ff ff 00") + bytes(MAX_PACKET_LENGTH) + h("00 00 00 05")
    reader = PacketReader()
    reader.feed(stream)
    with pytest.raises(MySQLFrameError) as info:
        reader.next_packet()
    assert info.value.errno == 1156 and info.value.sqlstate == "08S01"


def test_the_limit_is_checked_before_the_payload_arrives() -> None:
    reader = PacketReader(max_payload=100)
    reader.feed(h("65 00 00 00"))
    with pytest.raises(FrameError) as info:
        reader.next_packet()
    assert isinstance(info.value, MySQLProtocolError) and info.value.errno == ER_NET_PACKET_TOO_LARGE
    # The joined length counts: two fragments over the limit fail at the second header.
    reader = PacketReader(max_payload=MAX_PACKET_LENGTH + 5)
    reader.feed(h("ff ff ff 00") + bytes(MAX_PACKET_LENGTH) + h("06 00 00 01"))
    with pytest.raises(MySQLFrameError):
        reader.next_packet()


def test_encode_refuses_a_bad_sequence_id() -> None:
    with pytest.raises(LocalProtocolError):
        encode_packet(256, b"")


@ROUND_TRIP
@given(packets=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=50)), max_size=6), cuts=st.data())
def test_packets_round_trip_whatever_the_chunking(packets: list[tuple[int, bytes]], cuts: st.DataObject) -> None:
    stream = b"".join(encode_packet(seq, payload) for seq, payload in packets)
    reader = PacketReader()
    got: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(stream):
        step = cuts.draw(st.integers(1, 16))
        reader.feed(stream[pos : pos + step])
        pos += step
        while (packet := reader.next_packet()) is not None:
            got.append(packet)
    assert got == packets


# --- PacketScanner ------------------------------------------------------------------------------


class Recorder:
    """A PacketSink that wants the packets whose first byte is in ``wanted`` and records everything."""

    def __init__(self, wanted: bytes, stop_after: int | None = None) -> None:
        self.wanted = wanted
        self.stop_after = stop_after
        self.events: list[tuple[str, int, int | bytes]] = []
        self.done = False

    def want(self, first: int, length: int) -> bool:
        if first >= 0 and first in self.wanted:
            return True
        self.events.append(("skip", first, length))
        self._count()
        return False

    def packet(self, payload: bytes) -> None:
        self.events.append(("packet", payload[0] if payload else -1, payload))
        self._count()

    def _count(self) -> None:
        if self.stop_after is not None and len(self.events) >= self.stop_after:
            self.done = True


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 1000])
def test_scanner_reports_wanted_payloads_and_skips_the_rest(chunk: int) -> None:
    payloads = [b"\x01abc", b"\xfe\x00\x00\x02\x00", b"", b"\x00" * 10, b"\xffxyz"]
    stream = b"".join(encode_packet(i + 1, p) for i, p in enumerate(payloads))
    scanner = PacketScanner()
    sink = Recorder(b"\xfe\xff")
    consumed = sum(scanner.scan(stream[i : i + chunk], sink) for i in range(0, len(stream), chunk))
    assert consumed == len(stream)
    assert scanner.at_boundary and scanner.seq == 5
    assert sink.events == [
        ("skip", 0x01, 4),
        ("packet", 0xFE, payloads[1]),
        ("skip", -1, 0),
        ("skip", 0x00, 10),
        ("packet", 0xFF, payloads[4]),
    ]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_scanner_stops_at_the_end_of_the_packet_that_makes_the_sink_done(chunk: int) -> None:
    stream = encode_packet(1, b"\x01aa") + encode_packet(2, b"\x02bb") + encode_packet(3, b"\x03cc")
    scanner = PacketScanner()
    sink = Recorder(b"\x02", stop_after=2)
    consumed = 0
    for i in range(0, len(stream), chunk):
        piece = stream[i : i + chunk]
        n = scanner.scan(piece, sink)
        consumed += n
        if sink.done:
            break
        assert n == len(piece)
    assert consumed == 14  # the first two packets, 7 bytes each
    assert scanner.scan(b"more", sink) == 0  # a done sink takes nothing


@pytest.mark.parametrize("wanted", [b"\xfe", b""])
@pytest.mark.parametrize("size", [MAX_PACKET_LENGTH, MAX_PACKET_LENGTH + 10])
def test_scanner_joins_or_skips_a_split_payload(wanted: bytes, size: int) -> None:
    payload = b"\xfe" + bytes(size - 1)
    stream = encode_packet(1, payload) + encode_packet(next_seq(1, size), b"\x05")
    scanner = PacketScanner()
    sink = Recorder(wanted + b"\x05")
    for i in range(0, len(stream), 3_000_017):
        assert scanner.scan(stream[i : i + 3_000_017], sink) == len(stream[i : i + 3_000_017])
    first = ("packet", 0xFE, payload) if wanted else ("skip", 0xFE, MAX_PACKET_LENGTH)
    assert sink.events == [first, ("packet", 5, b"\x05")]
    assert scanner.seq == next_seq(1, size)


def test_scanner_refuses_a_wanted_payload_over_the_limit() -> None:
    scanner = PacketScanner(max_payload=10)
    with pytest.raises(MySQLFrameError):
        scanner.scan(h("0b 00 00 01 ff"), Recorder(b"\xff"))
    # An unwanted one is only skipped.
    assert PacketScanner(max_payload=10).scan(h("0b 00 00 01 01"), Recorder(b"")) == 5


# --- length-encoded values ----------------------------------------------------------------------

LENENC_VECTORS = [
    (0, h("00")),
    (250, h("fa")),
    (251, h("fc fb 00")),
    (0xFFFF, h("fc ff ff")),
    (0x10000, h("fd 00 00 01")),
    (0xFFFFFF, h("fd ff ff ff")),
    (0x1000000, h("fe 00 00 00 01 00 00 00 00")),
    (2**64 - 1, h("fe ff ff ff ff ff ff ff ff")),
]


@pytest.mark.parametrize(("value", "wire"), LENENC_VECTORS)
def test_lenenc_int_vectors(value: int, wire: bytes) -> None:
    assert write_lenenc_int(value) == wire
    assert read_lenenc_int(b"x" + wire + b"y", 1) == (value, 1 + len(wire))


@pytest.mark.parametrize("wire", [h("fb"), h("ff"), h(""), h("fc 01"), h("fd 01 02"), h("fe 01 02 03 04 05 06 07")])
def test_lenenc_int_refusals(wire: bytes) -> None:
    with pytest.raises(MySQLProtocolError):
        read_lenenc_int(wire, 0)


def test_lenenc_int_out_of_range() -> None:
    for value in (-1, 2**64):
        with pytest.raises(LocalProtocolError):
            write_lenenc_int(value)


def test_lenenc_strings_and_row_values() -> None:
    assert write_lenenc_str(b"abc") == h("03 616263")
    assert read_lenenc_str(h("03 616263 ff"), 0) == (b"abc", 4)
    assert read_row_value(h("fb 00"), 0) == (None, 1)
    assert read_row_value(h("00"), 0) == (b"", 1)
    assert write_row_value(None) == h("fb")
    with pytest.raises(ProtocolError):
        read_lenenc_str(h("05 6162"), 0)
    # A huge announced length is refused without allocating it.
    with pytest.raises(ProtocolError):
        read_lenenc_str(h("fe ff ff ff ff ff ff ff 7f"), 0)


@ROUND_TRIP
@given(value=st.integers(0, 2**64 - 1), prefix=st.binary(max_size=3))
def test_lenenc_int_round_trip(value: int, prefix: bytes) -> None:
    wire = write_lenenc_int(value)
    assert read_lenenc_int(prefix + wire, len(prefix)) == (value, len(prefix) + len(wire))
    # Truncated anywhere, it fails as a protocol error.
    for cut in range(len(wire)):
        with pytest.raises(MySQLProtocolError):
            read_lenenc_int(prefix + wire[:cut], len(prefix))


@ROUND_TRIP
@given(value=st.binary(max_size=300) | st.none())
def test_lenenc_str_round_trip(value: bytes | None) -> None:
    wire = write_row_value(value)
    assert read_row_value(wire, 0) == (value, len(wire))
    if value is not None:
        assert read_lenenc_str(wire, 0) == (value, len(wire))
