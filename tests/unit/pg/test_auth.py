"""Authentication exchanges: SCRAM, md5 and cleartext, the proxy as server and as client."""

from __future__ import annotations

import base64
import hashlib

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import AuthenticationError, ProtocolError
from endpoint_proxy.protocol.pg import auth as a
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader

SECRET = a.make_scram_secret("s3cret", salt=b"0123456789abcdef")


def backend_messages(wire: bytes) -> list[m.BackendMessage]:
    reader = FrameReader()
    reader.feed(wire)
    out: list[m.BackendMessage] = []
    while (message := reader.next_message()) is not None:
        out.append(m.decode_backend(*message))
    assert reader.buffered == 0
    return out


def password_payload(wire: bytes) -> bytes:
    reader = FrameReader()
    reader.feed(wire)
    message = reader.next_message()
    assert message is not None and reader.buffered == 0
    type_, payload = message
    assert type_ == ord("p")
    return payload


def authenticate(server: a.ServerAuth, client: a.BackendAuthenticator) -> int:
    """Run the exchange to the end; returns the number of client messages."""
    to_client = server.start()
    rounds = 0
    while True:
        reply = None
        for msg in backend_messages(to_client):
            assert isinstance(msg, m.Authentication)
            reply = client.respond(msg)
        if client.done:
            assert reply is None
            return rounds
        assert reply is not None
        rounds += 1
        to_client, done = server.step(password_payload(reply))
        if done:
            assert backend_messages(to_client)[-1] == m.AuthenticationOk()


# --- SCRAM ---------------------------------------------------------------------------------


def test_scram_between_our_server_and_our_client() -> None:
    assert authenticate(a.ScramServerAuth("app", SECRET), a.BackendAuthenticator("app", "s3cret")) == 2


def test_scram_start_offers_scram_sha_256() -> None:
    assert backend_messages(a.ScramServerAuth("app", SECRET).start()) == [m.AuthenticationSASL(("SCRAM-SHA-256",))]


def test_scram_wrong_password() -> None:
    with pytest.raises(AuthenticationError) as info:
        authenticate(a.ScramServerAuth("app", SECRET), a.BackendAuthenticator("app", "wrong"))
    assert info.value.sqlstate == "28P01"
    assert info.value.message == 'password authentication failed for user "app"'


def test_scram_user_name_in_message_is_ignored() -> None:
    # The startup packet's user counts; the SCRAM n= is whatever the client put there.
    assert authenticate(a.ScramServerAuth("app", SECRET), a.BackendAuthenticator("x,=y", "s3cret")) == 2


def scramp_client_exchange(server: a.ScramServerAuth, client: scramp.ScramClient, empty_name: bool = False) -> bytes:
    server.start()
    client_first: str = client.get_client_first()
    if empty_name:
        # What libpq sends: an empty user name. The proof covers the message as sent.
        gs2, _, rest = client_first.partition("n=")
        client_first = gs2 + "n=" + rest[rest.index(",") :]
        client.client_first_bare = client_first[len(gs2) :]
    first = m.SASLInitialResponse("SCRAM-SHA-256", client_first.encode()).encode()
    reply, done = server.step(password_payload(first))
    assert not done
    (cont,) = backend_messages(reply)
    assert isinstance(cont, m.AuthenticationSASLContinue)
    client.set_server_first(cont.data.decode())
    final = m.SASLResponse(client.get_client_final().encode()).encode()
    reply, done = server.step(password_payload(final))
    assert done
    sasl_final, ok = backend_messages(reply)
    assert isinstance(sasl_final, m.AuthenticationSASLFinal) and ok == m.AuthenticationOk()
    client.set_server_final(sasl_final.data.decode())  # verifies our server's signature
    return reply


@pytest.mark.parametrize("empty_name", [False, True])
def test_scram_server_against_scramp_client(empty_name: bool) -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "app", "s3cret")
    scramp_client_exchange(a.ScramServerAuth("app", SECRET), client, empty_name)


def test_scram_server_against_scramp_client_wrong_password() -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "app", "nope")
    with pytest.raises(AuthenticationError) as info:
        scramp_client_exchange(a.ScramServerAuth("app", SECRET), client, empty_name=True)
    assert info.value.sqlstate == "28P01"


def test_our_client_against_scramp_server() -> None:
    salt, stored, server_key, iterations = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info("pw")
    server = scramp.ScramMechanism("SCRAM-SHA-256").make_server(lambda _: (salt, stored, server_key, iterations))
    client = a.BackendAuthenticator("app", "pw")
    first = client.respond(m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    assert first is not None
    mechanism, data = m.decode_sasl_initial_response(password_payload(first))
    assert mechanism == "SCRAM-SHA-256" and data is not None
    # Like libpq, our client sends no user name; scramp's server wants one, so hand it one and
    # put back the bare message that enters the signatures.
    assert data.startswith(b"n,,n=,r=")
    server.set_client_first(data.decode().replace("n=,", "n=app,", 1))
    server.client_first_bare = data.decode()[3:]
    final = client.respond(m.AuthenticationSASLContinue(server.get_server_first().encode()))
    assert final is not None
    server.set_client_final(password_payload(final).decode())
    assert client.respond(m.AuthenticationSASLFinal(server.get_server_final().encode())) is None
    assert not client.done
    assert client.respond(m.AuthenticationOk()) is None
    assert client.done


def started_client(password: str = "s3cret") -> tuple[a.BackendAuthenticator, a.ScramServerAuth]:
    client = a.BackendAuthenticator("app", password)
    server = a.ScramServerAuth("app", SECRET)
    (sasl,) = backend_messages(server.start())
    first = client.respond(sasl)  # type: ignore[arg-type]
    assert first is not None
    reply, _ = server.step(password_payload(first))
    (cont,) = backend_messages(reply)
    final = client.respond(cont)  # type: ignore[arg-type]
    assert final is not None
    return client, server


def test_client_rejects_a_bad_server_signature() -> None:
    client, _ = started_client()
    bogus = base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(AuthenticationError):
        client.respond(m.AuthenticationSASLFinal(f"v={bogus}".encode()))


def test_client_rejects_ok_before_scram_completes() -> None:
    client, _ = started_client()
    with pytest.raises(AuthenticationError):
        client.respond(m.AuthenticationOk())


def test_client_rejects_out_of_order_sasl_messages() -> None:
    with pytest.raises(ProtocolError):
        a.BackendAuthenticator("app", "pw").respond(m.AuthenticationSASLContinue(b"r=x,s=eA==,i=4096"))
    with pytest.raises(ProtocolError):
        a.BackendAuthenticator("app", "pw").respond(m.AuthenticationSASLFinal(b"v=eA=="))


@pytest.mark.parametrize("server_first", [b"garbage", b"r=other,s=MDEyMzQ1Njc4OWFi,i=4096", b"\xff"])
def test_client_rejects_a_malformed_server_first(server_first: bytes) -> None:
    client = a.BackendAuthenticator("app", "pw")
    client.respond(m.AuthenticationSASL(("SCRAM-SHA-256",)))
    with pytest.raises(ProtocolError):
        client.respond(m.AuthenticationSASLContinue(server_first))


def client_first_packet(client_first: bytes | None, mechanism: str = "SCRAM-SHA-256") -> bytes:
    return password_payload(m.SASLInitialResponse(mechanism, client_first).encode())


@pytest.mark.parametrize(
    "payload",
    [
        client_first_packet(b"n,,n=,r=abc", mechanism="SCRAM-SHA-1"),
        client_first_packet(b"n,,n=,r=abc", mechanism="SCRAM-SHA-256-PLUS"),
        client_first_packet(None),
        client_first_packet(b""),
        client_first_packet(b"garbage"),
        client_first_packet(b"n,,"),
        client_first_packet(b"n,,n=app"),
        client_first_packet(b"n,,r=abc"),
        client_first_packet(b"x,,n=,r=abc"),
        client_first_packet(b"p=tls-server-end-point,,n=,r=abc"),  # channel binding: not offered
        client_first_packet(b"n,a=admin,n=,r=abc"),  # authzid
        client_first_packet(b"n,,n=,r=a,b"),
        client_first_packet(b"n,,n=,r=\xff"),
        b"SCRAM-SHA-256",  # not even a SASLInitialResponse
        b"\xff\xff\xff",
    ],
)
def test_scram_server_rejects_a_malformed_client_first(payload: bytes) -> None:
    server = a.ScramServerAuth("app", SECRET)
    server.start()
    with pytest.raises(ProtocolError) as info:
        server.step(payload)
    assert info.value.sqlstate == "08P01"


def server_after_first() -> tuple[a.ScramServerAuth, str]:
    server = a.ScramServerAuth("app", SECRET)
    server.start()
    reply, _ = server.step(client_first_packet(b"n,,n=,r=clientnonce"))
    (cont,) = backend_messages(reply)
    assert isinstance(cont, m.AuthenticationSASLContinue)
    nonce = cont.data.decode().split(",")[0][2:]
    assert nonce.startswith("clientnonce")
    return server, nonce


@pytest.mark.parametrize(
    "make_final",
    [
        lambda nonce: b"garbage",
        lambda nonce: b"\xff\xfe",
        lambda nonce: b"c=biws,r=wrongnonce,p=AAAA",  # nonce mismatch
        lambda nonce: f"c=eSws,r={nonce},p=AAAA".encode(),  # binding data differs from gs2 header
        lambda nonce: f"c=biws,r={nonce}".encode(),  # no proof
        lambda nonce: f"c=biws,r={nonce},p=!!!".encode(),  # proof not base64
    ],
)
def test_scram_server_rejects_a_malformed_client_final(make_final: object) -> None:
    server, nonce = server_after_first()
    with pytest.raises(ProtocolError) as info:
        server.step(make_final(nonce))  # type: ignore[operator]
    assert info.value.sqlstate == "08P01"


def test_scram_wrong_length_proof_is_a_failed_password() -> None:
    server, nonce = server_after_first()
    with pytest.raises(AuthenticationError) as info:
        server.step(f"c=biws,r={nonce},p=AAAA".encode())
    assert info.value.sqlstate == "28P01"


def test_scram_server_steps_out_of_order() -> None:
    server = a.ScramServerAuth("app", SECRET)
    with pytest.raises(ProtocolError):
        server.step(client_first_packet(b"n,,n=,r=abc"))  # before start()
    server = a.ScramServerAuth("app", SECRET)
    client = a.BackendAuthenticator("app", "s3cret")
    authenticate(server, client)
    with pytest.raises(ProtocolError):
        server.step(b"c=biws,r=x,p=AAAA")  # after done
    with pytest.raises(ProtocolError):
        server.start()


@settings(max_examples=60, deadline=None)
@given(first=st.binary(max_size=60), final=st.binary(max_size=60))
def test_scram_server_fuzz(first: bytes, final: bytes) -> None:
    server = a.ScramServerAuth("app", SECRET)
    server.start()
    for payload in (first, client_first_packet(first), final):
        try:
            server.step(payload)
        except ProtocolError:
            pass


def test_make_scram_secret_and_verifier() -> None:
    secret = a.make_scram_secret("pw", iterations=5000, salt=b"saltsaltsalt")
    assert secret.salt == b"saltsaltsalt" and secret.iterations == 5000
    assert len(secret.stored_key) == len(secret.server_key) == 32
    assert a.make_scram_secret("pw", iterations=5000, salt=b"saltsaltsalt") == secret
    assert a.make_scram_secret("pw").salt != a.make_scram_secret("pw").salt
    salt, stored, server = (base64.b64encode(v).decode() for v in (secret.salt, secret.stored_key, secret.server_key))
    text = f"SCRAM-SHA-256$5000:{salt}${stored}:{server}"
    assert a.parse_scram_verifier(text) == secret
    for bad in ("md5abc", "SCRAM-SHA-1$1:AA==$AA==:AA==", "SCRAM-SHA-256$x:AA==$AA==:AA==", ""):
        with pytest.raises(ValueError):
            a.parse_scram_verifier(bad)
    with pytest.raises(ValueError):
        a.make_scram_secret("pw", iterations=10)


def test_scram_server_with_a_stored_verifier() -> None:
    secret = a.make_scram_secret("pw")
    assert authenticate(a.ScramServerAuth("app", secret), a.BackendAuthenticator("app", "pw")) == 2


def test_channel_binding_is_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        a.ScramServerAuth("app", SECRET, channel_binding=("tls-server-end-point", b"x"))  # type: ignore[arg-type]


# --- md5 and cleartext ----------------------------------------------------------------------


def any_method_client(user: str, credential: a.PgCredential | str | None) -> a.BackendAuthenticator:
    """A client that may answer every method (backend_auth allowing them all)."""
    return a.BackendAuthenticator(user, credential, allowed=a.BACKEND_METHODS)


def test_md5_hash_vector() -> None:
    # md5("postgres" + "postgres") is the well-known stored hash md53175bce1d3201d16594cebf9d7eb3f9d.
    salt = b"\x01\x02\x03\x04"
    expected = "md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt).hexdigest()
    assert a.md5_password_hash("postgres", "postgres", salt) == expected


def test_md5_both_ways() -> None:
    server = a.Md5ServerAuth("app", "pw", salt=b"abcd")
    assert backend_messages(server.start()) == [m.AuthenticationMD5Password(b"abcd")]
    server = a.Md5ServerAuth("app", "pw")
    assert authenticate(server, any_method_client("app", "pw")) == 1
    with pytest.raises(AuthenticationError) as info:
        authenticate(a.Md5ServerAuth("app", "pw"), any_method_client("app", "bad"))
    assert info.value.sqlstate == "28P01"
    # The user name is part of the hash.
    with pytest.raises(AuthenticationError):
        authenticate(a.Md5ServerAuth("app", "pw"), any_method_client("other", "pw"))


def test_cleartext_both_ways() -> None:
    server = a.CleartextServerAuth("app", "pw")
    assert backend_messages(server.start()) == [m.AuthenticationCleartextPassword()]
    assert authenticate(a.CleartextServerAuth("app", "pw"), any_method_client("app", "pw")) == 1
    with pytest.raises(AuthenticationError) as info:
        authenticate(a.CleartextServerAuth("app", "pw"), any_method_client("app", "pW"))
    assert info.value.message == 'password authentication failed for user "app"'


@pytest.mark.parametrize("cls", [a.CleartextServerAuth, a.Md5ServerAuth])
def test_password_servers_reject_malformed_and_empty(cls: type[a.CleartextServerAuth]) -> None:
    for payload, error, sqlstate in [
        (b"pw", ProtocolError, "08P01"),
        (b"pw\0x\0", ProtocolError, "08P01"),
        (b"", ProtocolError, "08P01"),
        (b"\0", AuthenticationError, "28P01"),  # PostgreSQL refuses empty passwords
    ]:
        server = cls("app", "")
        server.start()
        with pytest.raises(error) as info:
            server.step(payload)
        assert info.value.sqlstate == sqlstate
    server = cls("app", "pw")
    with pytest.raises(ProtocolError):
        server.step(b"pw\0")  # before start()
    request = backend_messages(server.start())[0]
    password = (
        a.md5_password_hash("app", "pw", request.salt) if isinstance(request, m.AuthenticationMD5Password) else "pw"
    )
    assert server.step(password_payload(m.PasswordMessage(password).encode())) == (m.AuthenticationOk().encode(), True)
    with pytest.raises(ProtocolError):
        server.step(b"pw\0")  # after done


# --- the client side's refusals -------------------------------------------------------------


def test_trust() -> None:
    client = any_method_client("app", None)
    assert client.respond(m.AuthenticationOk()) is None and client.done
    with pytest.raises(ProtocolError):
        client.respond(m.AuthenticationOk())


@pytest.mark.parametrize(
    "msg",
    [
        m.AuthenticationCleartextPassword(),
        m.AuthenticationMD5Password(b"abcd"),
        m.AuthenticationSASL(("SCRAM-SHA-256",)),
    ],
)
def test_password_required(msg: m.AuthenticationMessage) -> None:
    with pytest.raises(AuthenticationError):
        any_method_client("app", None).respond(msg)


@pytest.mark.parametrize(
    "msg",
    [
        m.AuthenticationOther(m.AUTH_GSS),
        m.AuthenticationOther(m.AUTH_SSPI),
        m.AuthenticationOther(m.AUTH_KERBEROS_V5),
        m.AuthenticationSASL(("SCRAM-SHA-256-PLUS",)),
        m.AuthenticationSASL(()),
    ],
)
def test_unsupported_methods(msg: m.AuthenticationMessage) -> None:
    with pytest.raises(AuthenticationError) as info:
        any_method_client("app", "pw").respond(msg)
    assert info.value.sqlstate == "28000"


def test_client_answers() -> None:
    clear = any_method_client("app", "pw").respond(m.AuthenticationCleartextPassword())
    assert clear == m.PasswordMessage("pw").encode()
    md5 = any_method_client("app", "pw").respond(m.AuthenticationMD5Password(b"abcd"))
    assert md5 == m.PasswordMessage(a.md5_password_hash("app", "pw", b"abcd")).encode()


def test_a_second_request_is_refused() -> None:
    client = any_method_client("app", "pw")
    client.respond(m.AuthenticationCleartextPassword())
    with pytest.raises(ProtocolError):
        client.respond(m.AuthenticationMD5Password(b"abcd"))


# --- backend_auth: what a server may ask for --------------------------------------------------


@pytest.mark.parametrize(("msg", "method"), [
    (m.AuthenticationCleartextPassword(), "password"),
    (m.AuthenticationMD5Password(b"abcd"), "md5"),
    (m.AuthenticationOk(), "trust"),
])
def test_by_default_only_scram_is_answered(msg: m.AuthenticationMessage, method: str) -> None:
    client = a.BackendAuthenticator("app", "s3cret-pw")
    with pytest.raises(a.UntrustedServerError) as info:
        client.respond(msg)
    assert method in info.value.message and "backend_auth" in info.value.message
    assert "s3cret-pw" not in info.value.message
    assert info.value.sqlstate == "28000"
    assert not client.done


@pytest.mark.parametrize(("msg", "method"), [
    (m.AuthenticationCleartextPassword(), "password"),
    (m.AuthenticationMD5Password(b"abcd"), "md5"),
])
def test_an_allowed_method_is_answered(msg: m.AuthenticationMessage, method: str) -> None:
    assert a.BackendAuthenticator("app", "pw", allowed=(method,)).respond(msg) is not None
    with pytest.raises(a.UntrustedServerError):
        a.BackendAuthenticator("app", "pw", allowed=("scram-sha-256", "trust")).respond(msg)


def test_trust_when_allowed() -> None:
    client = a.BackendAuthenticator("app", "pw", allowed=("scram-sha-256", "trust"))
    client.respond(m.AuthenticationOk())
    assert client.done and client.method == "trust"


def test_scram_login_completes_with_default_policy() -> None:
    client = a.BackendAuthenticator("app", "s3cret")
    assert authenticate(a.ScramServerAuth("app", SECRET), client) == 2
    assert client.method == "scram-sha-256"


def test_iteration_counts_beyond_the_cap_are_refused() -> None:
    client = a.BackendAuthenticator("app", "pw")
    first = client.respond(m.AuthenticationSASL(("SCRAM-SHA-256",)))
    assert first is not None
    _, data = m.decode_sasl_initial_response(password_payload(first))
    assert data is not None
    nonce = data.decode().split("r=", 1)[1]
    with pytest.raises(ProtocolError):
        client.respond(m.AuthenticationSASLContinue(f"r={nonce}xyz,s=MDEyMzQ1Njc4OWFi,i=100000000".encode()))


def test_server_error_in_server_final() -> None:
    client, _ = started_client()
    with pytest.raises(AuthenticationError) as info:
        client.respond(m.AuthenticationSASLFinal(b"e=invalid-proof"))
    assert info.value.sqlstate == "28P01"


# --- SCRAM passthrough -------------------------------------------------------------------------


def client_login(server: a.ScramServerAuth, password: str) -> None:
    assert authenticate(server, a.BackendAuthenticator("app", password)) == 2


def test_scram_server_recovers_the_client_key() -> None:
    server = a.ScramServerAuth("app", SECRET)
    assert server.passthrough_keys() is None
    client_login(server, "s3cret")
    keys = server.passthrough_keys()
    assert keys is not None
    assert keys == a.scram_keys_from_password("s3cret", SECRET.salt, SECRET.iterations)
    assert keys.matches(SECRET)
    assert "client_key" not in repr(keys) and repr(keys.client_key) not in repr(keys)


def test_scram_server_recovers_the_key_of_a_scramp_client() -> None:
    server = a.ScramServerAuth("app", SECRET)
    scramp_client_exchange(server, scramp.ScramClient(["SCRAM-SHA-256"], "app", "s3cret"), empty_name=True)
    assert server.passthrough_keys() == a.scram_keys_from_password("s3cret", SECRET.salt, SECRET.iterations)


def test_no_keys_after_a_failed_login() -> None:
    server = a.ScramServerAuth("app", SECRET)
    with pytest.raises(AuthenticationError):
        client_login(server, "wrong")
    assert server.passthrough_keys() is None


def test_passthrough_logs_in_without_the_password() -> None:
    # The proxy checks a client against a verifier, then logs in to a server keeping the same
    # verifier with the recovered key: it never had the password.
    verifier = a.parse_scram_verifier(a.format_scram_verifier(SECRET))
    front = a.ScramServerAuth("app", verifier)
    client_login(front, "s3cret")
    keys = front.passthrough_keys()
    assert keys is not None
    back = a.BackendAuthenticator("app", a.PgCredential(scram_keys=keys))
    assert authenticate(a.ScramServerAuth("app", SECRET), back) == 2
    assert back.done


def test_passthrough_refuses_a_server_with_another_salt() -> None:
    front = a.ScramServerAuth("app", SECRET)
    client_login(front, "s3cret")
    keys = front.passthrough_keys()
    other = a.make_scram_secret("s3cret", salt=b"another-salt-16b")
    with pytest.raises(AuthenticationError) as info:
        authenticate(a.ScramServerAuth("app", other), a.BackendAuthenticator("app", a.PgCredential(scram_keys=keys)))
    assert "another verifier" in info.value.message and info.value.sqlstate == "28P01"


def test_passthrough_falls_back_to_the_password_for_another_salt() -> None:
    keys = a.scram_keys_from_password("s3cret", SECRET.salt, SECRET.iterations)
    other = a.make_scram_secret("s3cret", salt=b"another-salt-16b")
    credential = a.PgCredential(password="s3cret", scram_keys=keys)
    assert authenticate(a.ScramServerAuth("app", other), a.BackendAuthenticator("app", credential)) == 2


def test_passthrough_refuses_a_server_that_does_not_know_the_verifier() -> None:
    # An impostor answers with its own ServerKey: the signature check fails.
    keys = a.scram_keys_from_password("s3cret", SECRET.salt, SECRET.iterations)
    impostor = a.ScramSecret(SECRET.salt, SECRET.iterations, SECRET.stored_key, b"\x01" * 32)
    client = a.BackendAuthenticator("app", a.PgCredential(scram_keys=keys))
    with pytest.raises(a.UntrustedServerError):
        authenticate(a.ScramServerAuth("app", impostor), client)


def test_wrong_keys_fail_like_a_wrong_password() -> None:
    keys = a.scram_keys_from_password("not-it", SECRET.salt, SECRET.iterations)
    with pytest.raises(AuthenticationError) as info:
        authenticate(a.ScramServerAuth("app", SECRET), a.BackendAuthenticator("app", a.PgCredential(scram_keys=keys)))
    assert info.value.sqlstate == "28P01"


def test_keys_alone_cannot_answer_md5_or_cleartext() -> None:
    keys = a.scram_keys_from_password("s3cret", SECRET.salt, SECRET.iterations)
    for msg in (m.AuthenticationMD5Password(b"abcd"), m.AuthenticationCleartextPassword()):
        with pytest.raises(AuthenticationError) as info:
            any_method_client("app", a.PgCredential(scram_keys=keys)).respond(msg)
        assert info.value.sqlstate == "28P01"


def test_verifier_round_trip() -> None:
    text = a.format_scram_verifier(SECRET)
    assert text.startswith("SCRAM-SHA-256$4096:")
    assert a.parse_scram_verifier(text) == SECRET


def test_reprs_hold_no_secret() -> None:
    keys = a.scram_keys_from_password("s3cret", SECRET.salt, SECRET.iterations)
    credential = a.PgCredential(password="s3cret", md5_hash=a.md5_stored_hash("app", "s3cret"), scram_keys=keys)
    for obj in (credential, keys, SECRET, a.BackendAuthenticator("app", credential),
                a.ScramServerAuth("app", SECRET), a.Md5ServerAuth("app", "s3cret")):
        text = repr(obj)
        assert "s3cret" not in text
        for secret in (keys.client_key, keys.server_key, SECRET.stored_key):
            assert secret.hex() not in text and repr(secret) not in text
    assert repr(credential) == "PgCredential(password, md5 hash, SCRAM keys)"


# --- md5 against the stored hash -----------------------------------------------------------------


def test_md5_server_checks_against_the_stored_hash() -> None:
    stored = a.md5_stored_hash("app", "pw")
    assert authenticate(a.Md5ServerAuth("app", md5_hash=stored), any_method_client("app", "pw")) == 1
    with pytest.raises(AuthenticationError):
        authenticate(a.Md5ServerAuth("app", md5_hash=stored), any_method_client("app", "nope"))


def test_md5_client_logs_in_with_the_stored_hash() -> None:
    stored = a.md5_stored_hash("app", "pw")
    client = any_method_client("app", a.PgCredential(md5_hash=stored))
    assert authenticate(a.Md5ServerAuth("app", "pw"), client) == 1


def test_cleartext_server_checks_against_the_stored_hash() -> None:
    stored = a.md5_stored_hash("app", "pw")
    assert authenticate(a.CleartextServerAuth("app", md5_hash=stored), any_method_client("app", "pw")) == 1
    with pytest.raises(AuthenticationError):
        authenticate(a.CleartextServerAuth("app", md5_hash=stored), any_method_client("app", "pW"))
