"""The protocol layer's errors: what a peer did wrong, with the SQLSTATE to report it under."""

from __future__ import annotations


class ProtocolError(Exception):
    """The remote peer broke the protocol, or sent something we refuse.

    ``sqlstate`` is the PostgreSQL SQLSTATE to report it under (MySQL code maps it to an
    errno); ``fatal`` says whether the connection must be closed.
    """

    sqlstate: str = "08P01"  # protocol_violation

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class FrameError(ProtocolError):
    """A message header is impossible: length below the minimum or above the configured maximum."""


class StartupError(ProtocolError):
    """The startup packet is malformed or asks for something we do not offer."""


class AuthenticationError(ProtocolError):
    """Authentication failed or the exchange was malformed."""

    sqlstate = "28P01"  # invalid_password


class LocalProtocolError(Exception):
    """We misused a protocol object (a bug in the caller, never the peer's fault)."""
