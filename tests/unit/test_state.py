"""Every state→action decision of the engine, one case each (reconcile/state.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conveyor.reconcile.state import AppState, Attempt, Observation, determine_state

NEW = Observation(new_content=True)
SAME = Observation()
DRIFT = Observation(drift=("Deployment ns/web spec.replicas",))


@pytest.mark.parametrize(
    ("seen", "state"),
    [
        (replace(NEW, render_error="a.yaml:3: invalid YAML"), AppState.RENDER_FAILED),
        (replace(NEW, dependencies_missing=("db",)), AppState.DEPENDENCY_MISSING),
        (replace(NEW, dependencies_not_ready=("db",)), AppState.DEPENDENCY_NOT_READY),
        (replace(NEW, suspended=True), AppState.SUSPENDED),
        (replace(DRIFT, suspended=True), AppState.SUSPENDED),
        (replace(NEW, empty=True, has_inventory=True), AppState.EMPTY_RENDER),
        (replace(NEW, empty=True, has_inventory=True, empty_allowed=True), AppState.NEW_CONTENT),
        (replace(NEW, empty=True), AppState.NEW_CONTENT),  # nothing to prune: not refused
        (replace(NEW, conflicts=("ConfigMap ns/c belongs to …",)), AppState.OWNERSHIP_CONFLICT),
        (replace(DRIFT, conflicts=("ConfigMap ns/c belongs to …",)), AppState.OWNERSHIP_CONFLICT),
        (
            replace(NEW, flux_reconciles="Kustomization flux-system/apps …"),
            AppState.FLUX_STILL_MANAGES,
        ),
        (replace(SAME, flux_reconciles="HelmRelease ns/web …"), AppState.FLUX_STILL_MANAGES),
        # Another environment's object is a conflict first: Flux is not the only claim.
        (
            replace(NEW, conflicts=("ConfigMap ns/c belongs to …",), flux_reconciles="…"),
            AppState.OWNERSHIP_CONFLICT,
        ),
        (replace(NEW, flux_marked=("ConfigMap ns/c",)), AppState.TAKE_OVER_FROM_FLUX),
        (replace(SAME, flux_marked=("ConfigMap ns/c",)), AppState.TAKE_OVER_FROM_FLUX),
        (replace(DRIFT, flux_marked=("ConfigMap ns/c",)), AppState.TAKE_OVER_FROM_FLUX),
        # Only the writer takes over; a held app waits for its gate first.
        (replace(NEW, flux_marked=("ConfigMap ns/c",), may_write=False), AppState.NOT_LEADER),
        (replace(SAME, flux_marked=("ConfigMap ns/c",), may_write=False), AppState.UNCHANGED),
        (replace(NEW, flux_marked=("ConfigMap ns/c",), held=True), AppState.HELD),
        (replace(NEW, given_up=True), AppState.EXHAUSTED),
        (replace(NEW, held=True), AppState.HELD),
        # Held to what it last applied: drift from that is put back ...
        (replace(NEW, held=True, drift=DRIFT.drift), AppState.HELD_DRIFTED),
        # ... unless the app only reports drift, or another agent writes.
        (replace(NEW, held=True, drift=DRIFT.drift, drift_mode="warn"), AppState.HELD),
        (replace(NEW, held=True, drift=DRIFT.drift, drift_mode="disabled"), AppState.HELD),
        (replace(NEW, held=True, drift=DRIFT.drift, may_write=False), AppState.HELD),
        (replace(NEW, held=True, given_up=True), AppState.EXHAUSTED),
        (replace(SAME, held=True), AppState.UNCHANGED),  # gates judge new content only
        (SAME, AppState.UNCHANGED),
        (replace(DRIFT, drift_mode="warn"), AppState.DRIFT_REPORTED),
        (replace(DRIFT, drift_mode="disabled"), AppState.DRIFT_REPORTED),
        (replace(NEW, may_write=False), AppState.NOT_LEADER),
        (replace(DRIFT, may_write=False), AppState.NOT_LEADER),
        (replace(SAME, may_write=False), AppState.UNCHANGED),  # settling writes nothing
        (NEW, AppState.NEW_CONTENT),
        (DRIFT, AppState.DRIFTED),
        (replace(NEW, attempt=Attempt.FAILED, failures=1, retries=1), AppState.RETRYING),
        (replace(NEW, attempt=Attempt.FAILED, failures=2, retries=1), AppState.NEEDS_ROLLBACK),
        (replace(NEW, attempt=Attempt.FAILED, failures=1, retries=0), AppState.NEEDS_ROLLBACK),
        (replace(NEW, attempt=Attempt.RELEASE_LOCKED, failures=1), AppState.PENDING_RELEASE),
        (
            replace(NEW, attempt=Attempt.RELEASE_LOCKED, failures=1, unlocked=True),
            AppState.RETRYING,
        ),
    ],
)
def test_state_of_an_app(seen: Observation, state: AppState) -> None:
    assert determine_state(seen).state is state


def test_decisions_carry_what_the_action_needs() -> None:
    assert determine_state(DRIFT).detail == DRIFT.drift
    assert determine_state(replace(NEW, render_error="x")).detail == ("x",)
    assert determine_state(replace(NEW, dependencies_missing=("a", "b"))).detail == ("a", "b")
    held = replace(NEW, held=True, drift=DRIFT.drift)
    assert determine_state(held).detail == DRIFT.drift
