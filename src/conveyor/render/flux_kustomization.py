"""Kustomize builds into apps: Flux Kustomizations and kustomization folders.

A Flux v2 repository in the shape of Flux's own examples keeps Kustomizations in the
cluster's folder; each builds an overlay (`spec.path`) that patches HelmReleases of a
base. conveyor follows them as kustomize-controller does, but installs what they hold
its own way:

- the build runs `kubectl kustomize` on a generated overlay around `spec.path` that
  carries the Kustomization's fields (`patches`, `images`, `targetNamespace`,
  `namePrefix`/`nameSuffix`, `commonMetadata`, `components`), then `postBuild`
  substitutes variables (render/substitute.py);
- the build's plain objects are the Kustomization's app; each HelmRelease in it becomes
  an app of its own, installed with the real `helm` like a HelmRelease file; each
  Kustomization in it is followed in turn; sources resolve charts; no Flux object is
  ever applied, so a cluster without Flux's CRDs works;
- an app built by another waits for it (its Namespace, ConfigMaps and Secrets exist
  first), and a Kustomization's `dependsOn` names the apps it waits for.

Builds happen once per pass, before rendering (`expand`), because they decide which
apps exist. Every build's documents pass through `_post_build`, the one place that
changes them after kustomize (decryption, then substitution). Before kustomize, the
SOPS-encrypted files a secretGenerator reads are decrypted into a temporary copy of the
source that the build reads (`_decrypted_copy`), as kustomize-controller does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from conveyor.cluster.objects import Obj
from conveyor.cluster.ownership import normalise_repository_url
from conveyor.config.helmrelease import is_helmrelease, kustomize_fields
from conveyor.config.kustomization import (
    FLUX_SYSTEM,
    FluxKustomization,
    KustomizationError,
    parse_kustomization,
)
from conveyor.config.sources import GitRepository
from conveyor.render.charts import ChartResolver
from conveyor.render.data_objects import DataKind, data_entries, find_data_object
from conveyor.render.discover import (
    KUSTOMIZATION_FILES,
    ApplyOptions,
    AppSource,
    EnvironmentTree,
    HealthCheck,
    app_name,
    check_unique_names,
    checked_document,
    flux_object,
    is_flux_config,
    release_app_name,
    release_error,
)
from conveyor.render.documents import Document, RenderError, load_documents
from conveyor.render.kustomize import GeneratorSource, kustomize_build, secret_generator_sources
from conveyor.render.sops import Decryptor, KeySource, SecretRef, generator_format
from conveyor.render.substitute import check_variable_names, substitute_documents

ORIGIN_ANNOTATION = "config.kubernetes.io/origin"
# Flux objects a Kustomization's healthChecks may name: conveyor's apps, not objects.
APP_KINDS = {"HelmRelease", "Kustomization"}
BUILD_CONCURRENCY = 8

DataLookup = Callable[[DataKind, str, str], Awaitable[dict[str, str] | None]]
"""The data of a ConfigMap or Secret (kind, namespace, name) in the cluster, decoded;
None when there is none."""


@dataclass(frozen=True)
class BuildContext:
    repo_root: Path
    charts: ChartResolver
    data_lookup: DataLookup | None  # None: no cluster (an offline diff)
    config_url: str | None = None  # the config repo, as a GitRepository may name it
    # SOPS documents of a build: by default decrypted with the local keys (render/sops.py).
    decryptor: Decryptor = field(default_factory=lambda: Decryptor(KeySource()))


async def expand(tree: EnvironmentTree, context: BuildContext) -> None:
    """Build every kustomize app of `tree` (once) and put the apps the builds hold in
    its place: the build's own app, then an app per HelmRelease and Kustomization."""
    if tree.expanded:
        return
    builder = _Builder(tree, context)
    expanded = await asyncio.gather(*(builder.app(a, within=_Within()) for a in tree.apps))
    tree.apps = [app for apps in expanded for app in apps]
    tree.expanded = True
    check_unique_names(tree)


@dataclass(frozen=True)
class _Within:
    """The Kustomizations a build is nested in, and the objects of their builds."""

    chain: tuple[str, ...] = ()  # namespace/name, outermost first
    objects: tuple[Document, ...] = ()


class _Builder:
    def __init__(self, tree: EnvironmentTree, context: BuildContext) -> None:
        self.tree = tree
        self.context = context
        self.root = context.repo_root.resolve()
        # Kustomizations in the environment's folder: one a build holds too is the same
        # object (Flux applies it twice, to the same effect), not a second app.
        self.top_level = {_identity(a) for a in tree.apps} - {None}
        # kubectl processes at once: a repository of a hundred Kustomizations must not
        # start a hundred builds on a small node.
        self.slots = asyncio.Semaphore(BUILD_CONCURRENCY)

    async def app(self, app: AppSource, *, within: _Within) -> list[AppSource]:
        if app.kind != "kustomize" or app.error is not None:
            return [app]
        try:
            if app.kustomization is not None:
                documents = await self._flux_build(app, app.kustomization, within=within)
            else:
                built = await self._build(self.root / app.path, spec=None, source_root=self.root)
                # kustomize rewrites what it builds, so the MAC no longer holds (as in Flux).
                documents = await self.context.decryptor.decrypt(built, verify_mac=False)
            return await self._split(app, documents, within=within)
        except RenderError as error:
            file, line = app.where()
            app.error = error if error.file else RenderError(error.detail, file=file, line=line)
            return [app]

    # -- a Flux Kustomization ------------------------------------------------------------

    async def _flux_build(
        self, app: AppSource, doc: Document, *, within: _Within
    ) -> list[Document]:
        def error(message: str) -> RenderError:
            return RenderError(f"Kustomization {doc.name}: {message}", file=doc.file, line=doc.line)

        try:
            kustomization = parse_kustomization(doc.obj)
        except KustomizationError as invalid:
            raise error(str(invalid)) from None
        spec = kustomization.spec
        app.depends_on = [*app.depends_on, *(app_name(d.name) for d in spec.depends_on or [])]
        app.options = _options(kustomization)
        app.health_apps = [
            app_name(check.name) for check in spec.health_checks or [] if check.kind in APP_KINDS
        ]
        if spec.kube_config is not None:
            # Another cluster's objects must never land in this one.
            raise error("spec.kubeConfig (another cluster) is not supported")
        if spec.service_account_name:
            app.notes.append(
                f"spec.serviceAccountName {spec.service_account_name!r} is not impersonated; "
                "conveyor applies with its own identity"
            )
        if spec.path is None:
            raise error("spec.path is required (the folder to build)")
        source_root, origin = await self._source_root(kustomization, error)
        relative = PurePosixPath(spec.path.strip())
        target = (source_root / relative).resolve()
        if not target.is_relative_to(source_root.resolve()):
            raise error(f"spec.path {spec.path!r} leaves the source")
        if not target.is_dir():
            raise error(f"spec.path {spec.path!r} does not exist in {origin}")
        if source_root == self.root:
            app.path = str(target.relative_to(self.root)) or "."
        try:
            documents = await self._build(
                target,
                spec=kustomization,
                source_root=source_root,
                secret_ref=_decryption_ref(kustomization),
                shown_as=origin,
            )
        except RenderError as failed:
            # Named by the Kustomization that asked for the build, like any of its errors.
            raise error(f"{failed.file or spec.path}: {failed.detail}") from None
        return await self._post_build(app, kustomization, doc, documents, within=within)

    async def _source_root(
        self, kustomization: FluxKustomization, error: Callable[[str], RenderError]
    ) -> tuple[Path, str]:
        """Where `spec.path` is: this repository at the pinned revision, or a fetched
        GitRepository; and how to name it in messages."""
        ref = kustomization.spec.source_ref
        namespace = ref.namespace or kustomization.namespace
        if ref.kind == "GitRepository" and ref.name == FLUX_SYSTEM:
            return self.root, "the repository"
        source = self.tree.sources.get((ref.kind, namespace, ref.name))
        if source is None:
            raise error(f"sourceRef {ref.kind} {namespace}/{ref.name} is not defined")
        if ref.kind == "GitRepository" and self._is_config_repo(source):
            return self.root, "the repository"
        try:
            return await self.context.charts.source_tree(ref.kind, namespace, ref.name)
        except RenderError as failed:
            if failed.file:
                raise
            raise error(failed.detail) from None

    def _is_config_repo(self, source: Document) -> bool:
        if self.context.config_url is None:
            return False
        try:
            url = GitRepository.model_validate(source.obj).spec.url
        except ValueError:
            return False  # charts.source_tree names what is wrong with it
        mine = normalise_repository_url(self.context.config_url)
        return normalise_repository_url(url) == mine

    async def _post_build(
        self,
        app: AppSource,
        kustomization: FluxKustomization,
        doc: Document,
        documents: list[Document],
        *,
        within: _Within,
    ) -> list[Document]:
        """What kustomize-controller does to a build before applying it, in its order:
        every build of a Flux Kustomization passes here, and only here: decryption (with
        the keys of `spec.decryption.secretRef`, in the Kustomization's namespace), then
        postBuild substitution."""
        decrypted = await self.context.decryptor.decrypt(
            documents,
            secret_ref=_decryption_ref(kustomization),
            verify_mac=False,  # a build rewrites documents: the MAC no longer holds
        )
        return await self._substitute(app, kustomization, doc, decrypted, within=within)

    async def _substitute(
        self,
        app: AppSource,
        kustomization: FluxKustomization,
        doc: Document,
        documents: list[Document],
        *,
        within: _Within,
    ) -> list[Document]:
        """`spec.postBuild`: variables from substituteFrom, then substitute."""
        post_build = kustomization.spec.post_build
        if post_build is None:
            return documents
        variables: dict[str, str] = {}
        unavailable = False
        for ref in post_build.substitute_from or []:
            try:
                data = await self._data(ref.kind, kustomization.namespace, ref.name, within=within)
            except RenderError as error:
                raise RenderError(
                    f"postBuild.substituteFrom {error.detail}", file=doc.file, line=doc.line
                ) from None
            if data is None:
                where = f"postBuild.substituteFrom {ref.kind} {kustomization.namespace}/{ref.name}"
                if ref.optional:
                    continue
                if self.context.data_lookup is None:
                    app.notes.append(f"{where} is not available offline; its variables are kept")
                    unavailable = True
                    continue
                raise RenderError(f"{where} not found", file=doc.file, line=doc.line)
            variables.update(data)
        # Flux: `substitute` wins over what substituteFrom brings.
        variables.update(post_build.substitute or {})
        check_variable_names(sorted(variables), file=doc.file, line=doc.line)
        return substitute_documents(documents, variables, keep_undefined=unavailable)

    async def _data(
        self, kind: DataKind, namespace: str, name: str, *, within: _Within
    ) -> dict[str, str] | None:
        """A ConfigMap's or Secret's data: from the environment folder's own manifests or
        the builds this one is nested in (what is applied before it), else from the
        cluster. Never from a sibling's build, which would depend on which ran first."""
        folder = [d for a in self.tree.apps if a.kind == "manifests" for d in a.documents]
        found = find_data_object([*within.objects, *folder], kind, namespace, name)
        if found is not None:
            return data_entries(found.obj)
        if self.context.data_lookup is None:
            return None
        return await self.context.data_lookup(kind, namespace, name)

    # -- the build ---------------------------------------------------------------------

    async def _build(
        self,
        target: Path,
        *,
        spec: FluxKustomization | None,
        source_root: Path,
        secret_ref: SecretRef | None = None,
        shown_as: str = "",
    ) -> list[Document]:
        """`kubectl kustomize` of a generated overlay around `target` (in `source_root`),
        which carries the Kustomization's fields; documents name the file each object
        came from."""
        scratch = Path(tempfile.mkdtemp(prefix="conveyor-build-"))
        try:
            overlay = scratch / "overlay"
            overlay.mkdir()
            copied: dict[Path, Path] = {}
            shown = str(target.relative_to(self.root)) if target.is_relative_to(self.root) else ""
            mirror = await self._decrypted_copy(
                target, source_root, scratch / "source", secret_ref=secret_ref
            )
            if mirror is not None:
                target = mirror / target.resolve().relative_to(source_root.resolve())
            resource = target
            if not any((target / name).is_file() for name in KUSTOMIZATION_FILES):
                resource = _generate(target, scratch / "generated", copied)
            kustomization = _overlay(overlay, resource, target, spec)
            (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            async with self.slots:
                built = await kustomize_build(
                    overlay,
                    shown_as=shown or shown_as,
                    hide=[
                        f"{scratch}/overlay/",
                        f"{scratch}/source/",
                        f"{self.root}/",
                        f"{scratch}/",
                    ],
                )
            if mirror is not None:
                copied = {**copied, **_mirrored(built, overlay, mirror, source_root)}
            return [self._located(obj, overlay, copied, shown or shown_as) for obj in built]
        finally:
            # The decrypted copy goes with it: plaintext never outlives the build.
            shutil.rmtree(scratch, ignore_errors=True)

    async def _decrypted_copy(
        self, target: Path, source_root: Path, copy: Path, *, secret_ref: SecretRef | None
    ) -> Path | None:
        """When a secretGenerator of the build reads SOPS-encrypted files (`files:`,
        `envs:`): a copy of `source_root` at `copy` with those files decrypted, which the
        build reads instead, as kustomize-controller decrypts them in its working copy
        before building; None when none is encrypted. The checkout is never written."""
        root = source_root.resolve()
        sources = secret_generator_sources(target, root=root)
        decryptor = self.context.decryptor

        async def plaintext(source: GeneratorSource) -> tuple[GeneratorSource, bytes | None]:
            shown = source.path.relative_to(root)
            file = str(shown if root != self.root else source.path.relative_to(self.root))
            fmt = generator_format(source.key, env=source.env)
            text = await decryptor.decrypt_file(source.path, fmt, file=file, secret_ref=secret_ref)
            return source, text

        decrypted = [
            (source, text)
            for source, text in await asyncio.gather(*(plaintext(s) for s in sources))
            if text is not None
        ]
        if not decrypted:
            return None
        await asyncio.to_thread(
            shutil.copytree, root, copy, symlinks=True, ignore=shutil.ignore_patterns(".git")
        )
        for source, text in decrypted:
            written = copy / source.path.relative_to(root)
            written.unlink()
            written.touch(mode=0o600)
            written.write_bytes(text)
        return copy

    def _located(
        self, obj: dict[str, Any], overlay: Path, copied: dict[Path, Path], fallback: str
    ) -> Document:
        """The object without kustomize's origin annotation, with the file and line of
        the document it came from when that file is in the repository."""
        metadata = dict(obj.get("metadata") or {})
        annotations = dict(metadata.get("annotations") or {})
        origin = yaml.safe_load(annotations.pop(ORIGIN_ANNOTATION, "") or "{}") or {}
        if annotations:
            metadata["annotations"] = annotations
        else:
            metadata.pop("annotations", None)
        obj = {**obj, "metadata": metadata}
        path = origin.get("path") if isinstance(origin, dict) and not origin.get("repo") else None
        if not isinstance(path, str):
            return Document(obj=obj, file=fallback, line=0)
        found = (overlay / path).resolve()
        found = copied.get(found, found)
        if not found.is_relative_to(self.root) or not found.is_file():
            return Document(obj=obj, file=fallback, line=0)
        return Document(
            obj=obj, file=str(found.relative_to(self.root)), line=_line_of(found, self.root, obj)
        )

    # -- what a build holds --------------------------------------------------------------

    async def _split(
        self, app: AppSource, documents: list[Document], *, within: _Within
    ) -> list[AppSource]:
        """The build's plain objects into `app`; its HelmReleases and Kustomizations into
        apps that wait for it; its sources into the tree's."""
        plain: list[Document] = []
        children: list[AppSource] = []
        nested: list[AppSource] = []
        for doc in documents:
            if is_helmrelease(doc.obj):
                failed = release_error(doc)
                children.append(
                    AppSource(
                        name=release_app_name(doc, fallback=doc.name),
                        kind="helm",
                        path=doc.file,
                        helm_release=doc if failed is None else None,
                        error=failed,
                        depends_on=[app.name],
                    )
                )
                continue
            checked = checked_document(doc, applied=not is_flux_config(doc))
            if not is_flux_config(checked):
                plain.append(checked)
                continue
            flux_app = flux_object(checked, self.tree)
            if flux_app is not None:
                flux_app.depends_on = [app.name]
                nested.append(flux_app)
        app.documents = plain
        for child in children:
            child.build_objects = plain
        identity = _identity(app)
        inside = _Within(
            chain=(*within.chain, identity) if identity else within.chain,
            objects=(*within.objects, *plain),
        )
        for kustomization in nested:
            if _identity(kustomization) in inside.chain:
                raise RenderError(
                    f"Kustomization {kustomization.name} builds itself: "
                    f"{' → '.join([*inside.chain, str(_identity(kustomization))])}"
                )
        followed = await asyncio.gather(
            *(self.app(k, within=inside) for k in nested if _identity(k) not in self.top_level)
        )
        return [app, *children, *(a for apps in followed for a in apps)]


def _decryption_ref(kustomization: FluxKustomization) -> SecretRef | None:
    """The Secret holding a Kustomization's keys (`spec.decryption.secretRef`), in its
    namespace."""
    decryption = kustomization.spec.decryption
    secret = decryption.secret_ref if decryption is not None else None
    return SecretRef(kustomization.namespace, secret.name) if secret else None


def _mirrored(built: list[Obj], overlay: Path, mirror: Path, source_root: Path) -> dict[Path, Path]:
    """Each file of the decrypted copy that an object came from, mapped back to the
    source's own file, so that the object names the file in the repository."""
    mapped: dict[Path, Path] = {}
    for obj in built:
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        origin = yaml.safe_load(annotations.get(ORIGIN_ANNOTATION, "") or "{}") or {}
        path = origin.get("path") if isinstance(origin, dict) else None
        if isinstance(path, str):
            found = (overlay / path).resolve()
            if found.is_relative_to(mirror.resolve()):
                mapped[found] = source_root.resolve() / found.relative_to(mirror.resolve())
    return mapped


def _identity(app: AppSource) -> str | None:
    if app.kustomization is None:
        return None
    metadata = app.kustomization.obj.get("metadata") or {}
    return f"{metadata.get('namespace') or FLUX_SYSTEM}/{app.kustomization.name}"


def _options(kustomization: FluxKustomization) -> ApplyOptions:
    spec = kustomization.spec
    checks = tuple(
        HealthCheck(
            kind=c.kind,
            name=c.name,
            namespace=c.namespace,
            api_version=c.api_version,
        )
        for c in spec.health_checks or []
        if c.kind not in APP_KINDS
    )
    return ApplyOptions(
        prune=spec.prune,
        # Flux's `wait: true` waits for everything it applied; otherwise only for the
        # named health checks (none: Ready once applied).
        wait_for=None if spec.wait else checks,
        timeout_seconds=spec.timeout,
        suspend=spec.suspend,
        force=spec.force,
    )


def _overlay(
    overlay: Path, resource: Path, target: Path, spec: FluxKustomization | None
) -> dict[str, Any]:
    """The kustomization.yaml around `resource` that applies the Kustomization's fields
    the way kustomize-controller does."""
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(resource, overlay)],
        "buildMetadata": ["originAnnotations"],
    }
    if spec is None:
        return kustomization
    fields = spec.spec
    if fields.target_namespace:
        kustomization["namespace"] = fields.target_namespace
    if fields.name_prefix:
        kustomization["namePrefix"] = fields.name_prefix
    if fields.name_suffix:
        kustomization["nameSuffix"] = fields.name_suffix
    if fields.common_metadata is not None:
        # Flux sets them on the objects alone, never on selectors or pod templates.
        if fields.common_metadata.labels:
            kustomization["labels"] = [
                {
                    "pairs": dict(fields.common_metadata.labels),
                    "includeSelectors": False,
                    "includeTemplates": False,
                }
            ]
        if fields.common_metadata.annotations:
            kustomization["commonAnnotations"] = dict(fields.common_metadata.annotations)
    if fields.components:
        # Relative to spec.path, as Flux reads them.
        kustomization["components"] = [
            os.path.relpath((target / c).resolve(), overlay) for c in fields.components
        ]
    kustomization.update(kustomize_fields(fields.patches, fields.images))
    if fields.patches_strategic_merge:
        kustomization["patches"] = [
            *({"patch": yaml.safe_dump(p)} for p in fields.patches_strategic_merge),
            *kustomization.get("patches", []),
        ]
    return kustomization


def _generate(target: Path, generated: Path, copied: dict[Path, Path]) -> Path:
    """What kustomize-controller does for a folder without kustomization.yaml: a
    kustomization of every manifest below it (a subfolder with its own kustomization is
    one resource). Files are copied next to it, since kustomize reads no file outside
    a kustomization's folder; `copied` maps each copy back to its original."""
    generated.mkdir()
    resources: list[str] = []
    for folder, subfolders, files in os.walk(target):
        here = Path(folder)
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
        if here != target and any((here / name).is_file() for name in KUSTOMIZATION_FILES):
            resources.append(os.path.relpath(here, generated))
            subfolders[:] = []
            continue
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")) or name.startswith("."):
                continue
            original = here / name
            copy = generated / original.relative_to(target)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, copy)
            copied[copy.resolve()] = original.resolve()
            resources.append(str(copy.relative_to(generated)))
    (generated / "kustomization.yaml").write_text(
        yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "resources": resources})
    )
    return generated


def _line_of(path: Path, root: Path, obj: dict[str, Any]) -> int:
    """The line of the document in `path` (a file below `root`) that `obj` was built
    from (its kind, and its name before a prefix or suffix), or 0."""
    try:
        # Relative to the root, as discover reads it: the parsed file is shared.
        documents = load_documents(path, relative_to=root)
    except RenderError:
        return 0
    name = str((obj.get("metadata") or {}).get("name", ""))
    same_kind = [d for d in documents if d.kind == obj.get("kind")]
    for doc in same_kind:
        if doc.name == name:
            return doc.line
    for doc in same_kind:
        if doc.name in name:
            return doc.line
    return same_kind[0].line if same_kind else 0
