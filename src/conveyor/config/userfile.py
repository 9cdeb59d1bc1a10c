"""The one way conveyor reads a file a user wrote: YAML or JSON, within bounds.

A config repo, an app repo and a webhook are input from people, and the README promises
that a broken file stalls only its app. PyYAML alone does not keep that promise: a 1 KB
alias bomb expands to gigabytes in whoever walks the result, a self-referencing anchor
loops forever, a 5000-digit integer hits Python's int limit (ValueError), deep nesting
hits the recursion limit, and bytes that are not UTF-8 raise UnicodeDecodeError. Every
reader goes through here, so each of those is a `UserFileError` naming the file and line,
and one bad file costs milliseconds.

How the bounds are kept cheap: libyaml composes the node graph (it refuses more than 1000
levels itself); one pass over the nodes then checks depth, integer lengths and how much
the aliases expand, before any Python object is built. An alias is a shared node, so the
pass counts a node each time it is reached: a tree (no anchors) is walked once, and a bomb
is stopped as soon as it has used its budget, without ever being expanded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError

from conveyor.config.validation import describe_problem
from conveyor.errors import ConveyorError, LocatedError


class ConfigError(ConveyorError, ValueError):
    """A user's file (conveyor.yaml, a channel, a profile…) is malformed or misses
    something; the message names the file."""


class UserFileError(LocatedError, ConfigError):
    """A file could not be read within bounds or does not parse."""


@dataclass(frozen=True)
class Limits:
    """How much one file may cost. The defaults are far above any real config file (the
    largest CRDs are a few MB and 30-40 levels deep) and far below what hurts."""

    max_bytes: int = 8 * 1024 * 1024
    max_depth: int = 100
    # What aliases may add beyond the text itself, in nodes plus scalar characters:
    # a written tree costs at most two units per character, so that part is free.
    max_alias_expansion: int = 100_000
    max_int_digits: int = 100


USER_FILE = Limits()
# Output of helm and kustomize: written by tools from user input, so bounded the same way,
# but a chart with many CRDs legitimately renders tens of megabytes.
GENERATED = Limits(max_bytes=64 * 1024 * 1024)

# libyaml's parser (several times faster on a thousand files) when PyYAML has it.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_TAG = "tag:yaml.org,2002:int"
# A plain scalar that any YAML version reads as an integer (1.2's `0999…` included).
_INTEGER_TEXT = re.compile(r"[-+]?[0-9][0-9_]*")


# PyYAML's (and ruamel.yaml's) scalar constructors let built-in errors out for a scalar
# that matches a tag's pattern but not its value (`!!int abc`, a date like 2024-02-30).
CONSTRUCTOR_ERRORS = (ValueError, TypeError, LookupError, AttributeError, OverflowError)


def _construct(loader: Any, node: yaml.Node) -> Any:
    try:
        return loader.construct_document(node)
    except yaml.YAMLError:
        raise
    except CONSTRUCTOR_ERRORS:
        # Rare, so the culprit is looked for only now: the first scalar that fails alone.
        culprit = unreadable_scalar(node)
        raise culprit or ConstructorError(None, None, "cannot build it", node.start_mark) from None


def unreadable_scalar(root: yaml.Node) -> ConstructorError | None:
    """The error for the first scalar under `root` (checked nodes) that cannot be built."""
    level = [root]
    while level:
        for node in level:
            if isinstance(node, yaml.ScalarNode):
                try:
                    _Loader("").construct_object(node)
                except (*CONSTRUCTOR_ERRORS, yaml.YAMLError):
                    tag = node.tag.rsplit(":", 1)[-1]
                    problem = f"cannot read {_short(node.value)} as {tag}"
                    return ConstructorError(None, None, problem, node.start_mark)
        level = [child for node in level for child in _children(node)]
    return None


def unreadable(nodes: list[yaml.Node], *, file: str | None) -> UserFileError:
    """What another YAML reader (ruamel.yaml) could not build in these checked nodes, with
    the line of the scalar PyYAML cannot build either, when there is one."""
    for node in nodes:
        culprit = unreadable_scalar(node)
        if culprit is not None:
            return _marked(culprit, file)
    return UserFileError("invalid YAML: a value cannot be read", file=file)


def _short(value: object) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# -- bytes to text ------------------------------------------------------------------------


def read_text(path: Path, *, file: str | None = None, limits: Limits = USER_FILE) -> str:
    """The file's text; too large, unreadable or not UTF-8 is a UserFileError naming
    `file` (default: the path)."""
    name = file or str(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise UserFileError(_too_large(size, limits), file=name)
        data = path.read_bytes()
    except OSError as error:
        raise UserFileError(f"cannot read: {error.strerror}", file=name) from None
    return decode(data, file=name, limits=limits)


def decode(data: bytes | str, *, file: str | None, limits: Limits = USER_FILE) -> str:
    """UTF-8 bytes as text (a byte order mark is kept, as Python's reader keeps it)."""
    if len(data) > limits.max_bytes:
        raise UserFileError(_too_large(len(data), limits), file=file)
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserFileError(
            f"not a UTF-8 text file (byte {data[error.start]:#04x} at offset {error.start})",
            file=file,
            line=line,
        ) from None


def _too_large(size: int, limits: Limits) -> str:
    return f"file is {size} bytes, more than the {limits.max_bytes} bytes conveyor reads"


# -- YAML ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class YamlDocument:
    """One document: its checked node graph (exact character offsets), its data, and the
    1-based line where it starts."""

    node: yaml.Node
    data: Any

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1


def load_documents(
    text: str | bytes, *, file: str | None, limits: Limits = USER_FILE
) -> list[YamlDocument]:
    """Every non-empty document of a (multi-document) YAML text, checked then built."""
    return list(_documents(text, file=file, limits=limits, construct=True))


def check_yaml(
    text: str | bytes, *, file: str | None, limits: Limits = USER_FILE
) -> list[yaml.Node]:
    """Refuse what a loader without bounds (ruamel.yaml's round trip) must never see, and
    return the checked nodes of the documents (for lines in messages). Tags are not
    interpreted, so a custom `!Tag` still passes."""
    return [d.node for d in _documents(text, file=file, limits=limits, construct=False)]


def load_document(
    text: str | bytes, *, file: str | None, limits: Limits = USER_FILE
) -> YamlDocument | None:
    """The one document of a YAML text (None when empty), like `yaml.safe_load`."""
    documents = _documents(text, file=file, limits=limits, construct=True)
    first = next(documents, None)
    second = next(documents, None)
    if second is not None:
        raise UserFileError(
            "expected one YAML document, found another", file=file, line=second.line
        )
    return first


def load_yaml(text: str | bytes, *, file: str | None, limits: Limits = USER_FILE) -> Any:
    """The data of `load_document`: None for an empty text."""
    document = load_document(text, file=file, limits=limits)
    return document.data if document is not None else None


def _documents(
    text: str | bytes, *, file: str | None, limits: Limits, construct: bool
) -> Iterator[YamlDocument]:
    text = decode(text, file=file, limits=limits)
    # libyaml skips a byte order mark without counting it: shift offsets back onto the text.
    shift = 1 if text.startswith("\ufeff") and _Loader is not yaml.SafeLoader else 0
    check = _NodeCheck(len(text), limits=limits, file=file, shift=shift)
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            check.visit(node)
            data = _construct(loader, node) if construct else None
            yield YamlDocument(node=node, data=data)
    except yaml.MarkedYAMLError as error:
        raise _marked(error, file) from None
    except yaml.YAMLError as error:
        raise UserFileError(f"invalid YAML: {' '.join(str(error).split())}", file=file) from None
    except RecursionError:
        # Only PyYAML's pure-Python composer recurses (libyaml stops at 1000 levels).
        raise UserFileError(f"nested deeper than {limits.max_depth} levels", file=file) from None
    finally:
        loader.dispose()


def _marked(error: yaml.MarkedYAMLError, file: str | None) -> UserFileError:
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark else None
    problem = error.problem or str(error)
    if error.context and error.context_mark:
        problem += f" ({error.context} started on line {error.context_mark.line + 1})"
    return UserFileError(f"invalid YAML: {' '.join(problem.split())}", file=file, line=line)


class _NodeCheck:
    """Depth, integer length and alias expansion of the documents of one text.

    The nodes are walked a level at a time, one unit per node reached and one per scalar
    character: a tree costs at most twice the text length (no node or value is longer
    than its source), so the budget is that plus `max_alias_expansion`, shared by all
    documents of the text. A level is never built past the budget, so neither is a bomb.
    """

    def __init__(self, length: int, *, limits: Limits, file: str | None, shift: int) -> None:
        self.limits = limits
        self.file = file
        self.shift = shift
        self.budget = 2 * length + 1 + limits.max_alias_expansion

    def visit(self, root: yaml.Node) -> None:
        max_digits = self.limits.max_int_digits
        budget = self.budget
        level: list[yaml.Node] = [root]
        depth = 1
        while level:
            if depth > self.limits.max_depth:
                self._fail(root, level[0], f"nested deeper than {self.limits.max_depth} levels")
            below: list[yaml.Node] = []
            for node in level:
                value = node.value
                if self.shift:
                    _shift_marks(node, self.shift)
                if isinstance(node, yaml.ScalarNode):
                    budget -= 1 + len(value)
                    if len(value) > max_digits and _integer(node):
                        self._fail(
                            root,
                            node,
                            f"integer of {len(value)} digits (at most {max_digits}; "
                            "quote it if it is text)",
                        )
                elif node.__class__ is yaml.MappingNode:
                    budget -= 1 + 2 * len(value)
                    for pair in value:
                        below.extend(pair)
                else:
                    budget -= 1 + len(value)
                    below.extend(value)
                if budget < 0:
                    self._fail(
                        root,
                        node,
                        f"aliases expand to more than {self.limits.max_alias_expansion} "
                        "nodes and characters beyond the text",
                    )
            level = below
            depth += 1
        self.budget = budget

    def _fail(self, root: yaml.Node, node: yaml.Node, message: str) -> None:
        anchored = _cycle(root)
        if anchored is not None:
            raise UserFileError(
                "an alias refers to the anchor it is inside (a recursive alias)",
                file=self.file,
                line=anchored.start_mark.line + 1,
            )
        raise UserFileError(message, file=self.file, line=node.start_mark.line + 1)


def _integer(node: yaml.ScalarNode) -> bool:
    """Whether some YAML reader takes the scalar for an integer (1.2's `0999…` included)."""
    return bool(
        node.tag == _INT_TAG or (node.style in (None, "") and _INTEGER_TEXT.fullmatch(node.value))
    )


def _shift_marks(node: yaml.Node, shift: int) -> None:
    # libyaml's marks are read-only; an alias revisits a node that is already shifted.
    if not isinstance(node.start_mark, yaml.Mark):
        node.start_mark, node.end_mark = (
            yaml.Mark(m.name, m.index + shift, m.line, m.column, None, 0)
            for m in (node.start_mark, node.end_mark)
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _cycle(root: yaml.Node) -> yaml.Node | None:
    """A node that is its own descendant, if any (each node is expanded once)."""
    done: set[int] = set()
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if id(node) in on_path:
            return node
        if id(node) in done:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    return None


# -- JSON ---------------------------------------------------------------------------------


def load_json(data: bytes | str, *, file: str | None, limits: Limits = USER_FILE) -> Any:
    """A JSON document (a webhook body, a CI event file) within the same bounds."""
    text = decode(data, file=file, limits=limits)

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > limits.max_int_digits:
            raise UserFileError(
                f"integer of {len(digits)} digits (at most {limits.max_int_digits})", file=file
            )
        return int(digits)

    try:
        value = json.loads(text, parse_int=integer)
    except json.JSONDecodeError as error:
        raise UserFileError(f"invalid JSON: {error.msg}", file=file, line=error.lineno) from None
    except RecursionError:
        raise UserFileError(f"nested deeper than {limits.max_depth} levels", file=file) from None
    _check_json_depth(value, limits=limits, file=file)
    return value


def _check_json_depth(value: Any, *, limits: Limits, file: str | None) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limits.max_depth:
            raise UserFileError(f"nested deeper than {limits.max_depth} levels", file=file)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


# -- typed models -------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
PathPart = str | int


def validate(
    model: type[M],
    data: Any,
    *,
    file: str,
    node: yaml.Node | None = None,
    at: tuple[PathPart, ...] = (),
) -> M:
    """`data` as a `model`, or a UserFileError naming the file, the line and the field
    (`conveyor.yaml:7: environments[1].gates[0].duration: expected …`). `node` is the
    YAML node `data` came from and `at` the path of `data` inside it, so that the line
    is the field's own and the path reads as written in the file."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise invalid(error, file=file, node=node, at=at) from None


def invalid(
    error: ValidationError,
    *,
    file: str,
    node: yaml.Node | None,
    at: tuple[PathPart, ...] = (),
) -> UserFileError:
    """The UserFileError for pydantic's `error`: its first problem, and how many more."""
    problems = error.errors(include_url=False)
    first = problems[0]
    path, line = locate(node, (*at, *first["loc"]))
    message = describe_problem({**first, "loc": tuple(path)})
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more)"
    return UserFileError(message, file=file, line=line)


def locate(
    node: yaml.Node | None, loc: tuple[PathPart, ...], *, at_key: bool = False
) -> tuple[list[PathPart], int | None]:
    """Pydantic's `loc` as the path written in the file, and the line of the deepest node
    on it. Parts the file does not have are a union's tag (`soak` in a gate) and dropped,
    except the last one: a field that is missing. `at_key`: the line of the deepest key
    instead, where a map or list written below it is named."""
    if node is None:
        return list(loc), None
    path: list[PathPart] = []
    line = node.start_mark.line + 1
    for index, part in enumerate(loc):
        found = _child(node, part)
        if found is not None:
            key, node = found
            path.append(part)
            line = (key if at_key else node).start_mark.line + 1
        elif part == "[key]" or (index == len(loc) - 1 and isinstance(node, yaml.MappingNode)):
            path.append(part)
    return path, line


def _child(node: yaml.Node, part: PathPart) -> tuple[yaml.Node, yaml.Node] | None:
    """The key (an item's own node in a list) and the value at `part`."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if 0 <= part < len(node.value):
            item: yaml.Node = node.value[part]
            return item, item
    return None
