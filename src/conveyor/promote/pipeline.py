"""Environments in promotion order, and working copies of the branches they live on.

Both layouts the teams use work the same way: a folder per environment on one branch
(Cellenics: `staging/` and `production/` on master) or a branch per tier
(deployment-config: `development` for dev, `master` for staging and production). Each
environment names its folder and branch in conveyor.yaml; reads and writes go there.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from conveyor.config.project import ConfigError, Environment, Project, load_project
from conveyor.errors import ConveyorError
from conveyor.promote.versions import AppVersion, VersionError, read_app_version
from conveyor.render.discover import AppSource, EnvironmentTree, discover
from conveyor.render.documents import RenderError
from conveyor.source.git import Checkout, GitError, default_branch, export_tree


class PromotionError(ConveyorError, ValueError):
    """The request cannot be carried out as asked; nothing was written."""


class Workspace:
    """Working copies of one config repo's branches in one directory, for one operation."""

    def __init__(self, url: str, root: Path, *, branch: str | None = None) -> None:
        """`branch` stands for the repository's HEAD: its conveyor.yaml is read and the
        environments that name no branch live on it (`--branch` of rollback, unpin)."""
        self.url = url
        self.root = root
        self._checkouts: dict[str, Checkout] = {}
        self._default: str | None = branch

    def checkout(self, branch: str) -> Checkout:
        """The branch's latest head (fetched once per operation). GitError when the
        repository cannot be reached; PromotionError when the branch does not exist."""
        if branch not in self._checkouts:
            folder = self.root / re.sub(r"[^A-Za-z0-9._-]", "_", branch)
            checkout = Checkout.open(self.url, folder, branch=branch)
            if checkout.head() is None:
                raise PromotionError(f"branch {branch!r} does not exist in {self.url}")
            self._checkouts[branch] = checkout
        return self._checkouts[branch]

    def project(self, *, branch: str | None = None) -> Project:
        """conveyor.yaml of `branch`, or of the repository's default branch; environments
        that name no branch live on the default branch."""
        self._default = self._default or default_branch(self.url)
        return load_project(
            self.checkout(branch or self._default).path, default_branch=self._default
        )

    def env_root(self, env: Environment) -> Path:
        return self.checkout(env.branch).path

    def tree(self, env: Environment) -> EnvironmentTree:
        try:
            return discover(self.env_root(env), env.path)
        except RenderError as error:
            raise PromotionError(f"{env.name}: {error}") from None

    def app(self, env: Environment, name: str) -> AppSource:
        apps = {a.name: a for a in self.tree(env).apps}
        if name not in apps:
            known = ", ".join(sorted(apps)) or "none"
            raise PromotionError(f"{env.name} has no app {name!r} (has: {known})")
        return apps[name]

    def version_at(self, env: Environment, app: str, revision: str) -> str | None:
        """The version of `app` in `env` as of `revision` of its branch; None when that
        revision or app is unknown."""
        found = app_version_at(self.checkout(env.branch).path, env.path, app, revision)
        return found.version if found is not None else None


def app_version_at(root: Path, path: str, app: str, revision: str) -> AppVersion | None:
    """The version fields of `app` in the environment folder `path` as of `revision` of
    the checkout at `root`; None when that revision or app is unknown."""
    return environment_versions(root, path, revision).get(app)


def environment_versions(root: Path, path: str, revision: str) -> dict[str, AppVersion]:
    """The version fields of every app in the environment folder `path` as of `revision`
    of the checkout at `root` (only that folder is exported); empty when that revision or
    folder is unknown. An app whose files cannot be read is left out."""
    with tempfile.TemporaryDirectory(prefix="conveyor-revision-") as scratch:
        try:
            exported = export_tree(root, revision, Path(scratch), paths=[path])
            apps = discover(exported, path).apps
        except (GitError, RenderError):
            return {}
        found = {}
        for app in apps:
            try:
                found[app.name] = read_app_version(exported, app)
            except VersionError:
                continue
        return found


def environment(project: Project, name: str) -> Environment:
    """The named environment; PromotionError naming the known ones otherwise."""
    try:
        return project.environment(name)
    except ConfigError as error:
        raise PromotionError(str(error)) from None
