"""`conveyor hotfix start`: a branch from the last release tag, for a fix that cannot
wait for main (main has moved on with changes not ready for production).

Unileaf did this by hand: branch from the tag, fix, tag a new semver release on that
branch, then build and deploy it through staging and production manually. Here the
branch is made from the tag, and the fixed version goes through the same `promote`
commands and gates as any release (`promote --to staging --version vX.Y.Z+1`, then
`promote --from staging --to production`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from conveyor.promote.pipeline import PromotionError
from conveyor.source.git import GitError, create_branch, push_branch, resolve_revision

_SEMVER = re.compile(r"^(v?)(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class Hotfix:
    branch: str
    tag: str
    commit: str
    next_version: str | None  # the patch release the fix will likely be
    pushed: bool


def next_patch(tag: str) -> str | None:
    match = _SEMVER.match(tag)
    if match is None:
        return None
    prefix, major, minor, patch = match.groups()
    return f"{prefix}{major}.{minor}.{int(patch) + 1}"


def start_hotfix(repo: Path, tag: str, *, push: bool = False) -> Hotfix:
    """Create `hotfix/<tag>` at the tag (the working tree is left alone). PromotionError
    when the tag does not exist or the branch does already; GitError when pushing fails."""
    try:
        commit = resolve_revision(repo, f"refs/tags/{tag}")
    except GitError:
        raise PromotionError(f"no tag {tag!r} in {repo}") from None
    branch = f"hotfix/{tag}"
    try:
        existing = resolve_revision(repo, f"refs/heads/{branch}")
    except GitError:
        existing = None
    if existing is not None:
        raise PromotionError(f"branch {branch} exists already (at {existing[:12]})")
    create_branch(repo, branch, commit)
    if push:
        push_branch(repo, branch)
    return Hotfix(branch, tag, commit, next_patch(tag), push)
