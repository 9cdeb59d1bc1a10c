"""Find image automation in a config repository: what to watch and where the tag is written.

Two conventions are read as the teams wrote them:

- Flux v1: objects annotated `fluxcd.io/automated: "true"` (or `flux.weave.works/...`),
  with a filter per container in `filter.fluxcd.io/<c>`, `fluxcd.io/tag.<c>`
  or `flux.weave.works/tag.<c>` (default `glob:*`). In a HelmRelease the image of
  container `chart-image` is `values.image` and that of container `c` is `values.c.image`,
  in the shapes the Helm operator understood (`image: repo:tag`; `image: repo` + `tag`;
  `image: {repository, tag}`; an optional `registry`), or wherever the
  `repository.fluxcd.io/<c>` / `tag.fluxcd.io/<c>` / `registry.fluxcd.io/<c>` annotations
  point. Workloads (Deployment, StatefulSet, DaemonSet, CronJob) name their containers.
- Flux v2: ImageRepository and ImagePolicy objects, and setter comments
  `# {"$imagepolicy": "NS:NAME"}` (the whole `repo:tag`), `NS:NAME:tag` and `NS:NAME:name`
  on any YAML line, in any file under the scanned folder (and, when the repo has
  ImageUpdateAutomation objects, under one of their `spec.update.path`s, as Flux writes).

Discovery only reads; `Watch` is what the registry is asked, `Site` where an answer goes.
An object that is pinned (a Flux v1 lock or a conveyor pin, see `images/pins.py`) still
yields its automation, marked with the pin, so that a scan shows who holds it; nothing is
written to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from conveyor.config.userfile import UserFileError, YamlDocument, validate
from conveyor.config.userfile import read_text as read_user_text
from conveyor.images.pins import FLUX_V1_PREFIXES, Pin, read_pin, truthy
from conveyor.images.policy import PolicyError, TagPolicy, flux_v1_filter, go_regex, image_policy
from conveyor.images.reference import (
    ImageName,
    ImageReferenceError,
    parse_image_name,
)
from conveyor.images.yamltext import (
    Scalar,
    YamlTextError,
    child,
    descend,
    load_documents,
    mapping_items,
    sequence_items,
    setter_comments,
)


class SiteForm(StrEnum):
    tag = "tag"  # the scalar is the tag
    image = "image"  # the scalar is `repository:tag`
    name = "name"  # the scalar is the repository (Flux v2 `:name` setters)


FLUX_V1_AUTOMATED = tuple(f"{prefix}/automated" for prefix in FLUX_V1_PREFIXES)
FLUX_V1_FILTERS = ("filter.fluxcd.io/{}", "fluxcd.io/tag.{}", "flux.weave.works/tag.{}")
FLUX_V1_HELM_APIS = ("helm.fluxcd.io/", "flux.weave.works/")
CHART_IMAGE = "chart-image"
DEFAULT_EXCLUSIONS = (r"^.*\.sig$",)  # Flux v2's default: cosign signatures are not images
_SETTER_FORMS = {"": SiteForm.image, "tag": SiteForm.tag, "name": SiteForm.name}
_WORKLOAD_PODS = {
    "Deployment": "spec.template.spec",
    "StatefulSet": "spec.template.spec",
    "DaemonSet": "spec.template.spec",
    "ReplicaSet": "spec.template.spec",
    "Job": "spec.template.spec",
    "CronJob": "spec.jobTemplate.spec.template.spec",
}


def _split_tag(text: str) -> tuple[str, str | None]:
    """`repo:tag[@digest]` -> (`repo`, `tag`); the digest is dropped with the old tag."""
    base = text.split("@", 1)[0]
    slash, colon = base.rfind("/"), base.rfind(":")
    return (base[:colon], base[colon + 1 :]) if colon > slash else (base, None)


@dataclass(frozen=True)
class Site:
    """One scalar in one file that holds (part of) an image reference."""

    file: str
    scalar: Scalar
    form: SiteForm

    @property
    def tag(self) -> str | None:
        if self.form is SiteForm.tag:
            return self.scalar.value
        if self.form is SiteForm.image:
            return _split_tag(self.scalar.value)[1]
        return None

    def value_for(self, tag: str, *, repository: str) -> str:
        if self.form is SiteForm.tag:
            return tag
        if self.form is SiteForm.image:
            return f"{_split_tag(self.scalar.value)[0]}:{tag}"
        return repository


@dataclass(frozen=True)
class Watch:
    """A question for a registry: this repository's tags, chosen by this policy."""

    image: ImageName
    policy: TagPolicy
    exclude: tuple[re.Pattern[str], ...] = ()
    insecure: bool = False

    def candidates(self, tags: list[str]) -> list[str]:
        return [t for t in tags if not any(p.search(t) for p in self.exclude)]


@dataclass
class Automation:
    kind: str  # "flux-v1" or "flux-v2"
    name: str  # e.g. "HelmRelease ui/ui chart-image", "ImagePolicy flux-system:ui"
    file: str  # where it is declared
    watch: Watch
    repository: str  # the repository as written (what `:name` setters receive)
    sites: list[Site] = field(default_factory=list)
    pin: Pin | None = None  # held by a person: scanned, never written

    @property
    def current(self) -> str | None:
        return next((s.tag for s in self.sites if s.tag is not None), None)


@dataclass(frozen=True)
class Problem:
    file: str
    message: str


@dataclass
class Discovery:
    automations: list[Automation] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def yaml_files(root: Path, folder: str = ".") -> list[Path]:
    """YAML files under `folder`, sorted, skipping hidden directories such as `.git` and
    anything a symlink leads outside the repository (it is never read nor written)."""
    inside = root.resolve()
    files = [
        p
        for p in (root / folder).rglob("*")
        if p.suffix in (".yaml", ".yml")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1])
        and p.resolve().is_relative_to(inside)
    ]
    return sorted(files)


def read_text(path: Path, *, file: str | None = None) -> str:
    """The file as text with every byte (line endings, BOM) preserved on a round trip;
    too large or not UTF-8 is a UserFileError naming `file`."""
    return read_user_text(path, file=file)


# -- what is read of each object, checked before it is used ----------------------------


class _Model(BaseModel):
    # Fields beyond these are the objects' own; numbers are taken where text is (a tag
    # filter `1.2`), as the code before these models did.
    model_config = ConfigDict(extra="allow", populate_by_name=True, coerce_numbers_to_str=True)


class ObjectMeta(_Model):
    name: str | None = None
    namespace: str | None = None
    # Flux v1 reads `fluxcd.io/automated: true` and `"true"` alike: values of any type.
    annotations: dict[str, Any] | None = None


class ObjectHead(_Model):
    api_version: str = Field("", alias="apiVersion")
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)


class _RepositoryRef(_Model):
    name: str
    namespace: str | None = None


class ImagePolicySpec(_Model):
    """What discovery reads; `filterTags` and `policy` are read by `image_policy`, which
    names their problems."""

    image_repository_ref: _RepositoryRef = Field(alias="imageRepositoryRef")


class ImageRepositorySpec(_Model):
    image: str
    exclusion_list: list[str] | None = Field(None, alias="exclusionList")
    insecure: bool | str | None = None


class _Update(_Model):
    path: str | None = None


class ImageUpdateAutomationSpec(_Model):
    update: _Update | None = None


_SPECS: dict[str, type[_Model]] = {
    "ImageRepository": ImageRepositorySpec,
    "ImagePolicy": ImagePolicySpec,
    "ImageUpdateAutomation": ImageUpdateAutomationSpec,
}


def _head(document: YamlDocument, file: str) -> ObjectHead | Problem | None:
    """kind, apiVersion and metadata of a document that is an object (has a `kind`)."""
    data = document.data
    if not isinstance(data, dict) or "kind" not in data:
        return None
    fields = {k: data[k] for k in ("apiVersion", "kind", "metadata") if data.get(k) is not None}
    try:
        return validate(ObjectHead, fields, file=file, node=document.node)
    except UserFileError as error:
        return Problem(file, f"line {error.line}: skipped: {error.detail}")


# -- Flux v1 ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    repository: str  # as written, with the registry prefix if given separately
    site: Site


def _scalar(node: yaml.Node | None) -> Scalar | None:
    return Scalar.of(node) if node is not None else None


def _image_in(mapping: yaml.Node, file: str) -> _Found | None:
    """The Helm operator's image shapes inside one values mapping."""
    image = child(mapping, "image")
    registry = _scalar(child(mapping, "registry"))
    outer_tag = _scalar(child(mapping, "tag"))
    repository: Scalar | None
    if isinstance(image, yaml.MappingNode):
        repository = _scalar(child(image, "repository"))
        registry = _scalar(child(image, "registry")) or registry
        tag = _scalar(child(image, "tag")) or outer_tag
    else:
        repository, tag = _scalar(image), outer_tag
    if repository is None:
        return None
    return _found(repository, tag, registry, file)


def _found(repository: Scalar, tag: Scalar | None, registry: Scalar | None, file: str) -> _Found:
    prefix = f"{registry.value.rstrip('/')}/" if registry and registry.value else ""
    if tag is not None:
        return _Found(prefix + repository.value, Site(file, tag, SiteForm.tag))
    return _Found(prefix + _split_tag(repository.value)[0], Site(file, repository, SiteForm.image))


def _helm_release_images(
    node: yaml.Node, annotations: Mapping[str, Any], file: str
) -> dict[str, _Found]:
    values = descend(node, "spec.values")
    found: dict[str, _Found] = {}
    top = _image_in(values, file) if values is not None else None
    if top:
        found[CHART_IMAGE] = top
    for key, value in mapping_items(values):
        if isinstance(value, yaml.MappingNode) and child(value, "image") is not None:
            sub = _image_in(value, file)
            if sub:
                found[key] = sub
    # Aliases overrule detection: `repository.fluxcd.io/<alias>: dotted.path` under values.
    for key, path in annotations.items():
        if not str(key).startswith("repository.fluxcd.io/"):
            continue
        alias = str(key).split("/", 1)[1]
        repository = _scalar(descend(values, str(path)))
        if repository is None:
            continue
        tag_path = annotations.get(f"tag.fluxcd.io/{alias}")
        registry_path = annotations.get(f"registry.fluxcd.io/{alias}")
        tag = _scalar(descend(values, str(tag_path))) if tag_path else None
        registry = _scalar(descend(values, str(registry_path))) if registry_path else None
        found[alias] = _found(repository, tag, registry, file)
    return found


def _workload_images(node: yaml.Node, kind: str, file: str) -> dict[str, _Found]:
    pod = descend(node, _WORKLOAD_PODS[kind])
    found: dict[str, _Found] = {}
    for list_name in ("initContainers", "containers"):
        for container in sequence_items(child(pod, list_name)):
            name, image = _scalar(child(container, "name")), _scalar(child(container, "image"))
            if name and image:
                found[name.value] = _found(image, None, None, file)
    return found


def _flux_v1(document: YamlDocument, head: ObjectHead, file: str) -> Iterator[Automation | Problem]:
    data = document.data
    metadata = head.metadata
    annotations = metadata.annotations or {}
    if not any(truthy(annotations.get(a)) for a in FLUX_V1_AUTOMATED):
        return
    pin = read_pin(annotations)
    kind = str(data.get("kind"))
    if kind == "HelmRelease" and str(data.get("apiVersion")).startswith(FLUX_V1_HELM_APIS):
        images = _helm_release_images(document.node, annotations, file)
    elif kind in _WORKLOAD_PODS:
        images = _workload_images(document.node, kind, file)
    else:
        return
    namespace = metadata.namespace or "default"
    for container, found in images.items():
        name = f"{kind} {namespace}/{metadata.name} {container}"
        filter_text = next(
            (
                str(annotations[f.format(container)])
                for f in FLUX_V1_FILTERS
                if f.format(container) in annotations
            ),
            "glob:*",
        )
        try:
            policy = flux_v1_filter(filter_text, context=f"{file}: {name}")
            image = parse_image_name(found.repository)
        except (PolicyError, ImageReferenceError) as error:
            yield Problem(file, f"{name}: {error}")
            continue
        yield Automation(
            "flux-v1", name, file, Watch(image, policy), found.repository, [found.site], pin
        )


# -- Flux v2 ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    kind: str  # ImageRepository, ImagePolicy or ImageUpdateAutomation
    file: str
    namespace: str
    name: str
    spec: Mapping[str, Any]  # checked by the kind's model


def _flux_v2_object(
    document: YamlDocument, head: ObjectHead, file: str
) -> _Object | Problem | None:
    kind = head.kind
    if kind not in _SPECS or not head.api_version.startswith("image.toolkit.fluxcd.io/"):
        return None
    spec = document.data.get("spec")
    spec = spec if spec is not None else {}
    try:
        validate(_SPECS[kind], spec, file=file, node=document.node, at=("spec",))
    except UserFileError as error:
        return Problem(file, f"line {error.line}: {kind} {head.metadata.name}: {error.detail}")
    namespace = head.metadata.namespace or "default"
    return _Object(kind, file, namespace, str(head.metadata.name), spec)


def _policy_automation(
    policy: _Object, repositories: Mapping[tuple[str, str], _Object]
) -> Automation | Problem:
    name = f"ImagePolicy {policy.namespace}:{policy.name}"
    reference = policy.spec.get("imageRepositoryRef") or {}
    key = (str(reference.get("namespace") or policy.namespace), str(reference.get("name")))
    repository = repositories.get(key)
    if repository is None:
        return Problem(policy.file, f"{name}: no ImageRepository {key[0]}/{key[1]} in the scan")
    try:
        chooser = image_policy(policy.spec, context=f"{policy.file}: {name}")
        image_text = str(repository.spec.get("image") or "")
        image = parse_image_name(image_text)
        exclusions = repository.spec.get("exclusionList")
        exclude = tuple(
            go_regex(str(p), context=f"{repository.file}: exclusionList")
            for p in (DEFAULT_EXCLUSIONS if exclusions is None else exclusions)
        )
    except (PolicyError, ImageReferenceError) as error:
        return Problem(policy.file, f"{name}: {error}")
    watch = Watch(image, chooser, exclude, truthy(repository.spec.get("insecure")))
    return Automation("flux-v2", name, policy.file, watch, image_text)


@dataclass(frozen=True)
class _Setter:
    file: str
    reference: str
    scalar: Scalar
    document: int  # index of the document holding it, in its file
    pin: Pin | None  # that document's pin


def _document_pin(document: YamlDocument) -> Pin | None:
    """The pin of any document with `metadata.annotations` (a kustomization too)."""
    data = document.data
    metadata = data.get("metadata") if isinstance(data, dict) else None
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    return read_pin(annotations) if isinstance(annotations, dict) else None


def _setters(text: str, documents: list[YamlDocument], file: str) -> Iterator[_Setter]:
    spans = [(d.node.start_mark.index, d.node.end_mark.index) for d in documents]
    pins = [_document_pin(d) for d in documents]
    for setter in setter_comments(text, documents):
        index = next(
            (i for i, (start, end) in enumerate(spans) if start <= setter.scalar.start <= end), 0
        )
        pin = pins[index] if pins else None
        yield _Setter(file, setter.reference, setter.scalar, index, pin)


def _site_owner(
    automation: Automation,
    setter: _Setter,
    pinned: dict[tuple[str, str, int], Automation],
    found: Discovery,
) -> Automation:
    """The automation a setter's site joins: the policy's own, or, in a pinned document,
    a pinned twin of it (one per document) that shows the pin and is never written."""
    if setter.pin is None:
        return automation
    key = (automation.name, setter.file, setter.document)
    if key not in pinned:
        pinned[key] = Automation(
            automation.kind,
            automation.name,
            automation.file,
            automation.watch,
            automation.repository,
            pin=setter.pin,
        )
        found.automations.append(pinned[key])
    return pinned[key]


def discover(root: Path, folder: str = ".") -> Discovery:
    """Every automation under `folder` of the checkout at `root`."""
    found = Discovery()
    repositories: dict[tuple[str, str], _Object] = {}
    policies: list[_Object] = []
    update_paths: list[PurePosixPath] = []
    setters: list[_Setter] = []
    for path in yaml_files(root, folder):
        file = path.relative_to(root).as_posix()
        try:
            text = read_text(path, file=file)
            documents = load_documents(text, file=file)
        except (UserFileError, YamlTextError) as error:
            found.problems.append(Problem(file, f"skipped: {error}"))
            continue
        for document in documents:
            head = _head(document, file)
            if isinstance(head, Problem):
                found.problems.append(head)
                continue
            if head is None:
                continue
            for item in _flux_v1(document, head, file):
                if isinstance(item, Automation):
                    found.automations.append(item)
                else:
                    found.problems.append(item)
            flux_object = _flux_v2_object(document, head, file)
            if isinstance(flux_object, Problem):
                found.problems.append(flux_object)
            elif flux_object is None:
                continue
            elif flux_object.kind == "ImageRepository":
                repositories[(flux_object.namespace, flux_object.name)] = flux_object
            elif flux_object.kind == "ImagePolicy":
                policies.append(flux_object)
            else:
                update = flux_object.spec.get("update") or {}
                update_paths.append(PurePosixPath(str(update.get("path") or ".")))
        setters.extend(_setters(text, documents, file))
    by_reference: dict[str, Automation] = {}
    for policy in policies:
        result = _policy_automation(policy, repositories)
        if isinstance(result, Problem):
            found.problems.append(result)
        else:
            found.automations.append(result)
            by_reference[f"{policy.namespace}:{policy.name}"] = result
    pinned: dict[tuple[str, str, int], Automation] = {}
    for setter in setters:
        file, reference, scalar = setter.file, setter.reference, setter.scalar
        if update_paths and not any(PurePosixPath(file).is_relative_to(p) for p in update_paths):
            continue  # the repo's ImageUpdateAutomations write only under their update.path
        parts = reference.split(":")
        form = (
            _SETTER_FORMS.get(parts[2] if len(parts) == 3 else "") if len(parts) in (2, 3) else None
        )
        automation = by_reference.get(":".join(parts[:2]))
        if form is None or automation is None:
            known = "unknown setter" if form is None else "no such ImagePolicy in the scan"
            found.problems.append(Problem(file, f"line {scalar.line}: {reference!r}: {known}"))
            continue
        _site_owner(automation, setter, pinned, found).sites.append(Site(file, scalar, form))
    # A policy whose every site is pinned is shown by its pinned twins alone.
    held = {twin.name for twin in pinned.values()}
    found.automations = [
        a for a in found.automations if a.pin is not None or a.sites or a.name not in held
    ]
    return found
