"""Startup-phase packets: hex vectors (whole and byte by byte), refusals with their SQLSTATE, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import LocalProtocolError, StartupError
from endpoint_proxy.protocol.pg import startup as s
from endpoint_proxy.protocol.pg.framing import FrameReader


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts))


VECTORS: list[tuple[bytes, s.StartupPacket]] = [
    (h("00000008 04d2162f"), s.SSLRequest()),
    (h("00000008 04d21630"), s.GSSENCRequest()),
    (h("00000010 04d2162e 00001234 deadbeef"), s.CancelRequest(0x1234, 0xDEADBEEF)),
    (
        h("0000001e 00030000", "7573657200 61707000", "646174616261736500 646200", "00"),
        s.StartupMessage(s.PROTOCOL_VERSION_3, {"user": "app", "database": "db"}),
    ),
    (
        h("00000010 00030002", "7573657200 7500", "00"),
        s.StartupMessage(0x00030002, {"user": "u"}),
    ),
]


def read_all(chunks: list[bytes]) -> list[bytes]:
    reader = FrameReader()
    out: list[bytes] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (packet := reader.next_startup()) is not None:
            out.append(packet)
    assert reader.buffered == 0
    return out


@pytest.mark.parametrize(("wire", "expected"), VECTORS, ids=lambda v: type(v).__name__)
def test_vector(wire: bytes, expected: s.StartupPacket) -> None:
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        assert [s.parse_startup_packet(p) for p in read_all(chunks)] == [expected]


def test_encoders_match_vectors() -> None:
    assert s.encode_ssl_request() == VECTORS[0][0]
    assert s.encode_gssenc_request() == VECTORS[1][0]
    assert s.encode_cancel_request(0x1234, 0xDEADBEEF) == VECTORS[2][0]
    assert s.encode_startup_message({"user": "app", "database": "db"}) == VECTORS[3][0]
    assert s.encode_startup_message({"user": "u"}, 0x00030002) == VECTORS[4][0]


def test_startup_properties() -> None:
    msg = s.StartupMessage(s.PROTOCOL_VERSION_3, {"user": "app", "_pq_.opt": "1", "application_name": "x"})
    assert (msg.user, msg.database, msg.major, msg.minor) == ("app", "app", 3, 0)
    assert msg.protocol_options == {"_pq_.opt": "1"}
    assert s.StartupMessage(196608, {"user": "a", "database": ""}).database == "a"
    assert s.StartupMessage(196608, {"user": "a", "database": "d"}).database == "d"


def startup_payload(*parts: bytes, version: int = s.PROTOCOL_VERSION_3) -> bytes:
    return version.to_bytes(4, "big") + b"".join(parts)


@pytest.mark.parametrize(
    ("payload", "sqlstate"),
    [
        (b"", "08P01"),
        (b"\x00\x03", "08P01"),
        (startup_payload(b"user\0app\0"), "08P01"),  # no terminator
        (startup_payload(b"user\0app\0database\0"), "08P01"),  # odd key/value list
        (startup_payload(b"user\0app"), "08P01"),  # unterminated value
        (startup_payload(b"user"), "08P01"),  # unterminated name
        (startup_payload(b"user\0app\0\0x"), "08P01"),  # bytes after the terminator
        (startup_payload(b"user\0\xff\xfe\0\0"), "08P01"),  # not UTF-8
        (startup_payload(b""), "08P01"),
        (h("04d2162f 00"), "08P01"),  # SSLRequest with a body
        (h("04d21630 00000000"), "08P01"),
        (h("04d2162e 00000001"), "08P01"),  # short CancelRequest
        (h("04d2162e 00000001 00000002 00"), "08P01"),  # long CancelRequest
        (startup_payload(b"user\0app\0\0", version=0x00020000), "0A000"),
        (startup_payload(b"user\0app\0\0", version=0x00040000), "0A000"),
        (h("04d21631"), "0A000"),  # some future 1234.x request code
        (startup_payload(b"\0"), "28000"),
        (startup_payload(b"database\0db\0\0"), "28000"),
        (startup_payload(b"user\0\0\0"), "28000"),
        (startup_payload(b"user\0" + b"u" * 64 + b"\0\0"), "42622"),
        (startup_payload(b"user\0u\0database\0" + b"d" * 64 + b"\0\0"), "42622"),
        (startup_payload(b"user\0" + "\u00e9".encode() * 32 + b"\0\0"), "42622"),  # 64 bytes
    ],
)
def test_refused(payload: bytes, sqlstate: str) -> None:
    with pytest.raises(StartupError) as info:
        s.parse_startup_packet(payload)
    assert info.value.sqlstate == sqlstate


def test_missing_user_message() -> None:
    with pytest.raises(StartupError, match="no PostgreSQL user name specified in startup packet"):
        s.parse_startup_packet(startup_payload(b"database\0db\0\0"))


def test_names_at_the_limit_are_accepted() -> None:
    user = "u" * s.MAX_NAME_BYTES
    msg = s.parse_startup_packet(s.encode_startup_message({"user": user})[4:])
    assert isinstance(msg, s.StartupMessage) and msg.user == user


@pytest.mark.parametrize(
    "call",
    [
        lambda: s.encode_startup_message({"user": "a\0b"}),
        lambda: s.encode_startup_message({"": "x"}),
        lambda: s.encode_startup_message({"user": "\udc80x"}),
        lambda: s.encode_startup_message({"user": "a"}, -1),
        lambda: s.encode_cancel_request(-1, 0),
        lambda: s.encode_cancel_request(0, 2**32),
    ],
)
def test_unencodable(call: object) -> None:
    with pytest.raises(LocalProtocolError):
        call()  # type: ignore[operator]


name = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)
parameters = st.builds(
    lambda user, db, rest: {"user": user, "database": db, **rest},
    name.filter(lambda u: 0 < len(u.encode()) <= s.MAX_NAME_BYTES),
    name.filter(lambda d: len(d.encode()) <= s.MAX_NAME_BYTES),
    st.dictionaries(name.filter(bool), name, max_size=4).map(
        lambda d: {k: v for k, v in d.items() if k not in ("user", "database")}
    ),
)


@settings(max_examples=50, deadline=None)
@given(params=parameters, minor=st.integers(0, 0xFFFF))
def test_startup_round_trip(params: dict[str, str], minor: int) -> None:
    wire = s.encode_startup_message(params, (3 << 16) | minor)
    (payload,) = read_all([wire])
    assert s.parse_startup_packet(payload) == s.StartupMessage((3 << 16) | minor, params)


@settings(max_examples=30, deadline=None)
@given(pid=st.integers(0, 2**32 - 1), key=st.integers(0, 2**32 - 1))
def test_cancel_round_trip(pid: int, key: int) -> None:
    (payload,) = read_all([s.encode_cancel_request(pid, key)])
    assert s.parse_startup_packet(payload) == s.CancelRequest(pid, key)
