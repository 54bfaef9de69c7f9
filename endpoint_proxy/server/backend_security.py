"""How far the proxy trusts its servers: TLS verification, and what a server may ask it to log in with."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..config import ClusterConfig

TLS_OFF = "off"
TLS_PREFER = "prefer"
TLS_REQUIRE = "require"
TLS_VERIFY_CA = "verify-ca"
TLS_VERIFY_FULL = "verify-full"


@dataclass(frozen=True)
class BackendSecurity:
    """One cluster's rules for the connections the proxy opens to its servers.

    ``tls_mode``: off, prefer (TLS when the server offers it), require (TLS, unverified),
    verify-ca (the certificate chains to ``backend_ca_file``), verify-full (and names the
    instance's host or IP). ``tls_context`` is the context to use (None: unverified).
    ``auth_methods``: what a server may ask for (config's ``backend_auth``); None means the
    protocol's default. MySQL: ``server_public_key`` (PEM) for caching_sha2_password's full
    authentication without TLS; ``allow_public_key_retrieval`` lets the server send its own.
    """

    tls_mode: str = TLS_OFF
    tls_context: ssl.SSLContext | None = None
    auth_methods: tuple[str, ...] | None = None
    server_public_key: bytes | None = None
    allow_public_key_retrieval: bool = False

    def __post_init__(self) -> None:
        # A verifying mode never falls back to an unverified handshake: without a context
        # of its own it verifies against the system's CAs.
        if self.tls_context is None and self.tls_mode in (TLS_VERIFY_CA, TLS_VERIFY_FULL):
            object.__setattr__(self, "tls_context", _system_context(self.tls_mode))

    @property
    def tls_wanted(self) -> bool:
        return self.tls_mode != TLS_OFF

    @property
    def tls_required(self) -> bool:
        return self.tls_mode not in (TLS_OFF, TLS_PREFER)


def backend_tls_context(mode: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The client context of a verifying mode (None for the others: TLS without checks).
    Reads ``ca_file`` (default: the system's CAs); raises OSError or ssl.SSLError."""
    if mode not in (TLS_VERIFY_CA, TLS_VERIFY_FULL):
        return None
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = mode == TLS_VERIFY_FULL
    return ctx


@functools.cache
def _system_context(mode: str) -> ssl.SSLContext | None:
    return backend_tls_context(mode, None)


def make_backend_security(config: ClusterConfig) -> BackendSecurity:
    """A cluster's rules from its configuration; reads the CA and public key files (raises
    OSError or ssl.SSLError when they cannot be used). Call off the event loop."""
    key = Path(config.server_public_key_file).read_bytes() if config.server_public_key_file else None
    return BackendSecurity(
        tls_mode=config.backend_tls,
        tls_context=backend_tls_context(config.backend_tls, config.backend_ca_file),
        auth_methods=config.backend_auth,
        server_public_key=key,
        allow_public_key_retrieval=config.allow_public_key_retrieval,
    )
