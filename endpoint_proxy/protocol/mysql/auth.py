"""MySQL authentication, both sides: mysql_native_password and caching_sha2_password as server and as client.

Rules of this file: every exchange is a small state machine fed with packet payloads and
returning payloads (the caller frames them with the next sequence id); nothing here reads
a socket or a clock. A wrong password is ``MySQLAuthenticationError`` (errno 1045,
SQLSTATE 28000, the server's own wording); a malformed exchange is ``MySQLProtocolError``.

The server side keeps no password: mysql_native_password verifies against
SHA1(SHA1(password)) (``native_password_hash``), caching_sha2_password against
SHA256(SHA256(password)) (``caching_sha2_digest``), which serves both its fast path (the
"cache") and its full path (a cleartext password over TLS, or one RSA-encrypted with the
server's key, is hashed and compared).

Passthrough: a client's mysql_native_password scramble, checked against SHA1(SHA1(password)),
yields SHA1(password) (``NativePasswordServerAuth.passthrough_stage1``), and that is all a
mysql_native_password login needs (``MyCredential(native_stage1=...)``): with a configured
``*HEX`` hash the proxy logs in for the client without ever knowing the password.

Cost: hashing is a few microseconds. RSA is not: decrypting with a 2048-bit private key
takes about a millisecond (``CachingSha2ServerAuth`` without TLS on a cache miss), and
encrypting a few tens of microseconds (``BackendAuthenticator`` without TLS); a caller on
an event loop may move the former to a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..errors import LocalProtocolError
from .errors import (
    ER_NOT_SUPPORTED_AUTH_MODE,
    MySQLAuthenticationError,
    MySQLProtocolError,
    access_denied,
)
from .handshake import (
    AUTH_MORE_DATA,
    AUTH_SWITCH_REQUEST,
    AuthMoreData,
    AuthSwitchRequest,
    decode_auth_more_data,
    decode_auth_switch_request,
)
from .packets import ERR_HEADER, OK_HEADER, OkPacket, decode_err, decode_ok

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

MYSQL_NATIVE_PASSWORD: Final = "mysql_native_password"
CACHING_SHA2_PASSWORD: Final = "caching_sha2_password"
MYSQL_CLEAR_PASSWORD: Final = "mysql_clear_password"
SCRAMBLE_LENGTH: Final = 20

# caching_sha2_password: the status byte of the server's AuthMoreData, and the client's key request.
FAST_AUTH_SUCCESS: Final = 0x03
PERFORM_FULL_AUTHENTICATION: Final = 0x04
REQUEST_PUBLIC_KEY: Final = 0x02
FAST_AUTH_SUCCESS_PACKET: Final = AuthMoreData(bytes((FAST_AUTH_SUCCESS,))).encode()
PERFORM_FULL_AUTH_PACKET: Final = AuthMoreData(bytes((PERFORM_FULL_AUTHENTICATION,))).encode()

# CR_AUTH_PLUGIN_CANNOT_LOAD: what a client library reports for a plugin it does not have.
CR_AUTH_PLUGIN_CANNOT_LOAD: Final = 2059
# CR_AUTH_PLUGIN_ERR: what libmysqlclient reports when caching_sha2_password's full
# authentication would need a key it may not ask the server for ("requires secure connection").
CR_AUTH_PLUGIN_ERR: Final = 2061

BACKEND_PLUGINS: Final = (MYSQL_NATIVE_PASSWORD, CACHING_SHA2_PASSWORD, MYSQL_CLEAR_PASSWORD)
DEFAULT_BACKEND_PLUGINS: Final = (MYSQL_NATIVE_PASSWORD, CACHING_SHA2_PASSWORD)

# Nonce bytes as servers make them: printable ASCII, no NUL (a C string ends there) and no '$'.
_NONCE_ALPHABET: Final = bytes(c for c in range(0x21, 0x7F) if c != 0x24)


def _oaep() -> Any:
    """RSA-OAEP with SHA-1, as MySQL's clients and servers use it. cryptography is imported here,
    when a password is RSA-encrypted: most proxies never do, and it is megabytes of memory."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def make_nonce() -> bytes:
    """A fresh 20-byte authentication nonce (the "scramble" of HandshakeV10 and AuthSwitchRequest)."""
    return bytes(secrets.choice(_NONCE_ALPHABET) for _ in range(SCRAMBLE_LENGTH))


def _secret(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else password


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _nonce20(nonce: bytes) -> bytes:
    if len(nonce) < SCRAMBLE_LENGTH:
        raise MySQLProtocolError(f"Malformed communication packet: a {len(nonce)}-byte authentication nonce")
    return nonce[:SCRAMBLE_LENGTH]


# --- the hashes ---------------------------------------------------------------------------------


def native_password_hash(password: str | bytes) -> bytes:
    """What a server keeps for mysql_native_password: SHA1(SHA1(password)) (mysql.user's hash, unhexed)."""
    return hashlib.sha1(hashlib.sha1(_secret(password)).digest()).digest()


def parse_native_hash(text: str) -> bytes:
    """mysql.user's stored form ``*`` + 40 hex digits (``PASSWORD()``) as SHA1(SHA1(password)).
    Raises ValueError for anything else."""
    if len(text) != 41 or not text.startswith("*"):
        raise ValueError("a mysql_native_password hash is '*' and 40 hex digits")
    return bytes.fromhex(text[1:])


def scramble_native_password(password: str | bytes, nonce: bytes) -> bytes:
    """The client's proof: SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password))); empty for no password."""
    secret = _secret(password)
    if not secret:
        return b""
    return scramble_native_stage1(hashlib.sha1(secret).digest(), nonce)


def scramble_native_stage1(stage1: bytes, nonce: bytes) -> bytes:
    """The client's proof from SHA1(password) alone (passthrough)."""
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(_nonce20(nonce) + stage2).digest())


def native_stage1(scramble: bytes, nonce: bytes, password_hash: bytes) -> bytes | None:
    """SHA1(password), recovered from a client's proof, when it verifies against the hash."""
    if len(scramble) != len(password_hash) or len(password_hash) != hashlib.sha1().digest_size:
        return None
    stage1 = _xor(scramble, hashlib.sha1(_nonce20(nonce) + password_hash).digest())
    return stage1 if hmac.compare_digest(hashlib.sha1(stage1).digest(), password_hash) else None


def check_native_scramble(scramble: bytes, nonce: bytes, password_hash: bytes) -> bool:
    """SHA1(scramble XOR SHA1(nonce + hash)) == hash: the proof without the password."""
    return native_stage1(scramble, nonce, password_hash) is not None


def caching_sha2_digest(password: str | bytes) -> bytes:
    """What caching_sha2_password's fast path checks against: SHA256(SHA256(password))."""
    return hashlib.sha256(hashlib.sha256(_secret(password)).digest()).digest()


def scramble_caching_sha2(password: str | bytes, nonce: bytes) -> bytes:
    """SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce); empty for no password."""
    secret = _secret(password)
    if not secret:
        return b""
    stage1 = hashlib.sha256(secret).digest()
    stage2 = hashlib.sha256(stage1).digest()
    return _xor(stage1, hashlib.sha256(stage2 + _nonce20(nonce)).digest())


def check_caching_sha2_scramble(scramble: bytes, nonce: bytes, digest: bytes) -> bool:
    if len(scramble) != len(digest) or len(digest) != hashlib.sha256().digest_size:
        return False
    stage1 = _xor(scramble, hashlib.sha256(digest + _nonce20(nonce)).digest())
    return hmac.compare_digest(hashlib.sha256(stage1).digest(), digest)


def _xor_nonce(data: bytes, nonce: bytes) -> bytes:
    """XOR with the nonce repeated (how the password is obfuscated before RSA encryption)."""
    n = len(nonce)
    return bytes(b ^ nonce[i % n] for i, b in enumerate(data))


def public_key_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) a server sends a client that asks for its public key."""
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_encrypt_password(password: str | bytes, nonce: bytes, public_pem: bytes) -> bytes:
    """caching_sha2_password's full authentication without TLS: RSA-OAEP(password + NUL XOR nonce)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise MySQLProtocolError("Malformed communication packet: the server's public key is not a PEM key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise MySQLProtocolError("Malformed communication packet: the server's public key is not an RSA key")
    plain = _xor_nonce(_secret(password) + b"\0", _nonce20(nonce))
    try:
        return key.encrypt(plain, _oaep())
    except ValueError:
        raise MySQLAuthenticationError("the password is too long for the server's RSA key") from None


def rsa_decrypt_password(ciphertext: bytes, nonce: bytes, private_key: rsa.RSAPrivateKey) -> bytes | None:
    """The password a client RSA-encrypted (without its NUL), or None when it does not decrypt."""
    try:
        plain = private_key.decrypt(ciphertext, _oaep())
    except ValueError:
        return None
    password = _xor_nonce(plain, _nonce20(nonce))
    if not password.endswith(b"\0"):
        return None
    return password[:-1]


# --- server side: the proxy authenticates a client ----------------------------------------------


class ServerAuth(Protocol):
    """One client login (or COM_CHANGE_USER).

    ``start()`` gives the plugin name and nonce to put in HandshakeV10. The first
    ``step()`` takes the client's auth response and plugin name from HandshakeResponse41
    (None when the client sent none: mysql_native_password); later steps take each
    following packet's payload. ``step`` returns (payload to send or None, done). When
    done, send the payload if any (caching_sha2_password's fast-auth-success), then an OK
    packet. Raises ``MySQLAuthenticationError`` on a wrong password, ``MySQLProtocolError``
    on a malformed exchange.
    """

    plugin: str
    nonce: bytes

    def start(self) -> tuple[str, bytes]: ...

    def step(self, data: bytes, client_plugin: str | None = None) -> tuple[bytes | None, bool]: ...


class _ServerAuthBase:
    plugin: str = ""

    def __init__(self, user: str, host: str, nonce: bytes | None) -> None:
        self.user = user
        self.host = host
        self.nonce = make_nonce() if nonce is None else nonce
        if len(self.nonce) != SCRAMBLE_LENGTH:
            raise LocalProtocolError("an authentication nonce is 20 bytes")
        self._state = "start"

    def start(self) -> tuple[str, bytes]:
        if self._state != "start":
            raise LocalProtocolError("authentication already started")
        self._state = "handshake"
        return self.plugin, self.nonce

    def step(self, data: bytes, client_plugin: str | None = None) -> tuple[bytes | None, bool]:
        state = self._state
        self._state = "failed"  # until this step succeeds
        if state == "handshake":
            plugin = MYSQL_NATIVE_PASSWORD if client_plugin is None else client_plugin
            if plugin != self.plugin:
                if client_plugin is None:
                    raise MySQLAuthenticationError(
                        "Client does not support authentication protocol requested by server; "
                        "consider upgrading MySQL client",
                        errno=ER_NOT_SUPPORTED_AUTH_MODE,
                        sqlstate="08004",
                    )
                self._state = "switched"
                return AuthSwitchRequest(self.plugin, self.nonce + b"\0").encode(), False
            return self._verify(data)
        if state == "switched":
            return self._verify(data)
        if state in ("start", "done", "failed"):
            raise MySQLProtocolError(f"Malformed communication packet: authentication data in state {state}")
        return self._continue(state, data)

    def _verify(self, data: bytes) -> tuple[bytes | None, bool]:
        raise NotImplementedError

    def _continue(self, state: str, data: bytes) -> tuple[bytes | None, bool]:
        raise MySQLProtocolError(f"Malformed communication packet: authentication data in state {state}")

    def _denied(self, *, using_password: bool) -> MySQLAuthenticationError:
        return access_denied(self.user, self.host, using_password=using_password)

    def _ok(self, reply: bytes | None = None) -> tuple[bytes | None, bool]:
        self._state = "done"
        return reply, True


class NativePasswordServerAuth(_ServerAuthBase):
    """mysql_native_password against SHA1(SHA1(password)) (``native_password_hash``)."""

    plugin = MYSQL_NATIVE_PASSWORD

    def __init__(self, user: str, host: str, password_hash: bytes, nonce: bytes | None = None) -> None:
        super().__init__(user, host, nonce)
        self._hash = password_hash
        self._empty = hmac.compare_digest(password_hash, native_password_hash(b""))
        self._stage1: bytes | None = None

    def __repr__(self) -> str:
        return f"NativePasswordServerAuth(user={self.user!r}, state={self._state!r})"

    def passthrough_stage1(self) -> bytes | None:
        """After a successful login with a password: SHA1(password), which logs in to servers
        keeping the same hash (``MyCredential(native_stage1=...)``)."""
        return self._stage1 if self._state == "done" else None

    def _verify(self, data: bytes) -> tuple[bytes | None, bool]:
        if not data:
            if self._empty:
                return self._ok()
            raise self._denied(using_password=False)
        stage1 = None if self._empty else native_stage1(data, self.nonce, self._hash)
        if stage1 is None:
            raise self._denied(using_password=True)
        self._stage1 = stage1
        return self._ok()


class CachingSha2ServerAuth(_ServerAuthBase):
    """caching_sha2_password against SHA256(SHA256(password)) (``caching_sha2_digest``).

    ``cached`` says whether the fast path may be used (as a MySQL server whose cache holds
    the account); when False every login takes the full path, as the first one after a
    server restart does: over TLS (``tls``) the client sends its password in clear, without
    it the client asks for the public key of ``private_key`` and sends the password
    RSA-encrypted. Without TLS and without a key the full path fails.
    """

    plugin = CACHING_SHA2_PASSWORD

    def __init__(
        self,
        user: str,
        host: str,
        digest: bytes,
        *,
        tls: bool,
        private_key: rsa.RSAPrivateKey | None = None,
        cached: bool = True,
        nonce: bytes | None = None,
    ) -> None:
        super().__init__(user, host, nonce)
        self._digest = digest
        self._empty = hmac.compare_digest(digest, caching_sha2_digest(b""))
        self.tls = tls
        self.private_key = private_key
        self.cached = cached

    def _verify(self, data: bytes) -> tuple[bytes | None, bool]:
        if not data or data == b"\0":
            if self._empty:
                return self._ok()
            raise self._denied(using_password=False)
        if self._empty:
            raise self._denied(using_password=True)
        if self.cached:
            if not check_caching_sha2_scramble(data, self.nonce, self._digest):
                raise self._denied(using_password=True)
            return self._ok(FAST_AUTH_SUCCESS_PACKET)
        if len(data) != hashlib.sha256().digest_size:
            raise self._denied(using_password=True)
        self._state = "full"
        return PERFORM_FULL_AUTH_PACKET, False

    def _continue(self, state: str, data: bytes) -> tuple[bytes | None, bool]:
        if state == "full" and self.tls:
            if not data.endswith(b"\0"):
                raise MySQLProtocolError("Malformed communication packet: the cleartext password has no NUL")
            return self._check_password(data[:-1])
        if state == "full" and data == bytes((REQUEST_PUBLIC_KEY,)):
            if self.private_key is None:
                raise self._denied(using_password=True)
            self._state = "key_sent"
            return AuthMoreData(public_key_pem(self.private_key)).encode(), False
        if state in ("full", "key_sent"):
            if self.private_key is None:
                raise self._denied(using_password=True)
            password = rsa_decrypt_password(data, self.nonce, self.private_key)
            if password is None:
                raise self._denied(using_password=True)
            return self._check_password(password)
        return super()._continue(state, data)

    def _check_password(self, password: bytes) -> tuple[bytes | None, bool]:
        if not hmac.compare_digest(caching_sha2_digest(password), self._digest):
            raise self._denied(using_password=True)
        return self._ok()


# --- client side: the proxy authenticates to a backend ------------------------------------------


@dataclass(frozen=True, slots=True)
class MyCredential:
    """What the proxy can log in to a server with, for one user: the password, or SHA1(password)
    recovered from the client's own mysql_native_password login (enough for that plugin only).
    Nothing of it shows in a repr."""

    password: str | None = field(default=None, repr=False)
    native_stage1: bytes | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        held = [n for n, v in (("password", self.password), ("native passthrough", self.native_stage1))
                if v is not None]
        return f"MyCredential({', '.join(held) or 'nothing'})"


class BackendAuthenticator:
    """Logs in to a MySQL/MariaDB server as ``user``: mysql_native_password, caching_sha2_password, cleartext.

    ``start(plugin, nonce)`` with the HandshakeV10's values gives the plugin name and
    auth response for HandshakeResponse41 (a plugin it does not speak or may not use is
    answered with mysql_native_password, and the server switches or refuses). Then feed every
    packet the server sends to ``respond``; send back what it returns unless None. ``done``
    turns True at the OK packet (kept as ``ok``); an ERR raises ``MySQLAuthenticationError``
    carrying the server's errno, SQLSTATE and message.

    ``allowed`` (config's ``backend_auth``; None: ``DEFAULT_BACKEND_PLUGINS``) are the plugins
    a server may switch the login to;
    mysql_clear_password also needs ``tls``. caching_sha2_password's full authentication
    sends the password in clear only when ``tls`` is True; otherwise it RSA-encrypts it with
    ``server_public_key`` (PEM, configured), and asks the server for its key only when
    ``allow_public_key_retrieval`` (a key from the server itself proves nothing: a
    man in the middle would send its own). ``capabilities`` (those sent in
    HandshakeResponse41) decode the final OK's session state.
    """

    def __init__(
        self,
        user: str,
        credential: MyCredential | str | None,
        *,
        tls: bool = False,
        server_public_key: bytes | None = None,
        allow_public_key_retrieval: bool = False,
        allowed: Collection[str] | None = None,
        capabilities: int = 0,
    ) -> None:
        self.user = user
        self.capabilities = capabilities
        self.credential = MyCredential(password=credential) if isinstance(credential, str) or credential is None \
            else credential
        self.tls = tls
        self.server_public_key = server_public_key
        self.allow_public_key_retrieval = allow_public_key_retrieval
        self.allowed = frozenset(DEFAULT_BACKEND_PLUGINS if allowed is None else allowed)
        self.plugin = ""
        self.done = False
        self.ok: OkPacket | None = None
        self._nonce = b""
        self._sha2_state = "none"  # none -> scrambled -> fast_ok | full -> key_requested -> sent

    def __repr__(self) -> str:
        return f"BackendAuthenticator(user={self.user!r}, plugin={self.plugin!r}, done={self.done})"

    def start(self, plugin: str, auth_data: bytes) -> tuple[str, bytes]:
        if plugin not in self.allowed or plugin == MYSQL_CLEAR_PASSWORD and not self.tls \
                or plugin == CACHING_SHA2_PASSWORD and self.credential.password is None:
            plugin = MYSQL_NATIVE_PASSWORD
        return plugin, self._answer(plugin, auth_data)

    def _answer(self, plugin: str, nonce: bytes) -> bytes:
        self.plugin = plugin
        self._nonce = nonce
        if plugin not in BACKEND_PLUGINS:
            raise MySQLAuthenticationError(
                f"Authentication plugin '{plugin}' cannot be loaded: not supported by the proxy",
                errno=CR_AUTH_PLUGIN_CANNOT_LOAD,
                sqlstate="HY000",
            )
        if plugin not in self.allowed:
            raise MySQLAuthenticationError(
                f"Authentication plugin '{plugin}' is not allowed by backend_auth "
                f"(allowed: {', '.join(sorted(self.allowed))})",
                errno=CR_AUTH_PLUGIN_CANNOT_LOAD,
                sqlstate="HY000",
            )
        if plugin == MYSQL_NATIVE_PASSWORD:
            return self._native(nonce)
        if plugin == CACHING_SHA2_PASSWORD:
            self._sha2_state = "scrambled"
            password = self._password(plugin)
            return scramble_caching_sha2(password, nonce) if password else b""
        if not self.tls:
            raise MySQLAuthenticationError(
                "the server asked for the password in clear (mysql_clear_password) over a connection without TLS",
                errno=CR_AUTH_PLUGIN_CANNOT_LOAD,
                sqlstate="HY000",
            )
        return self._password(plugin).encode("utf-8") + b"\0"

    def _native(self, nonce: bytes) -> bytes:
        if self.credential.password is not None:
            password = self.credential.password
            return scramble_native_password(password, nonce) if password else b""
        if self.credential.native_stage1 is not None:
            return scramble_native_stage1(self.credential.native_stage1, nonce)
        return b""  # no password: the server says whether the account has none

    def _password(self, plugin: str) -> str:
        if self.credential.password is None:
            raise MySQLAuthenticationError(
                f"Authentication plugin '{plugin}' needs the password of '{self.user}', which the proxy does not know "
                "(it has only what the client proved with mysql_native_password)",
                errno=CR_AUTH_PLUGIN_ERR,
                sqlstate="HY000",
            )
        return self.credential.password

    def respond(self, payload: bytes) -> bytes | None:
        """The server's next packet during authentication; returns the payload to answer with, or None."""
        if self.done:
            raise MySQLProtocolError("Malformed communication packet: authentication data after the OK")
        if not payload:
            raise MySQLProtocolError("Malformed communication packet: an empty authentication packet")
        first = payload[0]
        if first == OK_HEADER:
            self.ok = decode_ok(payload, self.capabilities)
            self.done = True
            return None
        if first == ERR_HEADER:
            err = decode_err(payload)
            raise MySQLAuthenticationError(err.message, errno=err.errno, sqlstate=err.sqlstate)
        if first == AUTH_SWITCH_REQUEST:
            switch = decode_auth_switch_request(payload)
            data = switch.data[:-1] if switch.data.endswith(b"\0") else switch.data
            self._sha2_state = "none"
            return self._answer(switch.plugin_name, data)
        if first == AUTH_MORE_DATA and self.plugin == CACHING_SHA2_PASSWORD:
            return self._sha2_more(decode_auth_more_data(payload).data)
        raise MySQLProtocolError(
            f"Malformed communication packet: unexpected {first:#04x} during {self.plugin or 'authentication'}"
        )

    def _sha2_more(self, data: bytes) -> bytes | None:
        state = self._sha2_state
        if state == "scrambled" and data == bytes((FAST_AUTH_SUCCESS,)):
            self._sha2_state = "fast_ok"
            return None
        if state == "scrambled" and data == bytes((PERFORM_FULL_AUTHENTICATION,)):
            password = self._password(CACHING_SHA2_PASSWORD)
            if self.tls:
                self._sha2_state = "sent"
                return password.encode("utf-8") + b"\0"
            if self.server_public_key is not None:
                self._sha2_state = "sent"
                return rsa_encrypt_password(password, self._nonce, self.server_public_key)
            if not self.allow_public_key_retrieval:
                raise MySQLAuthenticationError(
                    "Authentication plugin 'caching_sha2_password' reported error: Authentication requires secure "
                    "connection (use backend_tls, or server_public_key_file, or allow_public_key_retrieval = true)",
                    errno=CR_AUTH_PLUGIN_ERR,
                    sqlstate="HY000",
                )
            self._sha2_state = "key_requested"
            return bytes((REQUEST_PUBLIC_KEY,))
        if state == "key_requested":
            self._sha2_state = "sent"
            return rsa_encrypt_password(self._password(CACHING_SHA2_PASSWORD), self._nonce, data)
        raise MySQLProtocolError(f"Malformed communication packet: unexpected caching_sha2_password data in {state}")
