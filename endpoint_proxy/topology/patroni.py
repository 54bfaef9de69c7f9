"""What Patroni keeps in its distributed store, parsed: the leader key, the members, revisions.

Rules of this file: pure, no I/O and no clock. The I/O layer (server/patroni.py) hands in the
JSON that etcd v3's HTTP gateway (range answers, watch messages) or Patroni's REST API
(``GET /cluster``) returned; ``PatroniView`` keeps the state they describe. Anything that
does not parse raises ``PatroniDataError`` (a ValueError) with what was wrong, never another
exception.

Keys, under ``<namespace>/<scope>/`` (namespace default ``/service``): ``leader`` holds the
leader member's name; ``members/<name>`` a JSON object with ``conn_url``
(``postgres://host:port/db``), ``api_url``, ``role``, ``state``, ``timeline``,
``xlog_location`` and ``tags``. The fencing token is the leader key's *create* revision: it
changes exactly when a member takes the key anew (a put that only refreshes the key keeps it).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class PatroniDataError(ValueError):
    """The store or the REST API answered something that is not what Patroni writes."""


@dataclass(frozen=True)
class PatroniMember:
    name: str
    host: str
    port: int
    role: str | None = None  # Patroni's own: primary/leader/replica/standby_leader/...
    state: str | None = None  # running, streaming, starting, stopped, crashed, ...
    timeline: int | None = None
    xlog_location: int | None = None
    api_url: str | None = None
    noloadbalance: bool = False
    nofailover: bool = False
    lag_bytes: int | None = None  # REST: as Patroni reports it; etcd: from xlog_location


def parse_conn_url(url: str) -> tuple[str, int]:
    """(host, port) of a member's ``conn_url`` (``postgres://127.0.0.1:5432/postgres``)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise PatroniDataError(f"conn_url {url!r}: {e}") from None
    if not host:
        raise PatroniDataError(f"conn_url {url!r} has no host")
    return host, port or 5432


def _tag(tags: Any, name: str) -> bool:
    if not isinstance(tags, dict):
        return False
    value = tags.get(name)
    if isinstance(value, str):
        return value.lower() in ("true", "on", "yes", "1")
    return value is True


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_member(name: str, value: str | bytes) -> PatroniMember:
    """A ``members/<name>`` key's value."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise PatroniDataError(f"member {name}: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise PatroniDataError(f"member {name}: not a JSON object")
    conn_url = data.get("conn_url")
    if not isinstance(conn_url, str):
        raise PatroniDataError(f"member {name}: no conn_url")
    host, port = parse_conn_url(conn_url)
    tags = data.get("tags")
    return PatroniMember(
        name=name, host=host, port=port,
        role=_str_or_none(data.get("role")), state=_str_or_none(data.get("state")),
        timeline=_int_or_none(data.get("timeline")), xlog_location=_int_or_none(data.get("xlog_location")),
        api_url=_str_or_none(data.get("api_url")),
        noloadbalance=_tag(tags, "noloadbalance"), nofailover=_tag(tags, "nofailover"),
    )


def rest_base(api_url: str) -> str:
    """``http://host:8008`` of a member's ``api_url`` (``http://host:8008/patroni``)."""
    parts = urlsplit(api_url)
    return f"{parts.scheme}://{parts.netloc}"


# --- etcd v3 JSON gateway ------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def prefix_end(prefix: str) -> str:
    """etcd's range_end for every key that starts with ``prefix`` (its last byte plus one)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return base64.b64encode(b"\0").decode()
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise PatroniDataError(f"{what}: not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise PatroniDataError(f"{what}: not base64") from None


def _revision(value: Any, what: str) -> int:
    """etcd's int64 fields come as JSON strings (absent when zero)."""
    if value is None:
        return 0
    number = _int_or_none(value)
    if number is None:
        raise PatroniDataError(f"{what}: not a revision: {value!r}")
    return number


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class KeyEvent:
    """One change a watch reported: a put (``kv``) or a delete (``kv.value`` empty)."""

    deleted: bool
    kv: KeyValue


def _kv(raw: Any) -> KeyValue:
    if not isinstance(raw, dict):
        raise PatroniDataError("kv: not an object")
    key = _unb64(raw.get("key"), "kv.key").decode("utf-8", "replace")
    value = _unb64(raw.get("value", ""), f"{key}: value")
    return KeyValue(key, value, _revision(raw.get("create_revision"), f"{key}: create_revision"),
                    _revision(raw.get("mod_revision"), f"{key}: mod_revision"))


def header_revision(answer: Any) -> int:
    if not isinstance(answer, dict):
        raise PatroniDataError("answer: not an object")
    header = answer.get("header", {})
    if not isinstance(header, dict):
        raise PatroniDataError("header: not an object")
    return _revision(header.get("revision"), "header.revision")


def parse_range(answer: Any) -> tuple[int, list[KeyValue]]:
    """(store revision, key-values) of a ``/v3/kv/range`` answer."""
    revision = header_revision(answer)
    kvs = answer.get("kvs", [])
    if not isinstance(kvs, list):
        raise PatroniDataError("kvs: not a list")
    return revision, [_kv(raw) for raw in kvs]


@dataclass(frozen=True)
class WatchMessage:
    revision: int
    events: list[KeyEvent]
    created: bool = False
    canceled: str | None = None  # why etcd ended the watch (compacted, ...), None while it runs


def parse_watch_message(line: str | bytes) -> WatchMessage:
    """One line of a ``/v3/watch`` stream."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise PatroniDataError(f"watch: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise PatroniDataError("watch: not an object")
    if "error" in data:
        raise PatroniDataError(f"watch: {data['error']}")
    result = data.get("result")
    if not isinstance(result, dict):
        raise PatroniDataError("watch: no result")
    events_raw = result.get("events", [])
    if not isinstance(events_raw, list):
        raise PatroniDataError("watch: events not a list")
    events = []
    for raw in events_raw:
        if not isinstance(raw, dict):
            raise PatroniDataError("watch: event not an object")
        events.append(KeyEvent(raw.get("type") == "DELETE", _kv(raw.get("kv"))))
    canceled = None
    if result.get("canceled"):
        canceled = str(result.get("cancel_reason") or "canceled")
        if result.get("compact_revision"):
            canceled = f"compacted (revision {result.get('compact_revision')})"
    return WatchMessage(header_revision(result), events, bool(result.get("created")), canceled)


# --- the state they describe ---------------------------------------------------------------------


@dataclass
class PatroniView:
    """The cluster as the store describes it; ``apply_*`` return True when anything changed."""

    prefix: str  # "<namespace>/<scope>/"
    leader: str | None = None
    revision: int | None = None  # the fencing token: the leader key's create revision (or its delete's)
    store_revision: int = 0  # the newest store revision seen
    members: dict[str, PatroniMember] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # members that did not parse (latest first)

    def _relative(self, key: str) -> str | None:
        return key[len(self.prefix):] if key.startswith(self.prefix) else None

    def apply_snapshot(self, revision: int, kvs: list[KeyValue]) -> bool:
        """A whole range of the prefix: it replaces what was known."""
        before = self.fingerprint()
        had_leader = self.leader is not None
        self.leader, self.members = None, {}
        leader_seen = False
        for kv in kvs:
            leader_seen |= self._put(kv)
        if not leader_seen and had_leader:
            self.revision = revision  # gone since we last looked: its delete is at most this recent
        self.store_revision = max(self.store_revision, revision)
        return self.fingerprint() != before

    def apply_events(self, message: WatchMessage) -> bool:
        before = self.fingerprint()
        for ev in message.events:
            if ev.deleted:
                self._delete(ev.kv.key, ev.kv.mod_revision or message.revision)
            else:
                self._put(ev.kv)
        self.store_revision = max(self.store_revision, message.revision)
        return self.fingerprint() != before

    def apply_leader(self, revision: int, kv: KeyValue | None) -> bool:
        """A range of the leader key alone (the liveness check): None means it is absent."""
        before = self.fingerprint()
        if kv is None:
            if self.leader is not None:
                self.leader, self.revision = None, revision
        else:
            self._put(kv)
        self.store_revision = max(self.store_revision, revision)
        return self.fingerprint() != before

    def apply_rest(self, leader: str | None, members: list[PatroniMember]) -> bool:
        """Patroni's ``GET /cluster``: no revisions (the fencing token stays as last known
        unless the leader changed, then it is unknown)."""
        before = self.fingerprint()
        if leader != self.leader:
            self.revision = None
        self.leader = leader
        self.members = {m.name: m for m in members}
        return self.fingerprint() != before

    def _put(self, kv: KeyValue) -> bool:
        rel = self._relative(kv.key)
        if rel == "leader":
            name = kv.value.decode("utf-8", "replace")
            self.leader = name or None
            self.revision = kv.create_revision
            return True
        if rel is not None and rel.startswith("members/"):
            name = rel[len("members/"):]
            try:
                self.members[name] = parse_member(name, kv.value)
            except PatroniDataError as e:
                self.members.pop(name, None)
                self.errors = [str(e), *self.errors][:10]
        return False

    def _delete(self, key: str, revision: int) -> None:
        rel = self._relative(key)
        if rel == "leader":
            self.leader = None
            self.revision = revision
        elif rel is not None and rel.startswith("members/"):
            self.members.pop(rel[len("members/"):], None)

    def fingerprint(self) -> tuple[object, ...]:
        return (self.leader, self.revision, tuple(sorted(self.members.items())))

    def lag_bytes(self, name: str) -> int | None:
        """A member's lag behind the leader as the store shows it (xlog_location difference)."""
        member = self.members.get(name)
        if member is None:
            return None
        if member.lag_bytes is not None:
            return member.lag_bytes
        leader = self.members.get(self.leader) if self.leader is not None else None
        if leader is None or leader.xlog_location is None or member.xlog_location is None:
            return None
        return max(0, leader.xlog_location - member.xlog_location)


def parse_rest_cluster(answer: Any) -> tuple[str | None, list[PatroniMember]]:
    """(leader, members) of Patroni's ``GET /cluster``."""
    if not isinstance(answer, dict):
        raise PatroniDataError("/cluster: not an object")
    raw_members = answer.get("members", [])
    if not isinstance(raw_members, list):
        raise PatroniDataError("/cluster: members not a list")
    leader = None
    members = []
    for raw in raw_members:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise PatroniDataError("/cluster: a member without a name")
        name = raw["name"]
        host, port = raw.get("host"), _int_or_none(raw.get("port"))
        if not isinstance(host, str) or port is None:
            raise PatroniDataError(f"/cluster: member {name} without host and port")
        role = _str_or_none(raw.get("role"))
        if role in ("leader", "standby_leader"):
            leader = name
        tags = raw.get("tags")
        members.append(PatroniMember(
            name=name, host=host, port=port, role=role, state=_str_or_none(raw.get("state")),
            timeline=_int_or_none(raw.get("timeline")), api_url=_str_or_none(raw.get("api_url")),
            noloadbalance=_tag(tags, "noloadbalance"), nofailover=_tag(tags, "nofailover"),
            lag_bytes=_int_or_none(raw.get("lag")),
        ))
    return leader, members
