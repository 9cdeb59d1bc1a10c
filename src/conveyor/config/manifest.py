"""The shape of a Kubernetes object that conveyor itself relies on.

Rendering reads an object's name, namespace, labels and annotations (app names, the
drift annotation, ownership), fingerprints the whole object, and masks a Secret's values
in diffs; applying sends it as JSON. Each of those assumes a shape that a YAML file need
not have, so every object is checked here once, before any of them reads it: metadata
strings and string maps, ConfigMap and Secret data as string maps, and a body that JSON
can carry. Everything else is the API server's to judge, when the object is applied.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from conveyor.config.validation import FileModel, JsonObject, ObjectName, Text


class ObjectMeta(FileModel):
    name: ObjectName
    namespace: ObjectName | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class KubeObject(FileModel):
    api_version: Text
    kind: Text
    metadata: ObjectMeta


class SecretObject(KubeObject):
    data: dict[str, str] | None = None
    string_data: dict[str, str] | None = None


class ConfigMapObject(KubeObject):
    data: dict[str, str] | None = None
    binary_data: dict[str, str] | None = None


def is_sops_encrypted(obj: dict[str, Any]) -> bool:
    """SOPS's own test for an encrypted document (Flux's too): a top-level `sops` mapping
    with a MAC. Such a document is checked once decrypted (render/sops.py), since its
    values, and perhaps its name, are ciphertext until then."""
    metadata = obj.get("sops")
    return isinstance(metadata, dict) and bool(metadata.get("mac"))


_BY_KIND: dict[str, type[KubeObject]] = {"Secret": SecretObject, "ConfigMap": ConfigMapObject}
_BODY: TypeAdapter[dict[str, Any]] = TypeAdapter(JsonObject)


def check_metadata(obj: dict[str, Any]) -> KubeObject:
    """The object's identity and metadata, typed. Raises pydantic's ValidationError."""
    return KubeObject.model_validate(obj)


def check_object(obj: dict[str, Any]) -> dict[str, Any]:
    """An object to apply: its metadata and, for a ConfigMap or Secret, its data typed;
    the whole of it as JSON (see `json_compatible`), which is what it returns. Raises
    pydantic's ValidationError."""
    kind = obj.get("kind")
    model = _BY_KIND.get(kind, KubeObject) if isinstance(kind, str) else KubeObject
    model.model_validate(obj)
    return _BODY.validate_python(obj)
