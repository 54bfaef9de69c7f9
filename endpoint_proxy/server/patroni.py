"""Patroni as a cluster's HA authority: follow its store (etcd v3) or its REST API, and switch over through it.

``PatroniAuthority.run`` keeps ``view`` (topology.patroni.PatroniView) current and calls
``on_change`` whenever the leader, its revision or the members changed (and when the store
goes quiet or answers again). With etcd it reads the cluster's prefix once, then watches it
(a streamed ``POST /v3/watch``: a deleted leader key is seen within milliseconds) while a
heartbeat reads the leader key every check interval, which both proves the store alive and
repairs anything a watch could have missed. Without etcd, or while no etcd endpoint answers,
it polls Patroni's ``GET /cluster`` on the ``rest`` URLs (and tries etcd again every
ETCD_RETRY_S).

Stale: no store answered for ``stale_after_s``. The view stays as last known; the runtime keeps
the writer it has (Patroni's failsafe mode keeps the primary running through a store outage)
and never elects one on its own.

``PatroniPromotion`` is ``[clusters.promotion] method = "patroni"``: ``POST /switchover`` on
the leader's REST API (Patroni demotes, hands over the leader key and promotes the candidate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from ..config import ClusterConfig, PatroniConfig
from ..topology.patroni import (
    PatroniDataError,
    PatroniView,
    b64,
    parse_range,
    parse_rest_cluster,
    parse_watch_message,
    prefix_end,
    rest_base,
)
from .promotion import PromotionError

if TYPE_CHECKING:
    import httpx  # imported when a Patroni cluster is watched: most proxies never need it

log = structlog.get_logger("endpoint_proxy.patroni")

# A request to the store or to a REST API (the watch stream itself has no read timeout).
REQUEST_TIMEOUT_S: Final = 1.0
# While only REST answers (or nothing does), how often etcd is tried again.
ETCD_RETRY_S: Final = 2.0
# A switchover through Patroni's REST API may take this long (it waits for the new leader).
SWITCHOVER_HTTP_TIMEOUT_S: Final = 60.0


def _http_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.HTTPError, OSError, PatroniDataError, ValueError, trio.TooSlowError, *more)


class StoreLost(Exception):
    """The store (or the watch on it) stopped answering: try the next one."""


def _text(e: BaseException) -> str:
    import httpx

    if isinstance(e, trio.TooSlowError | httpx.TimeoutException):
        return "timed out"
    return str(e) or type(e).__name__


class PatroniAuthority:
    """See the module docstring. ``interval_s``: the heartbeat (and REST poll) interval."""

    def __init__(self, cluster: str, config: PatroniConfig, *, interval_s: float,
                 on_change: Callable[[], None]) -> None:
        self.cluster = cluster
        self.config = config
        self.interval_s = max(0.05, interval_s)
        self.stale_after_s = max(1.0, 4 * self.interval_s)
        self.on_change = on_change
        self.view = PatroniView(config.prefix if config.scope else "")
        self.source: str | None = None  # "etcd" or "rest": who answered last
        self.known = False  # the store has answered at least once
        self.last_answer_at: float | None = None  # trio clock
        self.last_event_at: float | None = None  # wall clock of the last leader change
        self.error: str | None = None
        self._was_stale = False

    # --- what the runtime reads --------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """The store has not answered for stale_after_s (or never has)."""
        if self.last_answer_at is None:
            return True
        return trio.current_time() - self.last_answer_at > self.stale_after_s

    @property
    def status(self) -> str:
        """``fresh``, ``stale`` (it answered once, not lately) or ``unknown`` (never answered)."""
        if not self.known:
            return "unknown"
        return "stale" if self.stale else "fresh"

    def api_urls(self, first: str | None = None) -> list[str]:
        """REST API base URLs to try: member ``first``'s own, then the configured ones, then the
        other members' (no duplicates)."""
        urls: list[str] = []
        members = self.view.members
        if first is not None and first in members and members[first].api_url:
            urls.append(rest_base(members[first].api_url or ""))
        urls += list(self.config.rest)
        urls += [rest_base(m.api_url) for m in members.values() if m.api_url]
        return list(dict.fromkeys(urls))

    # --- following the store -----------------------------------------------------------------

    def _answered(self, source: str, changed: bool) -> None:
        self.last_answer_at = trio.current_time()
        self.source = source
        self.error = None
        first = not self.known
        self.known = True
        if self._was_stale:
            self._was_stale = False
            log.info("authority_fresh", cluster=self.cluster, source=source)
            changed = True
        if changed or first:
            self.on_change()

    def _leader_changed(self, before: tuple[str | None, int | None]) -> None:
        after = (self.view.leader, self.view.revision)
        if after != before:
            self.last_event_at = time.time()
            log.info("authority_leader", cluster=self.cluster, leader=after[0], revision=after[1],
                     was=before[0], source=self.source)

    def _failed(self, source: str, e: BaseException) -> None:
        error = f"{source}: {_text(e)}"
        if error != self.error:
            log.warning("authority_unreachable", cluster=self.cluster, error=error)
        self.error = error

    async def run(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_staleness)
                while True:
                    for url in self.config.etcd:
                        try:
                            await self._follow_etcd(client, url)
                        except _http_errors(StoreLost) as e:
                            self._failed(url, e)
                        except Exception as e:  # noqa: BLE001 - a bug of ours must not end the authority
                            log.exception("authority_error", cluster=self.cluster, error=_text(e))
                            self._failed(url, e)
                            await trio.sleep(self.interval_s)
                    if self.config.rest:
                        with trio.move_on_after(ETCD_RETRY_S if self.config.etcd else math.inf):
                            await self._poll_rest(client)
                    else:
                        await trio.sleep(self.interval_s)

    async def _watch_staleness(self) -> None:
        """Tell the runtime when the store has gone quiet (it shows in /readyz and /topology)."""
        while True:
            await trio.sleep(self.interval_s)
            if self.known and self.stale and not self._was_stale:
                self._was_stale = True
                log.warning("authority_stale", cluster=self.cluster, error=self.error,
                            detail="keeping the current writer; no writer is elected until the store answers")
                self.on_change()

    async def _post(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Any:
        with trio.fail_after(REQUEST_TIMEOUT_S + 0.5):
            response = await client.post(url, json=body)
        if response.status_code != 200:
            raise StoreLost(f"{url}: HTTP {response.status_code}")
        return response.json()

    async def _follow_etcd(self, client: httpx.AsyncClient, url: str) -> None:
        prefix = self.view.prefix
        before = (self.view.leader, self.view.revision)
        answer = await self._post(client, f"{url}/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        revision, kvs = parse_range(answer)
        changed = self.view.apply_snapshot(revision, kvs)
        self._leader_changed(before)
        self._answered("etcd", changed)
        # The watch and the heartbeat run side by side; the first to fail ends both (a failure
        # never leaves the nursery as an exception group: it is kept and raised alone).
        failures: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            async def guarded(step: Callable[[], Awaitable[None]]) -> None:
                try:
                    await step()
                except _http_errors(StoreLost) as e:
                    failures.append(e)
                nursery.cancel_scope.cancel()

            nursery.start_soon(guarded, lambda: self._heartbeat(client, url))
            nursery.start_soon(guarded, lambda: self._watch(client, url, revision + 1))
        raise StoreLost(_text(failures[0]) if failures else "the watch ended")

    async def _heartbeat(self, client: httpx.AsyncClient, url: str) -> None:
        """Read the leader key every interval: the store is alive, and nothing was missed."""
        key = self.view.prefix + "leader"
        while True:
            await trio.sleep(self.interval_s)
            before = (self.view.leader, self.view.revision)
            answer = await self._post(client, f"{url}/v3/kv/range", {"key": b64(key)})
            revision, kvs = parse_range(answer)
            changed = self.view.apply_leader(revision, kvs[0] if kvs else None)
            self._leader_changed(before)
            self._answered("etcd", changed)

    async def _watch(self, client: httpx.AsyncClient, url: str, start_revision: int) -> None:
        prefix = self.view.prefix
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        import httpx

        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=None)
        async with client.stream("POST", f"{url}/v3/watch", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                raise StoreLost(f"{url}: watch: HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = parse_watch_message(line)
                if message.canceled is not None:
                    raise StoreLost(f"{url}: watch ended: {message.canceled}")
                before = (self.view.leader, self.view.revision)
                changed = self.view.apply_events(message)
                self._leader_changed(before)
                self._answered("etcd", changed)
        raise StoreLost(f"{url}: the watch stream ended")

    async def _poll_rest(self, client: httpx.AsyncClient) -> None:
        while True:
            for url in self.config.rest:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT_S + 0.5):
                        response = await client.get(f"{url}/cluster")
                    if response.status_code != 200:
                        raise StoreLost(f"HTTP {response.status_code}")
                    leader, members = parse_rest_cluster(response.json())
                except _http_errors(StoreLost) as e:
                    self._failed(url, e)
                    continue
                before = (self.view.leader, self.view.revision)
                changed = self.view.apply_rest(leader, members)
                self._leader_changed(before)
                self._answered("rest", changed)
                break
            await trio.sleep(self.interval_s)

    def to_json(self) -> dict[str, Any]:
        """``authority`` in /topology."""
        return {
            "source": self.source or ("etcd" if self.config.etcd else "rest"),
            "status": self.status,
            "leader": self.view.leader,
            "revision": self.view.revision,
            "last_event_ms": None if self.last_event_at is None else round((time.time() - self.last_event_at) * 1000),
            "error": self.error,
        }


class PatroniPromotion:
    """A planned switchover done by Patroni: ``POST /switchover`` {leader, candidate}. Patroni
    checks the candidate, demotes the old leader, hands over the key; the proxy holds writes
    meanwhile and releases them once its own probe sees the new leader writable."""

    def __init__(self, config: ClusterConfig, old: str, new: str, api_urls: list[str]) -> None:
        self.config = config
        self.old = old
        self.new = new
        self.api_urls = api_urls
        self.notes: list[str] = []

    async def prepare(self, deadline: float) -> None:
        if not self.api_urls:
            raise PromotionError("no Patroni REST API is known (members' api_url, or [clusters.patroni] rest)")

    async def promote(self, deadline: float) -> None:
        body = {"leader": self.old, "candidate": self.new}
        errors = []
        timeout = max(1.0, deadline - trio.current_time())
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=timeout)) as client:
            for url in self.api_urls:
                try:
                    with trio.fail_after(timeout + 1):
                        response = await client.post(f"{url}/switchover", json=body)
                except _http_errors() as e:
                    errors.append(f"{url}: {_text(e)}")
                    continue
                text = response.text.strip()
                if response.status_code == 200:
                    return
                # Patroni answered and refused (or failed): another member would say the same.
                raise PromotionError(f"Patroni refused the switchover ({response.status_code}): {text}")
        raise PromotionError("no Patroni REST API answered: " + "; ".join(errors))

    async def rollback(self) -> None:
        return None

    async def follow(self, deadline: float) -> None:
        return None  # Patroni restarts the old leader as a replica itself

    async def aclose(self) -> None:
        return None
