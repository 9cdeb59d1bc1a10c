"""invoke tasks for teams that keep typing `invoke release -f channels/<channel>.yaml`.

invoke loads the channel file (`-f`) as its runtime config; each task hands the
`calitp` section to conveyor, which does the work: `release` runs `conveyor release`,
`diff` runs `conveyor diff` (the pull-request comment, `--outfile diff.md`). Paths in
the channel stay relative to the git root, as they were. Install with
`pip install 'conveyor[invoke]'`; `invoke --list` shows the tasks.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from invoke import Context, task

HELP = {
    "app": "Only this release (e.g. metabase or archiver).",
    "driver": "Only helm or only kustomize releases.",
}


def _plain(value: Any) -> Any:
    """invoke's config proxies as plain dicts and lists, for YAML."""
    if hasattr(value, "keys"):
        return {key: _plain(value[key]) for key in value.keys()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


@contextmanager
def _channel(c: Context) -> Iterator[str]:
    if "calitp" not in c.config:
        raise SystemExit("no channel loaded: run `invoke <task> -f channels/<channel>.yaml`")
    with tempfile.TemporaryDirectory(prefix="calitp-channel-") as directory:
        path = Path(directory) / "channel.yaml"
        path.write_text(yaml.safe_dump({"calitp": _plain(c.config.calitp)}))
        yield str(path)


def _conveyor(c: Context, *args: str | None) -> Any:
    command = [sys.executable, "-m", "conveyor", *(a for a in args if a is not None)]
    return c.run(shlex.join(command), warn=True, pty=False)


def _filters(app: str | None, driver: str | None) -> list[str | None]:
    return ["--app" if app else None, app, "--driver" if driver else None, driver]


@task(help=HELP)
def release(c: Context, app: str | None = None, driver: str | None = None) -> None:
    """Release (deploy) the channel's apps, in file order."""
    with _channel(c) as channel:
        result = _conveyor(c, "release", "-f", channel, *_filters(app, driver))
    if result.exited:
        raise SystemExit(result.exited)


@task(help={**HELP, "outfile": "File for the pull-request comment (markdown)."})
def diff(
    c: Context, app: str | None = None, driver: str | None = None, outfile: str | None = None
) -> None:
    """What a release would change in the cluster, as the pull-request comment."""
    with _channel(c) as channel:
        out = ["--outfile", outfile] if outfile else [None]
        result = _conveyor(c, "diff", "-f", channel, *_filters(app, driver), *out)
    if result.exited not in (0, 1):  # 1 means "there are changes", not a failure
        raise SystemExit(result.exited)
