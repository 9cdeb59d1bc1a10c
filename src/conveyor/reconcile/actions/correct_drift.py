"""Put drifted objects back as git has them: the app's own objects by server-side apply
of its plan (as a new revision would be, pruning included), a release's objects by
server-side apply of those Helm created, without a new Helm revision."""

from __future__ import annotations

from conveyor.cluster.apply import ApplyError, apply_objects
from conveyor.reconcile.actions import ActionContext, AppFailed
from conveyor.reconcile.actions.apply import apply_plain
from conveyor.reconcile.actions.verify import wait_healthy
from conveyor.reconcile.plan import AppPlan, Desired
from conveyor.reconcile.status import AppStatus, Reason, release_key


async def correct_drift(
    ctx: ActionContext, status: AppStatus, plan: AppPlan, desired: Desired
) -> Desired:
    """`desired` is the plan's objects and, for an app with a release, the release's."""
    async with ctx.apply_slots:
        with ctx.desired.writing(plan.name):
            await apply_plain(ctx, status, plan)
            if plan.helm is not None:
                status.release = release_key(plan.helm.spec)
                try:
                    ctx.live.seed(
                        await apply_objects(
                            ctx.kube, [o for _, o in desired if o not in plan.objects]
                        )
                    )
                except ApplyError as error:
                    raise AppFailed(
                        Reason.DRIFT_CORRECTION_FAILED, str(error), details=error.details
                    ) from None
    await wait_healthy(ctx, plan.app, desired)
    return desired
