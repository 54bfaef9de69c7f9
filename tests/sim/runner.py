"""Running cases under the simulator: one trio run per test on a mock clock, many sessions in it.

A case opens one client connection through the real session shell, runs a flow, ends it, and
checks that the session let go of everything (``Sim.sessions_done``). Every wait is bounded in
virtual time: a session that hangs fails its case at once, at no wall-time cost (the mock
clock jumps to the bound when nothing can run).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import trio
import trio.testing

from .net import BYTEWISE, Delivery, random_sizes, split_at

T = TypeVar("T")
BOUND_S = 60.0  # virtual seconds a case may take; more is a hang


def run(main: Callable[[], Awaitable[T]], *, threshold: float = 0.0) -> T:
    """``main`` in a trio run on a mock clock that jumps when every task is blocked for
    ``threshold`` real seconds (0: at once; more when a worker thread may be running)."""
    result: list[T] = []

    async def wrapped() -> None:
        result.append(await main())

    trio.run(wrapped, clock=trio.testing.MockClock(autojump_threshold=threshold))
    return result[0]


async def until(predicate: Callable[[], bool], what: str, bound_s: float = 10.0) -> None:
    """Poll (in virtual time) until ``predicate`` holds."""
    with trio.move_on_after(bound_s):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


# Over sockets and the relay hub a case costs about three times as much (a socket pair per
# connection, a pump polling for the proxy's read): the sweeps take every STRIDE-th offset there.
STRIDE = {"memory": 1, "hub": 4}


def splits(start: int, end: int, *, seeds: int = 3, high: int = 32) -> Iterator[Delivery]:
    """One cut at every offset in [start, end) (every STRIDE-th over the hub), then one byte at
    a time, then random sizes."""
    from .cluster import Sim

    for k in range(max(1, start), end, STRIDE[Sim.transport]):
        yield split_at(k)
    yield BYTEWISE
    for seed in range(seeds):
        yield random_sizes(seed, 1, high)


def sample(deliveries: list[Delivery], n: int, seed: int = 0) -> list[Delivery]:
    """At most ``n`` of ``deliveries`` (all of them when there are fewer), in order."""
    if len(deliveries) <= n:
        return deliveries
    keep = sorted(random.Random(seed).sample(range(len(deliveries)), n))
    return [deliveries[i] for i in keep]


@contextlib.contextmanager
def bounded(what: Callable[[], str], **deliveries: Delivery) -> Iterator[None]:
    """Bound a case in virtual time; on a hang, say how the streams were cut and ``what()``."""
    try:
        with trio.fail_after(BOUND_S):
            yield
    except trio.TooSlowError:
        how = ", ".join(f"{name} {d.describe()}" for name, d in deliveries.items())
        raise AssertionError(f"hung ({how}); {what()}") from None
