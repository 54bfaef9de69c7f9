"""What the proxy remembers across restarts (the state file's contents): per cluster, fencing's high-water mark.

Rules of this file: pure, no I/O. The format is JSON, one object:

    {"version": 1, "clusters": {"app": {"timeline": 3, "instance": "b"}}}

``timeline`` is the highest timeline (PostgreSQL) or binlog history depth (MariaDB) seen on
a writable instance of the cluster, ``instance`` the one that had it. Anything else is
refused whole with a ValueError that says what is wrong: a half-read memory could unfence an
old primary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from .state import HighWater

VERSION: Final = 1


def encode_memory(marks: Mapping[str, HighWater]) -> str:
    clusters = {name: {"timeline": m.timeline, "instance": m.instance} for name, m in sorted(marks.items())}
    return json.dumps({"version": VERSION, "clusters": clusters}, indent=2) + "\n"


def _mark(name: str, value: object) -> HighWater:
    if not isinstance(value, dict) or set(value) != {"timeline", "instance"}:
        raise ValueError(f"cluster {name!r}: expected {{\"timeline\": ..., \"instance\": ...}}")
    timeline, instance = value["timeline"], value["instance"]
    if isinstance(timeline, bool) or not isinstance(timeline, int) or timeline < 0:
        raise ValueError(f"cluster {name!r}: timeline must be a non-negative integer, not {timeline!r}")
    if not isinstance(instance, str):
        raise ValueError(f"cluster {name!r}: instance must be a string, not {instance!r}")
    return HighWater(timeline, instance)


def decode_memory(text: str) -> dict[str, HighWater]:
    """The marks of a state file's text; ValueError on anything but the format above."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("clusters"), dict):
        raise ValueError(f"expected {{\"version\": {VERSION}, \"clusters\": {{...}}}}")
    return {str(name): _mark(str(name), value) for name, value in doc["clusters"].items()}


def merge_memory(old: Mapping[str, HighWater], new: Mapping[str, HighWater]) -> dict[str, HighWater]:
    """Both, keeping per cluster the higher mark (on a tie, ``new``): marks only rise, whichever
    process or run wrote them."""
    merged = dict(old)
    for name, mark in new.items():
        current = merged.get(name)
        if current is None or mark.timeline >= current.timeline:
            merged[name] = mark
    return merged
