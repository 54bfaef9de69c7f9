"""Connection limits: the counts (per endpoint, per user, in total) and how a login is refused over
them (PostgreSQL FATAL 53300 after the StartupMessage, an SSLRequest answered first; cancel requests
and the admin console never counted; the user's limit only after authentication; MySQL ERR 1040
in place of the greeting)."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from endpoint_proxy.config import Address, ClusterConfig, EndpointConfig, UserConfig, parse_config
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.auth import BackendAuthenticator
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.protocol.pg.startup import encode_cancel_request
from endpoint_proxy.relay.net import RawConn, StreamConn
from endpoint_proxy.server.admission import Admission, Refusal, Ticket
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.server.mysql import login as my_login
from endpoint_proxy.server.pg import login as pg_login
from endpoint_proxy.server.session.context import CONSOLE_DATABASE, CancelRegistry, SessionContext

EP = EndpointConfig(name="w", listen=Address("127.0.0.1", 1), kind="writer", max_client_connections=2)
OTHER = EndpointConfig(name="r", listen=Address("127.0.0.1", 2), kind="reader")
APP = UserConfig(name="app", password="app-secret", max_connections=1)
FREE = UserConfig(name="free", password="x")


# --- the counts -------------------------------------------------------------------------------------


def test_an_endpoint_limit() -> None:
    admission = Admission()
    first, second = admission.admit("c", EP), admission.admit("c", EP)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert admission.admit("c", EP) == Refusal("endpoint", 2, "w")
    assert isinstance(admission.admit("c", OTHER), Ticket)  # other endpoints are not affected
    assert isinstance(admission.admit("other-cluster", EP), Ticket)  # nor the same name elsewhere
    first.release()
    assert isinstance(admission.admit("c", EP), Ticket)  # a freed place is usable again


def test_the_process_limit_counts_every_endpoint() -> None:
    admission = Admission(max_total=2)
    assert isinstance(admission.admit("c", OTHER), Ticket)
    assert isinstance(admission.admit("d", OTHER), Ticket)
    assert admission.admit("c", EP) == Refusal("server", 2, "")
    assert admission.total == 2


def test_a_user_limit_and_change_user() -> None:
    admission = Admission()
    first = admission.ticket("c")
    assert first.admit(OTHER) is None and first.admit_user(APP) is None
    assert first.admit_user(APP) is None  # again: counted once
    second = admission.ticket("c")
    assert second.admit(OTHER) is None
    assert second.admit_user(APP) == Refusal("user", 1, "app")
    assert second.admit_user(FREE) is None  # no limit
    assert admission.ticket("d").admit_user(APP) is None  # per cluster
    assert second.admit_user(APP) == Refusal("user", 1, "app")  # refused: second still counts "free"
    assert second.user == "free"
    first.admit_user(FREE)  # COM_CHANGE_USER: the count moves to the new user
    assert second.admit_user(APP) is None
    assert dict(admission.per_user) == {("c", "free"): 1, ("c", "app"): 1, ("d", "app"): 1}


def test_release_is_idempotent_and_exact() -> None:
    admission = Admission(max_total=5)
    ticket = admission.ticket("c")
    ticket.release()  # never admitted: nothing to undo
    assert ticket.admit(EP) is None and ticket.admit(EP) is None  # admitted once
    ticket.admit_user(APP)
    ticket.release()
    ticket.release()
    assert (admission.total, dict(admission.per_endpoint), dict(admission.per_user)) == (0, {}, {})


def test_what_a_refusal_says() -> None:
    assert Refusal("user", 3, "app").pg_message == 'too many connections for role "app" (max_connections = 3)'
    assert Refusal("endpoint", 9, "w").pg_message == \
        'too many connections to endpoint "w" (max_client_connections = 9)'
    assert Refusal("server", 7, "").pg_message.startswith("too many connections to the proxy")
    assert Refusal("server", 7, "").mysql_error == (1040, "08004", "Too many connections")
    assert Refusal("endpoint", 7, "w").mysql_error == (1040, "08004", "Too many connections")
    assert Refusal("user", 1, "app").mysql_error == (
        1203, "42000", "User app already has more than 'max_user_connections' active connections")


# --- PostgreSQL logins ---------------------------------------------------------------------------------

def cluster_config(endpoint_limit: int) -> ClusterConfig:
    return parse_config({"clusters": [{
        "name": "c", "protocol": "postgresql",
        "users": [{"name": "app", "password": "app-secret", "max_connections": 1}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 1}],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:1", "kind": "writer",
                       "max_client_connections": endpoint_limit}],
    }]}).clusters[0]


class Harness:
    def __init__(self, endpoint_limit: int = 1) -> None:
        self.config = cluster_config(endpoint_limit)
        self.cluster = ClusterRuntime(self.config, ProxyMetrics().cluster("c"))
        self.admission = Admission()
        self.cancels: list[Any] = []
        self.consoles = 0

    def context(self) -> SessionContext:
        async def cancel(request: Any, source: str | None) -> bool:
            self.cancels.append(request)
            return True

        async def console(*args: Any) -> None:
            self.consoles += 1

        return SessionContext(cluster=self.cluster, endpoint=self.config.endpoints[0], tls_context=None,
                              cancels=CancelRegistry(), startup_timeout_s=5, max_startup_bytes=10_000,
                              max_message_bytes=1 << 20, connect_timeout_s=1, cancel_handler=cancel,
                              console=console)

    def fill_endpoint(self) -> None:
        assert isinstance(self.admission.admit("c", self.config.endpoints[0]), Ticket)

    def errors(self) -> float | None:
        return self.cluster.metrics._metrics.registry.get_sample_value(
            "endpoint_proxy_errors_total", {"cluster": "c", "kind": "connection_limit"})


def startup(user: str = "app", database: str = "app") -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user), ("database", database)))
    body = (196608).to_bytes(4, "big") + body + b"\0"
    return (len(body) + 4).to_bytes(4, "big") + body


SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")


async def run_login(h: Harness, ticket: Ticket, sent: bytes, *, password: str | None = None) -> tuple[Any, bytes]:
    """Run the PostgreSQL login with what the client sends; returns (its outcome, what the client got)."""
    ours, theirs = socket.socketpair()  # a plain connection (a memory stream would count as TLS)
    ours.setblocking(False)
    server = RawConn(ours)
    client = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    holder = SimpleNamespace(client=server, ticket=ticket)
    got = bytearray()
    outcome: list[Any] = []

    async def serve() -> None:
        try:
            outcome.append(await pg_login.login(h.context(), holder, structlog.get_logger()))  # type: ignore[arg-type]
        except pg_login.Fatal as e:
            outcome.append(e)
        await server.aclose()

    async def answer_auth() -> None:
        auth = BackendAuthenticator("app", password)
        reader = FrameReader()
        while not auth.done:
            data = await client.receive_some(65536)
            if not data:
                return
            reader.feed(data)
            while (msg := reader.next_message()) is not None:
                decoded = m.decode_backend(*msg)
                if isinstance(decoded, m.Authentication):
                    reply = auth.respond(decoded)
                    if reply is not None:
                        await client.send_all(reply)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            if sent.startswith(SSL_REQUEST):  # as libpq: wait for the answer before going on
                await client.send_all(SSL_REQUEST)
                got += await client.receive_some(1)
                sent = sent[len(SSL_REQUEST):]
            await client.send_all(sent)
            if password is not None:
                await answer_auth()
            while data := await client.receive_some(65536):
                got += data
    await client.aclose()
    return outcome[0], bytes(got)


async def test_over_the_endpoint_limit_a_client_gets_53300_after_its_startup() -> None:
    h = Harness()
    h.fill_endpoint()
    ticket = h.admission.ticket("c")
    fatal, got = await run_login(h, ticket, SSL_REQUEST + startup())
    assert got == b"N"  # the SSLRequest got its one-byte answer first
    assert isinstance(fatal, pg_login.Fatal) and fatal.sqlstate == "53300"
    assert str(fatal) == 'too many connections to endpoint "w" (max_client_connections = 1)'
    assert not ticket.admitted and h.admission.total == 1 and h.errors() == 1


async def test_a_cancel_request_and_the_console_are_never_refused() -> None:
    h = Harness()
    h.fill_endpoint()
    cancel = encode_cancel_request(42, 7)
    login, _ = await run_login(h, h.admission.ticket("c"), cancel)
    assert isinstance(login, pg_login.Login) and login.startup is None and len(h.cancels) == 1
    login, _ = await run_login(h, h.admission.ticket("c"), startup(user="admin", database=CONSOLE_DATABASE))
    assert isinstance(login, pg_login.Login) and login.console is not None
    assert h.admission.total == 1


async def test_the_user_limit_applies_after_authentication() -> None:
    h = Harness(endpoint_limit=0)
    first = h.admission.ticket("c")
    login, _ = await run_login(h, first, startup(), password="app-secret")
    assert isinstance(login, pg_login.Login) and login.user is not None and first.user == "app"
    wrong = h.admission.ticket("c")
    fatal, _ = await run_login(h, wrong, startup(), password="wrong")
    assert isinstance(fatal, pg_login.Fatal) and fatal.sqlstate == "28P01"  # a guess learns nothing
    second = h.admission.ticket("c")
    fatal, _ = await run_login(h, second, startup(), password="app-secret")
    assert isinstance(fatal, pg_login.Fatal) and fatal.sqlstate == "53300"
    assert str(fatal) == 'too many connections for role "app" (max_connections = 1)'
    assert second.user is None and h.errors() == 1
    first.release()
    login, _ = await run_login(h, h.admission.ticket("c"), startup(), password="app-secret")
    assert isinstance(login, pg_login.Login)


# --- MySQL ---------------------------------------------------------------------------------------------


async def test_a_mysql_client_over_the_limit_gets_1040_in_place_of_the_greeting() -> None:
    h = Harness()
    h.fill_endpoint()
    client, server = trio.testing.memory_stream_pair()
    refusal = h.admission.admit("c", h.config.endpoints[0])
    assert isinstance(refusal, Refusal)
    await my_login.refuse(StreamConn(server), refusal)
    got = b""
    while data := await client.receive_some(65536):
        got += data
    assert got == bytes((len(got) - 4, 0, 0, 0)) + b"\xff" + (1040).to_bytes(2, "little") + b"#08004" \
        + b"Too many connections"
    # And a session's own login (no accept-time check) refuses before sending anything.
    holder = SimpleNamespace(client=StreamConn(trio.testing.memory_stream_pair()[1]), ticket=h.admission.ticket("c"))
    with pytest.raises(my_login.Fatal) as info:
        await my_login.login(h.context(), holder, structlog.get_logger(),  # type: ignore[arg-type]
                             connection_id=1, server_version=None)
    assert (info.value.errno, info.value.seq, str(info.value)) == (1040, 0, "Too many connections")
