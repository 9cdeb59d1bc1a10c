"""Candidate branches per push, the CI side of cal-itp's release channels.

A push to branch X renders `candidates/X`: one commit holding only the deployable paths
of X's head, whose parent is the head of `releases/prod`, force-pushed. A pull request
from `candidates/X` to `releases/<channel>` is reviewed with the channel's diff: what
merging it changes in the environment that lives on that branch, rendered offline as
`conveyor diff --base/--head` renders a pull request. Merging it deploys, through that
environment's agent. When X is deleted, `prune` removes `candidates/X`.

Their own glue lost branches named `feat/x`; here a branch name is only ever a ref (and
checked as one, `config/names.py`), so `candidates/feat/x` is as good as any. The
channels are the `calitp.channel` names of the channel files (promote/channels.py reads
them), or, without channel files, the environments of conveyor.yaml on `releases/*`.
A candidate names its source branch in a trailer: prune only removes branches it
rendered, never a `promote --mode branch` candidate that has no source branch.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.config.channel import load_channel
from conveyor.config.names import UnsafeValueError, git_ref
from conveyor.config.project import FILE_NAME, Environment, Project, load_project
from conveyor.config.project import safe_relative_path as inside_repo
from conveyor.promote.offline_diff import diff_revisions
from conveyor.promote.pipeline import PromotionError
from conveyor.promote.promotion import CANDIDATES
from conveyor.reconcile.plan import PlanDiff, render_markdown
from conveyor.render.helm import HelmCLI
from conveyor.source.git import (
    Author,
    Checkout,
    PushRaceLost,
    RetryPolicy,
    commit_paths,
    mask_url,
    merge_commit,
    read_commit,
    remote_heads,
)

RELEASES = "releases/"
CHANNELS_DIR = "channels"
BASE_CHANNEL = "prod"
SOURCE_TRAILER = "Conveyor-Candidate-Of"
_SOURCE = re.compile(rf"^{SOURCE_TRAILER}:\s*(\S+)\s*$", re.MULTILINE)


def source_branch(name: str) -> str:
    """A branch a candidate may be rendered from: a valid ref, neither a candidate nor a
    release branch itself. PromotionError otherwise."""
    try:
        name = git_ref(name.removeprefix("refs/heads/"), what="branch")
    except UnsafeValueError as error:
        raise PromotionError(str(error)) from None
    if name.startswith((CANDIDATES, RELEASES)):
        raise PromotionError(
            f"branch {name!r} is a candidate or release branch; candidates are rendered "
            "from the branches people push"
        )
    return name


def candidate_branch(source: str) -> str:
    return CANDIDATES + source_branch(source)


def release_branch(channel: str) -> str:
    try:
        return RELEASES + git_ref(channel, what="channel")
    except UnsafeValueError as error:
        raise PromotionError(str(error)) from None


def channel_files(root: Path, channels_dir: str) -> list[Path]:
    folder = root / channels_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def channel_names(root: Path, project: Project, *, channels_dir: str = CHANNELS_DIR) -> list[str]:
    """The channels of the tree at `root`: its channel files' names, else the
    environments of conveyor.yaml that live on a `releases/` branch."""
    files = channel_files(root, channels_dir)
    if files:
        return [load_channel(path).channel for path in files]
    return [
        env.branch.removeprefix(RELEASES)
        for env in project.environments
        if env.branch.startswith(RELEASES)
    ]


def channel_environment(project: Project, channel: str) -> Environment:
    """The environment that lives on `releases/<channel>`: its agent deploys a merge."""
    branch = release_branch(channel)
    for env in project.environments:
        if env.branch == branch:
            return env
    known = ", ".join(f"{e.name} ({e.branch})" for e in project.environments) or "none"
    raise PromotionError(
        f"{FILE_NAME} has no environment on {branch} (environments: {known}); declare "
        f"the channel's environment with `branch: {branch}`"
    )


def deployable_paths(root: Path, *, channels_dir: str = CHANNELS_DIR) -> list[str]:
    """What a candidate holds unless `--paths` says: conveyor.yaml, the channel files and
    every chart, values file and kustomization they name, and the folders of the
    environments on `releases/` branches. Paths below another one are left out."""
    project = load_project(root)
    found = [FILE_NAME] if (root / FILE_NAME).is_file() else []
    files = channel_files(root, channels_dir)
    if files:
        found.append(inside_repo(channels_dir))
    for path in files:
        for release in load_channel(path).releases:
            named = [release.helm_chart, release.kustomize_dir, *release.helm_values]
            found.extend(p for p in named if p is not None)
    found.extend(e.path for e in project.environments if e.branch.startswith(RELEASES))
    return _outermost([p for p in found if (root / p).exists()])


def _outermost(paths: list[str]) -> list[str]:
    chosen: list[str] = []
    for path in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if path == "." or not any(c == "." or path.startswith(c + "/") for c in chosen):
            chosen.append(path)
    return ["."] if "." in chosen else sorted(chosen)


def _checked_paths(root: Path, paths: list[str], source: str) -> list[str]:
    checked = []
    for path in paths:
        try:
            relative = inside_repo(path)
        except ValueError as error:
            raise PromotionError(f"--paths: {error}") from None
        if not (root / relative).exists():
            raise PromotionError(f"--paths: {relative} does not exist in {source}")
        checked.append(relative)
    return _outermost(checked)


@dataclass
class RenderedCandidate:
    branch: str  # candidates/<source>
    source: str
    source_commit: str
    base: str  # releases/<base channel>
    parent: str | None  # the base's head the candidate was made on; None if no base yet
    paths: list[str]
    commit: str
    changed: bool  # False: the branch held this already, nothing was pushed

    def to_dict(self) -> dict[str, Any]:
        return {
            "branch": self.branch,
            "source": self.source,
            "sourceCommit": self.source_commit,
            "base": self.base,
            "parent": self.parent,
            "paths": self.paths,
            "commit": self.commit,
            "changed": self.changed,
        }


def _message(source: str, head: str, base: str, parent: str | None, paths: list[str]) -> str:
    onto = f"{base} at {parent[:12]}" if parent else f"nothing ({base} does not exist yet)"
    return (
        f"Release candidate: {source}\n\n"
        f"The deployable paths of {source} at {head[:12]} ({', '.join(paths)}), onto {onto}.\n\n"
        f"{SOURCE_TRAILER}: {source}\n"
        f"Source-Commit: {head}\n"
    )


def render_candidate(
    url: str,
    source: str,
    *,
    workdir: Path,
    author: Author,
    paths: list[str] | None = None,
    base_channel: str = BASE_CHANNEL,
    channels_dir: str = CHANNELS_DIR,
    retry: RetryPolicy | None = None,
) -> RenderedCandidate:
    """Render `candidates/<source>` from the head of `source` and push it (replacing what
    was there). PromotionError for a bad request, nothing pushed; PushRaceLost when the
    candidate branch kept moving under us."""
    source = source_branch(source)
    branch, base = CANDIDATES + source, release_branch(base_channel)
    checkout = Checkout.open(url, workdir / "source", branch=source)
    policy = retry or RetryPolicy()
    for attempt in range(policy.attempts):
        head = checkout.sync() if attempt else checkout.head()
        if head is None:
            raise PromotionError(f"branch {source!r} does not exist in {mask_url(url)}")
        chosen = (
            _checked_paths(checkout.path, paths, source)
            if paths
            else deployable_paths(checkout.path, channels_dir=channels_dir)
        )
        if not chosen:
            raise PromotionError(
                f"{source} has no deployable paths: give --paths, or declare the channels "
                f"(channel files in {channels_dir}/, or environments on {RELEASES}<channel> "
                f"branches in {FILE_NAME})"
            )
        parent = checkout.fetch(base)
        seen = checkout.fetch(branch)
        message = _message(source, head, base, parent, chosen)
        commit = commit_paths(
            checkout.path, head, chosen, parent=parent, message=message, author=author
        )
        result = RenderedCandidate(branch, source, head, base, parent, chosen, commit, True)
        if seen is not None:
            new, old = read_commit(checkout.path, commit), read_commit(checkout.path, seen)
            if (new.tree, new.parents) == (old.tree, old.parents):
                result.commit, result.changed = seen, False
                return result
        if checkout.replace_with(commit, branch, seen=seen):
            return result
        time.sleep(policy.delay(attempt))
    raise PushRaceLost(f"{branch} kept moving in {mask_url(url)}; try again")


@dataclass
class CandidateDiff:
    branch: str
    release: str
    environment: str
    base: str  # the release branch's head
    merge: str  # what merging the candidate into it makes
    plans: list[PlanDiff] = field(default_factory=list)
    markdown: str = ""


async def diff_candidate(
    url: str,
    source: str,
    channel: str,
    *,
    workdir: Path,
    helm: HelmCLI,
    author: Author,
    channels_dir: str = CHANNELS_DIR,
) -> CandidateDiff:
    """What merging `candidates/<source>` into `releases/<channel>` changes in the
    channel's environment: its folder rendered offline at the release branch's head and
    at the merge (as a pull request's merge), object by object, Secrets masked.
    PromotionError for an unknown channel or branch; MergeConflict when it does not
    merge."""
    branch, release = candidate_branch(source), release_branch(channel)
    checkout = Checkout.open(url, workdir / "candidate", branch=branch)
    head = checkout.head()
    if head is None:
        raise PromotionError(
            f"{branch} does not exist in {mask_url(url)} (conveyor candidates render "
            f"--branch {source} makes it)"
        )
    project = load_project(checkout.path)
    known = channel_names(checkout.path, project, channels_dir=channels_dir)
    if channel not in known:
        raise PromotionError(
            f"{branch} has no channel {channel!r} (channels: {', '.join(known) or 'none'})"
        )
    env = channel_environment(project, channel)
    base = checkout.fetch(release)
    if base is None:
        raise PromotionError(f"{release} does not exist in {mask_url(url)}")
    merge = merge_commit(
        checkout.path, base, head, message=f"Merge {branch} into {release}", author=author
    )
    plans, _ = await diff_revisions(
        checkout.path, base, merge, env=None, path=env.path, helm=helm, workdir=workdir / "diff"
    )
    title = f"{branch} into {release} (environment {env.name}, {env.path}/)"
    return CandidateDiff(
        branch, release, env.name, base, merge, plans, render_markdown(plans, title=title)
    )


@dataclass
class PruneResult:
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # "branch: why"

    def to_dict(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "kept": self.kept}


def prune_candidates(url: str, *, workdir: Path, dry_run: bool = False) -> PruneResult:
    """Delete every candidate branch this module rendered whose source branch is gone;
    one that moved meanwhile (a new push re-rendered it) is kept."""
    heads = remote_heads(url)
    result = PruneResult()
    orphans = {
        name: sha
        for name, sha in sorted(heads.items())
        if name.startswith(CANDIDATES) and name.removeprefix(CANDIDATES) not in heads
    }
    if not orphans:
        return result
    checkout = Checkout.open(url, workdir / "candidates", branch=next(iter(orphans)))
    for name, sha in orphans.items():
        source = name.removeprefix(CANDIDATES)
        fetched = checkout.fetch(name)
        if fetched is None:
            continue  # deleted by someone else meanwhile
        rendered_from = _SOURCE.search(read_commit(checkout.path, fetched).message)
        if rendered_from is None or rendered_from.group(1) != source:
            result.kept.append(f"{name}: not rendered from a branch (a promotion's, kept)")
        elif dry_run:
            result.deleted.append(name)
        elif fetched == sha and checkout.delete_branch(name, seen=sha):
            result.deleted.append(name)
        else:
            result.kept.append(f"{name}: moved while pruning (kept)")
    return result
