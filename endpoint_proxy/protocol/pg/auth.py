"""PostgreSQL authentication, both sides: the proxy as server (SCRAM, md5, password) and as client.

Rules of this file: every exchange is a small state machine fed with message payloads and
returning framed bytes; nothing here reads a socket or a clock. SCRAM arithmetic is
scramp's. A wrong password is ``AuthenticationError`` (28P01); a malformed exchange is
``ProtocolError`` (08P01); a method we cannot speak is ``AuthenticationError`` (28000).

Cost: ``make_scram_secret`` and ``BackendAuthenticator.respond`` to a SASL challenge run
PBKDF2 (``iterations`` HMACs, a few ms at 4096); callers cache the former and may run the
latter in a thread. ``ScramServerAuth`` only does a few HMACs per login.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from base64 import b64decode
from dataclasses import dataclass
from typing import Final, Protocol

import scramp

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
    stored_key: bytes
    server_key: bytes


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
        self._auth_info = (secret.salt, secret.stored_key, secret.server_key, secret.iterations)
        self._server = scramp.ScramMechanism(SCRAM_SHA_256).make_server(self._lookup)
        self._state = "start"  # start -> first -> final -> done | failed

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
        return AuthenticationSASLFinal(server_final.encode("utf-8")).encode() + _AUTH_OK


def _scram_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("malformed SCRAM message: invalid UTF-8") from None


def md5_password_hash(user: str, password: str, salt: bytes) -> str:
    """What a client sends for md5: 'md5' + md5(md5(password + user).hex + salt).hex."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest().encode("ascii")
    return "md5" + hashlib.md5(inner + salt).hexdigest()


class _PasswordServerAuth:
    """Shared shape of the one-round password methods."""

    def __init__(self, user: str) -> None:
        self.user = user
        self._state = "start"  # start -> sent -> done | failed

    def _request(self) -> bytes:
        raise NotImplementedError

    def _expected(self) -> bytes:
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
        if not given or not hmac.compare_digest(given, self._expected()):
            raise _password_failed(self.user)
        self._state = "done"
        return _AUTH_OK, True


class Md5ServerAuth(_PasswordServerAuth):
    """md5: the client proves it knows the password with a salted double MD5."""

    def __init__(self, user: str, password: str, salt: bytes | None = None) -> None:
        super().__init__(user)
        self.salt = secrets.token_bytes(4) if salt is None else salt
        if len(self.salt) != 4:
            raise ValueError("the md5 salt is 4 bytes")
        self._hash = md5_password_hash(user, password, self.salt).encode("ascii")

    def _request(self) -> bytes:
        return AuthenticationMD5Password(self.salt).encode()

    def _expected(self) -> bytes:
        return self._hash


class CleartextServerAuth(_PasswordServerAuth):
    """password: the client sends the password itself (use only over TLS)."""

    def __init__(self, user: str, password: str) -> None:
        super().__init__(user)
        self._password = password.encode("utf-8")

    def _request(self) -> bytes:
        return AuthenticationCleartextPassword().encode()

    def _expected(self) -> bytes:
        return self._password


# --- client side: the proxy authenticates to a backend server ----------------------------


class BackendAuthenticator:
    """Answers a server's authentication requests: trust, cleartext, md5, SCRAM-SHA-256.

    Feed each decoded Authentication* message to ``respond``; send back what it returns
    (a framed 'p' message) unless None. ``done`` turns True at AuthenticationOk.
    """

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self.done = False
        self._scram: scramp.ScramClient | None = None
        self._scram_state = "none"  # none -> first -> final -> verified

    def respond(self, msg: AuthenticationMessage) -> bytes | None:
        if self.done:
            raise ProtocolError("authentication request after AuthenticationOk")
        if isinstance(msg, AuthenticationOk):
            if self._scram_state not in ("none", "verified"):
                raise AuthenticationError(
                    "server sent AuthenticationOk before completing SCRAM authentication",
                    sqlstate="28000",
                )
            self.done = True
            return None
        if isinstance(msg, AuthenticationCleartextPassword):
            return PasswordMessage(self._require_password()).encode()
        if isinstance(msg, AuthenticationMD5Password):
            hashed = md5_password_hash(self.user, self._require_password(), msg.salt)
            return PasswordMessage(hashed).encode()
        if isinstance(msg, AuthenticationSASL):
            return self._scram_start(msg.mechanisms)
        if isinstance(msg, AuthenticationSASLContinue):
            return self._scram_continue(msg.data)
        if isinstance(msg, AuthenticationSASLFinal):
            self._scram_final(msg.data)
            return None
        if not isinstance(msg, AuthenticationOther):
            raise LocalProtocolError(f"not an authentication request: {msg!r}")
        method = _OTHER_METHODS.get(msg.code, f"code {msg.code}")
        raise AuthenticationError(
            f"authentication method {method} requested by the server is not supported",
            sqlstate="28000",
        )

    def _require_password(self) -> str:
        if self.password is None:
            raise AuthenticationError(f'the server requested a password for user "{self.user}" and none is configured')
        return self.password

    def _scram_start(self, mechanisms: tuple[str, ...]) -> bytes:
        if self._scram_state != "none":
            raise ProtocolError("server restarted SASL authentication")
        if SCRAM_SHA_256 not in mechanisms:
            raise AuthenticationError(
                f"none of the server's SASL mechanisms is supported: {', '.join(mechanisms)}",
                sqlstate="28000",
            )
        client = self._scram_client(self._require_password())
        client_first: str = client.get_client_first()
        self._scram = client
        self._scram_state = "first"
        return SASLInitialResponse(SCRAM_SHA_256, client_first.encode("utf-8")).encode()

    def _scram_client(self, password: str) -> scramp.ScramClient:
        # The server ignores the name inside SCRAM messages (libpq sends none); scramp wants
        # a SASLprep-valid one, so a name it refuses is replaced by a placeholder.
        try:
            return scramp.ScramClient([SCRAM_SHA_256], self.user, password)
        except scramp.ScramException:
            pass
        try:
            return scramp.ScramClient([SCRAM_SHA_256], "user", password)
        except scramp.ScramException as exc:
            raise AuthenticationError(f"cannot use the password for SCRAM: {exc}") from None

    def _scram_continue(self, data: bytes) -> bytes:
        if self._scram is None or self._scram_state != "first":
            raise ProtocolError("unexpected AuthenticationSASLContinue")
        self._scram_state = "failed"
        try:
            self._scram.set_server_first(_scram_text(data))
            client_final: str = self._scram.get_client_final()
        except scramp.ScramException as exc:
            raise ProtocolError(f"malformed SCRAM server-first-message: {exc}") from None
        self._scram_state = "final"
        return SASLResponse(client_final.encode("utf-8")).encode()

    def _scram_final(self, data: bytes) -> None:
        if self._scram is None or self._scram_state != "final":
            raise ProtocolError("unexpected AuthenticationSASLFinal")
        self._scram_state = "failed"
        try:
            self._scram.set_server_final(_scram_text(data))
        except scramp.ScramException as exc:
            raise AuthenticationError(
                f"the server failed SCRAM verification (wrong server signature?): {exc}"
            ) from None
        self._scram_state = "verified"
