"""The root of conveyor's own errors: a caller that reports failures to people catches
`ConveyorError` and knows the message is meant to be read; anything else is a bug."""

from __future__ import annotations


class ConveyorError(Exception):
    """An error conveyor explains in its message."""
