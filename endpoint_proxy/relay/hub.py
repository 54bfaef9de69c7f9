"""The relay hub: one level-triggered epoll per process for sessions in steady state.

A session task that would otherwise wait for its socket to become readable parks here
instead, with a callback. The hub owns one ``select.epoll`` whose registrations persist
while the task is parked. When a parked socket is readable the hub calls the callback
right there: the callback reads, relays and returns ``None`` to stay parked, or returns a
value to hand the work back, which wakes the parked task with that value.

Where the callbacks run: inside trio's own I/O dispatch, between two task batches (see
``_LoopHook``; the hub's epoll sits in trio's), or, where that hook cannot be installed, in
the hub's task, which then waits for its epoll's descriptor through trio.

Why: parked in trio, every wait costs an ``epoll_ctl`` re-arm (trio's registrations are
one-shot), a scheduler pass and a task switch, per message, per direction. Here a steady
request/response stream costs the ``recv`` and ``send`` and a share of two ``epoll_wait``
calls; the sessions' own tasks run only for what is not routine (startup, failover,
routing decisions, a peer that reads slower than the other side writes).
"""

from __future__ import annotations

import math
import select
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import outcome
import structlog
import trio

log = structlog.get_logger("endpoint_proxy.hub")

# Events taken from the epoll per poll, and polls run back to back before the hub lets
# the rest of the process (new connections, monitors, slow paths) have a turn.
_MAX_EVENTS = 512
_ROUNDS = 4
# Back-to-back epoll waits the hub may do inside one trio dispatch (see _LoopHook), and
# the longest of them (trio's own cap is a day; the next deadline usually comes first).
_DISPATCH_ROUNDS = 64
_MAX_SLEEP_S = 3600.0


class HandBack:
    """A value a callback returns to wake its parked task: ``kind`` says what to do next."""

    __slots__ = ("kind", "data", "extra")

    def __init__(self, kind: int, data: Any = None, extra: Any = None) -> None:
        self.kind = kind
        self.data = data
        self.extra = extra


# Kinds of hand-back. READ: nothing was consumed; read the socket yourself (end of stream,
# an error, the hub stopping). WOKEN: somebody woke the task (wake_fd). The others are the
# caller's own.
READ = HandBack(0)
WOKEN = HandBack(-1)


class _Parked:
    """One parked descriptor; ``fds`` are all the descriptors its task has parked (one list,
    shared by the task's entries: ``park_more`` and ``unpark_fd`` change it while the task
    waits). The first entry of a task carries the ``hub`` and serves as the wait's abort (a
    bound method: no closure per wait)."""

    __slots__ = ("task", "callback", "fds", "hub")

    def __init__(self, task: trio.lowlevel.Task, callback: Callable[[], object], fds: list[int]) -> None:
        self.task = task
        self.callback = callback
        self.fds = fds
        self.hub: Hub | None = None

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        assert self.hub is not None
        self.hub._forget(self)
        return trio.lowlevel.Abort.SUCCEEDED


class _LoopHook:
    """Serve the hub from inside trio's run loop: the hub's epoll sits in trio's own epoll
    (level-triggered, registered once), and when trio's I/O dispatch (``process_events``)
    meets the hub's descriptor, the hub's callbacks run right there, between two task
    batches, as trio's own dispatch would wake tasks. No task switch, no re-arm, no second
    wait per wake-up: one ``epoll_wait`` by trio, one ``epoll_wait(0)`` by the hub.

    Trio has no public API for this: the dispatch method of trio's epoll I/O manager class
    is wrapped once per process (inert for a run loop without a hub). ``install`` returns
    None when this trio does not look as expected; the hub then waits for its descriptor
    through trio like any task, which costs more per message and is otherwise the same."""

    _hooks: dict[int, _LoopHook] = {}  # id(io manager) -> its hook
    _original: Callable[[Any, Any], None] | None = None

    def __init__(self, hub: Hub, runner: Any, io_manager: Any, trio_epoll: select.epoll) -> None:
        self.hub = hub
        self.io_manager = io_manager
        self.trio_epoll = trio_epoll
        self.hub_fd = hub._epoll.fileno()
        self.runner = runner
        self._failed = trio.Event()
        self._error: BaseException | None = None

    @classmethod
    def install(cls, hub: Hub) -> _LoopHook | None:
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            runner: Any = GLOBAL_RUN_CONTEXT.runner
            io_manager: Any = runner.io_manager
            trio_epoll = io_manager._epoll
            manager_class = type(io_manager)
            original = manager_class.process_events
            # what process_events reads of the run loop, so that a trio without it fails here
            runner.runq, runner.waiting_for_idle, runner.clock_autojump_threshold, io_manager._registered  # noqa: B018
            runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
        except (ImportError, AttributeError):
            return None
        if not isinstance(trio_epoll, select.epoll) or not callable(original):
            return None  # not the trio we know
        other = cls._hooks.get(id(io_manager))
        if other is not None and other.io_manager is io_manager:
            return None  # another hub has this run loop already
        if cls._original is None:
            cls._original = original

            def process_events(manager: Any, events: Any) -> None:
                hook = cls._hooks.get(id(manager))
                if hook is not None and hook.io_manager is manager:
                    hook.process_events(events)
                else:
                    original(manager, events)

            manager_class.process_events = process_events
        hook = cls(hub, runner, io_manager, trio_epoll)
        trio_epoll.register(hook.hub_fd, select.EPOLLIN)
        cls._hooks[id(io_manager)] = hook
        return hook

    def process_events(self, events: list[tuple[int, int]]) -> None:
        """Trio's dispatch of one ``epoll_wait``'s events, with the hub's served here.

        While nothing but the hub's sockets are ready and no task is runnable, this goes
        straight back to trio's ``epoll_wait`` (with trio's own timeout: the next deadline)
        instead of returning to the run loop for an empty batch. It returns as soon as
        anything else happens, so trio sees every other event, task and deadline as it
        would have (cut short only by the hub's callbacks, which do not block)."""
        original = type(self)._original
        assert original is not None
        hub_fd = self.hub_fd
        runner = self.runner
        for round_ in range(_DISPATCH_ROUNDS):
            mine = False
            for fd, _flags in events:
                if fd == hub_fd:
                    mine = True
                    break
            if not mine:
                original(self.io_manager, events)
                return
            rest = [event for event in events if event[0] != hub_fd]
            if rest:
                # Not trio's: it would re-arm it as one of its own. (The caller's list stays
                # as it was: trio reads "no events" as "the wait timed out".)
                original(self.io_manager, rest)
            if self._error is None:
                try:
                    self.hub._serve_ready()
                except Exception as e:  # a bug of ours must not take trio's loop down
                    self._error = e
                    self._failed.set()
                    return
            if rest or runner.runq or runner.waiting_for_idle or runner.clock_autojump_threshold != math.inf:
                return
            if round_ == _DISPATCH_ROUNDS - 1:
                # Never take events from trio's epoll that this call would not hand on: trio's
                # registrations are one-shot, so an event taken and dropped here would leave its
                # descriptor disarmed for good, and the task waiting on it (an accept loop, a
                # session reading its client) would never wake.
                return
            timeout = runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
            if timeout <= 0:
                return
            events = self.trio_epoll.poll(min(timeout, _MAX_SLEEP_S), len(self.io_manager._registered) + 1)
            if not events:
                return

    async def failed(self) -> BaseException:
        await self._failed.wait()
        assert self._error is not None
        return self._error

    def uninstall(self) -> None:
        hooks = type(self)._hooks
        if hooks.get(id(self.io_manager)) is self:
            del hooks[id(self.io_manager)]
        try:
            self.trio_epoll.unregister(self.hub_fd)
        except (OSError, ValueError):
            pass


# The buffer callbacks read into: one per process, since callbacks never overlap (a session
# that must keep bytes copies them). An idle session holds no buffer at all.
RECV_SIZE = 64 * 1024


_Trap: Any
try:  # the trap trio's wait_task_rescheduled yields to its run loop (see _Park)
    from trio._core._traps import WaitTaskRescheduled as _Trap
except ImportError:  # pragma: no cover - a trio without it: the public function instead
    _Trap = None


class _Park:
    """The wait of a parked task: what ``trio.lowlevel.wait_task_rescheduled`` does (yield its
    trap to trio's run loop, then unwrap the outcome the task is rescheduled with), as one small
    object instead of two coroutine frames and their objects, which every idle session would
    keep for as long as it stays idle."""

    __slots__ = ("_trap",)

    def __init__(self, trap: Any) -> None:
        self._trap = trap

    def __await__(self) -> _Park:
        return self

    def __iter__(self) -> _Park:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        trap = self._trap
        if trap is not None:
            self._trap = None
            return trap  # to trio's run loop: the task sleeps until rescheduled
        raise StopIteration(value.unwrap())  # the outcome it was rescheduled with (Cancelled raises)

    def throw(self, error: Any, value: Any = None, tb: Any = None) -> Any:
        raise error if value is None else value

    def close(self) -> None:
        self._trap = None


async def _read_now() -> object:
    await trio.lowlevel.checkpoint()
    return READ


class Hub:
    def __init__(self, *, hooked: bool = True) -> None:
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        # hooked: serve from inside trio's I/O dispatch when this trio allows it (_LoopHook)
        self.hooked = hooked
        self.in_dispatch = False  # served from inside trio's I/O dispatch now
        self._epoll = select.epoll()
        self._parked: dict[int, _Parked] = {}
        # Descriptors left registered in the epoll with nobody parked on them (unpark_fd with
        # ``keep``: a pooled connection between two borrowers), with their sockets: parking one
        # again costs no system call while its socket is the one still open under that number.
        # An event on one unregisters it (a server closing an idle connection; a task reading it).
        self._kept: dict[int, Any] = {}
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
        hook = _LoopHook.install(self) if self.hooked else None
        self.in_dispatch = hook is not None
        self.running = True
        task_status.started()
        try:
            if hook is not None:
                # Served from inside trio's own I/O dispatch (see _LoopHook); this task only
                # keeps the hub's lifetime, and takes over should the hook ever fail.
                error = await hook.failed()
                hook.uninstall()
                hook = None
                self.in_dispatch = False
                log.error("relay_hub_hook_failed", error=repr(error))
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                self._serve_ready()
        finally:
            if hook is not None:
                hook.uninstall()
            self.running = False
            for fd, entry in list(parked.items()):
                self._wake(fd, entry, outcome.Value(READ))  # a task's other descriptors go with it
            epoll.close()

    def _serve_ready(self) -> None:
        """Run the callbacks of the parked sockets that are readable now."""
        epoll = self._epoll
        for _ in range(_ROUNDS):
            events = epoll.poll(0, _MAX_EVENTS)
            if not events:
                break
            self._serve(events)
            if len(events) < _MAX_EVENTS:
                break

    def _serve(self, events: list[tuple[int, int]]) -> None:
        parked = self._parked
        self.events += len(events)
        kept = self._kept
        if kept:
            # Kept descriptors that are active (a server closing an idle connection) stop being
            # kept before any callback of this batch runs: a session that borrows one in this
            # batch must not take it for silent (``is_kept``).
            for fd, _mask in events:
                if fd in kept:
                    del kept[fd]
                    self._unregister(fd)
        for fd, _mask in events:
            entry = parked.get(fd)
            if entry is None:
                continue  # handed back or cancelled earlier in this batch, or kept (above)
            try:
                result = entry.callback()
            except Exception as e:  # the session's own failure, raised in its task
                self._wake(fd, entry, outcome.Error(e))
                continue
            if result is not None:
                self._wake(fd, entry, outcome.Value(result))

    def _wake(self, fd: int, entry: _Parked, result: outcome.Outcome[object]) -> None:
        if self._parked.get(fd) is not entry:
            # The callback let its own descriptor go (unpark_fd: its connection went back to a
            # pool): the task is woken through another of its descriptors. None left: its own
            # work cancelled the task (a drain), which forgot it.
            for other in entry.fds:
                live = self._parked.get(other)
                if live is not None and live.task is entry.task:
                    entry = live
                    break
            else:
                return
        self._forget(entry)
        self.handbacks += 1
        trio.lowlevel.reschedule(entry.task, result)

    def _forget(self, entry: _Parked) -> None:
        """Unpark every descriptor of the entry's task."""
        for fd in tuple(entry.fds):
            if self._parked.get(fd) is not None and self._parked[fd].task is entry.task:
                del self._parked[fd]
                self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass

    def _register(self, fd: int, sock: Any = None) -> None:
        """Watch ``fd`` (readable); no system call when it was kept registered for ``sock``."""
        kept = self._kept.pop(fd, None)
        if kept is not None and kept is sock and kept.fileno() == fd:
            return  # the same socket, still open: its registration is still there
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # still registered though nobody is parked on it: take it over
            self._epoll.modify(fd, select.EPOLLIN)

    async def wait(self, fd: int, callback: Callable[[], object]) -> object:
        """Park the calling task until ``callback`` (run by the hub each time ``fd`` is
        readable) returns something other than None; return that. The caller must not read
        ``fd`` while parked, nor close it (cancel the task first)."""
        return await self.wait_any(((fd, callback),))

    def wait_any(self, parks: Sequence[tuple[int, Callable[[], object]]]) -> Awaitable[object]:
        """Park the calling task on several descriptors at once, each with its callback; the
        first callback to return something other than None wakes the task with that value, and
        every descriptor is unparked. Returns READ at once when the hub is not running.

        Not a coroutine function: it parks when called and returns the wait itself, to be
        awaited at once (an idle session's stack is one frame shorter)."""
        if not self.running or not parks:
            return _read_now()
        fds = [fd for fd, _ in parks]
        for fd in fds:
            if fd in self._parked:
                raise RuntimeError(f"descriptor {fd} is already parked in the relay hub")
        task = trio.lowlevel.current_task()
        first: _Parked | None = None
        for fd, callback in parks:
            self._register(fd)
            entry = _Parked(task, callback, fds)
            self._parked[fd] = entry
            first = first or entry
        assert first is not None
        first.hub = self
        if _Trap is None:
            return trio.lowlevel.wait_task_rescheduled(first.abort)
        return _Park(_Trap(first.abort))

    def is_parked(self, fd: int) -> bool:
        return fd in self._parked

    def is_kept(self, fd: int, sock: Any) -> bool:
        """Whether ``sock`` has stayed registered here with nothing parked on it since it was let
        go (``unpark_fd`` with ``keep``) and no event on it as of the last batch served: a pooled
        connection that has been silent since its last borrower (so nothing to peek at)."""
        kept = self._kept.get(fd)
        return kept is not None and kept is sock and kept.fileno() == fd

    def unpark_fd(self, fd: int, keep: Any = None) -> None:
        """Stop watching one descriptor of a parked task, from one of its callbacks (its server
        connection went back to a pool); the task stays parked on its other descriptors.
        ``keep``: the descriptor's socket, left registered for the next ``park_more`` with it
        (two system calls fewer per borrow); an event on it meanwhile unregisters it."""
        entry = self._parked.pop(fd, None)
        if entry is None:
            return
        if fd in entry.fds:
            entry.fds.remove(fd)
        if keep is not None and keep.fileno() == fd:
            self._kept[fd] = keep
        else:
            self._unregister(fd)

    def park_more(self, fd: int, callback: Callable[[], object], beside: int, sock: Any = None) -> bool:
        """Watch ``fd`` too, with ``callback``, for the task parked on ``beside`` (from one of its
        callbacks: it borrowed a server connection; ``sock``: its socket, see ``unpark_fd``).
        False when no task is parked on ``beside`` or ``fd`` is parked already."""
        other = self._parked.get(beside)
        if other is None or fd in self._parked:
            return False
        self._register(fd, sock)
        other.fds.append(fd)
        self._parked[fd] = _Parked(other.task, callback, other.fds)
        return True

    def wake_fd(self, fd: int) -> bool:
        """Wake the task parked on ``fd`` (with WOKEN); False when none is."""
        entry = self._parked.get(fd)
        if entry is None:
            return False
        self._wake(fd, entry, outcome.Value(WOKEN))
        return True

    def forget_fd(self, fd: int) -> None:
        """A descriptor is about to be closed: drop any registration of it (the kernel drops
        its epoll entry on close, and a later descriptor with the same number must start clean)."""
        entry = self._parked.get(fd)
        if entry is not None:
            raise RuntimeError(f"descriptor {fd} is closed while a task is parked on it")
        self._kept.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
