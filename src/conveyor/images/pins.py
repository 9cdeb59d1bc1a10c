"""Pins: an app's image tags held where a person put them, against image automation.

A rollback to a known-good version is undone by the next image scan if automation still
follows the registry. So a rollback pins the objects it changed, and every automation
honours a pin until a person lifts it (`conveyor unpin`, or a promotion). Two forms,
both read on any object:

- Flux v1 files (objects with a `fluxcd.io/automated` or `flux.weave.works/automated`
  annotation) get Flux v1's own lock, `<prefix>/locked: "true"` with `locked_msg` and
  `locked_user`, so a fluxd reading the same repository holds the app too.
- Everything else (Flux v2 setters, plain manifests, kustomizations) gets
  `conveyor.dev/pinned: "true"` with `conveyor.dev/pinned-by`, `pinned-reason` and
  `pinned-at` (UTC, ISO 8601).

Only the annotations are defined here; `promote/pinning.py` writes them into files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FLUX_V1_PREFIXES = ("fluxcd.io", "flux.weave.works")
PINNED = "conveyor.dev/pinned"
PINNED_BY = "conveyor.dev/pinned-by"
PINNED_REASON = "conveyor.dev/pinned-reason"
PINNED_AT = "conveyor.dev/pinned-at"
_CONVEYOR_KEYS = (PINNED, PINNED_BY, PINNED_REASON, PINNED_AT)
_FLUX_V1_SUFFIXES = ("locked", "locked_msg", "locked_user")


def truthy(value: object) -> bool:
    """Flux reads `true` and `"true"` alike."""
    return value is True or str(value).lower() == "true"


@dataclass(frozen=True)
class Pin:
    by: str | None = None
    reason: str | None = None
    at: str | None = None  # conveyor pins only: Flux v1 locks record no time
    annotation: str = PINNED  # the annotation that holds it

    def describe(self) -> str:
        """`pinned by alice: rolled back from 1.4.3 (fluxcd.io/locked)`."""
        who = f" by {self.by}" if self.by else ""
        why = f": {self.reason}" if self.reason else ""
        when = f" at {self.at}" if self.at else ""
        return f"pinned{who}{when}{why} ({self.annotation})"

    def to_dict(self) -> dict[str, str | None]:
        return {"by": self.by, "reason": self.reason, "at": self.at, "annotation": self.annotation}


def _text(value: object) -> str | None:
    return str(value) if value is not None and str(value) != "" else None


def flux_v1_prefix(annotations: Mapping[str, Any]) -> str | None:
    """The Flux v1 prefix of an object that has an `automated` annotation, else None."""
    return next((p for p in FLUX_V1_PREFIXES if f"{p}/automated" in annotations), None)


def read_pin(annotations: Mapping[str, Any] | None) -> Pin | None:
    """The object's pin (a conveyor pin first, else a Flux v1 lock), or None."""
    annotations = annotations or {}
    if truthy(annotations.get(PINNED)):
        return Pin(
            _text(annotations.get(PINNED_BY)),
            _text(annotations.get(PINNED_REASON)),
            _text(annotations.get(PINNED_AT)),
        )
    for prefix in FLUX_V1_PREFIXES:
        if truthy(annotations.get(f"{prefix}/locked")):
            return Pin(
                _text(annotations.get(f"{prefix}/locked_user")),
                _text(annotations.get(f"{prefix}/locked_msg")),
                annotation=f"{prefix}/locked",
            )
    return None


def pin_annotations(annotations: Mapping[str, Any], pin: Pin) -> dict[str, str]:
    """The annotations that pin this object: Flux v1's lock on a Flux v1 automated
    object, conveyor's pin otherwise (empty values are left out)."""
    prefix = flux_v1_prefix(annotations)
    if prefix is not None:
        values = {"locked": "true", "locked_msg": pin.reason, "locked_user": pin.by}
        return {f"{prefix}/{k}": v for k, v in values.items() if v}
    pinned = {PINNED: "true", PINNED_BY: pin.by, PINNED_REASON: pin.reason, PINNED_AT: pin.at}
    return {k: v for k, v in pinned.items() if v}


def pin_keys(annotations: Mapping[str, Any]) -> list[str]:
    """The annotations of either form present on the object: what unpinning removes."""
    flux = [f"{p}/{s}" for p in FLUX_V1_PREFIXES for s in _FLUX_V1_SUFFIXES]
    return [key for key in (*_CONVEYOR_KEYS, *flux) if key in annotations]
