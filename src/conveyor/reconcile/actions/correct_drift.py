"""Put drifted objects back as git has them: the app's own objects by server-side apply
(as a new revision would be, pruning included), a release's objects by server-side apply
of those Helm created, without a new Helm revision."""

from __future__ import annotations

from conveyor.cluster.apply import ApplyError, apply_objects
from conveyor.cluster.objects import Obj
from conveyor.reconcile.actions import ActionContext, AppFailed, Desired
from conveyor.reconcile.actions.apply import apply_plain
from conveyor.reconcile.actions.verify import wait_healthy
from conveyor.reconcile.status import AppStatus, Reason, release_key
from conveyor.render.render import RenderedApp


async def correct_drift(
    ctx: ActionContext, status: AppStatus, app: RenderedApp, objects: list[Obj], desired: Desired
) -> Desired:
    async with ctx.apply_slots:
        with ctx.desired.writing(app.name):
            desired = await apply_plain(ctx, status, app, objects, desired)
            if app.helm is not None:
                status.release = release_key(app.helm.spec)
                try:
                    ctx.live.seed(
                        await apply_objects(ctx.kube, [o for _, o in desired if o not in objects])
                    )
                except ApplyError as error:
                    raise AppFailed(Reason.DRIFT_CORRECTION_FAILED, str(error)) from None
    await wait_healthy(ctx, app, desired)
    return desired
