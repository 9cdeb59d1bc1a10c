"""A Cellenics-shaped config repo for sandbox tests: `staging/` with the shared api (in
`api-default`), and `staging-candidates/` with Flux v1 (ui) and Flux v2 (api, worker)
candidates as their CI writes them, placeholders kept. The chart repository has
`master`, a branch `my-branch` and a pull request's `refs/pull/42/merge`, each its own
commit, so that pinned and followed chart refs can be told apart."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from conveyor.source.git import run_git
from tests.cluster.gitops import CHART, ConfigRepo

CONVEYOR_YAML = """
environments:
  - name: staging
    path: staging
    branch: master
sandboxes:
  apps: [ui, api, worker]
  url: "https://ui-{id}.staging.test"
"""

SHARED_API = """
apiVersion: v1
kind: Namespace
metadata:
  name: api-{shared}
---
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: api
  namespace: api-{shared}
  annotations:
    fluxcd.io/automated: "true"
spec:
  releaseName: api
  chart:
    git: {charts}
    path: service
    ref: master
  values:
    image:
      repository: registry.local/api
      tag: "shared-1"
"""

# Flux v1, as Cellenics' ui CI writes a candidate (STAGING_CHART_REF kept for stage).
UI_CANDIDATE = """
---
apiVersion: v1
kind: Namespace
metadata:
  name: ui-STAGING_SANDBOX_ID
  labels:
    sandboxId: STAGING_SANDBOX_ID
---
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: ui
  namespace: ui-STAGING_SANDBOX_ID
  labels:
    sandboxId: STAGING_SANDBOX_ID
  annotations:
    fluxcd.io/automated: "true"
    filter.fluxcd.io/chart-image: glob:{ref_id}-*
spec:
  releaseName: ui
  chart:
    git: {charts}
    path: service
    ref: STAGING_CHART_REF
  values:
    sandboxId: STAGING_SANDBOX_ID
    rdsSandboxId: STAGING_RDS_SANDBOX_ID
    service:
      enabled: false
    image:
      repository: registry.local/ui
      tag: "{tag}"
# filled in by CI. do not modify.
"""

# Flux v2: chart from a GitRepository, the tag line with its setter comment.
V2_CANDIDATE = """
apiVersion: v1
kind: Namespace
metadata:
  name: {app}-STAGING_SANDBOX_ID
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: {app}
  namespace: {app}-STAGING_SANDBOX_ID
spec:
  interval: 5m
  url: {charts}
  ref:
    {ref_key}: {ref_value}
---
apiVersion: image.toolkit.fluxcd.io/v1beta2
kind: ImageUpdateAutomation
metadata:
  name: {app}
  namespace: {app}-STAGING_SANDBOX_ID
spec:
  interval: 5m
  sourceRef:
    kind: GitRepository
    name: flux-system
    namespace: flux-system
  update:
    path: ./staging-candidates/{app}
    strategy: Setters
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata:
  name: {app}
  namespace: {app}-STAGING_SANDBOX_ID
spec:
  interval: 5m
  releaseName: {app}
  chart:
    spec:
      chart: service
      sourceRef:
        kind: GitRepository
        name: {app}
  values:
    sandboxId: STAGING_SANDBOX_ID
    service:
      enabled: false
    image:
      repository: registry.local/{app}
      tag: {tag} # {{"$imagepolicy": "{app}-STAGING_SANDBOX_ID:{app}:tag"}}
"""


@dataclass
class CellenicsRepo:
    config: ConfigRepo
    charts: str  # URL of the chart repository
    shas: dict[str, str]  # chart repo ref → commit
    pr: int = 42  # the api's pull request among the candidates

    @property
    def url(self) -> str:
        return self.config.url

    def chart_ref(self, ref: str) -> None:
        """`ref` in the chart repository too (a new pull request), at master's commit."""
        bare = self.charts.removeprefix("file://")
        run_git(["update-ref", ref, self.shas["refs/heads/master"]], cwd=Path(bare))
        self.shas[ref] = self.shas["refs/heads/master"]

    def pull(self) -> None:
        """The working clone at the remote's head (after conveyor's own commits)."""
        run_git(
            ["pull", "--quiet", "--ff-only", "origin", self.config.branch], cwd=self.config.work
        )

    def candidate(self, app: str, ref: str, *, tag: str) -> None:
        """Write app's candidate for `ref` (refs/heads/x or refs/pull/N/merge)."""
        ref_id = ref.replace("/", "-")
        path = f"staging-candidates/{app}/{ref_id}.yaml"
        if app == "ui":
            text = UI_CANDIDATE.format(charts=self.charts, ref_id=ref_id, tag=tag)
        else:
            # A branch by its name; a pull request's merge ref as Flux names any ref.
            key, value = ("branch", ref[len("refs/heads/") :]) if "heads" in ref else ("name", ref)
            text = V2_CANDIDATE.format(
                app=app, charts=self.charts, ref_key=key, ref_value=value, tag=tag
            )
        self.config.write(path, text)


def _chart_commits(root: Path, pr: int) -> tuple[str, dict[str, str]]:
    bare, work = root / "charts.git", root / "charts"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "master", str(bare)])
    run_git(["init", "--quiet", "--initial-branch", "master", str(work)])
    shutil.copytree(CHART, work / CHART.name)
    shas = {}
    for ref in ("refs/heads/master", "refs/heads/my-branch", f"refs/pull/{pr}/merge"):
        (work / "ref.txt").write_text(ref)
        run_git(["add", "--all"], cwd=work)
        run_git(
            ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", ref], cwd=work
        )
        run_git(["push", "--quiet", str(bare), f"HEAD:{ref}"], cwd=work)
        shas[ref] = run_git(["rev-parse", "HEAD"], cwd=work).strip()
    return f"file://{bare}", shas


def cellenics_repo(root: Path, *, pr: int = 42, shared: str = "default") -> CellenicsRepo:
    """The repo, its api's pull request `pr` among the candidates; the shared api runs
    in `api-<shared>` (a cluster test's own, so that runs never meet)."""
    charts, shas = _chart_commits(root, pr)
    config = ConfigRepo(root, branch="master")
    repo = CellenicsRepo(config, charts, shas, pr)
    config.write("conveyor.yaml", CONVEYOR_YAML)
    config.write("staging/api.yaml", SHARED_API.format(charts=charts, shared=shared))
    for app in ("ui", "api", "worker"):
        repo.candidate(app, "refs/heads/master", tag="master-1")
    repo.candidate("api", f"refs/pull/{pr}/merge", tag=f"pr-{pr}-1")
    repo.candidate("ui", "refs/heads/my-branch", tag="my-branch-1")
    config.commit("staging and its candidates")
    return repo
