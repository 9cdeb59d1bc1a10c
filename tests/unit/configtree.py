"""A config repo on disk with apps that render, for tests that break one of them.

The good apps are real: a folder of plain manifests, and a Flux v2 HelmRelease (`billing`) whose
chart comes from a GitRepository (a bare git repo holding examples/charts/service), so
rendering them fetches with the real git. `render_all` renders every app of the tree
through `discover()` and `Renderer.render()`, the entry points the engine uses.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from conveyor.config.helmrelease import ValuesReference
from conveyor.render.charts import ChartResolver
from conveyor.render.discover import discover
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI
from conveyor.render.render import RenderedApp, Renderer
from conveyor.source.git import run_git

ROOT = Path(__file__).resolve().parents[2]
ENV = "production"

WEB = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-settings
  namespace: web
  labels: {app: web}
  annotations: {conveyor.dev/drift: warn}
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata: {name: web-token, namespace: web}
stringData: {token: not-a-real-token}
"""

BILLING = """\
apiVersion: v1
kind: Namespace
metadata:
  name: billing
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: charts
  namespace: billing
spec:
  interval: 5m
  url: {charts_url}
  ref:
    branch: main
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata:
  name: billing
  namespace: billing
spec:
  interval: 5m
  timeout: 1h30m
  releaseName: billing
  chart:
    spec:
      chart: charts/service
      sourceRef:
        kind: GitRepository
        name: charts
  values:
    image: {repository: registry.local/billing, tag: "1.0.0"}
    service: {port: 8080}
"""


@dataclass
class ConfigTree:
    root: Path
    charts_url: str

    @property
    def env(self) -> Path:
        return self.root / ENV

    def write(self, relative: str, text: str) -> None:
        """A file of the environment folder, `{charts_url}` filled in."""
        target = self.env / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).replace("{charts_url}", self.charts_url))


def chart_repository(directory: Path) -> str:
    """A bare git repository whose `main` holds examples/charts/service; its URL."""
    work = directory / "charts-work"
    shutil.copytree(ROOT / "examples" / "charts" / "service", work / "charts" / "service")
    run_git(["init", "--quiet", "--initial-branch", "main", str(work)])
    run_git(["add", "."], cwd=work)
    run_git(
        ["-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-qm", "chart"],
        cwd=work,
    )
    bare = directory / "charts.git"
    run_git(["clone", "--quiet", "--bare", str(work), str(bare)])
    return bare.as_uri()


def config_tree(directory: Path, charts_url: str) -> ConfigTree:
    """Two apps that render: `web` (plain manifests) and `billing` (a HelmRelease)."""
    tree = ConfigTree(root=directory, charts_url=charts_url)
    tree.write("web/settings.yaml", WEB)
    tree.write("billing.yaml", BILLING)
    return tree


async def _no_values(_reference: ValuesReference) -> str | None:
    return "{}"


async def render_all(tree: ConfigTree, cache: Path) -> dict[str, RenderedApp | RenderError]:
    """Every app of the tree rendered, or the RenderError it failed with. Any other
    exception propagates: that is what the tests look for.

    Charts from git are fetched with the real git; helm is `false`, a helm that fails
    every command (a pull from a Helm or OCI repository): these tests are about reading
    files, and the cluster tests render with the real helm."""
    found = discover(tree.root, ENV)
    renderer = Renderer(
        tree.root,
        charts=ChartResolver(cache, HelmCLI(binary="false"), found.sources),
        values_lookup=_no_values,
    )
    results: dict[str, RenderedApp | RenderError] = {}
    for app in found.apps:
        try:
            results[app.name] = await renderer.render(app)
        except RenderError as error:
            results[app.name] = error
    return results
