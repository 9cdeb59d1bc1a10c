"""The root of conveyor's own errors: a caller that reports failures to people catches
`ConveyorError` and knows the message is meant to be read; anything else is a bug."""

from __future__ import annotations


class ConveyorError(Exception):
    """An error conveyor explains in its message."""


class LocatedError(ConveyorError):
    """An error in a user's file: `file` and `line` say where, when known, and lead the
    message (`staging/api.yaml:12: ...`); `detail` is the message without them."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        self.file = file
        self.line = line
        self.detail = message = one_line(message)
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        super().__init__(f"{where}{message}")


def one_line(text: str) -> str:
    """Line breaks and other control characters (a key written across lines, a NUL in a
    value) escaped, so that a message stays one line in a log or a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
