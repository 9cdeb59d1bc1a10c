"""The plan phase: what one reconcile does to an app, as one value that the engine
applies and `conveyor diff` shows, so that what a diff shows is what a pass does.

`plan_app` builds it from a rendered app, its status and the environment's identity and
scope: the app's objects as this environment applies them (labelled with its identity),
their namespaced identities, its Helm release if it has one, and what it prunes (the
objects of its inventory it no longer has, `cluster/inventory.left_behind`). The
engine's actions apply exactly that (reconcile/actions/apply.py). `plan_environment`
shows it without writing: a server-side dry run of the objects (cluster/diff.py),
`helm template` of the release (Flux cannot show those), the deletions of the prune set,
and the apps that left git as deleted, unless a render failed (then nothing is pruned).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from conveyor.cluster.apply import labelled, namespaced_ref
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.diff import ObjectChange, diff_deletions, diff_objects
from conveyor.cluster.inventory import left_behind
from conveyor.cluster.objects import Obj, ObjectRef, builtin_cluster_scoped
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.reconcile.status import SOURCE_KIND, AppStatus, StatusStore, split_release
from conveyor.render.discover import EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError, parse_manifest
from conveyor.render.render import HelmPlan, RenderedApp, Renderer

# An app's objects with their identities: what drift and health are judged on.
Desired = list[tuple[ObjectRef, Obj]]


@dataclass(frozen=True)
class AppPlan:
    """What a reconcile of `app` applies and prunes. `objects` and `refs` are in the same
    order; `prune` is empty for an app with a Helm release (Helm prunes its own)."""

    app: RenderedApp
    objects: list[Obj]  # as applied: labelled with the app and the environment
    refs: list[ObjectRef]  # each object's identity, with the namespace it really gets
    prune: list[ObjectRef]  # what the app applied before and no longer has

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def helm(self) -> HelmPlan | None:
        return self.app.helm

    @property
    def desired(self) -> Desired:
        return list(zip(self.refs, self.objects, strict=True))


async def plan_app(
    kube: KubeClient,
    app: RenderedApp,
    status: AppStatus | None,
    *,
    identity: EnvironmentIdentity,
    scope: str,
    prune: bool = True,
) -> AppPlan:
    """The plan for `app` given what its status says was applied before (None: nothing
    was). Reads discovery only (for namespaces); writes nothing."""
    objects = [labelled(o, app=app.name, identity=identity, scope=scope) for o in app.objects]
    refs = [await namespaced_ref(kube, o) for o in objects]
    gone: list[ObjectRef] = []
    # A Flux Kustomization with `prune: false` leaves what left it in place.
    if prune and app.source.options.prune and status is not None and app.helm is None:
        gone = left_behind(status.inventory, refs)
    return AppPlan(app=app, objects=objects, refs=refs, prune=gone)


def apps_left(statuses: Mapping[str, AppStatus], present: Collection[str]) -> list[AppStatus]:
    """This environment's apps that left git (never its source's own status)."""
    return [s for name, s in statuses.items() if s.kind != SOURCE_KIND and name not in present]


@dataclass
class PlanDiff:
    """How an app's plan (or an app that left git) would change the cluster."""

    app: str
    changes: list[ObjectChange] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


async def helm_objects(rendered: RenderedApp, helm: HelmCLI) -> list[Obj]:
    """The objects of the app's Helm release as `helm template` renders them, in the
    release's namespace; none for an app without a release. HelmError when the chart
    does not render."""
    if rendered.helm is None:
        return []
    spec = rendered.helm.spec
    manifest = await helm.template(
        spec.release_name,
        spec.target_namespace,
        rendered.helm.chart.path,
        rendered.helm.values,
        post_renderers=spec.post_renderers,
    )
    return namespaced(parse_manifest(manifest), spec.target_namespace)


def namespaced(objects: list[Obj], namespace: str) -> list[Obj]:
    """Rendered chart objects without a namespace get the release's, as Helm installs them:
    Helm counts an empty one (`namespace: ""`, or a value that rendered to nothing) as
    none. Kubernetes' cluster-scoped kinds get none."""
    for obj in objects:
        metadata = obj.get("metadata")
        if not isinstance(metadata, dict):
            metadata = obj["metadata"] = {}
        if builtin_cluster_scoped(obj):
            metadata.pop("namespace", None)
        elif not metadata.get("namespace"):
            metadata["namespace"] = namespace
    return objects


async def plan_environment(
    tree: EnvironmentTree,
    renderer: Renderer,
    kube: KubeClient,
    helm: HelmCLI,
    *,
    identity: EnvironmentIdentity,
    only: str | None = None,
) -> list[PlanDiff]:
    """The diff of every app's plan (or only of the app named `only`), and of the apps
    of this environment that left git (their deletions)."""
    await renderer.expand(tree)
    store = StatusStore(kube)
    scope = await store.scope_for(identity, scope=identity.name)
    statuses, legacy = await store.load_environment(identity, scope=scope)
    if only is not None:
        statuses = {n: s for n, s in statuses.items() if n == only}
    diffs = []
    render_failed = False
    for app in tree.apps:
        if only is not None and app.name != only:
            continue
        diff = PlanDiff(app=app.name)
        diffs.append(diff)
        try:
            rendered = await renderer.render(app)
        except RenderError as error:
            diff.error = str(error)
            render_failed = True
            continue
        diff.notes = list(rendered.notes)
        try:
            # The engine's status for the app: its own, or one from before identities.
            previous = statuses.get(app.name) or legacy.get(app.name)
            plan = await plan_app(kube, rendered, previous, identity=identity, scope=scope)
            try:
                release = await helm_objects(rendered, helm)
            except HelmError as error:
                diff.error = f"helm template: {error.message}"
                continue
            diff.changes = await diff_objects(kube, plan.objects + release)
            if rendered.empty and plan.prune:
                # The engine's EmptyRender: an app is emptied only when that is asked for.
                diff.notes.append(
                    f"renders no objects: its {len(plan.prune)} objects are pruned only "
                    f"with conveyor reconcile --allow-empty {app.name}"
                )
            else:
                diff.changes.extend(await diff_deletions(kube, plan.prune))
        except UnknownKindError as error:
            diff.error = str(rendered.located(error))
        except ApiError as error:
            diff.error = str(error)
    for status in apps_left(statuses, {a.name for a in tree.apps}):
        if render_failed:
            diffs.append(
                PlanDiff(app=status.app, notes=["left git; not pruned while a render fails"])
            )
        else:
            diffs.append(PlanDiff(app=status.app, changes=_removal(status)))
    return diffs


def _removal(status: AppStatus) -> list[ObjectChange]:
    """What pruning an app that left git deletes (reconcile/actions/prune.py)."""
    changes = [
        ObjectChange(ref, "delete", f"--- live/{ref}\n+++ /dev/null\n") for ref in status.inventory
    ]
    if status.release:
        changes.append(
            ObjectChange(
                ObjectRef("helm.sh/v3", "Release", *split_release(status.release)),
                "delete",
                f"helm uninstall {status.release}\n",
            )
        )
    return changes


def render_text(diffs: list[PlanDiff]) -> str:
    lines = []
    for diff in diffs:
        if diff.error:
            lines.append(f"# {diff.app}: error: {diff.error}\n")
        lines.extend(f"# {diff.app}: note: {note}\n" for note in diff.notes)
        for change in diff.changes:
            lines.append(f"# {diff.app}: {change.action} {change.ref}\n{change.diff}")
    return "".join(lines)


def render_markdown(diffs: list[PlanDiff], *, title: str) -> str:
    out = [f"## conveyor diff: {title}\n"]
    changed = [d for d in diffs if d.changes or d.error]
    if not changed:
        out.append("\nNo changes.\n")
    for diff in changed:
        out.append(f"\n### {diff.app}\n")
        if diff.error:
            out.append(f"\n**Error:** {diff.error}\n")
        out.extend(f"\n_Note:_ {note}\n" for note in diff.notes)
        if diff.changes:
            summary = ", ".join(f"{c.action} {c.ref}" for c in diff.changes)
            out.append(f"\n{summary}\n\n```diff\n")
            out.extend(c.diff if c.diff.endswith("\n") else c.diff + "\n" for c in diff.changes)
            out.append("```\n")
    return "".join(out)
