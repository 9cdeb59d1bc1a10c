"""Read YAML with positions, and change single scalar values in the original text.

Flux v1 re-indented whole files when it wrote a tag back, which its users disliked. Here a
file is parsed only to find where a value sits (PyYAML node marks give character offsets);
the edit then replaces exactly that span, so comments, quotes, key order, indentation,
line endings and every other byte stay as they were.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from conveyor.config.userfile import UserFileError, YamlDocument, load_json, load_yaml
from conveyor.config.userfile import load_documents as load_yaml_documents
from conveyor.errors import ConveyorError

_SETTER = re.compile(r"#\s*(\{\s*\"\$imagepolicy\"\s*:\s*\"[^\"]*\"\s*\})")


class YamlTextError(ConveyorError, ValueError):
    """The file does not parse, or a value cannot be rewritten in place."""


@dataclass(frozen=True)
class Scalar:
    """A scalar's exact text span (quotes included) and its value as written."""

    start: int
    end: int
    line: int
    style: str | None
    value: str

    @classmethod
    def of(cls, node: yaml.Node) -> Scalar | None:
        if not isinstance(node, yaml.ScalarNode):
            return None
        return cls(
            node.start_mark.index,
            node.end_mark.index,
            node.start_mark.line + 1,
            node.style or None,  # libyaml says "" for plain, PyYAML None
            str(node.value),
        )


def load_documents(text: str, *, file: str | None = None) -> list[YamlDocument]:
    """Every document of a (multi-document) YAML text, as nodes (with exact character
    offsets, a byte order mark included) and as plain data, within the loader's bounds."""
    try:
        return load_yaml_documents(text, file=file)
    except UserFileError as error:
        raise YamlTextError(str(error)) from None


def child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node  # type: ignore[no-any-return]
    return None


def descend(node: yaml.Node | None, path: str) -> yaml.Node | None:
    """Follow a dotted path of mapping keys (`values.image.tag`)."""
    for key in path.split("."):
        node = child(node, key)
    return node


def mapping_items(node: yaml.Node | None) -> Iterator[tuple[str, yaml.Node]]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                yield str(key_node.value), value_node


def sequence_items(node: yaml.Node | None) -> list[yaml.Node]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _value_scalars(node: yaml.Node) -> Iterator[yaml.ScalarNode]:
    """Every scalar that is a value (mapping keys excluded: a setter never renames a key)."""
    if isinstance(node, yaml.ScalarNode):
        yield node
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _value_scalars(item)
    elif isinstance(node, yaml.MappingNode):
        for _, value_node in node.value:
            yield from _value_scalars(value_node)


@dataclass(frozen=True)
class SetterComment:
    """`# {"$imagepolicy": "NS:NAME[:tag|:name]"}` and the scalar it annotates."""

    reference: str
    scalar: Scalar


def setter_comments(text: str, documents: list[YamlDocument]) -> Iterator[SetterComment]:
    """Each setter comment that trails a scalar on the same line, as kyaml reads them."""
    ends: dict[int, Scalar] = {}
    for document in documents:
        for node in _value_scalars(document.node):
            scalar = Scalar.of(node)
            line = node.end_mark.line
            previous = ends.get(line)
            # The last value ending on a line is the one its trailing comment annotates.
            if scalar and (previous is None or previous.end < scalar.end):
                ends[line] = scalar
    line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
    for match in _SETTER.finditer(text):
        line = _line_of(line_starts, match.start())
        scalar = ends.get(line)
        # Only a real comment: after the value, with nothing but spaces between them.
        if scalar is None or scalar.end > match.start() or text[scalar.end : match.start()].strip():
            continue
        try:
            reference = load_json(match.group(1), file=None)["$imagepolicy"]
        except UserFileError:
            continue  # `"\q"` and the like: not JSON, so not a setter to kyaml either
        yield SetterComment(str(reference), scalar)


def _line_of(line_starts: list[int], index: int) -> int:
    low, high = 0, len(line_starts) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if line_starts[middle] <= index:
            low = middle
        else:
            high = middle - 1
    return low


def render_like(scalar: Scalar, value: str) -> str:
    """`value` written in the scalar's own quoting style. A plain scalar stays plain
    unless the new text would read back as something else (`1.10` is a float, `1234567` an
    int): then it is double-quoted, the mistake Flux v1 made with such tags."""
    if scalar.style == '"':
        return json.dumps(value)
    if scalar.style == "'":
        return "'" + value.replace("'", "''") + "'"
    if scalar.style is None:
        try:
            plain_reads_back = load_yaml(value, file=None) == value
        except UserFileError:
            plain_reads_back = False
        return value if plain_reads_back and "\n" not in value else json.dumps(value)
    raise YamlTextError(f"line {scalar.line}: cannot rewrite a {scalar.style} block scalar")


@dataclass(frozen=True)
class Edit:
    scalar: Scalar
    value: str


def apply_edits(text: str, edits: list[Edit]) -> str:
    """Replace each scalar's span with its new value; bytes outside the spans are kept."""
    by_span = {(e.scalar.start, e.scalar.end): e for e in edits}
    spans = sorted(by_span, reverse=True)
    for (start, _), (_, previous_end) in itertools.pairwise(spans):
        if previous_end > start:
            raise YamlTextError("overlapping edits")
    for span in spans:
        edit = by_span[span]
        text = text[: span[0]] + render_like(edit.scalar, edit.value) + text[span[1] :]
    return text
