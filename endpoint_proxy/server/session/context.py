"""What a session needs from the process around it, and the cancel keys it hands out."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ...config import Address, EndpointConfig
from ...protocol.pg.framing import FrameReader
from ...protocol.pg.startup import CancelRequest, StartupMessage
from ...relay.hub import Hub
from ...relay.net import Conn, Dialer, connect_tcp

if TYPE_CHECKING:
    from ..cluster import ClusterRuntime

# A PostgreSQL client that asks for this database gets the admin console, not a server.
CONSOLE_DATABASE: Final = "endpoint_proxy"

# Serves the admin console on a client connection: (client, startup, reader, buffer, auth timeout).
ConsoleHandler = Callable[[Conn, StartupMessage, FrameReader, bytearray, float], Awaitable[None]]


@dataclass(frozen=True)
class CancelTarget:
    address: Address
    process_id: int
    secret_key: int


class CancelRegistry:
    """Maps the (pid, secret) pairs the proxy handed to clients to the backends they name.

    The secret's low bits carry the worker index, so a cancel that lands on another worker
    process can be forwarded to the worker that owns the session.
    """

    def __init__(self, worker_index: int = 0, worker_bits: int = 6) -> None:
        self.worker_index = worker_index
        self.worker_bits = worker_bits
        self._targets: dict[tuple[int, int], CancelTarget] = {}

    def issue(self, process_id: int, target: CancelTarget) -> int:
        while True:
            secret = (secrets.randbits(32 - self.worker_bits) << self.worker_bits) | self.worker_index
            if (process_id, secret) not in self._targets:
                self._targets[(process_id, secret)] = target
                return secret

    def withdraw(self, process_id: int, secret: int) -> None:
        self._targets.pop((process_id, secret), None)

    def retarget(self, process_id: int, secret: int, target: CancelTarget) -> None:
        """The session moved to another backend: its client-visible key now cancels there."""
        if (process_id, secret) in self._targets:
            self._targets[(process_id, secret)] = target

    def lookup(self, process_id: int, secret: int) -> CancelTarget | None:
        return self._targets.get((process_id, secret))

    def owner_of(self, secret: int) -> int:
        return secret & ((1 << self.worker_bits) - 1)


class SessionContext:
    """What a session needs from the process around it."""

    def __init__(self, *, cluster: ClusterRuntime, endpoint: EndpointConfig,
                 tls_context: ssl.SSLContext | None, cancels: CancelRegistry,
                 startup_timeout_s: float, max_startup_bytes: int, max_message_bytes: int,
                 connect_timeout_s: float,
                 cancel_handler: Callable[[CancelRequest], Awaitable[None]] | None = None,
                 console: ConsoleHandler | None = None, hub: Hub | None = None,
                 dial: Dialer = connect_tcp) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.tls_context = tls_context
        self.cancels = cancels
        self.startup_timeout_s = startup_timeout_s
        self.max_startup_bytes = max_startup_bytes
        self.max_message_bytes = max_message_bytes
        self.connect_timeout_s = connect_timeout_s
        self.cancel_handler = cancel_handler
        self.console = console
        self.hub = hub  # relays sessions in steady state (raw sockets both ways)
        self.dial = dial  # opens session backends (tests: an in-memory network)
