"""Live status for every open page: one watch of ConveyorApp objects, fanned out.

One list+watch per server (not per browser) keeps the apiserver's load flat however
many dashboards are open, and the hub's snapshot serves the matrix without an API call.
Each subscriber has a bounded queue; one too slow to keep up is told to reload rather
than holding the others back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.reconcile.status import API_VERSION, KIND, NAMESPACE, AppStatus

log = logging.getLogger("conveyor.web")
VersionOf = Callable[[AppStatus], Awaitable[str]]
KEEPALIVE_SECONDS = 15.0
SUBSCRIBER_QUEUE = 1000


@dataclass(frozen=True)
class StatusChange:
    name: str  # the ConveyorApp's name, `<scope>.<app>`
    status: AppStatus | None  # None: deleted
    version: str = ""


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
    def __init__(self, kube: KubeClient, *, version_of: VersionOf) -> None:
        self.kube = kube
        self.version_of = version_of
        self.statuses: dict[str, AppStatus] = {}
        self.versions: dict[str, str] = {}
        self.synced = asyncio.Event()
        self._version_keys: dict[str, tuple[Any, ...]] = {}
        self._subscribers: set[asyncio.Queue[StatusChange | None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def snapshot(self) -> list[AppStatus]:
        return list(self.statuses.values())

    def subscribe(self) -> asyncio.Queue[StatusChange | None]:
        queue: asyncio.Queue[StatusChange | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[StatusChange | None]) -> None:
        self._subscribers.discard(queue)

    def touch(self, name: str) -> None:
        """Tell the pages that what they show of `name` changed though its status did
        not (the versions of its environment were read from git)."""
        status = self.statuses.get(name)
        if status is not None:
            self._publish(StatusChange(name, status, self.versions.get(name, "")))

    def _publish(self, change: StatusChange) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)  # too slow: it gets a reload instead
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    async def _version(self, status: AppStatus) -> str:
        key = _version_key(status)
        if self._version_keys.get(status.name) != key or status.name not in self.versions:
            try:
                self.versions[status.name] = await self.version_of(status)
            except (ApiError, UnknownKindError, httpx.HTTPError, OSError) as error:
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
        self._publish(StatusChange(status.name, status, version))

    def _remove(self, name: str) -> None:
        if self.statuses.pop(name, None) is not None:
            self.versions.pop(name, None)
            self._version_keys.pop(name, None)
            self._publish(StatusChange(name, None))

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
        return resource_version

    async def _run(self) -> None:
        backoff = 0.5
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._relist()
                async for event in self.kube.watch(
                    API_VERSION, KIND, namespace=NAMESPACE, resource_version=resource_version
                ):
                    backoff = 0.5
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
            except (ApiError, UnknownKindError, httpx.HTTPError, OSError) as error:
                if isinstance(error, UnknownKindError) or getattr(error, "not_found", False):
                    self.synced.set()  # no ConveyorApp CRD yet: nothing reconciled so far
                    self.kube.forget_discovery()
                if isinstance(error, ApiError) and error.status == 410:
                    resource_version = None
                log.info("status watch interrupted: %s; retrying", error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


def sse_message(event: str, data: Any) -> str:
    lines = json.dumps(data, separators=(",", ":")).splitlines() or [""]
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


async def stream(
    hub: StatusHub, render: Callable[[StatusChange], dict[str, Any]]
) -> AsyncIterator[str]:
    """Server-sent events: `status` for each change (rendered by `render`), `reload` when
    this client fell behind, and a comment every 15 s to keep proxies from closing it."""
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
            yield sse_message("status", render(change))
    finally:
        hub.unsubscribe(queue)
