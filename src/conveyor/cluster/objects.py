"""Object identity, apply order and drift comparison: pure functions over manifests."""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

Obj = dict[str, Any]

# Cluster-scoped definitions first, then namespaces, then everything that lives in them.
_ORDER = {
    "CustomResourceDefinition": 0,
    "Namespace": 1,
    "ServiceAccount": 2,
    "Secret": 2,
    "ConfigMap": 2,
    "ClusterRole": 2,
    "ClusterRoleBinding": 3,
    "Role": 2,
    "RoleBinding": 3,
}
# Kubernetes' own cluster-scoped kinds by (group, kind), for objects placed without a
# cluster to ask (a chart rendered offline). With a cluster, discovery decides.
_CLUSTER_SCOPED = {
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ("apiregistration.k8s.io", "APIService"),
    ("admissionregistration.k8s.io", "MutatingWebhookConfiguration"),
    ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration"),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicyBinding"),
    ("certificates.k8s.io", "CertificateSigningRequest"),
    ("flowcontrol.apiserver.k8s.io", "FlowSchema"),
    ("flowcontrol.apiserver.k8s.io", "PriorityLevelConfiguration"),
    ("networking.k8s.io", "IngressClass"),
    ("node.k8s.io", "RuntimeClass"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("storage.k8s.io", "CSIDriver"),
    ("storage.k8s.io", "CSINode"),
    ("storage.k8s.io", "StorageClass"),
    ("storage.k8s.io", "VolumeAttachment"),
}
_UNCOMPARED_METADATA = {
    "namespace",
    "name",
    "creationTimestamp",
    "resourceVersion",
    "uid",
    "generation",
    "managedFields",
    "selfLink",
}


@dataclass(frozen=True, order=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0] if "/" in self.api_version else ""

    def key(self) -> tuple[str, str, str, str]:
        """Identity across API versions of the same group (apps/v1 == apps/v1beta2)."""
        return (self.group, self.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, str]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, str]) -> ObjectRef:
        return cls(raw["apiVersion"], raw["kind"], raw.get("namespace", ""), raw["name"])

    @classmethod
    def of(cls, obj: Obj) -> ObjectRef:
        meta = obj.get("metadata", {})
        return cls(
            str(obj["apiVersion"]),
            str(obj["kind"]),
            str(meta.get("namespace") or ""),
            str(meta["name"]),
        )

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


def builtin_cluster_scoped(obj: Obj) -> bool:
    """Whether the object is of one of Kubernetes' own cluster-scoped kinds."""
    api_version = str(obj.get("apiVersion", ""))
    group = api_version.split("/")[0] if "/" in api_version else ""
    return (group, str(obj.get("kind", ""))) in _CLUSTER_SCOPED


def apply_order(obj: Obj) -> int:
    return _ORDER.get(str(obj.get("kind")), 5)


def drift_paths(desired: Obj, live: Obj) -> list[str]:
    """Fields of `desired` that `live` no longer holds, for one object."""
    return differences(_as_stored(desired), live)


def _as_stored(obj: Obj) -> Obj:
    """A Secret's write-only `stringData` is stored base64-encoded in `data`."""
    if obj.get("kind") != "Secret" or not obj.get("stringData"):
        return obj
    stored = {k: v for k, v in obj.items() if k != "stringData"}
    data = dict(obj.get("data") or {})
    for key, value in obj["stringData"].items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    stored["data"] = data
    return stored


def differences(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths where `live` does not hold what `desired` says (desired ⊆ live).

    Fields the server adds (defaults, status) are not drift; a changed or removed field
    that we set is. Empty maps and lists in desired match absent fields.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [] if not desired and live is None else [path or "."]
        found: list[str] = []
        for key, value in desired.items():
            if path == "" and key == "status":
                continue
            if path == ".metadata" and key in _UNCOMPARED_METADATA:
                continue
            if value is None:
                continue
            found += differences(value, live.get(key), f"{path}.{key}")
        return found
    if isinstance(desired, list):
        if not isinstance(live, list):
            return [] if not desired and live is None else [path]
        if len(desired) != len(live):
            return [path]
        found = []
        for index, (d, item) in enumerate(zip(desired, live, strict=True)):
            found += differences(d, item, f"{path}[{index}]")
        return found
    if desired == live:
        return []
    # The API server normalises some scalars: 1 and "1", 1.0 and 1, True and "true".
    if str(desired).lower() == str(live).lower():
        return []
    return [path]


_INTERNED_LENGTH = 24  # names, reasons, enum values, timestamps; not uids or images
T = TypeVar("T")


def interned(value: T) -> T:
    """`value` (parsed JSON or YAML) with its keys and short strings interned: each
    parse makes its own copy of every "metadata" and "ClusterFirst", and the agent keeps
    the objects of 10,000 apps, from git and from the cluster."""
    if isinstance(value, dict):
        return {  # type: ignore[return-value]
            sys.intern(k) if isinstance(k, str) else k: interned(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [interned(v) for v in value]  # type: ignore[return-value]
    if isinstance(value, str) and len(value) <= _INTERNED_LENGTH:
        return sys.intern(value)  # type: ignore[return-value]
    return value
