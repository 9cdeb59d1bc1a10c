"""No command runs because of what a file, a webhook or a request says (issue #10, part 2).

Each test hands a hostile value to the real code path that used to pass it to git or a
helper program, with a payload that would create a marker file, and asserts that the
marker was never made and that the error names the value (and the file and line, where
it came from a file). Real git throughout; the helm calls are in
tests/cluster/test_injection.py, where the sandbox provides the real helm.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor.config import names
from conveyor.config.names import UnsafeValueError
from conveyor.images.credentials import CredentialsError, DockerConfig
from conveyor.render.charts import ChartResolver
from conveyor.render.discover import discover
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError
from conveyor.render.render import Renderer
from conveyor.source import git
from conveyor.source.git import Checkout, GitError, default_branch, run_git
from tests.cluster.gitops import ConfigRepo, chart_repo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file every payload below tries to create."""
    return tmp_path / "pwned"


def upload_pack(marker: Path) -> str:
    """The issue's payload: `git fetch URL <this>` runs `touch` on the fetching side."""
    return f"--upload-pack=touch {marker};git-upload-pack"


def hostile_script(tmp_path: Path, marker: Path) -> Path:
    """A program that would leave the marker if anything ran it (and passes its input
    through, as a helm post-renderer does)."""
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\ncat\n")
    script.chmod(0o755)
    return script


def helm_release(
    *,
    chart_git: str,
    name: str = "api",
    ref: str = "master",
    release: str | None = None,
    target_namespace: str = "apps",
) -> str:
    """A Flux v1 HelmRelease of the example chart (charts/service in `chart_git`)."""
    return f"""
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: {name}
  namespace: apps
spec:
  releaseName: {json.dumps(release or name)}
  targetNamespace: {json.dumps(target_namespace)}
  chart:
    git: {json.dumps(chart_git)}
    path: service
    ref: {json.dumps(ref)}
  values:
    replicaCount: 1
"""


def config_map(name: str) -> str:
    return f"""
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: apps
data:
  greeting: hello
"""


def write(root: Path, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(text).lstrip())


async def _no_values(_ref: object) -> str | None:
    return None


def render_all(root: Path, env: str) -> dict[str, RenderError | None]:
    """Every app of the folder through discover() and Renderer.render(), as the engine
    renders them: by the app's path, its RenderError, or None when it rendered."""
    tree = discover(root, env)
    renderer = Renderer(
        root,
        charts=ChartResolver(root / ".cache", HelmCLI(binary="helm-never-runs"), tree.sources),
        values_lookup=_no_values,
    )

    async def each() -> dict[str, RenderError | None]:
        results: dict[str, RenderError | None] = {}
        for app in tree.apps:
            try:
                await renderer.render(app)
                results[app.path] = None
            except RenderError as error:
                results[app.path] = error
        return results

    return asyncio.run(each())


# --- the rules ------------------------------------------------------------------------

GOOD_REFS = ["master", "main", "v1.2.3", "refs/heads/main", "release/2024.1", "feat_x-y", "HEAD"]
BAD_REFS = [
    "-x",
    "--upload-pack=touch x;git-upload-pack",
    "a..b",
    "a b",
    "a~1",
    "a^",
    "a:b",
    "a?",
    "a*",
    "a[",
    "a\\b",
    "/a",
    "a/",
    "a//b",
    "a.",
    ".a",
    "a/.b",
    "a.lock",
    "@",
    "a@{1}",
    "a\x00b",
    "a\nb",
    "a\x7f",
]


@pytest.mark.parametrize("ref", GOOD_REFS + BAD_REFS)
def test_git_ref_rule_agrees_with_git_check_ref_format(ref: str) -> None:
    """Our rule is git's own (`check-ref-format --allow-onelevel`), plus: never `-...`."""
    if "\x00" in ref:  # no argv can carry a NUL; git would never see it
        git_says_ok = False
    else:
        git_says_ok = (
            subprocess.run(
                ["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True
            ).returncode
            == 0
        ) and not ref.startswith("-")
    try:
        names.git_ref(ref)
        ours_ok = True
    except UnsafeValueError:
        ours_ok = False
    assert ours_ok == git_says_ok == (ref in GOOD_REFS)


def test_git_ref_accepts_commit_shas_and_refuses_other_types() -> None:
    assert names.git_ref("0123abc") == "0123abc"
    assert names.git_ref("a" * 40) == "a" * 40
    assert names.git_ref("b" * 64) == "b" * 64
    for value in (None, "", 12, ["master"]):
        with pytest.raises(UnsafeValueError, match="non-empty string"):
            names.git_ref(value)


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/org/charts",
        "http://127.0.0.1:8080/charts.git",
        "ssh://git@github.com/org/charts.git",
        "git://example.org/charts.git",
        "file:///srv/charts.git",
        "git@github.com:hms-dbmi-cellenics/ui",
        "/srv/charts.git",
        "../charts.git",
    ],
)
def test_git_url_rule_accepts_the_transports_teams_use(url: str) -> None:
    assert names.git_url(url) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("--upload-pack=touch x;git-upload-pack", "must not start with '-'"),
        ("ext::sh -c touch% /tmp/x", "remote helper"),
        ("fd::3", "remote helper"),
        ("s3://bucket/repo", "must use one of"),
        ("ssh://-oProxyCommand=touch%20x/repo", "starting with '-'"),
        ("-oProxyCommand=touch x:repo", "must not start with '-'"),
        ("git@-oProxyCommand=x:repo", "starting with '-'"),
        ("https://example.org/\nrepo", "control character"),
    ],
)
def test_git_url_rule_refuses_options_helpers_and_ssh_options(url: str, reason: str) -> None:
    with pytest.raises(UnsafeValueError, match=reason):
        names.git_url(url)


def test_refusals_never_show_a_password(tmp_path: Path) -> None:
    url = "s3://ci:s3cr3t-token@bucket/charts.git"
    with pytest.raises(UnsafeValueError) as refused:
        names.git_url(url)
    assert "s3cr3t" not in str(refused.value) and "ci:***@bucket" in str(refused.value)
    with pytest.raises(GitError) as failed:
        Checkout.open(url, tmp_path / "wc")
    assert "s3cr3t" not in str(failed.value)
    root = tmp_path / "repo"
    write(root, "prod/api.yaml", helm_release(chart_git=url))
    error = render_all(root, "prod")["prod/api.yaml"]
    assert error is not None and "s3cr3t" not in str(error)


def test_helm_and_kubernetes_name_rules() -> None:
    assert names.helm_release_name("ui-default-ui") == "ui-default-ui"
    assert names.helm_release_name("a.b-c") == "a.b-c"
    for bad in ("--post-renderer=sh", "-a", "UI", "a_b", "a" * 54, "a-", "a b", ""):
        with pytest.raises(UnsafeValueError):
            names.helm_release_name(bad)
    assert names.kubernetes_namespace("ui-default") == "ui-default"
    for bad in ("--all-namespaces", "a.b", "A", "a" * 64, "-a"):
        with pytest.raises(UnsafeValueError):
            names.kubernetes_namespace(bad)
    assert names.chart_name("ingress-nginx") == "ingress-nginx"
    for bad in ("--post-renderer=sh", "a/b", ".hidden", "a b"):
        with pytest.raises(UnsafeValueError):
            names.chart_name(bad)
    assert names.chart_version(">=1.0.0 <2.0.0") == ">=1.0.0 <2.0.0"
    with pytest.raises(UnsafeValueError):
        names.chart_version("--post-renderer=sh")
    assert names.chart_path("/charts/app/") == "/charts/app/"
    with pytest.raises(UnsafeValueError, match="leave the repository"):
        names.chart_path("../../etc")
    assert (
        names.oci_reference("oci://127.0.0.1:5000/charts/app") == "oci://127.0.0.1:5000/charts/app"
    )
    for bad in ("oci://-x/app", "oci://host", "https://host/app", "--repo=x"):
        with pytest.raises(UnsafeValueError):
            names.oci_reference(bad)
    for bad in ("file:///etc", "s3://bucket/charts", "--repo=https://x", "https://-x/"):
        with pytest.raises(UnsafeValueError):
            names.helm_repository_url(bad)


# --- the first injection: a Flux v1 chart ref reaches `git fetch` -------------


def test_chart_ref_upload_pack_runs_nothing_and_names_file_and_line(
    tmp_path: Path, marker: Path
) -> None:
    charts = chart_repo(tmp_path / "remote")
    root = tmp_path / "repo"
    settings = config_map("api-settings")
    release_line = len(settings.splitlines()) + 2  # after the ConfigMap and the `---`
    write(
        root,
        "prod/api.yaml",
        settings + "---\n" + helm_release(ref=upload_pack(marker), chart_git=charts),
    )
    write(root, "prod/web/web.yaml", config_map("web"))
    results = render_all(root, "prod")
    error = results["prod/api.yaml"]
    assert isinstance(error, RenderError)
    assert error.file == "prod/api.yaml" and error.line == release_line
    # Refused where the file is read: its field, and what it held.
    assert "spec.chart.ref: expected a value that does not start with '-'" in str(error)
    assert "got '--upload-pack=touch" in str(error)
    assert results["prod/web"] is None
    assert not marker.exists()


def test_chart_git_url_that_runs_a_command_is_refused(tmp_path: Path, marker: Path) -> None:
    root = tmp_path / "repo"
    for index, url in enumerate(
        (
            upload_pack(marker),
            f"ext::sh -c touch% {marker}",
            f"ssh://-oProxyCommand=touch%20{marker}/x",
        )
    ):
        write(root, f"prod/app{index}.yaml", helm_release(name=f"app{index}", chart_git=url))
    results = render_all(root, "prod")
    assert set(results) == {"prod/app0.yaml", "prod/app1.yaml", "prod/app2.yaml"}
    for error in results.values():
        assert isinstance(error, RenderError) and error.line == 1
        # Refused by the model (a leading '-') or by the URL rule (a remote helper).
        assert "spec.chart.git: expected" in str(error) or "chart git URL" in str(error)
    assert not marker.exists()


def test_flux_v2_git_source_ref_is_refused_naming_the_source(tmp_path: Path, marker: Path) -> None:
    charts = chart_repo(tmp_path / "remote")
    root = tmp_path / "repo"
    write(
        root,
        "prod/sources.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: GitRepository
        metadata:
          name: charts
          namespace: apps
        spec:
          url: {charts}
          ref:
            branch: {json.dumps(upload_pack(marker))}
        """,
    )
    write(
        root,
        "prod/api.yaml",
        """
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata:
          name: api
          namespace: apps
        spec:
          chart:
            spec:
              chart: service
              sourceRef:
                kind: GitRepository
                name: charts
        """,
    )
    error = render_all(root, "prod")["prod/api.yaml"]
    # The app whose chart it is fails, naming the source's file, line and field.
    assert isinstance(error, RenderError) and error.file == "prod/sources.yaml"
    assert "prod/sources.yaml:1: GitRepository charts: spec.ref.branch: expected" in str(error)
    assert "got '--upload-pack" in str(error)
    assert not marker.exists()


def test_release_name_and_namespace_are_refused_before_any_chart_fetch(
    tmp_path: Path, marker: Path
) -> None:
    """The issue's second injection: `releaseName: --post-renderer=...` reached
    `helm template`. It is now refused while the HelmRelease's file and line are known."""
    charts = chart_repo(tmp_path / "remote")
    root = tmp_path / "repo"
    script = hostile_script(tmp_path, marker)
    write(
        root, "prod/api.yaml", helm_release(release=f"--post-renderer={script}", chart_git=charts)
    )
    write(
        root,
        "prod/web.yaml",
        helm_release(name="web", target_namespace="--all-namespaces", chart_git=charts),
    )
    results = render_all(root, "prod")
    api, web = results["prod/api.yaml"], results["prod/web.yaml"]
    assert isinstance(api, RenderError) and api.file == "prod/api.yaml" and api.line == 1
    assert "spec.releaseName: expected a value that does not start with '-'" in str(api)
    assert "got '--post-renderer=" in str(api)
    assert isinstance(web, RenderError) and "spec.targetNamespace: expected" in str(web)
    assert not (root / ".cache" / "git").exists()  # refused before git was asked
    assert not marker.exists()


# --- every git call that takes a value from outside -----------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    config = ConfigRepo(tmp_path / "remote")
    config.write("prod/a.yaml", config_map("a"))
    config.commit("one")
    return config.work


@pytest.mark.parametrize(
    "call",
    [
        lambda repo, bad: git.resolve_revision(repo, bad),
        lambda repo, bad: git.commits_between(repo, bad, "HEAD"),
        lambda repo, bad: git.commits_between(repo, "HEAD", bad),
        lambda repo, bad: git.paths_changed(repo, bad, "HEAD"),
        lambda repo, bad: git.read_file_at(repo, bad, "prod/a.yaml"),
        lambda repo, bad: git.file_log(repo, ["prod"], revision=bad),
        lambda repo, bad: git.log_entries(repo, "HEAD", bad),
        lambda repo, bad: git.export_tree(repo, bad, repo.parent / "export"),
        lambda repo, bad: git.file_history(repo, ["prod"], revision=bad),
        lambda repo, bad: git.create_branch(repo, bad, "HEAD"),
        lambda repo, bad: git.create_branch(repo, "hotfix", bad),
        lambda repo, bad: git.push_branch(repo, bad),
        lambda repo, bad: git.push_branch(repo, "main", remote=bad),
    ],
    ids=[
        "resolve_revision",
        "commits_between-base",
        "commits_between-head",
        "paths_changed",
        "read_file_at",
        "file_log",
        "log_entries",
        "export_tree",
        "file_history",
        "create_branch-name",
        "create_branch-start",
        "push_branch",
        "push_branch-remote",
    ],
)
def test_revisions_and_branches_never_become_git_options(
    call: object, repo: Path, marker: Path
) -> None:
    """`--output=<file>` makes `git log`, `diff`, `show` and `archive` write a file; a
    revision or branch from a pull request, a CLI flag or a file must never do that."""
    assert callable(call)
    with pytest.raises(GitError, match="must not start with '-'"):
        call(repo, f"--output={marker}")
    assert not marker.exists()


def test_checkout_refuses_hostile_urls_and_branches(tmp_path: Path, marker: Path) -> None:
    bare = ConfigRepo(tmp_path / "remote").bare
    for url in (upload_pack(marker), f"ext::sh -c touch% {marker}"):
        with pytest.raises(GitError, match="repository URL"):
            Checkout.open(url, tmp_path / "wc")
        with pytest.raises(GitError, match="repository URL"):
            git.shallow_clone(url, tmp_path / "clone")
    with pytest.raises(GitError, match="branch '--upload-pack"):
        Checkout.open(str(bare), tmp_path / "wc", branch=upload_pack(marker))
    checkout = Checkout(path=tmp_path / "wc", url=str(bare), branch="main")
    for call in (checkout.fetch, checkout.replace_branch, lambda b: checkout.push(branch=b)):
        with pytest.raises(GitError, match="branch '--upload-pack"):
            call(upload_pack(marker))
    assert not marker.exists()


def test_default_branch_lookup_keeps_the_url_positional(tmp_path: Path, marker: Path) -> None:
    """`reconcile --repo URL` asks the remote for its default branch before cloning."""
    with pytest.raises(GitError):
        default_branch(upload_pack(marker))
    assert not marker.exists()
    bare = ConfigRepo(tmp_path / "remote").bare
    assert default_branch(str(bare)) == "main"


def test_fetch_commit_checks_url_and_ref_and_ends_options(tmp_path: Path, marker: Path) -> None:
    charts = chart_repo(tmp_path / "remote")
    mirror = tmp_path / "mirror"
    run_git(["init", "--quiet", "--bare", str(mirror)])
    assert len(git.fetch_commit(mirror, charts, "master")) == 40
    with pytest.raises(GitError, match="ref '--upload-pack"):
        git.fetch_commit(mirror, charts, upload_pack(marker))
    with pytest.raises(GitError, match="repository URL '--upload-pack"):
        git.fetch_commit(mirror, upload_pack(marker), "master")
    assert not marker.exists()


def test_git_environment_runs_no_remote_helper(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a URL that skipped our checks reaches no program: git_env allows only https,
    http, ssh, git and file, so `evil::x` never starts `git-remote-evil` (which plain
    git would run), and kustomize's own git fetches run with the same environment."""
    helpers = tmp_path / "bin"
    helpers.mkdir()
    helper = helpers / "git-remote-evil"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helpers}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("GIT_ALLOW_PROTOCOL", raising=False)
    with pytest.raises(GitError, match="transport 'evil' not allowed"):
        run_git(["ls-remote", "evil::x"])
    assert not marker.exists()
    subprocess.run(["git", "ls-remote", "evil::x"], capture_output=True, timeout=30)
    assert marker.exists()  # what the environment stops


def test_end_of_options_alone_keeps_a_hostile_ref_positional(tmp_path: Path, marker: Path) -> None:
    """The second line of defence, measured on the real git: with `--end-of-options` a
    ref that slipped past the checks is a bad refspec, not an option."""
    charts = chart_repo(tmp_path / "remote")
    mirror = tmp_path / "mirror"
    run_git(["init", "--quiet", "--bare", str(mirror)])
    with pytest.raises(GitError, match="invalid refspec"):
        run_git(["fetch", "--quiet", "--end-of-options", charts, upload_pack(marker)], cwd=mirror)
    assert not marker.exists()
    # Without it, the same arguments run the command: what the check is there to stop.
    run_git(
        ["fetch", "--quiet", charts.removeprefix("file://"), upload_pack(marker)],
        cwd=mirror,
        check=False,
    )
    assert marker.exists()


# --- docker credential helpers --------------------------------------------------------


def test_credential_helper_is_a_name_never_a_path(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docker-credential-x").mkdir()
    hostile_script(tmp_path, marker)
    config = tmp_path / "config.json"
    for key, helper in (
        ("credHelpers", {"registry.example": "x/../evil.sh"}),
        ("credsStore", "-x"),
    ):
        config.write_text(json.dumps({key: helper}))
        with pytest.raises(CredentialsError, match=f"{config}: cred"):
            DockerConfig.load(config)
    assert not marker.exists()
    config.write_text(json.dumps({"credHelpers": {"registry.example": "ecr-login"}}))
    assert DockerConfig.load(config).helpers == {"registry.example": "ecr-login"}


# --- helm: refused before helm runs ----------------------------------------------------


def test_helm_calls_refuse_hostile_names_before_running(tmp_path: Path, marker: Path) -> None:
    """HelmCLI checks every name itself, whoever calls it (channels, the engine); the
    binary here would leave the marker if it were ever started."""
    helm = HelmCLI(binary=str(hostile_script(tmp_path, marker)))
    bad = f"--post-renderer={tmp_path / 'evil.sh'}"
    chart = str(tmp_path)
    calls = [
        helm.template(bad, "apps", chart, {}),
        helm.template("api", bad, chart, {}),
        helm.upgrade_install(bad, "apps", chart, {}, timeout=30),
        helm.rollback(bad, "apps", 1, timeout=30),
        helm.uninstall(bad, "apps"),
        helm.status(bad, "apps"),
        helm.history("api", "--all-namespaces"),
        helm.manifest(bad, "apps"),
        helm.pull(bad, destination=tmp_path / "pull", repo="https://charts.example"),
        helm.pull("service", destination=tmp_path / "pull", repo="file:///etc"),
        helm.pull("service", destination=tmp_path / "pull", repo="https://c.example", version="-x"),
        helm.pull(bad, destination=tmp_path / "pull"),
    ]
    for call in calls:
        with pytest.raises(HelmError, match=r"must not start with '-'|must start with|not a valid"):
            asyncio.run(call)
    assert not marker.exists()


# --- end to end: `conveyor diff --base/--head`, as CI runs it on a pull request ----------


def test_diff_of_a_pull_request_with_a_hostile_chart_ref_runs_nothing(
    tmp_path: Path, marker: Path
) -> None:
    charts = chart_repo(tmp_path / "remote")
    config = ConfigRepo(tmp_path / "config")
    config.write("prod/web/web.yaml", config_map("web"))
    base = config.commit("base")
    config.write("prod/web/web.yaml", config_map("web").replace("hello", "hi"))
    config.write("prod/api.yaml", helm_release(ref=upload_pack(marker), chart_git=charts))
    head = config.commit("pull request")
    outfile = tmp_path / "diff.txt"  # the text unwrapped, as CI posts it
    result = subprocess.run(
        [
            *(sys.executable, "-m", "conveyor", "diff", "--repo", str(config.work)),
            *("--base", base, "--head", head, "--path", "prod", "--outfile", str(outfile)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CONVEYOR_CACHE": str(tmp_path / "cache")},
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    text = outfile.read_text()
    assert "prod/api.yaml:1: spec.chart.ref: expected a value that does not start" in text
    assert "greeting: hi" in text  # the other app's diff is there
    assert not marker.exists()
