"""The admin server's HTTP request parser: whole and byte at a time, bounds, malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoint_proxy.admin.http import (
    HttpError,
    Request,
    RequestReader,
    Response,
    parse_request_head,
)


def feed_whole(data: bytes, **kw: int) -> Request | None:
    return RequestReader(**kw).feed(data)


def feed_bytewise(data: bytes, **kw: int) -> Request | None:
    reader = RequestReader(**kw)
    result = None
    for i in range(len(data)):
        result = reader.feed(data[i:i + 1])
        if result is not None:
            break
    return result


FEEDERS = [feed_whole, feed_bytewise]


@pytest.mark.parametrize("feed", FEEDERS)
def test_get_request(feed: object) -> None:
    data = b"GET /topology?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9187\r\nAccept:  */* \r\n\r\n"
    req = feed(data)  # type: ignore[operator]
    assert req is not None
    assert req.method == "GET"
    assert req.path == "/topology"
    assert req.head.target == "/topology?x=1"
    assert req.head.version == "HTTP/1.1"
    assert req.head.header("host") == "127.0.0.1:9187"
    assert req.head.header("accept") == "*/*"
    assert req.body == b""


@pytest.mark.parametrize("feed", FEEDERS)
def test_bare_lf_line_endings(feed: object) -> None:
    req = feed(b"GET /healthz HTTP/1.0\nHost: x\n\n")  # type: ignore[operator]
    assert req is not None and req.path == "/healthz" and req.head.header("host") == "x"


@pytest.mark.parametrize("feed", FEEDERS)
def test_post_with_body(feed: object) -> None:
    data = b"POST /reload HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello-and-more"
    req = feed(data)  # type: ignore[operator]
    assert req is not None and req.method == "POST" and req.body == b"hello"


def test_incomplete_request_needs_more() -> None:
    reader = RequestReader()
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert reader.feed(b"\r") is None
    req = reader.feed(b"\n")
    assert req is not None and req.path == "/"
    reader = RequestReader()
    assert reader.feed(b"POST /reload HTTP/1.1\r\nContent-Length: 3\r\n\r\nab") is None
    req = reader.feed(b"c")
    assert req is not None and req.body == b"abc"


MALFORMED = [
    (b"\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET foo HTTP/1.1\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTX/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.10\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400),
    (b"POST /reload HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /reload HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /reload HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
    (b"POST /reload HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /reload HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", 413),
    (b"POST /reload HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 413),
    (b"POST /reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 65 + b"\r\n", 431),
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("data", "status"), MALFORMED)
def test_malformed_requests(feed: object, data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        feed(data)  # type: ignore[operator]
    assert info.value.status == status


def test_repeated_identical_content_length_is_fine() -> None:
    req = feed_whole(b"POST /reload HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok")
    assert req is not None and req.body == b"ok"


def test_head_size_is_bounded_before_the_end_arrives() -> None:
    reader = RequestReader(max_head=1024)
    assert reader.feed(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(HttpError) as info:
        for _ in range(100):
            reader.feed(b"X-Padding: " + b"a" * 50 + b"\r\n")
    assert info.value.status == 431


def test_head_over_the_limit_in_one_chunk() -> None:
    data = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n"
    with pytest.raises(HttpError) as info:
        RequestReader(max_head=1024).feed(data)
    assert info.value.status == 431
    assert RequestReader(max_head=4096).feed(data) is not None


def test_body_size_is_bounded() -> None:
    assert feed_whole(b"POST /reload HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789", max_body=10) is not None
    with pytest.raises(HttpError) as info:
        feed_whole(b"POST /reload HTTP/1.1\r\nContent-Length: 11\r\n\r\n", max_body=10)
    assert info.value.status == 413


def test_parse_request_head_directly() -> None:
    head = parse_request_head(b"DELETE /x HTTP/1.1\r\nA: 1\r\nb: 2")
    assert head.method == "DELETE"
    assert head.headers == (("a", "1"), ("b", "2"))
    assert head.header("c") is None


def test_response_encoding() -> None:
    resp = Response(404, b"{}", "application/json", (("Allow", "GET"),))
    data = resp.encode()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 404 Not Found"
    assert b"Content-Length: 2" in lines
    assert b"Connection: close" in lines
    assert b"Allow: GET" in lines
    assert body == b"{}"
    assert resp.encode(include_body=False) == head + b"\r\n\r\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=40))
def test_any_input_parses_or_raises_http_error(chunks: list[bytes]) -> None:
    reader = RequestReader(max_head=512, max_body=128)
    try:
        for chunk in chunks:
            if reader.feed(chunk) is not None:
                break
    except HttpError as e:
        assert 400 <= e.status < 600
    assert len(reader._buf) <= 512 + 64 + 128


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["GET", "POST", "HEAD"]), st.text("abcxyz/_-.", max_size=20),
       st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True),
                       st.text("abc 123;=/", max_size=20), max_size=5))
def test_well_formed_requests_round_trip(method: str, path: str, headers: dict[str, str]) -> None:
    headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
    data = f"{method} /{path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    for req in (feed_whole(data), feed_bytewise(data)):
        assert req is not None
        assert req.method == method and req.path == "/" + path
        assert dict(req.head.headers) == {k.lower(): v.strip(" ") for k, v in headers.items()}
