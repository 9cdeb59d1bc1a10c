"""Take an app's objects over from Flux once Flux no longer reconciles them: the fields
kustomize-controller owns become conveyor's and Flux's labels go, one patch per object,
no delete and no recreate (cluster/flux.py). The engine then applies the app as new
content, so that whatever kustomize-controller set and git no longer holds is removed,
as server-side apply removes a field its manager stops applying."""

from __future__ import annotations

import logging

from conveyor.cluster.flux import take_over
from conveyor.cluster.objects import ObjectRef
from conveyor.reconcile.actions import ActionContext

log = logging.getLogger("conveyor.reconcile")


async def take_over_from_flux(ctx: ActionContext, app: str, marked: list[ObjectRef]) -> None:
    log.warning(
        "%s: taking %d objects over from Flux: %s",
        app,
        len(marked),
        ", ".join(str(ref) for ref in marked),
        extra={"app": app},
    )
    async with ctx.apply_slots:
        with ctx.desired.writing(app):
            for ref in marked:
                taken = await take_over(ctx.kube, ref)
                if taken is not None:
                    ctx.live.seed([taken])
