"""`conveyor notes`: what changed in an app between two versions, as release notes.

The pull requests merged in between (merge commits "Merge pull request #N from
owner/branch", whose second line is the title, and squash merges "Title (#N)"), then
the commits pushed directly, in markdown: the notes Unileaf accepted from GitHub by
hand when tagging a release, available for any two refs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from conveyor.promote.pipeline import PromotionError
from conveyor.source.git import GitError, LogEntry, log_entries, resolve_revision

_VERSION = re.compile(r"^v?\d+\.\d+\.\d+")
_MERGE = re.compile(r"^Merge pull request #(\d+) from (\S+)")
_SQUASH = re.compile(r"^(.+) \(#(\d+)\)$")


@dataclass(frozen=True)
class PullRequest:
    number: int
    title: str
    branch: str | None
    sha: str


@dataclass(frozen=True)
class ReleaseNotes:
    base: str
    head: str
    base_sha: str
    head_sha: str
    pulls: list[PullRequest]
    commits: list[LogEntry]


def _commit_of(repo: Path, ref: str, *, option: str) -> str:
    """The commit a version names: as given, else with or without its `v`, since tags are
    spelled both ways (`1.4.2`, `v1.4.2`). PromotionError naming what was tried."""
    spellings = [ref]
    if _VERSION.match(ref):
        spellings.append(ref[1:] if ref.startswith("v") else f"v{ref}")
    for spelling in spellings:
        try:
            return resolve_revision(repo, spelling)
        except GitError:
            continue
    tried = " nor ".join(repr(s) for s in spellings)
    raise PromotionError(f"{option}: unknown revision {tried} (no such tag, branch or commit)")


def release_notes(repo: Path, base: str, head: str) -> ReleaseNotes:
    """Oldest first. PromotionError when a ref names no commit, or when `base` comes
    after `head` (swapped, which would otherwise read as "no changes")."""
    base_sha = _commit_of(repo, base, option="--from")
    head_sha = _commit_of(repo, head, option="--to")
    forward = log_entries(repo, base_sha, head_sha, first_parent=True)
    if not forward and base_sha != head_sha and log_entries(repo, head_sha, base_sha):
        raise PromotionError(
            f"--from {base} is later than --to {head}: swap them (--from {head} --to {base})"
        )
    pulls: list[PullRequest] = []
    commits: list[LogEntry] = []
    for entry in reversed(forward):
        if merge := _MERGE.match(entry.subject):
            title = entry.body.splitlines()[0].strip() if entry.body else merge.group(2)
            pulls.append(PullRequest(int(merge.group(1)), title, merge.group(2), entry.sha))
        elif squash := _SQUASH.match(entry.subject):
            pulls.append(PullRequest(int(squash.group(2)), squash.group(1), None, entry.sha))
        elif not entry.merge:
            commits.append(entry)
    return ReleaseNotes(base, head, base_sha, head_sha, pulls, commits)


def render_notes(notes: ReleaseNotes) -> str:
    out = [f"## Changes from {notes.base} to {notes.head}\n"]
    if not notes.pulls and not notes.commits:
        out.append(f"\nNo changes between {notes.base} and {notes.head}.\n")
        return "".join(out)
    if notes.pulls:
        out.append("\n### Pull requests\n\n")
        for pull in notes.pulls:
            branch = f" ({pull.branch})" if pull.branch else ""
            out.append(f"- #{pull.number} {pull.title}{branch}\n")
    if notes.commits:
        out.append("\n### Commits\n\n")
        out.extend(f"- {c.sha[:7]} {c.subject} ({c.author})\n" for c in notes.commits)
    out.append(
        f"\n{len(notes.pulls)} pull requests, {len(notes.commits)} other commits "
        f"({notes.base_sha[:7]}..{notes.head_sha[:7]})\n"
    )
    return "".join(out)
