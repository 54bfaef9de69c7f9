"""Hypothesis strategies and packet builders shared by the MySQL protocol tests."""

from __future__ import annotations

from hypothesis import strategies as st

from endpoint_proxy.protocol.mysql import commands as c
from endpoint_proxy.protocol.mysql import constants as k
from endpoint_proxy.protocol.mysql import handshake as hs
from endpoint_proxy.protocol.mysql import packets as p
from endpoint_proxy.protocol.mysql.framing import encode_packet, write_lenenc_int, write_lenenc_str, write_row_value

# Text that survives encode/decode exactly: no NUL (a C string ends there), no surrogates.
text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=16)
data = st.binary(max_size=32)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
sqlstate = st.text(st.sampled_from("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"), min_size=5, max_size=5)
low_caps = st.integers(0, 0xFFFFFFFF)


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


def hex_text(value: str) -> str:
    return value.encode().hex()


# --- result set builders ------------------------------------------------------------------------


def column_def(name: str, type_: int = 0xFD, schema: str = "db", table: str = "t") -> bytes:
    """A Protocol::ColumnDefinition41 payload (starts with the lenenc catalog "def", so 0x03)."""
    out = b"".join(write_lenenc_str(s.encode()) for s in ("def", schema, table, table, name, name))
    fixed = (45).to_bytes(2, "little") + (255).to_bytes(4, "little") + bytes((type_,)) + b"\0\0" + b"\0" + b"\0\0"
    return out + write_lenenc_int(len(fixed)) + fixed


def text_row(*values: bytes | None) -> bytes:
    return b"".join(write_row_value(v) for v in values)


def binary_row(*values: bytes | None) -> bytes:
    """A binary protocol row: 0x00, NULL bitmap (offset 2), the non-NULL values (here raw 4-byte ints)."""
    bitmap = bytearray((len(values) + 7 + 2) // 8)
    for i, v in enumerate(values):
        if v is None:
            bitmap[(i + 2) >> 3] |= 1 << ((i + 2) & 7)
    return b"\0" + bytes(bitmap) + b"".join(v for v in values if v is not None)


def ok(status: int = k.SERVER_STATUS_AUTOCOMMIT, caps: int = 0, **kw: object) -> bytes:
    return p.OkPacket(status=status, **kw).encode(caps)  # type: ignore[arg-type]


def ok_fe(status: int = k.SERVER_STATUS_AUTOCOMMIT, caps: int = k.CLIENT_DEPRECATE_EOF, **kw: object) -> bytes:
    return p.OkPacket(status=status, header=0xFE, **kw).encode(caps)  # type: ignore[arg-type]


def eof(status: int = k.SERVER_STATUS_AUTOCOMMIT, warnings: int = 0) -> bytes:
    return p.EofPacket(warnings, status).encode()


def err(errno: int = 1064, state: str = "42000", message: str = "You have an error") -> bytes:
    return p.err_packet(errno, state, message)


def wire(payloads: list[bytes], seq: int = 1) -> bytes:
    out = bytearray()
    for payload in payloads:
        out += encode_packet(seq, payload)
        seq = (seq + len(payload) // 0xFFFFFF + 1) & 0xFF
    return bytes(out)


# --- message strategies -------------------------------------------------------------------------

session_changes = st.lists(st.tuples(u8, data), max_size=3).map(tuple)


@st.composite
def ok_packets(draw: st.DrawFn) -> tuple[p.OkPacket, int]:
    caps = draw(st.sampled_from([0, k.CLIENT_SESSION_TRACK, k.CLIENT_SESSION_TRACK | k.CLIENT_DEPRECATE_EOF]))
    status = draw(u16)
    changes: tuple[tuple[int, bytes], ...] = ()
    if caps & k.CLIENT_SESSION_TRACK and status & k.SERVER_SESSION_STATE_CHANGED:
        changes = draw(session_changes)
    header = draw(st.sampled_from([0x00, 0xFE]))
    return p.OkPacket(draw(u64), draw(u64), status, draw(u16), draw(text), changes, header), caps


err_packets = st.builds(p.ErrPacket, u16.filter(lambda e: e != 0xFFFF), sqlstate, text)
eof_packets = st.builds(p.EofPacket, u16, u16)

# Capabilities with MariaDB's extended half only when CLIENT_MYSQL is clear.
capabilities = st.one_of(
    low_caps,
    st.tuples(low_caps, st.integers(1, 0xFFFFFFFF)).map(lambda t: (t[0] & ~k.CLIENT_MYSQL) | t[1] << 32),
)
nonce = st.binary(min_size=20, max_size=20).filter(lambda b: b"\0" not in b)


@st.composite
def handshakes(draw: st.DrawFn) -> hs.HandshakeV10:
    caps = draw(capabilities) | k.CLIENT_PROTOCOL_41 | k.CLIENT_SECURE_CONNECTION
    if caps & k.CLIENT_PLUGIN_AUTH:
        auth = draw(st.binary(min_size=8, max_size=40).filter(lambda b: b"\0" not in b))
        plugin = draw(text)
    else:
        auth = draw(nonce)
        plugin = ""
    return hs.HandshakeV10(draw(text), draw(u32), auth, caps, draw(u8), draw(u16), plugin)


@st.composite
def handshake_responses(draw: st.DrawFn) -> hs.HandshakeResponse41:
    caps = draw(capabilities) | k.CLIENT_PROTOCOL_41
    auth = draw(data)
    if not caps & (k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | k.CLIENT_SECURE_CONNECTION):
        auth = auth.replace(b"\0", b"")

    def field(flag: int, strategy: st.SearchStrategy[object]) -> object:
        return draw(strategy) if caps & flag else None

    database = field(k.CLIENT_CONNECT_WITH_DB, text)
    plugin = field(k.CLIENT_PLUGIN_AUTH, text)
    attrs = field(k.CLIENT_CONNECT_ATTRS, st.dictionaries(text, text, max_size=3))
    zstd = field(k.CLIENT_ZSTD_COMPRESSION_ALGORITHM, u8)
    return hs.HandshakeResponse41(
        caps,
        draw(text),
        auth,
        database,  # type: ignore[arg-type]
        plugin,  # type: ignore[arg-type]
        attrs,  # type: ignore[arg-type]
        draw(u32),
        draw(u8),
        zstd,  # type: ignore[arg-type]
    )


# Query attribute values that are whole binary values of their type.
attribute = st.one_of(
    st.builds(c.QueryAttribute, text, st.just(0xFE), st.just(0), data.map(write_lenenc_str)),
    st.builds(c.QueryAttribute, text, st.just(0x08), st.sampled_from([0, 0x80]), st.binary(min_size=8, max_size=8)),
    st.builds(c.QueryAttribute, text, st.just(0x0C), st.just(0), st.sampled_from([b"\0", b"\x04\xe8\x07\x01\x02"])),
    st.builds(c.QueryAttribute, text, st.sampled_from([0x03, 0xFE, 0x0C]), st.just(0), st.none()),
)

COMMAND_CAPS = k.CLIENT_SECURE_CONNECTION | k.CLIENT_PLUGIN_AUTH | k.CLIENT_CONNECT_ATTRS


@st.composite
def change_users(draw: st.DrawFn) -> c.ComChangeUser:
    charset = draw(st.none() | u16)
    plugin = draw(st.none() | text) if charset is not None else None
    attrs = draw(st.none() | st.dictionaries(text, text, max_size=2)) if plugin is not None else None
    return c.ComChangeUser(draw(text), draw(st.binary(max_size=40)), draw(text), charset, plugin, attrs)


commands = st.one_of(
    st.builds(c.ComQuery, text),
    st.builds(c.ComInitDb, text),
    st.builds(c.ComFieldList, text, data),
    st.builds(c.ComStmtPrepare, text),
    st.builds(c.ComStmtExecute, u32, u8, u32, data),
    st.builds(c.ComStmtSendLongData, u32, u16, data),
    st.builds(c.ComStmtClose, u32),
    st.builds(c.ComStmtReset, u32),
    st.builds(c.ComStmtFetch, u32, u32),
    st.builds(c.ComSetOption, u16),
    change_users(),
    st.builds(c.Command, st.sampled_from([c.COM_QUIT, c.COM_PING, c.COM_STATISTICS, c.COM_RESET_CONNECTION]), data),
)
