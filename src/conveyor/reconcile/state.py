"""An app's state in one pass, as a typed value, and the one action it calls for.

Modelled on helm-controller's `DetermineReleaseState`: everything the engine knows about
an app (its render, its stored status, the live cluster through the watch cache, the
environment's gates and Lease) is first reduced to an `Observation`; `determine_state`
then names the app's state, a pure function with a unit test for every branch; the
engine runs the action for that state (`reconcile/actions/`). After an attempt fails the
engine determines the state again, so retrying, unlocking a pending release and rolling
back are states like the others, not branches hidden inside an apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from conveyor.config.helmrelease import DriftMode


class AppState(StrEnum):
    RENDER_FAILED = "RenderFailed"  # report the render error; nothing is applied or pruned
    DEPENDENCY_MISSING = "DependencyMissing"
    DEPENDENCY_NOT_READY = "DependencyNotReady"
    SUSPENDED = "Suspended"
    HELD = "Held"  # new content behind a closed gate: hold it, the cluster as applied
    HELD_DRIFTED = "HeldDrifted"  # held, and live drifted from the last applied: put it back
    EMPTY_RENDER = "EmptyRender"  # refuse to prune everything the app had
    EXHAUSTED = "Exhausted"  # this content failed and was given up on: wait for new content
    OWNERSHIP_CONFLICT = "OwnershipConflict"
    FLUX_STILL_MANAGES = "FluxStillManages"  # Flux runs and reconciles it: refuse, say how
    TAKE_OVER_FROM_FLUX = "TakeOverFromFlux"  # Flux's marks on it: take its fields, then apply
    UNCHANGED = "Unchanged"  # settle: health from the watch cache, no API call
    DRIFT_REPORTED = "DriftReported"  # drift in an app whose drift mode is warn/disabled
    NOT_LEADER = "NotLeader"
    NEW_CONTENT = "NewContent"  # install or upgrade
    DRIFTED = "Drifted"  # put the drifted objects back
    RETRYING = "Retrying"  # an attempt failed; retries are left
    PENDING_RELEASE = "PendingRelease"  # helm refused: a crash left the release pending
    NEEDS_ROLLBACK = "NeedsRollback"  # retries exhausted: roll back to the last good


class Attempt(StrEnum):
    """What the last action of this pass left behind, for the next decision."""

    NONE = "None"
    FAILED = "Failed"
    RELEASE_LOCKED = "ReleaseLocked"


@dataclass(frozen=True)
class Observation:
    render_error: str | None = None
    dependencies_missing: tuple[str, ...] = ()
    dependencies_not_ready: tuple[str, ...] = ()
    suspended: bool = False
    held: bool = False  # the environment's gates are closed for this app's new content
    empty: bool = False
    empty_allowed: bool = False
    has_inventory: bool = False
    new_content: bool = False
    given_up: bool = False  # this exact content failed before and was given up on
    conflicts: tuple[str, ...] = ()
    # Why Flux's controllers would still reconcile the app (None: they would not).
    flux_reconciles: str | None = None
    # The app's objects that still carry Flux's labels or kustomize-controller's fields.
    flux_marked: tuple[str, ...] = ()
    # Where the live objects differ from what the app should run: its content, or while
    # it is held, the content it last applied.
    drift: tuple[str, ...] = ()
    drift_mode: DriftMode = "enabled"
    may_write: bool = True
    attempt: Attempt = Attempt.NONE
    failures: int = 0  # failed attempts of this content in this pass
    retries: int = 1
    unlocked: bool = False  # a pending release was already unlocked in this pass


@dataclass(frozen=True)
class Decision:
    state: AppState
    detail: tuple[str, ...] = field(default=())


def determine_state(seen: Observation) -> Decision:
    """The app's state; the order of the checks is the order of precedence."""
    if seen.render_error is not None:
        return Decision(AppState.RENDER_FAILED, (seen.render_error,))
    if seen.dependencies_missing:
        return Decision(AppState.DEPENDENCY_MISSING, seen.dependencies_missing)
    if seen.dependencies_not_ready:
        return Decision(AppState.DEPENDENCY_NOT_READY, seen.dependencies_not_ready)
    if seen.suspended:
        return Decision(AppState.SUSPENDED)
    if seen.empty and seen.has_inventory and not seen.empty_allowed:
        return Decision(AppState.EMPTY_RENDER)
    if seen.conflicts:
        return Decision(AppState.OWNERSHIP_CONFLICT, seen.conflicts)
    if seen.flux_reconciles is not None:
        return Decision(AppState.FLUX_STILL_MANAGES, (seen.flux_reconciles,))
    if seen.attempt is Attempt.RELEASE_LOCKED and not seen.unlocked:
        return Decision(AppState.PENDING_RELEASE)
    if seen.attempt is not Attempt.NONE:
        if seen.failures <= seen.retries:
            return Decision(AppState.RETRYING)
        return Decision(AppState.NEEDS_ROLLBACK)
    if seen.new_content and seen.given_up:
        return Decision(AppState.EXHAUSTED)
    if seen.new_content and seen.held:
        if seen.drift and seen.drift_mode == "enabled" and seen.may_write:
            return Decision(AppState.HELD_DRIFTED, seen.drift)
        return Decision(AppState.HELD, seen.drift)
    if seen.flux_marked and seen.may_write:
        return Decision(AppState.TAKE_OVER_FROM_FLUX, seen.flux_marked)
    if not seen.new_content and not seen.drift:
        return Decision(AppState.UNCHANGED)
    if not seen.new_content and seen.drift_mode != "enabled":
        return Decision(AppState.DRIFT_REPORTED, seen.drift)
    if not seen.may_write:
        return Decision(AppState.NOT_LEADER)
    if seen.new_content:
        return Decision(AppState.NEW_CONTENT)
    return Decision(AppState.DRIFTED, seen.drift)
