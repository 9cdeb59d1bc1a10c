"""Put back what last worked once an app's retries are exhausted: the last good Helm
revision of a release (`helm rollback`), or the objects of the last good git revision of
a plain app, applied, pruned and verified as a new revision would be."""

from __future__ import annotations

from conveyor.reconcile.actions import ActionContext, AppFailed
from conveyor.reconcile.actions.apply import apply_plain
from conveyor.reconcile.actions.verify import wait_healthy
from conveyor.reconcile.status import AppStatus, Reason, split_release
from conveyor.render.helm import HelmError
from conveyor.render.render import RenderedApp


async def roll_back(ctx: ActionContext, status: AppStatus, app: RenderedApp) -> str | None:
    """Returns what was restored; None if there is nothing to go back to."""
    if app.helm is not None:
        return await _roll_back_release(ctx, status, app)
    good = status.last_applied_revision
    if ctx.render_past is None or not good or good == ctx.revision:
        return None
    previous = await ctx.render_past(app.name, good)
    if previous.empty:  # never prune a whole app on the way back
        raise AppFailed(Reason.ROLLBACK_FAILED, f"revision {good[:12]} renders no objects")
    plan = await ctx.plan(previous, status)  # prunes what the failed revision added
    async with ctx.apply_slots:
        with ctx.desired.writing(app.name):
            await apply_plain(ctx, status, plan)
    await wait_healthy(ctx, previous, plan.desired)
    return f"revision {good[:12]}"


async def _roll_back_release(ctx: ActionContext, status: AppStatus, app: RenderedApp) -> str | None:
    if app.helm is None or not (
        app.helm.spec.rollback_on_failure and status.last_good_helm_revision and status.release
    ):
        return None
    namespace, release = split_release(status.release)
    with ctx.desired.writing(app.name):
        try:
            async with ctx.helm_slots:
                await ctx.helm.rollback(
                    release,
                    namespace,
                    status.last_good_helm_revision,
                    timeout=app.helm.spec.timeout_seconds,
                )
        except HelmError as error:
            raise AppFailed(Reason.ROLLBACK_FAILED, error.message, details=error.output) from None
        ctx.desired.forget(app.name)
    history = await ctx.helm.history(release, namespace)
    status.helm_revision = int(history[-1]["revision"]) if history else None
    return f"Helm revision {status.last_good_helm_revision}"
