"""One app's error is that app's Stalled status; the other apps' statuses are computed.

Fast checks with an in-memory kube (the real StatusStore and EventRecorder on top of it)
and a scripted helm; tests/cluster/test_agent_outage.py runs the same failures for real
(a sandbox apiserver killed during a Helm upgrade).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.config.helmrelease import ChartFromGit, HelmReleaseSpec
from conveyor.reconcile.engine import Engine, EngineOptions, build_engine
from conveyor.reconcile.status import NAMESPACE, READY, STALLED, resource_name
from conveyor.render.charts import ResolvedChart
from conveyor.render.discover import AppSource, EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmError
from conveyor.render.render import HelmPlan, RenderedApp

Obj = dict[str, Any]


class MemoryKube:
    """What the engine's status store and event recorder ask of the apiserver, in memory."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.events: list[Obj] = []
        self.writes = 0
        self.refuse: str | None = None  # a ConveyorApp name whose writes fail

    async def get(
        self, _api_version: str, kind: str, name: str, *, namespace: str | None = None
    ) -> Obj | None:
        found = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(found) if found else None

    async def list(
        self,
        _api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[Obj]:
        wanted = dict(term.split("=", 1) for term in (label_selector or "").split(",") if term)
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.objects.items()
            if k == kind
            and ns == (namespace or "")
            and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    async def apply(self, obj: Obj, **_options: Any) -> Obj:
        meta = obj["metadata"]
        if meta["name"] == self.refuse:
            raise httpx.ConnectError("All connection attempts failed")
        self.writes += 1
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        stored = self.objects.setdefault(key, {})
        stored.update(copy.deepcopy(obj))
        if obj["kind"] == "CustomResourceDefinition":
            stored["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
        return copy.deepcopy(stored)

    def forget_discovery(self) -> None:
        """Nothing is discovered here."""

    async def request(self, method: str, path: str, **options: Any) -> Obj:
        assert (method, path.rsplit("/", 1)[-1]) == ("POST", "events")
        self.events.append(options["json_body"])
        return {}


class ScriptedHelm:
    """helm whose upgrade and history answer as the test says (an error, or a release)."""

    def __init__(self) -> None:
        self.upgrade_error: Exception | None = None
        self.history_error: HelmError | None = None
        self.upgrades = 0

    async def upgrade_install(self, release: str, *_args: Any, **_options: Any) -> Obj:
        self.upgrades += 1
        if self.upgrade_error is not None:
            raise self.upgrade_error
        return {"name": release, "version": self.upgrades, "manifest": ""}

    async def history(self, _release: str, _namespace: str) -> list[Obj]:
        if self.history_error is not None:
            raise self.history_error
        return [{"revision": self.upgrades}]

    async def rollback(self, *_args: Any, **_options: Any) -> None:
        raise HelmError("rollback", "Kubernetes cluster unreachable")


def plain(name: str) -> RenderedApp:
    return RenderedApp(
        source=AppSource(name=name, kind="manifests", path=f"env/{name}"),
        objects=[],
        helm=None,
        fingerprint=f"{name}-1",
        depends_on=[],
        suspend=False,
        drift="enabled",
    )


def released(name: str) -> RenderedApp:
    spec = HelmReleaseSpec(
        api_version="helm.toolkit.fluxcd.io/v2",
        name=name,
        namespace="apps",
        release_name=name,
        target_namespace="apps",
        chart=ChartFromGit(url="file:///charts.git", ref="main", path="service"),
        values={},
        values_from=[],
    )
    chart = ResolvedChart(path="/charts/service", digest="d", origin="test")
    return RenderedApp(
        source=AppSource(name=name, kind="helm", path=f"env/{name}.yaml"),
        objects=[],
        helm=HelmPlan(spec=spec, chart=chart, values={}),
        fingerprint=f"{name}-1",
        depends_on=[],
        suspend=False,
        drift="enabled",
    )


class ScriptedRenderer:
    def __init__(self, apps: dict[str, RenderedApp | Exception]) -> None:
        self.apps = apps
        self.repo_root = Path("/")  # not a git repository: no commit names a change

    async def render(self, app: AppSource) -> RenderedApp:
        result = self.apps[app.name]
        if isinstance(result, Exception):
            raise result
        return result


def tree(names: list[str]) -> EnvironmentTree:
    return EnvironmentTree(
        apps=[AppSource(name=n, kind="manifests", path=f"env/{n}") for n in names],
        sources={},
        flux_config=[],
        expanded=True,  # no kustomize builds: the scripted renders are the apps
    )


IDENTITY = EnvironmentIdentity.of("file:///config.git", branch="main", path="env", name="env")


def engine(kube: MemoryKube, helm: ScriptedHelm) -> Engine:
    options = EngineOptions(scope="env", identity=IDENTITY, poll_interval=0.01)
    return build_engine(kube, helm, options=options)  # type: ignore[arg-type]


def run_pass(engine: Engine, apps: dict[str, RenderedApp | Exception]) -> dict[str, Any]:
    result = asyncio.run(
        engine.run_pass(tree(list(apps)), ScriptedRenderer(apps), revision="a" * 40)  # type: ignore[arg-type]
    )
    return result.statuses


def test_helm_and_its_history_failing_stall_one_app_and_the_next_pass_retries_it() -> None:
    kube, helm = MemoryKube(), ScriptedHelm()
    helm.upgrade_error = HelmError("upgrade", "Kubernetes cluster unreachable: connection refused")
    helm.history_error = HelmError("history", "Kubernetes cluster unreachable: connection refused")
    reconciler = engine(kube, helm)
    apps: dict[str, RenderedApp | Exception] = {
        "a": plain("a"),
        "web": released("web"),
        "z": plain("z"),
    }
    statuses = run_pass(reconciler, apps)
    assert (statuses["a"].state, statuses["z"].state) == (READY, READY)
    web = statuses["web"]
    assert (web.state, web.reason) == (STALLED, "ApiError")
    assert web.message == "helm upgrade: Kubernetes cluster unreachable: connection refused"
    assert helm.upgrades == 1  # no retries burnt while the cluster is away
    assert web.failures == 0 and web.failed_fingerprint is None
    stored = asyncio.run(kube.get("", "ConveyorApp", web.name, namespace="conveyor-system"))
    assert stored is not None and stored["status"]["reason"] == "ApiError"

    helm.upgrade_error = helm.history_error = None  # the cluster is back
    statuses = run_pass(reconciler, apps)
    assert (statuses["web"].state, statuses["web"].helm_revision) == (READY, 2)


def test_a_failed_upgrade_with_a_readable_history_counts_and_keeps_the_revision() -> None:
    kube, helm = MemoryKube(), ScriptedHelm()
    helm.upgrade_error = HelmError("upgrade", "chart says no")
    statuses = run_pass(engine(kube, helm), {"web": released("web"), "a": plain("a")})
    web = statuses["web"]
    assert (web.state, web.reason) == (STALLED, "UpgradeFailed")
    assert helm.upgrades == 2  # one retry, then given up for this content
    assert web.failed_fingerprint == "web-1" and web.helm_revision == 2
    assert statuses["a"].state == READY


@pytest.mark.parametrize(
    ("error", "reason", "message"),
    [
        (KeyError("values"), "InternalError", "KeyError: 'values'"),
        (OSError(28, "No space left on device"), "ApiError", "OSError: [Errno 28] No space"),
    ],
)
def test_an_unexpected_error_in_one_app_is_its_stalled_status(
    error: Exception, reason: str, message: str
) -> None:
    kube, helm = MemoryKube(), ScriptedHelm()
    helm.upgrade_error = error
    statuses = run_pass(engine(kube, helm), {"a": plain("a"), "web": released("web")})
    assert statuses["a"].state == READY
    assert (statuses["web"].state, statuses["web"].reason) == (STALLED, reason)
    assert statuses["web"].message.startswith(message)
    warnings = [e for e in kube.events if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == [reason]


def test_a_crash_while_rendering_one_app_stalls_it_and_prunes_nothing(tmp_path: Path) -> None:
    kube, helm = MemoryKube(), ScriptedHelm()
    reconciler = engine(kube, helm)
    run_pass(reconciler, {"a": plain("a"), "gone": plain("gone")})
    statuses = run_pass(reconciler, {"a": plain("a"), "b": ValueError("bad chart index")})
    assert statuses["a"].state == READY
    b = statuses["b"]
    assert (b.state, b.reason) == (STALLED, "RenderFailed")
    assert b.message == "env/b: ValueError: bad chart index"
    assert "gone" in reconciler.statuses  # a render failed: the app that left git stays
    assert not isinstance(b, RenderError)


def test_a_status_that_cannot_be_saved_ends_neither_the_app_nor_the_pass() -> None:
    kube, helm = MemoryKube(), ScriptedHelm()
    reconciler = engine(kube, helm)
    kube.refuse = name = resource_name("env", "b")
    statuses = run_pass(reconciler, {"a": plain("a"), "b": plain("b"), "c": plain("c")})
    assert {n: s.state for n, s in statuses.items()} == {"a": READY, "b": READY, "c": READY}
    assert asyncio.run(kube.get("", "ConveyorApp", name, namespace=NAMESPACE)) is None

    kube.refuse = None  # the apiserver is back: the next pass writes what was missed
    run_pass(reconciler, {"a": plain("a"), "b": plain("b"), "c": plain("c")})
    stored = asyncio.run(kube.get("", "ConveyorApp", name, namespace=NAMESPACE))
    assert stored is not None and stored["status"]["state"] == READY


def test_a_pass_over_one_app_reads_the_status_of_what_it_depends_on() -> None:
    """The agent corrects drift one app at a time: an app built by a Flux Kustomization
    (which it depends on) is neither 'not found' nor waiting for a pass of its parent."""
    kube, helm = MemoryKube(), ScriptedHelm()
    reconciler = engine(kube, helm)
    parent, child = plain("apps"), plain("web")
    child.depends_on.append("apps")
    apps: dict[str, RenderedApp | Exception] = {"apps": parent, "web": child}
    statuses = run_pass(reconciler, apps)
    assert (statuses["apps"].state, statuses["web"].state) == (READY, READY)
    one = asyncio.run(
        reconciler.run_pass(tree(list(apps)), ScriptedRenderer(apps), revision="b" * 40, only="web")  # type: ignore[arg-type]
    )
    assert set(one.statuses) == {"web"}
    assert one.statuses["web"].state == READY
    # A dependency that is not Ready holds the one app, as in a full pass.
    reconciler.statuses["apps"].state = STALLED
    reconciler.statuses["apps"].reason = "HealthCheckFailed"
    one = asyncio.run(
        reconciler.run_pass(tree(list(apps)), ScriptedRenderer(apps), revision="c" * 40, only="web")  # type: ignore[arg-type]
    )
    assert one.statuses["web"].reason == "DependencyNotReady"
