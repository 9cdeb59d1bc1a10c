"""Every environment's statuses, each read from its own cluster.

`conveyor get apps --all-environments` shows a team's whole pipeline when each
environment runs in a cluster of its own (conveyor.yaml's `cluster.context` or
`cluster.kubeconfig`). Environments on one context are read with one list; the clusters
are read concurrently, each within a timeout, so one that is down is reported for its
environments while the others are shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.config.project import Environment, load_project
from conveyor.reconcile.status import AppStatus, StatusStore
from conveyor.reconcile.target import ClusterRef, checkout_path, environment_cluster, kube_client
from conveyor.render.discover import scope_name
from conveyor.source.git import Checkout, default_branch

READ_TIMEOUT = 10.0
Clients = Callable[[ClusterRef], KubeClient]
ReadErrors = (ApiError, KubeconfigError, httpx.HTTPError, OSError, TimeoutError)


@dataclass
class EnvironmentRead:
    """One environment as its cluster holds it, or why its cluster could not be read."""

    environment: str
    scope: str
    cluster: str  # the kubeconfig context (or the error's subject when unknown)
    statuses: list[AppStatus] = field(default_factory=list)
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


def project_environments(repo: str, *, branch: str | None = None) -> list[Environment]:
    """conveyor.yaml's environments at the head of `repo` (fetched into the cache).
    Raises GitError or ConfigError."""
    branch = branch or default_branch(repo)
    checkout = Checkout.open(repo, checkout_path(repo, branch, purpose="get"), branch=branch)
    return load_project(checkout.path, default_branch=branch).environments


def _client(ref: ClusterRef) -> KubeClient:
    return kube_client(kubeconfig_path=ref.kubeconfig, context=ref.context)


async def read_environments(
    environments: list[Environment],
    *,
    default: ClusterRef,
    timeout: float = READ_TIMEOUT,
    clients: Clients = _client,
) -> list[EnvironmentRead]:
    """Each environment's statuses from its cluster, in conveyor.yaml's order."""
    groups: dict[str, tuple[ClusterRef, list[Environment]]] = {}
    reads: dict[str, EnvironmentRead] = {}
    for env in environments:
        ref = environment_cluster(env, default=default)
        try:
            resolved, name = ref.resolve()
        except KubeconfigError as error:
            scope = scope_name(environment=env.name, path=env.path)
            where = ref.context or ref.kubeconfig or "default"
            reads[env.name] = EnvironmentRead(env.name, scope, where, error=str(error))
            continue
        groups.setdefault(name, (resolved, []))[1].append(env)

    async def one(name: str, ref: ClusterRef, members: list[Environment]) -> None:
        statuses: list[AppStatus] = []
        error: str | None = None
        try:
            async with asyncio.timeout(timeout), clients(ref) as kube:
                statuses = await StatusStore(kube).list_all()
        except ReadErrors as failure:
            error = str(failure) or f"no answer within {timeout:.0f}s"
        for env in members:
            scope = scope_name(environment=env.name, path=env.path)
            mine = [s for s in statuses if s.scope == scope]
            reads[env.name] = EnvironmentRead(env.name, scope, name, mine, error)

    jobs: list[Awaitable[None]] = [one(n, ref, m) for n, (ref, m) in groups.items()]
    await asyncio.gather(*jobs)
    return [reads[env.name] for env in environments]
