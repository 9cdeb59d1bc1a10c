"""Which environment owns an object: the identity conveyor stamps on what it applies.

Clusters are shared by many teams' environments, and two config repos may both have an
environment called `staging`. An environment is therefore identified by its source, the
normalised repository URL, branch and path, plus its name, never by the name alone.
Every ConveyorApp, applied object and Helm release carries that identity as a short
hashed label (for selection) and an annotation with the readable source (for people).
Prune, drift correction and status act only on what carries their own identity; an
object that carries another one is a conflict, refused and named, unless a takeover was
asked for explicitly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

OWNER_LABEL = "conveyor.dev/owner"
SOURCE_ANNOTATION = "conveyor.dev/source"
# On an object in git: take it over from the environment named (its owner id or source).
ADOPT_ANNOTATION = "conveyor.dev/adopt-from"

_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>(?!//).+)$")


def normalise_repository_url(url: str) -> str:
    """One spelling per repository: `https://GitHub.com/org/repo.git`,
    `git@github.com:org/repo` and `ssh://git@github.com/org/repo/` are the same repo.
    Local paths and `file://` URLs become absolute paths."""
    text = url.strip()
    if text.startswith("file://"):
        return str(Path(urlsplit(text).path).resolve())
    if "://" in text:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()
        if parts.port and parts.port not in (22, 80, 443):
            host = f"{host}:{parts.port}"
        path = parts.path
    else:
        scp = _SCP_LIKE.match(text)
        if scp is None or "/" in scp.group("host"):
            return str(Path(text).resolve())
        host, path = scp.group("host").lower(), "/" + scp.group("path")
    path = path.rstrip("/").removesuffix(".git")
    return f"{host}{path}"


@dataclass(frozen=True)
class EnvironmentIdentity:
    """An environment as its source defines it."""

    repository: str  # as normalise_repository_url gives it
    branch: str
    path: str
    name: str

    @classmethod
    def of(cls, repository: str, *, branch: str, path: str, name: str) -> EnvironmentIdentity:
        clean = str(PurePosixPath(path.strip("/") or "."))
        return cls(normalise_repository_url(repository), branch, clean, name)

    @classmethod
    def parse(cls, source: str) -> EnvironmentIdentity | None:
        """The identity whose `source` this is; None if the text is not one."""
        rest, _, name = source.rpartition("#")
        rest, _, path = rest.rpartition(":")
        repository, _, branch = rest.rpartition("@")
        if not (repository and branch and path and name):
            return None
        return cls(repository, branch, path, name)

    @property
    def id(self) -> str:
        """16 hex digits: short enough for a label value, long enough never to collide."""
        text = "\n".join((self.repository, self.branch, self.path, self.name))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def source(self) -> str:
        """The readable form, as conflict messages and `conveyor adopt --from` use it."""
        return f"{self.repository}@{self.branch}:{self.path}#{self.name}"

    def labels(self) -> dict[str, str]:
        return {OWNER_LABEL: self.id}

    def annotations(self) -> dict[str, str]:
        return {SOURCE_ANNOTATION: self.source}

    def matches(self, owner: str) -> bool:
        """`owner` names this environment, by id or by readable source."""
        return owner.strip() in (self.id, self.source)


@dataclass(frozen=True)
class Owner:
    """The environment an object says it belongs to."""

    id: str
    source: str  # readable; empty when only the label survived

    def describe(self) -> str:
        return f"{self.source} (owner {self.id})" if self.source else f"owner {self.id}"

    def named_by(self, text: str) -> bool:
        return text.strip() in {self.id, self.source} - {""}


def owner_of(obj: dict[str, Any] | None) -> Owner | None:
    """The owner an object carries; None for objects no owning environment stamped
    (applied by hand, by another tool, or by a conveyor from before identities)."""
    metadata = (obj or {}).get("metadata") or {}
    labels = metadata.get("labels") or {}
    owner = labels.get(OWNER_LABEL) if isinstance(labels, dict) else None
    if not owner:
        return None
    annotations = metadata.get("annotations") or {}
    source = annotations.get(SOURCE_ANNOTATION, "") if isinstance(annotations, dict) else ""
    return Owner(str(owner), str(source))


def foreign_owner(live: dict[str, Any] | None, identity: EnvironmentIdentity) -> Owner | None:
    """The other environment that owns `live`, or None if it is ours or nobody's."""
    owner = owner_of(live)
    if owner is None or owner.id == identity.id:
        return None
    return owner


def adoption_requested(obj: dict[str, Any], owner: Owner, *, requested: str | None) -> bool:
    """A takeover from `owner` was asked for: by `conveyor adopt` (recorded on the app's
    status as `requested`), or by the adopt annotation on the object in git."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    in_git = annotations.get(ADOPT_ANNOTATION) if isinstance(annotations, dict) else None
    return any(owner.named_by(str(text)) for text in (requested, in_git) if text)
