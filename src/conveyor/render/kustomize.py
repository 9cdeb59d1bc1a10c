"""Run kustomize, the kustomize the teams use, on a folder.

Where kubectl is installed that is `kubectl kustomize`, what teams run; without it, a
standalone `kustomize build` (conveyor's image ships kustomize alone: the build of the
same kustomize that its Kubernetes version's kubectl holds, at a third of the size;
src/conveyor/sandbox/build.py `ensure_kustomize`). Both are one command of kustomize's
own code, with the same defaults.

kustomize fetches remote bases with git itself, so it runs with conveyor's git
environment (no prompts, only the transports conveyor allows: never `ext::`). It keeps
its default load restrictions: no file outside a kustomization's own folder is read,
so a repository cannot pull a file of the machine into an object.

Before a build, the files its secretGenerators read are found (`secret_generator_sources`)
so that SOPS-encrypted ones are decrypted first, as kustomize-controller does.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from conveyor.cluster.objects import Obj
from conveyor.config.userfile import ConfigError, load_yaml, read_text
from conveyor.render.discover import KUSTOMIZATION_FILES
from conveyor.render.documents import Document, RenderError, load_all
from conveyor.source.git import git_env

KustomizeCommand = tuple[str, ...]
"""The arguments before the folder: ("kubectl", "kustomize") or ("kustomize", "build")."""
KUBECTL_KUSTOMIZE: KustomizeCommand = ("kubectl", "kustomize")
KUSTOMIZE_BUILD: KustomizeCommand = ("kustomize", "build")


def find_kustomize() -> KustomizeCommand | None:
    """kubectl's kustomize if kubectl is on PATH, else a standalone kustomize's, else None."""
    for command in (KUBECTL_KUSTOMIZE, KUSTOMIZE_BUILD):
        if shutil.which(command[0]):
            return command
    return None


async def render_kustomization(directory: Path, *, repo_root: Path) -> list[Document]:
    """The build of a kustomization folder of `repo_root`, as documents of that folder."""
    rel = str(directory.relative_to(repo_root))
    built = await kustomize_build(directory, shown_as=rel, hide=[str(repo_root) + "/"])
    return [Document(obj=o, file=rel, line=0) for o in built]


async def kustomize_build(
    directory: Path,
    *,
    shown_as: str,
    hide: list[str],
    command: KustomizeCommand | None = None,
) -> list[Obj]:
    """The objects of the build of `directory`. RenderError names `shown_as`; `hide`
    are path prefixes (scratch folders, the checkout) left out of kustomize's message.
    `command`: which kustomize runs (by default the one `find_kustomize` finds)."""
    command = command or find_kustomize()
    if command is None:
        raise RenderError(
            "kustomize build failed: neither kubectl nor kustomize is on PATH", file=shown_as
        )
    process = await asyncio.create_subprocess_exec(
        *command,
        "--",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_env(),
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip()
        # kubectl says "error: ...", kustomize (cobra) "Error: ...": one message either way.
        message = message.removeprefix("error: ").removeprefix("Error: ")
        for prefix in hide:
            message = message.replace(prefix, "")
        raise RenderError(f"kustomize build failed: {message}", file=shown_as)
    try:
        return [o for o in load_all(stdout) if o]
    except RenderError as error:
        raise RenderError(f"kustomize output: {error.detail}", file=shown_as) from None


@dataclass(frozen=True)
class GeneratorSource:
    """A file a kustomize secretGenerator reads: `files:` (`key=path` or `path`) or
    `envs:` (dotenv lines, one entry each)."""

    path: Path  # resolved, inside the root it was found below
    key: str  # the entry's key for `files:`, the file's path for `envs:`
    env: bool


def secret_generator_sources(folder: Path, *, root: Path) -> list[GeneratorSource]:
    """The files that the secretGenerators of `folder`'s kustomization read, and those of
    every kustomization its `resources` and `components` name, as kustomize-controller
    walks them to decrypt them before the build. Only files inside `root`: kustomize
    reads no other (and says so); a kustomization that cannot be read is left to
    kustomize to name."""
    root = root.resolve()
    found: dict[Path, GeneratorSource] = {}
    seen: set[Path] = set()

    def visit(directory: Path) -> None:
        directory = directory.resolve()
        if directory in seen or not directory.is_relative_to(root) or not directory.is_dir():
            return
        seen.add(directory)
        file = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()), None)
        if file is None:
            return
        try:
            kustomization = load_yaml(read_text(file), file=str(file.relative_to(root)))
        except ConfigError:
            return
        if not isinstance(kustomization, dict):
            return
        for generator in _list(kustomization.get("secretGenerator")):
            if not isinstance(generator, dict):
                continue
            for entry in _list(generator.get("files")):
                key, _, path = str(entry).partition("=")
                add(directory / (path or key), key=key, env=False)
            for entry in [*_list(generator.get("envs")), *_list(generator.get("env"))]:
                add(directory / str(entry), key=str(entry), env=True)
        for ref in [
            *_list(kustomization.get("resources")),
            *_list(kustomization.get("components")),
        ]:
            if isinstance(ref, str) and "://" not in ref:
                visit(directory / ref)

    def add(path: Path, *, key: str, env: bool) -> None:
        resolved = path.resolve()
        if resolved.is_relative_to(root) and resolved.is_file() and resolved not in found:
            found[resolved] = GeneratorSource(resolved, key, env)

    visit(folder)
    return list(found.values())


def _list(value: object) -> list[object]:
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, str) else []
