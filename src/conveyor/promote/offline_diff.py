"""Diffs for pull requests: what a change to the config repo does to the rendered objects.

Flux cannot show what a HelmRelease change does before it is merged. Here both
revisions are rendered without a cluster (HelmReleases through `helm template`, charts
resolved as the agent resolves them) and compared object by object, one section per
app. valuesFrom that only a cluster holds are left out, and the diff says so. Secret
values never appear; a changed one is flagged. With a cluster at hand, the head can be
compared with what runs there instead (`against_live`), through the same server-side
dry run as `conveyor diff`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.cluster.diff import ObjectChange, mask_secrets, normalize, secret_values, unified
from conveyor.cluster.objects import Obj, ObjectRef
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.config.helmrelease import ValuesReference
from conveyor.config.project import load_project
from conveyor.reconcile.plan import PlanDiff, helm_objects, plan_environment
from conveyor.reconcile.target import data_lookup, decryptor, kube_client, values_lookup
from conveyor.render.discover import AppSource, EnvironmentTree, discover, scope_name
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError
from conveyor.render.render import RenderedApp, Renderer
from conveyor.render.sops import AgeKeys, local_keys
from conveyor.source.git import default_branch, export_tree, origin_url, resolve_revision

# Apps rendered at once (each a `helm template` for a release), as many as the agent's
# helm slots: a pull request to a repository of a hundred releases must not wait for
# them one by one, nor start a hundred helm processes on a CI runner.
RENDER_CONCURRENCY = 4


@dataclass
class RenderedObjects:
    objects: list[Obj] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


async def _unavailable(_ref: ValuesReference) -> str | None:
    return None


@dataclass
class OfflineTree:
    """A revision's folder, discovered and expanded (its kustomize builds run), with the
    renderer that renders its apps."""

    tree: EnvironmentTree
    renderer: Renderer


async def expand_offline(
    root: Path, env_path: str, helm: HelmCLI, *, age_keys: Callable[[], AgeKeys] = local_keys
) -> OfflineTree | None:
    """The folder's apps, its kustomize builds run, without a cluster: SOPS-encrypted
    files are decrypted with `age_keys` (there is no cluster to read a decryption Secret
    from). None when the revision has no such folder."""
    if not (root / env_path).is_dir():
        return None
    tree = discover(root, env_path)
    renderer = Renderer.of_tree(
        root,
        tree,
        helm,
        values_lookup=_unavailable,
        offline=True,
        decryptor=decryptor(None, local=age_keys),
    )
    await renderer.expand(tree)
    return OfflineTree(tree, renderer)


async def render_offline(expanded: OfflineTree | None) -> dict[str, RenderedApp | RenderError]:
    """Every app of the folder rendered (its objects and Helm plan, charts resolved), or
    why it did not render, by app name; none if no folder."""
    if expanded is None:
        return {}
    slots = asyncio.Semaphore(RENDER_CONCURRENCY)

    async def render(app: AppSource) -> RenderedApp | RenderError:
        async with slots:
            try:
                return await expanded.renderer.render(app)
            except RenderError as error:
                return error

    apps = expanded.tree.apps
    rendered = await asyncio.gather(*(render(app) for app in apps))
    return {app.name: result for app, result in zip(apps, rendered, strict=True)}


async def objects_offline(
    rendered: RenderedApp | RenderError | None, helm: HelmCLI
) -> RenderedObjects:
    """An app's objects: its own and its release's as `helm template` renders them."""
    if rendered is None:
        return RenderedObjects()
    if isinstance(rendered, RenderError):
        return RenderedObjects(error=str(rendered))
    try:
        release = await helm_objects(rendered, helm)
    except HelmError as error:
        return RenderedObjects(notes=rendered.notes, error=f"helm template: {error.message}")
    return RenderedObjects(objects=rendered.objects + release, notes=rendered.notes)


def diff_objects_offline(before: list[Obj], after: list[Obj]) -> list[ObjectChange]:
    """Object by object (matched by group, kind, namespace and name), Secrets masked,
    and their values in any other object's annotations too."""
    old = {ObjectRef.of(o).key(): o for o in before}
    new = {ObjectRef.of(o).key(): o for o in after}
    known = secret_values([*before, *after])
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        was, now = old.get(key), new.get(key)
        ref = ObjectRef.of(now or was or {})
        masked_was, masked_now = mask_secrets(normalize(was), normalize(now), known=known)
        if masked_was == masked_now and was == now:
            continue
        action = "create" if was is None else "delete" if now is None else "update"
        text = unified(
            masked_was, masked_now, label=str(ref), before_name="base", after_name="head"
        )
        if not text:  # only a Secret value changed and masking hides how: flag it
            text = f"# {ref}: a Secret value changed (masked)\n"
        changes.append(ObjectChange(ref, action, text))
    return changes


def environment_path(root: Path, *, env: str | None, path: str | None) -> str:
    """The folder to diff: `path`, or the environment's folder in root's conveyor.yaml."""
    if path is not None:
        return path
    return load_project(root).environment(str(env)).path


async def diff_revisions(
    repo: Path,
    base: str,
    head: str,
    *,
    env: str | None,
    path: str | None,
    helm: HelmCLI,
    workdir: Path,
    age_keys: Callable[[], AgeKeys] = local_keys,
) -> tuple[list[PlanDiff], str]:
    """Per-app changes from `base` to `head` of the folder, rendered offline, and a title.
    GitError for an unknown revision, ConfigError for an unknown environment."""
    base_sha, head_sha = resolve_revision(repo, base), resolve_revision(repo, head)
    base_root = export_tree(repo, base_sha, workdir / "base")
    head_root = export_tree(repo, head_sha, workdir / "head")
    env_path = environment_path(head_root, env=env, path=path)
    # Both revisions' builds at once (kustomize, no shared state); their charts one
    # revision after the other, so that the chart cache is filled once.
    base_tree, head_tree = await asyncio.gather(
        expand_offline(base_root, env_path, helm, age_keys=age_keys),
        expand_offline(head_root, env_path, helm, age_keys=age_keys),
    )
    base_apps = await render_offline(base_tree)
    head_apps = await render_offline(head_tree)
    names = [*head_apps, *(n for n in base_apps if n not in head_apps)]
    # An app whose fingerprint (objects, chart digest, values, release) is the same in
    # both revisions renders the same: its chart is not templated at all.
    unchanged = {
        name: rendered
        for name in names
        if isinstance(rendered := head_apps.get(name), RenderedApp)
        and isinstance(base_app := base_apps.get(name), RenderedApp)
        and base_app.fingerprint == rendered.fingerprint
    }
    changed = [name for name in names if name not in unchanged]
    slots = asyncio.Semaphore(RENDER_CONCURRENCY)

    async def objects(app: RenderedApp | RenderError | None) -> RenderedObjects:
        async with slots:
            return await objects_offline(app, helm)

    sides = await asyncio.gather(
        *(objects(side.get(name)) for name in changed for side in (base_apps, head_apps))
    )
    templated = dict(zip(changed, zip(sides[::2], sides[1::2], strict=True), strict=True))
    plans = []
    for name in names:
        if name in unchanged:
            plans.append(PlanDiff(app=name, notes=list(unchanged[name].notes)))
            continue
        was, now = templated[name]
        plan = PlanDiff(app=name, notes=list(now.notes))
        if now.error:
            plan.error = now.error
        else:
            if was.error:
                plan.notes.append(f"base did not render ({was.error}); showing head in full")
            plan.changes = diff_objects_offline(was.objects, now.objects)
        plans.append(plan)
    title = f"{env or env_path}: {_named(base, base_sha)} → {_named(head, head_sha)}"
    return plans, title


def _named(ref: str, sha: str) -> str:
    return sha[:12] if sha.startswith(ref) else f"{ref} ({sha[:12]})"


async def diff_against_live(
    repo: Path,
    head: str,
    *,
    env: str | None,
    path: str | None,
    kubeconfig: str | None,
    context: str | None,
    helm: HelmCLI,
    workdir: Path,
    age_keys: Callable[[], AgeKeys] = local_keys,
) -> tuple[list[PlanDiff], str]:
    """Per-app changes from the cluster to `head` of the folder (server-side dry run), on
    the environment's cluster unless `kubeconfig`/`context` say otherwise."""
    head_sha = resolve_revision(repo, head)
    head_root = export_tree(repo, head_sha, workdir / "head")
    env_path = environment_path(head_root, env=env, path=path)
    source = origin_url(repo)
    branch = default_branch(source)
    environment = None
    if env is not None:
        environment = load_project(head_root, default_branch=branch).environment(env)
        cluster, branch = environment.cluster, environment.branch
        kubeconfig, context = kubeconfig or cluster.kubeconfig, context or cluster.context
    # The deployed environment this folder is: the agent knows it by its source.
    identity = EnvironmentIdentity.of(
        source, branch=branch, path=env_path, name=scope_name(environment=env, path=env_path)
    )
    tree = discover(head_root, env_path)
    async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
        renderer = Renderer.of_tree(
            head_root,
            tree,
            helm,
            values_lookup=values_lookup(kube),
            decryptor=decryptor(kube, environment=environment, local=age_keys),
            data_lookup=data_lookup(kube),
            config_url=source,
        )
        plans = await plan_environment(tree, renderer, kube, helm, identity=identity)
    return plans, f"{env or env_path}: live → {_named(head, head_sha)}"
