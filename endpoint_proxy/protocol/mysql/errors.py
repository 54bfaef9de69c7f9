"""MySQL protocol errors: ProtocolError subclasses that carry the errno and SQLSTATE a MySQL client expects."""

from __future__ import annotations

from typing import Final

from ..errors import AuthenticationError, FrameError, ProtocolError

# Server error numbers this package reports (MySQL and MariaDB agree on all of them).
ER_HANDSHAKE_ERROR: Final = 1043  # 08S01 "Bad handshake"
ER_ACCESS_DENIED_ERROR: Final = 1045  # 28000
ER_UNKNOWN_COM_ERROR: Final = 1047  # 08S01 "Unknown command"
ER_NET_PACKET_TOO_LARGE: Final = 1153  # 08S01
ER_NET_PACKETS_OUT_OF_ORDER: Final = 1156  # 08S01
ER_NOT_SUPPORTED_AUTH_MODE: Final = 1251  # 08004
ER_MALFORMED_PACKET: Final = 1835  # HY000
# MariaDB sends progress reports as an ERR packet with this errno (MARIADB_CLIENT_PROGRESS).
PROGRESS_REPORT_ERRNO: Final = 0xFFFF


class MySQLProtocolError(ProtocolError):
    """The peer broke the MySQL protocol (or sent something we refuse).

    ``errno`` and ``sqlstate`` are what to put in the ERR packet sent back
    (``handshake.err_packet``); unlike the base class, ``sqlstate`` is MySQL's own.
    """

    errno: int = ER_MALFORMED_PACKET
    sqlstate: str = "HY000"

    def __init__(self, message: str, *, errno: int | None = None, sqlstate: str | None = None) -> None:
        super().__init__(message, sqlstate=sqlstate)
        if errno is not None:
            self.errno = errno


class MySQLFrameError(MySQLProtocolError, FrameError):
    """A packet header is impossible: out of sequence, or a payload above the configured maximum."""

    errno = ER_NET_PACKETS_OUT_OF_ORDER
    sqlstate = "08S01"


class MySQLAuthenticationError(MySQLProtocolError, AuthenticationError):
    """Authentication failed: a wrong password, an unusable method, or a server's refusal."""

    errno = ER_ACCESS_DENIED_ERROR
    sqlstate = "28000"


def access_denied(user: str, host: str, *, using_password: bool) -> MySQLAuthenticationError:
    """The error a MySQL server reports for a failed login, word for word."""
    yes_no = "YES" if using_password else "NO"
    return MySQLAuthenticationError(f"Access denied for user '{user}'@'{host}' (using password: {yes_no})")
