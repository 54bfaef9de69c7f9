"""Is anybody taking a listener's connections? The accept queue's length against accept progress.

A proxy once wedged with a listening socket registered in epoll with no events armed: no
accept task woke, connections piled up in the kernel's accept queue, and everything else
(the topology, the admin server) looked fine. ``AcceptWatch`` turns that into a liveness
failure: a listener whose queue has not been empty since an observation at least
``stuck_after_s`` ago, with no accept in between, is stuck. One observation alone never
judges (a connection may have arrived a microsecond ago), so the first look only records.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass

# struct tcp_info (linux/tcp.h): eight u8 fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked... On a LISTEN socket, tcpi_unacked is the accept queue's current length
# and tcpi_sacked its maximum (the listen() backlog).
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_UNACKED_OFFSET = 24


def accept_backlog(sock: socket.socket) -> int | None:
    """Connections waiting in a listening socket's accept queue, or None where the kernel
    does not say (not Linux, or the socket is closed)."""
    if _TCP_INFO is None or not sys.platform.startswith("linux"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _UNACKED_OFFSET + 4:
        return None
    return int(struct.unpack_from("=I", info, _UNACKED_OFFSET)[0])


@dataclass
class AcceptWatch:
    """Per listener: the accept loop bumps ``accepted``; ``observe`` judges, fed the backlog
    and the time (pure: no socket, no clock)."""

    stuck_after_s: float = 5.0
    accepted: int = 0
    _since: float | None = None  # when the queue was first seen non-empty (and not drained since)
    _accepted_then: int = 0

    def observe(self, backlog: int | None, now: float) -> bool:
        """True when the listener is stuck: its queue has held connections since at least
        ``stuck_after_s`` ago and none was accepted in that time."""
        if not backlog or self.accepted != self._accepted_then:
            # Empty, or progress since the last look: start over from here.
            self._since = now if backlog else None
            self._accepted_then = self.accepted
            return False
        if self._since is None:
            self._since = now
            return False
        return now - self._since >= self.stuck_after_s
