"""Repository policy for the config repo: only the CI identity changes release files.

Cellenics closed pull requests that touched anything but documentation with a comment
pointing to the README. This judges every commit between two revisions (not only the
net diff, so a later push that adds a protected file and one that adds and removes it
are both caught) against the `guard` section of `conveyor.yaml` as it is at the base,
so a pull request cannot loosen the policy that judges it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path

from conveyor.config.project import FILE_NAME, Guard, parse_project
from conveyor.errors import ConveyorError
from conveyor.source.git import (
    GitError,
    commits_between,
    paths_changed,
    read_file_at,
    resolve_revision,
)


class GuardError(ConveyorError, ValueError):
    """A revision does not exist or the policy file is malformed."""


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """`**` spans folders (`**/*.md` includes `README.md`), `*` and `?` stay in one."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def path_matches(pattern: str, path: str) -> bool:
    return _glob(pattern).fullmatch(path) is not None


@dataclass(frozen=True)
class Violation:
    """A protected file changed by someone the policy does not allow."""

    path: str
    rule: str
    identities: tuple[str, ...]
    commits: tuple[str, ...]


@dataclass(frozen=True)
class GuardReport:
    base: str
    head: str
    policy: Guard
    commits: int
    files: tuple[str, ...]
    violations: tuple[Violation, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return not self.violations


def _protecting_rule(policy: Guard, path: str) -> str | None:
    """The protected glob that covers `path`, unless an `allow` glob exempts it."""
    if any(path_matches(p, path) for p in policy.allow):
        return None
    return next((p for p in policy.protected if path_matches(p, path)), None)


def _may_change(policy: Guard, names: tuple[str, ...]) -> bool:
    return any(fnmatchcase(n, pattern) for n in names for pattern in policy.identities)


def check(repo: Path, base: str, head: str, *, actor: str | None = None) -> GuardReport:
    """Judge every change from `base` to `head`. With `actor` (the pull request's author
    or the pusher), that identity is judged; without it, each commit's author."""
    try:
        base_sha = resolve_revision(repo, base)
        head_sha = resolve_revision(repo, head)
    except GitError as error:
        raise GuardError(f"{repo}: unknown revision: {error.stderr or error}") from None
    text = read_file_at(repo, base_sha, FILE_NAME)
    policy = parse_project(text, source=f"{base}:{FILE_NAME}").guard if text else Guard()
    commits = commits_between(repo, base_sha, head_sha)
    # (identity shown, names matched against the policy, commit) per changed path.
    changes: dict[str, list[tuple[str, tuple[str, ...], str]]] = {}
    for commit in commits:
        shown = actor or f"{commit.author_name} <{commit.author_email}>"
        names = (actor,) if actor else (commit.author_name, commit.author_email)
        for path in commit.paths:
            changes.setdefault(path, []).append((shown, names, commit.sha))
    # A merge can bring changes no single commit's own diff shows: judge the net diff too.
    last = commits[-1] if commits else None
    for path in paths_changed(repo, base_sha, head_sha):
        if path not in changes and last is not None:
            shown = actor or f"{last.author_name} <{last.author_email}>"
            names = (actor,) if actor else (last.author_name, last.author_email)
            changes[path] = [(shown, names, last.sha)]
    violations = []
    for path, by in sorted(changes.items()):
        rule = _protecting_rule(policy, path)
        offending = [(shown, sha) for shown, names, sha in by if not _may_change(policy, names)]
        if rule is not None and offending:
            violations.append(
                Violation(
                    path=path,
                    rule=rule,
                    identities=tuple(dict.fromkeys(shown for shown, _ in offending)),
                    commits=tuple(dict.fromkeys(sha for _, sha in offending)),
                )
            )
    return GuardReport(
        base=base,
        head=head,
        policy=policy,
        commits=len(commits),
        files=tuple(sorted(changes)),
        violations=tuple(violations),
    )


def _who(violation: Violation) -> str:
    shas = ", ".join(sha[:7] for sha in violation.commits)
    return f"{', '.join(violation.identities)} ({shas})"


def format_text(report: GuardReport) -> str:
    lines = [
        f"{len(report.files)} file(s) changed in {report.commits} commit(s) "
        f"from {report.base} to {report.head}"
    ]
    allowed = ", ".join(report.policy.identities) or "no one but direct pushes"
    for v in report.violations:
        lines.append(
            f"{v.path}: protected by {v.rule!r}; changed by {_who(v)}, "
            f"who may not change it (allowed: {allowed})"
        )
    if report.allowed:
        lines.append("allowed: no protected file changed by a disallowed identity")
    return "\n".join(lines)


def format_markdown(report: GuardReport) -> str:
    """A pull-request comment, as the Cellenics config repo posts when it closes one."""
    if report.allowed:
        return "**conveyor guard:** no protected files changed; this pull request may proceed.\n"
    exceptions = ", ".join(f"`{p}`" for p in report.policy.allow) or "none"
    lines = [
        "**conveyor guard: this pull request changes files that only CI may change.**",
        "",
        "This repository is populated automatically by the CI pipelines of each app; "
        f"see the [README]({report.policy.readme}) for how a release reaches it. "
        f"Changes to documentation ({exceptions}) are welcome.",
        "",
        "| File | Protected by | Changed by |",
        "| --- | --- | --- |",
    ]
    for v in report.violations:
        lines.append(f"| `{v.path}` | `{v.rule}` | {_who(v)} |")
    return "\n".join(lines) + "\n"
