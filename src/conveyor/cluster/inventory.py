"""An app's inventory: the objects conveyor applied for it (kept on its status), the only
ones it may prune. What left an app is decided here once, for the engine's prune and
for the diff that shows that prune before it happens."""

from __future__ import annotations

from collections.abc import Iterable

from conveyor.cluster.objects import ObjectRef


def left_behind(inventory: Iterable[ObjectRef], wanted: Iterable[ObjectRef]) -> list[ObjectRef]:
    """The objects of `inventory` that are not `wanted` any more, in inventory order."""
    keys = {ref.key() for ref in wanted}
    return [ref for ref in inventory if ref.key() not in keys]
