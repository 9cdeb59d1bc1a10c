"""A watched, in-memory view of the live objects conveyor manages.

Health checks and drift detection read this cache instead of the API, so a no-op
resync of a thousand apps makes no request at all, and a `kubectl edit` of a managed
field is seen the moment it happens. Each kind is listed once, then watched; a watch
that breaks (apiserver restart, 410 Gone) is resumed or relisted with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.objects import Obj, ObjectRef

log = logging.getLogger(__name__)
ChangeHandler = Callable[[ObjectRef, Obj | None], None]


class LiveCache:
    def __init__(self, kube: KubeClient, *, on_change: ChangeHandler | None = None) -> None:
        self.kube = kube
        self.on_change = on_change
        self._objects: dict[tuple[str, str, str, str], Obj] = {}
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._ready: dict[tuple[str, str], asyncio.Event] = {}

    def get(self, ref: ObjectRef) -> Obj | None:
        return self._objects.get(ref.key())

    def watched(self, api_version: str, kind: str) -> bool:
        return (api_version, kind) in self._watches

    async def ensure(self, api_version: str, kind: str) -> None:
        """Start watching a kind (once) and wait until its first list is in the cache."""
        key = (api_version, kind)
        if key not in self._watches:
            self._ready[key] = asyncio.Event()
            self._watches[key] = asyncio.create_task(self._run(api_version, kind))
        await self._ready[key].wait()

    def seed(self, written: list[Obj]) -> None:
        """Objects as a write returned them, so that a health check right after the write
        never judges the copy from before it (its watch event may still be on the way)."""
        for obj in written:
            if self.watched(str(obj.get("apiVersion")), str(obj.get("kind"))):
                self._store(ObjectRef.of(obj), obj, notify=False)

    async def refresh(self, ref: ObjectRef) -> Obj | None:
        """Read one object now (after a write), updating the cache."""
        live = await self.kube.get(
            ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None
        )
        self._store(ref, live, notify=False)
        return live

    async def close(self) -> None:
        for task in self._watches.values():
            task.cancel()
        for task in self._watches.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watches.clear()

    def _store(self, ref: ObjectRef, obj: Obj | None, *, notify: bool) -> None:
        old = self._objects.get(ref.key())
        if obj is None:
            self._objects.pop(ref.key(), None)
        else:
            if old is not None and not _newer(obj, old):
                return
            self._objects[ref.key()] = obj
        if notify and self.on_change is not None:
            self.on_change(ref, obj)

    async def _run(self, api_version: str, kind: str) -> None:
        key = (api_version, kind)
        backoff = 0.5
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    items, resource_version = await self.kube.list_with_version(api_version, kind)
                    seen = set()
                    for item in items:
                        item.setdefault("apiVersion", api_version)
                        ref = ObjectRef.of(item)
                        seen.add(ref.key())
                        self._store(ref, item, notify=self._ready[key].is_set())
                    group = ObjectRef(api_version, kind, "", "").group
                    stale = [
                        k for k in self._objects if k[0] == group and k[1] == kind and k not in seen
                    ]
                    for gone in stale:  # deleted while we were not watching
                        self._store(ObjectRef.of(self._objects[gone]), None, notify=True)
                    self._ready[key].set()
                async for event in self.kube.watch(
                    api_version, kind, resource_version=resource_version
                ):
                    backoff = 0.5
                    obj = event.get("object", {})
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:  # too old: list again
                            resource_version = None
                        break
                    resource_version = obj.get("metadata", {}).get(
                        "resourceVersion", resource_version
                    )
                    if event.get("type") == "BOOKMARK":
                        continue
                    obj.setdefault("apiVersion", api_version)
                    obj.setdefault("kind", kind)
                    self._store(
                        ObjectRef.of(obj), None if event["type"] == "DELETED" else obj, notify=True
                    )
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, ApiError, OSError) as error:
                if isinstance(error, ApiError) and error.status == 410:
                    resource_version = None
                log.warning("watch of %s %s interrupted: %s; retrying", api_version, kind, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


def _newer(obj: Obj, old: Obj) -> bool:
    """Whether `obj` is a later version than `old`. etcd's resource versions only grow;
    when they are not numbers (another storage), any different version counts as newer."""
    new_version = str(obj.get("metadata", {}).get("resourceVersion", ""))
    old_version = str(old.get("metadata", {}).get("resourceVersion", ""))
    if new_version.isdigit() and old_version.isdigit():
        return int(new_version) > int(old_version)
    return new_version != old_version
