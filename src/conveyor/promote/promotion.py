"""`conveyor promote`: the version running in one environment, into the next one.

Only what identifies a release moves (image tags, chart version or ref); the target
keeps its own namespace, replicas and roles. The target's gates are checked first and
nothing is written while one is closed. Then either one commit on the target's branch
(`commit`), or a `candidates/<name>` branch with the rendered diff for review
(`branch`). `--version` puts an exact version in any environment through the same path,
which is also how a hotfix or an arbitrary version for testing is deployed.
A promotion lifts the pin a rollback left on the apps it writes (`keep_pin` keeps it):
a person choosing the next version is the person lifting the hold.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from conveyor.config.project import Environment
from conveyor.errors import ConveyorError
from conveyor.images.pins import Pin
from conveyor.promote.gates import GateContext, GateResult, KubeFactory, wait_for_gates
from conveyor.promote.offline_diff import diff_revisions
from conveyor.promote.pinning import app_pin, unpin_app
from conveyor.promote.pipeline import PromotionError, Workspace, environment
from conveyor.promote.versions import (
    AppVersion,
    FieldChange,
    apply_changes,
    check_version,
    plan_copy,
    plan_set,
    read_app_version,
)
from conveyor.reconcile.plan import render_markdown
from conveyor.render.discover import AppSource, discover
from conveyor.render.helm import HelmCLI
from conveyor.source.git import (
    Author,
    RetryPolicy,
    change_trailer,
    commit_and_push,
    commit_to_review_branch,
)

Mode = Literal["commit", "branch"]
CANDIDATES = "candidates/"


@dataclass(frozen=True)
class PromotionRequest:
    repo: str
    target: str
    source: str | None = None
    app: str | None = None
    version: str | None = None
    mode: Mode = "commit"
    candidate: str | None = None  # the branch name under candidates/
    gate_timeout: float | None = None  # overrides every gate's own timeout
    keep_pin: bool = False  # leave a rollback's pin on the promoted apps


@dataclass
class AppPromotion:
    app: str
    path: str
    before: str | None
    after: str | None
    fields: list[str] = field(default_factory=list)  # "field old → new"
    pin: Pin | None = None  # the target's pin on the app before the promotion
    unpinned: bool = False  # the promotion lifted it

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "path": self.path,
            "from": self.before,
            "to": self.after,
            "fields": self.fields,
            "pin": self.pin.to_dict() if self.pin else None,
            "unpinned": self.unpinned,
        }


@dataclass
class PromotionResult:
    source: str | None
    target: str
    apps: list[AppPromotion]
    unchanged: list[str]
    skipped: list[str]  # apps of the source that the target does not have
    gates: list[GateResult] = field(default_factory=list)
    commit: str | None = None
    branch: str | None = None
    diff: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.target,
            "apps": [a.to_dict() for a in self.apps],
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "gates": [g.to_dict() for g in self.gates],
            "commit": self.commit,
            "branch": self.branch,
        }


class GatesClosed(ConveyorError, RuntimeError):
    """A gate of the target stayed closed; nothing was written."""

    def __init__(self, environment: str, results: list[GateResult]) -> None:
        self.results = results
        closed = [r for r in results if not r.open]
        super().__init__(
            f"{environment}: gate {'; gate '.join(f'{r.gate} closed: {r.message}' for r in closed)}"
        )


@dataclass(frozen=True)
class _Selected:
    app: str
    source: AppVersion | None  # what to copy, or None to set `version`


def _target_changes(
    root: Path, target: Environment, selected: _Selected, version: str | None
) -> tuple[AppSource, AppVersion, list[FieldChange]]:
    apps = {a.name: a for a in discover(root, target.path).apps}
    if selected.app not in apps:
        raise PromotionError(f"{target.name} has no app {selected.app!r} any more")
    app = apps[selected.app]
    current = read_app_version(root, app)
    if version is not None:
        return app, current, plan_set(current, version)
    if selected.source is None:
        raise PromotionError(f"no version to give {selected.app}")
    return app, current, plan_copy(selected.source, current)


def _select(
    workspace: Workspace,
    source: Environment | None,
    target: Environment,
    app: str | None,
) -> tuple[list[_Selected], list[str]]:
    target_apps = {a.name for a in workspace.tree(target).apps}
    if app is not None and app not in target_apps:
        known = ", ".join(sorted(target_apps)) or "none"
        raise PromotionError(f"{target.name} has no app {app!r} (has: {known})")
    if source is None:
        names = [app] if app else sorted(target_apps)
        return [_Selected(n, None) for n in names], []
    source_apps = {a.name: a for a in workspace.tree(source).apps}
    if app is not None and app not in source_apps:
        known = ", ".join(sorted(source_apps)) or "none"
        raise PromotionError(f"{source.name} has no app {app!r} (has: {known})")
    root = workspace.env_root(source)
    selected, skipped = [], []
    for name in [app] if app else sorted(source_apps):
        if name not in target_apps:
            skipped.append(name)
            continue
        source_version = read_app_version(root, source_apps[name])
        if source_version.fields:
            selected.append(_Selected(name, source_version))
    return selected, skipped


def candidate_branch(request: PromotionRequest, versions: set[str | None]) -> str:
    if request.candidate:
        name = request.candidate.removeprefix(CANDIDATES)
    else:
        version = request.version or (next(iter(versions)) if len(versions) == 1 else None)
        parts = [request.target, request.app or "all", version or f"from-{request.source}"]
        name = "-".join(p for p in parts if p)
    name = re.sub(r"[^A-Za-z0-9._/-]+", "-", name).strip("-/")
    if not name or ".." in name:
        raise PromotionError(f"invalid candidate branch name {request.candidate!r}")
    return CANDIDATES + name


def _message(request: PromotionRequest, promotions: list[AppPromotion]) -> str:
    listed = ", ".join(f"{p.app} {p.after}" for p in promotions)
    if request.source:
        subject = f"Promote {listed} from {request.source} to {request.target}"
    else:
        subject = f"Deploy {listed} to {request.target}"
    lifted = [
        f"Lifts the pin on {p.app} ({p.pin.describe()})."
        for p in promotions
        if p.pin is not None and not request.keep_pin
    ]
    body = "\n".join(lifted) + "\n\n" if lifted else ""
    # The trailer tells the agent that applies this commit to announce it as `promoted`.
    return f"{subject}\n\n{body}{change_trailer('promotion')}"


async def promote(
    request: PromotionRequest,
    *,
    workspace: Workspace,
    author: Author,
    kube: KubeFactory,
    helm: HelmCLI,
    retry: RetryPolicy | None = None,
    progress: Callable[[str], None] | None = None,
    waiting: Callable[[str], None] | None = None,
) -> PromotionResult:
    """Check the target's gates, then write the promotion. PromotionError for a request
    that cannot be carried out, GatesClosed when a gate stays closed; in both cases
    nothing is written. GitError / PushRaceLost when git fails. `progress` hears each
    step, `waiting` (default: `progress`) each wait on a closed gate."""
    say = progress or (lambda _m: None)
    if request.source is None and request.version is None:
        raise PromotionError("give --from ENV (copy its versions) or --version V")
    if request.source == request.target:
        raise PromotionError("--from and --to name the same environment")
    if request.version is not None:
        request = dataclasses.replace(request, version=check_version(request.version))
    project = workspace.project()
    target = environment(project, request.target)
    source = environment(project, request.source) if request.source else None
    say(f"reading {request.source or 'versions'} and {target.name}")
    selected, skipped = _select(workspace, source, target, request.app)
    root = workspace.env_root(target)
    promotions, unchanged = [], []
    for item in selected:
        app, current, changes = _target_changes(root, target, item, request.version)
        if not changes:
            unchanged.append(item.app)
            continue
        after = request.version or (item.source.version if item.source else None)
        promotions.append(
            AppPromotion(
                app=item.app,
                path=current.path,
                before=current.version,
                after=after,
                fields=[
                    f"{c.field.label} {c.field.field}: {c.field.value} → {c.new}" for c in changes
                ],
                pin=app_pin(root, app),
            )
        )
    result = PromotionResult(request.source, target.name, promotions, unchanged, skipped)
    if not promotions:
        return result
    if request.mode == "branch":
        result.branch = candidate_branch(request, {p.after for p in promotions})
    if target.gates:
        say(f"checking the gates of {target.name}")
        context = GateContext(
            project=project,
            environment=target,
            versions={p.app: p.after or "" for p in promotions},
            approvals_root=root,
            kube=kube,
            version_at=workspace.version_at,
            repository=workspace.url,
        )
        result.gates = await wait_for_gates(
            context, timeout=request.gate_timeout, progress=waiting or say
        )
        if not all(g.open for g in result.gates):
            raise GatesClosed(target.name, result.gates)
    chosen = {p.app: p for p in promotions}

    def write(tree_root: Path) -> None:
        for item in selected:
            if item.app in chosen:
                app, _, changes = _target_changes(tree_root, target, item, request.version)
                apply_changes(tree_root, changes)
                if not request.keep_pin:
                    chosen[item.app].unpinned = bool(unpin_app(tree_root, app))

    checkout = workspace.checkout(target.branch)
    message = _message(request, promotions)
    if request.mode == "commit":
        say(f"committing to {target.branch}")
        result.commit = commit_and_push(
            checkout, write, message=message, author=author, retry=retry
        )
        result.branch = target.branch
        return result
    branch = str(result.branch)
    say(f"writing {branch}")
    result.commit = commit_to_review_branch(
        checkout, write, branch=branch, message=message, author=author
    )
    if result.commit is not None:
        say("rendering the diff")
        plans, _ = await diff_revisions(
            checkout.path,
            f"{result.commit}~1",  # the target's head the candidate was made on
            result.commit,
            env=None,
            path=target.path,
            helm=helm,
            workdir=workspace.root / "diff",
        )
        title = f"{message.splitlines()[0]} ({branch} against {target.branch})"
        result.diff = render_markdown(plans, title=title)
    return result
