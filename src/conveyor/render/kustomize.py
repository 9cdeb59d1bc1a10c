"""Run `kubectl kustomize`, the kustomize the teams use, on a folder.

kustomize fetches remote bases with git itself, so it runs with conveyor's git
environment (no prompts, only the transports conveyor allows: never `ext::`). It keeps
its default load restrictions: no file outside a kustomization's own folder is read,
so a repository cannot pull a file of the machine into an object.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.cluster.objects import Obj
from conveyor.render.documents import Document, RenderError, load_all
from conveyor.source.git import git_env


async def render_kustomization(
    directory: Path, *, repo_root: Path, kubectl: str = "kubectl"
) -> list[Document]:
    """The build of a kustomization folder of `repo_root`, as documents of that folder."""
    rel = str(directory.relative_to(repo_root))
    built = await kustomize_build(
        directory, shown_as=rel, hide=[str(repo_root) + "/"], kubectl=kubectl
    )
    return [Document(obj=o, file=rel, line=0) for o in built]


async def kustomize_build(
    directory: Path, *, shown_as: str, hide: list[str], kubectl: str = "kubectl"
) -> list[Obj]:
    """The objects of the build of `directory`. RenderError names `shown_as`; `hide`
    are path prefixes (scratch folders, the checkout) left out of kustomize's message."""
    process = await asyncio.create_subprocess_exec(
        kubectl,
        "kustomize",
        "--",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_env(),
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip()
        for prefix in hide:
            message = message.replace(prefix, "")
        raise RenderError(f"kustomize build failed: {message}", file=shown_as)
    try:
        return [o for o in load_all(stdout) if o]
    except RenderError as error:
        raise RenderError(f"kustomize output: {error.detail}", file=shown_as) from None
