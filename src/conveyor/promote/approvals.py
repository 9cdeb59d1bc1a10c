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
from pydantic import BaseModel, ConfigDict, Field

from conveyor.config.userfile import UserFileError, load_document, read_text, validate
from conveyor.promote.pipeline import Workspace, environment
from conveyor.promote.versions import check_version
from conveyor.reconcile.status import now
from conveyor.source.git import Author, Checkout, RetryPolicy, commit_and_push

FOLDER = "approvals"


def approval_path(env: str, version: str) -> str:
    return f"{FOLDER}/{env}/{check_version(version)}.yaml"


class _Approval(BaseModel):
    model_config = ConfigDict(extra="allow")

    by: str | None = None  # an entry without one is no approval
    at: str | None = None


class _ApprovalFile(BaseModel):
    """An approvals file as `approve` writes it; fields added by hand are kept."""

    model_config = ConfigDict(extra="allow")

    environment: str | None = None
    version: str | None = None
    approvals: list[_Approval] = Field(default_factory=list)


def _load(root: Path, relative: str) -> dict[str, Any]:
    """The data of `relative` in the checkout at `root` ({} when absent); UserFileError
    naming it as in the repository when it is not an approvals file."""
    path = root / relative
    if not path.is_file():
        return {}
    document = load_document(read_text(path, file=relative), file=relative)
    if document is None or not document.data:
        return {}
    validate(_ApprovalFile, document.data, file=relative, node=document.node)
    data: dict[str, Any] = document.data
    return data


def approvers(root: Path, env: str, version: str) -> list[str]:
    """Who approved `version` for `env`, in the order they did, each once (nobody, when
    the file is not an approvals file: a gate stays closed rather than guess)."""
    try:
        entries = _load(root, approval_path(env, version)).get("approvals") or []
    except UserFileError:
        return []
    return list(dict.fromkeys(str(e["by"]) for e in entries if e.get("by")))


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
        data = _load(root, relative) or {"environment": env, "version": version, "approvals": []}
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
