"""The command line as a new user meets it, on real git repositories: master-based
repos, `file://` URLs, repos without conveyor.yaml, branches that do not exist yet."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from conveyor.config.userfile import ConfigError
from conveyor.source.git import run_git
from conveyor.web.repo import ConfigRepo
from tests.unit.test_promotion import Repo, app_repo, deployment, invoke


def master_repo(tmp_path: Path, *, project: bool = True) -> Repo:
    """A config repo whose default branch is master; conveyor.yaml names no branch."""
    repo = Repo(tmp_path, branch="master")
    files = {
        "staging/web/deploy.yaml": deployment("web", "web-staging", tag="1.2.0", replicas=1),
        "production/web/deploy.yaml": deployment("web", "web-prod", tag="1.1.0", replicas=3),
    }
    if project:
        environments = [{"name": "staging", "path": "staging"}]
        environments.append({"name": "production", "path": "production"})
        files["conveyor.yaml"] = yaml.safe_dump({"environments": environments})
    repo.commit(files, message="1.1.0")
    path = "production/web/deploy.yaml"
    repo.commit({path: deployment("web", "web-prod", tag="1.2.0", replicas=3)}, message="1.2.0")
    return repo


def test_rollback_and_promote_use_the_repositorys_head_branch(tmp_path: Path) -> None:
    repo = master_repo(tmp_path)
    rollback = ["rollback", "--repo", repo.url, "--env", "production", "--app", "web"]
    result = invoke(*rollback, "--no-apply", "-o", "json")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["from"], json.loads(result.stdout)["to"]) == (
        "1.2.0",
        "1.1.0",
    )
    assert "registry.local/web:1.1.0" in repo.show("production/web/deploy.yaml", "master")
    promote = invoke("promote", "--repo", repo.url, "--from", "staging", "--to", "production")
    assert promote.exit_code == 0, promote.output
    assert "registry.local/web:1.2.0" in repo.show("production/web/deploy.yaml", "master")


def test_images_scan_reads_the_repositorys_head_branch(tmp_path: Path) -> None:
    repo = master_repo(tmp_path)
    result = invoke("images", "scan", "--repo", repo.url, "--path", "production", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["automations"] == []
    assert run_git(["--git-dir", repo.url, "branch", "--list", "main"]).strip() == ""


def test_diff_of_two_revisions_takes_a_file_url(tmp_path: Path) -> None:
    repo = master_repo(tmp_path)
    clone = f"file://{repo.work}"
    result = invoke(
        "diff", "--repo", clone, "--base", "HEAD~1", "--head", "HEAD", "--path", "production"
    )
    assert result.exit_code in (0, 1), result.output  # 1: there are changes
    assert "web" in result.stdout and "1.2.0" in result.stdout
    url = "https://example.invalid/x.git"
    remote = invoke("diff", "--repo", url, "--base", "a", "--head", "b", "--path", "production")
    assert remote.exit_code == 2
    assert "read a local clone, not https://example.invalid/x.git" in remote.stderr


def test_env_without_conveyor_yaml_is_the_folder_of_that_name(tmp_path: Path) -> None:
    repo = master_repo(tmp_path, project=False)
    rollback = ["rollback", "--repo", repo.url, "--env", "production", "--app", "web"]
    # As a person runs it, so that the warning goes where logging puts it: stderr, once.
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", *rollback, "--no-apply"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    note = "environment 'production': no conveyor.yaml declares it; using the folder production/"
    assert result.stderr.count(note) == 1, result.stderr
    assert "registry.local/web:1.1.0" in repo.show("production/web/deploy.yaml", "master")
    promote = ["promote", "--repo", repo.url, "--from", "staging", "--to", "production"]
    assert invoke(*promote).exit_code == 0
    assert "registry.local/web:1.2.0" in repo.show("production/web/deploy.yaml", "master")
    missing = invoke("rollback", "--repo", repo.url, "--env", "dev", "--app", "web", "--no-apply")
    assert missing.exit_code == 2
    assert "repository has no folder dev/ or releases/dev/" in missing.stderr


def test_env_without_conveyor_yaml_finds_releases_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = Repo(tmp_path, branch="master")
    path = "releases/staging/web/deploy.yaml"
    repo.commit({path: deployment("web", "web", tag="1.0.0", replicas=1)}, message="1.0.0")
    repo.commit({path: deployment("web", "web", tag="1.1.0", replicas=1)}, message="1.1.0")
    rollback = ["rollback", "--repo", repo.url, "--env", "staging", "--app", "web"]
    with caplog.at_level(logging.WARNING, logger="conveyor.config"):
        result = invoke(*rollback, "--no-apply")
    assert result.exit_code == 0, result.output
    assert "using the folder releases/staging/" in caplog.text
    assert "registry.local/web:1.0.0" in repo.show(path, "master")


class Unavailable(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def test_promote_shows_the_gate_it_waits_on_and_the_time_left(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/ready"
    try:
        repo = Repo(tmp_path)
        gate = {"type": "http", "url": url, "interval": "1s"}
        environments = [
            {"name": "staging", "path": "staging"},
            {"name": "production", "path": "production", "gates": [gate]},
        ]
        repo.commit(
            {
                "conveyor.yaml": yaml.safe_dump({"environments": environments}),
                "staging/web/deploy.yaml": deployment("web", "s", tag="1.2.0", replicas=1),
                "production/web/deploy.yaml": deployment("web", "p", tag="1.1.0", replicas=1),
            }
        )
        before = repo.head()
        promote = ["promote", "--repo", repo.url, "--from", "staging", "--to", "production"]
        result = invoke(*promote, "--gate-timeout", "4s")
    finally:
        server.shutdown()
    assert result.exit_code == 1, result.output
    said = " ".join(result.stderr.split())
    closed = f"waiting on gate http: closed (GET {url} answered 503, expected 200); "
    assert re.search(re.escape(closed) + r"[1-4]s left, next check in 1s", said), said
    # Each check says how long is left, counting down (how far depends on the machine's
    # load, so the test asks only that it counts down).
    left = [int(n) for n in re.findall(r"(\d+)s left", said)]
    assert len(left) >= 2 and left == sorted(left, reverse=True) and left[0] > left[-1], said
    assert repo.head() == before


def test_a_promotion_keeps_the_files_trailing_document_marker(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    prod = deployment("web", "p", tag="1.1.0", replicas=3) + "---\n"
    repo.commit(
        {
            "staging/web/deploy.yaml": deployment("web", "s", tag="1.2.0", replicas=1),
            "production/web/deploy.yaml": prod,
        }
    )
    result = invoke("promote", "--repo", repo.url, "--from", "staging", "--to", "production")
    assert result.exit_code == 0, result.output
    assert repo.show("production/web/deploy.yaml") == prod.replace("web:1.1.0", "web:1.2.0")


def test_versions_with_or_without_v_mean_the_same_release(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit({"staging/web/deploy.yaml": deployment("web", "s", tag="1.4.2", replicas=1)})
    result = invoke("promote", "--repo", repo.url, "--to", "staging", "--version", "v1.4.3")
    assert result.exit_code == 0, result.output
    assert 'image: "registry.local/web:1.4.3"' in repo.show("staging/web/deploy.yaml")
    again = invoke("promote", "--repo", repo.url, "--to", "staging", "--version", "1.4.3")
    assert again.exit_code == 0 and "nothing to promote" in again.stdout


def test_notes_take_versions_with_or_without_v_and_refuse_swapped_ones(tmp_path: Path) -> None:
    app = app_repo(tmp_path)  # tags v1.0.0 and v1.1.0
    plain = invoke("notes", "--repo", str(app), "--from", "1.0.0", "--to", "1.1.0")
    assert plain.exit_code == 0, plain.output
    assert "#12 Retry failed jobs" in plain.stdout
    swapped = invoke("notes", "--repo", str(app), "--from", "v1.1.0", "--to", "v1.0.0")
    assert swapped.exit_code == 2
    assert "--from v1.1.0 is later than --to v1.0.0: swap them" in swapped.stderr
    missing = invoke("notes", "--repo", str(app), "--from", "1.0.9", "--to", "v1.1.0")
    assert missing.exit_code == 2
    assert "--from: unknown revision '1.0.9' nor 'v1.0.9'" in missing.stderr
    assert "rev-parse" not in missing.stderr


def test_the_hotfix_hint_is_a_command_that_runs(tmp_path: Path) -> None:
    app = app_repo(tmp_path)
    result = invoke("hotfix", "start", "--repo", str(app), "--from-tag", "v1.1.0")
    assert result.exit_code == 0, result.output
    hint = " ".join(result.stdout.split())
    assert (
        "`conveyor promote --repo CONFIG_REPO_URL --to staging --version v1.1.1` (image tag 1.1.1)"
        in hint
    )


BROKEN_PROJECT = """\
# environments in promotion order
environments:
  - name: staging
    path: staging
  - name: production
    path: production
    gates:
      - type: soak
        duration: forever
"""


def test_a_broken_conveyor_yaml_is_named_as_in_the_repository_never_by_a_cache_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that reads a remote repository reads it from a clone of its own
    (conveyor's cache, a temporary folder); the person only knows `conveyor.yaml`."""
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path / "cache"))
    repo = master_repo(tmp_path)
    repo.commit({"conveyor.yaml": BROKEN_PROJECT}, message="soak forever")
    url = f"file://{repo.url}"
    expected = "conveyor.yaml:9: environments[1].gates[0].duration: expected a duration"
    commands = [  # `reconcile` asks a cluster first: see tests/cluster/test_reconcile.py
        ["diff", "--repo", url, "--env", "staging"],
        ["promote", "--repo", url, "--from", "staging", "--to", "production"],
        ["rollback", "--repo", url, "--env", "production", "--app", "web", "--no-apply"],
    ]
    for command in commands:
        result = invoke(*command)
        output = " ".join(result.output.split())  # as wide as the terminal: unwrapped
        assert result.exit_code != 0 and f" {expected}" in f" {output}", (command, output)
        assert "/conveyor.yaml" not in output, (command, output)
    # The dashboard (`conveyor serve --repo`) reads it from a clone in the cache too.
    with pytest.raises(ConfigError) as raised:
        asyncio.run(ConfigRepo(url, kubeconfig=None, context=None).project())
    assert str(raised.value).startswith(expected)
