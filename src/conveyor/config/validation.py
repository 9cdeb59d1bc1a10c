"""Typed reading of the objects in a config repo, with errors a person can act on.

Files in git are written by hand and by CI, so any field may hold any YAML value. The
models of Kubernetes objects, HelmReleases and Flux sources share what is here: a strict
base model (no `"true"` for a boolean, no `"5"` for a number, as the API server would
refuse them), field types for values that end up in URLs and command lines, and one
formatter that turns pydantic's `ValidationError` into `spec.timeout: expected seconds,
got '5m'` — the field as written in the file, what it takes, and what it held (for a
Secret only the type of what it held, never the value).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails, PydanticCustomError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
# Free-form content (Helm values, the body of an object) is walked once: this deep and
# this many values at most, far past any real manifest, well short of a stack or memory.
MAX_DEPTH = 200
MAX_VALUES = 1_000_000
# How much of a bad value a message shows: enough to recognise it, one line at most.
_SHOWN = 40
# Error types that come from the shape of the input rather than from its value.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "mapping_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "string_too_short": "a non-empty string",
}


class FileModel(BaseModel):
    """An object as written in a file: camelCase fields, fields it does not know are
    ignored (the API server prunes them too), and no type coercion."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        strict=True,
        frozen=True,
    )


def expected(what: str, *, inside: str = "", got: str | None = None) -> PydanticCustomError:
    """The error a field validator raises: `expected <what>`, completed with what the
    field held when it is described. `inside` is a path below the field (for a value
    found deep in a free-form mapping) and `got` that value, already `shown`."""
    context: dict[str, str] = {"what": what, "inside": inside}
    if got is not None:
        context["got"] = got
    return PydanticCustomError("expected", "expected {what}", context)


def _text(value: str) -> str:
    if _CONTROL.search(value):
        raise expected("text without control characters")
    return value


def _argument(value: str) -> str:
    # Handed to git or helm as a positional argument: never something they read as an
    # option, whatever else guards the command line.
    _text(value)
    if not value or value.startswith("-"):
        raise expected("a value that does not start with '-'")
    return value


def _object_name(value: str) -> str:
    # What the API server takes as a path segment of a name (names end up in URLs), and
    # never an option to helm (`--namespace`), which no DNS name is either.
    if (
        not value
        or value.startswith("-")
        or len(value) > 253
        or value in (".", "..")
        or any(c in value for c in "/%")
        or _CONTROL.search(value)
        or value != value.strip()
    ):
        raise expected("a Kubernetes name (no '/', '%', spaces or leading '-', 253 characters)")
    return value


def _null_is_empty(value: Any) -> Any:
    return {} if value is None else value


Model = TypeVar("Model", bound=BaseModel)
OrNull = Annotated[Model, BeforeValidator(_null_is_empty)]
"""A field holding an object, where `null` (like an absent field) means its defaults."""

Text = Annotated[str, AfterValidator(_text)]
"""A string without control characters (a NUL byte cannot reach a command line)."""

Argument = Annotated[str, AfterValidator(_argument)]
"""A non-empty string that git or helm can take as an argument: a URL, ref, chart name."""

ObjectName = Annotated[str, AfterValidator(_object_name)]
"""metadata.name or metadata.namespace of a Kubernetes object."""


def describe(error: ValidationError, *, reveal: bool = True) -> str:
    """The first problem of `error` as `field.path: expected X, got Y`, and how many
    more there are. With `reveal=False` (a Secret) only the kind of value is told."""
    problems = error.errors(include_url=False)
    message = describe_problem(problems[0], reveal=reveal)
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more)"
    return message


def describe_problem(problem: ErrorDetails, *, reveal: bool = True) -> str:
    loc = list(problem["loc"])
    kind = problem["type"]
    value = problem.get("input")
    if loc and loc[-1] == "[key]":
        # A mapping key of the wrong type: pydantic names the key itself after the map.
        loc = loc[:-2]
        return f"{field_path(loc)}: keys must be strings, got {shown(value, reveal=True)}"
    context = problem.get("ctx") or {}
    path = field_path(loc)
    if kind == "missing":
        return f"{path} is required"
    if kind == "expected":
        what = str(context["what"])
        path = field_path(loc, str(context["inside"]))
        if "got" in context:
            return f"{path}: expected {what}, got {context['got']}"
    elif kind == "literal_error":
        what = str(context.get("expected", "one of the allowed values"))
    elif kind in _EXPECTED:
        what = _EXPECTED[kind]
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        what = "a value " + problem["msg"].removeprefix("Input should be ")
    elif kind == "value_error":
        return f"{path}: {context.get('error', problem['msg'])}"
    else:
        return f"{path}: {problem['msg']}"
    return f"{path}: expected {what}, got {shown(value, reveal=reveal)}"


def field_path(loc: Sequence[int | str], inside: str = "") -> str:
    """`spec.valuesFrom[0].name` from pydantic's ('spec', 'valuesFrom', 0, 'name'),
    followed by `inside` (`.image.tag`, `[2]`), a path below the last field."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    path = (path + inside).removeprefix(".")
    return path or "(the object)"


def shown(value: Any, *, reveal: bool) -> str:
    """A value for a message: short, on one line, and only its kind when not `reveal`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple | set):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})" if reveal else "a date"
    if isinstance(value, int):
        if not reveal:
            return "an integer"
        if value.bit_length() > 128:  # str() of a huge integer is slow, then refused
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        return str(value)
    if isinstance(value, float):
        return repr(value) if reveal else "a number"
    if isinstance(value, str):
        if not reveal:
            return "a string"
        text = repr(value)
        return text if len(text) <= _SHOWN else text[: _SHOWN - 4] + "...'"
    return f"a {type(value).__name__}"


def json_compatible(value: Any) -> Any:
    """Free-form YAML content as JSON, the way Kubernetes and helm read YAML: keys that
    YAML took for numbers or booleans are the strings they were written as (`80:` is
    `"80"`), a date is its ISO text. Values JSON cannot carry (a timestamp whose text
    is lost, binary data, NaN, integers past 64 bits) are an `expected` error naming the
    path. The input is returned as is when nothing needed converting."""
    return _JsonWalk().convert(value, "", 0)


class _JsonWalk:
    def __init__(self) -> None:
        self.left = MAX_VALUES

    def convert(self, value: Any, path: str, depth: int) -> Any:
        self.left -= 1
        if self.left < 0:
            raise expected(f"at most {MAX_VALUES} values", got="more")
        if depth > MAX_DEPTH:
            raise expected(f"at most {MAX_DEPTH} levels of nesting", inside=path, got="more")
        if value is None or isinstance(value, str | bool):
            return value
        if isinstance(value, int):
            if not INT64_MIN <= value <= UINT64_MAX:
                raise expected(
                    "an integer that fits in 64 bits", inside=path, got=shown(value, reveal=True)
                )
            return value
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise expected("a finite number", inside=path, got=repr(value))
            return value
        if isinstance(value, dict):
            return self._mapping(value, path, depth)
        if isinstance(value, list):
            items = [self.convert(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
            same = all(a is b for a, b in zip(items, value, strict=True))
            return value if same else items
        if isinstance(value, datetime.datetime):
            raise expected("a string (quote the timestamp)", inside=path, got="a timestamp")
        if isinstance(value, datetime.date):
            return value.isoformat()
        raise expected("a JSON value", inside=path, got=shown(value, reveal=True))

    def _mapping(self, value: dict[Any, Any], path: str, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        same = True
        for key, item in value.items():
            name = _json_key(key, path)
            if name in result:
                raise expected("unique keys", inside=path, got=f"{name!r} twice")
            converted = self.convert(item, f"{path}.{name}", depth + 1)
            same = same and name is key and converted is item
            result[name] = converted
        return value if same else result


def _json_key(key: Any, path: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int | float) and not isinstance(key, bool):
        if isinstance(key, int) and key.bit_length() > 64:
            raise expected("keys that fit in 64 bits", inside=path, got=shown(key, reveal=True))
        return str(key)
    if isinstance(key, datetime.date) and not isinstance(key, datetime.datetime):
        return key.isoformat()
    raise expected("string keys", inside=path, got=shown(key, reveal=True))


JsonObject = Annotated[dict[str, Any], BeforeValidator(json_compatible)]
"""A mapping of free-form content, converted by `json_compatible`."""
