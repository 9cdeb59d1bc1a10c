"""What the agent does for sandboxes, as the environment's one writer: expiry and auto mode.

Both act only through git: an expired sandbox is unstaged by a commit, and with
`sandboxes.auto: true` a new `refs-pull-<N>-merge.yaml` candidate is staged as sandbox
`pr-<N>-<app>`, restaged when that candidate changes and unstaged when it is removed,
each a commit whose message says why. The next pass then applies the commit like any
other, so nothing in the cluster ever changes behind git's back. Deciding needs only the
checkout the agent already fetched; a Workspace of its own is opened only to commit.
The agent runs no hooks (see hooks.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from conveyor.config.project import Sandboxes
from conveyor.promote.pipeline import Workspace
from conveyor.sandboxes.candidates import SandboxError, parse_choices
from conveyor.sandboxes.manifest import candidates_digest, read_candidates, read_sandboxes
from conveyor.sandboxes.stage import StageRequest, now, parse_time, stage, unstage
from conveyor.source.git import Author

log = logging.getLogger("conveyor.sandboxes")
AGENT = Author(name="conveyor", email="conveyor@localhost")
_PULL_CANDIDATE = re.compile(r"^refs-pull-(\d+)-merge\.yaml$")


@dataclass(frozen=True)
class Action:
    """One commit the agent is to make: `stage` (new or changed) or `unstage`."""

    kind: str  # stage | restage | expire | unstage
    sandbox_id: str
    spec: str = ""  # `api/42` for a stage
    why: str = ""


def auto_id(app: str, number: int) -> str:
    return f"pr-{number}-{app}"


def pull_request_candidates(root: Path, config: Sandboxes) -> dict[str, str]:
    """Sandbox ID → `app/N` for every pull-request candidate in the repository."""
    found = {}
    for app in config.apps:
        folder = root / config.candidates / app
        for path in sorted(folder.glob("refs-pull-*-merge.yaml")) if folder.is_dir() else []:
            match = _PULL_CANDIDATE.match(path.name)
            if match:
                found[auto_id(app, int(match.group(1)))] = f"{app}/{int(match.group(1))}"
    return found


def plan_actions(root: Path, env_path: str, config: Sandboxes, *, at: datetime) -> list[Action]:
    """What the checkout at `root` asks of the agent now."""
    actions = []
    sandboxes = {s.id: s for s in read_sandboxes(root, env_path)}
    for sandbox in sandboxes.values():
        expires = parse_time(sandbox.expires_at)
        if expires is not None and expires <= at:
            why = f"expired at {sandbox.expires_at}, staged by {sandbox.staged_by or 'unknown'}"
            actions.append(Action("expire", sandbox.id, why=why))
    expiring = {a.sandbox_id for a in actions}
    if not config.auto:
        return actions
    wanted = pull_request_candidates(root, config)
    for sandbox_id, spec in wanted.items():
        existing = sandboxes.get(sandbox_id)
        if existing is None:
            actions.append(Action("stage", sandbox_id, spec, why=f"new candidate {spec}"))
        elif existing.auto and sandbox_id not in expiring:
            choices = parse_choices([spec], config)
            named = [c for c in choices if c.named]
            try:
                texts = read_candidates(root, named, config)
            except SandboxError:
                continue
            if candidates_digest(texts) != existing.digest:
                actions.append(Action("restage", sandbox_id, spec, why=f"{spec} changed"))
    for sandbox in sandboxes.values():
        if sandbox.auto and sandbox.id not in wanted and sandbox.id not in expiring:
            actions.append(Action("unstage", sandbox.id, why="its candidate was removed"))
    return actions


def run_housekeeping(
    url: str,
    workdir: Path,
    *,
    env: str,
    env_path: str,
    checkout_root: Path,
    config: Sandboxes,
) -> list[str]:
    """Carry out what `plan_actions` finds in the agent's checkout; the commits made.
    A sandbox that cannot be staged (a default-branch candidate missing) is logged and
    left for the next pass."""
    actions = plan_actions(checkout_root, env_path, config, at=now())
    if not actions:
        return []
    workspace = Workspace(url, workdir)
    commits = []
    for action in actions:
        try:
            if action.kind in ("expire", "unstage"):
                result = unstage(
                    workspace,
                    [action.sandbox_id],
                    env=env,
                    author=AGENT,
                    reason=action.why,
                    hooks=False,
                )
                commit = result.commit
            else:
                staged = stage(
                    workspace,
                    StageRequest(
                        specs=[action.spec],
                        user="conveyor",
                        sandbox_id=action.sandbox_id,
                        env=env,
                        auto=True,
                        replace=action.kind == "restage",
                        reason=action.why,
                    ),
                    author=AGENT,
                    hooks=False,
                )
                commit = staged.commit
        except SandboxError as error:
            log.warning("sandbox %s: %s: %s", action.sandbox_id, action.kind, error)
            continue
        log.info("sandbox %s: %s (%s): %s", action.sandbox_id, action.kind, action.why, commit)
        if commit:
            commits.append(commit)
    return commits
