"""Server-side apply of an app's objects, with one field manager, in a safe order.

CRDs first (and waited for until they are served), then Namespaces, then the rest,
each group concurrently. Every object is labelled with its app so that the inventory,
drift watches and `kubectl get -l` can find it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from typing import Any

from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.objects import Obj, ObjectRef, apply_order
from conveyor.cluster.ownership import ADOPT_ANNOTATION, EnvironmentIdentity, foreign_owner
from conveyor.errors import ConveyorError

log = logging.getLogger(__name__)

FIELD_MANAGER = "conveyor"
APP_LABEL = "conveyor.dev/app"
SCOPE_LABEL = "conveyor.dev/scope"


class ApplyError(ConveyorError, RuntimeError):
    """Applying some objects failed; `failures` names each one and why, in one line each
    (the server's cause); `details`, what the server said in full."""

    def __init__(self, failures: list[tuple[ObjectRef, str]], *, details: str = "") -> None:
        self.failures = failures
        self.details = details
        super().__init__("; ".join(f"{ref}: {why}" for ref, why in failures))

    @classmethod
    def of(cls, failed: list[tuple[ObjectRef, BaseException]]) -> ApplyError:
        """From each object's error. What the server said of a Secret stays out of the
        details: a refusal may quote the object, and the details are shown to people."""
        causes = [
            (ref, error.cause if isinstance(error, ApiError) else str(error))
            for ref, error in failed
        ]
        full = [
            f"{ref}: {why if ref.kind == 'Secret' else error}"
            for (ref, why), (_, error) in zip(causes, failed, strict=True)
        ]
        return cls(causes, details="\n".join(full))


def labelled(obj: Obj, *, app: str, identity: EnvironmentIdentity, scope: str) -> Obj:
    """The object as conveyor applies it: stamped with its app, its environment's scope
    and the environment's identity (owner label, readable source annotation). The adopt
    annotation is a request to conveyor, not part of the object, so it is not applied."""
    result = copy.deepcopy(obj)
    metadata = result.setdefault("metadata", {})
    labels = metadata.get("labels") or {}
    labels[APP_LABEL] = app
    labels[SCOPE_LABEL] = scope
    labels.update(identity.labels())
    metadata["labels"] = labels
    annotations = {
        k: v for k, v in (metadata.get("annotations") or {}).items() if k != ADOPT_ANNOTATION
    }
    annotations.update(identity.annotations())
    metadata["annotations"] = annotations
    return result


async def namespaced_ref(kube: KubeClient, obj: Obj) -> ObjectRef:
    """The object's identity with the namespace it will really get."""
    resource = await kube.resource(str(obj["apiVersion"]), str(obj["kind"]))
    ref = ObjectRef.of(obj)
    if resource.namespaced and not ref.namespace:
        return ObjectRef(ref.api_version, ref.kind, "default", ref.name)
    if not resource.namespaced and ref.namespace:
        return ObjectRef(ref.api_version, ref.kind, "", ref.name)
    return ref


async def apply_objects(
    kube: KubeClient, objects: list[Obj], *, force: bool = True, dry_run: bool = False
) -> list[Obj]:
    """Apply in order; returns the objects as the server stored them. Every failure is
    collected and reported together, not only the first."""
    applied: list[Obj] = []
    failures: list[tuple[ObjectRef, BaseException]] = []
    ordered = sorted(objects, key=apply_order)
    for _, group in itertools.groupby(ordered, key=apply_order):
        batch = list(group)
        results = await asyncio.gather(
            *(
                kube.apply(o, field_manager=FIELD_MANAGER, force=force, dry_run=dry_run)
                for o in batch
            ),
            return_exceptions=True,
        )
        for obj, result in zip(batch, results, strict=True):
            if isinstance(result, ApiError | UnknownKindError):
                failures.append((ObjectRef.of(obj), result))
            elif isinstance(result, BaseException):
                raise result
            else:
                applied.append(result)
        if any(o.get("kind") == "CustomResourceDefinition" for o in batch) and not dry_run:
            await _wait_crds_established(
                kube, [o for o in applied if o.get("kind") == "CustomResourceDefinition"]
            )
    if failures:
        raise ApplyError.of(failures)
    return applied


async def _wait_crds_established(
    kube: KubeClient, crds: list[Obj], *, timeout: float = 30.0
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    for crd in crds:
        name = crd["metadata"]["name"]
        while asyncio.get_running_loop().time() < deadline:
            live = await kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
            # A CRD just created may have `status.conditions: null`.
            status = (live or {}).get("status") or {}
            conditions: list[dict[str, Any]] = status.get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            await asyncio.sleep(0.2)
    kube.forget_discovery()


async def delete_objects(
    kube: KubeClient, refs: list[ObjectRef], *, identity: EnvironmentIdentity
) -> list[ObjectRef]:
    """Delete what left git: namespaced objects first, Namespaces and CRDs last. An
    object that another environment owns by now (it was adopted) is left alone."""
    deleted: list[ObjectRef] = []
    failures: list[tuple[ObjectRef, BaseException]] = []
    last = {"Namespace", "CustomResourceDefinition"}
    for wave in ([r for r in refs if r.kind not in last], [r for r in refs if r.kind in last]):
        results = await asyncio.gather(
            *(_delete_owned(kube, r, identity) for r in wave), return_exceptions=True
        )
        for ref, result in zip(wave, results, strict=True):
            if isinstance(result, UnknownKindError):
                continue  # its CRD is gone, and with it the object
            if isinstance(result, BaseException):
                failures.append((ref, result))
            elif result:
                deleted.append(ref)
    if failures:
        raise ApplyError.of(failures)
    return deleted


async def _delete_owned(kube: KubeClient, ref: ObjectRef, identity: EnvironmentIdentity) -> bool:
    live = await kube.get(ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None)
    if live is None:
        return False
    owner = foreign_owner(live, identity)
    if owner is not None:
        log.warning("not deleting %s: it belongs to %s now", ref, owner.describe())
        return False
    return await kube.delete(
        ref.api_version,
        ref.kind,
        ref.name,
        namespace=ref.namespace or None,
        uid=(live.get("metadata") or {}).get("uid"),
    )
