"""What to reconcile: a config repo, a branch and a folder (or a named environment from
conveyor.yaml), against which cluster. Shared by `reconcile`, `agent`, `diff` and `get`.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.objects import Obj
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.config.helmrelease import ValuesReference
from conveyor.config.project import (
    ConfigError,
    Environment,
    Project,
    load_project,
    safe_relative_path,
)
from conveyor.paths import checkouts_cache
from conveyor.reconcile.actions import RenderPast
from conveyor.render.data_objects import DataKind, data_entries, data_value
from conveyor.render.discover import EnvironmentTree, discover, scope_name
from conveyor.render.documents import RenderError
from conveyor.render.flux_kustomization import DataLookup
from conveyor.render.helm import HelmCLI
from conveyor.render.render import RenderedApp, Renderer, ValuesLookup
from conveyor.render.sops import (
    AgeKeys,
    DecryptionError,
    Decryptor,
    KeySource,
    SecretLookup,
    SecretRef,
    local_keys,
)
from conveyor.source.git import Checkout, default_branch, export_tree


@dataclass(frozen=True)
class Target:
    repo: str
    branch: str | None = None
    path: str | None = None
    env: str | None = None
    kubeconfig: str | None = None
    context: str | None = None


@dataclass(frozen=True)
class ResolvedTarget:
    checkout: Checkout
    revision: str
    env_path: str
    scope: str
    context: str | None
    kubeconfig: str | None
    project: Project | None = None  # conveyor.yaml, when the target names an environment
    environment: Environment | None = None

    @property
    def identity(self) -> EnvironmentIdentity:
        """The environment as its source defines it: what it owns in the cluster."""
        return EnvironmentIdentity.of(
            self.checkout.url, branch=self.checkout.branch, path=self.env_path, name=self.scope
        )


@dataclass(frozen=True)
class ClusterRef:
    """A cluster as conveyor.yaml or the command line names it: a kubeconfig file (None:
    $KUBECONFIG, merged) and a context (None: its current one)."""

    kubeconfig: str | None = None
    context: str | None = None

    def resolve(self) -> tuple[ClusterRef, str]:
        """This cluster with its context made explicit, and its name (the context, or
        `in-cluster`): two environments on one context share one client. Raises
        KubeconfigError."""
        credentials = kubeconfig.load(self.kubeconfig, context=self.context)
        if credentials.context == kubeconfig.IN_CLUSTER:
            return ClusterRef(), credentials.context
        return ClusterRef(self.kubeconfig, credentials.context), credentials.context


def environment_cluster(environment: Environment, *, default: ClusterRef) -> ClusterRef:
    """The cluster an environment deploys to: its `cluster` in conveyor.yaml, else
    `default` (the command line's, else $KUBECONFIG's). Unlike `fetch_target`, where
    the command line picks the cluster of the one environment it names, a reader of
    every environment takes each from conveyor.yaml: one --context cannot be all."""
    named = environment.cluster
    if named.context is None and named.kubeconfig is None:
        return default
    return ClusterRef(named.kubeconfig or default.kubeconfig, named.context)


def checkout_path(repo: str, branch: str, *, purpose: str = "agent") -> Path:
    digest = hashlib.sha256(f"{repo}#{branch}".encode()).hexdigest()[:16]
    return checkouts_cache(purpose) / digest


def fetch_target(target: Target, *, purpose: str = "agent") -> ResolvedTarget:
    """Fetch the config repo and pin the revision. Raises GitError or ConfigError."""
    if not target.path and not target.env:
        raise ConfigError("give --path DIR or --env NAME")
    branch = target.branch or default_branch(target.repo)
    checkout = Checkout.open(
        target.repo, checkout_path(target.repo, branch, purpose=purpose), branch=branch
    )
    context, config_file = target.context, target.kubeconfig
    env_path = target.path
    environment_name = None
    project = environment = None
    if target.env:
        # Environments that name no branch live on the repository's HEAD.
        head = default_branch(target.repo) if target.branch else branch
        project = load_project(checkout.path, default_branch=head)
        environment = project.environment(target.env)
        if environment.branch != branch and not target.branch:
            checkout = Checkout.open(
                target.repo,
                checkout_path(target.repo, environment.branch, purpose=purpose),
                branch=environment.branch,
            )
        env_path = environment.path
        environment_name = environment.name
        context = context or environment.cluster.context
        config_file = config_file or environment.cluster.kubeconfig
    assert_path = safe_relative_path(env_path or ".")
    revision = checkout.head()
    if revision is None:
        raise ConfigError(f"branch {checkout.branch} of {target.repo} has no commits")
    return ResolvedTarget(
        checkout=checkout,
        revision=revision,
        env_path=assert_path,
        scope=scope_name(environment=environment_name, path=assert_path),
        context=context,
        kubeconfig=config_file,
        project=project,
        environment=environment,
    )


def kube_client(
    resolved: ResolvedTarget | None = None,
    *,
    kubeconfig_path: str | None = None,
    context: str | None = None,
) -> KubeClient:
    path = kubeconfig_path or (resolved.kubeconfig if resolved else None)
    ctx = context or (resolved.context if resolved else None)
    return KubeClient(kubeconfig.load(path, context=ctx), max_connections=16)


def helm_cli(
    resolved: ResolvedTarget | None = None,
    *,
    kubeconfig_path: str | None = None,
    context: str | None = None,
    create_namespace: bool = True,
) -> HelmCLI:
    # helm's --kubeconfig takes one file: $KUBECONFIG's list is handed over merged.
    path = kubeconfig.for_tools(kubeconfig_path or (resolved.kubeconfig if resolved else None))
    ctx = context or (resolved.context if resolved else None)
    if path is None and kubeconfig.in_cluster_wanted():
        # In a Pod the service account is the cluster, as for conveyor's own client: a
        # context named in conveyor.yaml is for people's kubeconfigs, and helm would
        # refuse to look for it in none.
        ctx = None
    return HelmCLI(kubeconfig=path, context=ctx, create_namespace=create_namespace)


def data_lookup(kube: KubeClient) -> DataLookup:
    """The data of a ConfigMap or Secret in the cluster, decoded (a Flux Kustomization's
    postBuild.substituteFrom reads them, as Flux does)."""

    async def lookup(kind: DataKind, namespace: str, name: str) -> dict[str, str] | None:
        obj = await kube.get("v1", kind, name, namespace=namespace)
        return None if obj is None else data_entries(obj)

    return lookup


def values_lookup(kube: KubeClient) -> ValuesLookup:
    """valuesFrom reads ConfigMaps and Secrets from the cluster, as Flux does."""

    async def lookup(ref: ValuesReference) -> str | None:
        obj = await kube.get("v1", ref.kind, ref.name, namespace=ref.namespace)
        return data_value(obj, ref.key) if obj is not None else None

    return lookup


def secret_lookup(kube: KubeClient) -> SecretLookup:
    """Decryption keys are read from the cluster's Secrets, as Flux reads them."""

    async def lookup(ref: SecretRef) -> Obj | None:
        try:
            return await kube.get("v1", "Secret", ref.name, namespace=ref.namespace)
        except ApiError as error:  # e.g. forbidden: the app stalls saying so
            raise DecryptionError(f"decryption Secret {ref} cannot be read: {error}") from None

    return lookup


def decryption_secret(environment: Environment | None) -> SecretRef | None:
    """The Secret that conveyor.yaml names for the environment's SOPS keys, if any."""
    if environment is None or environment.decryption is None:
        return None
    ref = environment.decryption.secret_ref
    return SecretRef(namespace=ref.namespace, name=ref.name)


def decryptor(
    kube: KubeClient | None,
    *,
    environment: Environment | None = None,
    local: Callable[[], AgeKeys] = local_keys,
) -> Decryptor:
    """How an environment's SOPS-encrypted files are decrypted: with the keys of the
    Secret its conveyor.yaml names, read through `kube` (with no cluster, `local`), or
    else with `local`, the keys given where conveyor runs (render/sops.py)."""
    return Decryptor(
        KeySource(
            local,
            lookup=secret_lookup(kube) if kube is not None else None,
            default_ref=decryption_secret(environment),
        )
    )


def build_renderer(
    resolved: ResolvedTarget,
    tree: EnvironmentTree,
    kube: KubeClient,
    helm: HelmCLI,
    *,
    root: Path | None = None,
    age_keys: Callable[[], AgeKeys] = local_keys,
) -> Renderer:
    """A renderer of the checkout (or of `root`, a past revision exported from it)."""
    return Renderer.of_tree(
        root or resolved.checkout.path,
        tree,
        helm,
        values_lookup=values_lookup(kube),
        decryptor=decryptor(kube, environment=resolved.environment, local=age_keys),
        data_lookup=data_lookup(kube),
        config_url=resolved.checkout.url,
    )


def past_renders(resolved: ResolvedTarget, kube: KubeClient, helm: HelmCLI) -> RenderPast:
    """Render one app as it was at an earlier revision of the checkout: the last good
    objects of a plain app, to roll back to when a new revision never becomes healthy."""

    async def render_past(app: str, revision: str) -> RenderedApp:
        with tempfile.TemporaryDirectory(prefix="conveyor-past-") as scratch:
            root = await asyncio.to_thread(
                export_tree, resolved.checkout.path, revision, Path(scratch)
            )
            tree = discover(root, resolved.env_path)
            renderer = build_renderer(resolved, tree, kube, helm, root=root)
            await renderer.expand(tree)
            source = next((a for a in tree.apps if a.name == app), None)
            if source is None:
                raise RenderError(f"app {app} is not in revision {revision[:12]}")
            return await renderer.render(source)

    return render_past


def discover_target(resolved: ResolvedTarget) -> EnvironmentTree:
    return discover(resolved.checkout.path, resolved.env_path)
