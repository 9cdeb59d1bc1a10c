"""Live status for every open page: one watch of ConveyorApps per cluster, fanned out.

One list+watch per cluster and server (not per browser) keeps each apiserver's load
flat however many dashboards are open, and the hubs' snapshots serve the matrix without
an API call. Each subscriber has a bounded queue; one too slow to keep up is told to
reload rather than holding the others back. A hub also says whether its cluster answers
(a watch that fails, a probe that times out) and when it last read it, so a cluster
that is down is shown as such while the others keep streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.reconcile.status import API_VERSION, KIND, NAMESPACE, AppStatus

log = logging.getLogger("conveyor.web")
VersionOf = Callable[[AppStatus], Awaitable[str]]
KEEPALIVE_SECONDS = 15.0
SUBSCRIBER_QUEUE = 1000
PROBE_SECONDS = 3.0  # how often a hub asks its apiserver whether it answers
PROBE_TIMEOUT = 2.0
BACKOFF_MAX = 5.0
# A watch ends (and is opened again) this often: a connection that silently died is
# found within it even where no probe would notice.
WATCH_SECONDS = 60
READ_ERRORS = (ApiError, UnknownKindError, httpx.HTTPError, OSError)


@dataclass(frozen=True)
class ClusterState:
    """Whether a cluster answers, and when its statuses were last read."""

    name: str
    reachable: bool
    last_read: str | None = None  # RFC 3339, UTC; None: never read
    error: str | None = None


@dataclass(frozen=True)
class StatusChange:
    name: str  # the ConveyorApp's name, `<scope>.<app>`; "" for a cluster's change
    status: AppStatus | None  # None: deleted
    version: str = ""
    cluster: ClusterState | None = None  # set when a cluster became (un)reachable
    hub: str = ""  # the name of the cluster it was read from


class Subscribers:
    """The open pages' queues; every hub of a server publishes to the same ones."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[StatusChange | None]] = set()

    def subscribe(self) -> asyncio.Queue[StatusChange | None]:
        queue: asyncio.Queue[StatusChange | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[StatusChange | None]) -> None:
        self._queues.discard(queue)

    def publish(self, change: StatusChange) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                self._queues.discard(queue)  # too slow: it gets a reload instead
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    def close(self) -> None:
        for queue in self._queues:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_key(status: AppStatus) -> tuple[Any, ...]:
    return (
        status.attempted_revision,
        status.last_applied_revision,
        status.helm_revision,
        status.last_applied_time,
        status.release,
        tuple(status.inventory),
    )


class StatusHub:
    """The ConveyorApps of one cluster, listed and watched, with its reachability."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        version_of: VersionOf,
        cluster: str = "",
        subscribers: Subscribers | None = None,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        self.kube = kube
        self.version_of = version_of
        self.cluster = cluster
        self.subscribers = subscribers or Subscribers()
        self.probe_seconds = probe_seconds
        self.statuses: dict[str, AppStatus] = {}
        self.versions: dict[str, str] = {}
        self.synced = asyncio.Event()  # listed once (or the cluster has no CRD yet)
        self.settled = asyncio.Event()  # listed once, or failed to: pages need not wait
        self.reachable = False
        self.last_read: float | None = None
        self.error: str | None = None
        self._watching = False
        self._version_keys: dict[str, tuple[Any, ...]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._probe())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def snapshot(self) -> list[AppStatus]:
        return list(self.statuses.values())

    def state(self) -> ClusterState:
        return ClusterState(
            name=self.cluster,
            reachable=self.reachable,
            last_read=_rfc3339(self.last_read) if self.last_read is not None else None,
            error=self.error,
        )

    def subscribe(self) -> asyncio.Queue[StatusChange | None]:
        return self.subscribers.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[StatusChange | None]) -> None:
        self.subscribers.unsubscribe(queue)

    def touch(self, name: str) -> None:
        """Tell the pages that what they show of `name` changed though its status did
        not (the versions of its environment were read from git)."""
        status = self.statuses.get(name)
        if status is not None:
            self._publish(StatusChange(name, status, self.versions.get(name, ""), hub=self.cluster))

    def _publish(self, change: StatusChange) -> None:
        self.subscribers.publish(change)

    def _read_ok(self) -> None:
        self.last_read = time.time()
        if not self.reachable:
            self.reachable, self.error = True, None
            log.info("cluster %s answers again", self.cluster or "(default)")
            self._publish(StatusChange("", None, cluster=self.state()))

    def _read_failed(self, error: Exception) -> None:
        self.settled.set()
        message = str(error) or type(error).__name__
        if self.reachable or self.error is None:
            self.reachable, self.error = False, message
            log.warning("cluster %s unreachable: %s", self.cluster or "(default)", message)
            self._publish(StatusChange("", None, cluster=self.state()))

    async def _version(self, status: AppStatus) -> str:
        key = _version_key(status)
        if self._version_keys.get(status.name) != key or status.name not in self.versions:
            try:
                self.versions[status.name] = await self.version_of(status)
            except READ_ERRORS as error:
                log.warning("version of %s unknown: %s", status.name, error)
                self.versions[status.name] = (status.last_applied_revision or "")[:12]
            self._version_keys[status.name] = key
        return self.versions[status.name]

    async def _update(self, obj: dict[str, Any]) -> None:
        status = AppStatus.from_object(obj)
        if not status.scope:
            return
        self.statuses[status.name] = status
        version = await self._version(status)
        self._publish(StatusChange(status.name, status, version, hub=self.cluster))

    def _remove(self, name: str) -> None:
        if self.statuses.pop(name, None) is not None:
            self.versions.pop(name, None)
            self._version_keys.pop(name, None)
            self._publish(StatusChange(name, None, hub=self.cluster))

    async def _relist(self) -> str:
        items, resource_version = await self.kube.list_with_version(
            API_VERSION, KIND, namespace=NAMESPACE
        )
        limit = asyncio.Semaphore(16)

        async def update(item: dict[str, Any]) -> None:
            async with limit:
                await self._update(item)

        await asyncio.gather(*(update(item) for item in items))
        seen = {str(i.get("metadata", {}).get("name")) for i in items}
        for name in [n for n in self.statuses if n not in seen]:
            self._remove(name)
        self.synced.set()
        self.settled.set()
        self._watching = True
        self._read_ok()
        return resource_version

    async def _probe(self) -> None:
        """An apiserver that stops answering may leave the watch hanging: ask it."""
        while True:
            await asyncio.sleep(self.probe_seconds)
            try:
                await self.kube.ping(timeout=PROBE_TIMEOUT)
            except READ_ERRORS as error:
                self._read_failed(error)
            else:
                if self._watching:
                    self._read_ok()

    async def _run(self) -> None:
        backoff = 0.5
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._relist()
                async for event in self.kube.watch(
                    API_VERSION,
                    KIND,
                    namespace=NAMESPACE,
                    resource_version=resource_version,
                    timeout_seconds=WATCH_SECONDS,
                ):
                    backoff = 0.5
                    self._read_ok()
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        resource_version = None  # expired: list again
                        break
                    resource_version = obj.get("metadata", {}).get(
                        "resourceVersion", resource_version
                    )
                    if event.get("type") == "BOOKMARK":
                        continue
                    if event.get("type") == "DELETED":
                        self._remove(str(obj.get("metadata", {}).get("name")))
                    else:
                        await self._update(obj)
            except asyncio.CancelledError:
                raise
            except READ_ERRORS as error:
                if isinstance(error, UnknownKindError) or getattr(error, "not_found", False):
                    # No ConveyorApp CRD yet: nothing reconciled so far, and it answers.
                    self.synced.set()
                    self.settled.set()
                    self._read_ok()
                    self.kube.forget_discovery()
                elif isinstance(error, ApiError) and error.status == 410:
                    resource_version = None  # expired: list again; the cluster answers
                else:
                    # Listed again once it answers: the list is a good read (a watch
                    # may stay quiet), and it catches what changed in between.
                    self._watching = False
                    resource_version = None
                    self._read_failed(error)
                log.info("status watch of %s interrupted: %s; retrying", self.cluster, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)


def sse_message(event: str, data: Any) -> str:
    lines = json.dumps(data, separators=(",", ":")).splitlines() or [""]
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


class Hub(Protocol):
    def subscribe(self) -> asyncio.Queue[StatusChange | None]: ...

    def unsubscribe(self, queue: asyncio.Queue[StatusChange | None]) -> None: ...


async def stream(
    hub: Hub, render: Callable[[StatusChange], dict[str, Any] | None]
) -> AsyncIterator[str]:
    """Server-sent events: `status` for each change (rendered by `render`; None: not
    shown), `reload` when this client fell behind, and a comment every 15 s to keep
    proxies from closing it."""
    queue = hub.subscribe()
    try:
        yield "retry: 2000\n: connected\n\n"
        while True:
            try:
                change = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            if change is None:
                yield sse_message("reload", {})
                return
            data = render(change)
            if data is not None:
                yield sse_message("status", data)
    finally:
        hub.unsubscribe(queue)
