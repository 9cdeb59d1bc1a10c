"""Per-app status kept in the cluster, as ConveyorApp objects in `conveyor-system`.

In the cluster so it survives restarts of the agent and is visible to `kubectl get
conveyorapps` as well as `conveyor get apps`. Each app records its outcome like a Flux
object: a Ready condition with reason, message and revision, plus the inventory of
what was applied (for pruning) and the fingerprint of the last apply (for no-op
resyncs). Status is written only when it changes: a no-op resync writes nothing.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from conveyor.cluster.apply import FIELD_MANAGER, apply_objects
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.objects import ObjectRef

NAMESPACE = "conveyor-system"
GROUP = "conveyor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ConveyorApp"

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
SUSPENDED = "Suspended"
WAITING_FOR_GATE = "WaitingForGate"
SOURCE_KIND = "source"  # the status of the git source itself, beside its apps


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def crd_manifest() -> dict[str, Any]:
    column = {"type": "string"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"conveyorapps.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": "conveyorapps",
                "singular": "conveyorapp",
                "kind": KIND,
                "shortNames": ["capp"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                    "additionalPrinterColumns": [
                        {**column, "name": "App", "jsonPath": ".spec.app"},
                        {**column, "name": "State", "jsonPath": ".status.state"},
                        {**column, "name": "Reason", "jsonPath": ".status.reason"},
                        {**column, "name": "Revision", "jsonPath": ".status.revision"},
                        {**column, "name": "Message", "jsonPath": ".status.message", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def resource_name(scope: str, app: str) -> str:
    """`<scope>.<app>`; the scope's own source status is named after the scope alone."""
    return f"{scope}.{app}"[:253] if app else scope[:253]


@dataclass
class AppStatus:
    scope: str
    app: str
    kind: str = "manifests"
    state: str = RECONCILING
    reason: str = "Progressing"
    message: str = ""
    revision: str = ""
    helm_revision: int | None = None
    last_applied_time: str | None = None
    last_applied_revision: str | None = None
    fingerprint: str | None = None
    failures: int = 0
    failed_fingerprint: str | None = None
    last_good_helm_revision: int | None = None
    drift: str | None = None
    release: str | None = None  # "namespace/name" of the Helm release, for helm apps
    inventory: list[ObjectRef] = field(default_factory=list)
    suspended: bool = False
    transition_time: str = field(default_factory=now)

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def name(self) -> str:
        return resource_name(self.scope, self.app)

    def status_body(self) -> dict[str, Any]:
        condition_status = (
            "True" if self.ready else ("Unknown" if self.state == RECONCILING else "False")
        )
        return {
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "revision": self.revision,
            "kind": self.kind,
            "helmRevision": self.helm_revision,
            "lastAppliedTime": self.last_applied_time,
            "lastAppliedRevision": self.last_applied_revision,
            "fingerprint": self.fingerprint,
            "failures": self.failures,
            "failedFingerprint": self.failed_fingerprint,
            "lastGoodHelmRevision": self.last_good_helm_revision,
            "drift": self.drift,
            "release": self.release,
            "inventory": [r.to_dict() for r in self.inventory],
            "conditions": [
                {
                    "type": "Ready",
                    "status": condition_status,
                    "reason": self.reason,
                    "message": self.message,
                    "observedRevision": self.revision,
                    "lastTransitionTime": self.transition_time,
                }
            ],
        }

    def to_summary(self) -> dict[str, Any]:
        """What `conveyor get apps -o json` shows."""
        return {
            "name": self.app,
            "scope": self.scope,
            "kind": self.kind,
            "ready": self.ready,
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "revision": self.revision,
            "helmRevision": self.helm_revision,
            "lastAppliedTime": self.last_applied_time,
            "drift": self.drift,
            "suspended": self.suspended,
        }

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> AppStatus:
        spec = obj.get("spec", {})
        raw = obj.get("status") or {}
        conditions = raw.get("conditions") or [{}]
        return cls(
            scope=str(spec.get("scope", "")),
            app=str(spec.get("app", "")),
            kind=raw.get("kind", "manifests"),
            state=raw.get("state", RECONCILING),
            reason=raw.get("reason", "Progressing"),
            message=raw.get("message", ""),
            revision=raw.get("revision", ""),
            helm_revision=raw.get("helmRevision"),
            last_applied_time=raw.get("lastAppliedTime"),
            last_applied_revision=raw.get("lastAppliedRevision"),
            fingerprint=raw.get("fingerprint"),
            failures=int(raw.get("failures") or 0),
            failed_fingerprint=raw.get("failedFingerprint"),
            last_good_helm_revision=raw.get("lastGoodHelmRevision"),
            drift=raw.get("drift"),
            release=raw.get("release"),
            inventory=[ObjectRef.from_dict(r) for r in raw.get("inventory") or []],
            suspended=bool(spec.get("suspend", False)),
            transition_time=conditions[0].get("lastTransitionTime") or now(),
        )


class StatusStore:
    """Reads and writes ConveyorApp objects; remembers what it last wrote."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self._written: dict[str, dict[str, Any]] = {}

    async def install(self) -> None:
        """Create the CRD and namespace if needed (idempotent, no write when present)."""
        crd = crd_manifest()
        live = await self.kube.get(
            "apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"]
        )
        if live is None or live.get("spec", {}).get("versions") != crd["spec"]["versions"]:
            await apply_objects(self.kube, [crd])
        if await self.kube.get("v1", "Namespace", NAMESPACE) is None:
            await self.kube.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
                field_manager=FIELD_MANAGER,
            )

    async def list_all(self, *, scope: str | None = None) -> list[AppStatus]:
        """Every stored status (of one scope, or of all), remembering what is stored."""
        try:
            items = await self.kube.list(API_VERSION, KIND, namespace=NAMESPACE)
        except UnknownKindError:
            return []  # no agent has run on this cluster yet
        except ApiError as error:
            if error.not_found:
                return []
            raise
        result = []
        for item in items:
            status = AppStatus.from_object(item)
            if scope is None or status.scope == scope:
                result.append(status)
                self._written[status.name] = status.status_body()
        return result

    async def load_all(self, *, scope: str) -> dict[str, AppStatus]:
        """The statuses of one scope by app name."""
        return {s.app: s for s in await self.list_all(scope=scope)}

    def stored(self, status: AppStatus) -> dict[str, Any]:
        """The status body as last read or written (empty if never)."""
        return self._written.get(status.name, {})

    async def save(self, status: AppStatus) -> bool:
        """Write the status if it differs from what is stored. Returns True if written."""
        body = status.status_body()
        previous = self._written.get(status.name)
        if previous is not None:
            if _without_time(previous) == _without_time(body):
                return False
            if previous.get("state") == body["state"]:
                # Same state: keep the original transition time, as conditions do.
                body["conditions"][0]["lastTransitionTime"] = previous["conditions"][0][
                    "lastTransitionTime"
                ]
                status.transition_time = body["conditions"][0]["lastTransitionTime"]
        if previous is None:
            await self.kube.apply(
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "metadata": {
                        "name": status.name,
                        "namespace": NAMESPACE,
                        "labels": {"conveyor.dev/scope": status.scope[:63]},
                    },
                    "spec": {"scope": status.scope, "app": status.app},
                },
                field_manager=FIELD_MANAGER,
            )
        await self.kube.apply(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": status.name, "namespace": NAMESPACE},
                "status": body,
            },
            field_manager=FIELD_MANAGER,
            force=True,
            subresource="status",
        )
        self._written[status.name] = copy.deepcopy(body)
        return True

    async def set_suspended(self, scope: str, app: str, suspended: bool) -> None:
        await self.kube.apply(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": resource_name(scope, app), "namespace": NAMESPACE},
                "spec": {"scope": scope, "app": app, "suspend": suspended},
            },
            field_manager="conveyor-cli",
            force=True,
        )

    async def delete(self, status: AppStatus) -> None:
        await self.kube.delete(API_VERSION, KIND, status.name, namespace=NAMESPACE)
        self._written.pop(status.name, None)


def _without_time(body: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(body)
    for condition in stripped.get("conditions", []):
        condition.pop("lastTransitionTime", None)
    return stripped
