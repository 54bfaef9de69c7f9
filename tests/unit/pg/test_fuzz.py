"""Fuzz invariants: garbage yields a ProtocolError (never another exception, hang or huge allocation).

Also: MessageScanner returns the same messages as FrameReader whatever the chunking.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import FrameError, ProtocolError
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import (
    DEFAULT_MAX_LENGTH,
    FrameReader,
    MessageScanner,
)
from endpoint_proxy.protocol.pg.startup import encode_startup_message, parse_startup_packet

from .strategies import any_backend, any_frontend, text

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_TYPES = m.BACKEND_TYPE_BYTES + m.FRONTEND_TYPE_BYTES


def decode_everything(type_: int, payload: bytes) -> None:
    """Run every decoder on one payload; only ProtocolError may come out."""
    for decode in (m.decode_backend, m.decode_frontend):
        try:
            decode(type_, payload)
        except ProtocolError:
            pass
    for helper in (m.decode_password_message, m.decode_sasl_initial_response):
        try:
            helper(payload)
        except ProtocolError:
            pass


def mutate(wire: bytes, draw: st.DataObject) -> bytes:
    """Flip, cut or insert bytes in an otherwise valid message."""
    data = bytearray(wire)
    for _ in range(draw.draw(st.integers(1, 4))):
        action = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw.draw(st.integers(0, len(data)))
        if action == "flip" and pos < len(data):
            data[pos] ^= draw.draw(st.integers(1, 255))
        elif action == "cut":
            del data[pos : pos + draw.draw(st.integers(1, 8))]
        else:
            data[pos:pos] = draw.draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@FUZZ
@given(type_=st.sampled_from(ALL_TYPES) | st.integers(0, 255), payload=st.binary(max_size=64))
def test_random_payloads_raise_only_protocol_errors(type_: int, payload: bytes) -> None:
    decode_everything(type_, payload)


@FUZZ
@given(msg=any_backend | any_frontend, draw=st.data())
def test_mutated_payloads_raise_only_protocol_errors(msg: m.Message, draw: st.DataObject) -> None:
    wire = msg.encode()
    decode_everything(wire[0], mutate(wire[5:], draw))


@FUZZ
@given(stream=st.binary(max_size=200))
def test_random_streams_through_frame_reader(stream: bytes) -> None:
    reader = FrameReader(max_length=128)
    reader.feed(stream)
    try:
        while (message := reader.next_message()) is not None:
            decode_everything(*message)
    except FrameError:
        pass


@FUZZ
@given(payload=st.binary(max_size=80))
def test_random_startup_packets_raise_only_protocol_errors(payload: bytes) -> None:
    for candidate in (payload, b"\x00\x03\x00\x00" + payload, b"\x04\xd2\x16" + payload):
        try:
            parse_startup_packet(candidate)
        except ProtocolError:
            pass


@FUZZ
@given(params=st.dictionaries(text.filter(bool), text, max_size=4), draw=st.data())
def test_mutated_startup_packets_raise_only_protocol_errors(params: dict[str, str], draw: st.DataObject) -> None:
    wire = encode_startup_message({"user": "u", **params})
    reader = FrameReader(max_length=10000)
    reader.feed(mutate(wire, draw))
    try:
        while (packet := reader.next_startup()) is not None:
            try:
                parse_startup_packet(packet)
            except ProtocolError:
                pass
    except FrameError:
        pass


# --- huge or lying lengths and counts -----------------------------------------------------


@pytest.mark.parametrize("length", [0, 3, DEFAULT_MAX_LENGTH + 1, 0xFFFFFFFF])
def test_impossible_lengths_raise_frame_error(length: int) -> None:
    reader = FrameReader()
    reader.feed(b"D" + length.to_bytes(4, "big"))
    with pytest.raises(FrameError):
        reader.next_message()
    scanner = MessageScanner(b"Z")
    with pytest.raises(FrameError):
        scanner.scan(b"D" + length.to_bytes(4, "big"))
    startup = FrameReader()
    startup.feed(length.to_bytes(4, "big"))
    with pytest.raises(FrameError):
        startup.next_startup()


def test_limit_is_checked_before_the_body_arrives() -> None:
    reader = FrameReader(max_length=10000)
    reader.feed(b"Q" + (10001).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        reader.next_message()
    startup = FrameReader(max_length=10000)
    startup.feed((10001).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        startup.next_startup()


def test_a_huge_valid_length_does_not_allocate() -> None:
    tracemalloc.start()
    try:
        reader = FrameReader()
        reader.feed(b"D" + DEFAULT_MAX_LENGTH.to_bytes(4, "big") + b"\0\1")
        assert reader.next_message() is None
        scanner = MessageScanner(b"D")
        assert scanner.scan(b"D" + DEFAULT_MAX_LENGTH.to_bytes(4, "big") + b"\0\1") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        (ord("D"), b"\xff\xff"),  # 65535 columns
        (ord("T"), b"\xff\xff" + b"\0" * 100),
        (ord("t"), b"\xff\xff"),
        (ord("v"), b"\0\0\0\0\x7f\xff\xff\xff"),  # 2**31 - 1 option names
        (ord("G"), b"\0\xff\xff"),
        (ord("B"), b"\0\0\xff\xff"),
        (ord("P"), b"\0\0\xff\xff"),
        (ord("F"), b"\0\0\0\1\0\0\xff\xff"),
    ],
)
def test_lying_counts_fail_fast_without_allocating(type_: int, payload: bytes) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        decode = m.decode_backend if type_ in m.BACKEND_TYPE_BYTES else m.decode_frontend
        with pytest.raises(ProtocolError):
            decode(type_, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5
    assert peak < 64 * 1024


# --- MessageScanner against FrameReader ---------------------------------------------------

TYPE_POOL = b"DTZCEKSNAdcpQ"
raw_message = st.tuples(st.sampled_from(TYPE_POOL), st.binary(max_size=40))


def frames(messages: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes((t,)) + (len(p) + 4).to_bytes(4, "big") + p for t, p in messages)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False)]


def reader_run(stream: bytes, max_length: int) -> tuple[list[tuple[int, bytes]], bool]:
    reader = FrameReader(max_length=max_length)
    reader.feed(stream)
    out: list[tuple[int, bytes]] = []
    try:
        while (message := reader.next_message()) is not None:
            out.append(message)
    except FrameError:
        return out, True
    return out, False


def scanner_run(chunks: list[bytes], wanted: bytes, max_length: int,
                ends: list[int] | None = None) -> tuple[list[tuple[int, bytes]], bool, bool]:
    """Scan ``chunks``; ``ends`` (when given) collects each message's end as a stream offset."""
    scanner = MessageScanner(wanted, max_length=max_length)
    out: list[tuple[int, bytes]] = []
    offset = 0
    try:
        for chunk in chunks:
            for type_, payload, end in scanner.scan(chunk):
                out.append((type_, payload))
                if ends is not None:
                    ends.append(offset + end)
            offset += len(chunk)
    except FrameError:
        return out, True, False
    return out, False, scanner.at_boundary


@FUZZ
@given(
    messages=st.lists(raw_message, max_size=12),
    wanted=st.sets(st.sampled_from(TYPE_POOL)).map(bytes),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_scanner_matches_reader_on_valid_streams(
    messages: list[tuple[int, bytes]], wanted: bytes, cuts: list[int]
) -> None:
    stream = frames(messages)
    expected = [(t, p) for t, p in messages if t in wanted]
    # Where each wanted message ends in the stream: the next one starts there.
    expected_ends = []
    offset = 0
    for t, p in messages:
        offset += 5 + len(p)
        if t in wanted:
            expected_ends.append(offset)
    for chunks in (chunked(stream, cuts), [stream], [stream[i : i + 1] for i in range(len(stream))]):
        ends: list[int] = []
        out, failed, at_boundary = scanner_run(chunks, wanted, DEFAULT_MAX_LENGTH, ends)
        assert (out, failed, at_boundary) == (expected, False, True)
        assert ends == expected_ends
    assert reader_run(stream, DEFAULT_MAX_LENGTH) == (messages, False)


def whole_run(chunks: list[bytes], wanted: bytes, ends: list[int]) -> list[tuple[int, bytes]]:
    """scan_whole as a transaction-mode session uses it: what is not whole yet is kept and passed
    again with the next chunk."""
    scanner = MessageScanner(wanted)
    out: list[tuple[int, bytes]] = []
    kept = b""
    offset = 0
    for chunk in chunks:
        data = kept + chunk
        msgs, cut = scanner.scan_whole(data)
        out += [(t, p) for t, p, _ in msgs]
        ends += [offset + end for _, _, end in msgs]
        assert all(end <= cut for _, _, end in msgs) and scanner.at_boundary
        offset += cut
        kept = data[cut:]
    assert kept == b""
    return out


@FUZZ
@given(
    messages=st.lists(raw_message, max_size=12),
    wanted=st.sets(st.sampled_from(TYPE_POOL)).map(bytes),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_whole_message_scan_matches_the_scanner(
    messages: list[tuple[int, bytes]], wanted: bytes, cuts: list[int]
) -> None:
    stream = frames(messages)
    for chunks in (chunked(stream, cuts), [stream], [stream[i : i + 1] for i in range(len(stream))]):
        expected_ends: list[int] = []
        expected, _, _ = scanner_run(chunks, wanted, DEFAULT_MAX_LENGTH, expected_ends)
        ends: list[int] = []
        assert whole_run(chunks, wanted, ends) == expected
        assert ends == expected_ends


def test_whole_message_scan_checks_lengths_before_the_body() -> None:
    scanner = MessageScanner(b"Q", max_length=10000)
    assert scanner.scan_whole(b"Q" + (9).to_bytes(4, "big") + b"sel") == ([], 0)  # not whole yet
    with pytest.raises(FrameError):
        scanner.scan_whole(b"Q" + (10001).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        scanner.scan_whole(b"Q" + (3).to_bytes(4, "big"))


@FUZZ
@given(
    prefix=st.lists(raw_message, max_size=4),
    garbage=st.binary(max_size=120),
    wanted=st.sets(st.sampled_from(TYPE_POOL + b"\0\1")).map(bytes),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_scanner_matches_reader_on_garbage(
    prefix: list[tuple[int, bytes]], garbage: bytes, wanted: bytes, cuts: list[int]
) -> None:
    stream = frames(prefix) + garbage
    max_length = 48
    expected, expected_failed = reader_run(stream, max_length)
    expected = [(t, p) for t, p in expected if t in wanted]
    # Byte by byte, every message is returned before the bad header arrives: exact match.
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    assert scanner_run(bytewise, wanted, max_length)[:2] == (expected, expected_failed)
    # In bigger chunks, a FrameError discards what the same scan() call had found (the
    # connection is dead anyway), so the scanner's output is a prefix of the reader's.
    for chunks in (chunked(stream, cuts), [stream]):
        out, failed, _ = scanner_run(chunks, wanted, max_length)
        assert failed == expected_failed
        if failed:
            assert out == expected[: len(out)]
        else:
            assert out == expected
