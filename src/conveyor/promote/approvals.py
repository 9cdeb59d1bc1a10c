"""Approvals kept in git: `approvals/<env>/<version>.yaml` on the environment's branch.

In git, an approval is reviewed, attributed and kept like any other change, and the
agent sees it arrive as a new revision of the branch it already follows.

    environment: production
    version: 1.4.0
    approvals:
      - by: alice
        at: "2025-01-31T10:00:00Z"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conveyor.config.userfile import UserFileError, load_yaml, read_text
from conveyor.promote.pipeline import Workspace, environment
from conveyor.promote.versions import check_version
from conveyor.reconcile.status import now
from conveyor.source.git import Author, Checkout, RetryPolicy, commit_and_push

FOLDER = "approvals"


def approval_path(env: str, version: str) -> str:
    return f"{FOLDER}/{env}/{check_version(version)}.yaml"


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = load_yaml(read_text(path), file=str(path))
    except UserFileError:
        return {}  # a file that does not read records no approval
    return loaded if isinstance(loaded, dict) else {}


def approvers(root: Path, env: str, version: str) -> list[str]:
    """Who approved `version` for `env`, in the order they did, each once."""
    entries = _load(root / approval_path(env, version)).get("approvals") or []
    names = [str(e.get("by")) for e in entries if isinstance(e, dict) and e.get("by")]
    return list(dict.fromkeys(names))


def approve(
    checkout: Checkout,
    *,
    env: str,
    version: str,
    by: str,
    author: Author,
    retry: RetryPolicy | None = None,
) -> str | None:
    """Record `by`'s approval in one commit on the checkout's branch; None when `by` had
    approved already (no empty commit)."""
    relative = approval_path(env, version)

    def record(root: Path) -> None:
        path = root / relative
        data = _load(path) or {"environment": env, "version": version, "approvals": []}
        entries = data.setdefault("approvals", [])
        if by in approvers(root, env, version):
            return
        entries.append({"by": by, "at": now()})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    return commit_and_push(
        checkout,
        record,
        message=f"Approve {version} for {env} (by {by})",
        author=author,
        retry=retry,
    )


def approve_in_repo(
    repo: str, workdir: Path, *, env: str, version: str, by: str, author: Author
) -> tuple[str, str | None]:
    """`conveyor approve` and the dashboard's Approve: record the approval on the
    environment's branch. Returns (branch, commit or None when already approved)."""
    workspace = Workspace(repo, workdir)
    target = environment(workspace.project(), env)
    commit = approve(
        workspace.checkout(target.branch),
        env=target.name,
        version=check_version(version),
        by=by,
        author=author,
    )
    return target.branch, commit
