"""New content behind a closed gate: only the status changes, and the app keeps running
what it ran before."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.reconcile.actions import ActionContext
from conveyor.reconcile.status import AppStatus, Reason


@dataclass(frozen=True)
class GateHold:
    """A closed gate keeps new content out: which gate, why, and when to look again."""

    gate: str
    message: str
    retry_after: float


def hold(ctx: ActionContext, status: AppStatus, held: GateHold) -> None:
    ctx.set(
        status,
        Reason.GATE_CLOSED,
        f"revision {ctx.revision[:12]} waits for gate {held.gate}: {held.message}",
    )
