"""Taking over from Flux: the marks Flux leaves on what it manages, whether Flux still
runs to reconcile it, and moving the fields kustomize-controller owns to conveyor.

A cluster that Flux runs today moves to conveyor without reinstalling anything. Flux
marks what it manages: helm-controller's post-renderer labels every object of a release
with its HelmRelease (`helm.toolkit.fluxcd.io/name`, `.../namespace`), and
kustomize-controller labels what it applies with its Kustomization and owns the fields
as the server-side apply manager `kustomize-controller`. A Helm release shares Helm's
storage, so conveyor's upgrade is its next revision; an applied object is taken over by
giving kustomize-controller's fields to conveyor's manager (so that a field later
removed from git is removed from the object) and dropping Flux's labels, in one patch.

While Flux's controllers run and the Flux object an object names is there and not
suspended, two writers would fight over it: conveyor refuses, and says how to suspend.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from conveyor.cluster.apply import FIELD_MANAGER
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.objects import Obj, ObjectRef

FLUX_NAMESPACE = "flux-system"  # where `flux install` and `flux bootstrap` put Flux
KUSTOMIZE_MANAGER = "kustomize-controller"
HELM_CONTROLLER = "helm-controller"
STOP_FLUX = f"kubectl -n {FLUX_NAMESPACE} scale deploy --all --replicas=0"


@dataclass(frozen=True)
class _FluxKind:
    kind: str
    group: str
    versions: tuple[str, ...]  # newest first: the first the cluster serves is read
    controller: str


_KINDS = (
    _FluxKind("Kustomization", "kustomize.toolkit.fluxcd.io", ("v1", "v1beta2"), KUSTOMIZE_MANAGER),
    _FluxKind(
        "HelmRelease", "helm.toolkit.fluxcd.io", ("v2", "v2beta2", "v2beta1"), HELM_CONTROLLER
    ),
)
FLUX_LABELS = frozenset(f"{k.group}/{part}" for k in _KINDS for part in ("name", "namespace"))


@dataclass(frozen=True, order=True)
class FluxObject:
    """The Kustomization or HelmRelease that an object says Flux applied it for."""

    kind: str
    namespace: str
    name: str

    @property
    def _kind(self) -> _FluxKind:
        return next(k for k in _KINDS if k.kind == self.kind)

    @property
    def controller(self) -> str:
        return self._kind.controller

    @property
    def suspend_command(self) -> str:
        return f"flux suspend {self.kind.lower()} {self.name} -n {self.namespace}"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def flux_origin(obj: Obj | None) -> FluxObject | None:
    """The Flux object whose labels `obj` carries; None for an object Flux did not mark."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    if not isinstance(labels, dict):
        return None
    for kind in _KINDS:
        name, namespace = labels.get(f"{kind.group}/name"), labels.get(f"{kind.group}/namespace")
        if name and namespace:
            return FluxObject(kind.kind, str(namespace), str(name))
    return None


def release_origin(manifest: str) -> FluxObject | None:
    """The HelmRelease a stored release's manifest names: helm-controller's post-renderer
    labels every object of it, so the first labelled object says."""
    try:
        documents = list(yaml.safe_load_all(manifest))
    except yaml.YAMLError:
        return None  # Helm wrote it; a manifest it cannot read names no Flux object
    for document in documents:
        origin = flux_origin(document) if isinstance(document, dict) else None
        if origin is not None and origin.kind == "HelmRelease":
            return origin
    return None


def needs_takeover(live: Obj | None) -> bool:
    """Whether a live object still carries Flux's labels or kustomize-controller's fields."""
    if live is None:
        return False
    labels = (live.get("metadata") or {}).get("labels") or {}
    return bool(FLUX_LABELS & set(labels)) or bool(_flux_entries(live))


def _flux_entries(live: Obj) -> list[dict[str, Any]]:
    entries = (live.get("metadata") or {}).get("managedFields") or []
    return [
        e for e in entries if e.get("manager") == KUSTOMIZE_MANAGER and not e.get("subresource")
    ]


def taken_over_fields(live: Obj) -> list[dict[str, Any]] | None:
    """`live`'s managedFields with kustomize-controller's fields given to conveyor's own
    apply entry (created at their apiVersion if conveyor has none yet); None when
    kustomize-controller owns nothing. Server-side apply then treats those fields as
    conveyor's: one that conveyor no longer applies is removed, as Flux would prune it.
    Fields recorded at an apiVersion other than conveyor's entry are left unowned (the
    server cannot be asked to convert them here); they stay as they are."""
    moved = _flux_entries(live)
    if not moved:
        return None
    entries = [copy.deepcopy(e) for e in live["metadata"]["managedFields"] if e not in moved]
    ours = next(
        (
            e
            for e in entries
            if e.get("manager") == FIELD_MANAGER
            and e.get("operation") == "Apply"
            and not e.get("subresource")
        ),
        None,
    )
    if ours is None:
        ours = {**copy.deepcopy(moved[0]), "manager": FIELD_MANAGER, "operation": "Apply"}
        ours["fieldsV1"] = {}
        entries.append(ours)
    for entry in moved:
        if entry.get("apiVersion") == ours.get("apiVersion"):
            ours["fieldsV1"] = _union(ours.get("fieldsV1") or {}, entry.get("fieldsV1") or {})
    return entries


def _union(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two FieldsV1 sets as one: a field owned in either is owned."""
    result = dict(a)
    for key, value in b.items():
        mine = result.get(key)
        result[key] = (
            _union(mine, value) if isinstance(mine, dict) and isinstance(value, dict) else value
        )
    return result


async def take_over(kube: KubeClient, ref: ObjectRef) -> Obj | None:
    """Take a live object over from Flux in one JSON patch, guarded by its
    resourceVersion (a concurrent write fails it, to be tried again): kustomize-
    controller's fields become conveyor's, Flux's labels are removed. No delete, no
    recreate: the uid stays. None when the object is gone."""
    live = await kube.get(ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None)
    if live is None or not needs_takeover(live):
        return live
    metadata = live["metadata"]
    patch: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": metadata["resourceVersion"]}
    ]
    fields = taken_over_fields(live)
    if fields is not None:
        patch.append({"op": "replace", "path": "/metadata/managedFields", "value": fields})
    for label in sorted(FLUX_LABELS & set(metadata.get("labels") or {})):
        escaped = label.replace("~", "~0").replace("/", "~1")
        patch.append({"op": "remove", "path": f"/metadata/labels/{escaped}"})
    resource = await kube.resource(ref.api_version, ref.kind)
    return await kube.request(
        "PATCH",
        resource.path(namespace=ref.namespace or None, name=ref.name),
        json_body=patch,
        content_type="application/json-patch+json",
    )


class FluxInstallation:
    """What of Flux runs in the cluster, read once per pass and only when an app carries
    Flux's marks: its controllers' Deployments in flux-system, and the Flux objects
    named. Where RBAC lets conveyor read a Flux object, it decides; where conveyor may
    read neither (an agent confined to its namespaces), Flux is assumed to reconcile
    it, as refusing loses nothing; with Flux's CRDs gone, Flux is gone unless its
    controllers are seen running."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self._lock = asyncio.Lock()
        self._running: dict[str, bool | None] = {}  # None: RBAC does not let us see
        self._active: dict[FluxObject, bool] = {}

    async def still_reconciling(self, origins: Iterable[FluxObject]) -> list[FluxObject]:
        """The Flux objects among `origins` that Flux would still reconcile: their
        controller runs, and they exist and are not suspended (with Flux's CRDs not
        installed, the controller running decides)."""
        result = []
        for origin in sorted(set(origins)):
            async with self._lock:
                if origin.controller not in self._running:
                    self._running[origin.controller] = await self._controller_runs(
                        origin.controller
                    )
                running = self._running[origin.controller]
                if running is False:
                    continue
                if origin not in self._active:
                    self._active[origin] = await self._reconciled(origin, running=running)
            if self._active[origin]:
                result.append(origin)
        return result

    async def _controller_runs(self, name: str) -> bool | None:
        try:
            deployment = await self.kube.get(
                "apps/v1", "Deployment", name, namespace=FLUX_NAMESPACE
            )
        except ApiError as error:
            if error.forbidden:
                return None
            raise
        if deployment is None:
            return False
        wanted = (deployment.get("spec") or {}).get("replicas", 1)
        ready = (deployment.get("status") or {}).get("readyReplicas") or 0
        return bool(wanted) and ready > 0

    async def _reconciled(self, origin: FluxObject, *, running: bool | None) -> bool:
        kind = origin._kind
        for version in kind.versions:
            try:
                live = await self.kube.get(
                    f"{kind.group}/{version}", kind.kind, origin.name, namespace=origin.namespace
                )
            except UnknownKindError:
                continue  # not this version; with none served, the CRD is not installed
            except ApiError as error:
                if error.forbidden:
                    return True
                raise
            return live is not None and not (live.get("spec") or {}).get("suspend", False)
        return running is True


def refusal_message(managed: dict[FluxObject, list[str]]) -> str:
    """Why an app is left alone while Flux runs: the Flux objects, what of the app each
    still reconciles, and how to suspend them."""
    what = "; ".join(
        f"{origin} ({origin.controller} is running) for {', '.join(sorted(objects))}"
        for origin, objects in sorted(managed.items())
    )
    commands = ", ".join(origin.suspend_command for origin in sorted(managed))
    return (
        f"Flux still reconciles this app: {what}; nothing of it was changed. Suspend it "
        f"({commands}) or stop Flux ({STOP_FLUX}); the next pass takes it over"
    )
