"""PostgreSQL cancel keys: random in all 32 bits (but a peer id), and a limit on guessing them."""

from __future__ import annotations

from endpoint_proxy.app import CancelLimiter
from endpoint_proxy.config import Address
from endpoint_proxy.server.session.context import CancelRegistry, CancelTarget

TARGET = CancelTarget(Address("127.0.0.1", 5432), 1, 2)


def test_keys_use_all_32_bits_without_peers() -> None:
    for worker in (0, 3):
        registry = CancelRegistry(worker, worker_bits=0)
        keys = [registry.issue(1000 + i, TARGET) for i in range(2000)]
        ored = 0
        anded = 0xFFFFFFFF
        for k in keys:
            ored |= k
            anded &= k
        assert ored == 0xFFFFFFFF and anded == 0  # no bit is fixed (a worker index, say)


def test_with_peers_only_the_peer_id_is_fixed() -> None:
    registry = CancelRegistry(0, worker_bits=0, peer_id=7)
    keys = [registry.issue(i, TARGET) for i in range(2000)]
    assert {k & 0xFF for k in keys} == {7}
    ored = 0
    for k in keys:
        ored |= k
    assert ored >> 8 == 0xFFFFFF


def test_a_key_known_without_a_server_connection() -> None:
    registry = CancelRegistry(0, worker_bits=0)
    secret = registry.issue(5, None)  # transaction pooling: nothing borrowed now
    assert registry.known(5, secret) and registry.lookup(5, secret) is None
    assert not registry.known(5, secret ^ 1)


def test_the_limiter_blocks_a_source_that_guesses_and_forgets_it_later() -> None:
    limiter = CancelLimiter(limit=3, window_s=60)
    for t in range(3):
        assert not limiter.blocked("10.0.0.1", float(t))
        limiter.unknown("10.0.0.1", float(t))
    assert limiter.blocked("10.0.0.1", 10.0)
    assert not limiter.blocked("10.0.0.2", 10.0)  # others are not affected
    assert not limiter.blocked("10.0.0.1", 63.0)  # the window has passed


def test_the_limiters_table_stays_bounded() -> None:
    limiter = CancelLimiter(limit=3, window_s=60, max_sources=100)
    for i in range(1000):
        limiter.unknown(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._seen) <= 100
