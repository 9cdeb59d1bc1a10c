"""A sandbox's file: the candidates of its apps, filled, pinned and labelled, as one file.

Every object carries the label `conveyor.dev/sandbox: <id>` (discovery names a
sandbox's apps by it, and groups each app's objects with its release); each HelmRelease
carries what `stage list` shows (who, when, which ref, pinned, expiry) as annotations,
so the file is the whole record and git its history. Each app gets a Namespace object of
its own when its candidate has none, so that removing the sandbox deletes exactly the
namespaces its apps created.

Pinning follows Cellenics: image automation off (`fluxcd.io/automated: "false"` on a
Flux v1 release, conveyor's pin on others, a Flux v2 ImageUpdateAutomation suspended)
and the chart ref resolved to the commit it names now (`git ls-remote` of the chart's
source, a Flux v1 `chart.git` or a v2 GitRepository). An unpinned app follows its
branch (its pull request's ref).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from conveyor.config.names import UnsafeValueError, git_ref, git_url
from conveyor.config.project import Sandboxes
from conveyor.config.userfile import UserFileError, load_documents, read_text
from conveyor.images.pins import FLUX_V1_PREFIXES, Pin, flux_v1_prefix, pin_annotations
from conveyor.publish.template import Template, TemplateError
from conveyor.render.discover import SANDBOX_LABEL
from conveyor.sandboxes.candidates import Choice, SandboxError
from conveyor.source.git import GitError

STAGED_BY = "conveyor.dev/staged-by"
STAGED_AT = "conveyor.dev/staged-at"
EXPIRES_AT = "conveyor.dev/expires-at"
APP = "conveyor.dev/sandbox-app"
REF = "conveyor.dev/sandbox-ref"
PINNED = "conveyor.dev/sandbox-pinned"
CHART_REF = "conveyor.dev/sandbox-chart-ref"
DIGEST = "conveyor.dev/candidate-digest"
AUTO = "conveyor.dev/sandbox-auto"
HEADER = "# Sandbox {id}, written by `conveyor stage`; `conveyor unstage {id}` removes it.\n"

# (url, ref) → the commit it names, or None: `source.git.remote_commit` in production.
ResolveCommit = Callable[[str, str], str | None]


@dataclass(frozen=True)
class Staging:
    """What a sandbox is made of, besides its candidates."""

    sandbox_id: str
    pins: frozenset[str]
    with_rds: bool
    staged_by: str
    staged_at: str
    expires_at: str | None = None
    auto: bool = False


@dataclass
class SandboxApp:
    app: str
    ref: str
    pinned: bool
    chart_ref: str | None
    namespace: str | None
    release: str | None
    images: list[str] = field(default_factory=list)
    state: str | None = None  # from the cluster's statuses (`stage.cluster_states`)
    message: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "message": self.message,
            "app": self.app,
            "ref": self.ref,
            "pinned": self.pinned,
            "chartRef": self.chart_ref,
            "namespace": self.namespace,
            "release": self.release,
            "images": self.images,
        }


@dataclass
class Sandbox:
    """A sandbox as its file in git describes it."""

    id: str
    file: str
    staged_by: str | None
    staged_at: str | None
    expires_at: str | None
    auto: bool
    digest: str | None
    apps: list[SandboxApp]

    @property
    def state(self) -> str | None:
        """Ready when every app is; else the first app's state that is not."""
        states = [a.state for a in self.apps]
        if any(s is None for s in states):
            return None
        return next((s for s in states if s != "Ready"), "Ready")

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "file": self.file,
            "stagedBy": self.staged_by,
            "stagedAt": self.staged_at,
            "expiresAt": self.expires_at,
            "auto": self.auto,
            "apps": [a.to_dict() for a in self.apps],
        }


def candidates_digest(texts: Mapping[str, str]) -> str:
    """What the candidates held when staged: auto mode restages when it changes."""
    digest = hashlib.sha256()
    for path in sorted(texts):
        digest.update(f"{path}\0{texts[path]}\0".encode())
    return digest.hexdigest()[:16]


def read_candidates(root: Path, choices: list[Choice], config: Sandboxes) -> dict[str, str]:
    """Each choice's candidate text by path; every missing one reported in one error."""
    texts: dict[str, str] = {}
    missing = []
    for choice in choices:
        path = choice.candidate(config)
        if not (root / path).is_file():
            missing.append(f"{choice.app}: no candidate {path} ({choice.label()})")
            continue
        try:
            texts[path] = read_text(root / path, file=path)
        except UserFileError as error:
            missing.append(f"{choice.app}: {error}")
    if missing:
        raise SandboxError("cannot stage:\n  " + "\n  ".join(missing))
    return texts


def build_sandbox(
    texts: Mapping[str, str],
    choices: list[Choice],
    staging: Staging,
    *,
    config: Sandboxes,
    resolve: ResolveCommit,
) -> str:
    """The sandbox's file from its candidates' texts (`read_candidates`)."""
    parts = [HEADER.format(id=staging.sandbox_id)]
    # What the sandbox was asked for: auto mode restages when one of these changes, not
    # when the default branch moves (pinned apps would move with it).
    digest = candidates_digest(
        {c.candidate(config): texts[c.candidate(config)] for c in choices if c.named}
    )
    for choice in choices:
        path = choice.candidate(config)
        parts.append(_app_text(texts[path], path, choice, staging, config, resolve, digest))
    return "".join(parts)


def _filled(text: str, choice: Choice, staging: Staging, config: Sandboxes) -> str:
    marks = config.placeholders
    rds = staging.sandbox_id if staging.with_rds else config.rds_default
    # The RDS marker first: the sandbox marker is a prefix of Cellenics' RDS one.
    text = text.replace(marks.rds_id, rds).replace(marks.sandbox_id, staging.sandbox_id)
    return text.replace(marks.chart_ref, choice.follows)


def _app_text(
    text: str,
    path: str,
    choice: Choice,
    staging: Staging,
    config: Sandboxes,
    resolve: ResolveCommit,
    digest: str,
) -> str:
    try:
        template = Template(_filled(text, choice, staging, config), source=path)
    except TemplateError as error:
        raise SandboxError(str(error)) from None
    documents: list[CommentedMap] = template.documents
    releases = [d for d in documents if d.get("kind") == "HelmRelease"]
    if len(releases) != 1:
        raise SandboxError(f"{path}: a candidate holds one HelmRelease, this one {len(releases)}")
    release = releases[0]
    namespace = _release_namespace(release)
    expected = config.namespace.format(app=choice.app, id=staging.sandbox_id)
    if namespace != expected:
        # Another environment's namespace (the shared `api-default`) must stay untouched.
        raise SandboxError(
            f"{path}: its release would install into {namespace!r}, not the sandbox's "
            f"{expected!r}; the candidate must hold {config.placeholders.sandbox_id}"
        )
    pinned = choice.app in staging.pins
    chart_ref = _chart_ref(documents, release, path, pinned=pinned, resolve=resolve)
    if not any(_is_namespace(d, namespace) for d in documents):
        documents.insert(documents.index(release), _namespace(namespace))
    for document in documents:
        _labels(document)[SANDBOX_LABEL] = DoubleQuotedScalarString(staging.sandbox_id)
        if pinned and document.get("kind") == "ImageUpdateAutomation":
            _mapping(document, "spec")["suspend"] = True
    notes = {
        APP: choice.app,
        REF: choice.ref,
        PINNED: "true" if pinned else "false",
        STAGED_BY: staging.staged_by,
        STAGED_AT: staging.staged_at,
        DIGEST: digest,
    }
    if chart_ref is not None:
        notes[CHART_REF] = chart_ref
    if staging.expires_at:
        notes[EXPIRES_AT] = staging.expires_at
    if staging.auto:
        notes[AUTO] = "true"
    annotations = _annotations(release)
    if pinned:
        notes.update(_pin(annotations, release, staging.sandbox_id))
    for key, value in notes.items():
        annotations[key] = DoubleQuotedScalarString(value)
    rendered = template.render()
    return rendered if rendered.lstrip().startswith("---") else f"---\n{rendered}"


def _pin(annotations: CommentedMap, release: CommentedMap, sandbox_id: str) -> dict[str, str]:
    """Image automation off: Flux v1's `automated: "false"`, else conveyor's pin."""
    prefix = flux_v1_prefix(annotations)
    if prefix is None and str(release.get("apiVersion", "")).startswith("helm.fluxcd.io/"):
        prefix = FLUX_V1_PREFIXES[0]
    if prefix is not None:
        return {f"{prefix}/automated": "false"}
    return pin_annotations(annotations, Pin(by="conveyor stage", reason=f"sandbox {sandbox_id}"))


def _release_namespace(release: CommentedMap) -> str | None:
    spec = release.get("spec")
    target = spec.get("targetNamespace") if isinstance(spec, CommentedMap) else None
    metadata = release.get("metadata")
    own = metadata.get("namespace") if isinstance(metadata, CommentedMap) else None
    value = target or own
    return str(value) if value is not None else None


def _chart_ref(
    documents: list[CommentedMap],
    release: CommentedMap,
    path: str,
    *,
    pinned: bool,
    resolve: ResolveCommit,
) -> str | None:
    """The chart's git ref as the sandbox will hold it; a pinned app's is resolved to a
    SHA in place (Flux v1 `chart.ref`, or the v2 GitRepository's `ref`)."""
    spec = release.get("spec")
    chart = spec.get("chart") if isinstance(spec, CommentedMap) else None
    if not isinstance(chart, CommentedMap):
        return None
    if "git" in chart:  # Flux v1
        ref = str(chart.get("ref") or "master")
        if pinned:
            chart["ref"] = _resolved(resolve, chart["git"], ref, path)
        return str(chart.get("ref", ref))
    source = (chart.get("spec") or {}).get("sourceRef") if isinstance(chart, CommentedMap) else None
    if not isinstance(source, CommentedMap) or source.get("kind") != "GitRepository":
        return None  # a Helm repository or OCI: its version is the ref
    repository = next(
        (
            d
            for d in documents
            if d.get("kind") == "GitRepository"
            and (d.get("metadata") or {}).get("name") == source.get("name")
        ),
        None,
    )
    git_spec = repository.get("spec") if repository is not None else None
    if not isinstance(git_spec, CommentedMap):
        return None
    refs = git_spec.get("ref")
    if not isinstance(refs, CommentedMap) or not refs:
        return None
    if "commit" in refs:
        return str(refs["commit"])
    ref = str(refs.get("name") or refs.get("tag") or refs.get("branch") or "")
    if not pinned or not ref:
        return ref or None
    sha = _resolved(resolve, git_spec.get("url"), ref, path)
    refs.clear()
    refs["commit"] = sha
    return sha


def _resolved(resolve: ResolveCommit, url: object, ref: str, path: str) -> str:
    try:
        sha = resolve(git_url(url, what=f"{path}: chart source"), git_ref(ref, what=f"{path}: ref"))
    except UnsafeValueError as error:
        raise SandboxError(str(error)) from None
    except GitError as error:
        raise SandboxError(f"{path}: cannot read the chart source: {error}") from None
    if sha is None:
        raise SandboxError(f"{path}: the chart source {url} has no ref {ref!r} to pin to")
    return sha


def _is_namespace(document: CommentedMap, name: str | None) -> bool:
    metadata = document.get("metadata")
    return (
        document.get("kind") == "Namespace"
        and isinstance(metadata, CommentedMap)
        and metadata.get("name") == name
    )


def _namespace(name: str | None) -> CommentedMap:
    document = CommentedMap()
    document["apiVersion"] = "v1"
    document["kind"] = "Namespace"
    document["metadata"] = CommentedMap(name=name)
    return document


def _mapping(parent: CommentedMap, key: str) -> CommentedMap:
    """`parent[key]`, made an empty mapping first when it is not one."""
    child = parent.get(key)
    if not isinstance(child, CommentedMap):
        child = CommentedMap()
        parent[key] = child
    return child


def _labels(document: CommentedMap) -> CommentedMap:
    return _mapping(_mapping(document, "metadata"), "labels")


def _annotations(document: CommentedMap) -> CommentedMap:
    return _mapping(_mapping(document, "metadata"), "annotations")


def with_expiry(text: str, expires_at: str, *, source: str) -> str:
    """The sandbox's file with a new expiry (an extended TTL), nothing else changed."""
    template = Template(text, source=source)
    for document in template.documents:
        if document.get("kind") == "HelmRelease":
            _annotations(document)[EXPIRES_AT] = DoubleQuotedScalarString(expires_at)
    return template.render()


def read_sandbox(root: Path, file: str) -> Sandbox | None:
    """The sandbox the file holds, or None for any other file (or one that cannot be
    read: discovery reports that one)."""
    try:
        documents = load_documents(read_text(root / file, file=file), file=file)
    except UserFileError:
        return None
    sandbox: Sandbox | None = None
    for document in documents:
        obj = document.data
        if not isinstance(obj, dict) or obj.get("kind") != "HelmRelease":
            continue
        metadata = obj.get("metadata") or {}
        labels = metadata.get("labels") or {}
        sandbox_id = labels.get(SANDBOX_LABEL) if isinstance(labels, dict) else None
        if not isinstance(sandbox_id, str):
            continue
        notes: dict[str, Any] = metadata.get("annotations") or {}
        if sandbox is None:
            sandbox = Sandbox(
                id=sandbox_id,
                file=file,
                staged_by=notes.get(STAGED_BY),
                staged_at=notes.get(STAGED_AT),
                expires_at=notes.get(EXPIRES_AT),
                auto=notes.get(AUTO) == "true",
                digest=notes.get(DIGEST),
                apps=[],
            )
        spec = obj.get("spec") or {}
        sandbox.apps.append(
            SandboxApp(
                app=str(notes.get(APP) or metadata.get("name")),
                ref=str(notes.get(REF) or ""),
                pinned=notes.get(PINNED) == "true",
                chart_ref=notes.get(CHART_REF),
                namespace=spec.get("targetNamespace") or metadata.get("namespace"),
                release=spec.get("releaseName") or metadata.get("name"),
                images=_images(spec.get("values")),
            )
        )
    return sandbox


def _images(values: object) -> list[str]:
    """`repository:tag` of the release's values (`image: {repository, tag}`, any depth)."""
    found: list[str] = []
    if isinstance(values, dict):
        image = values.get("image")
        if isinstance(image, dict) and image.get("repository"):
            tag = image.get("tag")
            found.append(f"{image['repository']}:{tag}" if tag else str(image["repository"]))
        for key, value in values.items():
            if key != "image":
                found.extend(_images(value))
    elif isinstance(values, list):
        for item in values:
            found.extend(_images(item))
    return found


def read_sandboxes(root: Path, env_path: str) -> list[Sandbox]:
    """The sandboxes of the environment folder, by ID."""
    folder = root / env_path
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.yaml")):
        sandbox = read_sandbox(root, str(path.relative_to(root)))
        if sandbox is not None:
            found.append(sandbox)
    return found
