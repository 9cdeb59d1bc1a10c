"""Build conveyor's container image without a Docker daemon (`make image`).

The Containerfile is the one recipe; this script feeds it what this machine has. No
image registry is reachable here (only Debian's, PyPI and the Go proxy), so the base is
built from Debian's packages by mmdebstrap instead of pulled as debian:bookworm-slim;
helm is the sandbox's own build (~/.cache/conveyor/sandbox), the very binary the tests
run, and kustomize is built beside it from the same Kubernetes module (the kustomize of
the sandbox's kubectl, without the rest of kubectl: sandbox/build.py ensure_kustomize);
the Python packages are the hashed lock export, downloaded once into a wheelhouse.
buildah then runs the Containerfile with chroot isolation (no daemon and no OCI
runtime, which this VM makes fragile: see tests/cluster/test_image.py) and pushes the
result to the sandbox registry.

Heavy pieces are cached under ~/.cache/conveyor/image, keyed by their inputs: the
Debian base by the package list, the wheels by their hashes; buildah keeps the
Containerfile's layers, so a build after a commit redoes only conveyor's own.

    python image/build.py [--push SANDBOX]   build (and push to that sandbox's registry)
    python image/build.py --context DIR      only stage the Containerfile's build context
    python image/build.py --slim-base        only build the debian:bookworm-slim stand-in
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from conveyor import __version__  # noqa: E402
from conveyor.paths import cache_root  # noqa: E402
from conveyor.sandbox import Sandbox, SandboxError  # noqa: E402
from conveyor.sandbox.build import ensure_binaries, ensure_kustomize, ensure_tools  # noqa: E402
from conveyor.sandbox.versions import VERSIONS  # noqa: E402

SUITE = "bookworm"
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
# The image's tools, from the sandbox build cache. age is not needed at run time: sops
# holds age's decryption itself (keys come as SOPS_AGE_KEY / *.agekey Secrets).
TOOLS = ("helm",)
# Wheels for the image's Python (Debian bookworm: CPython 3.11, glibc 2.36, x86_64). pip
# takes a given platform literally, so every manylinux level that glibc 2.36 runs is named.
WHEEL_TARGET = (
    *(f"--platform=manylinux_2_{glibc}_x86_64" for glibc in range(36, 4, -1)),
    "--platform=manylinux2014_x86_64",
    "--platform=manylinux2010_x86_64",
    "--platform=manylinux1_x86_64",
    "--python-version=3.11",
    "--implementation=cp",
    "--abi=cp311",
)
IMAGE = "localhost/conveyor"


def say(message: str) -> None:
    print(f"[image] {message}", flush=True)


def run(args: list[str], *, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"[image] {args[0]} {args[1] if len(args) > 1 else ''} failed:\n{tail}")
    return result.stdout


def timed(step: str, started: float) -> None:
    say(f"{step}: {time.monotonic() - started:.1f}s")


def require_tools() -> None:
    missing = [t for t in ("mmdebstrap", "buildah", "podman") if not shutil.which(t)]
    if missing:
        raise SystemExit(
            f"[image] missing {', '.join(missing)}: apt-get install mmdebstrap buildah podman"
        )


def source_date_epoch() -> str:
    """The commit's time: two builds of one commit carry the same timestamps."""
    return run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"]).strip()


def image_tag() -> str:
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]).strip()
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return f"{__version__}-{commit}" + (".dirty" if dirty.strip() else "")


def wheelhouse(cache: Path) -> Path:
    """The locked dependencies as wheels for the image's Python, hash-checked by pip
    once per lock (the Containerfile's pip checks the hashes again)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = ROOT / "requirements" / "runtime.txt"
    complete = wheels / f".complete-{hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]}"
    if complete.exists():
        return wheels
    run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--require-hashes", "--no-deps", "--only-binary=:all:", *WHEEL_TARGET,
            "--dest", str(wheels), "-r", str(requirements),
        ]
    )  # fmt: skip
    complete.touch()
    return wheels


def stage_context(context: Path, cache: Path) -> None:
    """Everything the Containerfile reads, in one directory (also for podman/docker)."""
    started = time.monotonic()
    context.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "Containerfile", context / "Containerfile")
    for name in ("install.sh", "slim.sh", "packages.txt", "dpkg.cfg"):
        shutil.copy2(HERE / name, context / name)
    shutil.copy2(ROOT / "requirements" / "runtime.txt", context / "runtime.txt")
    bin_dir = ensure_binaries(VERSIONS, progress=say)
    (context / "bin").mkdir(exist_ok=True)
    shutil.copy2(ensure_kustomize(VERSIONS, progress=say), context / "bin" / "kustomize")
    for tool in TOOLS:
        shutil.copy2(bin_dir / tool, context / "bin" / tool)
    shutil.copy2(ensure_tools(progress=say) / "sops", context / "bin" / "sops")
    timed("tools from the sandbox cache", started)

    started = time.monotonic()
    shutil.copytree(wheelhouse(cache), context / "wheels", dirs_exist_ok=True)
    timed("wheelhouse (locked dependencies)", started)

    started = time.monotonic()
    dist = context / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=cache) as scratch:
        # From a copy: setuptools keeps a build/ directory beside the sources, whose
        # leftovers (modules deleted since) would otherwise end up in the wheel.
        source = Path(scratch)
        shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        run(
            [
                sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--wheel-dir", str(dist), str(source),
            ],
            env={**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch()},
        )  # fmt: skip
    timed("conveyor wheel", started)


def image_packages() -> list[str]:
    lines = (HERE / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def debian_base(cache: Path, *, variant: str, include: list[str]) -> str:
    """A Debian root filesystem from mmdebstrap, imported as an image; keyed by what
    goes in. `essential` with the image's packages is make image's base (no apt: nothing
    installs after the build), slimmed by slim.sh as the Containerfile's `install.sh
    packages` slims (in the base itself: a later layer could hide files, not drop them);
    `minbase` alone stands in for debian:bookworm-slim."""
    options = [f"--variant={variant}", f"--dpkgopt={HERE / 'dpkg.cfg'}"]
    inputs = [HERE / "dpkg.cfg"]  # what decides the contents besides the options
    if include:
        slim = HERE / "slim.sh"
        options += [
            f"--include={','.join(include)}",
            f'--customize-hook=chroot "$1" sh -s < {shlex.quote(str(slim))}',
        ]
        inputs.append(slim)
    recipe = "\n".join([SUITE, *MIRRORS, *(path.read_text() for path in inputs), *options])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    reference = f"localhost/conveyor-base:{variant}-{key}"
    if subprocess.run(["podman", "image", "exists", reference], check=False).returncode == 0:
        say(f"base {reference}: cached")
        return reference
    started = time.monotonic()
    tarball = cache / f"base-{variant}-{key}.tar"
    if not tarball.exists():
        partial = tarball.with_suffix(".partial")
        run(
            ["mmdebstrap", "--quiet", *options, "--format=tar", SUITE, str(partial), *MIRRORS],
            env={**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch()},
        )
        partial.rename(tarball)
    run(["podman", "import", "--quiet", str(tarball), reference])
    timed(f"Debian base ({variant}, mmdebstrap)", started)
    return reference


def build(context: Path, base: str, tag: str) -> str:
    started = time.monotonic()
    reference = f"{IMAGE}:{tag}"
    run(
        [
            "buildah", "build", "--quiet", "--isolation=chroot", "--layers",
            f"--timestamp={source_date_epoch()}", f"--build-arg=BASE={base}",
            f"--label=org.opencontainers.image.version={__version__}",
            f"--label=org.opencontainers.image.revision={tag}",
            "--tag", reference, "--file", str(context / "Containerfile"), str(context),
        ]
    )  # fmt: skip
    timed("buildah build (Containerfile)", started)
    return reference


def sandbox_registry(sandbox_name: str) -> str:
    try:
        return Sandbox(sandbox_name).registry()
    except SandboxError as error:
        raise SystemExit(f"[image] cannot push: {error}") from None


def push(reference: str, registry: str) -> str:
    started = time.monotonic()
    target = f"{registry}/conveyor:{reference.rsplit(':', 1)[1]}"
    # The sandbox registry listens on loopback without TLS.
    run(["buildah", "push", "--quiet", "--tls-verify=false", reference, f"docker://{target}"])
    timed(f"push to {registry}", started)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--push", metavar="SANDBOX", help="push to this sandbox's registry")
    parser.add_argument(
        "--context", metavar="DIR", type=Path, help="only stage the build context into DIR"
    )
    parser.add_argument(
        "--slim-base",
        action="store_true",
        help="only build a debian:bookworm-slim stand-in (mmdebstrap minbase) and print it",
    )
    options = parser.parse_args()
    cache = cache_root() / "image"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if options.context:
        stage_context(options.context, cache)
        say(f"context: {options.context}")
        return
    require_tools()
    registry = sandbox_registry(options.push) if options.push else None  # before building
    if options.slim_base:
        print(f"base: {debian_base(cache, variant='minbase', include=[])}")
        return
    with tempfile.TemporaryDirectory(prefix="context-", dir=cache) as staging:
        context = Path(staging)
        stage_context(context, cache)
        base = debian_base(cache, variant="essential", include=image_packages())
        reference = build(context, base, image_tag())
    size = int(run(["podman", "image", "inspect", "--format", "{{.Size}}", reference]))
    say(f"built {reference}: {size / 1e6:.0f} MB uncompressed")
    pushed = push(reference, registry) if registry else None
    say(f"total: {time.monotonic() - started:.1f}s")
    print(f"image: {reference}")
    if pushed:
        print(f"pushed: {pushed}")


if __name__ == "__main__":
    main()
