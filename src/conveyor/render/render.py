"""Render one app into what should exist: plain objects to apply, and a Helm plan.

The output carries a fingerprint of everything that decides the result (objects, chart
digest, values, release identity). When it equals the fingerprint of the last applied
revision and the cluster shows no drift, the app costs no API write and no Helm call.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic_core import PydanticCustomError

from conveyor.cluster.client import UnknownKindError
from conveyor.cluster.objects import Obj
from conveyor.config.helmrelease import (
    DriftMode,
    HelmReleaseError,
    HelmReleaseSpec,
    ValuesReference,
    parse_helmrelease,
)
from conveyor.config.validation import json_compatible
from conveyor.paths import charts_cache
from conveyor.render.charts import ChartResolver, ResolvedChart
from conveyor.render.data_objects import data_value, find_data_object
from conveyor.render.discover import AppSource, EnvironmentTree
from conveyor.render.documents import Document, RenderError
from conveyor.render.flux_kustomization import BuildContext, DataLookup, expand
from conveyor.render.helm import HelmCLI
from conveyor.render.sops import Decryptor, KeySource

ValuesLookup = Callable[[ValuesReference], Awaitable[str | None]]


@dataclass(frozen=True)
class HelmPlan:
    spec: HelmReleaseSpec
    chart: ResolvedChart
    values: dict[str, Any]  # may hold secrets from valuesFrom: never log it


@dataclass
class RenderedApp:
    source: AppSource
    objects: list[Obj]
    helm: HelmPlan | None
    fingerprint: str
    depends_on: list[str]
    suspend: bool
    drift: DriftMode
    # What the render had to leave out, e.g. valuesFrom that cannot be read offline.
    notes: list[str] = field(default_factory=list)
    # Where `objects` came from, one document each (a kustomization's: its folder).
    documents: list[Document] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source.name

    def located(self, error: UnknownKindError) -> UnknownKindError:
        """`error` naming the file and line of the app's first object of that kind."""
        for doc in self.documents:
            if (doc.api_version, doc.kind) == (error.api_version, error.kind):
                return error.at(doc.file, doc.line or None)
        return error

    @property
    def empty(self) -> bool:
        return not self.objects and self.helm is None


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge: maps merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_path(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    result = copy.deepcopy(values)
    node = result
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def fingerprint(payload: Any) -> str:
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


def _annotation(documents: list[Document], key: str) -> str | None:
    for doc in documents:
        value = (doc.obj.get("metadata", {}).get("annotations") or {}).get(key)
        if value is not None:
            return str(value)
    return None


class Renderer:
    def __init__(
        self,
        repo_root: Path,
        *,
        charts: ChartResolver,
        values_lookup: ValuesLookup,
        drift_default: DriftMode = "enabled",
        offline: bool = False,
        decryptor: Decryptor | None = None,
        data_lookup: DataLookup | None = None,
        config_url: str | None = None,
    ) -> None:
        """`offline`: valuesFrom that `values_lookup` cannot find are left out and noted
        on the app instead of failing it (a diff rendered without a cluster).
        `decryptor`: SOPS-encrypted documents are decrypted with it (by default with
        the local keys, see render/sops.py).
        `data_lookup` reads ConfigMaps and Secrets of the cluster for a Flux
        Kustomization's postBuild (None: there is no cluster); `config_url` is the
        config repo, which a Kustomization's GitRepository may name."""
        self.repo_root = repo_root
        self.charts = charts
        self.values_lookup = values_lookup
        self.drift_default = drift_default
        self.offline = offline
        self.decryptor = decryptor or Decryptor(KeySource())
        self.data_lookup = data_lookup
        self.config_url = config_url

    @classmethod
    def of_tree(
        cls,
        repo_root: Path,
        tree: EnvironmentTree,
        helm: HelmCLI,
        *,
        values_lookup: ValuesLookup,
        offline: bool = False,
        decryptor: Decryptor | None = None,
        data_lookup: DataLookup | None = None,
        config_url: str | None = None,
    ) -> Renderer:
        """A renderer of `tree` (discovered below `repo_root`) whose charts come from the
        tree's sources and are kept in conveyor's chart cache."""
        charts = ChartResolver(charts_cache(), helm, tree.sources)
        charts.cache_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            repo_root,
            charts=charts,
            values_lookup=values_lookup,
            offline=offline,
            decryptor=decryptor,
            data_lookup=data_lookup,
            config_url=config_url,
        )

    async def expand(self, tree: EnvironmentTree) -> None:
        """Run the tree's kustomize builds, which decide its apps (once per tree)."""
        context = BuildContext(
            repo_root=self.repo_root,
            charts=self.charts,
            data_lookup=self.data_lookup,
            decryptor=self.decryptor,
            config_url=self.config_url,
        )
        await expand(tree, context)

    async def render(self, app: AppSource) -> RenderedApp:
        """The app's objects and Helm plan. A kustomize app renders what `expand` built."""
        if app.error is not None:
            raise app.error
        # A kustomize app's documents are its build, decrypted as it was built
        # (render/flux_kustomization.py); the other layouts' files are decrypted here.
        if app.kind == "kustomize":
            documents = app.documents
        else:
            documents = await self.decryptor.decrypt(app.documents)
        objects = [doc.obj for doc in documents]
        drift_text = _annotation(documents, "conveyor.dev/drift") or self.drift_default
        if drift_text not in ("enabled", "warn", "disabled"):
            raise RenderError(
                f"conveyor.dev/drift must be enabled, warn or disabled, not {drift_text!r}",
                file=app.path,
            )
        drift = cast(DriftMode, drift_text)
        if app.helm_release is None:
            return RenderedApp(
                source=app,
                objects=objects,
                helm=None,
                fingerprint=fingerprint({"objects": objects}),
                depends_on=list(app.depends_on),
                suspend=app.options.suspend,
                drift=drift,
                documents=documents,
                notes=list(app.notes),
            )
        release_doc = app.helm_release
        try:
            spec = parse_helmrelease(release_doc.obj)
        except HelmReleaseError as error:
            raise RenderError(str(error), file=release_doc.file, line=release_doc.line) from None
        chart = await self._chart(spec, release_doc)
        values, notes = await self._values(spec, release_doc, [*documents, *app.build_objects])
        plan = HelmPlan(spec=spec, chart=chart, values=values)
        identity = {
            "objects": objects,
            "chart": chart.digest,
            "values": values,
            "release": spec.release_name,
            "namespace": spec.target_namespace,
            **({"postRenderers": spec.post_renderers} if spec.post_renderers else {}),
        }
        return RenderedApp(
            source=app,
            objects=objects,
            helm=plan,
            fingerprint=fingerprint(identity),
            depends_on=[*app.depends_on, *(d for d in spec.depends_on if d not in app.depends_on)],
            suspend=spec.suspend,
            drift=spec.drift,
            notes=[*app.notes, *notes],
            documents=documents,
        )

    async def _chart(self, spec: HelmReleaseSpec, doc: Document) -> ResolvedChart:
        try:
            return await self.charts.resolve(spec)
        except RenderError as error:
            if error.file:  # a source object's own file and line
                raise
            raise RenderError(error.detail, file=doc.file, line=doc.line) from None

    async def _values(
        self, spec: HelmReleaseSpec, doc: Document, documents: list[Document]
    ) -> tuple[dict[str, Any], list[str]]:
        """The release's values: valuesFrom in order, from the app's own documents or
        the kustomize build it came from when they hold the ConfigMap or Secret
        (decrypted, if SOPS-encrypted; as it will be applied), else from the cluster;
        then spec.values."""
        values: dict[str, Any] = {}
        notes = [
            f"{unread} is not supported; rendered without it" for unread in spec.unread_values_from
        ]
        for ref in spec.values_from:
            own = find_data_object(documents, ref.kind, ref.namespace, ref.name)
            try:
                if own is not None:
                    text = data_value(own.obj, ref.key)
                else:
                    text = await self.values_lookup(ref)
            except RenderError as error:
                raise RenderError(
                    f"valuesFrom {error.detail}", file=doc.file, line=doc.line
                ) from None
            if text is None:
                if ref.optional:
                    continue
                if self.offline:
                    notes.append(
                        f"valuesFrom {ref.kind} {ref.namespace}/{ref.name} key {ref.key!r} "
                        "is not available offline; rendered without it"
                    )
                    continue
                raise RenderError(
                    f"valuesFrom {ref.kind} {ref.namespace}/{ref.name} key {ref.key!r} not found",
                    file=doc.file,
                    line=doc.line,
                )
            if ref.target_path:
                values = set_path(values, ref.target_path, text)
                continue
            where = f"valuesFrom {ref.kind} {ref.name} key {ref.key!r}"
            try:
                loaded = json_compatible(yaml.safe_load(text) or {})
            except yaml.YAMLError:
                # Never echo the content: it may come from a Secret.
                raise RenderError(
                    f"{where} is not valid YAML", file=doc.file, line=doc.line
                ) from None
            except PydanticCustomError as error:
                path = str((error.context or {}).get("inside", "")).removeprefix(".")
                raise RenderError(
                    f"{where}: {path or 'values'}: {error.message()}", file=doc.file, line=doc.line
                ) from None
            if not isinstance(loaded, dict):
                raise RenderError(
                    f"valuesFrom {ref.kind} {ref.name} key {ref.key!r} is not a mapping",
                    file=doc.file,
                    line=doc.line,
                )
            values = merge_values(values, loaded)
        return merge_values(values, spec.values), notes
