"""What the watch cache says about an app's objects: their health, their drift, and the
wait for health after an apply (kstatus rules, cluster/health.py)."""

from __future__ import annotations

import asyncio
import time

from conveyor.cluster.apply import namespaced_ref
from conveyor.cluster.client import KubeClient
from conveyor.cluster.health import Health, HealthStatus, aggregate, assess
from conveyor.cluster.live import LiveCache
from conveyor.cluster.objects import Obj, ObjectRef, drift_paths
from conveyor.reconcile.actions import ActionContext, AppFailed
from conveyor.reconcile.plan import Desired
from conveyor.reconcile.status import Reason
from conveyor.render.render import RenderedApp


def health_of(live: LiveCache, desired: Desired) -> Health:
    results = []
    for ref, _ in desired:
        obj = live.get(ref)
        found = assess(obj) if obj is not None else None
        results.append(
            (str(ref), found or Health(HealthStatus.IN_PROGRESS, f"{ref} does not exist yet"))
        )
    return aggregate(results)


def drifted_objects(live: LiveCache, desired: Desired) -> list[tuple[ObjectRef, Obj, str]]:
    """The objects whose live state differs from `desired`, each with what differs."""
    found = []
    for ref, obj in desired:
        current = live.get(ref)
        if current is None:
            found.append((ref, obj, f"{ref} is missing"))
            continue
        paths = drift_paths(obj, current)
        if paths:
            found.append((ref, obj, f"{ref} {', '.join(paths[:5])}"))
    return found


def drift_of(live: LiveCache, desired: Desired) -> list[str]:
    return [what for _, _, what in drifted_objects(live, desired)]


def watched(app: RenderedApp, desired: Desired) -> Desired:
    """The objects whose health makes the app Ready: all of them, unless a Flux
    Kustomization says which (`wait: false` with its healthChecks, or none)."""
    checks = app.source.options.wait_for
    if checks is None or app.helm is not None:
        return desired
    return [
        (ref, obj)
        for ref, obj in desired
        if any(
            check.kind == ref.kind
            and check.name == ref.name
            and check.namespace in (None, ref.namespace)
            and check.api_version in (None, ref.api_version)
            for check in checks
        )
    ]


async def wait_healthy(ctx: ActionContext, app: RenderedApp, desired: Desired) -> None:
    """Until every watched object is healthy; AppFailed when one fails or time runs out."""
    own = app.source.options.timeout_seconds
    timeout = app.helm.spec.timeout_seconds if app.helm else own or ctx.timeout
    timeout = min(timeout, ctx.timeout)
    desired = watched(app, desired)
    for ref, _ in desired:
        await ctx.live.ensure(ref)
    deadline = time.monotonic() + timeout
    while True:
        health = health_of(ctx.live, desired)
        if health.status is HealthStatus.CURRENT:
            return
        if health.status is HealthStatus.FAILED:
            raise AppFailed(Reason.HEALTH_CHECK_FAILED, health.message)
        if time.monotonic() > deadline:
            raise AppFailed(
                Reason.HEALTH_CHECK_FAILED, f"not healthy within {timeout:.0f}s: {health.message}"
            )
        await asyncio.sleep(ctx.poll_interval)


async def release_objects(kube: KubeClient, objects: list[Obj], *, namespace: str) -> Desired:
    """A release's objects with their identities. Helm leaves the namespace out of its
    manifest: it is the release's namespace; set it, so that drift corrections go to the
    object Helm created."""
    result = []
    for obj in objects:
        ref = await namespaced_ref(kube, obj)
        if ref.namespace == "default" and not obj.get("metadata", {}).get("namespace"):
            ref = ObjectRef(ref.api_version, ref.kind, namespace, ref.name)
            obj = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
        result.append((ref, obj))
    return result
