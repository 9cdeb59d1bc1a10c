"""Find the apps in an environment folder, in the layouts the teams already use.

An app is one HelmRelease (with the other objects of its file, such as its Namespace),
one kustomization directory, or one folder of plain manifests. Objects that only
configure Flux itself are recognised and kept aside: sources are used to resolve
charts, the rest (Flux Kustomizations, image automation) is never applied blindly.

A file that cannot be read becomes an app in error, named after the file, so that one
broken file affects only that app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conveyor.config.helmrelease import is_helmrelease
from conveyor.render.documents import Document, RenderError, load_documents, yaml_files

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
FLUX_SOURCE_KINDS = {"GitRepository", "HelmRepository", "OCIRepository", "HelmChart", "Bucket"}
FLUX_CONFIG_GROUPS = {
    "source.toolkit.fluxcd.io",
    "kustomize.toolkit.fluxcd.io",
    "image.toolkit.fluxcd.io",
    "notification.toolkit.fluxcd.io",
}
SKIPPED_FILES = {"conveyor.yaml"}

AppKind = Literal["manifests", "kustomize", "helm"]


@dataclass
class AppSource:
    name: str
    kind: AppKind
    path: str  # file or folder relative to the repo root
    documents: list[Document] = field(default_factory=list)
    helm_release: Document | None = None
    error: RenderError | None = None


@dataclass
class EnvironmentTree:
    apps: list[AppSource]
    sources: dict[tuple[str, str, str], Document]  # (kind, namespace, name) → source object
    flux_config: list[Document]  # understood, not applied

    @property
    def errors(self) -> list[AppSource]:
        return [a for a in self.apps if a.error is not None]


def app_name(text: str) -> str:
    """A DNS-label-like app name from a release name, file stem or folder path."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63] or "root"


def _is_flux_config(doc: Document) -> bool:
    return doc.group in FLUX_CONFIG_GROUPS


def discover(repo_root: Path, env_path: str) -> EnvironmentTree:
    root = (repo_root / env_path).resolve()
    if not root.is_dir():
        raise RenderError(f"environment folder {env_path!r} does not exist in the repository")
    tree = EnvironmentTree(apps=[], sources={}, flux_config=[])
    _walk(root, repo_root.resolve(), env_root=root, tree=tree)
    _check_unique_names(tree)
    return tree


def _walk(folder: Path, repo_root: Path, *, env_root: Path, tree: EnvironmentTree) -> None:
    rel_folder = folder.relative_to(repo_root)
    folder_app_name = app_name(
        str(folder.relative_to(env_root)).replace("/", "-") if folder != env_root else env_root.name
    )
    if any((folder / name).is_file() for name in KUSTOMIZATION_FILES):
        tree.apps.append(AppSource(name=folder_app_name, kind="kustomize", path=str(rel_folder)))
        return
    plain: list[Document] = []
    has_releases = False
    has_flux_config = False
    folder_error: RenderError | None = None
    files = [p for p in yaml_files(folder) if p.name not in SKIPPED_FILES]
    for path in files:
        try:
            documents = load_documents(path, relative_to=repo_root)
        except RenderError as error:
            if "HelmRelease" in path.read_text(errors="replace"):
                # A broken HelmRelease file: its own app, named like its file.
                tree.apps.append(
                    AppSource(
                        name=app_name(path.stem),
                        kind="helm",
                        path=str(path.relative_to(repo_root)),
                        error=error,
                    )
                )
                has_releases = True
            else:
                folder_error = folder_error or error  # the folder's app cannot be rendered
            continue
        releases = [d for d in documents if is_helmrelease(d.obj)]
        others = []
        for doc in documents:
            if _is_flux_config(doc):
                has_flux_config = True
                if doc.kind in FLUX_SOURCE_KINDS:
                    namespace = doc.obj.get("metadata", {}).get("namespace") or "default"
                    tree.sources[(doc.kind, namespace, doc.name)] = doc
                else:
                    tree.flux_config.append(doc)
            elif not is_helmrelease(doc.obj):
                others.append(doc)
        if not releases:
            plain.extend(others)
            continue
        has_releases = True
        for index, release in enumerate(releases):
            spec = release.obj.get("spec") or {}
            name = app_name(str(spec.get("releaseName") or release.name))
            # The file's other objects (its Namespace, values ConfigMaps) go with the first
            # release of the file, and are applied before it.
            tree.apps.append(
                AppSource(
                    name=name,
                    kind="helm",
                    path=str(path.relative_to(repo_root)),
                    documents=others if index == 0 else [],
                    helm_release=release,
                )
            )
    # A folder whose files hold no objects any more is an app that rendered empty (which
    # is never pruned unless allowed), not an app that left git.
    if plain or folder_error or (files and not has_releases and not has_flux_config):
        tree.apps.append(
            AppSource(
                name=folder_app_name,
                kind="manifests",
                path=str(rel_folder),
                documents=plain,
                error=folder_error,
            )
        )
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        _walk(child, repo_root, env_root=env_root, tree=tree)


def _check_unique_names(tree: EnvironmentTree) -> None:
    seen: dict[str, AppSource] = {}
    for app in tree.apps:
        if app.name in seen:
            first = seen[app.name]
            app.error = RenderError(
                f"app name {app.name!r} is also used by {first.path}; rename one of them",
                file=app.path,
                line=app.helm_release.line if app.helm_release else None,
            )
        else:
            seen[app.name] = app
