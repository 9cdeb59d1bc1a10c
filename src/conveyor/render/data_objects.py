"""The ConfigMaps and Secrets that Flux takes values from, and how their data reads.

A HelmRelease's `valuesFrom` and a Kustomization's `postBuild.substituteFrom` read
ConfigMaps and Secrets: from the cluster, or from the objects conveyor is about to apply
(an app's own documents, the build a release came from). Both read them by one rule:

- an object without a namespace is the one conveyor applies into `default`, as the API
  server's clients do;
- a Secret's `stringData` wins over its `data` (the API server merges it so), and `data`
  must be base64 (line breaks aside) of UTF-8 text: the API server refuses anything
  else (and Flux reads text), so a value that
  is not would never reach Flux. Decoding it leniently would render values no cluster
  ever holds; it is an error naming the object and the key instead, never quoting it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from conveyor.cluster.objects import Obj
from conveyor.render.documents import Document, RenderError

DataKind = Literal["ConfigMap", "Secret"]
DEFAULT_NAMESPACE = "default"


def find_data_object(
    documents: list[Document], kind: DataKind, namespace: str, name: str
) -> Document | None:
    """The v1 ConfigMap or Secret `namespace/name` among `documents`."""
    for doc in documents:
        metadata = doc.obj.get("metadata") or {}
        if (
            doc.kind == kind
            and doc.api_version == "v1"
            and doc.name == name
            and (metadata.get("namespace") or DEFAULT_NAMESPACE) == namespace
        ):
            return doc
    return None


def data_value(obj: Obj, key: str) -> str | None:
    """The text under `key` of a ConfigMap or Secret, None when the key is absent.
    RenderError, naming the object and the key, when a Secret's value is not base64 of
    UTF-8 text."""
    if obj.get("kind") == "Secret":
        plain = (obj.get("stringData") or {}).get(key)
        if plain is not None:
            return str(plain)
        raw = (obj.get("data") or {}).get(key)
        if raw is None:
            return None
        # The API server's decoder skips line breaks, which kustomize folds long values
        # with (a generated Secret); any other character outside base64 is refused.
        text = str(raw).replace("\r", "").replace("\n", "")
        try:
            return base64.b64decode(text, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RenderError(f"{_named(obj)} key {key!r} is not base64 of UTF-8 text") from None
    value = (obj.get("data") or {}).get(key)
    return str(value) if value is not None else None


def data_entries(obj: Obj) -> dict[str, str]:
    """Every entry of a ConfigMap or Secret, decoded by `data_value`'s rule."""
    keys = [*(obj.get("data") or {}), *(obj.get("stringData") or {})]
    entries: dict[str, str] = {}
    for key in dict.fromkeys(str(k) for k in keys):
        value = data_value(obj, key)
        if value is not None:
            entries[key] = value
    return entries


def _named(obj: Obj) -> str:
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
    return f"{obj.get('kind')} {namespace}/{metadata.get('name')}"
