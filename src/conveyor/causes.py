"""A failure said twice: its cause in one line, for the places a person scans (a status's
Ready message, `conveyor get apps`, the dashboard), and its full text, capped, for the
places a person digs (a status's `details`, an Event, the dashboard's details toggle).

helm and the API server quote the object they refused whole: kilobytes of escaped JSON
(helm's patch) or of Go struct literals (`Invalid value: core.PodTemplateSpec{...}`) in
front of three words of cause. The cause keeps the words.
"""

from __future__ import annotations

import re

from conveyor.errors import one_line

CAUSE_LIMIT = 500  # characters of a one-line cause
MESSAGE_LIMIT = 1024  # of a status's message: a cause, where its value is written, a rollback
DETAILS_LIMIT = 4096  # characters of a full text kept in a status or an Event
_QUOTED_VALUE_LIMIT = 80  # a refused value longer than this is left out of the cause

# A JSON object or string quoted whole, escaped, in an error.
LONG_QUOTE = re.compile(r'"(?:[^"\\]|\\.){200,}"')
UNMARSHAL = re.compile(
    r"(?:json: )?cannot unmarshal (?P<got>\w+) into Go struct field "
    r"\w+\.(?P<field>[\w.]+) of type (?P<want>[\w.\[\]*]+)"
)
_INVALID_VALUE = "Invalid value: "
_CLOSING = {"{": "}", "[": "]", "(": ")"}


def capped(text: str, limit: int = DETAILS_LIMIT) -> str:
    """`text` at most `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    kept = max(limit - len(f"... ({len(text)} more characters)"), 0)
    return text[:kept] + f"... ({len(text) - kept} more characters)"


def short_cause(text: str) -> str:
    """The cause in `text` as one line: refused values quoted whole left out, Go's
    decoder errors said by field, the rest capped at CAUSE_LIMIT."""
    text = one_line(" ".join(text.split()))
    text = drop_long_values(text)
    text = UNMARSHAL.sub(r"\g<field>: cannot unmarshal \g<got> into \g<want>", text)
    text = LONG_QUOTE.sub('"..."', text)
    if len(text) > CAUSE_LIMIT:
        text = text[: CAUSE_LIMIT - 3] + "..."
    return text


def drop_long_values(text: str) -> str:
    """`field: Invalid value: <value>: why` → `field: why` when the value (a quoted
    string or a Go literal such as `core.PodTemplateSpec{...}`) is long."""
    out, start = [], 0
    while (found := text.find(_INVALID_VALUE, start)) >= 0:
        value_start = found + len(_INVALID_VALUE)
        end = _value_end(text, value_start)
        if end is not None and end - value_start > _QUOTED_VALUE_LIMIT:
            out.append(text[start:found])
            start = end + 2  # past the ": " after the value
        else:
            out.append(text[start:value_start])
            start = value_start
    out.append(text[start:])
    return "".join(out)


def _value_end(text: str, start: int) -> int | None:
    """Where the value at `start` ends: before the `: ` that follows it at depth 0."""
    index, depth, closing = start, 0, []
    if text.startswith('"', start):  # a Go quoted string: up to its closing quote
        index += 1
        while index < len(text) and text[index] != '"':
            index += 2 if text[index] == "\\" else 1
        index += 1
    while index < len(text):
        char = text[index]
        if char == '"' and depth:
            index += 1
            while index < len(text) and text[index] != '"':
                index += 2 if text[index] == "\\" else 1
        elif char in _CLOSING:
            closing.append(_CLOSING[char])
            depth += 1
        elif closing and char == closing[-1]:
            closing.pop()
            depth -= 1
        elif depth == 0 and text.startswith(": ", index):
            return index
        index += 1
    return None
