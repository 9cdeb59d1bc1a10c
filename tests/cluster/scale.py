"""A fleet's worth of dashboard data: 12 environments x 60 apps in a real config repo
(Cellenics-long tags, an approval gate at the end of the pipeline) and their ConveyorApp
statuses, written straight to a sandbox with no agent, or split in promotion order over
several clusters (each environment's `cluster.context`). Shared by the browser test and
bench/dashboard.py, which look at the same picture."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import KubeClient
from conveyor.reconcile.status import (
    API_VERSION,
    NAMESPACE,
    READY,
    SOURCE_KIND,
    STALLED,
    WAITING_FOR_GATE,
    AppStatus,
    StatusStore,
)
from tests.cluster.gitops import ConfigRepo, deployment

ENVIRONMENTS = 12
APPS = 60
# Cellenics' tags: the ref, the commit and the build time, 69 characters.
LONG_TAG = "refs-heads-master-{sha}-1733050000"
HELD = "9.9.9"


def app_name(index: int) -> str:
    return f"service-with-a-long-name-{index:02d}"


def tag(env_index: int, index: int) -> str:
    """The version app `index` runs in environment `env_index`: two apps in three carry
    a long tag that differs per environment, the others a semver shared by four."""
    if index % 3 == 0:
        return f"1.{index}.{env_index // 4}"
    return LONG_TAG.format(sha=f"{(index * 7 + env_index) % 16:x}" * 40)


def held(index: int) -> bool:
    """Whether app `index` has a newer version held by the last environment's gate."""
    return index % 5 == 0


class Fleet:
    """The repo and the statuses: the first commit is what runs everywhere; a second
    gives the last environment's held apps a new version, which its approval gate holds.
    With `contexts`, the environments are split over those clusters in promotion order
    (the first ones in the first cluster), as teams run staging and production apart."""

    def __init__(self, root: Path, prefix: str, *, contexts: Sequence[str] = ()) -> None:
        self.repo = ConfigRepo(root)
        self.names = [f"{prefix}-{index:02d}" for index in range(ENVIRONMENTS)]
        # environment → the index of its cluster in `contexts` (0 with none given)
        self.cluster_index = {
            name: index * len(contexts) // ENVIRONMENTS if contexts else 0
            for index, name in enumerate(self.names)
        }
        lines = ["environments:"]
        for name in self.names:
            gate = "\n    gates: [{type: approval}]" if name == self.names[-1] else ""
            cluster = (
                f"\n    cluster: {{context: {contexts[self.cluster_index[name]]}}}"
                if contexts
                else ""
            )
            lines.append(f"  - name: {name}\n    path: {name}{gate}{cluster}")
        self.repo.write("conveyor.yaml", "\n".join(lines) + "\n")
        for env_index, name in enumerate(self.names):
            for index in range(APPS):
                app = app_name(index)
                manifest = deployment(app, "default", image=f"{app}:{tag(env_index, index)}")
                self.repo.write(f"{name}/{app}/deploy.yaml", manifest)
        self.running = self.repo.commit("twelve environments")
        for index in filter(held, range(APPS)):
            app = app_name(index)
            manifest = deployment(app, "default", image=f"{app}:{HELD}")
            self.repo.write(f"{self.names[-1]}/{app}/deploy.yaml", manifest)
        self.held = self.repo.commit("Update from https://github.com/acme/services/commit/89ab")
        self.statuses = [s for name in self.names for s in self._statuses(name)]

    def _statuses(self, name: str) -> list[AppStatus]:
        env_index = self.names.index(name)
        found = [
            AppStatus(
                scope=name,
                app="",
                kind=SOURCE_KIND,
                state=READY,
                reason="Fetched",
                attempted_revision=self.running,
                last_applied_revision=self.running,
            )
        ]
        for index in range(APPS):
            state, reason, message, attempted = READY, "ReconciliationSucceeded", "", self.running
            if name == self.names[-1] and held(index):
                state, reason, attempted = WAITING_FOR_GATE, "GateClosed", self.held
                message = f"approval: 0 of 1 approvals of {HELD} for this environment"
            elif (index + env_index) % 17 == 0:
                state, reason = STALLED, "HealthCheckFailed"
                message = "Deployment/default/x: 0 of 1 replicas available " * 4
            found.append(
                AppStatus(
                    scope=name,
                    app=app_name(index),
                    state=state,
                    reason=reason,
                    message=message,
                    attempted_revision=attempted,
                    last_applied_revision=self.running,
                    last_applied_time="2026-12-01T10:00:00Z",
                )
            )
        return found

    def statuses_in(self, cluster: int) -> list[AppStatus]:
        """The statuses of the environments in cluster `cluster` (an index of `contexts`)."""
        return [s for s in self.statuses if self.cluster_index[s.scope] == cluster]

    def save(self, *kubeconfig_paths: Path) -> None:
        """Every status written (two API writes each), 32 at a time per cluster, each in
        its environment's cluster: one kubeconfig per context, in their order."""

        async def save(kube: KubeClient, *, statuses: list[AppStatus]) -> None:
            store = StatusStore(kube)
            await store.install()  # the CRD, on a sandbox nothing reconciled on yet
            await store.list_all()
            limit = asyncio.Semaphore(32)

            async def one(status: AppStatus) -> None:
                async with limit:
                    await store.save(status)

            await asyncio.gather(*(one(s) for s in statuses))

        for cluster, kubeconfig_path in enumerate(kubeconfig_paths):
            _in_thread(kubeconfig_path, functools.partial(save, statuses=self.statuses_in(cluster)))

    def delete(self, *kubeconfig_paths: Path) -> None:
        """One delete per cluster of every status of the fleet's scopes (a shared sandbox
        keeps no leftovers)."""

        async def delete(kube: KubeClient) -> None:
            selector = f"conveyor.dev/scope in ({','.join(self.names)})"
            await kube.request(
                "DELETE",
                f"/apis/{API_VERSION}/namespaces/{NAMESPACE}/conveyorapps",
                params={"labelSelector": selector},
            )

        for kubeconfig_path in kubeconfig_paths:
            _in_thread(kubeconfig_path, delete)


def _in_thread(path: Path, work: Any) -> None:
    """Run `work(kube)` on a loop of its own thread: Playwright's sync API owns the test
    thread's loop. Its error is raised here."""
    failures: list[BaseException] = []

    async def run() -> None:
        async with KubeClient(kubeconfig.load(path), max_connections=32) as kube:
            await work(kube)

    def target() -> None:
        coroutine: Coroutine[Any, Any, None] = run()
        try:
            asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            failures.append(error)

    writer = threading.Thread(target=target)
    writer.start()
    writer.join()  # each request has the client's timeout: no write outlives this
    if failures:
        raise failures[0]
