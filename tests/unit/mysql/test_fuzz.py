"""Fuzz invariants: garbage yields a ProtocolError (never another exception, a hang or a huge allocation).

Also: PacketScanner reports the same payloads as PacketReader whatever the chunking, and a
ResponseTracker fed through the scanner agrees with one fed payload by payload.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import ProtocolError
from endpoint_proxy.protocol.mysql import auth as a
from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import handshake as hs
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.framing import (
    PacketReader,
    PacketScanner,
    encode_packet,
    read_lenenc_int,
    read_lenenc_str,
    read_row_value,
)
from endpoint_proxy.protocol.mysql.response import UNTRACKABLE_COMMANDS, ResponseTracker

from .strategies import (
    COMMAND_CAPS,
    binary_row,
    column_def,
    commands,
    eof,
    err,
    h,
    handshake_responses,
    handshakes,
    ok,
    ok_fe,
    ok_packets,
    text_row,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_CAPS = [
    0,
    k.CLIENT_DEPRECATE_EOF,
    k.CLIENT_SESSION_TRACK,
    k.CLIENT_DEPRECATE_EOF | k.CLIENT_SESSION_TRACK | k.CLIENT_QUERY_ATTRIBUTES,
    k.CLIENT_OPTIONAL_RESULTSET_METADATA,
    k.MARIADB_CLIENT_CACHE_METADATA | k.CLIENT_DEPRECATE_EOF,
    COMMAND_CAPS | k.CLIENT_QUERY_ATTRIBUTES,
]
caps = st.sampled_from(ALL_CAPS)
TRACKED = [
    c.COM_QUERY,
    c.COM_STMT_EXECUTE,
    c.COM_STMT_FETCH,
    c.COM_STMT_PREPARE,
    c.COM_FIELD_LIST,
    c.COM_STATISTICS,
    c.COM_PING,
    c.COM_SET_OPTION,
    c.COM_CHANGE_USER,
    c.COM_STMT_BULK_EXECUTE,
]
tracked = st.sampled_from(TRACKED)

DECODERS: list[Callable[[bytes, int], object]] = [
    p.decode_ok,
    lambda b, _: p.decode_err(b),
    lambda b, _: p.decode_eof(b),
    p.decode_terminator,
    lambda b, _: p.decode_session_changes(b),
    lambda b, _: p.session_variable(b),
    lambda b, _: p.session_schema(b),
    lambda b, _: p.session_gtids(b),
    lambda b, _: hs.decode_handshake_v10(b),
    lambda b, _: hs.decode_handshake_response(b),
    lambda b, _: hs.decode_auth_switch_request(b),
    lambda b, _: hs.decode_auth_more_data(b),
    c.decode_command,
    c.decode_stmt_prepare_ok,
    lambda b, _: c.statement_id(b),
    lambda b, _: c.replace_statement_id(b, 1),
    c.query_text,
    lambda b, _: read_lenenc_int(b, 0),
    lambda b, _: read_lenenc_str(b, 0),
    lambda b, _: read_row_value(b, 0),
]


def decode_everything(payload: bytes, capabilities: int) -> None:
    for decode in DECODERS:
        try:
            decode(payload, capabilities)
        except ProtocolError:
            pass


def mutate(wire: bytes, draw: st.DataObject) -> bytes:
    """Flip, cut or insert bytes in an otherwise valid payload."""
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
@given(payload=st.binary(max_size=80), capabilities=caps)
def test_random_payloads_raise_only_protocol_errors(payload: bytes, capabilities: int) -> None:
    decode_everything(payload, capabilities)
    for command in range(0x00, 0x22):
        decode_everything(bytes((command,)) + payload, capabilities)


@FUZZ
@given(
    valid=st.one_of(
        ok_packets().map(lambda t: t[0].encode(t[1])),
        handshakes().map(lambda m: m.encode()),
        handshake_responses().map(lambda m: m.encode()),
        commands.map(lambda m: m.encode(COMMAND_CAPS)),
    ),
    capabilities=caps,
    draw=st.data(),
)
def test_mutated_payloads_raise_only_protocol_errors(valid: bytes, capabilities: int, draw: st.DataObject) -> None:
    decode_everything(mutate(valid, draw), capabilities)


# --- responses -------------------------------------------------------------------------------------

# Plausible packets to build garbage responses from, plus random bytes.
PIECES = [
    ok(),
    ok(k.SERVER_MORE_RESULTS_EXISTS),
    ok_fe(),
    ok_fe(k.SERVER_MORE_RESULTS_EXISTS | k.SERVER_STATUS_CURSOR_EXISTS),
    eof(),
    eof(k.SERVER_MORE_RESULTS_EXISTS),
    eof(k.SERVER_STATUS_CURSOR_EXISTS),
    err(),
    h("ff ffff 00"),
    h("01"),
    h("02 00"),
    h("fc 00 01"),
    column_def("a"),
    text_row(b"x", None),
    text_row(b""),
    binary_row(b"\1\0\0\0"),
    c.StmtPrepareOk(1, 1, 1).encode(),
    c.StmtPrepareOk(1, 0, 2).encode(),
    b"\xfbfile",
    h("fe", "6d7973716c5f6e61746976655f70617373776f726400", "61" * 20),
    h("01 03"),
    h("01 04"),
    b"",
]
response_payload = st.sampled_from(PIECES) | st.binary(max_size=24)


def track(command: int, capabilities: int, payloads: list[bytes]) -> tuple[str, object]:
    """Feed payload by payload; the outcome (or the error kind) to compare with the scanner's."""
    tracker = ResponseTracker(command, capabilities)
    try:
        for payload in payloads:
            if tracker.done:
                return "done early", None
            tracker.feed(payload)
    except ProtocolError:
        return "error", None
    return summary(tracker)


def summary(tracker: ResponseTracker) -> tuple[str, object]:
    return (
        "done" if tracker.done else "open",
        (tracker.status, tracker.rows, tracker.result_sets, tracker.error, tracker.ok, tracker.prepare_ok),
    )


@FUZZ
@given(command=tracked, capabilities=caps, payloads=st.lists(response_payload, max_size=10), chunk=st.integers(1, 9))
def test_random_responses_raise_only_protocol_errors_and_scanning_agrees(
    command: int, capabilities: int, payloads: list[bytes], chunk: int
) -> None:
    expected = track(command, capabilities, payloads)
    stream = b"".join(encode_packet((i + 1) & 0xFF, payload) for i, payload in enumerate(payloads))
    tracker = ResponseTracker(command, capabilities)
    scanner = PacketScanner()
    try:
        consumed = 0
        for i in range(0, len(stream), chunk):
            consumed += scanner.scan(stream[i : i + chunk], tracker)
            if tracker.done:
                break
    except ProtocolError:
        assert expected[0] == "error"
        return
    if expected[0] == "done early":
        assert tracker.done and consumed < len(stream)
    elif expected[0] != "error":
        # The scanner never reads a packet the tracker skipped, so it can only be more lenient.
        assert summary(tracker) == expected


@FUZZ
@given(command=tracked, capabilities=caps, stream=st.binary(max_size=200))
def test_random_streams_through_the_scanner(command: int, capabilities: int, stream: bytes) -> None:
    tracker = ResponseTracker(command, capabilities)
    try:
        PacketScanner(max_payload=1 << 16).scan(stream, tracker)
    except ProtocolError:
        pass


@FUZZ
@given(stream=st.binary(max_size=200), capabilities=caps, command=tracked)
def test_random_streams_through_the_reader(stream: bytes, capabilities: int, command: int) -> None:
    reader = PacketReader(max_payload=128)
    reader.feed(stream)
    tracker = ResponseTracker(command, capabilities)
    try:
        while (packet := reader.next_packet()) is not None:
            decode_everything(packet[1], capabilities)
            if not tracker.done:
                tracker.feed(packet[1])
    except ProtocolError:
        pass


# --- authentication ---------------------------------------------------------------------------------


@FUZZ
@given(data=st.lists(st.binary(max_size=40) | st.sampled_from([b"\x02", b"\0", b"\x01\x04"]), min_size=1, max_size=4))
def test_random_auth_data_raises_only_protocol_errors(data: list[bytes]) -> None:
    key = None
    servers: list[a.ServerAuth] = [
        a.NativePasswordServerAuth("u", "h", a.native_password_hash("pw")),
        a.CachingSha2ServerAuth("u", "h", a.caching_sha2_digest("pw"), tls=True, cached=False),
        a.CachingSha2ServerAuth("u", "h", a.caching_sha2_digest("pw"), tls=False, private_key=key, cached=False),
    ]
    for server in servers:
        plugin, _ = server.start()
        try:
            server.step(data[0], plugin)
            for more in data[1:]:
                server.step(more)
        except ProtocolError:
            pass
    for plugin in ("mysql_native_password", "caching_sha2_password"):
        client = a.BackendAuthenticator("u", "pw")
        client.start(plugin, b"x" * 20)
        try:
            for payload in data:
                client.respond(payload)
        except ProtocolError:
            pass


# --- huge or lying lengths and counts -------------------------------------------------------------------


def test_a_huge_length_does_not_allocate() -> None:
    tracemalloc.start()
    try:
        reader = PacketReader()
        reader.feed(h("ff ff ff 00 01 02"))
        assert reader.next_packet() is None
        tracker = ResponseTracker(c.COM_QUERY, 0)
        scanner = PacketScanner()
        for payload in (b"\x01", column_def("a"), eof()):
            scanner.scan(encode_packet(1, payload), tracker)
        # A 16 MiB row announced, 2 bytes of it present: skipped by arithmetic.
        assert scanner.scan(h("ff ff ff 04 fe 00"), tracker) == 6
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("payload", "capabilities"),
    [
        (h("fe ffffffffffffffff"), 0),  # a lenenc string of 2**64 - 1 bytes
        (h("03 fe ffffffffffffff7f 01 00"), k.CLIENT_QUERY_ATTRIBUTES),  # 2**63 query attributes
        (h("03 fd ffffff 01 00"), k.CLIENT_QUERY_ATTRIBUTES),
        (h("11 75 00 00 00 00 00 fe ffffffffffffff7f"), COMMAND_CAPS),  # COM_CHANGE_USER attributes
        (h("00 00 00 02 40 00 00 00 fe ffffffffffffff7f"), k.CLIENT_SESSION_TRACK),  # session state info
    ],
)
def test_lying_lengths_fail_fast_without_allocating(payload: bytes, capabilities: int) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for decode in DECODERS:
            try:
                decode(payload, capabilities)
            except ProtocolError:
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5
    assert peak < 64 * 1024


def test_a_huge_column_count_is_refused() -> None:
    with pytest.raises(ProtocolError):
        ResponseTracker(c.COM_QUERY, 0).feed(h("fe ffffffffffffff7f"))


@pytest.mark.parametrize("command", sorted(UNTRACKABLE_COMMANDS))
def test_untrackable_commands_raise_protocol_errors(command: int) -> None:
    with pytest.raises(ProtocolError):
        ResponseTracker(command, 0)


# --- PacketScanner against PacketReader --------------------------------------------------------------


class WantAll:
    def __init__(self) -> None:
        self.done = False
        self.payloads: list[bytes] = []

    def want(self, first: int, length: int) -> bool:
        return True

    def packet(self, payload: bytes) -> None:
        self.payloads.append(payload)


@FUZZ
@given(payloads=st.lists(st.binary(max_size=30), max_size=8), cuts=st.lists(st.integers(1, 11), min_size=1))
def test_scanner_and_reader_agree_whatever_the_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_packet(i & 0xFF, payload) for i, payload in enumerate(payloads))
    sink = WantAll()
    scanner = PacketScanner()
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        assert scanner.scan(stream[pos : pos + step], sink) == len(stream[pos : pos + step])
        pos += step
        i += 1
    assert sink.payloads == payloads
    assert scanner.at_boundary
    reader = PacketReader()
    reader.feed(stream)
    got = []
    while (packet := reader.next_packet()) is not None:
        got.append(packet[1])
    assert got == payloads
