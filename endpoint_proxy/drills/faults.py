"""Injected faults: the SIMULATE grammar, its JSON form, and the registry of active faults.

Rules of this file: no I/O and no clock. Callers pass the current time (monotonic seconds,
trio's clock) and, for display, the wall-clock time; a fault lifts by itself once its time
is up (``FaultSet.expire``), and every query ignores faults past their time even before
that. The I/O layer applies what the registry answers: probes that fail, connections that
are refused or reset, toxics on server traffic (``relay.toxics``), a lag the topology adds.

Grammar (case-insensitive; a name may be quoted with ' or "; ``FOR n SECONDS`` also takes
SECOND, MINUTE, MINUTES; ``<ms>`` values may carry a trailing ``MS``)::

    SIMULATE INSTANCE FAILURE <name> FOR <n> SECONDS
    SIMULATE <p> PERCENT READ REPLICA FAILURE [TO <name> | TO ALL] FOR <n> SECONDS
    SIMULATE LATENCY <ms> [JITTER <ms>] TO <name> FOR <n> SECONDS
    SIMULATE BANDWIDTH <kB/s> TO <name> FOR <n> SECONDS
    SIMULATE SLICER [SIZE <bytes>] [VARIATION <bytes>] [DELAY <ms>] TO <name> FOR <n> SECONDS
    SIMULATE RESET [AFTER <ms>] TO <name> FOR <n> SECONDS
    SIMULATE REPLICA LAG <name> <ms> FOR <n> SECONDS
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final


class FaultKind(StrEnum):
    INSTANCE_FAILURE = "instance_failure"
    READ_REPLICA_FAILURE = "read_replica_failure"
    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    SLICER = "slicer"
    RESET = "reset"
    REPLICA_LAG = "replica_lag"


FAULT_KINDS: Final = tuple(k.value for k in FaultKind)
# Kinds that act on the bytes of server connections (relay.toxics).
TOXIC_KINDS: Final = frozenset({FaultKind.LATENCY, FaultKind.BANDWIDTH, FaultKind.SLICER, FaultKind.RESET})

MAX_SECONDS: Final = 7 * 86400.0
MAX_MS: Final = 600_000.0
DEFAULT_SLICE_BYTES: Final = 64
DEFAULT_SLICE_DELAY_MS: Final = 1.0


class FaultError(ValueError):
    """A fault command or document is wrong; the message says what and how to write it."""


# The parameters of each kind (besides kind, instance and seconds), as the JSON form names them.
PARAMS: Final[dict[FaultKind, tuple[str, ...]]] = {
    FaultKind.INSTANCE_FAILURE: (),
    FaultKind.READ_REPLICA_FAILURE: ("percent",),
    FaultKind.LATENCY: ("latency_ms", "jitter_ms"),
    FaultKind.BANDWIDTH: ("kilobytes_per_second",),
    FaultKind.SLICER: ("size", "variation", "delay_ms"),
    FaultKind.RESET: ("after_ms",),
    FaultKind.REPLICA_LAG: ("lag_ms",),
}


@dataclass(frozen=True)
class FaultSpec:
    """One fault as asked for, before it is registered. ``instance`` None: every replica
    (READ REPLICA FAILURE only). Only the fields of its kind matter."""

    kind: FaultKind
    instance: str | None
    seconds: float
    percent: float = 100.0  # read_replica_failure
    latency_ms: float = 0.0  # latency
    jitter_ms: float = 0.0  # latency
    kilobytes_per_second: float = 0.0  # bandwidth (1 kB = 1000 bytes)
    size: int = DEFAULT_SLICE_BYTES  # slicer: average piece size in bytes
    variation: int = 0  # slicer: pieces vary by up to this many bytes either way
    delay_ms: float = DEFAULT_SLICE_DELAY_MS  # slicer: pause between pieces
    after_ms: float = 0.0  # reset: a connection is reset once open (under the fault) this long
    lag_ms: float = 0.0  # replica_lag

    def params(self) -> dict[str, float | int]:
        return {n: getattr(self, n) for n in PARAMS[self.kind]}

    def describe(self) -> str:
        target = self.instance if self.instance is not None else "every replica"
        k = self.kind
        if k is FaultKind.INSTANCE_FAILURE:
            return f"instance failure of {target}"
        if k is FaultKind.READ_REPLICA_FAILURE:
            return f"{_num(self.percent)}% read replica failure ({target})"
        if k is FaultKind.LATENCY:
            jitter = f" \u00b1 {_num(self.jitter_ms)} ms" if self.jitter_ms else ""
            return f"latency {_num(self.latency_ms)} ms{jitter} to {target}"
        if k is FaultKind.BANDWIDTH:
            return f"bandwidth {_num(self.kilobytes_per_second)} kB/s to {target}"
        if k is FaultKind.SLICER:
            spread = f"\u00b1{self.variation}" if self.variation else ""
            return f"slicer: {self.size}{spread}-byte pieces every {_num(self.delay_ms)} ms to {target}"
        if k is FaultKind.RESET:
            return f"reset after {_num(self.after_ms)} ms to {target}"
        return f"replica lag {_num(self.lag_ms)} ms on {target}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- the SIMULATE grammar ------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:"((?:[^"]|"")*)"|'((?:[^']|'')*)'|(\S+))""")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_UNITS: Final = {"SECOND": 1.0, "SECONDS": 1.0, "MINUTE": 60.0, "MINUTES": 60.0}

USAGE: Final = (
    "SIMULATE INSTANCE FAILURE <name> FOR <n> SECONDS | "
    "SIMULATE <p> PERCENT READ REPLICA FAILURE [TO <name>] FOR <n> SECONDS | "
    "SIMULATE LATENCY <ms> [JITTER <ms>] TO <name> FOR <n> SECONDS | "
    "SIMULATE BANDWIDTH <kB/s> TO <name> FOR <n> SECONDS | "
    "SIMULATE SLICER [SIZE <bytes>] [VARIATION <bytes>] [DELAY <ms>] TO <name> FOR <n> SECONDS | "
    "SIMULATE RESET [AFTER <ms>] TO <name> FOR <n> SECONDS | "
    "SIMULATE REPLICA LAG <name> <ms> FOR <n> SECONDS"
)


@dataclass
class _Words:
    """The tokens of a command: (text, quoted) pairs, consumed from the front."""

    items: list[tuple[str, bool]]
    pos: int = 0

    @classmethod
    def of(cls, text: str) -> _Words:
        items: list[tuple[str, bool]] = []
        pos = 0
        text = text.strip().rstrip(";").strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                break
            if m.group(1) is not None:
                items.append((m.group(1).replace('""', '"'), True))
            elif m.group(2) is not None:
                items.append((m.group(2).replace("''", "'"), True))
            else:
                items.append((m.group(3), False))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        return cls(items)

    def peek(self) -> str | None:
        if self.pos >= len(self.items):
            return None
        text, quoted = self.items[self.pos]
        return None if quoted else text.upper()

    def accept(self, *keywords: str) -> bool:
        """Consume the keywords if they come next (all of them), else nothing."""
        n = len(keywords)
        words = self.items[self.pos:self.pos + n]
        if len(words) == n and all(not q and w.upper() == k for (w, q), k in zip(words, keywords, strict=True)):
            self.pos += n
            return True
        return False

    def expect(self, *keywords: str) -> None:
        if not self.accept(*keywords):
            got = self.items[self.pos][0] if self.pos < len(self.items) else "the end of the command"
            raise FaultError(f"expected {' '.join(keywords)}, got {got!r}")

    def name(self, what: str = "an instance name") -> str:
        if self.pos >= len(self.items):
            raise FaultError(f"expected {what}")
        text, _ = self.items[self.pos]
        self.pos += 1
        return text

    def number(self, what: str) -> float:
        if self.pos >= len(self.items) or self.items[self.pos][1]:
            raise FaultError(f"expected {what}")
        text = self.items[self.pos][0]
        if not _NUMBER.fullmatch(text):
            raise FaultError(f"expected {what}, got {text!r}")
        self.pos += 1
        return float(text)

    def ms(self, what: str) -> float:
        value = self.number(what)
        self.accept("MS")
        return value

    def done(self) -> bool:
        return self.pos >= len(self.items)


def parse_simulate(command: str) -> FaultSpec:
    """Parse one SIMULATE command (see the module docstring); raises FaultError."""
    w = _Words.of(command)
    w.expect("SIMULATE")
    values: dict[str, Any] = {}
    if w.accept("INSTANCE", "FAILURE"):
        kind, instance = FaultKind.INSTANCE_FAILURE, w.name()
    elif w.accept("REPLICA", "LAG"):
        kind, instance = FaultKind.REPLICA_LAG, w.name()
        values["lag_ms"] = w.ms("the lag in milliseconds")
    elif w.accept("LATENCY"):
        kind = FaultKind.LATENCY
        values["latency_ms"] = w.ms("the latency in milliseconds")
        if w.accept("JITTER"):
            values["jitter_ms"] = w.ms("the jitter in milliseconds")
        instance = _to(w)
    elif w.accept("BANDWIDTH"):
        kind = FaultKind.BANDWIDTH
        values["kilobytes_per_second"] = w.number("the bandwidth in kB/s")
        w.accept("KB/S")
        instance = _to(w)
    elif w.accept("SLICER"):
        kind = FaultKind.SLICER
        while not w.peek() == "TO":
            if w.accept("SIZE"):
                values["size"] = _whole(w.number("the piece size in bytes"), "SIZE")
                w.accept("BYTES")
            elif w.accept("VARIATION"):
                values["variation"] = _whole(w.number("the size variation in bytes"), "VARIATION")
                w.accept("BYTES")
            elif w.accept("DELAY"):
                values["delay_ms"] = w.ms("the delay in milliseconds")
            else:
                w.expect("TO")
        instance = _to(w)
    elif w.accept("RESET"):
        kind = FaultKind.RESET
        if w.accept("AFTER"):
            values["after_ms"] = w.ms("the time in milliseconds")
        instance = _to(w)
    elif w.peek() is not None and _NUMBER.fullmatch(w.peek() or ""):
        kind = FaultKind.READ_REPLICA_FAILURE
        values["percent"] = w.number("a percentage")
        w.expect("PERCENT", "READ", "REPLICA", "FAILURE")
        instance = None
        if w.accept("TO"):
            instance = None if w.accept("ALL") else w.name()
    else:
        raise FaultError(f"unknown fault; one of: {USAGE}")
    w.expect("FOR")
    seconds = w.number("a duration")
    unit = w.peek()
    if unit not in _UNITS:
        raise FaultError("expected SECONDS or MINUTES after the duration")
    w.accept(unit)
    if not w.done():
        raise FaultError(f"unexpected {w.name()!r} at the end of the command")
    return validate(FaultSpec(kind, instance, seconds * _UNITS[unit], **values))


def _to(w: _Words) -> str:
    w.expect("TO")
    return w.name()


def _whole(value: float, what: str) -> int:
    if not value.is_integer():
        raise FaultError(f"{what} must be a whole number of bytes")
    return int(value)


def validate(spec: FaultSpec) -> FaultSpec:
    """Check the ranges of a spec; returns it, or raises FaultError."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise FaultError(message)

    check(0 < spec.seconds <= MAX_SECONDS, f"the duration must be more than 0 and at most {int(MAX_SECONDS)} seconds")
    check(spec.instance is not None or spec.kind is FaultKind.READ_REPLICA_FAILURE, "an instance name is required")
    check(spec.instance is None or spec.instance != "", "the instance name must not be empty")
    k = spec.kind
    if k is FaultKind.READ_REPLICA_FAILURE:
        check(0 < spec.percent <= 100, "the percentage must be more than 0 and at most 100")
    elif k is FaultKind.LATENCY:
        check(0 <= spec.latency_ms <= MAX_MS and 0 <= spec.jitter_ms <= MAX_MS,
              f"latency and jitter must be 0..{int(MAX_MS)} ms")
        check(spec.latency_ms > 0 or spec.jitter_ms > 0, "latency or jitter must be more than 0")
    elif k is FaultKind.BANDWIDTH:
        check(0 < spec.kilobytes_per_second <= 10_000_000,
              "the bandwidth must be more than 0 and at most 10000000 kB/s")
    elif k is FaultKind.SLICER:
        check(1 <= spec.size <= 1 << 20, "SIZE must be 1..1048576 bytes")
        check(0 <= spec.variation < spec.size, "VARIATION must be less than SIZE")
        check(0 <= spec.delay_ms <= 10_000, "DELAY must be 0..10000 ms")
    elif k is FaultKind.RESET:
        check(0 <= spec.after_ms <= MAX_MS, f"AFTER must be 0..{int(MAX_MS)} ms")
    elif k is FaultKind.REPLICA_LAG:
        check(0 < spec.lag_ms <= 86_400_000, "the lag must be more than 0 and at most 86400000 ms")
    return spec


# --- the JSON form (POST /faults, the pytest plugin's inject) ----------------------------------------


def spec_from_json(doc: Mapping[str, Any]) -> FaultSpec:
    """``{"kind": "latency", "instance": "b", "seconds": 10, "latency_ms": 50, ...}`` as a spec.

    Unknown keys, wrong types and out-of-range values raise FaultError naming the key.
    ``cluster`` is allowed (the caller resolves it)."""
    kind_text = doc.get("kind")
    if kind_text not in FAULT_KINDS:
        raise FaultError(f"kind must be one of {', '.join(FAULT_KINDS)} (got {kind_text!r})")
    kind = FaultKind(kind_text)
    allowed = {"kind", "instance", "seconds", "cluster", *PARAMS[kind]}
    for key in doc:
        if key not in allowed:
            raise FaultError(f"{key}: not a parameter of a {kind.value} fault "
                             f"(allowed: {', '.join(sorted(allowed - {'kind'}))})")
    instance = doc.get("instance")
    if instance is not None and not isinstance(instance, str):
        raise FaultError("instance: must be a string")
    values: dict[str, Any] = {}
    for key in PARAMS[kind]:
        if key in doc:
            values[key] = _json_number(doc, key, whole=key in ("size", "variation"))
    if "seconds" not in doc:
        raise FaultError("seconds: is required (how long the fault lasts)")
    seconds = _json_number(doc, "seconds")
    return validate(FaultSpec(kind, instance, float(seconds), **values))


def _json_number(doc: Mapping[str, Any], key: str, *, whole: bool = False) -> float | int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultError(f"{key}: must be a number")
    if whole:
        if not float(value).is_integer():
            raise FaultError(f"{key}: must be a whole number")
        return int(value)
    return float(value)


# --- the registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A registered fault. ``started_at``/``expires_at`` are monotonic; ``started_wall`` is
    the wall-clock time (epoch seconds) for people."""

    id: int
    cluster: str
    spec: FaultSpec
    started_at: float
    expires_at: float
    started_wall: float = 0.0

    @property
    def kind(self) -> FaultKind:
        return self.spec.kind

    @property
    def instance(self) -> str | None:
        return self.spec.instance

    def active(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "cluster": self.cluster,
            "kind": self.kind.value,
            "instance": self.instance,
            "description": self.spec.describe(),
            "seconds": self.spec.seconds,
            "started_at": round(self.started_wall, 3),
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
            **self.spec.params(),
        }


@dataclass(frozen=True)
class Toxics:
    """What the faults of one instance do to its server connections (see relay.toxics).

    ``failed``: INSTANCE FAILURE: connections are reset and new ones refused. A connection
    is reset once it has been open ``reset_after_ms`` since ``reset_since`` (the fault's
    start) or its own opening, whichever is later. ``until``: when this answer may change by
    the passing of time alone (the earliest expiry)."""

    failed: bool = False
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bytes_per_second: float | None = None
    slice_size: int | None = None
    slice_variation: int = 0
    slice_delay_ms: float = 0.0
    reset_after_ms: float | None = None
    reset_since: float = 0.0
    until: float = math.inf


def combine_toxics(faults: Iterable[Fault]) -> Toxics | None:
    """The combined effect of an instance's faults: latencies add up (as stacked toxics do),
    the lowest bandwidth wins, the first slicer applies, the earliest reset comes first."""
    t: Toxics | None = None
    for f in faults:
        s = f.spec
        t = t or Toxics()
        t = replace(t, until=min(t.until, f.expires_at))
        if s.kind is FaultKind.INSTANCE_FAILURE:
            t = replace(t, failed=True)
        elif s.kind is FaultKind.LATENCY:
            t = replace(t, latency_ms=t.latency_ms + s.latency_ms, jitter_ms=t.jitter_ms + s.jitter_ms)
        elif s.kind is FaultKind.BANDWIDTH:
            rate = s.kilobytes_per_second * 1000
            t = replace(t, bytes_per_second=rate if t.bytes_per_second is None else min(rate, t.bytes_per_second))
        elif s.kind is FaultKind.SLICER and t.slice_size is None:
            t = replace(t, slice_size=s.size, slice_variation=s.variation, slice_delay_ms=s.delay_ms)
        elif s.kind is FaultKind.RESET:
            due = f.started_at + s.after_ms / 1000
            if t.reset_after_ms is None or due < t.reset_since + t.reset_after_ms / 1000:
                t = replace(t, reset_after_ms=s.after_ms, reset_since=f.started_at)
    return t


@dataclass
class FaultSet:
    """The active faults of one cluster. Every change bumps ``generation``."""

    cluster: str = ""
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    generation: int = 0
    _faults: dict[int, Fault] = field(default_factory=dict)
    _toxics_cache: dict[str, tuple[int, Toxics | None]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No fault at all (the usual case: sessions ask before every borrow)."""
        return not self._faults

    def add(self, spec: FaultSpec, now: float, wall: float = 0.0) -> Fault:
        fault = Fault(next(self.ids), self.cluster, spec, now, now + spec.seconds, wall)
        self._faults[fault.id] = fault
        self.generation += 1
        return fault

    def active(self, now: float) -> list[Fault]:
        return [f for f in self._faults.values() if f.active(now)]

    def expire(self, now: float) -> list[Fault]:
        """Remove the faults whose time is up; returns them (in id order)."""
        lifted = [f for f in self._faults.values() if not f.active(now)]
        for f in lifted:
            del self._faults[f.id]
        if lifted:
            self.generation += 1
        return lifted

    def clear(self, fault_id: int | None = None) -> list[Fault]:
        """Remove one fault (by id) or all; returns what was removed."""
        if fault_id is None:
            removed = list(self._faults.values())
            self._faults.clear()
        else:
            one = self._faults.pop(fault_id, None)
            removed = [one] if one is not None else []
        if removed:
            self.generation += 1
        return removed

    def next_expiry(self) -> float | None:
        return min((f.expires_at for f in self._faults.values()), default=None)

    def _of(self, kind: FaultKind, now: float) -> list[Fault]:
        if not self._faults:
            return []  # the usual case, asked on every borrow
        return [f for f in self._faults.values() if f.kind is kind and f.active(now)]

    def instance_failed(self, instance: str, now: float) -> Fault | None:
        """The INSTANCE FAILURE fault of an instance, if one is active."""
        return next((f for f in self._of(FaultKind.INSTANCE_FAILURE, now) if f.instance == instance), None)

    def lag_ms(self, now: float) -> dict[str, float]:
        """REPLICA LAG: the lag each instance is to be treated as having, at least."""
        lags: dict[str, float] = {}
        for f in self._of(FaultKind.REPLICA_LAG, now):
            assert f.instance is not None
            lags[f.instance] = max(lags.get(f.instance, 0.0), f.spec.lag_ms)
        return lags

    def read_failure_percent(self, instance: str, now: float) -> float:
        """READ REPLICA FAILURE: the share (0..100) of new reader routings to ``instance``
        that fail; the largest of the faults that name it (or every replica) applies."""
        shares = [f.spec.percent for f in self._of(FaultKind.READ_REPLICA_FAILURE, now)
                  if f.instance is None or f.instance == instance]
        return max(shares, default=0.0)

    def toxics(self, instance: str, now: float) -> Toxics | None:
        """What the faults do to server connections of ``instance`` now (None: nothing).
        Cached per instance until the set changes or a fault expires: relays ask per call."""
        cached = self._toxics_cache.get(instance)
        if cached is not None and cached[0] == self.generation and (cached[1] is None or now < cached[1].until):
            return cached[1]
        relevant = [f for f in self._faults.values()
                    if f.instance == instance and f.active(now)
                    and (f.kind in TOXIC_KINDS or f.kind is FaultKind.INSTANCE_FAILURE)]
        toxics = combine_toxics(relevant)
        if toxics is None or now >= toxics.until:
            toxics = None
        self._toxics_cache[instance] = (self.generation, toxics)
        return toxics


def routing_fails(percent: float, rng: random.Random) -> bool:
    """Does this new reader routing fail? True for ``percent`` % of calls (seedable ``rng``)."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    return rng.random() * 100 < percent
