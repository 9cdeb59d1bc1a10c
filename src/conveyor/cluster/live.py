"""A watched, in-memory view of the live objects conveyor manages.

Health checks and drift detection read this cache instead of the API, so a no-op
resync of a thousand apps makes no request at all, and a `kubectl edit` of a managed
field is seen the moment it happens. Each kind is listed once, then watched; a watch
that breaks (apiserver restart, 410 Gone) is resumed or relisted with backoff.

An agent confined to some namespaces (the chart's namespaced mode: its RBAC reaches
only those) watches each kind once per namespace instead of cluster-wide, which its
token may not do; an object outside them is refused here with its namespace named,
before the apiserver would refuse its list with a bare 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.objects import Obj, ObjectRef, interned
from conveyor.errors import ConveyorError

log = logging.getLogger(__name__)
ChangeHandler = Callable[[ObjectRef, Obj | None], None]
# What one watch covers: apiVersion, kind, and its namespace ("" for cluster-wide).
WatchKey = tuple[str, str, str]


class OutsideNamespacesError(ConveyorError):
    """An object outside the namespaces an agent is confined to (or cluster-scoped)."""

    def __init__(self, ref: ObjectRef, namespaces: frozenset[str]) -> None:
        where = f"namespace {ref.namespace!r}" if ref.namespace else "cluster-scoped"
        super().__init__(
            f"{ref.kind} {ref.name}: {where}, outside the namespaces this agent may use "
            f"({', '.join(sorted(namespaces))})"
        )


class LiveCache:
    def __init__(
        self,
        kube: KubeClient,
        *,
        on_change: ChangeHandler | None = None,
        namespaces: frozenset[str] | None = None,
    ) -> None:
        self.kube = kube
        self.on_change = on_change
        self.namespaces = namespaces  # None: watch cluster-wide
        self._objects: dict[tuple[str, str, str, str], Obj] = {}
        self._watches: dict[WatchKey, asyncio.Task[None]] = {}
        self._ready: dict[WatchKey, asyncio.Event] = {}

    def get(self, ref: ObjectRef) -> Obj | None:
        return self._objects.get(ref.key())

    def _watch_key(self, ref: ObjectRef) -> WatchKey:
        if self.namespaces is None:
            return (ref.api_version, ref.kind, "")
        if ref.namespace not in self.namespaces:
            raise OutsideNamespacesError(ref, self.namespaces)
        return (ref.api_version, ref.kind, ref.namespace)

    def watched(self, ref: ObjectRef) -> bool:
        """Whether the watch that covers `ref` runs."""
        try:
            return self._watch_key(ref) in self._watches
        except OutsideNamespacesError:
            return False

    async def ensure(self, ref: ObjectRef) -> None:
        """Start watching `ref`'s kind (once; in its namespace, for a confined agent) and
        wait until its first list is in the cache."""
        key = self._watch_key(ref)
        if key not in self._watches:
            self._ready[key] = asyncio.Event()
            self._watches[key] = asyncio.create_task(self._run(key))
        await self._ready[key].wait()

    def seed(self, written: list[Obj]) -> None:
        """Objects as a write returned them, so that a health check right after the write
        never judges the copy from before it (its watch event may still be on the way)."""
        for obj in written:
            if self.watched(ref := ObjectRef.of(obj)):
                self._store(ref, obj, notify=False)

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
            self._objects[ref.key()] = _compact(obj)
        if notify and self.on_change is not None:
            self.on_change(ref, obj)

    async def _run(self, key: WatchKey) -> None:
        api_version, kind, namespace = key
        backoff = 0.5
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    items, resource_version = await self.kube.list_with_version(
                        api_version, kind, namespace=namespace or None
                    )
                    seen = set()
                    for item in items:
                        item.setdefault("apiVersion", api_version)
                        ref = ObjectRef.of(item)
                        seen.add(ref.key())
                        self._store(ref, item, notify=self._ready[key].is_set())
                    group = ObjectRef(api_version, kind, "", "").group
                    stale = [
                        k
                        for k in self._objects
                        if k[:2] == (group, kind)
                        and (not namespace or k[2] == namespace)
                        and k not in seen
                    ]
                    for gone in stale:  # deleted while we were not watching
                        self._store(ObjectRef.of(self._objects[gone]), None, notify=True)
                    self._ready[key].set()
                async for event in self.kube.watch(
                    api_version,
                    kind,
                    namespace=namespace or None,
                    resource_version=resource_version,
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


def _compact(obj: Obj) -> Obj:
    """What the cache keeps of an object, in less than a third of the memory: 10,000
    apps' objects are 40,000, each parsed from its own watch event (9.9 KiB apiece for
    the benchmark's Deployments, Services, ServiceAccounts and Ingresses; 3.1 KiB so).

    - The field sets of its managedFields are left out: a third of a Deployment, read by
      nothing that reads the cache (the Flux takeover reads the object afresh). Each
      entry keeps its manager, operation, apiVersion and subresource.
    - Keys and short strings are interned: every copy of "metadata", "Ready" or
      "ClusterFirst" becomes one string.
    """
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("managedFields"), list):
        managers = [
            {k: v for k, v in e.items() if k != "fieldsV1"} if isinstance(e, dict) else e
            for e in metadata["managedFields"]
        ]
        obj = {**obj, "metadata": {**metadata, "managedFields": managers}}
    return interned(obj)


def _newer(obj: Obj, old: Obj) -> bool:
    """Whether `obj` is a later version than `old`. etcd's resource versions only grow;
    when they are not numbers (another storage), any different version counts as newer."""
    new_version = str(obj.get("metadata", {}).get("resourceVersion", ""))
    old_version = str(old.get("metadata", {}).get("resourceVersion", ""))
    if new_version.isdigit() and old_version.isdigit():
        return int(new_version) > int(old_version)
    return new_version != old_version
