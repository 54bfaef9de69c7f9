"""What a session needs from the process around it, and the cancel keys it hands out."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

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


class CancelSource(Protocol):
    """A session whose server connection changes too often to retarget its key each time."""

    def cancel_target(self) -> CancelTarget | None: ...


# With [[peers]], the low bits of a secret name the proxy that issued it (ids 0..255).
PEER_BITS: Final = 8


class CancelRegistry:
    """Maps the (pid, secret) pairs the proxy handed to clients to the backends they name.

    The secret's low bits say where its session lives, so that any proxy process can route a
    cancel: with ``peer_id`` set (``[[peers]]``) the lowest PEER_BITS carry this proxy's id, so
    a cancel that reaches another proxy behind the same load balancer is forwarded here; the
    next ``worker_bits`` carry the worker index, so one that lands on another worker process is
    forwarded to the worker that owns the session. The rest is random.
    """

    def __init__(self, worker_index: int = 0, worker_bits: int = 6, peer_id: int | None = None) -> None:
        self.worker_index = worker_index
        self.worker_bits = worker_bits
        self.peer_id = peer_id
        self.peer_bits = PEER_BITS if peer_id is not None else 0
        # None: the key is the session's, but it has no server connection now. A CancelSource: the
        # session says where when asked (transaction pooling: whichever connection it holds then).
        self._targets: dict[tuple[int, int], CancelTarget | CancelSource | None] = {}

    def issue(self, process_id: int, target: CancelTarget | CancelSource | None) -> int:
        low_bits = self.peer_bits + self.worker_bits
        low = ((self.worker_index & ((1 << self.worker_bits) - 1)) << self.peer_bits) | (self.peer_id or 0)
        while True:
            secret = (secrets.randbits(32 - low_bits) << low_bits) | low
            if (process_id, secret) not in self._targets:
                self._targets[(process_id, secret)] = target
                return secret

    def withdraw(self, process_id: int, secret: int) -> None:
        self._targets.pop((process_id, secret), None)

    def retarget(self, process_id: int, secret: int, target: CancelTarget | None) -> None:
        """The session moved to another backend: its client-visible key now cancels there."""
        if (process_id, secret) in self._targets:
            self._targets[(process_id, secret)] = target

    def known(self, process_id: int, secret: int) -> bool:
        """Whether the key is one of this process's sessions' (with or without a server connection now)."""
        return (process_id, secret) in self._targets

    def lookup(self, process_id: int, secret: int) -> CancelTarget | None:
        target = self._targets.get((process_id, secret))
        if target is None or isinstance(target, CancelTarget):
            return target
        return target.cancel_target()

    def owner_of(self, secret: int) -> int:
        """The worker index a secret of this proxy names."""
        return (secret >> self.peer_bits) & ((1 << self.worker_bits) - 1)

    def peer_of(self, secret: int) -> int | None:
        """The proxy id a secret names (None without peering)."""
        return secret & ((1 << PEER_BITS) - 1) if self.peer_id is not None else None


# (session, the exception a bug raised in it or None)
SessionEnded = Callable[[Any, Exception | None], None]


def _raise_crash(session: Any, error: Exception | None) -> None:
    if error is not None:
        raise error


class SessionContext:
    """What a session needs from the process around it."""

    def __init__(self, *, cluster: ClusterRuntime, endpoint: EndpointConfig,
                 tls_context: ssl.SSLContext | None, cancels: CancelRegistry,
                 startup_timeout_s: float, max_startup_bytes: int, max_message_bytes: int,
                 connect_timeout_s: float,
                 cancel_handler: Callable[[CancelRequest, str | None], Awaitable[bool]] | None = None,
                 console: ConsoleHandler | None = None, hub: Hub | None = None,
                 dial: Dialer = connect_tcp, session_ended: SessionEnded | None = None) -> None:
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
        # Called as a session's task ends (with the exception that ended it, a bug): the proxy's
        # bookkeeping, run from the session's own frame (an idle session is one frame fewer).
        self.session_ended: SessionEnded = session_ended or _raise_crash
