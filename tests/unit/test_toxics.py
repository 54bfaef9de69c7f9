"""Toxics on a server connection (relay.toxics) over memory streams, on trio's mock clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from endpoint_proxy.drills.faults import Toxics
from endpoint_proxy.relay.net import StreamConn
from endpoint_proxy.relay.toxics import ToxicConn


class Source:
    """The toxics in force, changed by the test while the connection is open."""

    def __init__(self, toxics: Toxics | None = None) -> None:
        self.toxics = toxics

    def __call__(self) -> Toxics | None:
        return self.toxics


def pair(toxics: Toxics | None = None, seed: int = 1) -> tuple[ToxicConn, trio.abc.Stream, Source]:
    """(the proxy's side, wrapped; the server's side; the source of toxics)."""
    proxy_side, server_side = trio.testing.memory_stream_pair()
    source = Source(toxics)
    return ToxicConn(StreamConn(proxy_side), source, rng=random.Random(seed), read_ahead=True), server_side, source


async def read_all(conn: ToxicConn, size: int = 65536) -> list[tuple[float, bytes]]:
    """Every piece the proxy receives until end of stream, with the time it arrived."""
    out: list[tuple[float, bytes]] = []
    buf = bytearray(size)
    while n := await conn.recv_into(buf):
        out.append((trio.current_time(), bytes(buf[:n])))
    return out


async def serve(server: trio.abc.Stream, pieces: list[tuple[float, bytes]]) -> None:
    """Send each piece at its time, then close."""
    for at, data in pieces:
        await trio.sleep_until(at)
        await server.send_all(data)
    await server.aclose()


async def test_no_toxics_is_a_pass_through(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, [(0.0, b"hello"), (1.0, b"world")])
        got = await read_all(conn)
    assert got == [(0.0, b"hello"), (1.0, b"world")]


async def test_latency_delays_every_piece_and_pipelines_them(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(latency_ms=50))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, [(0.0, b"a"), (0.01, b"b"), (0.2, b"c")])
        got = await read_all(conn)
    # "b" arrived while "a" waited: it leaves 50 ms after its own arrival, not after "a" left.
    assert [(round(t, 3), d) for t, d in got] == [(0.05, b"a"), (0.06, b"b"), (0.25, b"c")]


async def test_jitter_stays_within_its_bounds(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(latency_ms=100, jitter_ms=20), seed=5)
    pieces = [(i * 1.0, bytes([65 + i])) for i in range(20)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, pieces)
        got = await read_all(conn)
    delays = [t - sent for (t, _), (sent, _) in zip(got, pieces, strict=True)]
    assert all(0.08 - 1e-9 <= d <= 0.12 + 1e-9 for d in delays)
    assert len({round(d, 4) for d in delays}) > 5  # it does vary
    assert b"".join(d for _, d in got) == b"".join(d for _, d in pieces)


async def test_bandwidth_holds_both_directions_to_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(bytes_per_second=10_000))
    payload = bytes(range(256)) * 20  # 5120 bytes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, [(0.0, payload)])
        got = await read_all(conn)
    assert b"".join(d for _, d in got) == payload
    assert max(len(d) for _, d in got) <= 1000  # a tenth of a second's worth at a time
    assert 0.45 <= got[-1][0] <= 0.55

    conn, server, _ = pair(Toxics(bytes_per_second=10_000))
    received = bytearray()

    async def drain() -> None:
        while chunk := await server.receive_some():
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        start = trio.current_time()
        await conn.send_all(payload)
        took = trio.current_time() - start
        await conn.aclose()
    assert bytes(received) == payload
    assert 0.45 <= took <= 0.55


async def test_slicer_delivers_small_pieces_with_delays(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(slice_size=4, slice_delay_ms=10))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, [(0.0, b"0123456789abcdefghij")])
        got = await read_all(conn)
    assert [d for _, d in got] == [b"0123", b"4567", b"89ab", b"cdef", b"ghij"]
    assert [round(t, 3) for t, _ in got] == [0.0, 0.01, 0.02, 0.03, 0.04]


async def test_slicer_variation(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(slice_size=8, slice_variation=3, slice_delay_ms=0), seed=9)
    payload = bytes(200)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, [(0.0, payload)])
        got = await read_all(conn)
    sizes = [len(d) for _, d in got]
    assert sum(sizes) == 200 and all(5 <= n <= 11 for n in sizes[:-1]) and len(set(sizes)) > 2


async def test_reset_after_a_while_even_while_waiting(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(reset_after_ms=100, reset_since=0.0))
    buf = bytearray(100)
    with pytest.raises(ConnectionResetError, match="injected fault"):
        await conn.recv_into(buf)  # the server never answers: the reset comes at 100 ms
    assert trio.current_time() == pytest.approx(0.1)
    assert conn.was_reset and conn.closed
    assert await server.receive_some() == b""  # the server sees the connection go


async def test_reset_counts_from_the_fault_start_for_older_connections(
        autojump_clock: trio.testing.MockClock) -> None:
    conn, server, source = pair(None)
    await trio.sleep(5)  # the connection is five seconds old when the fault starts
    source.toxics = Toxics(reset_after_ms=1000, reset_since=trio.current_time())
    await conn.send_all(b"still fine")
    assert await server.receive_some() == b"still fine"
    await trio.sleep(1)
    with pytest.raises(ConnectionResetError):
        await conn.send_all(b"too late")


async def test_instance_failure_resets_at_the_next_call(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, source = pair(None)
    await server.send_all(b"x")
    assert await conn.recv_into(bytearray(10)) == 1
    source.toxics = Toxics(failed=True)
    with pytest.raises(ConnectionResetError):
        await conn.recv_into(bytearray(10))
    with pytest.raises(ConnectionResetError):
        await conn.send_all(b"y")


async def test_a_fault_that_lifts_leaves_a_plain_connection(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, source = pair(Toxics(latency_ms=500))
    await server.send_all(b"slow")
    buf = bytearray(10)
    assert await conn.recv_into(buf) == 4 and trio.current_time() == pytest.approx(0.5)
    source.toxics = None
    await server.send_all(b"fast")
    assert await conn.recv_into(buf) == 4 and trio.current_time() == pytest.approx(0.5)
    assert bytes(buf[:4]) == b"fast"


async def test_end_of_stream_comes_after_the_data_it_followed(autojump_clock: trio.testing.MockClock) -> None:
    conn, server, _ = pair(Toxics(latency_ms=30))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, server, [(0.0, b"last words")])
        got = await read_all(conn)
        closed_at = trio.current_time()
    assert got == [(pytest.approx(0.03), b"last words")]
    assert closed_at == pytest.approx(0.03)
    assert await conn.recv_into(bytearray(4)) == 0  # and stays ended
