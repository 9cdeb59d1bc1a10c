"""Where the sandbox keeps running sandboxes (state); its built binaries are cached below
conveyor's cache root (`conveyor.paths`), in `sandbox/`.

Both live outside the repository so that a clean clone reuses a warm machine's builds,
and both can be moved with environment variables for CI or tests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def state_root() -> Path:
    """`$CONVEYOR_STATE`, else `$XDG_STATE_HOME/conveyor`, else `~/.local/state/conveyor`."""
    if explicit := os.environ.get("CONVEYOR_STATE"):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "conveyor"


def validate_name(name: str) -> str:
    """Sandbox names become directory names and node labels: keep them DNS-label-like."""
    if not _NAME.match(name):
        raise ValueError(
            f"invalid sandbox name {name!r}: use 1-40 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def sandbox_dir(name: str) -> Path:
    return state_root() / "sandboxes" / validate_name(name)
