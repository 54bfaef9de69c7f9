"""The simulator's tests log only warnings: thousands of sessions would otherwise print their
attach and loss lines (the sessions run in this process)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog


@pytest.fixture(autouse=True)
def quiet_sessions() -> Iterator[None]:
    old: dict[str, Any] = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**old)


@pytest.fixture(params=["memory", "hub"])
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test over both transports: in-memory connections (the shell's reader tasks) and
    TCP sockets served by the relay hub (the path of every plain-TCP session in production)."""
    from .cluster import Sim

    Sim.transport = request.param
    try:
        yield request.param
    finally:
        Sim.transport = "memory"
