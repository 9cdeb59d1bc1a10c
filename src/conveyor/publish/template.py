"""Filling an app's release template (`.flux.yaml` and the like) without reformatting it.

Flux v1 rewrote these files when it touched them (re-indented, comments lost) and its
users disliked that. Templates are loaded and written back with ruamel.yaml's round trip:
key order, comments, quoting and indentation survive, and only the filled fields change.
Fields to fill hold the literal `FILLED_IN_BY_CI`; one left over after filling is an
error naming its document and field.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, ScalarString

from conveyor.config.userfile import (
    CONSTRUCTOR_ERRORS,
    UserFileError,
    check_yaml,
    load_yaml,
    unreadable,
    validate,
)
from conveyor.errors import ConveyorError, one_line

MARKER = "FILLED_IN_BY_CI"
# Values that look like some other tool's placeholder: `${X}`, `@REGISTRY@`, `{{ x }}`,
# `FILL_ME_IN`, `CHANGEME`. Nothing fills them, so they are warned about.
_LOOKALIKE = re.compile(
    r"\$\{[^}]*\}|@[A-Z][A-Z0-9_]*@|\{\{[^}]*\}\}"
    r"|^(?=[A-Z0-9_]*(?:FILL|TODO|CHANGE_?ME|REPLACE_?ME|PLACEHOLDER|TBD))[A-Z0-9_]+$"
)

PathPart = str | int
# `{"$imagepolicy": "<namespace>:<policy>:tag"}` on a scalar: a Flux v2 image setter.
_SETTER = re.compile(r'(\{"\$imagepolicy":\s*")([^":]*):([^":]+):(tag|name)("\})')
_PATH_PART = re.compile(r"\[([^\]]+)\]|([^.\[\]]+)")
_FILTER_ANNOTATIONS = ("filter.fluxcd.io/", "flux.weave.works/tag.")


class TemplateError(ConveyorError, ValueError):
    """The template or a setting for it is wrong; the message names the file and field."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))  # kinds and keys come from the file as written


def parse_field_path(text: str) -> tuple[PathPart, ...]:
    """`spec.values.image.tag`; `[key]` quotes a key with dots
    (`metadata.annotations[filter.fluxcd.io/chart-image]`); a number indexes a list."""
    parts: list[PathPart] = []
    position = 0
    while True:
        match = _PATH_PART.match(text, position)
        if match is None:
            raise TemplateError(f"bad field path {text!r}")
        quoted, plain = match.groups()
        parts.append(quoted if quoted is not None else int(plain) if plain.isdigit() else plain)
        position = match.end()
        if position == len(text):
            return tuple(parts)
        if text[position] == ".":
            position += 1
        elif text[position] != "[":
            raise TemplateError(f"bad field path {text!r}")


def format_field_path(path: tuple[PathPart, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f".{part}"
        elif "." in part or "[" in part:
            out += f"[{part}]"
        else:
            out += f".{part}"
    return out.lstrip(".")


@dataclass(frozen=True)
class Setting:
    """One field to set: `Kind[/name]:dotted.path` and its value."""

    document: str
    path: tuple[PathPart, ...]
    value: Any

    @classmethod
    def from_target(cls, target: str, value: Any) -> Setting:
        document, sep, path = target.partition(":")
        if not sep or not document or not path:
            raise TemplateError(f"setting {target!r} must look like Kind[/name]:field.path")
        return cls(document, parse_field_path(path), value)

    @classmethod
    def parse(cls, text: str) -> Setting:
        """`Kind[/name]:field.path=value`; the value is read as YAML (`3` is a number)."""
        target, sep, raw = text.partition("=")
        if not sep:
            raise TemplateError(f"setting {text!r} must look like Kind[/name]:field.path=value")
        try:
            value = load_yaml(raw, file="--set") if raw.strip() else ""
        except UserFileError:
            value = raw
        return cls.from_target(target, value)

    def describe(self) -> str:
        return f"{self.document}:{format_field_path(self.path)}"


_NULL_TAG = "tag:yaml.org,2002:null"


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None
    labels: dict[str, Any] | None = None
    annotations: dict[str, Any] | None = None


class TemplateDocument(BaseModel):
    """What filling reads of each document: a `kind` and `metadata` of the usual shapes;
    everything else is the template's own and kept as written."""

    model_config = ConfigDict(extra="allow")

    kind: str | None = None
    metadata: _Metadata | None = None
    spec: dict[str, Any] | None = None


def _label(document: Any, index: int) -> str:
    if isinstance(document, CommentedMap):
        kind = document.get("kind")
        name = (document.get("metadata") or {}).get("name")
        if kind:
            return f"{kind}/{name}" if name else str(kind)
    return f"document {index + 1}"


def _guess_indent(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) indentation as ruamel.yaml counts it, from the text."""
    mapping, offset = 2, 2
    lines = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    found_mapping = found_offset = False
    for parent, child in itertools.pairwise(lines):
        if not re.match(r"^ *[^\s-][^:]*:\s*(#.*)?$", parent):
            continue
        parent_indent = len(parent) - len(parent.lstrip(" "))
        child_indent = len(child) - len(child.lstrip(" "))
        if child.lstrip().startswith("- ") and not found_offset:
            offset, found_offset = child_indent - parent_indent, True
        elif child_indent > parent_indent and not found_mapping:
            mapping, found_mapping = child_indent - parent_indent, True
    return mapping, offset + 2, offset


class Template:
    """A multi-document YAML template, editable in place and written back faithfully."""

    def __init__(self, text: str, *, source: str) -> None:
        self.source = source
        self._yaml = YAML()
        self._yaml.preserve_quotes = True
        self._yaml.width = 4096
        mapping, sequence, offset = _guess_indent(text)
        self._yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        # Comments above a leading `---` are dropped by ruamel.yaml; keep them verbatim.
        lines = text.splitlines(keepends=True)
        head = 0
        while head < len(lines) and (not lines[head].strip() or lines[head].startswith("#")):
            head += 1
        starts_with_marker = head < len(lines) and lines[head].startswith("---")
        self._header = "".join(lines[:head]) if starts_with_marker else ""
        self._yaml.explicit_start = starts_with_marker
        # Comments ending the file (Cellenics' `# filled in by CI. do not modify.`) and a
        # closing `---` stay last as they are: ruamel.yaml would tie the comments to the
        # last key (keys added by `values` would land below them) and drop the `---`.
        tail = len(lines)
        while tail > head and _ends_a_file(lines[tail - 1]):
            tail -= 1
        footer = "".join(lines[tail:])
        self._footer = footer if footer.strip() else ""
        if self._footer:
            text = "".join(lines[:tail])
        self._ends_with_newline = text.endswith("\n")
        try:
            # ruamel.yaml has no bounds of its own: the bounded loader reads the text first.
            nodes = [n for n in check_yaml(text, file=source) if n.tag != _NULL_TAG]
            self.documents: list[Any] = [d for d in self._yaml.load_all(text) if d is not None]
        except UserFileError as error:
            raise TemplateError(str(error)) from None
        except YAMLError as error:
            raise TemplateError(f"{source}: invalid YAML: {' '.join(str(error).split())}") from None
        except CONSTRUCTOR_ERRORS:
            raise TemplateError(str(unreadable(nodes, file=source))) from None
        if not self.documents:
            raise TemplateError(f"{source}: no YAML documents")
        for index, document in enumerate(self.documents):
            if not isinstance(document, CommentedMap):
                raise TemplateError(f"{source}: {_label(document, index)} is not a mapping")
            # The two readers agree on documents, except on tags only ruamel keeps.
            node = nodes[index] if len(nodes) == len(self.documents) else None
            try:
                validate(TemplateDocument, document, file=source, node=node)
            except UserFileError as error:
                raise TemplateError(str(error)) from None

    def render(self) -> str:
        out = io.StringIO()
        self._yaml.dump_all(self.documents, out)
        body = out.getvalue().rstrip("\n") + ("\n" if self._ends_with_newline else "")
        return self._header + body + self._footer

    def _matching(self, selector: str) -> list[int]:
        kind, _, name = selector.partition("/")
        return [
            i
            for i, d in enumerate(self.documents)
            if d.get("kind") == kind and (not name or (d.get("metadata") or {}).get("name") == name)
        ]

    def _document(self, setting: Setting) -> CommentedMap:
        matches = self._matching(setting.document)
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)}"
            hint = "" if not matches else "; name one as Kind/name"
            raise TemplateError(
                f"{self.source}: {found} {setting.document} documents for "
                f"{setting.describe()}{hint}"
            )
        document: CommentedMap = self.documents[matches[0]]
        return document

    def assign(self, setting: Setting) -> None:
        """Set a field, creating missing mappings on the way; lists must already exist."""
        node: Any = self._document(setting)
        for depth, part in enumerate(setting.path[:-1]):
            node = self._child(node, part, setting, depth)
        _store(node, setting.path[-1], setting.value, setting, self.source)

    def _child(self, node: Any, part: PathPart, setting: Setting, depth: int) -> Any:
        where = f"{self.source}: {setting.describe()}"
        if isinstance(node, CommentedSeq) and isinstance(part, int):
            if part >= len(node):
                raise TemplateError(f"{where}: index {part} past the end of the list")
            return node[part]
        if not isinstance(node, CommentedMap):
            raise TemplateError(f"{where}: {format_field_path(setting.path[:depth])} is a value")
        key = str(part)
        if key not in node or node[key] is None:
            node[key] = CommentedMap()
        return node[key]

    def fill_shortcuts(
        self,
        *,
        version: str | None,
        namespace: str | None,
        replicas: int | None,
        tag_filter: str | None,
        policy: dict[str, Any] | None,
        chart_ref: str | None,
    ) -> None:
        """The profile's named settings, applied to the fields Flux v1 and v2 use for them."""
        if namespace is not None:
            self._fill_namespace(namespace)
        if version is not None:
            self._fill_version(version)
        if replicas is not None:
            self.assign(Setting("HelmRelease", ("spec", "values", "replicaCount"), replicas))
        if tag_filter is not None:
            self._fill_filter(tag_filter)
        if policy is not None:
            self.assign(Setting("ImagePolicy", ("spec", "policy"), policy))
        if chart_ref is not None:
            self._fill_chart_ref(chart_ref)

    def _fill_namespace(self, namespace: str) -> None:
        for document in self.documents:
            metadata = document.get("metadata")
            if not isinstance(metadata, CommentedMap):
                continue
            if document.get("kind") == "Namespace":
                _store(metadata, "name", namespace, None, self.source)
            elif "namespace" in metadata:
                _store(metadata, "namespace", namespace, None, self.source)
            if document.get("kind") == "HelmRelease":
                self._fill_existing(document, ("spec", "targetNamespace"), namespace)
        for _, _, comment in self._setters():
            comment.value = _SETTER.sub(
                lambda m: f"{m.group(1)}{namespace}:{m.group(3)}:{m.group(4)}{m.group(5)}",
                comment.value,
            )

    def _fill_version(self, version: str) -> None:
        for document in self.documents:
            if document.get("kind") == "HelmRelease":
                self._fill_existing(document, ("spec", "values", "image", "tag"), version)
        for parent, key, comment in self._setters():
            if any(m.group(4) == "tag" for m in _SETTER.finditer(comment.value)):
                _store(parent, key, version, None, self.source)

    def _fill_filter(self, tag_filter: str) -> None:
        filled = False
        for document in self.documents:
            annotations = (document.get("metadata") or {}).get("annotations")
            if document.get("kind") != "HelmRelease" or not isinstance(annotations, CommentedMap):
                continue
            for key in list(annotations):
                if str(key).startswith(_FILTER_ANNOTATIONS):
                    _store(annotations, key, tag_filter, None, self.source)
                    filled = True
        if not filled:
            raise TemplateError(
                f"{self.source}: no HelmRelease annotation filter.fluxcd.io/<container> "
                "(or flux.weave.works/tag.<container>) to hold the image filter"
            )

    def _fill_chart_ref(self, ref: str) -> None:
        filled = False
        for document in self.documents:
            if document.get("kind") == "HelmRelease":
                filled |= self._fill_existing(document, ("spec", "chart", "ref"), ref)
            elif document.get("kind") == "GitRepository":
                source_ref = (document.get("spec") or {}).get("ref")
                if isinstance(source_ref, CommentedMap) and len(source_ref) == 1:
                    _store(source_ref, next(iter(source_ref)), ref, None, self.source)
                    filled = True
        if not filled:
            raise TemplateError(
                f"{self.source}: no HelmRelease spec.chart.ref or GitRepository spec.ref "
                "to hold the chart ref"
            )

    def _fill_existing(self, document: CommentedMap, path: tuple[str, ...], value: Any) -> bool:
        node: Any = document
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, CommentedMap) else None
        if isinstance(node, CommentedMap) and path[-1] in node:
            _store(node, path[-1], value, None, self.source)
            return True
        return False

    def _setters(self) -> Iterator[tuple[CommentedMap, Any, Any]]:
        """Scalars carrying a `{"$imagepolicy": ...}` comment: (mapping, key, comment token)."""
        for document in self.documents:
            for node in _mappings(document):
                for key, entry in list(node.ca.items.items()):
                    comment = entry[2] if len(entry) > 2 else None
                    if comment is not None and _SETTER.search(comment.value):
                        yield node, key, comment

    def leftover_markers(self) -> list[str]:
        """`Kind/name field.path` of every value still holding FILLED_IN_BY_CI."""
        found = []
        for index, document in enumerate(self.documents):
            for path, value, comment in _scalars(document, ()):
                if isinstance(value, str) and MARKER in value:
                    found.append(f"{_label(document, index)} {format_field_path(path)}")
                elif comment is not None and _SETTER.search(comment) and MARKER in comment:
                    field = format_field_path(path)
                    found.append(f"{_label(document, index)} {field} (image policy comment)")
        return found

    def lookalike_markers(self, *, known: list[str]) -> list[str]:
        """`Kind/name field.path: value` of values that look like a placeholder that
        nothing fills (`${X}`, `@REGISTRY@`, `FILL_ME_IN`); `known` ones are meant."""
        found = []
        for index, document in enumerate(self.documents):
            for path, value, _ in _scalars(document, ()):
                if not isinstance(value, str) or value in known:
                    continue
                if _LOOKALIKE.search(value):
                    field = format_field_path(path)
                    found.append(f"{_label(document, index)} {field}: {value}")
        return found


def _ends_a_file(line: str) -> bool:
    return not line.strip() or line.startswith("#") or line.rstrip() == "---"


def _mappings(node: Any) -> Iterator[CommentedMap]:
    if isinstance(node, CommentedMap):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, CommentedSeq):
        for value in node:
            yield from _mappings(value)


def _scalars(
    node: Any, path: tuple[PathPart, ...]
) -> Iterator[tuple[tuple[PathPart, ...], Any, str | None]]:
    """(path, value, end-of-line comment) of every scalar under `node`."""
    if isinstance(node, CommentedMap):
        for key, value in node.items():
            if isinstance(value, CommentedMap | CommentedSeq):
                yield from _scalars(value, (*path, str(key)))
            else:
                entry = node.ca.items.get(key)
                comment = entry[2] if entry and len(entry) > 2 else None
                yield (*path, str(key)), value, comment.value if comment is not None else None
    elif isinstance(node, CommentedSeq):
        for index, value in enumerate(node):
            if isinstance(value, CommentedMap | CommentedSeq):
                yield from _scalars(value, (*path, index))
            else:
                yield (*path, index), value, None


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _store(node: Any, key: PathPart, value: Any, setting: Setting | None, source: str) -> None:
    """Set node[key], keeping the old value's quoting; labels and annotations stay strings."""
    if isinstance(node, CommentedSeq):
        if not isinstance(key, int) or key >= len(node):
            where = setting.describe() if setting else str(key)
            raise TemplateError(f"{source}: {where}: no list item {key}")
        old = node[key]
    elif isinstance(node, CommentedMap):
        key = str(key)
        old = node.get(key)
    else:
        where = setting.describe() if setting else str(key)
        parent = format_field_path(setting.path[:-1]) if setting else "its parent"
        raise TemplateError(f"{source}: {where}: {parent} is a value, not a mapping")
    scalar = isinstance(value, str | int | float | bool)
    if isinstance(old, ScalarString) and scalar:
        value = type(old)(_yaml_text(value))
    elif setting is not None and setting.path[:2] in (
        ("metadata", "labels"),
        ("metadata", "annotations"),
    ):
        if scalar and not isinstance(value, str):
            value = DoubleQuotedScalarString(_yaml_text(value))
    node[key] = value
