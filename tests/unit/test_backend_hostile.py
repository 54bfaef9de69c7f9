"""Server logins against hostile fake servers: each refusal is a clear error naming the instance,
nothing is sent that should not be, nothing hangs and nothing crashes."""

from __future__ import annotations

import datetime
import json
import ssl
import struct
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from endpoint_proxy.app import Proxy
from endpoint_proxy.config import Address, parse_config
from endpoint_proxy.localcluster.certs import write_self_signed
from endpoint_proxy.protocol.mysql import auth as my_auth
from endpoint_proxy.protocol.mysql.framing import encode_packet
from endpoint_proxy.protocol.mysql.handshake import AuthMoreData, AuthSwitchRequest
from endpoint_proxy.protocol.mysql.packets import OkPacket
from endpoint_proxy.protocol.pg import auth as pg_auth
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.server.backend_security import BackendSecurity, backend_tls_context
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.mysql.backend import MyBackendError, open_my_backend
from endpoint_proxy.server.pg.backend import BackendError, open_backend
from tests.fixtures.hostile import NONCE, FakeConnection, FakeServer, mysql_greeting, start_fake_server

PASSWORD = "n0t-f0r-h0stile-servers"


async def pg_login(server: FakeServer, *, security: BackendSecurity | None = None,
                   credential: pg_auth.PgCredential | None = None, timeout: float = 5) -> object:
    with trio.fail_after(timeout):
        return await open_backend("evil", Address(*server.address), {"database": "app"}, user="app",
                                  credential=credential or pg_auth.PgCredential(password=PASSWORD),
                                  security=security)


def ready() -> bytes:
    return (m.AuthenticationOk().encode() + m.ParameterStatus("server_version", "15.0").encode()
            + m.BackendKeyData(1, 2).encode() + m.ReadyForQuery("I").encode())


def asks(*messages: bytes) -> object:
    async def handler(conn: FakeConnection) -> None:
        await conn.pg_startup()
        for msg in messages:
            await conn.send(msg)
        await conn.read_until_closed()
    return handler


@pytest.mark.parametrize(("request_", "method"), [
    (m.AuthenticationCleartextPassword().encode(), "password"),
    (m.AuthenticationMD5Password(b"salt").encode(), "md5"),
    (ready(), "trust"),
])
async def test_a_method_backend_auth_does_not_allow_is_refused_not_answered(
        nursery: trio.Nursery, request_: bytes, method: str) -> None:
    server = await start_fake_server(nursery, asks(request_))
    with pytest.raises(BackendError) as info:
        await pg_login(server)
    message = str(info.value)
    assert message.startswith(f"instance evil (127.0.0.1:{server.port}): ")
    assert f"({method})" in message and "backend_auth" in message
    assert info.value.raw_error is None  # the instance is at fault, not the account
    await trio.sleep(0.1)
    assert PASSWORD.encode() not in server.connections[0].received
    assert b"md5" not in server.connections[0].received.split(b"\0app\0", 1)[-1]


async def test_an_allowed_cleartext_request_is_answered(nursery: trio.Nursery) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.pg_startup()
        await conn.send(m.AuthenticationCleartextPassword().encode())
        type_, payload = await conn.pg_message()
        assert (type_, payload) == (ord("p"), PASSWORD.encode() + b"\0")
        await conn.send(ready())
        await conn.read_until_closed()

    server = await start_fake_server(nursery, handler)
    backend = await pg_login(server, security=BackendSecurity(auth_methods=("scram-sha-256", "password")))
    assert backend.process_id == 1  # type: ignore[attr-defined]
    await backend.conn.aclose()  # type: ignore[attr-defined]
    assert not server.errors


async def test_trust_when_allowed(nursery: trio.Nursery) -> None:
    server = await start_fake_server(nursery, asks(ready()))
    backend = await pg_login(server, security=BackendSecurity(auth_methods=("trust",)))
    await backend.conn.aclose()  # type: ignore[attr-defined]


async def test_session_data_before_authentication_is_refused(nursery: trio.Nursery) -> None:
    # A server that skips authentication and sends BackendKeyData/ReadyForQuery straight away.
    server = await start_fake_server(nursery, asks(m.BackendKeyData(1, 2).encode() + m.ReadyForQuery("I").encode()))
    with pytest.raises(BackendError, match="before authentication completed"):
        await pg_login(server)


async def test_garbage_after_s(nursery: trio.Nursery) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.pg_startup()
        await conn.send(b"S" + b"\x00garbage, not a TLS record" * 10)
        await conn.read_until_closed()

    server = await start_fake_server(nursery, handler)
    with pytest.raises(BackendError) as info:
        await pg_login(server, security=BackendSecurity(tls_mode="require"))
    assert str(info.value).startswith(f"instance evil (127.0.0.1:{server.port}): TLS handshake failed")


async def test_a_1_gib_length_is_refused_before_it_is_read(nursery: trio.Nursery) -> None:
    # 'R' with a length of 1 GiB, then nothing: waiting for the body would hang (and buffer it).
    server = await start_fake_server(nursery, asks(b"R" + struct.pack("!I", 1 << 30)))
    with pytest.raises(BackendError, match="broke the protocol"):
        await pg_login(server, timeout=2)


async def test_garbage_instead_of_messages(nursery: trio.Nursery) -> None:
    server = await start_fake_server(nursery, asks(b"R\x00\x00\x00\x08\xff\xff\xff\xff"))
    with pytest.raises(BackendError, match="instance evil .*broke the protocol"):
        await pg_login(server)


async def test_a_server_that_never_answers_is_bounded_by_the_caller(nursery: trio.Nursery) -> None:
    hung_up = trio.Event()

    async def silent(conn: FakeConnection) -> None:
        await conn.read_until_closed(timeout=30)
        hung_up.set()

    server = await start_fake_server(nursery, silent)
    with pytest.raises(trio.TooSlowError):
        await pg_login(server, timeout=0.3)
    with trio.fail_after(5):  # the proxy closed its side: no socket is left behind
        await hung_up.wait()


async def test_a_server_without_tls_under_require(nursery: trio.Nursery) -> None:
    for mode in ("require", "verify-ca", "verify-full"):
        server = await start_fake_server(nursery, asks(b"N"))
        with pytest.raises(BackendError, match="does not offer TLS"):
            await pg_login(server, security=BackendSecurity(tls_mode=mode))


async def test_an_impostor_without_the_verifier_fails_scram(nursery: trio.Nursery) -> None:
    # The impostor knows StoredKey (enough to check the proof), not ServerKey.
    real = pg_auth.make_scram_secret(PASSWORD)
    impostor = pg_auth.ScramSecret(real.salt, real.iterations, real.stored_key, b"\x00" * 32)

    async def handler(conn: FakeConnection) -> None:
        await conn.pg_startup()
        auth = pg_auth.ScramServerAuth("app", impostor)
        await conn.send(auth.start())
        for _ in range(2):
            _, payload = await conn.pg_message()
            reply, _ = auth.step(payload)
            await conn.send(reply + (m.ReadyForQuery("I").encode() if _ else b""))
        await conn.read_until_closed()

    server = await start_fake_server(nursery, handler)
    with pytest.raises(BackendError, match="instance evil .*signature"):
        await pg_login(server)


async def test_tls_verify_full_refuses_a_certificate_for_another_name(nursery: trio.Nursery, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.other.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("db.other.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "other.crt", tmp_path / "other.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    trusted_ca, _ = write_self_signed(tmp_path)  # some other CA

    async def tls_then_scram(conn: FakeConnection) -> None:
        await conn.pg_startup()
        await conn.send(b"S")
        await conn.start_tls(server_ctx)
        await conn.pg_startup()
        await conn.send(m.AuthenticationSASL(("SCRAM-SHA-256",)).encode())
        await conn.read_until_closed()

    server = await start_fake_server(nursery, tls_then_scram)
    cluster = parse_config({"clusters": [{
        "name": "c", "protocol": "postgresql", "users": [{"name": "app", "password": "x"}],
        "instances": [{"name": "evil", "host": "127.0.0.1", "port": server.port}],
        "backend_tls": "verify-full", "backend_ca_file": str(cert_file)}]}, {}).clusters[0]
    rt = ClusterRuntime(cluster)
    # The certificate chains to the configured CA but names another host: verify-full refuses.
    with pytest.raises(BackendError, match="TLS handshake failed"):
        await pg_login(server, security=rt.backend_security)
    # verify-ca only checks the chain: the handshake passes (the login goes on to SCRAM).
    ca_only = BackendSecurity(tls_mode="verify-ca", tls_context=backend_tls_context("verify-ca", str(cert_file)))
    with pytest.raises(trio.TooSlowError):
        await pg_login(server, security=ca_only, timeout=1)
    # A CA that did not sign it: refused in both modes.
    other = BackendSecurity(tls_mode="verify-ca", tls_context=backend_tls_context("verify-ca", str(trusted_ca)))
    with pytest.raises(BackendError, match="TLS handshake failed"):
        await pg_login(server, security=other)


# --- MySQL ------------------------------------------------------------------------------------------


async def my_login(server: FakeServer, *, security: BackendSecurity | None = None,
                   credential: my_auth.MyCredential | None = None, timeout: float = 5) -> object:
    with trio.fail_after(timeout):
        return await open_my_backend("evil", Address(*server.address), user="app", database=None,
                                     capabilities=0, character_set=45,
                                     credential=credential or my_auth.MyCredential(password=PASSWORD),
                                     security=security)


def my_script(*replies: bytes, plugin: str = "mysql_native_password") -> object:
    async def handler(conn: FakeConnection) -> None:
        await conn.send(mysql_greeting(plugin))
        await conn.my_packet()  # HandshakeResponse41
        seq = 2
        for reply in replies:
            await conn.send(encode_packet(seq, reply))
            seq += 2
            if reply[:1] in (b"\xfe", b"\x01"):
                await conn.my_packet()
        await conn.read_until_closed()
    return handler


async def test_mysql_local_infile_request_during_login(nursery: trio.Nursery) -> None:
    server = await start_fake_server(nursery, my_script(b"\xfb/etc/passwd"))
    with pytest.raises(MyBackendError) as info:
        await my_login(server)
    assert info.value.message.startswith(f"instance evil (127.0.0.1:{server.port}): ")
    assert info.value.err_payload is None and info.value.errno == 2027


async def test_mysql_huge_packet_is_refused_at_its_header(nursery: trio.Nursery) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.send(b"\xff\xff\xff\x00")  # a 16 MiB fragment header, then nothing
        await conn.read_until_closed()

    server = await start_fake_server(nursery, handler)
    with pytest.raises(MyBackendError, match="instance evil"):
        await my_login(server, timeout=2)


async def test_mysql_silent_server(nursery: trio.Nursery) -> None:
    async def silent(conn: FakeConnection) -> None:
        await conn.read_until_closed(timeout=30)

    server = await start_fake_server(nursery, silent)
    with pytest.raises(trio.TooSlowError):
        await my_login(server, timeout=0.3)


async def test_mysql_clear_password_is_not_sent_without_tls(nursery: trio.Nursery) -> None:
    switch = AuthSwitchRequest("mysql_clear_password", b"").encode()
    server = await start_fake_server(nursery, my_script(switch))
    with pytest.raises(MyBackendError):
        await my_login(server, security=BackendSecurity(auth_methods=my_auth.BACKEND_PLUGINS))
    await trio.sleep(0.1)
    assert PASSWORD.encode() not in server.connections[0].received


async def test_mysql_switch_to_a_plugin_not_allowed(nursery: trio.Nursery) -> None:
    switch = AuthSwitchRequest("caching_sha2_password", NONCE + b"\0").encode()
    server = await start_fake_server(nursery, my_script(switch))
    with pytest.raises(MyBackendError, match="backend_auth"):
        await my_login(server, security=BackendSecurity(auth_methods=("mysql_native_password",)))


def full_auth_server(key_pem: bytes) -> object:
    """caching_sha2_password that always wants full authentication, and offers its key."""
    async def handler(conn: FakeConnection) -> None:
        await conn.send(mysql_greeting("caching_sha2_password"))
        await conn.my_packet()
        await conn.send(encode_packet(2, AuthMoreData(b"\x04").encode()))
        seq, payload = await conn.my_packet()
        if payload == b"\x02":
            await conn.send(encode_packet(seq + 1, AuthMoreData(key_pem).encode()))
            seq, payload = await conn.my_packet()
        await conn.send(encode_packet(seq + 1, OkPacket().encode(0)))
        await conn.read_until_closed()
    return handler


async def test_caching_sha2_full_auth_never_uses_a_key_the_server_sends(nursery: trio.Nursery) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = my_auth.public_key_pem(key)
    server = await start_fake_server(nursery, full_auth_server(pem))
    with pytest.raises(MyBackendError) as info:
        await my_login(server)
    assert info.value.errno == 2061 and "secure connection" in info.value.message
    assert b"\x01\x00\x00\x03\x02" not in server.connections[0].received  # it never asked for the key
    # With the key configured, or retrieval explicitly allowed, the login goes through.
    backend = await my_login(server, security=BackendSecurity(server_public_key=pem))
    await backend.conn.aclose()  # type: ignore[attr-defined]
    backend = await my_login(server, security=BackendSecurity(allow_public_key_retrieval=True))
    await backend.conn.aclose()  # type: ignore[attr-defined]
    assert not server.errors


# --- the whole proxy with hostile instances ----------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_the_proxy_marks_hostile_instances_down_and_stays_up(nursery: trio.Nursery) -> None:
    async def silent(conn: FakeConnection) -> None:
        await conn.read_until_closed(timeout=60)

    async def huge(conn: FakeConnection) -> None:
        await conn.pg_startup()
        await conn.send(b"R" + struct.pack("!I", 1 << 30))
        await conn.read_until_closed()

    servers = {
        "cleartext": await start_fake_server(nursery, asks(m.AuthenticationCleartextPassword().encode())),
        "garbage": await start_fake_server(nursery, asks(b"S" + b"\x00not tls" * 20)),
        "huge": await start_fake_server(nursery, huge),
        "silent": await start_fake_server(nursery, silent),
    }
    def cluster(name: str, instances: list[str], **extra: object) -> dict[str, object]:
        return {
            "name": name, "protocol": "postgresql", "health_check_interval_ms": 100,
            "monitor": {"user": "monitor", "password": PASSWORD},
            "users": [{"name": "app", "password": PASSWORD}],
            "instances": [{"name": n, "host": "127.0.0.1", "port": servers[n].port} for n in instances],
            "endpoints": [{"name": f"{name}_w", "listen": "127.0.0.1:0", "kind": "writer"}],
            **extra,
        }

    config = parse_config({"admin": {"listen": "127.0.0.1:0"}, "clusters": [
        cluster("c", ["cleartext", "huge", "silent"]),
        cluster("t", ["garbage"], backend_tls="require"),  # 'S', then garbage instead of TLS
    ]}, {})
    proxy: Proxy = await nursery.start(Proxy(config).run)
    port = proxy.bound["admin"].port
    wanted = {
        "cleartext": "backend_auth",
        "garbage": "TLS handshake failed",
        "huge": "broke the protocol",
        "silent": "probe timed out",
    }
    with trio.fail_after(15):
        while True:
            _, body = await http_get(port, "/topology")
            instances = {i["name"]: i for c in json.loads(body)["clusters"] for i in c["instances"]}
            if all(wanted[n] in (instances[n]["last_error"] or "") for n in wanted):
                break
            await trio.sleep(0.1)
    for name, inst in instances.items():
        assert inst["health"] == "down", name
        if name != "silent":
            assert inst["last_error"].startswith(f"instance {name} (127.0.0.1:{servers[name].port})"), inst
        assert PASSWORD not in inst["last_error"]
    assert (await http_get(port, "/healthz"))[0] == 200
    # The endpoint still accepts (clients wait for a writer, which never comes).
    endpoint = proxy.bound["c/c_w"]
    stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    await stream.aclose()
    assert PASSWORD.encode() not in servers["cleartext"].connections[0].received
    assert proxy._nursery is not None
    proxy._nursery.cancel_scope.cancel()


def test_a_verifying_mode_without_a_context_verifies_against_the_system_cas() -> None:
    for mode in ("verify-ca", "verify-full"):
        sec = BackendSecurity(tls_mode=mode)
        assert sec.tls_context is not None and sec.tls_context.verify_mode == ssl.CERT_REQUIRED
        assert sec.tls_context.check_hostname is (mode == "verify-full")
    assert BackendSecurity(tls_mode="require").tls_context is None
