"""The commands conveyor.yaml runs beside a sandbox: what it needs outside Kubernetes.

Cellenics creates a database, a topic and a user-pool client per sandbox with
CloudFormation. `sandboxes.hooks.create` and `.delete` are argument lists, run without a
shell, so no value of a file is ever parsed as a command line; the sandbox's ID reaches
them as `SANDBOX_ID` in their environment, never inside their arguments. They run where
`conveyor stage` and `unstage` run (a developer's machine, CI), with that machine's
credentials; the agent runs none, so that a commit to the config repo cannot run a
program with the agent's.
"""

from __future__ import annotations

import os
import subprocess

from conveyor.config.project import SandboxHooks
from conveyor.sandboxes.candidates import SandboxError

OUTPUT_TAIL = 4000  # characters of a failed hook's output shown


class HookFailed(SandboxError):
    """A hook exited non-zero (or could not run); its output is in the message."""


def run_hooks(
    hooks: SandboxHooks, which: str, sandbox_id: str, *, extra_env: dict[str, str] | None = None
) -> list[str]:
    """Run the `which` (create, delete) commands in order, stopping at the first that
    fails (HookFailed, with its output). Returns each command's output."""
    commands: list[list[str]] = hooks.create if which == "create" else hooks.delete
    env = {**os.environ, **(extra_env or {}), "SANDBOX_ID": sandbox_id}
    outputs = []
    for command in commands:
        shown = " ".join(command)
        try:
            result = subprocess.run(
                command,
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=hooks.timeout,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise HookFailed(f"{which} hook {shown!r} could not run: {error}") from None
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            raise HookFailed(
                f"{which} hook {shown!r} failed ({result.returncode}); nothing was committed:\n"
                f"{output[-OUTPUT_TAIL:]}"
            )
        outputs.append(output)
    return outputs
