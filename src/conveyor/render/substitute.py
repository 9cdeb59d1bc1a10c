"""Flux's post-build variable substitution (`spec.postBuild`), applied to a build's
objects as kustomize-controller applies it.

Flux runs a bash-like `envsubst` over each object's YAML after the kustomize build, so
`replicas: ${count}` becomes a number. conveyor does the same, on the same forms:
`${var}`, `${var:=default}` (also `:-`, `=` and `-`), and `$${var}` for a literal
`${var}`. An undefined variable without a default becomes empty, as in Flux; an object
whose annotations or labels say `kustomize.toolkit.fluxcd.io/substitute: disabled` is
left alone. Values may come from Secrets: no message here ever shows one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import yaml

from conveyor.render.documents import Document, RenderError, load_all

DISABLE_KEY = "kustomize.toolkit.fluxcd.io/substitute"
VARIABLE_NAME = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
# `$${...}` (an escape) or `${...}`; nothing nests inside a reference.
_REFERENCE = re.compile(r"\$(\$)?\{([^{}]*)\}")
_EXPRESSION = re.compile(r"^([_a-zA-Z][_a-zA-Z0-9]*)(?:(:=|:-|=|-)(.*))?$", re.DOTALL)


def check_variable_names(names: list[str], *, file: str, line: int) -> None:
    """Flux refuses a variable whose name a shell could not hold."""
    for name in names:
        if not VARIABLE_NAME.match(name):
            raise RenderError(
                f"postBuild: variable name {name!r} must match {VARIABLE_NAME.pattern}",
                file=file,
                line=line,
            )


def substitute_text(text: str, variables: Mapping[str, str], *, keep_undefined: bool) -> str:
    """`text` with its references replaced. `keep_undefined` (an offline render that
    could not read every source) leaves an undefined reference without default as it
    is, so that the diff shows it instead of an empty value. ValueError names a
    reference conveyor does not understand (never a value)."""

    def one(match: re.Match[str]) -> str:
        escaped, inner = match.group(1), match.group(2)
        if escaped:
            return "${" + inner + "}"
        parsed = _EXPRESSION.match(inner)
        if parsed is None:
            raise ValueError(f"unsupported substitution ${{{inner}}}")
        name, operator, default = parsed.groups()
        value = variables.get(name)
        if operator in (":=", ":-") and not value:
            return str(default)
        if operator in ("=", "-") and value is None:
            return str(default)
        if value is None:
            return match.group(0) if keep_undefined else ""
        return value

    return _REFERENCE.sub(one, text)


def substitute_documents(
    documents: list[Document], variables: Mapping[str, str], *, keep_undefined: bool = False
) -> list[Document]:
    """Each document with its variables substituted (those that opt out unchanged)."""
    result = []
    for doc in documents:
        metadata = doc.obj.get("metadata") or {}
        markers = {**(metadata.get("labels") or {}), **(metadata.get("annotations") or {})}
        if markers.get(DISABLE_KEY) == "disabled":
            result.append(doc)
            continue
        text = yaml.safe_dump(doc.obj, sort_keys=False)
        try:
            substituted = substitute_text(text, variables, keep_undefined=keep_undefined)
        except ValueError as error:
            raise RenderError(f"postBuild: {error}", file=doc.file, line=doc.line) from None
        if substituted == text:
            result.append(doc)
            continue
        try:
            loaded = [o for o in load_all(substituted) if o is not None]
        except RenderError:
            loaded = []
        if len(loaded) != 1 or not isinstance(loaded[0], dict):
            # Never echo the text: a value may come from a Secret.
            raise RenderError(
                f"postBuild: {doc.kind} {doc.name} is not one valid object after "
                "variable substitution",
                file=doc.file,
                line=doc.line,
            )
        result.append(replace(doc, obj=loaded[0]))
    return result
