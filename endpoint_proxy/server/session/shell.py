"""The trio shell of a session: moves bytes between the client and the active backend and runs
what the session core asks. Shared by PostgreSQL and MySQL.

Two ways to wait for bytes:
- the relay hub (raw sockets both ways, the usual case): the session's task parks both sockets
  in the hub with callbacks that read into the hub's one buffer, feed the core, and forward
  what it says to forward right there; the task wakes only when the core needs attention or a
  send could not finish. An idle session holds no buffer.
- reader tasks (TLS, or transports that are not raw sockets, as in the simulator tests): one
  task per side reads chunks and hands them to the session's task over a channel.

Rules of this file: it decides nothing. What a byte means and where it goes is the core's;
the protocol session subclasses run the actions that need I/O (attach, detach, verdicts).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ...relay.hub import READ, Hub
from ...relay.net import Conn, RawConn
from ...sessioncore.actions import ATTEND, FORWARD, Close, ToClient, ToServer

Buffer = bytes | bytearray | memoryview
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)
RECV_SIZE = 64 * 1024
_CLIENT, _SERVER = 0, 1
_WOKE = object()  # what a hub callback returns to wake the session's task


class Core(Protocol):
    """What the shell needs of a session core (sessioncore.pg / sessioncore.mysql)."""

    def client_data(self, data: Buffer) -> int: ...

    def client_eof(self) -> None: ...

    def server_data(self, data: Buffer) -> int: ...

    def server_eof(self) -> None: ...

    def next_action(self) -> object | None: ...

    @property
    def wants_client(self) -> bool: ...

    def drain(self) -> bool: ...


class SessionShell:
    """Subclasses set ``client`` and ``core``, implement ``backend_conn`` and ``handle``."""

    __slots__ = ("client", "core", "hub", "closed", "_pending", "_stash", "_wake", "_nursery", "_inbox",
                 "_inbox_send", "_client_reader", "_server_reader", "_client_wanted", "__weakref__")

    client: Conn
    core: Core
    ctx: Any  # the session's SessionContext (set by the subclass)

    def __init__(self, hub: Hub | None) -> None:
        self.hub = hub
        self.closed = False
        self._pending: tuple[int, bytes] | None = None  # a direct send the hub callback could not finish
        self._stash: object | None = None  # an action a hub callback took and left to the task
        self._wake: trio.CancelScope | None = None  # cancels the wait for input (drain, shutdown)
        # Reader tasks (see the module docstring).
        self._nursery: trio.Nursery | None = None
        self._inbox: trio.MemoryReceiveChannel[tuple[int, Conn, bytes]] | None = None
        self._inbox_send: trio.MemorySendChannel[tuple[int, Conn, bytes]] | None = None
        self._client_reader = False
        self._server_reader: tuple[Conn, trio.CancelScope] | None = None
        self._client_wanted: trio.Event | None = None  # reader tasks only (made when they start)

    # --- for subclasses ---------------------------------------------------------------------

    def backend_conn(self) -> Conn | None:
        raise NotImplementedError

    async def handle(self, action: object) -> None:
        """Run an action other than a send or Close."""
        raise NotImplementedError

    def quick(self, action: object) -> bool:
        """Run an action right away from inside a hub callback if it needs no waiting (a server
        connection given back to its pool, an idle one borrowed); False leaves it to ``handle``."""
        return False

    def wake(self) -> None:
        """Make the session's task look at its core now (it has new actions)."""
        if self._wake is not None:
            self._wake.cancel()
        elif self.hub is not None and isinstance(self.client, RawConn):
            self.hub.wake_fd(self.client.sock.fileno())  # parked in the hub: wake it from there

    # --- the session's task ---------------------------------------------------------------

    async def start(self) -> bool:
        """The login, up to the steady state; False when the session ends there."""
        raise NotImplementedError

    async def failed(self, error: Exception) -> bool:
        """An exception ended the session: answer the client as the protocol says; False when
        it is not one the protocol knows (a bug)."""
        raise NotImplementedError

    async def finish(self) -> None:
        """The session's last step (shielded by the subclass), whatever ended it."""
        raise NotImplementedError

    async def run(self) -> None:
        """The session's task, from login to its end: the relay loop is inlined here, as is the
        hub's wait (an idle session's task is a stack of frames, each of them memory for as long
        as it stays idle: here, one). The proxy's bookkeeping runs from ``ctx.session_ended``."""
        crash: Exception | None = None
        try:
            try:
                if not await self.start():
                    return
                hub = self.hub
                if hub is not None and isinstance(self.client, RawConn):
                    # Parked in the hub.
                    client_fd = self.client.sock.fileno()
                    while True:
                        await self.run_actions()
                        if self.closed:
                            return
                        conn = self.backend_conn()
                        if conn is not None and not isinstance(conn, RawConn):
                            break  # a TLS or faulted backend: reader tasks from now on
                        parks: list[tuple[int, Callable[[], object]]] = []
                        if self.core.wants_client:
                            parks.append((client_fd, self._on_client))
                        if conn is not None:
                            parks.append((conn.sock.fileno(), self._on_server))
                        if not parks:
                            self._wake = trio.CancelScope()
                            with self._wake:
                                await trio.sleep_forever()  # nothing to read until the session is woken
                            self._wake = None
                            continue
                        waiting = hub.wait_any(parks)
                        del parks  # the hub keeps what it needs: this frame stays small while idle
                        if await waiting is READ and not hub.running:
                            break
                await self._relay_streams()
            except Exception as e:
                if not await self.failed(e):
                    raise
            finally:
                await self.finish()
        except Exception as e:  # a bug: the proxy logs it (ctx.session_ended); nothing else is disturbed
            crash = e
        finally:
            self.ctx.session_ended(self, crash)

    async def _relay_streams(self) -> None:
        """Relay with reader tasks (TLS, or transports that are not raw sockets) until the end."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._inbox_send, self._inbox = trio.open_memory_channel(0)
            try:
                await self._loop(self._wait_streams)
            finally:
                nursery.cancel_scope.cancel()

    async def _loop(self, wait: Callable[[], Awaitable[bool]]) -> bool:
        """Actions, then input, until closed (True) or ``wait`` cannot serve any more (False)."""
        while True:
            await self.run_actions()
            if self.closed:
                return True
            self._wake = trio.CancelScope()
            try:
                with self._wake:
                    usable = await wait()
            finally:
                self._wake = None
            if not usable:
                return False

    async def run_actions(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await self._send(pending[0], pending[1])
        core = self.core
        while not self.closed:
            action, self._stash = self._stash, None
            if action is None:
                action = core.next_action()
            if action is None:
                return
            if isinstance(action, ToClient):
                await self._send(_CLIENT, action.data)
            elif isinstance(action, ToServer):
                await self._send(_SERVER, action.data)
            elif isinstance(action, Close):
                self.closed = True
            else:
                # The action may talk to the backend itself: its reader task stops reading (the
                # backend is idle at any point that asks for an action; the next wait restarts it).
                self._stop_server_reader()
                await self.handle(action)

    async def _send(self, side: int, data: Buffer) -> None:
        if side == _CLIENT:
            try:
                await self.client.send_all(data)
            except NETWORK_ERRORS:
                self.closed = True  # the client is gone
            return
        conn = self.backend_conn()
        if conn is None:
            return  # the core never forwards without a backend; nothing to send it to
        try:
            await conn.send_all(data)
        except NETWORK_ERRORS:
            self.core.server_eof()

    # --- waiting in the hub -------------------------------------------------------------------

    def _on_client(self) -> object:
        """Run by the hub when the client's socket is readable."""
        hub = self.hub
        assert hub is not None and isinstance(self.client, RawConn)
        try:
            n = self.client.sock.recv_into(hub.buffer)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            n = 0
        if n == 0:
            self.core.client_eof()
            return _WOKE
        view = hub.view[:n]
        if self.core.client_data(view) != FORWARD:
            return self._attend()
        conn = self.backend_conn()
        assert isinstance(conn, RawConn)
        return self._send_now(conn, _SERVER, view)

    def _on_server(self) -> object:
        """Run by the hub when the active backend's socket is readable."""
        hub = self.hub
        conn = self.backend_conn()
        assert hub is not None and isinstance(conn, RawConn)
        try:
            n = conn.sock.recv_into(hub.buffer)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            n = 0
        if n == 0:
            self.core.server_eof()
            return _WOKE
        view = hub.view[:n]
        verdict = self.core.server_data(view)
        if verdict == ATTEND:
            return self._attend()
        assert isinstance(self.client, RawConn)
        if verdict == FORWARD:
            return self._send_now(self.client, _CLIENT, view)
        # FORWARD_FIRST: the answer, then the actions (what the socket does not take is sent by
        # the task, before them)
        if self._send_now(self.client, _CLIENT, view) is not None:
            return _WOKE
        return self._attend()

    def _attend(self) -> object:
        """The core asked for attention inside a hub callback: do at once what needs no waiting
        (sends that the sockets take whole, ``quick`` actions), in order; wake the task for the
        rest (the first action it cannot do here is stashed for it)."""
        core = self.core
        client = self.client
        while not self.closed:
            action = core.next_action()
            if action is None:
                return None
            if type(action) is ToClient:
                assert isinstance(client, RawConn)
                if self._send_now(client, _CLIENT, action.data) is not None:
                    return _WOKE
            elif type(action) is ToServer:
                conn = self.backend_conn()
                if not isinstance(conn, RawConn):
                    self._stash = action
                    return _WOKE
                if self._send_now(conn, _SERVER, action.data) is not None:
                    return _WOKE
            elif not self.quick(action):
                self._stash = action
                return _WOKE
        return _WOKE

    def _send_now(self, conn: RawConn, side: int, view: Buffer) -> object:
        """Forward from inside a hub callback; what the socket does not take now is copied and
        sent by the session's task (which stops reading both sides meanwhile)."""
        try:
            sent = conn.sock.send(view)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            if side == _CLIENT:
                self.closed = True
            else:
                self.core.server_eof()
            return _WOKE
        if sent == len(view):
            return None
        self._pending = (side, bytes(view[sent:]))
        return _WOKE

    # --- waiting on reader tasks ---------------------------------------------------------------

    async def _wait_streams(self) -> bool:
        assert self._nursery is not None and self._inbox is not None
        if not self._client_reader:
            self._client_reader = True
            self._nursery.start_soon(self._reader, _CLIENT, self.client, trio.CancelScope())
        conn = self.backend_conn()
        current = self._server_reader
        if current is None or current[0] is not conn:
            self._stop_server_reader()
            if conn is not None:
                scope = trio.CancelScope()
                self._server_reader = (conn, scope)
                self._nursery.start_soon(self._reader, _SERVER, conn, scope)
        if self._client_wanted is None:
            self._client_wanted = trio.Event()
        if self.core.wants_client:
            self._client_wanted.set()
        elif self._client_wanted.is_set():
            self._client_wanted = trio.Event()
        side, source, data = await self._inbox.receive()
        if side == _CLIENT:
            if not data:
                self.core.client_eof()
            elif self.core.client_data(data) == FORWARD:
                await self._send(_SERVER, data)
        elif source is self.backend_conn():
            if not data:
                self.core.server_eof()
            elif self.core.server_data(data) != ATTEND:  # FORWARD, FORWARD_FIRST
                await self._send(_CLIENT, data)
        return True

    def _stop_server_reader(self) -> None:
        if self._server_reader is not None:
            self._server_reader[1].cancel()
            self._server_reader = None

    async def _reader(self, side: int, conn: Conn, scope: trio.CancelScope) -> None:
        assert self._inbox_send is not None
        with scope:
            while True:
                if side == _CLIENT and self._client_wanted is not None:
                    await self._client_wanted.wait()
                try:
                    data = await conn.recv_some(RECV_SIZE)
                except NETWORK_ERRORS:
                    data = b""
                await self._inbox_send.send((side, conn, data))
                if not data:
                    return
