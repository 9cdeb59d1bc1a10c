"""Every `conveyor ...` command line in README.md, as a new user would type it.

Each line of the README's code blocks that starts with `conveyor` is read as written
(continuation lines joined, the `# comment` dropped, `a; b` split). For every one, its
command exists and each flag it names (in `[...]`, `(a | b)` and `x|y` alike) is in that
command's `--help`. The lines that need no cluster then run for real, in README order,
on real git repositories made here (see `readme_world`), with the README's placeholders
replaced like this:

    URL          the bare config repository, as a file:// URL
    REF / REF    HEAD~1 / HEAD of a clone of it (guard)
    NAME         alice (guard's --actor)
    V            1.4.3
    .            the working directory: the app repository for `version`, `publish`,
                 `hotfix` and `notes`, the config clone for `diff` and `guard`

The app repository is examples/apps/ui without its profile (so publish uses the
built-in Cellenics one), and CI is a GitHub push to master with an AWS account set.

`[...]` parts are left out. The lines that need the sandbox (reconcile, agent, get,
suspend, serve, rollback, images, sandbox) are checked by their help here and run by
the cluster tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conveyor.cli.main import app
from conveyor.sandbox.build import ensure_tools
from conveyor.source.git import run_git
from tests.unit.conftest import EXAMPLE_APPS, ROOT
from tests.unit.test_promotion import deployment

README = ROOT / "README.md"
SOPS_DIFF = (
    "conveyor diff --repo . --base main --head my-branch --env staging "
    "--sops-age-key-file age.agekey"
)
# README line → the exit code the README promises (diff: "exit 0 none, 1 changes").
RUNS_OFFLINE = {
    "conveyor version [--scheme short-sha|ref-id] [--github-output]": 0,
    "conveyor publish --repo URL [--environment staging] [--version V]": 0,
    "conveyor guard --base REF --head REF --actor NAME [--format markdown]": 0,
    "conveyor promote --repo URL --from staging --to production [--app ui] [--apply]": 0,
    "conveyor promote --repo URL --to staging --version v1.4.3": 0,
    "conveyor promote --repo URL --from staging --to production --mode branch --outfile diff.md": 0,
    "conveyor gate check --repo URL --env production --version 1.4.3 [-o json]": 0,
    "conveyor approve --repo URL --env production --version 1.4.3 --by alice": 0,
    "conveyor unpin ui --repo URL --env production": 0,  # ui is not pinned: nothing to do
    "conveyor diff --repo . --base main --head my-branch --env production --format markdown": 1,
    SOPS_DIFF: 1,
    "conveyor hotfix start --from-tag v1.4.2 [--push]": 0,
    "conveyor notes --from v1.4.2 --to v1.4.3": 0,
}
IN_APP_REPO = ("conveyor version", "conveyor publish", "conveyor hotfix", "conveyor notes")
GITHUB_PUSH = {
    "GITHUB_ACTIONS": "true",
    "GITHUB_REF": "refs/heads/master",
    "GITHUB_SHA": "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
    "GITHUB_EVENT_NAME": "push",
    "GITHUB_REPOSITORY": "hms-dbmi-cellenics/ui",
    "GITHUB_SERVER_URL": "https://github.com",
}


def readme_commands() -> list[str]:
    """The command lines of the README's code blocks (four-space indented), in order."""
    commands: list[str] = []
    pending = ""
    for raw in README.read_text().splitlines():
        if not raw.startswith("    ") and not pending:
            continue
        line = raw.strip()
        if pending:
            line = f"{pending} {line}"
            pending = ""
        if not line.startswith("conveyor "):
            continue
        line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        commands += [part.strip() for part in line.split("; ")]
    return commands


def command_path(line: str) -> list[list[str]]:
    """The subcommand words of a line, each word's alternatives (`render|apply`)."""
    words = []
    for word in line.split()[1:]:
        if word.startswith(("-", "[", "(")) or word.isupper() or not re.match(r"^[a-z]", word):
            break
        words.append(word.split("|"))
    return words


def help_of(words: list[str]) -> str:
    # In process (the real runs below go through `python -m conveyor`): a wide terminal,
    # so that rich does not fold a long flag.
    result = CliRunner().invoke(app, [*words, "--help"], terminal_width=250)
    assert result.exit_code == 0, f"conveyor {' '.join(words)} --help: {result.output}"
    return result.stdout


def test_the_readme_has_command_lines_and_every_offline_run_is_one_of_them() -> None:
    commands = readme_commands()
    assert len(commands) >= 25
    missing = [line for line in RUNS_OFFLINE if line not in commands]
    assert missing == [], "README lines changed; update RUNS_OFFLINE"


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_line_parses(line: str) -> None:
    paths = [[]]  # every combination of the alternatives
    for alternatives in command_path(line):
        paths = [[*path, word] for path in paths for word in alternatives]
    flags = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", line.split(" ", 1)[1]))
    for words in paths:
        text = help_of(words)
        unknown = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}\b", text))
        assert unknown == [], f"{line}: conveyor {' '.join(words)} has no {unknown}"


@dataclass
class World:
    config: Path  # bare config repository
    clone: Path  # a clone of it with branches main and my-branch
    app: Path  # the ui app repository, tags v1.4.2 and v1.4.3


def git(cwd: Path, *args: str) -> str:
    return run_git(["-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd)


@pytest.fixture
def readme_world(tmp_path: Path) -> World:
    config = tmp_path / "releases.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(config)])
    clone = tmp_path / "releases"
    run_git(["clone", "--quiet", str(config), str(clone)])
    environments = [{"name": "staging", "path": "staging"}]
    environments.append({"name": "production", "path": "production"})
    commits = {
        "environments": {
            "conveyor.yaml": yaml.safe_dump(
                {"environments": environments, "guard": {"identities": ["alice"]}}
            )
        },
        "apps": {
            "staging/ui/deploy.yaml": deployment("ui", "ui-staging", tag="1.4.3", replicas=1),
            "production/ui/deploy.yaml": deployment("ui", "ui-prod", tag="1.4.2", replicas=3),
        },
    }
    for message, files in commits.items():
        for path, text in files.items():
            (clone / path).parent.mkdir(parents=True, exist_ok=True)
            (clone / path).write_text(text)
        git(clone, "add", "--all")
        git(clone, "commit", "--quiet", "-m", message)
    git(clone, "push", "--quiet", "origin", "HEAD:main")
    git(clone, "checkout", "--quiet", "-b", "my-branch")
    prod = clone / "production/ui/deploy.yaml"
    prod.write_text(deployment("ui", "ui-prod", tag="1.4.3", replicas=3))
    git(clone, "commit", "--quiet", "-am", "ui 1.4.3 to production")
    git(clone, "checkout", "--quiet", "main")
    _sops_secret_changed_on_my_branch(clone)
    app = tmp_path / "ui"
    shutil.copytree(EXAMPLE_APPS / "ui", app)
    shutil.rmtree(app / ".conveyor")  # publish with the built-in Cellenics profile
    run_git(["init", "--quiet", "--initial-branch", "master", str(app)])
    git(app, "add", "--all")
    git(app, "commit", "--quiet", "-m", "first release")
    git(app, "tag", "v1.4.2")
    (app / "NOTES").write_text("a fix\n")
    git(app, "add", "--all")
    git(app, "commit", "--quiet", "-m", "Fix the upload (#7)")
    git(app, "tag", "v1.4.3")
    return World(config, clone, app)


def _sops_secret_changed_on_my_branch(clone: Path) -> None:
    """staging/db/secret.yaml encrypted with SOPS for the key `age.agekey` (left in the
    clone, untracked, as a reviewer keeps it), its password changed on my-branch."""
    tools = ensure_tools()
    key = clone / "age.agekey"
    subprocess.run([str(tools / "age-keygen"), "-o", str(key)], check=True, capture_output=True)
    recipient = subprocess.run(
        [str(tools / "age-keygen"), "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    secret = clone / "staging/db/secret.yaml"
    for branch, password in (("main", "first-password"), ("my-branch", "second-password")):
        git(clone, "checkout", "--quiet", branch)
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: ui-staging}\n"
            f"stringData: {{password: {password}}}\n"
        )
        subprocess.run(
            [str(tools / "sops"), "encrypt", "--age", recipient, "--in-place", str(secret)],
            check=True,
            capture_output=True,
        )
        git(clone, "add", "staging/db/secret.yaml")
        git(clone, "commit", "--quiet", "-m", f"db password on {branch}")
    git(clone, "checkout", "--quiet", "main")
    git(clone, "push", "--quiet", "origin", "HEAD:main")


def as_run(line: str, world: World) -> list[str]:
    """The README line with its placeholders filled and its `[...]` parts left out."""
    line = re.sub(r"\s*\[[^\]]*\]", "", line)
    words = line.split()[1:]
    refs = iter(["HEAD~1", "HEAD"])
    filled = {"URL": f"file://{world.config}", "NAME": "alice", "V": "1.4.3"}
    return [next(refs) if w == "REF" else filled.get(w, w) for w in words]


def test_the_readme_command_lines_that_need_no_cluster_run_as_written(
    readme_world: World, tmp_path: Path, no_ci_env: dict[str, str]
) -> None:
    env = {**no_ci_env, **GITHUB_PUSH, "GITHUB_OUTPUT": str(tmp_path / "github-output")}
    env |= {"AWS_ACCOUNT_ID": "123456789012", "AWS_REGION": "eu-west-1"}
    # sops and age on PATH, as `conveyor sandbox env` puts them.
    env["PATH"] = os.pathsep.join([str(ensure_tools()), env.get("PATH", "")])
    for line in (c for c in readme_commands() if c in RUNS_OFFLINE):
        in_app = line.startswith(IN_APP_REPO)
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", *as_run(line, readme_world)],
            cwd=readme_world.app if in_app else readme_world.clone,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == RUNS_OFFLINE[line], f"{line}\n{result.stdout}{result.stderr}"
        if line == SOPS_DIFF:  # decrypted to be compared, never shown
            assert "password: '*** (secret value changed)'" in result.stdout, result.stdout
            shown = result.stdout + result.stderr
            assert "first-password" not in shown and "second-password" not in shown
    production = run_git(
        ["--git-dir", str(readme_world.config), "show", "main:production/ui/deploy.yaml"]
    )
    assert "registry.local/ui:1.4.3" in production  # the promotion happened
    published = ["--git-dir", str(readme_world.config), "show", "main:staging/ui.yaml"]
    assert "tag: refs-heads-master-3f2a9c1" in run_git(published)
