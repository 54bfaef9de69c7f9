"""The admin HTTP server: /metrics, /healthz, /readyz, /topology, /reload, the status page, and
the drills: /switchover, /faults, /history.

HTTP/1.1 with one request per connection: the server reads one bounded request, answers
with ``Connection: close`` and closes. Requests are parsed by ``RequestReader``, which does
no I/O (bytes in, a ``Request`` or an ``HttpError`` out), so the parser is tested on its own.
Each connection has its own task and deadline: a slow client holds only its own slot, and
when every slot is taken, the connection that has waited longest without a whole request is
closed to make room, so sockets left idle can never starve a liveness probe.

Access (``AdminAccess``): with a token or admin users configured, everything but ``GET
/healthz``, ``GET /readyz`` (and ``/metrics`` when public) needs ``Authorization: Bearer
<token>`` or basic auth (an admin user and password, or any name and the token); a POST that
a browser marks as coming from another site is refused whatever it carries.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..config import Address, UserConfig
from ..drills.faults import FaultError
from ..drills.switchover import SwitchoverRefused
from ..protocol.pg.auth import parse_scram_verifier, scram_keys_from_password
from ..routing.endpoints import members
from ..server.cluster import ClusterRuntime
from ..server.metrics import ProxyMetrics
from ..server.patroni import PatroniAuthority
from . import drills
from .page import STATUS_PAGE

log = structlog.get_logger("endpoint_proxy.admin")

MAX_HEAD_BYTES = 8192
MAX_HEADERS = 64
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than HT


# --- parsing (no I/O) ------------------------------------------------------------------------


class HttpError(Exception):
    """The request cannot be served; ``status`` is the response to send before closing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        """The first value of a header (``name`` lower-case)."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class Request:
    head: RequestHead
    body: bytes

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        return self.head.path


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request line and header fields (the bytes before the empty line).

    Lines end in CRLF or a bare LF. Raises HttpError: 400 for anything malformed, 505 for an
    HTTP version other than 1.x, 431 for too many header fields.
    """
    text = head.decode("latin-1")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    if not target.startswith("/") or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in target):
        raise HttpError(400, "malformed request target")
    v = _VERSION.fullmatch(version)
    if v is None:
        raise HttpError(400, "malformed HTTP version")
    if v.group(1) != "1":
        raise HttpError(505, f"{version} is not supported")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise HttpError(400, "folded header lines are not allowed")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(" \t")
        if _CTL.search(value):
            raise HttpError(400, "control character in a header value")
        headers.append((name.lower(), value))
    return RequestHead(method, target, version, tuple(headers))


def content_length(head: RequestHead, max_body: int) -> int:
    if head.header("transfer-encoding") is not None:
        raise HttpError(501, "transfer codings are not supported; send Content-Length")
    values = {v for k, v in head.headers if k == "content-length"}
    if not values:
        return 0
    if len(values) > 1:
        raise HttpError(400, "conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit() or not value.isascii():
        raise HttpError(400, "malformed Content-Length")
    if len(value) > 12 or int(value) > max_body:
        raise HttpError(413, f"the body is limited to {max_body} bytes")
    return int(value)


class RequestReader:
    """Accumulates bytes until one whole request is there; bounded in head and body size."""

    def __init__(self, max_head: int = MAX_HEAD_BYTES, max_body: int = MAX_BODY_BYTES) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self._buf = bytearray()
        self._scanned = 0  # the head's end is not before this offset
        self._head: RequestHead | None = None
        self._body_length = 0

    def _head_end(self) -> tuple[int, int] | None:
        """(end of the head, start of the body) once the empty line is in the buffer."""
        start = max(0, self._scanned - 2)
        found = [(i, i + len(sep)) for sep in (b"\n\r\n", b"\n\n")
                 if (i := self._buf.find(sep, start)) >= 0]
        self._scanned = len(self._buf)
        return min(found) if found else None

    def feed(self, data: bytes | bytearray | memoryview) -> Request | None:
        """Add bytes; returns the request once complete (later bytes are ignored)."""
        self._buf += data
        if self._head is None:
            end = self._head_end()
            if end is None:
                if len(self._buf) > self.max_head:
                    raise HttpError(431, f"the request head is limited to {self.max_head} bytes")
                return None
            head_end, body_start = end
            if head_end > self.max_head:
                raise HttpError(431, f"the request head is limited to {self.max_head} bytes")
            self._head = parse_request_head(bytes(self._buf[:head_end]))
            self._body_length = content_length(self._head, self.max_body)
            del self._buf[:body_start]
        if len(self._buf) < self._body_length:
            return None
        return Request(self._head, bytes(self._buf[: self._body_length]))


# --- responses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, include_body: bool = True) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}",
                 "Connection: close",
                 "Cache-Control: no-store",
                 "X-Content-Type-Options: nosniff",
                 *(f"{k}: {v}" for k, v in self.headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body if include_body else head


def json_response(status: int, doc: Any) -> Response:
    return Response(status, (json.dumps(doc, indent=1) + "\n").encode(), "application/json")


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (json.dumps({"error": message}) + "\n").encode(), "application/json", headers)


# --- what the server shows ----------------------------------------------------------------------


class AdminSource(Protocol):
    """What the admin server reads from the proxy, at each request (a reload may swap clusters)."""

    @property
    def clusters(self) -> Mapping[str, ClusterRuntime]: ...

    @property
    def bound(self) -> Mapping[str, Address]: ...

    @property
    def metrics(self) -> ProxyMetrics: ...


def cluster_status(cluster: ClusterRuntime, now: float) -> str:
    """available: a writer is known; failing-over: the writer was lost less than
    failover_timeout_ms ago; no-writer: none is known (at startup, or for longer)."""
    if cluster.topology.writer is not None:
        return "available"
    lost_at = cluster.metrics.writer_lost_at
    if lost_at is not None and now - lost_at < cluster.config.failover_timeout_ms / 1000:
        return "failing-over"
    return "no-writer"


def topology_document(source: AdminSource, now: float) -> dict[str, Any]:
    """The /topology JSON: per cluster its writer, instances and endpoints with current members."""
    clusters = []
    for cluster in source.clusters.values():
        cfg = cluster.config
        topo = cluster.topology
        lost_at = cluster.metrics.writer_lost_at
        instances = []
        authority = cluster.patroni
        for inst in cfg.instances:
            st = topo.instances.get(inst.name)
            if st is None:
                continue  # a member that just arrived (or left) between two steps
            doc_inst: dict[str, Any] = {
                "name": inst.name,
                "address": str(inst.address),
                "role": topo.role(inst.name).value,
                "health": st.health.value,
                "is_writer": inst.name == topo.writer,
                "lag_bytes": st.lag_bytes,
                "lag_ms": None if st.lag_ms is None else round(st.lag_ms, 1),
                "timeline": st.timeline,
                "fenced": st.fenced,
                "last_error": st.last_error,
                "last_probe_age_ms": None if st.last_probe_at is None else round((now - st.last_probe_at) * 1000),
                "connections": max(0, cluster.connections.get(inst.name, 0)),
                "weight": inst.weight,
            }
            if authority is not None:
                doc_inst["patroni"] = _patroni_member(authority, inst.name)
            instances.append(doc_inst)
        endpoints = []
        for ep in cfg.endpoints:
            listen = source.bound.get(f"{cfg.name}/{ep.name}", ep.listen)
            doc: dict[str, Any] = {"name": ep.name, "kind": ep.kind, "listen": str(listen),
                                   "members": members(ep, topo), **cluster.drills.endpoint_stats(ep.name)}
            if ep.kind == "custom":
                doc["role"] = ep.role
                doc["static_members"] = list(ep.members) if ep.members is not None else None
                doc["excluded"] = list(ep.excluded) if ep.excluded is not None else None
            elif ep.kind == "instance":
                doc["instance"] = ep.instance
            endpoints.append(doc)
        clusters.append({
            "name": cfg.name,
            "protocol": cfg.protocol,
            "status": cluster_status(cluster, now),
            "writer": topo.writer,
            "writer_lost_ms": None if lost_at is None else round((now - lost_at) * 1000),
            "writer_changed_at": None if cluster.writer_changed_at is None else round(cluster.writer_changed_at, 3),
            "authority": None if authority is None else authority.to_json(),
            "max_replica_lag_ms": cfg.max_replica_lag_ms,
            "instances": instances,
            "endpoints": endpoints,
            "promotion": cfg.promotion.method,
            "switchover_running": cluster.drills.switchover_running,
            "last_switchover": cluster.drills.last_switchover_json(),
            "faults": [f.to_json(now) for f in cluster.drills.active_faults()],
            "pools": [p.to_json() for p in cluster.pools.status(now)],
        })
    return {"clusters": clusters}


def _patroni_member(authority: PatroniAuthority, name: str) -> dict[str, Any] | None:
    """What Patroni's store says of a member (null when it does not list it)."""
    member = authority.view.members.get(name)
    if member is None:
        return None
    return {"role": member.role, "state": member.state, "timeline": member.timeline,
            "lag_bytes": authority.view.lag_bytes(name), "noloadbalance": member.noloadbalance,
            "nofailover": member.nofailover, "api_url": member.api_url}


def history_document(source: AdminSource) -> dict[str, Any]:
    """/history: per cluster, each endpoint's points ``[at, statements/s, p50_ms, p99_ms]`` over
    the last minutes (one a second, ``at`` in epoch seconds) and the events timeline."""
    return {"now": round(time.time(), 3), "clusters": [c.drills.history_json() for c in source.clusters.values()]}


def _json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object ({} when empty); HttpError 400 otherwise."""
    if not request.body.strip():
        return {}
    try:
        doc = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "the body must be a JSON object")
    return doc


def readiness(source: AdminSource) -> tuple[bool, list[str]]:
    missing = [name for name, c in source.clusters.items() if c.topology.writer is None]
    return not missing, missing


def authority_status(source: AdminSource) -> dict[str, str]:
    """Per cluster with an HA authority: ``fresh``, ``stale`` (its store does not answer: the
    writer is kept, none is elected) or ``unknown`` (it never answered)."""
    return {name: c.patroni.status for name, c in source.clusters.items() if c.patroni is not None}


# --- access -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminAccess:
    """Who may use the admin server (read at each request: a reload may change it)."""

    token: str | None = field(default=None, repr=False)
    users: Mapping[str, UserConfig] = field(default_factory=dict, repr=False)
    metrics_public: bool = False

    @property
    def required(self) -> bool:
        return self.token is not None or bool(self.users)


NO_ACCESS_CONTROL = AdminAccess()
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
CHALLENGE = (("WWW-Authenticate", 'Basic realm="endpoint_proxy admin", charset="UTF-8"'),
             ("WWW-Authenticate", 'Bearer realm="endpoint_proxy admin"'))
PAGE_COOKIE = "ep_admin_page"
PAGE_SESSION_S = 12 * 3600.0
PAGE_SESSIONS = 1024
# Successful basic-auth checks against SCRAM verifiers, remembered so that PBKDF2 runs once
# per (user, password), not per request; PBKDF2 runs in threads, at most this many at once.
_VERIFIED_CACHE = 256
_PBKDF2_LIMIT = trio.CapacityLimiter(2)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality (of digests, so not even the length leaks)."""
    return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
                               hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest())


def basic_credentials(value: str) -> tuple[str, str] | None:
    """(user, password) of a basic-auth header value (after "Basic "), or None when malformed."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


class AccessChecker:
    """Checks a request's Authorization header against an ``AdminAccess``."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)  # the cache holds HMACs of passwords, never them
        self._verified: OrderedDict[bytes, bytes] = OrderedDict()
        # Status-page sessions: a browser that loaded the page with credentials gets a cookie
        # (HttpOnly, SameSite=Strict) good for the page's own reads (/topology, /history).
        self._pages: OrderedDict[str, float] = OrderedDict()

    def page_cookie(self) -> str:
        """A new status-page session, as a Set-Cookie value."""
        token = secrets.token_urlsafe(32)
        self._pages[token] = trio.current_time() + PAGE_SESSION_S
        while len(self._pages) > PAGE_SESSIONS:
            self._pages.popitem(last=False)
        return f"{PAGE_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(PAGE_SESSION_S)}"

    def page_session(self, cookie_header: str | None) -> bool:
        """Does the request carry a live status-page session?"""
        if not cookie_header:
            return False
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == PAGE_COOKIE:
                expires = self._pages.get(value)
                if expires is not None and expires > trio.current_time():
                    return True
        return False

    async def allowed(self, access: AdminAccess, authorization: str | None) -> bool:
        if not access.required:
            return True
        if authorization is None:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return access.token is not None and _same(value.strip(), access.token)
        if scheme != "basic":
            return False
        credentials = basic_credentials(value)
        if credentials is None:
            return False
        name, password = credentials
        if access.token is not None and _same(password, access.token):
            return True
        user = access.users.get(name)
        if user is None:
            return False
        if user.password is not None:
            return _same(password, user.password)
        assert user.stored is not None
        return await self._check_verifier(name, password, user.stored.text)

    async def _check_verifier(self, name: str, password: str, verifier: str) -> bool:
        secret = parse_scram_verifier(verifier)
        key = hmac.new(self._key, f"{name}\0{password}".encode("utf-8", "surrogateescape"), "sha256").digest()
        known = self._verified.get(key)
        if known is not None and hmac.compare_digest(known, secret.stored_key):
            self._verified.move_to_end(key)
            return True
        keys = await trio.to_thread.run_sync(scram_keys_from_password, password, secret.salt, secret.iterations,
                                             limiter=_PBKDF2_LIMIT)
        if not hmac.compare_digest(keys.stored_key, secret.stored_key):
            return False
        self._verified[key] = secret.stored_key
        while len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return True


def cross_site(head: RequestHead) -> bool:
    """Does a browser say this request comes from another origin? (Browsers send Origin on a
    cross-origin POST and Sec-Fetch-Site everywhere; other clients send neither.)"""
    site = head.header("sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return True
    origin = head.header("origin")
    if origin is None:
        return False
    host = head.header("host")
    return host is None or origin.lower().partition("://")[2].rstrip("/") != host.lower()


# --- the server -------------------------------------------------------------------------------


ReloadCallback = Callable[[], Awaitable[object]]


@dataclass(eq=False)
class _Slot:
    """One connection's place among MAX_CONNECTIONS; ``waiting`` while it has no whole
    request (or is only sending an answer): then it may be closed to make room."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    waiting: bool = True


class AdminServer:
    """The admin HTTP server. ``access`` (default: no access control), ``tls_context`` (None:
    plain HTTP) and ``liveness`` (problems that fail /healthz, e.g. an endpoint whose
    connections nobody accepts) are read at each connection or request."""

    def __init__(self, source: AdminSource, *, reload: ReloadCallback | None = None,
                 access: Callable[[], AdminAccess] | None = None,
                 tls_context: Callable[[], ssl.SSLContext | None] | None = None,
                 liveness: Callable[[], list[str]] | None = None) -> None:
        self.source = source
        self.reload = reload
        self.access = access or (lambda: NO_ACCESS_CONTROL)
        self.tls_context = tls_context or (lambda: None)
        self.liveness = liveness
        self.checker = AccessChecker()
        self._slots: OrderedDict[_Slot, None] = OrderedDict()  # oldest first

    @property
    def active(self) -> int:
        return len(self._slots)

    # Routes: path -> method -> handler. HEAD is served wherever GET is.
    def _routes(self) -> dict[str, dict[str, Callable[[Request], Awaitable[Response]]]]:
        routes: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {
            "/": {"GET": self._page},
            "/metrics": {"GET": self._metrics},
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/topology": {"GET": self._topology},
        }
        if self.reload is not None:
            routes["/reload"] = {"POST": self._reload}
        # Drills. These change the cluster: they belong behind the admin credentials.
        routes["/switchover"] = {"POST": self._switchover}
        routes["/faults"] = {"GET": self._faults, "POST": self._inject, "DELETE": self._clear_faults}
        routes["/history"] = {"GET": self._history}
        return routes

    def _public(self, request: Request, access: AdminAccess) -> bool:
        if request.method not in ("GET", "HEAD"):
            return False
        return request.path in PUBLIC_PATHS or (access.metrics_public and request.path == "/metrics")

    async def respond(self, request: Request) -> Response:
        access = self.access()
        page_read = (request.method in ("GET", "HEAD") and not cross_site(request.head)
                     and self.checker.page_session(request.head.header("cookie")))
        if not self._public(request, access) and not page_read and not await self.checker.allowed(
                access, request.head.header("authorization")):
            return error_response(401, "authentication required: Authorization: Bearer <admin.token>, "
                                       "or basic auth as an admin user", CHALLENGE)
        response = await self._route(request)
        if request.path == "/" and response.status == 200 and access.required and not page_read:
            # The page reads /topology and /history from the browser, which may not send the
            # credentials it loaded the page with (credentials in the URL, say): a session cookie.
            response = dataclasses.replace(response, headers=(*response.headers,
                                                              ("Set-Cookie", self.checker.page_cookie())))
        return response

    async def _route(self, request: Request) -> Response:
        methods = self._routes().get(request.path)
        if methods is None:
            return error_response(404, f"no such resource: {request.path}")
        method = "GET" if request.method == "HEAD" and "GET" in methods else request.method
        handler = methods.get(method)
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            return error_response(405, f"{request.method} is not allowed here",
                                  (("Allow", ", ".join(allowed)),))
        if method not in ("GET", "HEAD") and cross_site(request.head):
            return error_response(403, "cross-site requests may not change the proxy")
        try:
            return await handler(request)
        except HttpError as e:  # a body the handler cannot use
            return error_response(e.status, e.message)

    async def _page(self, request: Request) -> Response:
        return Response(200, STATUS_PAGE.encode(), "text/html; charset=utf-8", (
            ("Content-Security-Policy",
             "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"),
            ("X-Frame-Options", "DENY"),
        ))

    async def _metrics(self, request: Request) -> Response:
        return Response(200, generate_latest(self.source.metrics.registry), CONTENT_TYPE_PLAIN_0_0_4)

    async def _healthz(self, request: Request) -> Response:
        problems = self.liveness() if self.liveness is not None else []
        if problems:
            return Response(503, ("unhealthy: " + "; ".join(problems) + "\n").encode())
        return Response(200, b"ok\n")

    async def _readyz(self, request: Request) -> Response:
        ready, missing = readiness(self.source)
        authority = authority_status(self.source)
        extra: dict[str, Any] = {"authority": authority} if authority else {}
        if ready:
            return json_response(200, {"ready": True, **extra})
        return json_response(503, {"ready": False, "clusters_without_writer": missing, **extra})

    async def _topology(self, request: Request) -> Response:
        return json_response(200, topology_document(self.source, trio.current_time()))

    async def _reload(self, request: Request) -> Response:
        assert self.reload is not None
        try:
            await self.reload()
        except Exception as e:  # the callback's own errors (a bad config) go back to the caller
            log.warning("admin_reload_failed", error=str(e))
            return json_response(400, {"ok": False, "error": str(e) or type(e).__name__})
        return json_response(200, {"ok": True})

    async def _history(self, request: Request) -> Response:
        return json_response(200, history_document(self.source))

    async def _switchover(self, request: Request) -> Response:
        """``{"cluster": ..., "to": ...}`` (both optional): 200 with the record when it
        completed, 409 when refused or abandoned, 500 when a step failed."""
        doc = _json_body(request)
        cluster, to = doc.get("cluster"), doc.get("to")
        if not all(v is None or isinstance(v, str) for v in (cluster, to)) or set(doc) - {"cluster", "to"}:
            return json_response(400, {"ok": False, "error": 'the body is {"cluster": name, "to": instance}, '
                                                            "both optional"})
        try:
            record = await drills.switchover(self.source.clusters, cluster, to)
        except SwitchoverRefused as e:
            return json_response(409, {"ok": False, "error": str(e)})
        status = 200 if record.ok else 409 if record.outcome == "abandoned" else 500
        return json_response(status, {"ok": record.ok, "switchover": record.to_json()})

    async def _faults(self, request: Request) -> Response:
        return json_response(200, {"faults": drills.faults_json(self.source.clusters)})

    async def _inject(self, request: Request) -> Response:
        """``{"kind": ..., "instance": ..., "seconds": ..., ...}`` or ``{"command": "SIMULATE ..."}``."""
        try:
            faults = drills.inject_json(self.source.clusters, _json_body(request))
        except FaultError as e:
            return json_response(400, {"ok": False, "error": str(e)})
        now = trio.current_time()
        return json_response(200, {"ok": True, "faults": [f.to_json(now) for f in faults]})

    async def _clear_faults(self, request: Request) -> Response:
        """All faults, or ``{"id": n}``."""
        doc = _json_body(request)
        fault_id = doc.get("id")
        if (fault_id is not None and (isinstance(fault_id, bool) or not isinstance(fault_id, int))) or \
                set(doc) - {"id"}:
            return json_response(400, {"ok": False, "error": 'the body is empty or {"id": fault id}'})
        removed = drills.clear(self.source.clusters, fault_id)
        return json_response(200, {"ok": True, "cleared": [f.id for f in removed]})

    # --- connections --------------------------------------------------------------------------

    async def serve(self, sock: socket.socket,
                    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a bound, listening socket until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self.handle, [listener], task_status=task_status)

    def _take_slot(self) -> _Slot | None:
        """A slot for a new connection: a free one, or the one of the connection that has
        waited longest without a whole request (it is closed). None when every slot serves."""
        if len(self._slots) >= MAX_CONNECTIONS:
            victim = next((slot for slot in self._slots if slot.waiting), None)
            if victim is None:
                return None
            victim.scope.cancel()
            del self._slots[victim]
        slot = _Slot()
        self._slots[slot] = None
        return slot

    async def handle(self, tcp: trio.abc.HalfCloseableStream) -> None:
        """One connection: read one request, answer, close. Never raises (it would stop the proxy)."""
        stream: trio.abc.Stream = tcp
        try:
            slot = self._take_slot()
            if slot is None:
                with trio.move_on_after(1):
                    await self._send_and_linger(stream, error_response(503, "too many admin connections").encode())
                return
            try:
                with slot.scope:
                    ctx = self.tls_context()
                    if ctx is not None:
                        stream = trio.SSLStream(tcp, ctx, server_side=True)
                    await self._exchange(stream, slot)
            finally:
                self._slots.pop(slot, None)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin_request_failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.aclose()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _exchange(self, stream: trio.abc.Stream, slot: _Slot) -> None:
        reader = RequestReader()
        request: Request | None = None
        response: Response | None = None
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                while request is None:
                    data = await stream.receive_some(16384)
                    if not data:
                        return  # closed before a whole request: nothing to answer
                    request = reader.feed(data)
            except HttpError as e:
                response = error_response(e.status, e.message)
        if response is None:
            if request is None:
                response = error_response(408, "the request took too long")
            else:
                slot.waiting = False
                try:
                    response = await self.respond(request)
                except Exception:
                    log.exception("admin_request_failed", path=request.path)
                    response = error_response(500, "internal error; see the proxy's log")
                slot.waiting = True
        include_body = request is None or request.method != "HEAD"
        with trio.move_on_after(SEND_TIMEOUT_S):
            await self._send_and_linger(stream, response.encode(include_body=include_body))

    @staticmethod
    async def _send_and_linger(stream: trio.abc.Stream, data: bytes) -> None:
        """Send the answer, then let the client read it before the close: closing with unread
        input (a request we refused, or did not read) would reset the connection under it."""
        await stream.send_all(data)
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(1):
            drained = 0
            while drained < 1 << 20 and (chunk := await stream.receive_some(65536)):
                drained += len(chunk)
