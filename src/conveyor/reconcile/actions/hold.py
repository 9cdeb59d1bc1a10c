"""New content behind a closed gate: the app keeps running what it ran before, and that
is what it is held to. Its status says which revision waits and why; live drift from
the last applied content is corrected meanwhile, as for any app."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from conveyor.cluster.apply import ApplyError, apply_objects
from conveyor.cluster.ownership import foreign_owner
from conveyor.reconcile.actions import ActionContext
from conveyor.reconcile.actions.verify import drifted_objects
from conveyor.reconcile.plan import Desired
from conveyor.reconcile.status import AppStatus, Reason

log = logging.getLogger("conveyor.reconcile")


@dataclass(frozen=True)
class GateHold:
    """A closed gate keeps new content out: which gate, why, and when to look again."""

    gate: str
    message: str
    retry_after: float


@dataclass(frozen=True)
class GateVerdict:
    """What an environment's gates hold back in one pass: each held app's new content,
    and the removal of apps that left git (nothing is pruned while anything is held)."""

    apps: Mapping[str, GateHold] = field(default_factory=dict)
    removal: GateHold | None = None

    @property
    def held(self) -> GateHold | None:
        """All holds of the pass as one (their gates and messages), or None."""
        holds = list(dict.fromkeys(h for h in (*self.apps.values(), self.removal) if h))
        if not holds:
            return None
        return GateHold(
            gate=", ".join(dict.fromkeys(h.gate for h in holds)),
            message="; ".join(dict.fromkeys(h.message for h in holds)),
            retry_after=min(h.retry_after for h in holds),
        )


async def correct_held_drift(ctx: ActionContext, app: str, applied: Desired) -> list[str]:
    """Put back the objects of the last applied content that drifted (what another
    environment owns is left alone). Returns what was corrected; a failed apply is
    logged and named, and the next pass tries again."""
    drifted = [
        (ref, obj, what)
        for ref, obj, what in drifted_objects(ctx.live, applied)
        if (live := ctx.live.get(ref)) is None or foreign_owner(live, ctx.identity) is None
    ]
    if not drifted:
        return []
    try:
        async with ctx.apply_slots:
            ctx.live.seed(await apply_objects(ctx.kube, [obj for _, obj, _ in drifted]))
    except ApplyError as error:
        log.warning("%s: could not correct drift while held: %s", app, error, extra={"app": app})
        return [f"not corrected: {error}"]
    corrected = [what for _, _, what in drifted]
    log.info(
        "%s: held by a gate; corrected drift in %s", app, "; ".join(corrected), extra={"app": app}
    )
    return corrected


def hold(
    ctx: ActionContext, status: AppStatus, held: GateHold, *, corrected: list[str] | None = None
) -> None:
    message = f"revision {ctx.revision[:12]} waits for gate {held.gate}: {held.message}"
    if corrected:
        message += f"; drift from the applied revision corrected: {'; '.join(corrected)[:500]}"
    ctx.set(status, Reason.GATE_CLOSED, message)
