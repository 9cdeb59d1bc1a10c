"""conveyor's own Helm chart, shipped inside the package so that `conveyor bootstrap`
finds it wherever conveyor is installed (`charts/conveyor` in the repository links here).

The chart's CRD is not written by hand: it is `crd_manifest()`, the one ConveyorApp CRD
the agent installs and checks, dumped by `python -m conveyor.install.chart`; a unit test
fails when the two disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from conveyor.reconcile.status import crd_manifest

CHART_DIR = Path(__file__).resolve().parent / "chart"
CRD_FILE = CHART_DIR / "crds" / "conveyorapps.yaml"
CRD_HEADER = (
    "# Generated from conveyor.reconcile.status.crd_manifest by\n"
    "# `python -m conveyor.install.chart`; do not edit (tests/unit/test_chart.py checks it).\n"
)


def crd_text() -> str:
    """The chart's crds/ file as it must read."""
    return CRD_HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False)


def main() -> None:
    CRD_FILE.write_text(crd_text())
    sys.stdout.write(f"wrote {CRD_FILE}\n")


if __name__ == "__main__":
    main()
