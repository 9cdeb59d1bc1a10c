"""Where conveyor keeps what it can fetch again: checkouts of config repos and charts.

The agent, the CLI and the dashboard run where no sandbox exists (in a Pod, on CI), so
this module, not `sandbox/`, owns the cache root; the sandbox keeps its binaries in a
folder of its own below it. Everything here may be deleted: it is fetched again.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$CONVEYOR_CACHE`, else `$XDG_CACHE_HOME/conveyor`, else `~/.cache/conveyor`."""
    if explicit := os.environ.get("CONVEYOR_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conveyor"


def charts_cache() -> Path:
    """Fetched charts (repositories, OCI, git mirrors), shared by every environment."""
    return cache_root() / "charts"


def checkouts_cache(purpose: str) -> Path:
    """Checkouts of config repos, one folder per user of them (agent, diff, gates…)."""
    return cache_root() / "repos" / purpose
