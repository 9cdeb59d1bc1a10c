"""What applying an object would change, without changing it: a server-side dry run.

Every object is sent through a dry run, so defaults, admission and field ownership are
the cluster's own. Secret values never appear: a changed key shows as changed. Every
diff conveyor shows (the CLI, `--against live`, pull-request diffs, the dashboard's
pages and API) is made of objects passed through `normalize` and `mask_secrets` here.
"""

from __future__ import annotations

import base64
import binascii
import copy
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from conveyor.cluster.apply import namespaced_ref
from conveyor.cluster.client import KubeClient
from conveyor.cluster.objects import Obj, ObjectRef

MASK = "***"
# kubectl's client-side apply keeps a full copy of the object here: on a Secret, its
# plaintext. A diff shows the object itself, so the copy adds nothing and is dropped.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Shorter Secret values are masked where they belong, but not searched for elsewhere:
# they would turn up by chance in unrelated annotations.
_SHORTEST_SEARCHED_VALUE = 4
_VOLATILE_METADATA = (
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
)


@dataclass
class ObjectChange:
    ref: ObjectRef
    action: str  # create | update | delete
    diff: str


def normalize(obj: Obj | None) -> Obj | None:
    if obj is None:
        return None
    result = copy.deepcopy(obj)
    result.pop("status", None)
    metadata = result.get("metadata", {})
    for key in _VOLATILE_METADATA:
        metadata.pop(key, None)
    annotations = metadata.get("annotations") or {}
    annotations.pop("deployment.kubernetes.io/revision", None)
    annotations.pop(LAST_APPLIED, None)
    if not annotations:
        metadata.pop("annotations", None)
    return result


def secret_values(objects: Iterable[Obj | None]) -> frozenset[str]:
    """What the Secrets among `objects` hold, as stored (base64) and as text, to recognise
    a copy of it anywhere else (an annotation of any object)."""
    found: set[str] = set()
    for obj in objects:
        if not obj or obj.get("kind") != "Secret":
            continue
        for section, encoded in (("data", True), ("stringData", False)):
            values = obj.get(section)
            if not isinstance(values, dict):
                continue  # malformed: validation reports it, masking only has less to find
            for value in values.values():
                found.update(_both_forms(str(value), encoded=encoded))
    return frozenset(v for v in found if len(v) >= _SHORTEST_SEARCHED_VALUE)


def _both_forms(value: str, *, encoded: bool) -> set[str]:
    if not encoded:
        return {value, base64.b64encode(value.encode()).decode()}
    try:
        return {value, base64.b64decode(value, validate=True).decode()}
    except (binascii.Error, UnicodeDecodeError):
        return {value}  # binary data: only its stored form can be recognised


def mask_secrets(
    before: Obj | None, after: Obj | None, *, known: frozenset[str] = frozenset()
) -> tuple[Obj | None, Obj | None]:
    """Replace Secret values by a mask; a value that changed is marked, never shown.

    On every object (not only Secrets), an annotation that holds one of the Secret values
    of this pair or of `known` (see `secret_values`) is masked the same way, and so is a
    Secret's kubectl last-applied copy."""
    secret = (after or before or {}).get("kind") == "Secret"
    known = known | secret_values([before, after])
    if not secret and not known:
        return before, after
    before, after = copy.deepcopy(before), copy.deepcopy(after)
    if secret:
        for section in ("data", "stringData"):
            _mask_entries(before, after, (section,), lambda _key, _value: True)

    def revealing(key: str, value: Any) -> bool:
        return (secret and key == LAST_APPLIED) or any(v in str(value) for v in known)

    for path in _annotation_paths(before) | _annotation_paths(after):
        _mask_entries(before, after, path, revealing)
    return before, after


def _mask_entries(
    before: Obj | None,
    after: Obj | None,
    path: tuple[str, ...],
    masked: Callable[[str, Any], bool],
) -> None:
    """Mask the entries of the map at `path` that `masked` picks on either side; an entry
    whose value differs between the two objects is marked changed."""
    old, new = _map_at(before, path), _map_at(after, path)
    old_values, new_values = dict(old), dict(new)
    picked = {str(k) for k, v in [*old_values.items(), *new_values.items()] if masked(str(k), v)}
    for key in old:
        if str(key) in picked:
            old[key] = MASK
    for key in new:
        if str(key) in picked:
            changed = key in old_values and old_values[key] != new_values[key]
            new[key] = f"{MASK} (secret value changed)" if changed else MASK


def _map_at(obj: Obj | None, path: tuple[str, ...]) -> dict[Any, Any]:
    node: Any = obj or {}
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _annotation_paths(obj: Any, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Where the object holds `annotations` maps: its own, and its templates' (a
    Deployment's Pods, a CronJob's Jobs and their Pods)."""
    if not isinstance(obj, dict):
        return set()
    found = set()
    for key, value in obj.items():
        if not isinstance(value, dict):
            continue
        where = (*path, key)
        if key == "annotations":
            found.add(where)
        else:
            found |= _annotation_paths(value, where)
    return found


def unified(
    before: Obj | None,
    after: Obj | None,
    *,
    label: str,
    before_name: str = "live",
    after_name: str = "git",
) -> str:
    a = yaml.safe_dump(before, sort_keys=True).splitlines(keepends=True) if before else []
    b = yaml.safe_dump(after, sort_keys=True).splitlines(keepends=True) if after else []
    return "".join(
        difflib.unified_diff(
            a, b, fromfile=f"{before_name}/{label}", tofile=f"{after_name}/{label}"
        )
    )


async def diff_objects(kube: KubeClient, objects: list[Obj]) -> list[ObjectChange]:
    """Each object against its live self, through a server-side dry run; Secrets masked,
    and their values in any other object's annotations too."""
    pairs = []
    for obj in objects:
        ref = await namespaced_ref(kube, obj)
        live = await kube.get(ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None)
        if live is None and ref.kind == "Namespace":
            dry: Any = obj
        elif (
            live is None
            and ref.namespace
            and await kube.get("v1", "Namespace", ref.namespace) is None
        ):
            dry = obj  # its namespace is created first by a real apply; cannot dry-run here
        else:
            dry = await kube.apply(obj, field_manager="conveyor", force=True, dry_run=True)
        pairs.append((ref, obj, live, dry))
    known = secret_values(o for _, obj, live, dry in pairs for o in (obj, live, dry))
    changes = []
    for ref, _, live, dry in pairs:
        before, after = mask_secrets(normalize(live), normalize(dry), known=known)
        if before == after:
            continue
        changes.append(
            ObjectChange(
                ref, "create" if live is None else "update", unified(before, after, label=str(ref))
            )
        )
    return changes


async def diff_deletions(kube: KubeClient, refs: list[ObjectRef]) -> list[ObjectChange]:
    """What deleting `refs` removes: each one still live, as a diff to nothing."""
    changes = []
    for ref in refs:
        live = await kube.get(ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None)
        if live is not None:
            before, _ = mask_secrets(normalize(live), None)
            changes.append(ObjectChange(ref, "delete", unified(before, None, label=str(ref))))
    return changes
