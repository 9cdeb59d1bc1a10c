"""An unchanged app (same content, no drift, or drift only reported): its state is read
again from the watch cache, with no API call and, unless it changed, no status write."""

from __future__ import annotations

from conveyor.cluster.health import HealthStatus
from conveyor.reconcile.actions import ActionContext
from conveyor.reconcile.actions.verify import health_of
from conveyor.reconcile.plan import Desired
from conveyor.reconcile.status import READY, AppStatus, Reason


def settle(
    ctx: ActionContext,
    status: AppStatus,
    app: str,
    desired: Desired,
    *,
    watched: Desired | None = None,
) -> None:
    """`watched`: the objects whose health counts (all of `desired` when None)."""
    health = health_of(ctx.live, desired if watched is None else watched)
    if health.status is HealthStatus.CURRENT:
        if status.drift:
            ctx.set(status, Reason.DRIFT_DETECTED, f"drift (warn only): {status.drift}")
        elif status.state != READY:
            applied = status.last_applied_revision or ctx.revision
            ctx.set(status, Reason.SUCCEEDED, f"applied revision {applied[:12]}")
    elif health.status is HealthStatus.FAILED:
        ctx.set(status, Reason.HEALTH_CHECK_FAILED, health.message)
    else:
        ctx.set(status, Reason.PROGRESSING, health.message)
    ctx.desired.remember(app, desired)
