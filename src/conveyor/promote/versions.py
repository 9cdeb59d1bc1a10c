"""What identifies a release in a config file: image tags, chart version, chart ref.

A promotion copies exactly these fields from one environment to the next and nothing
else, so each environment keeps its own namespace, replicas, roles and image filters.
They are found in Flux v1 and v2 HelmReleases (image tags in values, with or without an
image-policy setter; chart ref or version), in their chart sources (GitRepository tag or
commit, OCIRepository tag), in plain workloads (the tag of each container's image), and
in kustomizations (`images[].newTag`). Files are edited through the same round-trip
template as publishing, so comments, quoting and indentation survive.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import ScalarString

from conveyor.config.userfile import UserFileError, read_text
from conveyor.errors import ConveyorError
from conveyor.images.reference import split_reference
from conveyor.publish.template import PathPart, Template, TemplateError
from conveyor.publish.version import image_tag
from conveyor.render.discover import KUSTOMIZATION_FILES, SKIPPED_FILES, AppSource
from conveyor.render.documents import yaml_files

Role = Literal["image", "chart-version", "chart-ref"]
ROLES: tuple[Role, ...] = ("image", "chart-version", "chart-ref")
WORKLOAD_POD_SPECS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}
# A Docker tag, or a tag and digest, as a version may be written.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
_SETTER_TAG = re.compile(r'\{"\$imagepolicy":\s*"[^"]*:tag"\}')


class VersionError(ConveyorError, ValueError):
    """A file of the app cannot be read or edited; the message names it."""


@dataclass(frozen=True)
class VersionField:
    file: str  # repo-relative path of the file holding it
    document: int  # index of the document in that file
    label: str  # Kind/name of the document, for messages
    path: tuple[PathPart, ...]  # to the scalar inside the document
    field: str  # the field as people read it, e.g. spec.values.image.tag
    role: Role
    value: str  # the version: an image's tag (and digest), a chart version or ref
    image: str | None = None  # for `repository:tag` strings, the repository kept on edit

    @property
    def key(self) -> str:
        """Names the same field in another environment's copy of the app."""
        return f"{self.label}:{self.field}"

    @property
    def loose_key(self) -> str:
        """As `key` without the document's name, for apps named per environment."""
        return f"{self.label.split('/', 1)[0]}:{self.field}"


@dataclass(frozen=True)
class AppVersion:
    app: str
    path: str
    fields: tuple[VersionField, ...]

    @property
    def version(self) -> str | None:
        """The app's version: its first image tag, else its chart version, else its ref."""
        for role in ROLES:
            for found in self.fields:
                if found.role == role:
                    return found.value
        return None

    @property
    def identity(self) -> frozenset[tuple[str, str]]:
        """What identifies the release: every version field and its value. Gates judge a
        change of it; a change that keeps it (replicas, an env var) is not a new release."""
        return frozenset((f.key, f.value) for f in self.fields)


@dataclass(frozen=True)
class FieldChange:
    field: VersionField  # the field in the file being edited
    new: str


def split_image(reference: str) -> tuple[str, str]:
    """`registry:5000/app:1.2@sha256:..` → (`registry:5000/app`, `1.2@sha256:..`)."""
    repository, tag, digest = split_reference(reference)
    return repository, (tag or "") + (f"@{digest}" if digest is not None else "")


def join_image(repository: str, version: str) -> str:
    return f"{repository}{'' if version.startswith('@') else ':'}{version}"


def check_version(version: str) -> str:
    """The image tag that `version` (a release's git tag or an image tag) deploys, see
    `image_tag`; VersionError when it cannot be an image tag."""
    version = image_tag(version)
    if not VERSION_PATTERN.match(version):
        raise VersionError(
            f"version {version!r} is not a valid image tag (letters, digits, _ . + -; at most 128)"
        )
    return version


# -- reading -------------------------------------------------------------------------


def app_files(repo_root: Path, app: AppSource) -> list[str]:
    """The repo-relative files that make up an app (a folder app: its own files only)."""
    target = repo_root / app.path
    if target.is_file():
        return [app.path]
    files = [p for p in yaml_files(target) if p.name not in SKIPPED_FILES]
    files += [
        target / name
        for name in KUSTOMIZATION_FILES
        if (target / name).is_file() and not name.endswith((".yaml", ".yml"))
    ]
    return [str(p.relative_to(repo_root)) for p in files]


def load_template(repo_root: Path, file: str) -> Template | None:
    """The file's documents for reading and editing; None for a file with none."""
    try:
        text = read_text(repo_root / file, file=file)
        if not text.strip():
            return None
        return Template(text, source=file)
    except UserFileError as error:
        raise VersionError(str(error)) from None
    except TemplateError as error:
        if "no YAML documents" in str(error):
            return None
        raise VersionError(str(error)) from None


def read_app_version(repo_root: Path, app: AppSource) -> AppVersion:
    fields: list[VersionField] = []
    release_name = app.helm_release.name if app.helm_release is not None else None
    for file in app_files(repo_root, app):
        template = load_template(repo_root, file)
        if template is None:
            continue
        documents = template.documents
        sources = _chart_sources(documents, release_name) if release_name else None
        for index, document in enumerate(documents):
            kind = _kind(document, file)
            name = str((document.get("metadata") or {}).get("name") or "")
            if release_name is not None:
                # A file may hold several releases; this app is one of them and its sources.
                if kind == "HelmRelease" and name != release_name:
                    continue
                if kind != "HelmRelease" and (kind, name) not in (sources or set()):
                    continue
            fields.extend(_document_fields(document, kind, name, file=file, index=index))
    return AppVersion(app=app.name, path=app.path, fields=tuple(fields))


def _kind(document: CommentedMap, file: str) -> str:
    kind = document.get("kind")
    if not kind and Path(file).name in KUSTOMIZATION_FILES:
        return "Kustomization"
    return str(kind or "")


def _chart_sources(documents: list[Any], release_name: str) -> set[tuple[str, str]]:
    """(kind, name) of the chart sources the named HelmRelease refers to."""
    for document in documents:
        metadata = document.get("metadata") or {}
        if document.get("kind") != "HelmRelease" or metadata.get("name") != release_name:
            continue
        spec = document.get("spec") or {}
        chart_spec = (spec.get("chart") or {}).get("spec") or {}
        refs = [chart_spec.get("sourceRef") or {}, spec.get("chartRef") or {}]
        return {(str(r.get("kind")), str(r.get("name"))) for r in refs if r.get("name")}
    return set()


def _get(node: Any, path: tuple[PathPart, ...]) -> Any:
    for part in path:
        if isinstance(node, CommentedMap) and isinstance(part, str):
            node = node.get(part)
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _document_fields(
    document: CommentedMap, kind: str, name: str, *, file: str, index: int
) -> Iterator[VersionField]:
    label = f"{kind}/{name}" if name else kind

    def found(
        path: tuple[PathPart, ...], field: str, role: Role, value: Any, image: str | None = None
    ) -> VersionField:
        return VersionField(file, index, label, path, field, role, str(value), image)

    if kind == "HelmRelease":
        base: tuple[PathPart, ...] = ("spec", "values")
        yield from _value_images(_get(document, base), base, "spec.values", found)
        chart = _get(document, ("spec", "chart"))
        if isinstance(chart, CommentedMap):
            if chart.get("git") and _scalar(chart.get("ref")):
                yield found(("spec", "chart", "ref"), "spec.chart.ref", "chart-ref", chart["ref"])
            if chart.get("repository") and _scalar(chart.get("version")):
                yield found(
                    ("spec", "chart", "version"),
                    "spec.chart.version",
                    "chart-version",
                    chart["version"],
                )
            version = _get(chart, ("spec", "version"))
            if _scalar(version):
                path: tuple[PathPart, ...] = ("spec", "chart", "spec", "version")
                yield found(path, "spec.chart.spec.version", "chart-version", version)
    elif kind in ("GitRepository", "OCIRepository"):
        ref = _get(document, ("spec", "ref"))
        keys = (
            ("tag", "semver", "commit") if kind == "GitRepository" else ("tag", "semver", "digest")
        )
        role: Role = "chart-ref" if kind == "GitRepository" else "chart-version"
        if isinstance(ref, CommentedMap):
            for key in keys:
                if _scalar(ref.get(key)):
                    yield found(("spec", "ref", key), f"spec.ref.{key}", role, ref[key])
    elif kind in WORKLOAD_POD_SPECS:
        pod_path = WORKLOAD_POD_SPECS[kind]
        for list_name in ("initContainers", "containers"):
            containers = _get(document, (*pod_path, list_name))
            if not isinstance(containers, CommentedSeq):
                continue
            for position, container in enumerate(containers):
                image = container.get("image") if isinstance(container, CommentedMap) else None
                if not isinstance(image, str):
                    continue
                repository, version = split_image(image)
                if version:
                    field = f"{'.'.join(pod_path)}.{list_name}[{container.get('name')}].image"
                    path = (*pod_path, list_name, position, "image")
                    yield found(path, field, "image", version, repository)
    elif kind == "Kustomization":
        images = document.get("images")
        if isinstance(images, CommentedSeq):
            for position, entry in enumerate(images):
                if not isinstance(entry, CommentedMap):
                    continue
                for key in ("newTag", "digest"):
                    if _scalar(entry.get(key)):
                        field = f"images[{entry.get('name')}].{key}"
                        yield found(("images", position, key), field, "image", entry[key])


def _value_images(
    node: Any, path: tuple[PathPart, ...], field: str, found: Callable[..., VersionField]
) -> Iterator[VersionField]:
    """Image versions in Helm values: `tag` beside a `repository` or under an `*image*`
    key or with an image-policy setter, and `image: repository:tag` strings."""
    if isinstance(node, CommentedSeq):
        for position, item in enumerate(node):
            yield from _value_images(item, (*path, position), f"{field}[{position}]", found)
        return
    if not isinstance(node, CommentedMap):
        return
    parent_key = str(path[-1]) if path and isinstance(path[-1], str) else ""
    for key, value in node.items():
        child_path, child_field = (*path, str(key)), f"{field}.{key}"
        if isinstance(value, CommentedMap | CommentedSeq):
            yield from _value_images(value, child_path, child_field, found)
            continue
        if key == "tag" and _scalar(value) and str(value):
            comment = node.ca.items.get(key)
            token = comment[2] if comment and len(comment) > 2 else None
            setter = token is not None and bool(_SETTER_TAG.search(token.value))
            if setter or "repository" in node or "image" in parent_key.lower():
                yield found(child_path, child_field, "image", value)
        elif str(key).lower().endswith("image") and isinstance(value, str):
            repository, version = split_image(value)
            if version:
                yield found(child_path, child_field, "image", version, repository)


# -- planning and editing ------------------------------------------------------------


def _index(
    fields: tuple[VersionField, ...],
) -> tuple[dict[str, VersionField], dict[str, VersionField]]:
    exact = {f.key: f for f in fields}
    loose: dict[str, list[VersionField]] = {}
    for f in fields:
        loose.setdefault(f.loose_key, []).append(f)
    return exact, {k: v[0] for k, v in loose.items() if len(v) == 1}


def plan_copy(source: AppVersion, target: AppVersion) -> list[FieldChange]:
    """The target's fields set to the source's values, matched field by field (by
    document kind alone when names differ per environment and the match is unique)."""
    exact, loose = _index(source.fields)
    _, target_loose = _index(target.fields)
    changes = []
    for field in target.fields:
        match = exact.get(field.key)
        if match is None and field.loose_key in target_loose:
            match = loose.get(field.loose_key)
        if match is not None and match.role == field.role and match.value != field.value:
            changes.append(FieldChange(field, match.value))
    return changes


def plan_set(target: AppVersion, version: str) -> list[FieldChange]:
    """The app's images at `version`: every image that carries the app's current version
    (all images of a build share its tag), not third-party sidecars pinned on their own."""
    current = target.version
    return [
        FieldChange(f, version)
        for f in target.fields
        if f.role == "image" and f.value == current and f.value != version
    ]


def apply_changes(repo_root: Path, changes: list[FieldChange]) -> list[str]:
    """Write the changes into their files, preserving formatting; the files changed."""
    by_file: dict[str, list[FieldChange]] = {}
    for change in changes:
        by_file.setdefault(change.field.file, []).append(change)
    written = []
    for file, file_changes in by_file.items():
        template = load_template(repo_root, file)
        if template is None:
            raise VersionError(f"{file}: has no documents any more")
        for change in file_changes:
            _set(template.documents[change.field.document], change)
        (repo_root / file).write_text(template.render())
        written.append(file)
    return written


def _set(document: CommentedMap, change: FieldChange) -> None:
    field = change.field
    parent = _get(document, field.path[:-1])
    last = field.path[-1]
    if isinstance(parent, CommentedMap) and isinstance(last, str) and last in parent:
        old = parent[last]
    elif isinstance(parent, CommentedSeq) and isinstance(last, int) and last < len(parent):
        old = parent[last]
    else:
        raise VersionError(f"{field.file}: {field.label} {field.field} is gone")
    text = join_image(field.image, change.new) if field.image is not None else change.new
    parent[last] = type(old)(text) if isinstance(old, ScalarString) else text
    # An end-of-line comment keeps its distance from the value, not its column.
    entry = parent.ca.items.get(last)
    token = (entry[2] if isinstance(parent, CommentedMap) else entry[0]) if entry else None
    if token is not None and hasattr(token, "column"):
        token.column = max(0, token.column + len(text) - len(str(old)))
