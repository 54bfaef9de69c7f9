"""Authentication: full exchanges between the proxy's server and client sides, hand-computed vectors, oracles."""

from __future__ import annotations

import hashlib

import pymysql._auth as pymysql_auth
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import AuthenticationError
from endpoint_proxy.protocol.mysql import auth as a
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import handshake as hs
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.errors import MySQLAuthenticationError, MySQLProtocolError

from .strategies import h

NONCE = b"abcdefghij0123456789"
OK = p.OkPacket(status=2).encode(0)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = a.public_key_pem(KEY)


def sha1(b: bytes) -> bytes:
    return hashlib.sha1(b).digest()


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def xor(x: bytes, y: bytes) -> bytes:
    return bytes(i ^ j for i, j in zip(x, y, strict=True))


def login(server: a.ServerAuth, client: a.BackendAuthenticator, client_first_plugin: str | None = "") -> int:
    """Run a whole login; returns the number of packets the client sent. Raises what either side raises."""
    plugin, nonce = server.start()
    name, response = client.start(plugin, nonce)
    reply, done = server.step(response, name if client_first_plugin == "" else client_first_plugin)
    sent = 1
    while True:
        if done:
            if reply is not None:
                assert client.respond(reply) is None
            assert client.respond(OK) is None
            assert client.done and client.ok == p.OkPacket(status=2)
            return sent
        assert reply is not None
        answer = client.respond(reply)
        assert answer is not None
        sent += 1
        reply, done = server.step(answer)


# --- the hashes, computed by hand -------------------------------------------------------------------


def test_native_scramble_by_hand_and_against_pymysql() -> None:
    expected = xor(sha1(b"secret"), sha1(NONCE + sha1(sha1(b"secret"))))
    assert a.scramble_native_password("secret", NONCE) == expected
    assert a.scramble_native_password("secret", NONCE) == pymysql_auth.scramble_native_password(b"secret", NONCE)
    assert a.native_password_hash("secret") == sha1(sha1(b"secret"))
    assert a.check_native_scramble(expected, NONCE, a.native_password_hash("secret"))
    assert not a.check_native_scramble(expected, NONCE, a.native_password_hash("Secret"))
    assert a.scramble_native_password("", NONCE) == b""


@settings(max_examples=40, deadline=None)
@given(password=st.text(min_size=1, max_size=20), nonce=st.binary(min_size=20, max_size=20))
def test_native_scramble_matches_pymysql(password: str, nonce: bytes) -> None:
    ours = a.scramble_native_password(password, nonce)
    assert ours == pymysql_auth.scramble_native_password(password.encode(), nonce)
    assert a.check_native_scramble(ours, nonce, a.native_password_hash(password))


def test_caching_sha2_scramble_by_hand() -> None:
    stage1 = sha256(b"secret")
    expected = xor(stage1, sha256(sha256(stage1) + NONCE))
    assert a.scramble_caching_sha2("secret", NONCE) == expected
    assert a.scramble_caching_sha2("secret", NONCE) == pymysql_auth.scramble_caching_sha2(b"secret", NONCE)
    assert a.caching_sha2_digest("secret") == sha256(sha256(b"secret"))
    assert a.check_caching_sha2_scramble(expected, NONCE, a.caching_sha2_digest("secret"))
    assert not a.check_caching_sha2_scramble(expected[:-1] + b"x", NONCE, a.caching_sha2_digest("secret"))


def test_rsa_password_decrypts_with_the_test_key() -> None:
    ciphertext = a.rsa_encrypt_password("secret", NONCE, PEM)
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    plain = KEY.decrypt(ciphertext, oaep)
    assert plain == bytes(b ^ NONCE[i % 20] for i, b in enumerate(b"secret\0"))
    assert a.rsa_decrypt_password(ciphertext, NONCE, KEY) == b"secret"
    assert a.rsa_decrypt_password(b"\0" * 256, NONCE, KEY) is None


def test_nonce() -> None:
    nonce = a.make_nonce()
    assert len(nonce) == 20 and b"\0" not in nonce and b"$" not in nonce
    assert a.make_nonce() != nonce


# --- mysql_native_password ------------------------------------------------------------------------


def native(password: str = "secret") -> a.NativePasswordServerAuth:
    return a.NativePasswordServerAuth("app", "10.0.0.9", a.native_password_hash(password), NONCE)


def test_native_login() -> None:
    assert login(native(), a.BackendAuthenticator("app", "secret")) == 1


def test_native_wrong_password() -> None:
    with pytest.raises(MySQLAuthenticationError) as info:
        login(native(), a.BackendAuthenticator("app", "wrong"))
    exc = info.value
    assert isinstance(exc, AuthenticationError)
    assert (exc.errno, exc.sqlstate) == (1045, "28000")
    assert exc.message == "Access denied for user 'app'@'10.0.0.9' (using password: YES)"
    assert p.error_packet(exc)[:4] == h("ff 15 04 23")


def test_native_no_password_given() -> None:
    with pytest.raises(MySQLAuthenticationError, match=r"using password: NO"):
        login(native(), a.BackendAuthenticator("app", None))


def test_native_empty_password_account() -> None:
    assert login(native(""), a.BackendAuthenticator("app", "")) == 1
    with pytest.raises(MySQLAuthenticationError):
        login(native(""), a.BackendAuthenticator("app", "x"))


def test_native_against_pymysql_client_scramble() -> None:
    server = native()
    _, nonce = server.start()
    assert server.step(pymysql_auth.scramble_native_password(b"secret", nonce), "mysql_native_password") == (None, True)


def test_native_server_switches_a_caching_sha2_client() -> None:
    server = native()
    client = a.BackendAuthenticator("app", "secret")
    plugin, nonce = server.start()
    _, first = client.start("caching_sha2_password", nonce)  # a client that prefers sha2
    switch, done = server.step(first, "caching_sha2_password")
    assert not done and switch is not None
    assert hs.decode_auth_switch_request(switch) == hs.AuthSwitchRequest("mysql_native_password", NONCE + b"\0")
    answer = client.respond(switch)
    assert answer == a.scramble_native_password("secret", NONCE)
    assert server.step(answer) == (None, True)


def test_a_client_without_plugin_auth_is_native() -> None:
    assert login(native(), a.BackendAuthenticator("app", "secret"), client_first_plugin=None) == 1
    server = a.CachingSha2ServerAuth("app", "h", a.caching_sha2_digest("x"), tls=True, nonce=NONCE)
    server.start()
    with pytest.raises(MySQLAuthenticationError) as info:
        server.step(b"\1" * 20, None)
    assert info.value.errno == 1251


def test_steps_after_the_end_are_refused() -> None:
    server = native()
    server.start()
    assert server.step(a.scramble_native_password("secret", NONCE), "mysql_native_password") == (None, True)
    with pytest.raises(MySQLProtocolError):
        server.step(b"again")


# --- caching_sha2_password ----------------------------------------------------------------------


def sha2(
    *, tls: bool, cached: bool = True, key: rsa.RSAPrivateKey | None = KEY, password: str = "secret"
) -> a.CachingSha2ServerAuth:
    digest = a.caching_sha2_digest(password)
    return a.CachingSha2ServerAuth("app", "h", digest, tls=tls, private_key=key, cached=cached, nonce=NONCE)


def test_caching_sha2_fast_path() -> None:
    server = sha2(tls=False)
    client = a.BackendAuthenticator("app", "secret")
    plugin, nonce = server.start()
    name, response = client.start(plugin, nonce)
    assert name == "caching_sha2_password" and len(response) == 32
    reply, done = server.step(response, name)
    assert done and reply == h("01 03")
    assert login(sha2(tls=False), a.BackendAuthenticator("app", "secret")) == 1


def test_caching_sha2_fast_path_wrong_password() -> None:
    with pytest.raises(MySQLAuthenticationError, match=r"using password: YES"):
        login(sha2(tls=False), a.BackendAuthenticator("app", "nope"))


def test_caching_sha2_full_path_over_tls_sends_the_password() -> None:
    server = sha2(tls=True, cached=False)
    client = a.BackendAuthenticator("app", "secret", tls=True)
    plugin, nonce = server.start()
    name, response = client.start(plugin, nonce)
    reply, done = server.step(response, name)
    assert reply == h("01 04") and not done
    answer = client.respond(reply)
    assert answer == b"secret\0"
    assert server.step(answer) == (None, True)
    assert login(sha2(tls=True, cached=False), a.BackendAuthenticator("app", "secret", tls=True)) == 2


def test_caching_sha2_full_path_without_tls_requests_the_key_when_allowed() -> None:
    server = sha2(tls=False, cached=False)
    client = a.BackendAuthenticator("app", "secret", allow_public_key_retrieval=True)
    plugin, nonce = server.start()
    name, response = client.start(plugin, nonce)
    reply, _ = server.step(response, name)
    assert reply == h("01 04")
    request = client.respond(reply)
    assert request == h("02")
    key_packet, done = server.step(request)
    assert not done and key_packet == b"\x01" + PEM
    encrypted = client.respond(key_packet)
    assert encrypted is not None and len(encrypted) == 256
    assert a.rsa_decrypt_password(encrypted, NONCE, KEY) == b"secret"
    assert server.step(encrypted) == (None, True)
    assert login(sha2(tls=False, cached=False),
                 a.BackendAuthenticator("app", "secret", allow_public_key_retrieval=True)) == 3


def test_caching_sha2_full_path_never_trusts_a_key_from_the_server_by_default() -> None:
    server = sha2(tls=False, cached=False)
    client = a.BackendAuthenticator("app", "secret")
    plugin, nonce = server.start()
    name, response = client.start(plugin, nonce)
    reply, _ = server.step(response, name)
    with pytest.raises(MySQLAuthenticationError) as info:
        client.respond(reply)  # perform full authentication: no TLS, no configured key
    assert info.value.errno == 2061
    assert "secure connection" in info.value.message and "secret" not in info.value.message


def test_caching_sha2_full_path_with_a_known_key() -> None:
    client = a.BackendAuthenticator("app", "secret", server_public_key=PEM)
    assert login(sha2(tls=False, cached=False), client) == 2


def test_caching_sha2_full_path_wrong_password() -> None:
    for tls in (True, False):
        with pytest.raises(MySQLAuthenticationError):
            login(sha2(tls=tls, cached=False), a.BackendAuthenticator("app", "nope", tls=tls))


def test_caching_sha2_full_path_without_tls_or_key_fails() -> None:
    with pytest.raises(MySQLAuthenticationError):
        login(sha2(tls=False, cached=False, key=None), a.BackendAuthenticator("app", "secret"))


def test_caching_sha2_empty_password() -> None:
    assert login(sha2(tls=False, password=""), a.BackendAuthenticator("app", "")) == 1
    with pytest.raises(MySQLAuthenticationError, match=r"using password: NO"):
        login(sha2(tls=False), a.BackendAuthenticator("app", ""))


def test_caching_sha2_server_switches_a_native_client() -> None:
    client = a.BackendAuthenticator("app", "secret")
    assert login(sha2(tls=False), client, client_first_plugin="mysql_native_password") == 2
    assert client.plugin == "caching_sha2_password"


# --- the client side against a scripted server -------------------------------------------------------


def test_client_handles_caching_sha2_fast_auth_then_ok() -> None:
    client = a.BackendAuthenticator("app", "secret")
    name, response = client.start("caching_sha2_password", NONCE)
    assert response == xor(sha256(b"secret"), sha256(sha256(sha256(b"secret")) + NONCE))
    assert client.respond(h("01 03")) is None and not client.done
    assert client.respond(OK) is None and client.done


def test_client_decodes_the_final_ok_with_its_capabilities() -> None:
    client = a.BackendAuthenticator("app", "secret", capabilities=k.CLIENT_SESSION_TRACK)
    client.start("mysql_native_password", NONCE)
    assert client.respond(h("00 00 00 02 40 00 00 00 04 01 02 01 64")) is None
    assert client.ok is not None and p.last_schema(client.ok.session_changes) == "d"


def test_client_handles_auth_switch_to_native() -> None:
    client = a.BackendAuthenticator("app", "secret")
    client.start("caching_sha2_password", NONCE)
    other = b"ABCDEFGHIJKLMNOPQRST"
    answer = client.respond(hs.AuthSwitchRequest("mysql_native_password", other + b"\0").encode())
    assert answer == xor(sha1(b"secret"), sha1(other + sha1(sha1(b"secret"))))


def test_client_falls_back_to_native_for_an_unknown_greeting_plugin() -> None:
    client = a.BackendAuthenticator("app", "secret")
    assert client.start("client_ed25519", NONCE) == (
        "mysql_native_password",
        a.scramble_native_password("secret", NONCE),
    )


def test_client_refuses_unknown_switches_and_cleartext_without_tls() -> None:
    client = a.BackendAuthenticator("app", "secret")
    client.start("mysql_native_password", NONCE)
    with pytest.raises(MySQLAuthenticationError) as info:
        client.respond(hs.AuthSwitchRequest("client_ed25519", NONCE).encode())
    assert info.value.errno == 2059
    with pytest.raises(MySQLAuthenticationError):
        client.respond(hs.AuthSwitchRequest("mysql_clear_password", b"").encode())
    tls_client = a.BackendAuthenticator("app", "secret", tls=True)
    tls_client.start("mysql_native_password", NONCE)
    with pytest.raises(MySQLAuthenticationError) as info:  # not in backend_auth by default
        tls_client.respond(hs.AuthSwitchRequest("mysql_clear_password", b"").encode())
    assert "backend_auth" in info.value.message
    clear_ok = a.BackendAuthenticator("app", "secret", tls=True, allowed=a.BACKEND_PLUGINS)
    clear_ok.start("mysql_native_password", NONCE)
    assert clear_ok.respond(hs.AuthSwitchRequest("mysql_clear_password", b"").encode()) == b"secret\0"


def test_client_refuses_a_switch_to_a_plugin_not_allowed() -> None:
    client = a.BackendAuthenticator("app", "secret", allowed=("mysql_native_password",))
    assert client.start("caching_sha2_password", NONCE)[0] == "mysql_native_password"
    with pytest.raises(MySQLAuthenticationError) as info:
        client.respond(hs.AuthSwitchRequest("caching_sha2_password", NONCE).encode())
    assert "backend_auth" in info.value.message


# --- passthrough: logging in with what the client proved ------------------------------------------


def test_parse_native_hash() -> None:
    stored = "*" + a.native_password_hash("secret").hex().upper()
    assert a.parse_native_hash(stored) == a.native_password_hash("secret")
    for bad in ("secret", "*abc", stored[1:] + "0"):
        with pytest.raises(ValueError):
            a.parse_native_hash(bad)


def test_native_passthrough_logs_in_without_the_password() -> None:
    front = a.NativePasswordServerAuth("app", "%", a.native_password_hash("secret"))
    assert front.passthrough_stage1() is None
    assert login(front, a.BackendAuthenticator("app", "secret")) == 1
    stage1 = front.passthrough_stage1()
    assert stage1 == hashlib.sha1(b"secret").digest()
    back = a.BackendAuthenticator("app", a.MyCredential(native_stage1=stage1))
    assert login(native(), back) == 1
    assert back.done


def test_native_passthrough_after_a_failed_login_has_nothing() -> None:
    front = a.NativePasswordServerAuth("app", "%", a.native_password_hash("secret"))
    with pytest.raises(MySQLAuthenticationError):
        login(front, a.BackendAuthenticator("app", "wrong"))
    assert front.passthrough_stage1() is None


def test_native_passthrough_cannot_answer_caching_sha2() -> None:
    stage1 = hashlib.sha1(b"secret").digest()
    client = a.BackendAuthenticator("app", a.MyCredential(native_stage1=stage1))
    # offered caching_sha2 in the greeting, it answers native; a switch to it is refused clearly
    assert client.start("caching_sha2_password", NONCE)[0] == "mysql_native_password"
    with pytest.raises(MySQLAuthenticationError) as info:
        client.respond(hs.AuthSwitchRequest("caching_sha2_password", NONCE).encode())
    assert info.value.errno == 2061


def test_my_reprs_hold_no_secret() -> None:
    stage1 = hashlib.sha1(b"secret").digest()
    credential = a.MyCredential(password="secret", native_stage1=stage1)
    for obj in (credential, a.BackendAuthenticator("app", credential),
                a.NativePasswordServerAuth("app", "%", a.native_password_hash("secret"))):
        assert "secret" not in repr(obj) and stage1.hex() not in repr(obj) and repr(stage1) not in repr(obj)


def test_client_reports_the_server_error() -> None:
    client = a.BackendAuthenticator("app", "secret")
    client.start("mysql_native_password", NONCE)
    with pytest.raises(MySQLAuthenticationError) as info:
        client.respond(p.err_packet(1045, "28000", "Access denied for user 'app'@'x' (using password: YES)"))
    assert (info.value.errno, info.value.sqlstate) == (1045, "28000")
    assert "Access denied" in info.value.message


def test_client_refuses_stray_packets() -> None:
    client = a.BackendAuthenticator("app", "secret")
    client.start("mysql_native_password", NONCE)
    with pytest.raises(MySQLProtocolError):
        client.respond(h("01 03"))  # AuthMoreData outside caching_sha2_password
    with pytest.raises(MySQLProtocolError):
        client.respond(b"")
    sha2_client = a.BackendAuthenticator("app", "secret")
    sha2_client.start("caching_sha2_password", NONCE)
    with pytest.raises(MySQLProtocolError):
        sha2_client.respond(h("01 07"))
    keyless = a.BackendAuthenticator("app", "secret", allow_public_key_retrieval=True)
    keyless.start("caching_sha2_password", NONCE)
    assert keyless.respond(h("01 04")) == h("02")
    with pytest.raises(MySQLProtocolError):
        keyless.respond(b"\x01not a PEM key")
