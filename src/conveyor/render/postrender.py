"""A HelmRelease's `postRenderers`, as the program helm runs (`--post-renderer`).

Flux applies kustomize patches and images to what a chart renders before it is
installed; helm's post-renderer hook is the only way to have them in the release itself
(so `helm get manifest` and drift checks see the patched objects). helm runs
`python -m conveyor.render.postrender <folder>`: the folder holds one kustomization per
post-renderer, written by render/helm.py from the HelmRelease; the chart's manifests come
on stdin and leave, patched in order, on stdout. Nothing from the HelmRelease is an
argument: the folder is conveyor's own.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from conveyor.render.documents import RenderError
from conveyor.render.kustomize import kustomize_build

MANIFESTS = "manifests.yaml"


def write_stages(folder: Path, renderers: list[dict[str, Any]]) -> None:
    """One kustomization per post-renderer, applied in order by `post_render`."""
    for index, fields in enumerate(renderers):
        stage = folder / f"{index:03d}"
        stage.mkdir(parents=True)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [MANIFESTS],
            **fields,
        }
        (stage / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))


async def post_render(folder: Path, manifests: str) -> str:
    """`manifests` through each stage of `folder` in turn."""
    for stage in sorted(p for p in folder.iterdir() if p.is_dir()):
        with tempfile.TemporaryDirectory(prefix="conveyor-postrender-") as scratch:
            work = Path(scratch)
            (work / MANIFESTS).write_text(manifests)
            (work / "kustomization.yaml").write_text((stage / "kustomization.yaml").read_text())
            objects = await kustomize_build(work, shown_as="postRenderers", hide=[f"{work}/"])
        manifests = yaml.safe_dump_all(objects, sort_keys=False)
    return manifests


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m conveyor.render.postrender FOLDER", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(asyncio.run(post_render(Path(argv[0]), sys.stdin.read())))
    except RenderError as error:
        print(f"postRenderers: {error.detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
