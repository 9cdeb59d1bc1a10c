"""Find the apps in an environment folder, in the layouts the teams already use.

An app is one HelmRelease (with the other objects of its file, such as its Namespace),
one kustomization directory, or one folder of plain manifests. Objects that only
configure Flux itself are recognised and kept aside: sources are used to resolve
charts, the rest (Flux Kustomizations, image automation) is never applied blindly.

A file that cannot be read becomes an app in error, named after the file, so that one
broken file affects only that app. So does an object without the shape conveyor relies
on (config/manifest.py, config/helmrelease.py): every object is checked here, before
anything reads it, and the error names its file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import ValidationError

from conveyor.config.helmrelease import HelmReleaseError, is_helmrelease, parse_helmrelease
from conveyor.config.manifest import check_metadata, check_object, is_sops_encrypted
from conveyor.config.validation import describe
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
    # Cut to a DNS label, which never ends with '-' (it names a ConveyorApp).
    return name[:63].rstrip("-") or "root"


def scope_name(*, environment: str | None = None, path: str = ".") -> str:
    """The scope an environment's statuses are kept under: its name in conveyor.yaml,
    else its folder's path (normalized, `/` as `-`; `.` is `root`). The agent, a single
    pass, the diff, the gates and the dashboard all name an environment by this rule."""
    return app_name(environment or str(PurePosixPath(path.strip())).replace("/", "-"))


def _is_flux_config(doc: Document) -> bool:
    return doc.group in FLUX_CONFIG_GROUPS


def discover(repo_root: Path, env_path: str) -> EnvironmentTree:
    root = (repo_root / env_path).resolve()
    if not root.is_dir():
        raise RenderError(f"environment folder {env_path!r} does not exist in the repository")
    tree = EnvironmentTree(apps=[], sources={}, flux_config=[])
    _CHECKED.next_pass()
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
        rel_path = str(path.relative_to(repo_root))
        try:
            documents = load_documents(path, relative_to=repo_root)
        except RenderError as error:
            if "HelmRelease" in path.read_text(errors="replace"):
                # A broken HelmRelease file: its own app, named like its file.
                tree.apps.append(
                    AppSource(name=app_name(path.stem), kind="helm", path=rel_path, error=error)
                )
                has_releases = True
            else:
                folder_error = folder_error or error  # the folder's app cannot be rendered
            continue
        file_error: RenderError | None = None
        releases: list[tuple[Document, RenderError | None]] = []
        others: list[Document] = []
        for doc in documents:
            if is_helmrelease(doc.obj):
                releases.append((doc, _release_error(doc)))
                continue
            try:
                checked = checked_document(doc, applied=not _is_flux_config(doc))
            except RenderError as error:
                file_error = file_error or error
                continue
            if not _is_flux_config(checked):
                others.append(checked)
                continue
            has_flux_config = True
            if checked.kind in FLUX_SOURCE_KINDS:
                metadata = checked.obj["metadata"]
                namespace = metadata.get("namespace") or "default"
                tree.sources[(checked.kind, namespace, checked.name)] = checked
            else:
                tree.flux_config.append(checked)
        if not releases:
            plain.extend(others)
            folder_error = folder_error or file_error
            continue
        has_releases = True
        for index, (release, release_error) in enumerate(releases):
            # The file's other objects (its Namespace, values ConfigMaps) go with the first
            # release of the file, and are applied before it: a broken one fails that app.
            app_error = release_error or (file_error if index == 0 else None)
            tree.apps.append(
                AppSource(
                    name=_release_app_name(release, fallback=path.stem),
                    kind="helm",
                    path=rel_path,
                    documents=others if index == 0 and app_error is None else [],
                    helm_release=release if app_error is None else None,
                    error=app_error,
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


def checked_document(doc: Document, *, applied: bool = True) -> Document:
    """`doc` with the shape that rendering relies on (see config/manifest.py), or a
    RenderError naming its file, line and field. An `applied` object is also checked as
    a whole and comes back as JSON; a Flux object only needs its identity. A
    SOPS-encrypted document comes back as it is: render/sops.py checks it decrypted."""
    if is_sops_encrypted(doc.obj):
        return doc
    checked = _CHECKED.get(doc, "applied" if applied else "identity")
    if isinstance(checked, Document):
        return checked
    raise RenderError(checked, file=doc.file, line=doc.line)


def _release_error(doc: Document) -> RenderError | None:
    checked = _CHECKED.get(doc, "release")
    if isinstance(checked, Document):
        return None
    return RenderError(checked, file=doc.file, line=doc.line)


_Check = Literal["applied", "identity", "release"]


def _check(doc: Document, check: _Check) -> Document | str:
    """`doc` (or its JSON copy) when it passes `check`, else the message saying why."""
    try:
        if check == "release":
            parse_helmrelease(doc.obj)
            return doc
        if check == "identity":
            check_metadata(doc.obj)
            return doc
        obj = check_object(doc.obj)
    except HelmReleaseError as error:
        return str(error)
    except ValidationError as error:
        return describe(error, reveal=doc.obj.get("kind") != "Secret")
    return doc if obj == doc.obj else replace(doc, obj=obj)


class _CheckedDocuments:
    """Check results by document. documents.py hands out the same Document objects while
    a file is unchanged, so a pass over a thousand unchanged files checks none of them.
    Results of this pass and the one before are kept: two trees discovered in turn (the
    agent's and the dashboard's) both stay cached, and nothing else is held."""

    def __init__(self) -> None:
        self.current: dict[tuple[int, _Check], tuple[Document, Document | str]] = {}
        self.previous: dict[tuple[int, _Check], tuple[Document, Document | str]] = {}

    def get(self, doc: Document, check: _Check) -> Document | str:
        key = (id(doc), check)
        for generation in (self.current, self.previous):
            hit = generation.get(key)
            if hit is not None and hit[0] is doc:
                self.current[key] = hit
                return hit[1]
        result = _check(doc, check)
        self.current[key] = (doc, result)
        return result

    def next_pass(self) -> None:
        self.previous, self.current = self.current, {}


_CHECKED = _CheckedDocuments()


def _release_app_name(doc: Document, *, fallback: str) -> str:
    """The release's name (or, when it has none that is usable, its file's)."""
    spec = doc.obj.get("spec")
    release_name = spec.get("releaseName") if isinstance(spec, dict) else None
    for candidate in (release_name, doc.obj["metadata"].get("name"), fallback):
        if isinstance(candidate, str) and app_name(candidate) != "root":
            return app_name(candidate)
    return app_name(fallback)


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
