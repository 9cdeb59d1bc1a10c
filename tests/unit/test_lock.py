"""The lock is the single source of installed packages, for `make test` and `make image`.

These fail when pyproject.toml and uv.lock disagree, or when the hashed requirement
files that pip installs from (requirements/) were not exported from the current lock.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPORTS = {
    "requirements/runtime.txt": [],
    "requirements/dev.txt": ["--extra", "dev"],
}


def _uv() -> str:
    beside_python = Path(sys.executable).parent / "uv"
    found = str(beside_python) if beside_python.exists() else shutil.which("uv")
    assert found, "uv is a dev dependency (pyproject.toml); install the dev requirements"
    return found


def test_lock_matches_pyproject() -> None:
    result = subprocess.run(
        [_uv(), "lock", "--check", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"uv.lock is stale, run `make lock`:\n{result.stderr}"


@pytest.mark.parametrize("export", sorted(EXPORTS))
def test_requirements_are_exported_from_the_lock(export: str) -> None:
    exported = subprocess.run(
        [_uv(), "export", "--frozen", "--no-emit-project", "--no-header", "-q", *EXPORTS[export]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (ROOT / export).read_text() == exported, f"{export} is stale, run `make lock`"


def test_every_requirement_is_pinned_with_a_hash() -> None:
    for export in EXPORTS:
        requirements = (ROOT / export).read_text().replace("\\\n", " ").splitlines()
        entries = [line for line in requirements if line.strip() and not line.startswith(" ")]
        entries = [line for line in entries if not line.lstrip().startswith("#")]
        assert entries, f"{export} lists no packages"
        for entry in entries:
            assert "==" in entry and "--hash=sha256:" in entry, f"{export}: {entry[:60]}"


def test_runtime_requirements_are_a_subset_of_dev() -> None:
    """One lock: the image's packages are exactly the versions the tests ran with."""

    def pins(export: str) -> set[str]:
        text = (ROOT / export).read_text()
        return {line.split(" ")[0] for line in text.splitlines() if "==" in line}

    runtime, dev = pins("requirements/runtime.txt"), pins("requirements/dev.txt")
    assert runtime <= dev, sorted(runtime - dev)
