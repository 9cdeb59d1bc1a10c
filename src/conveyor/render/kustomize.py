"""Render a kustomization directory with `kubectl kustomize`, the kustomize teams use.

kustomize fetches remote bases with git itself, so it runs with conveyor's git
environment (no prompts, only the transports conveyor allows: never `ext::`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.render.documents import Document, RenderError, load_all
from conveyor.source.git import git_env


async def render_kustomization(
    directory: Path, *, repo_root: Path, kubectl: str = "kubectl"
) -> list[Document]:
    rel = str(directory.relative_to(repo_root))
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
        message = stderr.decode(errors="replace").strip().replace(str(repo_root) + "/", "")
        raise RenderError(f"kustomize build failed: {message}", file=rel)
    try:
        objects = [o for o in load_all(stdout) if o]
    except RenderError as error:
        raise RenderError(f"kustomize output: {error.detail}", file=rel) from None
    return [Document(obj=o, file=rel, line=0) for o in objects]
