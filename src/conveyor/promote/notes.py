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

from conveyor.source.git import LogEntry, log_entries, resolve_revision

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


def release_notes(repo: Path, base: str, head: str) -> ReleaseNotes:
    """Oldest first. GitError when a ref names no commit."""
    base_sha, head_sha = resolve_revision(repo, base), resolve_revision(repo, head)
    pulls: list[PullRequest] = []
    commits: list[LogEntry] = []
    for entry in reversed(log_entries(repo, base_sha, head_sha, first_parent=True)):
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
