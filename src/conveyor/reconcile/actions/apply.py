"""Install or upgrade an app's new content as its plan says: server-side apply of its
objects, deletion of its prune set, then `helm upgrade --install` of its release, then
the wait for health."""

from __future__ import annotations

import logging

from conveyor.cluster.apply import ApplyError, apply_objects, delete_objects
from conveyor.cluster.objects import ObjectRef
from conveyor.reconcile.actions import ActionContext, AppFailed, ReleaseLocked
from conveyor.reconcile.actions.verify import release_objects, wait_healthy
from conveyor.reconcile.plan import AppPlan, Desired
from conveyor.reconcile.status import AppStatus, Reason, now, release_key
from conveyor.render.documents import Document
from conveyor.render.helm import HelmError, parse_manifest
from conveyor.render.render import HelmPlan
from conveyor.render.values_origin import values_origin

log = logging.getLogger("conveyor.reconcile")


async def install_or_upgrade(ctx: ActionContext, status: AppStatus, plan: AppPlan) -> Desired:
    """Apply the plan, then verify. Returns everything the app now consists of (its
    objects and its release's), for drift checks."""
    async with ctx.apply_slots:
        with ctx.desired.writing(plan.name):
            await apply_plain(ctx, status, plan)
            desired = plan.desired
            if plan.helm is not None:
                desired += await _upgrade_release(
                    ctx, status, plan.helm, source=plan.app.source.helm_release
                )
            ctx.desired.remember(plan.name, desired)
    await wait_healthy(ctx, plan.app, desired)
    return desired


async def apply_plain(ctx: ActionContext, status: AppStatus, plan: AppPlan) -> None:
    """Server-side apply of the plan's own objects, then the deletion of its prune set
    (what the app had and no longer has; nothing for an app with a release)."""
    ctx.set(status, Reason.PROGRESSING, f"applying revision {ctx.revision[:12]}")
    try:
        ctx.live.seed(await apply_objects(ctx.kube, plan.objects))
    except ApplyError as error:
        immutable = [ref for ref, why in error.failures if "immutable" in why]
        if not (plan.app.source.options.force and immutable):
            raise AppFailed(Reason.APPLY_FAILED, str(error), details=error.details) from None
        await _recreate(ctx, plan, immutable)
    if plan.helm is not None:
        return
    try:
        await delete_objects(ctx.kube, plan.prune, identity=ctx.identity)
    except ApplyError as error:
        raise AppFailed(Reason.PRUNE_FAILED, str(error), details=error.details) from None
    # Applied, healthy or not: a later revision or a rollback prunes from here.
    status.inventory = sorted(plan.refs)
    ctx.desired.remember(plan.name, plan.desired)


async def _recreate(ctx: ActionContext, plan: AppPlan, immutable: list[ObjectRef]) -> None:
    """Flux's `force: true`: an object whose immutable fields changed is deleted and
    created again (only what this environment owns; the rest is applied as before)."""
    log.warning("%s: recreating %s (immutable fields changed; force is set)", plan.name, immutable)
    try:
        await delete_objects(ctx.kube, immutable, identity=ctx.identity)
        ctx.live.seed(await apply_objects(ctx.kube, plan.objects))
    except ApplyError as error:
        raise AppFailed(Reason.APPLY_FAILED, str(error), details=error.details) from None


async def _upgrade_release(
    ctx: ActionContext, status: AppStatus, plan: HelmPlan, *, source: Document | None
) -> Desired:
    """`helm upgrade --install` of the release; returns the objects Helm now holds.
    `source`: the HelmRelease's document, to name where a refused value is written."""
    spec = plan.spec
    status.release = release_key(spec)
    async with ctx.helm_slots:
        try:
            release = await ctx.helm.upgrade_install(
                spec.release_name,
                spec.target_namespace,
                plan.chart.path,
                plan.values,
                timeout=spec.timeout_seconds,
                description=f"conveyor {ctx.revision[:12]}",
                labels=ctx.identity.labels(),
                post_renderers=spec.post_renderers,
            )
        except HelmError as error:
            if "another operation" in error.message:
                raise ReleaseLocked(error.message) from None
            if not await _refresh_helm_revision(ctx, status, plan):
                # Helm cannot read the release either: the cluster is out of reach, which
                # is no fault of this content. Not counted against its retries; the next
                # pass tries again.
                raise
            origin = source and await values_origin(plan, source, error.cause, helm=ctx.helm)
            message = f"{error.message} (values: {origin})" if origin else error.message
            raise AppFailed(Reason.UPGRADE_FAILED, message, details=error.output) from None
    status.helm_revision = int(release.get("version", 0)) or None
    return await release_objects(
        ctx.kube, parse_manifest(release.get("manifest", "")), namespace=spec.target_namespace
    )


async def _refresh_helm_revision(ctx: ActionContext, status: AppStatus, plan: HelmPlan) -> bool:
    """After a failed upgrade, the release's latest revision (the failed one) into
    `status`. False when helm cannot read the history either (logged, never raised):
    `helm_revision` then stays as it was."""
    try:
        history = await ctx.helm.history(plan.spec.release_name, plan.spec.target_namespace)
    except HelmError as error:
        log.warning("%s: cannot read the release history: %s", status.app, error.message)
        return False
    status.helm_revision = int(history[-1]["revision"]) if history else None
    return True


def record_applied(
    ctx: ActionContext, status: AppStatus, plan: AppPlan, *, corrected: list[str]
) -> None:
    """The app runs this plan now: what later passes compare with and prune from."""
    status.fingerprint = plan.app.fingerprint
    status.failures = 0
    status.failed_fingerprint = None
    status.drift = None
    if not corrected or status.last_applied_time is None:
        # A drift correction puts the same content back: the version has run since it
        # was first applied, which is what soak gates count from.
        status.last_applied_time = now()
    if not corrected:
        status.record_history(ctx.revision, status.last_applied_time)
    status.last_applied_revision = ctx.revision
    # Helm owns its release's objects; the inventory holds what conveyor applied.
    status.inventory = sorted(plan.refs)
    if plan.helm is not None:
        status.last_good_helm_revision = status.helm_revision
    if corrected:
        ctx.set(status, Reason.DRIFT_CORRECTED, f"corrected drift in {'; '.join(corrected)[:500]}")
    else:
        ctx.set(status, Reason.SUCCEEDED, f"applied revision {ctx.revision[:12]}")
