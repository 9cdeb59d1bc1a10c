"""`conveyor rollback`: an app's previous version back in git, then in the cluster.

A rollback done only in the cluster (`helm rollback`, Argo CD's rollback with auto-sync
off) leaves git saying otherwise, and the next sync undoes it. Here the version is found
in the git history of the app's files and restored by a commit (only its version fields
change, the environment's settings stay as they are now), then that app alone is
reconciled at once, so git and the cluster agree and automation keeps the rollback.
The same commit pins the app against image automation (`promote/pinning.py`): the next
image scan would otherwise write the bad version back. The pin stays until a person
lifts it (`conveyor unpin`, or a promotion into the environment).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.images.pins import Pin
from conveyor.promote.pinning import now, pin_app
from conveyor.promote.pipeline import PromotionError, Workspace, environment
from conveyor.promote.versions import (
    AppVersion,
    app_files,
    apply_changes,
    plan_copy,
    read_app_version,
)
from conveyor.render.discover import AppSource, discover
from conveyor.source.git import (
    Author,
    RetryPolicy,
    change_trailer,
    commit_and_push,
    file_history,
    read_file_at,
)


@dataclass
class RollbackPlan:
    env: str
    app: str
    path: str
    current: str | None
    restore: AppVersion  # the version fields as of `revision`
    revision: str  # the commit of the app's history they come from

    @property
    def version(self) -> str | None:
        return self.restore.version


@dataclass
class RollbackResult:
    plan: RollbackPlan
    commit: str | None
    fields: list[str] = field(default_factory=list)
    pin: Pin | None = None  # what holds the app against image automation now
    pinned: list[str] = field(default_factory=list)  # the files that carry the pin

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.plan.env,
            "app": self.plan.app,
            "from": self.plan.current,
            "to": self.plan.version,
            "restoredFrom": self.plan.revision,
            "commit": self.commit,
            "fields": self.fields,
            "pin": self.pin.to_dict() if self.pin else None,
            "pinned": self.pinned,
        }


def _version_at(root: Path, app: AppSource, files: list[str], revision: str) -> AppVersion | None:
    with tempfile.TemporaryDirectory(prefix="conveyor-history-") as scratch:
        copy = Path(scratch)
        found = False
        for file in files:
            text = read_file_at(root, revision, file)
            if text is None:
                continue
            (copy / file).parent.mkdir(parents=True, exist_ok=True)
            (copy / file).write_text(text)
            found = True
        if not found:
            return None
        return read_app_version(copy, app)


def plan_rollback(workspace: Workspace, env_name: str, app: str, *, to: str | None) -> RollbackPlan:
    """The version to go back to: `to`, or the last one before the current, as the
    history of the app's files on the environment's branch shows them."""
    env = environment(workspace.project(), env_name)
    root = workspace.env_root(env)
    source = workspace.app(env, app)
    current = read_app_version(root, source)
    if not current.fields:
        raise PromotionError(f"{app} in {env.name} has no version fields (image tags, chart)")
    files = app_files(root, source)
    for revision in file_history(root, files):
        past = _version_at(root, source, files, revision)
        if past is None or not past.fields or past.version is None:
            continue
        if (to is not None and past.version == to) or (
            to is None and past.version != current.version
        ):
            return RollbackPlan(env.name, app, source.path, current.version, past, revision)
    if to is not None:
        raise PromotionError(
            f"{app} never ran {to} in {env.name} (per the history of {source.path})"
        )
    raise PromotionError(
        f"{app} in {env.name} has no earlier version in the history of {source.path}"
    )


def write_rollback(
    workspace: Workspace,
    plan: RollbackPlan,
    *,
    author: Author,
    reason: str | None = None,
    retry: RetryPolicy | None = None,
) -> RollbackResult:
    """One commit on the environment's branch restoring the plan's version fields and
    pinning the app (by the commit's author; `reason` defaults to the rollback itself)."""
    env = environment(workspace.project(), plan.env)
    result = RollbackResult(plan=plan, commit=None)
    pin = Pin(
        by=author.name,
        reason=reason or f"rolled back from {plan.current} to {plan.version}",
        at=now(),
    )

    def restore(root: Path) -> None:
        apps = {a.name: a for a in discover(root, env.path).apps}
        if plan.app not in apps:
            raise PromotionError(f"{env.name} has no app {plan.app!r} any more")
        changes = plan_copy(plan.restore, read_app_version(root, apps[plan.app]))
        result.fields = [
            f"{c.field.label} {c.field.field}: {c.field.value} → {c.new}" for c in changes
        ]
        apply_changes(root, changes)
        result.pinned = pin_app(root, apps[plan.app], pin)
        result.pin = pin if result.pinned else None

    result.commit = commit_and_push(
        workspace.checkout(env.branch),
        restore,
        message=(
            f"Roll back {plan.app} in {plan.env} to {plan.version} (was {plan.current}; "
            f"as of {plan.revision[:12]})\n\n{change_trailer('rollback')}"
        ),
        author=author,
        retry=retry,
    )
    return result


def rollback_in_repo(
    repo: str,
    workdir: Path,
    *,
    env: str,
    app: str,
    to: str | None,
    author: Author,
    reason: str | None = None,
    branch: str | None = None,
) -> RollbackResult:
    """`conveyor rollback` and the dashboard's Roll back: plan from the app's history and
    commit the restored version, pinned (applying it is the caller's next step)."""
    workspace = Workspace(repo, workdir, branch=branch)
    plan = plan_rollback(workspace, env, app, to=to)
    return write_rollback(workspace, plan, author=author, reason=reason)
