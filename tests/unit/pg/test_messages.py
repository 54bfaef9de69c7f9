"""Message codecs: hand-built hex vectors (fed whole and byte by byte) and hypothesis round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.protocol.errors import LocalProtocolError, ProtocolError
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader

from .strategies import backend_messages, frontend_messages, text

ROUND_TRIP = settings(max_examples=25, deadline=None)


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts))


# (wire bytes, the message they are)
BACKEND_VECTORS: list[tuple[bytes, m.Message]] = [
    (h("52 00000008 00000000"), m.AuthenticationOk()),
    (h("52 00000008 00000003"), m.AuthenticationCleartextPassword()),
    (h("52 0000000c 00000005 01020304"), m.AuthenticationMD5Password(b"\x01\x02\x03\x04")),
    (
        h("52 00000017 0000000a", "534352414d 2d5348412d 323536 00", "00"),
        m.AuthenticationSASL(("SCRAM-SHA-256",)),
    ),
    (h("52 0000000b 0000000b 723d61"), m.AuthenticationSASLContinue(b"r=a")),
    (h("52 0000000b 0000000c 763d62"), m.AuthenticationSASLFinal(b"v=b")),
    (h("52 00000008 00000007"), m.AuthenticationOther(7)),
    (h("52 0000000a 00000008 abcd"), m.AuthenticationOther(8, b"\xab\xcd")),
    (h("4b 0000000c 00001234 deadbeef"), m.BackendKeyData(0x1234, 0xDEADBEEF)),
    (h("32 00000004"), m.BindComplete()),
    (h("33 00000004"), m.CloseComplete()),
    (h("43 0000000d 53454c454354203100"), m.CommandComplete("SELECT 1")),
    (h("64 00000007 616263"), m.CopyData(b"abc")),
    (h("63 00000004"), m.CopyDone()),
    (h("47 0000000b 00 0002 0000 0001"), m.CopyInResponse(0, (0, 1))),
    (h("48 0000000b 01 0002 0001 0001"), m.CopyOutResponse(1, (1, 1))),
    (h("57 00000007 00 0000"), m.CopyBothResponse(0, ())),
    (h("44 0000000f 0002 00000001 31 ffffffff"), m.DataRow((b"1", None))),
    (h("44 0000000a 0001 00000000"), m.DataRow((b"",))),
    (h("49 00000004"), m.EmptyQueryResponse()),
    (
        h("45 00000016", "53 4552524f5200", "43 343250303100", "4d 7800", "00"),
        m.ErrorResponse({"S": "ERROR", "C": "42P01", "M": "x"}),
    ),
    (
        h("4e 00000014", "53 4e4f5449434500", "4d 686900", "44 6400", "00"),
        m.NoticeResponse({"S": "NOTICE", "M": "hi", "D": "d"}),
    ),
    (h("56 0000000a 00000002 0102"), m.FunctionCallResponse(b"\x01\x02")),
    (h("56 00000008 ffffffff"), m.FunctionCallResponse(None)),
    (
        h("76 00000013 00000000 00000001 5f70715f2e7800"),
        m.NegotiateProtocolVersion(0, ("_pq_.x",)),
    ),
    (h("6e 00000004"), m.NoData()),
    (h("41 0000000e 00000007 636800 686900"), m.NotificationResponse(7, "ch", "hi")),
    (h("74 0000000e 0002 00000017 00000019"), m.ParameterDescription((23, 25))),
    (
        h("53 00000019 636c69656e745f656e636f64696e6700 5554463800"),
        m.ParameterStatus("client_encoding", "UTF8"),
    ),
    (h("31 00000004"), m.ParseComplete()),
    (h("73 00000004"), m.PortalSuspended()),
    (h("5a 00000005 49"), m.ReadyForQuery("I")),
    (h("5a 00000005 45"), m.ReadyForQuery("E")),
    (
        h("54 0000001a 0001 6100 00004000 0001 00000017 0004 ffffffff 0000"),
        m.RowDescription((m.Field("a", 0x4000, 1, 23, 4, -1, 0),)),
    ),
]

FRONTEND_VECTORS: list[tuple[bytes, m.Message]] = [
    (
        h("42 00000014 00 00 0001 0000 0001 00000002 3432 0000"),
        m.Bind("", "", (0,), (b"42",), ()),
    ),
    (h("42 00000012 7000 7300 0000 0001 ffffffff 0000"), m.Bind("p", "s", (), (None,), ())),
    (h("43 00000008 53 733100"), m.Close("S", "s1")),
    (h("64 00000007 616263"), m.CopyData(b"abc")),
    (h("63 00000004"), m.CopyDone()),
    (h("66 00000009 6f6f707300"), m.CopyFail("oops")),
    (h("44 00000006 50 00"), m.Describe("P", "")),
    (h("45 00000009 00 00000000"), m.Execute("", 0)),
    (h("45 0000000a 7000 00000064"), m.Execute("p", 100)),
    (h("48 00000004"), m.Flush()),
    (
        h("46 00000016 00000001 0001 0001 0001 00000002 0001 0001"),
        m.FunctionCall(1, (1,), (b"\x00\x01",), 1),
    ),
    (
        h("50 00000015 00 73656c6563742024 3100 0001 00000017"),
        m.Parse("", "select $1", (23,)),
    ),
    (h("70 0000000b 73656372657400"), m.PasswordPacket(b"secret\x00")),
    (h("51 0000000d 73656c656374203100"), m.Query("select 1")),
    (h("53 00000004"), m.Sync()),
    (h("58 00000004"), m.Terminate()),
]


def read_all(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    reader = FrameReader()
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (message := reader.next_message()) is not None:
            out.append(message)
    assert reader.buffered == 0
    return out


def whole_and_bytewise(wire: bytes) -> list[list[tuple[int, bytes]]]:
    return [read_all([wire]), read_all([wire[i : i + 1] for i in range(len(wire))])]


@pytest.mark.parametrize(("wire", "expected"), BACKEND_VECTORS, ids=lambda v: type(v).__name__)
def test_backend_vector(wire: bytes, expected: m.Message) -> None:
    assert expected.encode() == wire
    for messages in whole_and_bytewise(wire):
        assert [m.decode_backend(t, p) for t, p in messages] == [expected]


@pytest.mark.parametrize(("wire", "expected"), FRONTEND_VECTORS, ids=lambda v: type(v).__name__)
def test_frontend_vector(wire: bytes, expected: m.Message) -> None:
    assert expected.encode() == wire
    for messages in whole_and_bytewise(wire):
        assert [m.decode_frontend(t, p) for t, p in messages] == [expected]


def test_vectors_as_one_stream() -> None:
    for vectors, decode in ((BACKEND_VECTORS, m.decode_backend), (FRONTEND_VECTORS, m.decode_frontend)):
        stream = b"".join(wire for wire, _ in vectors)
        for messages in whole_and_bytewise(stream):
            assert [decode(t, p) for t, p in messages] == [msg for _, msg in vectors]


def test_every_message_class_has_a_vector_and_a_strategy() -> None:
    backend_classes = {type(msg) for _, msg in BACKEND_VECTORS}
    frontend_classes = {type(msg) for _, msg in FRONTEND_VECTORS}
    assert backend_classes == set(backend_messages)
    assert frontend_classes == set(frontend_messages)
    assert set(m.BACKEND_TYPE_BYTES) == {cls.TYPE for cls in backend_classes}
    assert set(m.FRONTEND_TYPE_BYTES) == {cls.TYPE for cls in frontend_classes}


def round_trip(msg: m.Message, decode: object) -> None:
    wire = msg.encode()
    reader = FrameReader()
    reader.feed(wire)
    message = reader.next_message()
    assert message is not None and reader.buffered == 0
    assert decode(*message) == msg  # type: ignore[operator]


@pytest.mark.parametrize("cls", list(backend_messages), ids=lambda c: c.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_backend_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    round_trip(data.draw(backend_messages[cls]), m.decode_backend)


@pytest.mark.parametrize("cls", list(frontend_messages), ids=lambda c: c.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_frontend_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    round_trip(data.draw(frontend_messages[cls]), m.decode_frontend)


@ROUND_TRIP
@given(password=text)
def test_password_message_round_trip(password: str) -> None:
    packet = m.decode_frontend(ord("p"), m.PasswordMessage(password).encode()[5:])
    assert isinstance(packet, m.PasswordPacket)
    assert m.decode_password_message(packet.data) == password


@ROUND_TRIP
@given(mechanism=text, response=st.none() | st.binary(max_size=40))
def test_sasl_initial_response_round_trip(mechanism: str, response: bytes | None) -> None:
    wire = m.SASLInitialResponse(mechanism, response).encode()
    assert wire[0] == ord("p")
    assert m.decode_sasl_initial_response(wire[5:]) == (mechanism, response)


@ROUND_TRIP
@given(payload=st.binary(max_size=40))
def test_sasl_and_gss_responses_are_raw(payload: bytes) -> None:
    for cls in (m.SASLResponse, m.GSSResponse):
        assert m.decode_frontend(ord("p"), cls(payload).encode()[5:]) == m.PasswordPacket(payload)


@ROUND_TRIP
@given(raw=st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")))
def test_any_bytes_survive_as_text(raw: bytes) -> None:
    # A LATIN1 (or any non-UTF-8) client_encoding must be relayed byte for byte.
    wire = m.Query("").encode()[:1] + (len(raw) + 5).to_bytes(4, "big") + raw + b"\0"
    decoded = m.decode_frontend(wire[0], wire[5:])
    assert decoded.encode() == wire


def test_latin1_query_decodes() -> None:
    query = m.decode_frontend(ord("Q"), b"select '\xe9t\xe9'\0")
    assert isinstance(query, m.Query)
    assert query.sql.startswith("select '")


def test_error_response_helpers() -> None:
    wire = m.error_response("FATAL", "28P01", "nope", detail="d", hint="h", position="3")
    err = m.decode_backend(wire[0], wire[5:])
    assert isinstance(err, m.ErrorResponse)
    assert err.fields == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "nope", "D": "d", "H": "h", "P": "3"}
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "28P01", "nope")
    notice = m.decode_backend(ord("N"), m.notice_response("WARNING", "01000", "w", W="here")[5:])
    assert isinstance(notice, m.NoticeResponse)
    assert notice.fields["W"] == "here" and notice.severity == "WARNING"
    with pytest.raises(TypeError):
        m.error_response("ERROR", "XX000", "x", bogus="y")


def test_severity_prefers_the_nonlocalized_field() -> None:
    assert m.ErrorResponse({"S": "FEHLER", "V": "ERROR"}).severity == "ERROR"
    assert m.ErrorResponse({"S": "ERROR"}).severity == "ERROR"
    assert m.ErrorResponse({}).severity == ""


@pytest.mark.parametrize(
    "msg",
    [
        m.Query("a\0b"),
        m.ReadyForQuery("X"),
        m.Close("X", ""),
        m.AuthenticationMD5Password(b"abc"),
        m.AuthenticationSASL(("",)),
        m.BackendKeyData(-1, 0),
        m.DataRow((b"x",) * 70000),
        m.Execute("", 2**31),
        m.ErrorResponse({"\0": "x"}),
        m.ErrorResponse({"ab": "x"}),
        m.CommandComplete("\ud800"),
    ],
    ids=repr,
)
def test_unencodable_messages_raise_local_error(msg: m.Message) -> None:
    with pytest.raises(LocalProtocolError):
        msg.encode()


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        (ord("R"), b""),
        (ord("R"), h("00000063")),  # unknown authentication code
        (ord("R"), h("00000000 00")),  # AuthenticationOk with trailing bytes
        (ord("R"), h("00000005 0102")),  # short md5 salt
        (ord("R"), h("0000000a 6100")),  # SASL list without its terminator
        (ord("Z"), b"X"),
        (ord("Z"), b""),
        (ord("Z"), b"II"),
        (ord("K"), h("00000001")),
        (ord("C"), b"SELECT 1"),  # no terminator
        (ord("C"), b"SELECT 1\0x"),  # trailing bytes
        (ord("D"), h("ffff")),  # 65535 columns in 2 bytes
        (ord("D"), h("0001 fffffffe")),  # length -2
        (ord("D"), h("0001 00000005 61")),  # value longer than the payload
        (ord("T"), h("0001 6100")),
        (ord("E"), h("53 455252")),  # unterminated field
        (ord("E"), h("53 00")),  # no final terminator
        (ord("v"), h("00000000 7fffffff")),  # 2**31 - 1 names in 0 bytes
        (ord("v"), h("00000000 ffffffff")),  # negative count
        (ord("t"), h("0002 00000017")),
        (ord("I"), b"x"),
        (ord("G"), h("00 0003 0000")),
        (ord("V"), h("00000003 01")),
        (ord("x"), b""),  # unknown type
        (0, b""),
    ],
)
def test_malformed_backend_messages(type_: int, payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_backend(type_, payload)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        (ord("Q"), b"select 1"),
        (ord("Q"), b"select\0 1\0"),
        (ord("B"), h("00 00 0001")),
        (ord("B"), h("00 00 0000 0001 00000001")),
        (ord("B"), h("00 00 0000 0000 0000 00")),
        (ord("C"), b"Xname\0"),
        (ord("D"), b"S"),
        (ord("E"), b"\0"),
        (ord("P"), b"\0\0\xff\xff"),
        (ord("F"), h("00000001 0000 0000")),
        (ord("S"), b"\0"),
        (ord("X"), b"\0"),
        (ord("Z"), b""),  # unknown frontend type
    ],
)
def test_malformed_frontend_messages(type_: int, payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode_frontend(type_, payload)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("data", [b"", b"secret", b"sec\0ret\0", b"\0\0"])
def test_malformed_password_message(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode_password_message(data)


@pytest.mark.parametrize(
    "data", [b"", b"SCRAM-SHA-256", b"SCRAM-SHA-256\0", b"M\0\x00\x00\x00\x05ab", b"M\0\xff\xff\xff\xfex"]
)
def test_malformed_sasl_initial_response(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode_sasl_initial_response(data)
