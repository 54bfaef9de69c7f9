"""MySQL/MariaDB protocol constants: capability flags, server status flags, character sets, session trackers.

Capabilities are one 64-bit integer throughout this package: the low 32 bits are MySQL's
``CLIENT_*`` flags, the high 32 bits MariaDB's extended ``MARIADB_CLIENT_*`` flags (sent in
the handshake's reserved bytes when the server clears ``CLIENT_MYSQL``).
"""

from __future__ import annotations

from typing import Final

# --- capability flags -----------------------------------------------------------------------

CLIENT_LONG_PASSWORD: Final = 1 << 0
CLIENT_MYSQL: Final = CLIENT_LONG_PASSWORD  # MariaDB's name: clear in a MariaDB server's handshake
CLIENT_FOUND_ROWS: Final = 1 << 1
CLIENT_LONG_FLAG: Final = 1 << 2
CLIENT_CONNECT_WITH_DB: Final = 1 << 3
CLIENT_NO_SCHEMA: Final = 1 << 4
CLIENT_COMPRESS: Final = 1 << 5
CLIENT_ODBC: Final = 1 << 6
CLIENT_LOCAL_FILES: Final = 1 << 7
CLIENT_IGNORE_SPACE: Final = 1 << 8
CLIENT_PROTOCOL_41: Final = 1 << 9
CLIENT_INTERACTIVE: Final = 1 << 10
CLIENT_SSL: Final = 1 << 11
CLIENT_IGNORE_SIGPIPE: Final = 1 << 12
CLIENT_TRANSACTIONS: Final = 1 << 13
CLIENT_RESERVED: Final = 1 << 14
CLIENT_SECURE_CONNECTION: Final = 1 << 15
CLIENT_MULTI_STATEMENTS: Final = 1 << 16
CLIENT_MULTI_RESULTS: Final = 1 << 17
CLIENT_PS_MULTI_RESULTS: Final = 1 << 18
CLIENT_PLUGIN_AUTH: Final = 1 << 19
CLIENT_CONNECT_ATTRS: Final = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: Final = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS: Final = 1 << 22
CLIENT_SESSION_TRACK: Final = 1 << 23
CLIENT_DEPRECATE_EOF: Final = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA: Final = 1 << 25
CLIENT_ZSTD_COMPRESSION_ALGORITHM: Final = 1 << 26
CLIENT_QUERY_ATTRIBUTES: Final = 1 << 27
CLIENT_MULTI_FACTOR_AUTHENTICATION: Final = 1 << 28
CLIENT_CAPABILITY_EXTENSION: Final = 1 << 29
CLIENT_SSL_VERIFY_SERVER_CERT: Final = 1 << 30
CLIENT_REMEMBER_OPTIONS: Final = 1 << 31

MARIADB_CLIENT_PROGRESS: Final = 1 << 32
MARIADB_CLIENT_COM_MULTI: Final = 1 << 33
MARIADB_CLIENT_STMT_BULK_OPERATIONS: Final = 1 << 34
MARIADB_CLIENT_EXTENDED_METADATA: Final = 1 << 35
MARIADB_CLIENT_CACHE_METADATA: Final = 1 << 36
MARIADB_CLIENT_BULK_UNIT_RESULTS: Final = 1 << 37

MARIADB_CAPABILITIES_MASK: Final = 0xFFFFFFFF_00000000

# --- server status flags (OK and EOF packets) -------------------------------------------------

SERVER_STATUS_IN_TRANS: Final = 0x0001
SERVER_STATUS_AUTOCOMMIT: Final = 0x0002
SERVER_MORE_RESULTS_EXISTS: Final = 0x0008
SERVER_QUERY_NO_GOOD_INDEX_USED: Final = 0x0010
SERVER_QUERY_NO_INDEX_USED: Final = 0x0020
SERVER_STATUS_CURSOR_EXISTS: Final = 0x0040
SERVER_STATUS_LAST_ROW_SENT: Final = 0x0080
SERVER_STATUS_DB_DROPPED: Final = 0x0100
SERVER_STATUS_NO_BACKSLASH_ESCAPES: Final = 0x0200
SERVER_STATUS_METADATA_CHANGED: Final = 0x0400
SERVER_QUERY_WAS_SLOW: Final = 0x0800
SERVER_PS_OUT_PARAMS: Final = 0x1000
SERVER_STATUS_IN_TRANS_READONLY: Final = 0x2000
SERVER_SESSION_STATE_CHANGED: Final = 0x4000

# --- session state trackers (OK packet, CLIENT_SESSION_TRACK) ---------------------------------

SESSION_TRACK_SYSTEM_VARIABLES: Final = 0x00  # data: lenenc name, lenenc value (MariaDB's last_gtid too)
SESSION_TRACK_SCHEMA: Final = 0x01  # data: lenenc schema name
SESSION_TRACK_STATE_CHANGE: Final = 0x02  # data: lenenc "1"
SESSION_TRACK_GTIDS: Final = 0x03  # data: 1-byte encoding specification, lenenc GTID set
SESSION_TRACK_TRANSACTION_CHARACTERISTICS: Final = 0x04  # data: lenenc SQL text
SESSION_TRACK_TRANSACTION_STATE: Final = 0x05  # data: lenenc 8-character state

# --- character sets (collation ids as sent in the handshake) ----------------------------------

LATIN1_SWEDISH_CI: Final = 8
UTF8MB3_GENERAL_CI: Final = 33
UTF8MB4_GENERAL_CI: Final = 45
UTF8MB4_BIN: Final = 46
BINARY: Final = 63
UTF8MB4_UNICODE_CI: Final = 224
UTF8MB4_0900_AI_CI: Final = 255

# Python codecs for the collation ids whose text the proxy reads (names, queries).
CHARSET_CODECS: Final[dict[int, str]] = {
    LATIN1_SWEDISH_CI: "latin-1",
    UTF8MB3_GENERAL_CI: "utf-8",
    UTF8MB4_GENERAL_CI: "utf-8",
    UTF8MB4_BIN: "utf-8",
    BINARY: "latin-1",
    UTF8MB4_UNICODE_CI: "utf-8",
    UTF8MB4_0900_AI_CI: "utf-8",
}

# Character set names of collation ids (the handshake's): the ones a lexer must know about, the multibyte sets
# whose second byte may look like ASCII (big5, sjis, gbk, cp932, gb18030), and the common single-byte and
# Unicode ones. An id not here is an unknown character set.
_COLLATION_RANGES: Final = (
    ((1, 84), "big5"), ((13, 88), "sjis"), ((28, 87), "gbk"), ((95, 96), "cp932"), ((248, 249, 250), "gb18030"),
    ((5, 8, 15, 31, 47, 48, 49, 94), "latin1"), ((11, 65), "ascii"), ((63,), "binary"),
    ((33, 83, *range(192, 216)), "utf8mb3"), ((45, 46, *range(224, 248), *range(255, 324)), "utf8mb4"),
)
COLLATION_CHARSETS: Final[dict[int, str]] = {i: name for ids, name in _COLLATION_RANGES for i in ids}

# --- COM_STMT_EXECUTE cursor flags -----------------------------------------------------------

CURSOR_TYPE_NO_CURSOR: Final = 0x00
CURSOR_TYPE_READ_ONLY: Final = 0x01
CURSOR_TYPE_FOR_UPDATE: Final = 0x02
CURSOR_TYPE_SCROLLABLE: Final = 0x04
PARAMETER_COUNT_AVAILABLE: Final = 0x08  # MySQL 8.0.26+: a parameter count follows (query attributes)

# --- COM_SET_OPTION ---------------------------------------------------------------------------

MYSQL_OPTION_MULTI_STATEMENTS_ON: Final = 0
MYSQL_OPTION_MULTI_STATEMENTS_OFF: Final = 1
