"""Apps that left git: their Helm release is uninstalled and their objects deleted, only
what this environment owns (never after a failed render, and never while the pass is
held by a gate; the engine decides that)."""

from __future__ import annotations

import logging

from conveyor.cluster.apply import delete_objects
from conveyor.cluster.helm_storage import release_ownership
from conveyor.reconcile.actions import ActionContext
from conveyor.reconcile.status import AppStatus, split_release

log = logging.getLogger("conveyor.reconcile")


async def prune_app(ctx: ActionContext, status: AppStatus) -> None:
    if status.release:
        namespace, release = split_release(status.release)
        ownership = await release_ownership(ctx.kube, release=release, namespace=namespace)
        if ownership.owner in (None, ctx.identity.id):
            await ctx.helm.uninstall(release, namespace)
        else:
            log.warning(
                "%s: not uninstalling Helm release %s: another environment owns it now",
                status.app,
                status.release,
            )
    await delete_objects(ctx.kube, status.inventory, identity=ctx.identity)
    ctx.desired.forget(status.app)
