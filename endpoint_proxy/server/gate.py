"""The writer gate: where sessions hold new writer work while a switchover runs.

Contract for sessions (one gate per cluster, ``cluster.drills.gate``):

- At a request boundary, before starting new work that will run on the writer (a statement
  outside a transaction, or the first statement of a transaction), call
  ``await gate.enter(key)`` — or, equivalently, ``if not gate.is_open: await
  gate.wait_open()`` followed by ``gate.begin(key)`` with no checkpoint in between.
  ``key`` is anything hashable that names the session (the session object itself).
- Statements inside a transaction that already began do not wait: call ``begin(key)``
  again if convenient (it is idempotent) but never ``wait_open`` mid-transaction, or a
  switchover would wait for a transaction that waits for it.
- When the session is back to idle on the writer (ReadyForQuery 'I'; MySQL OK/EOF without
  SERVER_STATUS_IN_TRANS), and when it ends for any reason, call ``gate.end(key)``.

The switchover side: ``close()`` makes new writer work wait; ``wait_empty()`` returns once
every session that began has ended; ``open()`` lets the held work go. While the gate is open
``enter``, ``wait_open``, ``begin`` and ``end`` cost a set operation and no checkpoint: they
run on every writer request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager

import trio


class WriterGate:
    """See the module docstring. ``holding``: a context manager factory entered while a
    session waits at the closed gate (the held-statement metrics)."""

    def __init__(self, holding: Callable[[], AbstractContextManager[object]] | None = None) -> None:
        self._holding = holding
        self._inside: set[Hashable] = set()
        self._opened = trio.Event()
        self._opened.set()
        self.is_open = True  # (a plain field, kept with _opened: read at every transaction's start)
        self._emptied: trio.Event | None = None
        self.held = 0  # sessions waiting at the closed gate now

    @property
    def inside(self) -> int:
        """Sessions with writer work under way (begun and not ended)."""
        return len(self._inside)

    def begin(self, key: Hashable) -> None:
        self._inside.add(key)

    def end(self, key: Hashable) -> None:
        self._inside.discard(key)
        if not self._inside and self._emptied is not None:
            self._emptied.set()

    async def wait_open(self) -> None:
        """Return once the gate is open: at once, without a checkpoint, when it is."""
        if self._opened.is_set():
            return
        hold = self._holding() if self._holding is not None else contextlib.nullcontext()
        self.held += 1
        try:
            with hold:
                await self._opened.wait()
        finally:
            self.held -= 1

    async def enter(self, key: Hashable) -> None:
        """``wait_open`` then ``begin``, with nothing in between."""
        if not self._opened.is_set():
            await self.wait_open()
        self._inside.add(key)

    # --- the switchover's side -----------------------------------------------------------------

    def close(self) -> None:
        """New writer work waits from now on; work under way goes on."""
        if self._opened.is_set():
            self._opened = trio.Event()
        self.is_open = False

    def open(self) -> None:
        """Let held work go (idempotent)."""
        self.is_open = True
        self._opened.set()

    async def wait_empty(self) -> None:
        """Return once no session has writer work under way (at once if none has)."""
        while self._inside:
            self._emptied = trio.Event()
            await self._emptied.wait()
        self._emptied = None
