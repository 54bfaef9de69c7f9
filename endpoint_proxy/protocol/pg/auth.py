"""PostgreSQL authentication, both sides: the proxy as server (SCRAM, md5, password) and as client.

Rules of this file: every exchange is a small state machine fed with message payloads and
returning framed bytes; nothing here reads a socket or a clock. The server side's SCRAM
arithmetic is scramp's; the client side's is written out here, because it must also work
from a ClientKey instead of a password. A wrong password is ``AuthenticationError`` (28P01);
a malformed exchange is ``ProtocolError`` (08P01); a method we cannot speak is
``AuthenticationError`` (28000); a server that asks for what the proxy does not allow it,
or that fails to prove itself, is ``UntrustedServerError`` (28000).

SCRAM passthrough: a client that logs in with SCRAM against a verifier proves it knows
ClientKey (ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)), so after the exchange
the proxy holds ClientKey (``ScramServerAuth.passthrough_keys``), and with it and the
verifier's ServerKey it can log in to a server that keeps the same verifier
(``PgCredential(scram_keys=...)``): the password itself is never known to the proxy.

Cost: ``make_scram_secret`` and ``scram_keys_from_password`` run PBKDF2 (``iterations``
HMACs, a few ms at 4096), and so does ``BackendAuthenticator.respond`` to a SASL challenge
when it has a password rather than keys; callers cache the former and may run the latter in
a thread. ``ScramServerAuth`` only does a few HMACs per login.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from base64 import b64decode, b64encode
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final, Protocol

import scramp
from scramp.utils import saslprep

from ..errors import AuthenticationError, LocalProtocolError, ProtocolError
from .messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationMessage,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
    decode_password_message,
    decode_sasl_initial_response,
)

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
DEFAULT_SCRAM_ITERATIONS: Final = 4096

# How a server may ask the proxy to log in (the names of pg_hba.conf); config's backend_auth.
METHOD_SCRAM: Final = "scram-sha-256"
METHOD_MD5: Final = "md5"
METHOD_PASSWORD: Final = "password"
METHOD_TRUST: Final = "trust"
BACKEND_METHODS: Final = (METHOD_SCRAM, METHOD_MD5, METHOD_PASSWORD, METHOD_TRUST)
DEFAULT_BACKEND_METHODS: Final = (METHOD_SCRAM,)
# A server asking for more PBKDF2 rounds than this is refused (each round costs the proxy CPU).
MAX_SCRAM_ITERATIONS: Final = 1_000_000

_AUTH_OK: Final = AuthenticationOk().encode()

# Names of the methods AuthenticationOther stands for, for error messages.
_OTHER_METHODS: Final = {
    2: "Kerberos V5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI",
    9: "SSPI",
}


def _password_failed(user: str) -> AuthenticationError:
    return AuthenticationError(f'password authentication failed for user "{user}"')


class UntrustedServerError(AuthenticationError):
    """The server asked for a method the proxy does not allow it (``backend_auth``), or failed
    to prove it knows the verifier: the instance is not to be trusted, whoever the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sqlstate="28000")


# --- server side: the proxy authenticates a client ----------------------------------------


class ServerAuth(Protocol):
    """One client login: ``start()`` is the request to send, then ``step()`` per 'p' message."""

    def start(self) -> bytes:
        """The framed Authentication request that opens the exchange."""
        ...

    def step(self, data: bytes) -> tuple[bytes, bool]:
        """Feed the payload of the client's 'p' message; returns (bytes to send, done).

        When done is True the bytes end with AuthenticationOk. Raises AuthenticationError
        on a wrong password and ProtocolError on a malformed exchange.
        """
        ...


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """A SCRAM-SHA-256 verifier: what the server keeps instead of the password."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What logs in with SCRAM-SHA-256 without the password: ClientKey, and the verifier's
    salt, iteration count and ServerKey (to check the server's signature). Works against a
    server whose verifier has the same salt and iteration count."""

    salt: bytes
    iterations: int
    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @property
    def stored_key(self) -> bytes:
        return hashlib.sha256(self.client_key).digest()

    def matches(self, secret: ScramSecret) -> bool:
        """Are these the keys of ``secret`` (the same password, salt and iterations)?"""
        return (self.salt == secret.salt and self.iterations == secret.iterations
                and hmac.compare_digest(self.stored_key, secret.stored_key)
                and hmac.compare_digest(self.server_key, secret.server_key))


def _hmac256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _saslprep(password: str) -> bytes:
    # Like libpq and the server: a password SASLprep refuses is used as its raw bytes.
    try:
        prepared: str = saslprep(password)
    except scramp.ScramException:
        prepared = password
    return prepared.encode("utf-8", "surrogateescape")


def scram_keys_from_password(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """ClientKey and ServerKey of a password for a salt and iteration count (PBKDF2: costly)."""
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password), salt, iterations)
    return ScramKeys(salt, iterations, _hmac256(salted, b"Client Key"), _hmac256(salted, b"Server Key"))


def make_scram_secret(
    password: str, iterations: int = DEFAULT_SCRAM_ITERATIONS, salt: bytes | None = None
) -> ScramSecret:
    """Derive a verifier (PBKDF2: costly, compute once per password and cache).

    Raises ValueError when scramp refuses the input: a password SASLprep rejects,
    fewer than 4096 iterations, a salt shorter than 12 bytes.
    """
    try:
        salt_out, stored_key, server_key, i = scramp.ScramMechanism(SCRAM_SHA_256).make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
    except scramp.ScramException as exc:
        raise ValueError(f"cannot make a SCRAM secret: {exc}") from None
    return ScramSecret(bytes(salt_out), int(i), bytes(stored_key), bytes(server_key))


def parse_scram_verifier(verifier: str) -> ScramSecret:
    """Read PostgreSQL's stored form ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``.

    Raises ValueError when the text is not such a verifier.
    """
    try:
        method, iter_salt, keys = verifier.split("$")
        iterations, salt = iter_salt.split(":")
        stored_key, server_key = keys.split(":")
        if method != SCRAM_SHA_256:
            raise ValueError(method)
        return ScramSecret(
            b64decode(salt, validate=True),
            int(iterations),
            b64decode(stored_key, validate=True),
            b64decode(server_key, validate=True),
        )
    except ValueError:
        raise ValueError("not a SCRAM-SHA-256 verifier") from None


def format_scram_verifier(secret: ScramSecret) -> str:
    """PostgreSQL's stored form of a verifier (what ``parse_scram_verifier`` reads)."""
    b64 = b64encode
    return (f"{SCRAM_SHA_256}${secret.iterations}:{b64(secret.salt).decode()}$"
            f"{b64(secret.stored_key).decode()}:{b64(secret.server_key).decode()}")


class ScramServerAuth:
    """SCRAM-SHA-256 (no channel binding) against a cached ``ScramSecret``.

    PostgreSQL ignores the user name inside the SCRAM messages (libpq sends ``n=``, empty)
    and uses the startup packet's; so does this class. scramp insists on a non-empty,
    SASLprep-valid name, so a placeholder is handed to it and its copy of
    client-first-message-bare (which enters the signatures) is set back to what the client
    actually sent. ``tests/unit/pg/test_auth.py`` checks this against libpq-style input.
    """

    _PLACEHOLDER_USER = "user"

    def __init__(self, user: str, secret: ScramSecret, channel_binding: None = None) -> None:
        if channel_binding is not None:
            raise ValueError("channel binding (SCRAM-SHA-256-PLUS) is not supported")
        self.user = user
        self._secret = secret
        self._auth_info = (secret.salt, secret.stored_key, secret.server_key, secret.iterations)
        self._server = scramp.ScramMechanism(SCRAM_SHA_256).make_server(self._lookup)
        self._state = "start"  # start -> first -> final -> done | failed
        self._client_first_bare = ""
        self._server_first = ""
        self._client_key: bytes | None = None

    def __repr__(self) -> str:
        return f"ScramServerAuth(user={self.user!r}, state={self._state!r})"

    def passthrough_keys(self) -> ScramKeys | None:
        """After a successful exchange: the client's ClientKey with the verifier's salt,
        iterations and ServerKey, to log in to servers that keep the same verifier."""
        if self._state != "done" or self._client_key is None:
            return None
        s = self._secret
        return ScramKeys(s.salt, s.iterations, self._client_key, s.server_key)

    def _lookup(self, _username: str) -> tuple[bytes, bytes, bytes, int]:
        return self._auth_info

    def start(self) -> bytes:
        if self._state != "start":
            raise ProtocolError("SCRAM exchange already started")
        self._state = "first"
        return AuthenticationSASL((SCRAM_SHA_256,)).encode()

    def step(self, data: bytes) -> tuple[bytes, bool]:
        state = self._state
        self._state = "failed"  # until this step succeeds
        if state == "first":
            reply = self._client_first(data)
            self._state = "final"
            return reply, False
        if state == "final":
            reply = self._client_final(data)
            self._state = "done"
            return reply, True
        raise ProtocolError(f"unexpected SASL message (exchange state: {state})")

    def _client_first(self, data: bytes) -> bytes:
        mechanism, response = decode_sasl_initial_response(data)
        if mechanism != SCRAM_SHA_256:
            raise ProtocolError(f"client selected an invalid SASL authentication mechanism: {mechanism!r}")
        if response is None:
            raise ProtocolError("malformed SCRAM message: no client-first-message")
        client_first = _scram_text(response)
        # gs2-header = flag "," [authzid] ","; the bare message follows.
        second_comma = client_first.find(",", client_first.find(",") + 1)
        bare = client_first[second_comma + 1 :] if second_comma > 0 else ""
        if second_comma < 0 or not bare.startswith("n="):
            raise ProtocolError("malformed SCRAM message: bad client-first-message")
        name_end = bare.find(",")
        if name_end < 0:
            raise ProtocolError("malformed SCRAM message: bad client-first-message")
        substitute = client_first[: second_comma + 1] + "n=" + self._PLACEHOLDER_USER + bare[name_end:]
        try:
            self._server.set_client_first(substitute)
            self._server.client_first_bare = bare
            server_first: str = self._server.get_server_first()
        except scramp.ScramException as exc:
            raise ProtocolError(f"malformed SCRAM message: {exc}") from None
        self._client_first_bare = bare
        self._server_first = server_first
        return AuthenticationSASLContinue(server_first.encode("utf-8")).encode()

    def _client_final(self, data: bytes) -> bytes:
        client_final = _scram_text(data)
        try:
            self._server.set_client_final(client_final)
            server_final: str = self._server.get_server_final()
        except scramp.ScramException as exc:
            # RFC 5802's server-error-value for a proof that does not verify.
            if getattr(exc.server_error, "value", None) == "invalid-proof":
                raise _password_failed(self.user) from None
            raise ProtocolError(f"malformed SCRAM message: {exc}") from None
        self._client_key = self._recover_client_key(client_final)
        return AuthenticationSASLFinal(server_final.encode("utf-8")).encode() + _AUTH_OK

    def _recover_client_key(self, client_final: str) -> bytes | None:
        """ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage) (the proof just verified)."""
        without_proof, sep, proof_b64 = client_final.rpartition(",p=")
        try:
            proof = b64decode(proof_b64, validate=True)
        except ValueError:
            return None
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof)).encode("utf-8")
        signature = _hmac256(self._secret.stored_key, auth_message)
        if not sep or len(proof) != len(signature):
            return None
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key):
            return None
        return client_key


def _scram_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("malformed SCRAM message: invalid UTF-8") from None


def md5_stored_hash(user: str, password: str) -> str:
    """What PostgreSQL stores for md5: 'md5' + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


def md5_salted_hash(stored: str, salt: bytes) -> str:
    """What a client sends for md5, from the stored hash: 'md5' + md5(stored[3:] + salt)."""
    return "md5" + hashlib.md5(stored[3:].encode("ascii") + salt).hexdigest()


def md5_password_hash(user: str, password: str, salt: bytes) -> str:
    """What a client sends for md5: 'md5' + md5(md5(password + user).hex + salt).hex."""
    return md5_salted_hash(md5_stored_hash(user, password), salt)


def _stored_md5(user: str, password: str | None, md5_hash: str | None) -> str:
    if md5_hash is not None:
        if len(md5_hash) != 35 or not md5_hash.startswith("md5"):
            raise ValueError("an md5 hash is 'md5' and 32 hex digits")
        return md5_hash
    if password is None:
        raise ValueError("give the password or its md5 hash")
    return md5_stored_hash(user, password)


class _PasswordServerAuth:
    """Shared shape of the one-round password methods."""

    def __init__(self, user: str) -> None:
        self.user = user
        self._state = "start"  # start -> sent -> done | failed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(user={self.user!r}, state={self._state!r})"

    def _request(self) -> bytes:
        raise NotImplementedError

    def _check(self, given: bytes) -> bool:
        raise NotImplementedError

    def start(self) -> bytes:
        if self._state != "start":
            raise ProtocolError("password exchange already started")
        self._state = "sent"
        return self._request()

    def step(self, data: bytes) -> tuple[bytes, bool]:
        if self._state != "sent":
            raise ProtocolError(f"unexpected password message (exchange state: {self._state})")
        self._state = "failed"
        given = decode_password_message(data).encode("utf-8", "surrogateescape")
        # PostgreSQL refuses an empty password outright, whatever is stored.
        if not given or not self._check(given):
            raise _password_failed(self.user)
        self._state = "done"
        return _AUTH_OK, True


class Md5ServerAuth(_PasswordServerAuth):
    """md5: the client proves it knows the password with a salted double MD5. Checks against
    the password or against its stored hash (``md5_hash``, 'md5' + md5(password + user))."""

    def __init__(self, user: str, password: str | None = None, salt: bytes | None = None, *,
                 md5_hash: str | None = None) -> None:
        super().__init__(user)
        self.salt = secrets.token_bytes(4) if salt is None else salt
        if len(self.salt) != 4:
            raise ValueError("the md5 salt is 4 bytes")
        self._hash = md5_salted_hash(_stored_md5(user, password, md5_hash), self.salt).encode("ascii")

    def _request(self) -> bytes:
        return AuthenticationMD5Password(self.salt).encode()

    def _check(self, given: bytes) -> bool:
        return hmac.compare_digest(given, self._hash)


class CleartextServerAuth(_PasswordServerAuth):
    """password: the client sends the password itself (use only over TLS). Checks against the
    password or against its stored md5 hash."""

    def __init__(self, user: str, password: str | None = None, *, md5_hash: str | None = None) -> None:
        super().__init__(user)
        self._password = None if password is None else password.encode("utf-8")
        self._md5 = None if password is not None else _stored_md5(user, None, md5_hash).encode("ascii")

    def _request(self) -> bytes:
        return AuthenticationCleartextPassword().encode()

    def _check(self, given: bytes) -> bool:
        if self._password is not None:
            return hmac.compare_digest(given, self._password)
        assert self._md5 is not None
        computed = ("md5" + hashlib.md5(given + self.user.encode("utf-8")).hexdigest()).encode("ascii")
        return hmac.compare_digest(computed, self._md5)


# --- client side: the proxy authenticates to a backend server ----------------------------


@dataclass(frozen=True, slots=True)
class PgCredential:
    """What the proxy can log in to a server with, for one user; any of: the password, its
    stored md5 hash (answers md5), SCRAM keys recovered from the client's own login (answers
    SCRAM-SHA-256 against the same verifier). Nothing of it shows in a repr."""

    password: str | None = field(default=None, repr=False)
    md5_hash: str | None = field(default=None, repr=False)
    scram_keys: ScramKeys | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        held = [n for n, v in (("password", self.password), ("md5 hash", self.md5_hash),
                               ("SCRAM keys", self.scram_keys)) if v is not None]
        return f"PgCredential({', '.join(held) or 'nothing'})"


class BackendAuthenticator:
    """Answers a server's authentication requests: SCRAM-SHA-256, md5, cleartext, trust.

    Feed each decoded Authentication* message to ``respond``; send back what it returns
    (a framed 'p' message) unless None. ``done`` turns True at AuthenticationOk.

    ``allowed`` (config's ``backend_auth``; None: SCRAM-SHA-256 only) are the methods a
    server may ask for: anything
    else — including a server that lets the user in without asking (``trust``) — raises
    ``UntrustedServerError`` before a byte of the credential is sent. ``credential`` is a
    ``PgCredential`` (or a plain password, or None for none).
    """

    def __init__(self, user: str, credential: PgCredential | str | None,
                 allowed: Collection[str] | None = None) -> None:
        self.user = user
        self.credential = PgCredential(password=credential) if isinstance(credential, str) or credential is None \
            else credential
        self.allowed = frozenset(DEFAULT_BACKEND_METHODS if allowed is None else allowed)
        self.done = False
        self.method: str | None = None  # what the server asked for
        self._scram_state = "none"  # none -> first -> final -> verified
        self._client_first_bare = ""
        self._nonce = ""
        self._server_signature = b""

    def __repr__(self) -> str:
        return f"BackendAuthenticator(user={self.user!r}, method={self.method!r}, done={self.done})"

    def respond(self, msg: AuthenticationMessage) -> bytes | None:
        if self.done:
            raise ProtocolError("authentication request after AuthenticationOk")
        if isinstance(msg, AuthenticationOk):
            self._accept_ok()
            return None
        if isinstance(msg, AuthenticationSASLContinue):
            return self._scram_continue(msg.data)
        if isinstance(msg, AuthenticationSASLFinal):
            self._scram_final(msg.data)
            return None
        if self.method is not None:
            raise ProtocolError(f"the server asked again for authentication (it asked {self.method} already)")
        if isinstance(msg, AuthenticationCleartextPassword):
            self._allow(METHOD_PASSWORD, "a cleartext password")
            return PasswordMessage(self._password("a cleartext password")).encode()
        if isinstance(msg, AuthenticationMD5Password):
            self._allow(METHOD_MD5, "an md5 password")
            return PasswordMessage(md5_salted_hash(self._md5_hash(), msg.salt)).encode()
        if isinstance(msg, AuthenticationSASL):
            return self._scram_start(msg.mechanisms)
        if not isinstance(msg, AuthenticationOther):
            raise LocalProtocolError(f"not an authentication request: {msg!r}")
        method = _OTHER_METHODS.get(msg.code, f"code {msg.code}")
        raise AuthenticationError(
            f"authentication method {method} requested by the server is not supported",
            sqlstate="28000",
        )

    def _allow(self, method: str, what: str) -> None:
        if method not in self.allowed:
            raise UntrustedServerError(
                f"the server asked for {what} ({method}), which backend_auth does not allow "
                f"(allowed: {', '.join(sorted(self.allowed))})")
        self.method = method

    def _accept_ok(self) -> None:
        if self.method is None:
            if METHOD_TRUST not in self.allowed:
                raise UntrustedServerError(
                    f'the server let user "{self.user}" in without authentication (trust), which '
                    f"backend_auth does not allow (allowed: {', '.join(sorted(self.allowed))})")
            self.method = METHOD_TRUST
        elif self.method == METHOD_SCRAM and self._scram_state != "verified":
            raise UntrustedServerError("server sent AuthenticationOk before completing SCRAM authentication")
        self.done = True

    def _password(self, what: str) -> str:
        if self.credential.password is None:
            raise AuthenticationError(
                f'the server asked for {what} for user "{self.user}" and the proxy does not know the password',
                sqlstate="28P01")
        return self.credential.password

    def _md5_hash(self) -> str:
        if self.credential.md5_hash is not None:
            return self.credential.md5_hash
        return md5_stored_hash(self.user, self._password("an md5 password"))

    # --- SCRAM-SHA-256 (RFC 5802/7677, without channel binding, as libpq without it) -----------

    def _scram_start(self, mechanisms: tuple[str, ...]) -> bytes:
        if SCRAM_SHA_256 not in mechanisms:
            raise AuthenticationError(
                f"none of the server's SASL mechanisms is supported: {', '.join(mechanisms)}",
                sqlstate="28000",
            )
        self._allow(METHOD_SCRAM, "SCRAM-SHA-256")
        if self.credential.scram_keys is None and self.credential.password is None:
            raise AuthenticationError(
                f'the server asked for SCRAM-SHA-256 for user "{self.user}" and the proxy has neither the '
                "password nor the keys of a SCRAM login by the client", sqlstate="28P01")
        self._nonce = b64encode(secrets.token_bytes(18)).decode("ascii")
        # The server takes the user name from the startup packet; like libpq, send none.
        self._client_first_bare = f"n=,r={self._nonce}"
        self._scram_state = "first"
        return SASLInitialResponse(SCRAM_SHA_256, ("n,," + self._client_first_bare).encode("ascii")).encode()

    def _scram_continue(self, data: bytes) -> bytes:
        if self._scram_state != "first":
            raise ProtocolError("unexpected AuthenticationSASLContinue")
        self._scram_state = "failed"
        server_first = _scram_text(data)
        nonce, salt, iterations = _parse_server_first(server_first, self._nonce)
        keys = self._keys(salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join((self._client_first_bare, server_first, without_proof)).encode("utf-8")
        proof = _xor(keys.client_key, _hmac256(keys.stored_key, auth_message))
        self._server_signature = _hmac256(keys.server_key, auth_message)
        self._scram_state = "final"
        final = f"{without_proof},p={b64encode(proof).decode('ascii')}"
        return SASLResponse(final.encode("ascii")).encode()

    def _keys(self, salt: bytes, iterations: int) -> ScramKeys:
        keys = self.credential.scram_keys
        if keys is not None and keys.salt == salt and keys.iterations == iterations:
            return keys
        if self.credential.password is not None:
            return scram_keys_from_password(self.credential.password, salt, iterations)
        raise AuthenticationError(
            f'SCRAM passthrough for user "{self.user}": the server keeps another verifier than the proxy '
            f"(its salt or iteration count differ); give the proxy the server's verifier, or the password",
            sqlstate="28P01")

    def _scram_final(self, data: bytes) -> None:
        if self._scram_state != "final":
            raise ProtocolError("unexpected AuthenticationSASLFinal")
        self._scram_state = "failed"
        text = _scram_text(data)
        if text.startswith("e="):
            raise AuthenticationError(f"the server refused SCRAM authentication: {text[2:]}", sqlstate="28P01")
        attrs = _scram_attributes(text)
        try:
            signature = b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise ProtocolError("malformed SCRAM server-final-message") from None
        if not signature or not hmac.compare_digest(signature, self._server_signature):
            raise UntrustedServerError("the server failed SCRAM verification: its signature does not prove it "
                                       "knows the verifier")
        self._scram_state = "verified"


def _scram_attributes(text: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1 or key in attrs:
            raise ProtocolError("malformed SCRAM message")
        attrs[key] = value
    return attrs


def _parse_server_first(text: str, client_nonce: str) -> tuple[str, bytes, int]:
    """(the combined nonce, salt, iterations) of a server-first-message."""
    if text.startswith("m="):
        raise ProtocolError("malformed SCRAM server-first-message: mandatory extension")
    attrs = _scram_attributes(text)
    nonce = attrs.get("r", "")
    if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
        raise ProtocolError("malformed SCRAM server-first-message: the nonce does not extend ours")
    if not all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce):
        raise ProtocolError("malformed SCRAM server-first-message: bad nonce")
    try:
        salt = b64decode(attrs.get("s", ""), validate=True)
        iterations = int(attrs.get("i", ""))
    except ValueError:
        raise ProtocolError("malformed SCRAM server-first-message: bad salt or iteration count") from None
    if not salt or not 1 <= iterations <= MAX_SCRAM_ITERATIONS:
        raise ProtocolError("malformed SCRAM server-first-message: bad salt or iteration count")
    return nonce, salt, iterations
