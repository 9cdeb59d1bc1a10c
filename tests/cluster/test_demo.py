"""`make demo` in CI mode: the whole story, on two clusters, ends with every demo app
Ready and the dashboard reading both."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.cluster


def test_demo_runs_the_whole_story_and_ends_ready() -> None:
    env = {**os.environ, "DEMO_EXIT": "1", "DEMO_SANDBOX": "demo-ci"}
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for step in (
        "CI published release v1.0.0",
        "the agents deployed them",
        "image automation found ui:",
        "the queue gate opened after",
        "production runs the versions tested on staging",
        "the dashboard reads both clusters: staging on sandbox-demo-ci-staging",
        "dashboard: http://",
    ):
        assert step in output, output[-4000:]
    # Every row of the summary is Ready, none missing or stalled.
    rows = [line for line in output.splitlines() if "│ staging" in line or "│ production" in line]
    assert len(rows) == 6 and all("Ready" in row for row in rows), "\n".join(rows)
