"""Unlock a release that a crash left `pending-*`: helm refuses to upgrade it ("another
operation is in progress") until that revision is marked failed. Only the holder of the
environment's Lease runs this, so no other operation can really be in progress. Looked at
only when helm refuses, so that the usual upgrade costs no extra API call."""

from __future__ import annotations

import logging

from conveyor.cluster.helm_storage import unlock_pending_release
from conveyor.reconcile.actions import ActionContext
from conveyor.render.render import HelmPlan

log = logging.getLogger("conveyor.reconcile")


async def unlock_release(ctx: ActionContext, app: str, plan: HelmPlan) -> bool:
    """True when a pending revision was marked failed, so the upgrade can run again."""
    unlocked = await unlock_pending_release(
        ctx.kube, release=plan.spec.release_name, namespace=plan.spec.target_namespace
    )
    if unlocked is not None:
        log.warning(
            "%s: release was left pending by an interrupted operation; marked revision %d "
            "failed to continue",
            app,
            unlocked,
        )
    return unlocked is not None
