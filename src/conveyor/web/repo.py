"""The config repository as the dashboard sees it: which folder an environment applies,
which files make an app, and who changed them.

The dashboard keeps its own clone (apart from the agent's and the CLI's), fetched at
most every few seconds when a page needs it. Git runs in a worker thread, so a slow
remote never stalls the pages or the live stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conveyor.cluster.ownership import EnvironmentIdentity, normalise_repository_url
from conveyor.config.project import ConfigError, Project, load_project
from conveyor.images.pins import Pin
from conveyor.promote.notes import release_notes, render_notes
from conveyor.promote.pinning import app_pin
from conveyor.promote.pipeline import environment_versions
from conveyor.promote.versions import VersionError
from conveyor.reconcile.status import AppStatus
from conveyor.reconcile.target import Target, checkout_path
from conveyor.render.discover import AppSource, discover, scope_name
from conveyor.render.documents import RenderError
from conveyor.source.git import (
    Checkout,
    GitError,
    change_kind,
    default_branch,
    file_log,
    tree_at,
)

# Release versions of (scope, revision) kept: a commit's versions never change, and an
# entry is a few hundred bytes (an environment's app names and versions).
RELEASES_KEPT = 4096
RETRY_SECONDS = 30.0
log = logging.getLogger("conveyor.web")
Releases = dict[str, str]  # app → its release version ("" when its files name none)


@dataclass(frozen=True)
class Commit:
    sha: str
    date: str
    author: str
    subject: str
    change: str  # publish | image-automation | promotion | rollback | manual
    version: str  # the release version in the app's files at that commit (versions.py)


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
        self.head: str | None = None  # the branch's head as last fetched
        self._releases: OrderedDict[tuple[str, str], Releases] = OrderedDict()  # by revision
        self._by_tree: OrderedDict[tuple[str, str], Releases] = OrderedDict()  # by folder id
        self._releases_lock = threading.Lock()
        self._pending: dict[tuple[str, str], asyncio.Task[Releases]] = {}
        self._folders: dict[str, str | None] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._requests: set[asyncio.Future[None]] = set()  # kept until done
        self._readers = asyncio.Semaphore(2)

    def _sync(self, max_age: float, wanted: str | None) -> Checkout:
        with self._lock:
            if self._checkout is None:
                branch = self.branch or default_branch(self.url)
                self._checkout = Checkout.open(
                    self.url, checkout_path(self.url, branch, purpose="web"), branch=branch
                )
                self._fetched = time.monotonic()
                self._folders.clear()
            elif time.monotonic() - self._fetched > max_age or (
                wanted and not _has_commit(self._checkout, wanted)
            ):
                self._checkout.sync()
                self._fetched = time.monotonic()
                self._folders.clear()  # conveyor.yaml may have moved an environment
            self.head = self._checkout.head()
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
                    version=self._releases_at(checkout, scope, entry.sha).get(app, ""),
                )
            )
        return commits

    # -- release versions, as promotion reads them ----------------------------------------

    @property
    def known_count(self) -> int:
        """How many (scope, revision) pairs have their versions read."""
        return len(self._releases)

    def known_releases(self, scope: str, revision: str) -> Releases | None:
        """The release versions of `scope`'s apps at `revision`, if already read."""
        with self._releases_lock:
            return self._releases.get((scope, revision))

    @property
    def branch_name(self) -> str | None:
        """The branch cloned: `--branch`, else the default branch once known."""
        return self._checkout.branch if self._checkout is not None else self.branch

    def request(self, scope: str, revision: str, *, then: Callable[[], None] | None = None) -> None:
        """Read the release versions at `revision` in the background, unless known, being
        read, or failed (or not there) within the last 30 s; call `then` once they are
        known. (`then` redraws pages, which ask again: only what became known calls it,
        or a commit the clone cannot reach would ask for itself in a loop.)"""
        key = (scope, revision)
        failed = self._failed.get(key)
        if key in self._pending or (failed and time.monotonic() - failed < RETRY_SECONDS):
            return
        if self.known_releases(scope, revision) is not None:
            return

        async def read() -> None:
            try:
                await self.releases(scope, revision)
            except (GitError, ConfigError, OSError) as error:
                self._failed[key] = time.monotonic()
                log.warning("versions of %s at %s unknown: %s", scope, revision[:12], error)
                return
            if self.known_releases(scope, revision) is None:  # no such commit or folder
                self._failed[key] = time.monotonic()
            elif then is not None:
                then()

        self._requests.add(asyncio.ensure_future(read()))
        self._requests = {t for t in self._requests if not t.done()}

    async def releases(self, scope: str, revision: str) -> Releases:
        """The release versions of `scope`'s apps at `revision` (`versions.AppVersion
        .version`: the first image tag, else the chart version or ref): one export of the
        environment's folder per revision, read once and kept."""
        key = (scope, revision)
        known = self.known_releases(scope, revision)
        if known is not None:
            return known
        pending = self._pending.get(key)
        if pending is None:

            async def read() -> Releases:
                try:
                    checkout = await self.checkout(max_age=float("inf"), wanted=revision)
                    # YAML read round-trip costs ~10 ms a file: two folders at a time
                    # leave the server's own thread its share of the interpreter.
                    async with self._readers:
                        return await asyncio.to_thread(self._releases_at, checkout, scope, revision)
                finally:
                    self._pending.pop(key, None)

            pending = self._pending[key] = asyncio.ensure_future(read())
        return await asyncio.shield(pending)

    def _releases_at(self, checkout: Checkout, scope: str, revision: str) -> Releases:
        key = (scope, revision)
        with self._releases_lock:
            if key in self._releases:
                return self._releases[key]
        folder = self._folder(checkout.path, scope)
        tree = tree_at(checkout.path, revision, folder) if folder is not None else None
        if folder is None or tree is None:
            return {}  # not kept: a later fetch may bring the commit
        # A commit changes a folder or two: the others' versions are read once per tree.
        with self._releases_lock:
            found = self._by_tree.get((folder, tree))
        if found is None:
            found = {
                name: version.version or ""
                for name, version in environment_versions(checkout.path, folder, revision).items()
            }
        with self._releases_lock:
            for cache, entry in ((self._releases, key), (self._by_tree, (folder, tree))):
                cache[entry] = found
                while len(cache) > RELEASES_KEPT:
                    cache.popitem(last=False)
        return found

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
        folder = self._folder(root, scope)
        if folder is None:
            return None
        try:
            tree = discover(root, folder)
        except RenderError:
            return None
        return next((a for a in tree.apps if a.name == app), None)

    def _folder(self, root: Path, scope: str) -> str | None:
        """The folder `scope` applies: its environment's in conveyor.yaml, else the folder
        whose path scope it is."""
        if scope not in self._folders:
            project = load_project(root)
            folder = next((e.path for e in project.environments if e.name == scope), None)
            self._folders[scope] = folder or _folder_for_scope(root, scope)
        return self._folders[scope]


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


# A publish commit's message names the app's commit it was built from (publish/: "Update
# from {server}/{owner}/{repo}/commit/{sha}", GitLab's `/-/commit/`).
_BUILT_FROM = re.compile(r"^Update from (\S+?)/(?:-/)?commit/([0-9a-f]{7,40})\b")


def built_from(subject: str) -> tuple[str, str] | None:
    """The app repository and commit a publish commit's subject names, if any."""
    found = _BUILT_FROM.match(subject)
    return (found.group(1), found.group(2)) if found else None


async def app_release_notes(url: str, base: str, head: str) -> str:
    """`conveyor notes` between two commits of an app's repository, in markdown, from
    the dashboard's own clone of its default branch (GitError, PromotionError)."""

    def notes() -> str:
        branch = default_branch(url)
        checkout = Checkout.open(
            url, checkout_path(url, branch, purpose="web-notes"), branch=branch
        )
        return render_notes(release_notes(checkout.path, base, head))

    return await asyncio.to_thread(notes)
