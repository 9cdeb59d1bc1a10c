"""What a reconcile would change, without changing it: desired against live.

Each app is rendered as the engine renders it, and its objects are compared with the
cluster through a server-side dry run (`cluster/diff.py`); HelmReleases are rendered
with `helm template` (Flux cannot show those), and what left git shows as deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.cluster.apply import labelled, namespaced_ref
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.diff import ObjectChange, diff_deletions, diff_objects
from conveyor.cluster.inventory import left_behind
from conveyor.cluster.objects import Obj, ObjectRef, builtin_cluster_scoped
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.reconcile.status import StatusStore, split_release
from conveyor.render.discover import EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError, parse_manifest
from conveyor.render.render import RenderedApp, Renderer


@dataclass
class AppPlan:
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
) -> list[AppPlan]:
    """Plans for every app of the tree (or only the app named `only`), and for the apps
    of this environment that left git (their deletions)."""
    await renderer.expand(tree)
    store = StatusStore(kube)
    scope = await store.scope_for(identity, scope=identity.name)
    statuses, legacy = await store.load_environment(identity, scope=scope)
    if only is not None:
        statuses = {n: s for n, s in statuses.items() if n == only}
    plans = []
    for app in tree.apps:
        if only is not None and app.name != only:
            continue
        plan = AppPlan(app=app.name)
        plans.append(plan)
        try:
            rendered = await renderer.render(app)
        except RenderError as error:
            plan.error = str(error)
            continue
        plan.notes = rendered.notes
        labelled_objects = [
            labelled(o, app=app.name, identity=identity, scope=scope) for o in rendered.objects
        ]
        try:
            objects = labelled_objects + await helm_objects(rendered, helm)
        except HelmError as error:
            plan.error = f"helm template: {error.message}"
            continue
        try:
            plan.changes = await diff_objects(kube, objects)
        except UnknownKindError as error:
            plan.error = str(rendered.located(error))
            continue
        except ApiError as error:
            plan.error = str(error)
            continue
        previous = statuses.get(app.name) or legacy.get(app.name)
        if previous is not None and rendered.helm is None:
            wanted = [await namespaced_ref(kube, o) for o in objects]
            gone = left_behind(previous.inventory, wanted)
            plan.changes.extend(await diff_deletions(kube, gone))
    for name, status in statuses.items():
        if status.kind != "source" and name not in {a.name for a in tree.apps}:
            plan = AppPlan(app=name)
            plan.changes = [
                ObjectChange(ref, "delete", f"--- live/{ref}\n+++ /dev/null\n")
                for ref in status.inventory
            ]
            if status.release:
                plan.changes.append(
                    ObjectChange(
                        ObjectRef("helm.sh/v3", "Release", *split_release(status.release)),
                        "delete",
                        f"helm uninstall {status.release}\n",
                    )
                )
            plans.append(plan)
    return plans


def render_text(plans: list[AppPlan]) -> str:
    lines = []
    for plan in plans:
        if plan.error:
            lines.append(f"# {plan.app}: error: {plan.error}\n")
        lines.extend(f"# {plan.app}: note: {note}\n" for note in plan.notes)
        for change in plan.changes:
            lines.append(f"# {plan.app}: {change.action} {change.ref}\n{change.diff}")
    return "".join(lines)


def render_markdown(plans: list[AppPlan], *, title: str) -> str:
    out = [f"## conveyor diff: {title}\n"]
    changed = [p for p in plans if p.changes or p.error]
    if not changed:
        out.append("\nNo changes.\n")
    for plan in changed:
        out.append(f"\n### {plan.app}\n")
        if plan.error:
            out.append(f"\n**Error:** {plan.error}\n")
        out.extend(f"\n_Note:_ {note}\n" for note in plan.notes)
        if plan.changes:
            summary = ", ".join(f"{c.action} {c.ref}" for c in plan.changes)
            out.append(f"\n{summary}\n\n```diff\n")
            out.extend(c.diff if c.diff.endswith("\n") else c.diff + "\n" for c in plan.changes)
            out.append("```\n")
    return "".join(out)
