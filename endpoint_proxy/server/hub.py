"""The relay hub: one level-triggered epoll per process for sessions in steady state.

A session task that would otherwise wait for its socket to become readable parks here
instead, with a callback. The hub owns one ``select.epoll`` whose registrations persist
while the task is parked, and waits on that epoll's own descriptor through trio. When a
parked socket is readable the hub calls the callback right there, in the hub's task: the
callback reads, relays and returns ``None`` to stay parked, or returns a value to hand the
work back, which wakes the parked task with that value.

Why: parked in trio, every wait costs an ``epoll_ctl`` re-arm (trio's registrations are
one-shot), a scheduler pass and a task switch, per message, per direction. Here a steady
request/response stream costs the ``recv`` and ``send`` and a share of one ``epoll_wait``;
the sessions' own tasks run only for what is not routine (startup, failover, routing
decisions, a peer that reads slower than the other side writes).
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import outcome
import trio

# Events taken from the epoll per poll, and polls run back to back before the hub lets
# the rest of the process (new connections, monitors, slow paths) have a turn.
_MAX_EVENTS = 512
_ROUNDS = 4


class HandBack:
    """A value a callback returns to wake its parked task: ``kind`` says what to do next."""

    __slots__ = ("kind", "data", "extra")

    def __init__(self, kind: int, data: Any = None, extra: Any = None) -> None:
        self.kind = kind
        self.data = data
        self.extra = extra


# Kinds of hand-back. READ: nothing was consumed; read the socket yourself (end of stream,
# an error, the hub stopping). The others are the caller's own.
READ = HandBack(0)


class _Parked:
    __slots__ = ("task", "callback")

    def __init__(self, task: trio.lowlevel.Task, callback: Callable[[], object]) -> None:
        self.task = task
        self.callback = callback


class Hub:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._parked: dict[int, _Parked] = {}
        self.running = False
        # Plain integers for the metrics (read at scrape time): callbacks run, and how many
        # of them handed the work back to their session's task.
        self.events = 0
        self.handbacks = 0

    @property
    def parked(self) -> int:
        return len(self._parked)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        epoll = self._epoll
        parked = self._parked
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for _ in range(_ROUNDS):
                    events = epoll.poll(0, _MAX_EVENTS)
                    if not events:
                        break
                    self.events += len(events)
                    for fd, _mask in events:
                        entry = parked.get(fd)
                        if entry is None:
                            continue  # handed back or cancelled earlier in this batch
                        try:
                            result = entry.callback()
                        except Exception as e:  # the session's own failure, raised in its task
                            self._wake(fd, entry, outcome.Error(e))
                            continue
                        if result is not None:
                            self._wake(fd, entry, outcome.Value(result))
                    if len(events) < _MAX_EVENTS:
                        break
        finally:
            self.running = False
            for fd, entry in list(parked.items()):
                self._wake(fd, entry, outcome.Value(READ))
            epoll.close()

    def _wake(self, fd: int, entry: _Parked, result: outcome.Outcome[object]) -> None:
        if self._parked.get(fd) is not entry:
            return  # the callback's own work cancelled the task (a drain), which forgot it
        del self._parked[fd]
        self.handbacks += 1
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        trio.lowlevel.reschedule(entry.task, result)

    async def wait(self, fd: int, callback: Callable[[], object]) -> object:
        """Park the calling task until ``callback`` (run by the hub each time ``fd`` is
        readable) returns something other than None; return that. The caller must not read
        ``fd`` while parked, nor close it (cancel the task first)."""
        if not self.running:
            return READ
        if fd in self._parked:
            raise RuntimeError(f"descriptor {fd} is already parked in the relay hub")
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # still registered though nobody is parked on it: take it over
            self._epoll.modify(fd, select.EPOLLIN)
        entry = _Parked(trio.lowlevel.current_task(), callback)
        self._parked[fd] = entry

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self._parked.get(fd) is entry:
                del self._parked[fd]
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)
