"""Which candidate each app of a sandbox comes from, and the sandbox's ID.

`api/42` is the api's pull request 42 (`refs-pull-42-merge.yaml`), `ui/my-branch` a
branch (`refs-heads-my-branch.yaml`; `feat/x` works too), a bare `api` or an app not
named its default branch. IDs follow Cellenics' rules: at most 26 characters of
`^[a-z0-9][-a-z0-9]*[a-z0-9]$`, unique in the environment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from conveyor.config.names import UnsafeValueError, git_ref
from conveyor.config.project import SANDBOX_ID_MAX, SANDBOX_ID_PATTERN, Sandboxes
from conveyor.errors import ConveyorError
from conveyor.publish.version import ref_id

_PULL = re.compile(r"^refs/pull/(\d+)/merge$")


class SandboxError(ConveyorError, ValueError):
    """A sandbox cannot be staged or removed as asked; nothing was written."""


@dataclass(frozen=True)
class Choice:
    """One app of a sandbox and the git ref its candidate was built from."""

    app: str
    ref: str  # refs/pull/42/merge, refs/heads/my-branch
    named: bool  # on the command line (else the default branch)

    @property
    def ref_id(self) -> str:
        return ref_id(self.ref)

    @property
    def pull_request(self) -> int | None:
        match = _PULL.match(self.ref)
        return int(match.group(1)) if match else None

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def follows(self) -> str:
        """The chart ref an unpinned app follows: its branch, or its pull request's ref."""
        return self.branch or self.ref

    def label(self) -> str:
        """`api/42`, `ui/my-branch`."""
        number = self.pull_request
        return f"{self.app}/{number}" if number is not None else f"{self.app}/{self.branch}"

    def candidate(self, config: Sandboxes) -> str:
        """The candidate's file in the config repo."""
        return f"{config.candidates}/{self.app}/{self.ref_id}.yaml"


def parse_choices(specs: Sequence[str], config: Sandboxes) -> list[Choice]:
    """One choice per app of `config.apps`, in that order: as `specs` name it, else from
    the default branch. An unknown app, an app named twice or a branch git would refuse
    is a SandboxError."""
    named: dict[str, str] = {}
    for spec in specs:
        app, _, which = spec.partition("/")
        if app not in config.apps:
            raise SandboxError(
                f"{spec!r}: unknown app {app!r} (sandbox apps: {', '.join(config.apps)})"
            )
        if app in named:
            raise SandboxError(f"{spec!r}: {app} is already taken from {named[app]}")
        if which.isdigit():
            ref = f"refs/pull/{int(which)}/merge"
        else:
            branch = which or config.default_branch
            try:
                git_ref(branch, what=f"{spec!r}: branch")
            except UnsafeValueError as error:
                raise SandboxError(str(error)) from None
            ref = f"refs/heads/{branch}"
        named[app] = ref
    return [
        Choice(app, named.get(app, f"refs/heads/{config.default_branch}"), app in named)
        for app in config.apps
    ]


def check_id(sandbox_id: str) -> str:
    """`sandbox_id` when it follows the rules; SandboxError saying which one it breaks."""
    if len(sandbox_id) > SANDBOX_ID_MAX:
        raise SandboxError(
            f"sandbox ID {sandbox_id!r} is {len(sandbox_id)} characters long; at most "
            f"{SANDBOX_ID_MAX} are allowed"
        )
    if not re.match(SANDBOX_ID_PATTERN, sandbox_id):
        raise SandboxError(
            f"sandbox ID {sandbox_id!r} must be lower-case letters, digits and '-', starting "
            f"and ending with a letter or digit ({SANDBOX_ID_PATTERN})"
        )
    return sandbox_id


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_id(user: str, choices: Sequence[Choice], *, taken: Collection[str]) -> str:
    """An ID from the user's name and the refs named (`alice-api42-ui-my-branch`); a
    digest of the refs when that is too long, and `-2`, `-3`... when it is taken (two
    people staging the same refs, or one person twice)."""
    refs = [
        f"{c.app}{c.pull_request}" if c.pull_request is not None else f"{c.app}-{c.branch}"
        for c in choices
        if c.named
    ]
    person = _slug(user)[:12].strip("-") or "sandbox"
    base = _slug("-".join([person, *refs]))
    if len(base) > SANDBOX_ID_MAX:
        digest = hashlib.sha256(" ".join(refs).encode()).hexdigest()[:8]
        base = f"{person}-{digest}"
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        suffix = f"-{number}"
        candidate = base[: SANDBOX_ID_MAX - len(suffix)].rstrip("-") + suffix
    return candidate
