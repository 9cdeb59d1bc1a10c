"""Where the value a failed Helm release was refused for is written: the key in the
HelmRelease's `values:`, its file and line (`replicaCount in production/api.yaml:48`),
so that a person goes straight to it.

helm and the API server name the object and field they refused (`Deployment api:
spec.replicas`), or the `.Values` key a template failed on, but not the file the value
came from. For a refused field the chart is rendered once more (`helm template`, only
after a failure) to read what the object got there, and the HelmRelease's own values
are searched for it: named only when one key holds it, or one among them is named like
the field. A value from the chart's defaults or from valuesFrom has no line to name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from conveyor.config.userfile import PathPart, locate
from conveyor.render.documents import Document, RenderError
from conveyor.render.helm import HelmCause, HelmCLI, HelmError, parse_manifest
from conveyor.render.render import HelmPlan

_STEP = re.compile(r"(?P<key>\w+)(?:\[(?P<index>\d+)\])?")
_SHARED_PREFIX = 4  # `replicaCount` is named like `replicas`; `tag` is not like `image`


async def values_origin(
    plan: HelmPlan, release: Document, cause: HelmCause, *, helm: HelmCLI
) -> str | None:
    """`key in file:line` of the value in `release`'s values that `cause` is about, or
    None."""
    values = (release.obj.get("spec") or {}).get("values")
    if release.node is None or not isinstance(values, dict):
        return None
    if cause.values_key:
        path = _present(values, cause.values_key.split("."))
    elif cause.kind and cause.field:
        path = await _holding(plan, values, cause, helm=helm)
    else:
        return None
    if not path:
        return None
    _, line = locate(release.node, ("spec", "values", *path), at_key=True)
    return f"{_dotted(path)} in {release.file}:{line}"


def _present(values: dict[str, Any], keys: list[str]) -> list[PathPart]:
    """The longest start of `keys` that the values hold (a template failing on
    `.Values.image.tag` where the file has `image:` but no `tag:` names `image`)."""
    path: list[PathPart] = []
    node: Any = values
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            break
        path.append(key)
        node = node[key]
    return path


async def _holding(
    plan: HelmPlan, values: dict[str, Any], cause: HelmCause, *, helm: HelmCLI
) -> list[PathPart]:
    spec = plan.spec
    try:
        manifest = await helm.template(
            spec.release_name, spec.target_namespace, plan.chart.path, plan.values
        )
        objects = parse_manifest(manifest)
    except (HelmError, RenderError, OSError):
        return []  # the chart does not render now: nothing to read the value from
    refused = [
        value
        for obj in objects
        if obj.get("kind") == cause.kind
        and (cause.name is None or (obj.get("metadata") or {}).get("name") == cause.name)
        for value in _at(obj, str(cause.field).split("."))
        if value is not None and not isinstance(value, dict | list)
    ]
    found = [path for path, leaf in _leaves(values) if any(_same(leaf, v) for v in refused)]
    if len(found) > 1:
        field_name = str(cause.field).rsplit(".", 1)[-1]
        found = [path for path in found if _named_alike(str(path[-1]), field_name)]
    return found[0] if len(found) == 1 else []


def _at(node: Any, steps: list[str]) -> Iterator[Any]:
    """Every value at the field's path; a step without an index (Go's decoder leaves
    them out) goes through every item of a list."""
    if not steps:
        yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from _at(item, steps)
        return
    step = _STEP.fullmatch(steps[0])
    if step is None or not isinstance(node, dict) or step["key"] not in node:
        return
    child = node[step["key"]]
    if step["index"] is not None:
        index = int(step["index"])
        if not isinstance(child, list) or index >= len(child):
            return
        child = child[index]
    yield from _at(child, steps[1:])


def _leaves(node: Any, path: tuple[PathPart, ...] = ()) -> Iterator[tuple[list[PathPart], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        yield list(path), node


def _same(leaf: Any, rendered: Any) -> bool:
    """A values leaf and what a template made of it: `"two"` stays `two`, `2` may come
    back quoted; `true` is not `1`."""
    if isinstance(leaf, bool) or isinstance(rendered, bool):
        return str(leaf).lower() == str(rendered).lower()
    return leaf == rendered or str(leaf) == str(rendered)


def _named_alike(key: str, field_name: str) -> bool:
    shared = 0
    for a, b in zip(key.lower(), field_name.lower(), strict=False):
        if a != b:
            break
        shared += 1
    return shared >= _SHARED_PREFIX


def _dotted(path: list[PathPart]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text
