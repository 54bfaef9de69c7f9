"""An idle (parked) server connection that the server terminated is not usable any more."""

from __future__ import annotations

import socket

from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.relay.net import RawConn


def test_a_parked_backend_that_sent_fatal_and_closed_counts_as_closed() -> None:
    # pg_terminate_backend on an idle backend: the server sends FATAL 57P01, then closes. The
    # proxy's side sits in CLOSE-WAIT with those bytes unread; reusing it fails at once.
    ours, server = socket.socketpair()
    with ours, server:
        server.sendall(m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
        server.close()
        assert RawConn(ours).peer_closed()
