"""The config repository as the dashboard sees it: which folder an environment applies,
which files make an app, and who changed them.

The dashboard keeps its own clone (apart from the agent's and the CLI's), fetched at
most every few seconds when a page needs it. Git runs in a worker thread, so a slow
remote never stalls the pages or the live stream.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.cluster.ownership import EnvironmentIdentity, normalise_repository_url
from conveyor.config.project import ConfigError, Project, load_project
from conveyor.config.userfile import UserFileError, load_documents
from conveyor.images.pins import Pin
from conveyor.promote.pinning import app_pin
from conveyor.promote.versions import VersionError
from conveyor.reconcile.status import AppStatus
from conveyor.reconcile.target import Target, checkout_path
from conveyor.render.discover import AppSource, app_name, discover, scope_name
from conveyor.render.documents import RenderError
from conveyor.source.git import (
    Checkout,
    LogEntry,
    change_kind,
    default_branch,
    file_log,
    files_at,
    read_file_at,
)
from conveyor.web.views import images_in, tags_of


@dataclass(frozen=True)
class Commit:
    sha: str
    date: str
    author: str
    subject: str
    change: str  # publish | image-automation | promotion | rollback | manual
    version: str  # image tags in the app's file at that commit


class ConfigRepo:
    """One repository URL and branch, cloned for reading."""

    def __init__(
        self, url: str, *, branch: str | None = None, kubeconfig: str | None, context: str | None
    ) -> None:
        self.url = url
        self.branch = branch
        self.kubeconfig = kubeconfig
        self.context = context
        self._checkout: Checkout | None = None
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _sync(self, max_age: float, wanted: str | None) -> Checkout:
        with self._lock:
            if self._checkout is None:
                branch = self.branch or default_branch(self.url)
                self._checkout = Checkout.open(
                    self.url, checkout_path(self.url, branch, purpose="web"), branch=branch
                )
                self._fetched = time.monotonic()
            elif time.monotonic() - self._fetched > max_age or (
                wanted and not _has_commit(self._checkout, wanted)
            ):
                self._checkout.sync()
                self._fetched = time.monotonic()
            return self._checkout

    async def checkout(self, *, max_age: float = 5.0, wanted: str | None = None) -> Checkout:
        """The clone, fetched when older than `max_age` or when it lacks the `wanted`
        commit (a revision the cluster already runs)."""
        return await asyncio.to_thread(self._sync, max_age, wanted)

    async def project(self) -> Project:
        checkout = await self.checkout()
        return load_project(checkout.path)

    async def target(self, scope: str, *, identity: EnvironmentIdentity | None = None) -> Target:
        """What `conveyor reconcile` would be given for this environment (or path scope).
        With the identity its statuses carry, only an environment of this repository."""
        checkout = await self.checkout()
        env_names = {e.name for e in load_project(checkout.path).environments}
        if identity is not None:
            if identity.repository != normalise_repository_url(self.url):
                raise ConfigError(
                    f"{scope!r} is deployed from {identity.source}, not from {self.url}"
                )
            if identity.name in env_names:
                return self._target(env=identity.name, branch=identity.branch)
            return self._target(path=identity.path, branch=identity.branch)
        if scope in env_names:
            return self._target(env=scope)
        folder = await asyncio.to_thread(_folder_for_scope, checkout.path, scope)
        if folder is None:
            raise ConfigError(f"no environment or folder of {self.url} is named {scope!r}")
        return self._target(path=folder)

    def _target(
        self, *, env: str | None = None, path: str | None = None, branch: str | None = None
    ) -> Target:
        return Target(
            repo=self.url,
            branch=branch or self.branch,
            env=env,
            path=path,
            kubeconfig=self.kubeconfig,
            context=self.context,
        )

    async def history(
        self, scope: str, app: str, *, revision: str | None = None, limit: int = 30
    ) -> list[Commit]:
        checkout = await self.checkout(wanted=revision)
        return await asyncio.to_thread(self._history, checkout, scope, app, limit)

    def _history(self, checkout: Checkout, scope: str, app: str, limit: int) -> list[Commit]:
        paths = self._app_paths(checkout.path, scope, app)
        if not paths:
            return []
        commits = []
        for entry in file_log(checkout.path, paths, limit=limit):
            commits.append(
                Commit(
                    sha=entry.sha,
                    date=entry.date,
                    author=f"{entry.author_name} <{entry.author_email}>",
                    subject=entry.subject,
                    change=change_kind(entry.subject, entry.body),
                    version=_version_at(checkout.path, entry, paths, app),
                )
            )
        return commits

    async def pin(self, scope: str, app: str, *, revision: str | None = None) -> Pin | None:
        """The app's pin against image automation, as the branch's head holds it."""
        checkout = await self.checkout(wanted=revision)
        return await asyncio.to_thread(self._pin, checkout, scope, app)

    def _pin(self, checkout: Checkout, scope: str, app: str) -> Pin | None:
        source = self._app_source(checkout.path, scope, app)
        try:
            return app_pin(checkout.path, source) if source is not None else None
        except VersionError:
            return None  # a file that cannot be read holds no pin to show

    def _app_paths(self, root: Path, scope: str, app: str) -> list[str]:
        source = self._app_source(root, scope, app)
        return [source.path] if source is not None else []

    def _app_source(self, root: Path, scope: str, app: str) -> AppSource | None:
        project = load_project(root)
        folder = next((e.path for e in project.environments if e.name == scope), None)
        folder = folder or _folder_for_scope(root, scope)
        if folder is None:
            return None
        try:
            tree = discover(root, folder)
        except RenderError:
            return None
        return next((a for a in tree.apps if a.name == app), None)


def _has_commit(checkout: Checkout, sha: str) -> bool:
    return bool(checkout.git("rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}", check=False))


def _folder_for_scope(root: Path, scope: str, *, depth: int = 3) -> str | None:
    """The folder whose path scope (`a/b` → `a-b`) is `scope`, searched a few levels deep."""
    frontier = [root]
    for _ in range(depth):
        children = []
        for folder in frontier:
            for child in sorted(p for p in folder.iterdir() if p.is_dir()):
                if child.name.startswith("."):
                    continue
                relative = str(child.relative_to(root))
                if scope_name(path=relative) == scope:
                    return relative
                children.append(child)
        frontier = children
    return None


def _version_at(root: Path, entry: LogEntry, paths: list[str], app: str) -> str:
    """The image tags in the app's files (a file, or a folder's YAML) at that commit."""
    tags: list[str] = []
    for path in (p for p in files_at(root, entry.sha, paths) if p.endswith((".yaml", ".yml"))):
        text = read_file_at(root, entry.sha, path)
        if text is None:
            continue
        try:
            documents = [d.data for d in load_documents(text, file=path)]
        except UserFileError:
            continue
        for doc in documents:
            if isinstance(doc, dict) and _belongs_to(doc, app):
                tags.extend(tags_of(images_in(doc.get("spec"))))
    return ", ".join(dict.fromkeys(tags))


def _belongs_to(doc: dict[str, Any], app: str) -> bool:
    """A file may hold several HelmReleases; keep the one of this app (others: all)."""
    if doc.get("kind") != "HelmRelease":
        return True
    spec = doc.get("spec") or {}
    metadata = doc.get("metadata") or {}
    release = app_name(str(spec.get("releaseName") or metadata.get("name", "")))
    # An app named with its namespace too (a sandbox's, see discover.check_unique_names).
    namespace = str(spec.get("targetNamespace") or metadata.get("namespace") or "")
    return app in (release, app_name(namespace), app_name(f"{release}-{namespace}"))


class Repos:
    """The repositories the dashboard reads: `--repo`, or those the sources report."""

    def __init__(
        self,
        *,
        default: str | None,
        branch: str | None,
        kubeconfig: str | None,
        context: str | None,
    ) -> None:
        self.default = default
        self.branch = branch
        self.kubeconfig = kubeconfig
        self.context = context
        self._repos: dict[tuple[str, str | None], ConfigRepo] = {}

    def get(self, source: AppStatus | None) -> ConfigRepo | None:
        """`--repo` if given, else the repository and branch a source status names."""
        if self.default:
            url, branch = self.default, self.branch
        elif source is not None and source.repository:
            url, branch = source.repository, source.branch
        else:
            return None
        key = (url, branch)
        if key not in self._repos:
            self._repos[key] = ConfigRepo(
                url, branch=branch, kubeconfig=self.kubeconfig, context=self.context
            )
        return self._repos[key]
