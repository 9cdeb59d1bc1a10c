"""Read multi-document YAML files keeping where each document came from.

Every render error must name the file and the line, so documents carry their source
position from the moment they are parsed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conveyor.cluster.objects import Obj, interned
from conveyor.config.userfile import GENERATED, UserFileError, read_text
from conveyor.config.userfile import load_documents as load_yaml_documents
from conveyor.errors import LocatedError


def load_all(text: str | bytes) -> list[Any]:
    """Every document of a multi-document YAML text, for generated output (helm manifests,
    kustomize builds) where no file and line apply; bounded like a user's file (a chart
    can carry an alias bomb too). RenderError when it does not parse."""
    try:
        return [d.data for d in load_yaml_documents(text, file=None, limits=GENERATED)]
    except UserFileError as error:
        raise RenderError(error.detail, line=error.line) from None


class RenderError(LocatedError):
    """Rendering one app failed."""


@dataclass(frozen=True)
class Document:
    obj: Obj
    file: str  # relative to the repository root
    line: int  # 1-based line of the document's first key
    # A HelmRelease's parsed YAML, for the line of a key in its values when a release
    # fails (render/values_origin.py); other documents do not keep it.
    node: yaml.Node | None = field(default=None, compare=False, repr=False)

    @property
    def api_version(self) -> str:
        return str(self.obj.get("apiVersion", ""))

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.obj.get("metadata", {}).get("name", ""))

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0] if "/" in self.api_version else ""

    def where(self) -> str:
        return f"{self.file}:{self.line}"


# Parsed files by path, valid while size and mtime are unchanged: a new revision that
# touches one file of a thousand parses one file. Documents are never mutated downstream.
_parsed: dict[Path, tuple[tuple[int, int, str], list[Document]]] = {}


def load_documents(path: Path, *, relative_to: Path) -> list[Document]:
    """Parse every YAML document in `path`; empty documents are skipped.

    Raises RenderError with the file and line of the first syntax error, or of a
    document that is not a Kubernetes object (a mapping with apiVersion, kind and name).
    """
    rel = str(path.relative_to(relative_to))
    stat = path.stat()
    key = (stat.st_size, stat.st_mtime_ns, rel)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    documents = _parse(path, rel)
    _parsed[path] = (key, documents)
    return documents


def _parse(path: Path, rel: str) -> list[Document]:
    try:
        parsed = load_yaml_documents(read_text(path, file=rel), file=rel)
    except UserFileError as error:
        raise RenderError(error.detail, file=rel, line=error.line) from None
    return [
        Document(
            obj=interned(_check_object(d.data, rel, d.line)),
            file=rel,
            line=d.line,
            node=d.node
            if isinstance(d.data, dict) and d.data.get("kind") == "HelmRelease"
            else None,
        )
        for d in parsed
        if d.data is not None
    ]


def _check_object(obj: object, file: str, line: int) -> Obj:
    if not isinstance(obj, dict):
        raise RenderError(
            f"expected a Kubernetes object, got a {type(obj).__name__}", file=file, line=line
        )
    missing = [k for k in ("apiVersion", "kind") if not obj.get(k)]
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        missing.append("metadata.name")
    if missing:
        raise RenderError(f"object is missing {', '.join(missing)}", file=file, line=line)
    return obj


@dataclass(frozen=True)
class Listing:
    """A folder's regular files and visible subfolders, from one scandir: its entries
    say what they are, where a stat per name (is_file, is_dir) cost discovery of 10,000
    app folders most of its time once their files were parsed."""

    folder: Path
    files: frozenset[str]
    folders: tuple[str, ...]  # sorted; hidden ones left out

    @classmethod
    def of(cls, folder: Path) -> Listing:
        files, folders = set(), []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    files.add(entry.name)
                elif entry.is_dir() and not entry.name.startswith("."):
                    folders.append(entry.name)
        return cls(folder, frozenset(files), tuple(sorted(folders)))

    def yaml_files(self) -> list[Path]:
        """The folder's YAML files, sorted for a stable order."""
        return [
            self.folder / name
            for name in sorted(self.files)
            if name.endswith((".yaml", ".yml")) and not name.startswith(".")
        ]


def yaml_files(folder: Path) -> list[Path]:
    """YAML files directly in `folder`, sorted for a stable order."""
    return Listing.of(folder).yaml_files()
