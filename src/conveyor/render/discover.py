"""Find the apps in an environment folder, in the layouts the teams already use.

An app is one HelmRelease (with the other objects of its file, such as its Namespace),
one kustomization directory, one Flux Kustomization, or one folder of plain manifests.
Objects that only configure Flux itself are recognised and kept aside: sources are used
to resolve charts, Kustomizations are built (render/flux_kustomization.py, which also
finds the HelmReleases inside kustomize builds), the rest (image automation) is never
applied. Flux's own installation (`flux-system/` with gotk-*.yaml) is not an app.

A file that cannot be read becomes an app in error, named after the file, so that one
broken file affects only that app. So does an object without the shape conveyor relies
on (config/manifest.py, config/helmrelease.py): every object is checked here, before
anything reads it, and the error names its file, line and field.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import ValidationError

from conveyor.config.helmrelease import HelmReleaseError, is_helmrelease, parse_helmrelease
from conveyor.config.kustomization import is_flux_kustomization
from conveyor.config.manifest import check_metadata, check_object, is_sops_encrypted
from conveyor.config.validation import describe
from conveyor.render.documents import Document, Listing, RenderError, load_documents

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
FLUX_SOURCE_KINDS = {"GitRepository", "HelmRepository", "OCIRepository", "HelmChart", "Bucket"}
FLUX_CONFIG_GROUPS = {
    "source.toolkit.fluxcd.io",
    "kustomize.toolkit.fluxcd.io",
    "image.toolkit.fluxcd.io",
    "notification.toolkit.fluxcd.io",
}
SKIPPED_FILES = {"conveyor.yaml"}
# What `flux bootstrap` writes into a cluster's folder: Flux's own controllers and CRDs
# (gotk-components.yaml) and the Kustomization syncing the folder (gotk-sync.yaml).
FLUX_INSTALLATION_FILES = ("gotk-components.yaml", "gotk-sync.yaml")
FLUX_INSTALLATION_FOUND = "Flux installation found; conveyor does not apply it"
# The label of every object of a staging sandbox's file (sandboxes/): its ID.
SANDBOX_LABEL = "conveyor.dev/sandbox"

AppKind = Literal["manifests", "kustomize", "helm"]

log = logging.getLogger("conveyor.render")


@dataclass(frozen=True)
class HealthCheck:
    """An object a Flux Kustomization waits for (`spec.healthChecks`)."""

    kind: str
    name: str
    namespace: str | None
    api_version: str | None = None


@dataclass(frozen=True)
class ApplyOptions:
    """How an app is applied, where a Flux Kustomization says (its defaults are
    conveyor's own: prune, wait for every object)."""

    prune: bool = True
    # None: wait for every object to be healthy; else only for these (Flux's `wait:
    # false` with `healthChecks`, or none at all).
    wait_for: tuple[HealthCheck, ...] | None = None
    timeout_seconds: float | None = None
    suspend: bool = False
    force: bool = False  # recreate an object whose immutable fields changed


@dataclass
class AppSource:
    name: str
    kind: AppKind
    path: str  # file or folder relative to the repo root
    documents: list[Document] = field(default_factory=list)
    helm_release: Document | None = None
    error: RenderError | None = None
    # The Flux Kustomization this app is (render/flux_kustomization.py builds it).
    kustomization: Document | None = None
    # Apps that must be Ready first: the Kustomization that built this app, and a
    # Kustomization's dependsOn (a HelmRelease's own dependsOn is read at render).
    depends_on: list[str] = field(default_factory=list)
    # The other objects of the build this app came from (valuesFrom reads them first).
    build_objects: list[Document] = field(default_factory=list)
    options: ApplyOptions = field(default_factory=ApplyOptions)
    # Apps a Kustomization's healthChecks name: what depends on it waits for them too.
    health_apps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Named with its namespace (`check_unique_names`): its short name is another app's.
    qualified: bool = False

    def where(self) -> tuple[str, int | None]:
        """The file and line that define the app, for messages."""
        defined = self.kustomization or self.helm_release
        if defined is not None:
            return defined.file, defined.line
        return self.path, None


@dataclass
class EnvironmentTree:
    apps: list[AppSource]
    sources: dict[tuple[str, str, str], Document]  # (kind, namespace, name) → source object
    flux_config: list[Document]  # understood, not applied
    notices: list[str] = field(default_factory=list)  # said once to whoever runs the pass
    # Kustomize builds done (render/flux_kustomization.py): apps are final.
    expanded: bool = False

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


def is_flux_config(doc: Document) -> bool:
    return doc.group in FLUX_CONFIG_GROUPS


def discover(repo_root: Path, env_path: str) -> EnvironmentTree:
    root = (repo_root / env_path).resolve()
    if not root.is_dir():
        raise RenderError(f"environment folder {env_path!r} does not exist in the repository")
    tree = EnvironmentTree(apps=[], sources={}, flux_config=[])
    _CHECKED.next_pass()
    _walk(root, repo_root.resolve(), env_root=root, tree=tree)
    check_unique_names(tree)
    return tree


def is_flux_installation(listing: Listing) -> bool:
    return any(name in listing.files for name in FLUX_INSTALLATION_FILES)


def _flux_installation(folder: Path, repo_root: Path, tree: EnvironmentTree) -> None:
    if FLUX_INSTALLATION_FOUND not in tree.notices:
        tree.notices.append(FLUX_INSTALLATION_FOUND)
    key = str(folder)
    if key not in _REPORTED:  # once per process, not once per pass
        _REPORTED.add(key)
        log.info("%s (%s)", FLUX_INSTALLATION_FOUND, folder.relative_to(repo_root))


_REPORTED: set[str] = set()


def _syncs(app: AppSource, env_folder: Path) -> bool:
    """Whether the Flux Kustomization `app` builds the environment's folder itself."""
    spec = app.kustomization.obj.get("spec") if app.kustomization else None
    path = spec.get("path") if isinstance(spec, dict) else None
    return isinstance(path, str) and PurePosixPath(path.strip()) == PurePosixPath(env_folder)


def _walk(folder: Path, repo_root: Path, *, env_root: Path, tree: EnvironmentTree) -> None:
    rel_folder = folder.relative_to(repo_root)
    folder_app_name = app_name(
        str(folder.relative_to(env_root)).replace("/", "-") if folder != env_root else env_root.name
    )
    listing = Listing.of(folder)
    if is_flux_installation(listing):
        _flux_installation(folder, repo_root, tree)
        return
    if any(name in listing.files for name in KUSTOMIZATION_FILES):
        tree.apps.append(AppSource(name=folder_app_name, kind="kustomize", path=str(rel_folder)))
        return
    plain: list[Document] = []
    has_releases = False
    has_flux_config = False
    folder_error: RenderError | None = None
    files = [p for p in listing.yaml_files() if p.name not in SKIPPED_FILES]
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
        # How many releases came before each of `others`: a sandbox's file groups them.
        releases_before: list[int] = []
        for doc in documents:
            if is_helmrelease(doc.obj):
                releases.append((doc, release_error(doc)))
                continue
            try:
                checked = checked_document(doc, applied=not is_flux_config(doc))
            except RenderError as error:
                file_error = file_error or error
                continue
            if not is_flux_config(checked):
                others.append(checked)
                releases_before.append(len(releases))
                continue
            has_flux_config = True
            flux_app = flux_object(checked, tree)
            if flux_app is not None and _syncs(flux_app, env_root.relative_to(repo_root)):
                # Flux's own sync of this very folder (gotk-sync.yaml moved out of
                # flux-system/): part of the installation, not an app.
                _flux_installation(folder, repo_root, tree)
            elif flux_app is not None:
                tree.apps.append(flux_app)
        if not releases:
            plain.extend(others)
            folder_error = folder_error or file_error
            continue
        has_releases = True
        grouped = _grouped(releases, others, releases_before)
        for index, (release, broken) in enumerate(releases):
            app_error = broken or (file_error if index == 0 else None)
            tree.apps.append(
                AppSource(
                    name=release_app_name(release, fallback=path.stem),
                    kind="helm",
                    path=rel_path,
                    documents=grouped[index] if app_error is None else [],
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
    for child in listing.folders:
        _walk(folder / child, repo_root, env_root=env_root, tree=tree)


def _grouped(
    releases: list[tuple[Document, RenderError | None]],
    others: list[Document],
    releases_before: list[int],
) -> list[list[Document]]:
    """The other objects of a file, per release. They (its Namespace, values ConfigMaps)
    go with the first release of the file and are applied before it: a broken one fails
    that app. A sandbox's file (conveyor stage) holds several apps, each with its own
    Namespace before its release: there each release takes the objects before it (the
    last also those after), so that each app owns, and its removal deletes, its own
    namespace. Only there: moving an object between apps of a running environment
    would have one app prune what the other applies."""
    grouped: list[list[Document]] = [[] for _ in releases]
    if not releases:
        return grouped
    in_sandbox = all(sandbox_of(release) is not None for release, _ in releases)
    for doc, before in zip(others, releases_before, strict=True):
        grouped[min(before, len(releases) - 1) if in_sandbox else 0].append(doc)
    return grouped


def sandbox_of(doc: Document | None) -> str | None:
    """The sandbox (`conveyor stage`) an object belongs to, by its label; None outside."""
    metadata = doc.obj.get("metadata") if doc is not None else None
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    value = labels.get(SANDBOX_LABEL) if isinstance(labels, dict) else None
    return value if isinstance(value, str) and value else None


def flux_object(doc: Document, tree: EnvironmentTree) -> AppSource | None:
    """Where a Flux object (`is_flux_config`) goes: a source into the tree's sources, a
    Flux Kustomization becomes an app (returned), anything else is set aside."""
    if doc.kind in FLUX_SOURCE_KINDS:
        metadata = doc.obj["metadata"]
        namespace = metadata.get("namespace") or "default"
        tree.sources[(doc.kind, namespace, doc.name)] = doc
        return None
    if is_flux_kustomization(doc.obj):
        return AppSource(
            name=app_name(doc.name), kind="kustomize", path=doc.file, kustomization=doc
        )
    tree.flux_config.append(doc)
    return None


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


def release_error(doc: Document) -> RenderError | None:
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


def release_app_name(doc: Document, *, fallback: str) -> str:
    """The release's name (or, when it has none that is usable, its file's)."""
    spec = doc.obj.get("spec")
    release_name = spec.get("releaseName") if isinstance(spec, dict) else None
    for candidate in (release_name, doc.obj["metadata"].get("name"), fallback):
        if isinstance(candidate, str) and app_name(candidate) != "root":
            return app_name(candidate)
    return app_name(fallback)


def check_unique_names(tree: EnvironmentTree) -> None:
    """Give every app a name of its own. An app is what its identity says (a release's
    namespace and name, a Flux Kustomization's, else its file or folder); its name is
    what people, dependsOn and its ConveyorApp see, and stays short where it can:

    - an app of a staging sandbox is always named with its namespace (`api` in
      `api-pr-7` is `api-pr-7`), so that it keeps its name whatever else comes and goes;
    - of other apps sharing a name, the first found keeps it (as when a duplicate was
      refused: no app of an existing installation is renamed, which would prune and
      reinstall it) and the others are named with their namespace;
    - a name still taken after that is refused on the later app, naming the first, and
      so is an app that deploys what an earlier one does (the same Helm release)."""
    identities: dict[tuple[str, str, str], AppSource] = {}
    for app in tree.apps:
        identity = app_identity(app)
        if identity is None or app.error is not None:
            continue
        if identity in identities:
            file, line = app.where()
            app.error = RenderError(
                f"{identity[0]} {identity[1]}/{identity[2]} is also used by "
                f"{identities[identity].where()[0]}; remove one of them",
                file=file,
                line=line,
            )
        else:
            identities[identity] = app
    for app in tree.apps:
        if not app.qualified and sandbox_of(app.kustomization or app.helm_release):
            _qualify(app)
    seen: dict[str, AppSource] = {}
    for app in tree.apps:
        if app.name in seen and not app.qualified:
            _qualify(app)
        if app.name in seen:
            first = seen[app.name]
            file, line = app.where()
            app.error = RenderError(
                f"app name {app.name!r} is also used by {first.where()[0]}; rename one of them",
                file=file,
                line=line,
            )
        else:
            seen[app.name] = app


def app_identity(app: AppSource) -> tuple[str, str, str] | None:
    """What the app deploys, which no other app may: (`Helm release`, namespace, release
    name) or (`Kustomization`, namespace, name); None for manifests (their folder is)."""
    if app.helm_release is not None:
        try:
            spec = parse_helmrelease(app.helm_release.obj)
        except HelmReleaseError:
            return None
        return ("Helm release", spec.target_namespace, spec.release_name)
    if app.kustomization is not None:
        namespace = app.kustomization.obj["metadata"].get("namespace") or "default"
        return ("Kustomization", str(namespace), app.kustomization.name)
    return None


def app_namespace(app: AppSource) -> str | None:
    """Where the app's release installs (or where its Kustomization is); None for
    manifests and for a release that cannot be read (its error says why)."""
    if app.helm_release is not None:
        try:
            return parse_helmrelease(app.helm_release.obj).target_namespace
        except HelmReleaseError:
            return None
    if app.kustomization is not None:
        namespace = app.kustomization.obj["metadata"].get("namespace")
        return namespace if isinstance(namespace, str) else None
    return None


def _qualify(app: AppSource) -> None:
    """Name `app` with its namespace too: `api` in `team-b` is `api-team-b`, and in
    `api-pr-7`, which already says it, `api-pr-7`."""
    namespace = app_namespace(app)
    if namespace is None:
        return
    app.qualified = True
    app.name = app_name(
        namespace if namespace.startswith(f"{app.name}-") else f"{app.name}-{namespace}"
    )
