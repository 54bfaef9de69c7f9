"""A backend terminated while the client waits on a request that ends with Flush (no Sync):
the client must get an answer (an error, or its connection closed), never silence."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time

import asyncpg
import pytest

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.protocol.pg.startup import encode_startup_message
from tests.fixtures.pgwire import open_socket, read_until_ready
from tests.fixtures.proxy import ProxyProcess

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("endpoint", ["writer", "rw"])
def test_a_backend_terminated_under_a_flushed_prepare_does_not_leave_the_client_waiting(
        pg_cluster: PostgresCluster, pg_proxy: ProxyProcess, endpoint: str) -> None:
    primary = pg_cluster.primary_name
    pg_cluster.sql(primary, "create table if not exists wedge_locked (n int)", user=pg_cluster.app_user)
    app = f"wedge_prepare_{endpoint}"

    async def main() -> None:
        locker = await asyncpg.connect(pg_cluster.dsn(primary), timeout=10)
        client = await asyncpg.connect(host="127.0.0.1", port=pg_proxy.port(endpoint), user=pg_cluster.app_user,
                                       password=pg_cluster.app_password, database=pg_cluster.database, ssl=False,
                                       timeout=10, server_settings={"application_name": app})
        try:
            # The Parse needs a lock the locker holds: the backend sits on it, its answer owed.
            await locker.execute("begin; lock table wedge_locked in access exclusive mode")
            # asyncpg prepares with Parse, Describe, Flush and waits for the answers.
            prepare = asyncio.create_task(client.prepare("insert into wedge_locked values ($1)"))
            pid = None
            async with asyncio.timeout(10):
                while pid is None:
                    pid = await locker.fetchval(
                        "select pid from pg_stat_activity where application_name = $1 and wait_event_type = 'Lock'",
                        app)
                    await asyncio.sleep(0.02)
            assert await locker.fetchval("select pg_terminate_backend($1)", pid)
            # Straight at the server the client sees FATAL 57P01 and its connection close.
            try:
                async with asyncio.timeout(10):
                    await prepare
            except TimeoutError:  # (an OSError too: caught first)
                pytest.fail("the client still waits for its answer 10 s after its backend was terminated")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                pass
        finally:
            await locker.execute("rollback")
            await locker.close()
            client.terminate()

    asyncio.run(main())


def _login(proxy: ProxyProcess, endpoint: str) -> socket.socket:
    """Log in as md5user by hand on ``endpoint``; returns the socket after ReadyForQuery."""
    s = open_socket(proxy, endpoint)
    s.settimeout(10)
    s.sendall(encode_startup_message({"user": "md5user", "database": "app"}))
    reader = FrameReader()
    while (msg := reader.next_message()) is None:
        reader.feed(s.recv(65536))
    request = m.decode_backend(*msg)
    assert isinstance(request, m.AuthenticationMD5Password)
    inner = hashlib.md5(b"md5-secret" + b"md5user").hexdigest().encode()
    s.sendall(m.PasswordMessage("md5" + hashlib.md5(inner + request.salt).hexdigest()).encode())
    while True:
        while (msg := reader.next_message()) is not None:
            if isinstance(m.decode_backend(*msg), m.ReadyForQuery):
                return s
        data = s.recv(65536)
        assert data, "proxy closed the connection during login"
        reader.feed(data)


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_readwrite_routes_a_request_whose_first_message_arrives_in_pieces(pg_proxy: ProxyProcess, cut: int) -> None:
    """A read whose first message is cut by the network before its end: the routing decision
    must wait for the whole message, and every byte of the request go to the one backend."""
    s = _login(pg_proxy, "rw")
    with s:
        for n in range(3):
            query = m.Query(f"select {n} + 1 as v").encode()
            s.sendall(query[:cut])
            time.sleep(0.2)  # the proxy reads the first piece on its own
            s.sendall(query[cut:])
            try:
                got = read_until_ready(s, timeout=10)
            except TimeoutError:
                pytest.fail(f"no answer 10 s after a query cut after {cut} bytes")
            rows = [msg for msg in got if isinstance(msg, m.DataRow)]
            assert [r.values for r in rows] == [(str(n + 1).encode(),)], got
