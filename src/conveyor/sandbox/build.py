"""Build the sandbox's binaries from the Go module proxy, once, into a versioned cache.

Kubernetes and etcd are built from small wrapper modules (their main modules use
`replace` directives, which `go install pkg@version` refuses); kwok, the registry and
Helm are plain `go install pkg@version`. Every step is named so that a failure says
which one broke and shows the tail of its output.

sops and age (what users and tests encrypt secrets with) are cached in a directory of
their own with their own key, so that a new sops never invalidates the Kubernetes build;
so are the peers' tools that benchmarks run (kustomize and flux, for flux-local).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.paths import cache_root
from conveyor.sandbox.versions import (
    PEER_TOOL_VERSIONS,
    TOOL_VERSIONS,
    PeerToolVersions,
    ToolVersions,
    Versions,
    find_go,
)

# The multi-call binary answers to these names through symlinks.
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
BINARIES = ("kube", "etcd", "kwok", "registry", "helm")
KUSTOMIZE_PACKAGE = "sigs.k8s.io/kustomize/kustomize/v5"
TOOLS = ("sops", "age", "age-keygen")
PEER_TOOLS = ("kustomize", "flux")

Progress = Callable[[str], None]


class BuildError(ConveyorError, RuntimeError):
    """A build step failed; `step` names it and `output` holds the tail of its log."""

    def __init__(self, step: str, output: str, *, log: Path | None = None) -> None:
        self.step = step
        self.output = output
        self.log = log
        where = f" (full log: {log})" if log else ""
        super().__init__(f"sandbox build failed at step '{step}'{where}:\n{output}")


@dataclass
class GoBuilder:
    """Runs go commands with a pinned, reproducible environment and a log per step."""

    go: str
    go_version: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        flags = env.get("GOFLAGS", "").split()
        env.update(
            GOTOOLCHAIN="local",  # never download a toolchain behind the user's back
            CGO_ENABLED="0",
            GOFLAGS=" ".join([f for f in flags if not f.startswith("-mod=")] + ["-mod=mod"]),
        )
        env.update(self.extra_env)
        return env

    def run(self, step: str, args: list[str], *, cwd: Path) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / (re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-") + ".log")
        with log.open("w") as out:
            out.write(f"$ (cd {cwd} && {' '.join(args)})\n")
            out.flush()
            result = subprocess.run(
                args,
                cwd=cwd,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            out.write(result.stdout)
        if result.returncode != 0:
            tail = "\n".join(result.stdout.strip().splitlines()[-25:])
            raise BuildError(step, tail, log=log)
        return result.stdout

    def module_info(self, module: str, version: str, *, cwd: Path) -> dict[str, str]:
        """`go mod download -json` of one module: its source Dir and its GoMod file."""
        out = self.run(
            f"download {module}@{version}",
            [self.go, "mod", "download", "-json", f"{module}@{version}"],
            cwd=cwd,
        )
        info: dict[str, str] = json.loads(out[out.index("{") :])
        if info.get("Error"):
            raise BuildError(f"download {module}@{version}", info["Error"])
        return info


def kube_ldflags(versions: Versions) -> str:
    """The version variables that Kubernetes' hack/lib/version.sh sets, for both packages."""
    major, minor = versions.kube_minor
    values = {
        "gitVersion": versions.kubernetes,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",  # reproducible builds: no wall clock
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in values.items()]
    return " ".join(flags)


def helm_ldflags(versions: Versions) -> str:
    major, minor = versions.kube_minor
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={versions.helm}"]
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor={major}", f"-X {package}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def staging_replaces(kubernetes_go_mod: str, version: str) -> list[str]:
    """Turn k/k's `replace k8s.io/x => ./staging/src/k8s.io/x` block into published versions.

    Staging modules are published as v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
    """
    staging_version = "v0." + version.lstrip("v").split(".", 1)[1]
    replaces = []
    for line in kubernetes_go_mod.splitlines():
        match = re.match(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/src/\1\s*$", line)
        if match:
            replaces.append(f"{match.group(1)} => {match.group(1)} {staging_version}")
    if not replaces:
        raise BuildError(
            "generate replace lines", "no staging replace lines in k8s.io/kubernetes go.mod"
        )
    return replaces


def godebug_line(go_mod: str) -> str | None:
    match = re.search(r"^godebug\s+.+$", go_mod, flags=re.MULTILINE)
    return match.group(0) if match else None


def go_directive(go_mod: str) -> str:
    match = re.search(r"^go\s+(\S+)$", go_mod, flags=re.MULTILINE)
    return match.group(1) if match else "1.26"


def kube_wrapper_go_mod(versions: Versions, kubernetes_go_mod: str) -> str:
    lines = [
        "module conveyor.local/sandbox/kube",
        "",
        f"go {go_directive(kubernetes_go_mod)}",
        "",
    ]
    if debug := godebug_line(kubernetes_go_mod):
        lines += [debug, ""]
    lines += [f"require k8s.io/kubernetes {versions.kubernetes}", "", "replace ("]
    lines += [f"\t{r}" for r in staging_replaces(kubernetes_go_mod, versions.kubernetes)]
    lines += [")", ""]
    return "\n".join(lines)


def _asset(name: str) -> str:
    return resources.files("conveyor.sandbox").joinpath("assets", name).read_text()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Two `sandbox up` at once must not build into the same directory."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def binaries_ready(bin_dir: Path, names: tuple[str, ...] = BINARIES) -> bool:
    return (bin_dir / ".complete").exists() and all((bin_dir / b).exists() for b in names)


BuildSteps = Callable[[GoBuilder, Path, Path], list[tuple[str, Callable[[], None]]]]


def _ensure_built(
    bin_dir: Path,
    *,
    toolchain: tuple[str, str],
    lock: Path,
    names: tuple[str, ...],
    steps: BuildSteps,
    record: dict[str, str],
    progress: Progress | None,
) -> Path:
    """Build what `steps` name into `bin_dir` unless it is complete: under `lock`, each
    binary once (an interrupted build resumes with the missing ones), and the
    `.complete` marker, holding `record`, last."""
    say = progress or (lambda _message: None)
    go, go_version = toolchain
    if binaries_ready(bin_dir, names):
        return bin_dir
    with _exclusive(lock):
        if binaries_ready(bin_dir, names):  # another process finished while we waited
            return bin_dir
        builder = GoBuilder(go=go, go_version=go_version, log_dir=bin_dir.parent / "logs")
        bin_dir.mkdir(parents=True, exist_ok=True)
        work = bin_dir.parent / "src"
        work.mkdir(parents=True, exist_ok=True)
        for name, build in steps(builder, work, bin_dir):
            if (bin_dir / name).exists():
                continue
            say(f"building {name} (first run only; cached in {bin_dir})")
            build()
        (bin_dir / ".complete").write_text(json.dumps({"go": go_version, **record}))
    return bin_dir


def ensure_binaries(versions: Versions, *, progress: Progress | None = None) -> Path:
    """Return the directory holding the sandbox binaries, building whatever is missing."""
    go, go_version = find_go()
    root = cache_root() / "sandbox"
    bin_dir = root / versions.cache_key(go_version) / "bin"

    def steps(
        builder: GoBuilder, work: Path, bin_dir: Path
    ) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("etcd", lambda: _build_etcd(builder, versions, work, bin_dir)),
            ("kwok", lambda: _build_kwok(builder, versions, work, bin_dir)),
            ("registry", lambda: _build_registry(builder, versions, work, bin_dir)),
            ("helm", lambda: _build_helm(builder, versions, work, bin_dir)),
            ("kube", lambda: _build_kube(builder, versions, work, bin_dir)),
        ]

    return _ensure_built(
        bin_dir,
        toolchain=(go, go_version),
        lock=root / "build.lock",
        names=BINARIES,
        steps=steps,
        record=vars(versions),
        progress=progress,
    )


def ensure_kustomize(versions: Versions, *, progress: Progress | None = None) -> Path:
    """A standalone kustomize beside the sandbox binaries, built on first use.

    Built from the Kubernetes wrapper module (its go.mod and go.sum, as the kube build
    left them), so that kustomize and every library it links are the versions this
    Kubernetes' `kubectl kustomize` runs: the same builds, at 21 MB against kubectl's 57
    (conveyor's image ships it instead of kubectl). Not one of BINARIES, whose list is
    in the cache key: adding it there would rebuild Kubernetes on every machine. With
    Go's build cache warm from the kube build, this is ~20 s."""
    bin_dir = ensure_binaries(versions, progress=progress)
    target = bin_dir / "kustomize"
    if target.exists():
        return target
    go, go_version = find_go()
    with _exclusive(bin_dir.parent.parent / "build.lock"):
        if target.exists():  # another process built it while we waited
            return target
        (progress or (lambda _message: None))(f"building kustomize (first run only; in {bin_dir})")
        builder = GoBuilder(go=go, go_version=go_version, log_dir=bin_dir.parent / "logs")
        # In a copy of the module: -mod=mod adds kustomize's command packages to go.sum,
        # and the kube build's own files stay as they were.
        with tempfile.TemporaryDirectory(prefix="kustomize-", dir=bin_dir.parent) as scratch:
            module = Path(scratch)
            for name in ("go.mod", "go.sum"):
                shutil.copy2(bin_dir.parent / "src" / "kube" / name, module / name)
            _build_into(
                builder,
                "kustomize: go build",
                [go, "build", "-trimpath", "-ldflags", "-s -w"],
                cwd=module,
                target=target,
                package=KUSTOMIZE_PACKAGE,
            )
    return target


def ensure_tools(
    versions: ToolVersions = TOOL_VERSIONS, *, progress: Progress | None = None
) -> Path:
    """Return the directory holding sops, age and age-keygen, building them on first use."""

    def steps(
        builder: GoBuilder, _work: Path, bin_dir: Path
    ) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("sops", lambda: _build_sops(builder, versions, bin_dir)),
            ("age", lambda: _build_age(builder, versions, "age", bin_dir)),
            ("age-keygen", lambda: _build_age(builder, versions, "age-keygen", bin_dir)),
        ]

    return _ensure_apart(versions, TOOLS, steps, progress)


def ensure_peer_tools(
    versions: PeerToolVersions = PEER_TOOL_VERSIONS, *, progress: Progress | None = None
) -> Path:
    """Return the directory holding kustomize and flux, building them on first use."""

    def steps(
        builder: GoBuilder, work: Path, bin_dir: Path
    ) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("kustomize", lambda: _build_kustomize(builder, versions, bin_dir)),
            ("flux", lambda: _build_flux(builder, versions, work, bin_dir)),
        ]

    return _ensure_apart(versions, PEER_TOOLS, steps, progress)


def _ensure_apart(
    versions: ToolVersions | PeerToolVersions,
    names: tuple[str, ...],
    steps: BuildSteps,
    progress: Progress | None,
) -> Path:
    """Tools cached beside the sandbox's binaries under a key of their own, with a lock
    of their own: building sops never waits for a Kubernetes build."""
    go, go_version = find_go()
    bin_dir = cache_root() / "sandbox" / versions.cache_key(go_version) / "bin"
    return _ensure_built(
        bin_dir,
        toolchain=(go, go_version),
        lock=bin_dir.parent / "build.lock",
        names=names,
        steps=steps,
        record=vars(versions),
        progress=progress,
    )


def _build_into(
    builder: GoBuilder,
    step: str,
    args: list[str],
    *,
    cwd: Path,
    target: Path,
    package: str | None = None,
) -> None:
    """Build to a temporary name and rename, so an interrupted build leaves no binary.
    `package`: what to build, if not the module's own main package."""
    partial = target.with_suffix(".partial")
    builder.run(step, [*args, "-o", str(partial), *([package] if package else [])], cwd=cwd)
    partial.replace(target)


def _wrapper_module(work: Path, name: str, go_mod: str, main_go: str) -> Path:
    module_dir = work / name
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / "go.mod").write_text(go_mod)
    (module_dir / "main.go").write_text(main_go)
    return module_dir


def _build_kube(builder: GoBuilder, versions: Versions, work: Path, bin_dir: Path) -> None:
    info = builder.module_info("k8s.io/kubernetes", versions.kubernetes, cwd=work)
    kubernetes_go_mod = Path(info["GoMod"]).read_text()
    module_dir = _wrapper_module(
        work, "kube", kube_wrapper_go_mod(versions, kubernetes_go_mod), _asset("kube_main.go")
    )
    builder.run("kube: go mod tidy", [builder.go, "mod", "tidy"], cwd=module_dir)
    _build_into(
        builder,
        "kube: go build (kube-apiserver, controller-manager, scheduler, kubectl)",
        [builder.go, "build", "-trimpath", "-ldflags", kube_ldflags(versions)],
        cwd=module_dir,
        target=bin_dir / "kube",
    )
    for command in KUBE_COMMANDS:
        link = bin_dir / command
        link.unlink(missing_ok=True)
        link.symlink_to("kube")


def _build_etcd(builder: GoBuilder, versions: Versions, work: Path, bin_dir: Path) -> None:
    go_mod = (
        "module conveyor.local/sandbox/etcd\n\ngo 1.24\n\n"
        f"require go.etcd.io/etcd/server/v3 {versions.etcd}\n"
    )
    module_dir = _wrapper_module(work, "etcd", go_mod, _asset("etcd_main.go"))
    builder.run("etcd: go mod tidy", [builder.go, "mod", "tidy"], cwd=module_dir)
    _build_into(
        builder,
        "etcd: go build",
        [builder.go, "build", "-trimpath", "-ldflags", "-s -w"],
        cwd=module_dir,
        target=bin_dir / "etcd",
    )


def command_name(package: str) -> str:
    """The binary `go install` makes of `package`: its last element, or the one before a
    major version suffix (sigs.k8s.io/kustomize/kustomize/v5 → kustomize)."""
    elements = package.split("/")
    if len(elements) > 1 and re.fullmatch(r"v[0-9]+", elements[-1]):
        return elements[-2]
    return elements[-1]


def _go_install(
    builder: GoBuilder, step: str, package: str, version: str, ldflags: str, target: Path
) -> None:
    """`go install pkg@version` into a scratch GOBIN, then move the binary into place."""
    with tempfile.TemporaryDirectory(dir=target.parent) as gobin:
        installer = GoBuilder(
            go=builder.go,
            go_version=builder.go_version,
            log_dir=builder.log_dir,
            extra_env={"GOBIN": gobin, "GOFLAGS": ""},
        )
        installer.run(
            step,
            [builder.go, "install", "-trimpath", "-ldflags", ldflags, f"{package}@{version}"],
            cwd=target.parent,
        )
        shutil.move(str(Path(gobin) / command_name(package)), target)


def _build_kwok(builder: GoBuilder, versions: Versions, work: Path, bin_dir: Path) -> None:
    info = builder.module_info("sigs.k8s.io/kwok", versions.kwok, cwd=work)
    stages = [(Path(info["Dir"]) / stage).read_text().strip() for stage in KWOK_STAGES]
    (bin_dir / "kwok-stages.yaml").write_text("\n---\n".join(stages) + "\n")
    _go_install(
        builder,
        "kwok: go install",
        "sigs.k8s.io/kwok/cmd/kwok",
        versions.kwok,
        f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={versions.kwok.lstrip('v')}",
        bin_dir / "kwok",
    )


def _build_registry(builder: GoBuilder, versions: Versions, work: Path, bin_dir: Path) -> None:
    _go_install(
        builder,
        "registry: go install",
        "github.com/distribution/distribution/v3/cmd/registry",
        versions.registry,
        f"-s -w -X github.com/distribution/distribution/v3/version.version={versions.registry}",
        bin_dir / "registry",
    )


def _build_helm(builder: GoBuilder, versions: Versions, work: Path, bin_dir: Path) -> None:
    _go_install(
        builder,
        "helm: go install",
        "helm.sh/helm/v3/cmd/helm",
        versions.helm,
        helm_ldflags(versions),
        bin_dir / "helm",
    )


def _build_sops(builder: GoBuilder, versions: ToolVersions, bin_dir: Path) -> None:
    _go_install(
        builder,
        "sops: go install",
        "github.com/getsops/sops/v3/cmd/sops",
        versions.sops,
        f"-s -w -X github.com/getsops/sops/v3/version.Version={versions.sops.lstrip('v')}",
        bin_dir / "sops",
    )


def _build_age(builder: GoBuilder, versions: ToolVersions, command: str, bin_dir: Path) -> None:
    _go_install(
        builder,
        f"{command}: go install",
        f"filippo.io/age/cmd/{command}",
        versions.age,
        f"-s -w -X main.Version={versions.age}",
        bin_dir / command,
    )


def _build_kustomize(builder: GoBuilder, versions: PeerToolVersions, bin_dir: Path) -> None:
    _go_install(
        builder,
        "kustomize: go install",
        "sigs.k8s.io/kustomize/kustomize/v5",
        versions.kustomize,
        "-s -w",
        bin_dir / "kustomize",
    )


def _build_flux(builder: GoBuilder, versions: PeerToolVersions, work: Path, bin_dir: Path) -> None:
    """The flux CLI, built in a writable copy of its module: `go install` refuses it (its
    go.mod has a replace directive), and cmd/flux embeds manifests that flux2's Makefile
    generates, absent from the module. Only `flux install` reads them; a placeholder
    stands in, so that `flux build` (what flux-local runs) is the released code."""
    info = builder.module_info("github.com/fluxcd/flux2/v2", versions.flux, cwd=work)
    source = work / f"flux2-{versions.flux}"
    if not source.exists():
        partial = source.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        # The module cache is read-only: copy the files without their modes.
        shutil.copytree(info["Dir"], partial, copy_function=shutil.copyfile)
        for folder, _subfolders, _files in os.walk(partial):
            os.chmod(folder, 0o700)
        manifests = partial / "cmd" / "flux" / "manifests"
        manifests.mkdir(exist_ok=True)
        (manifests / "placeholder.yaml").write_text("# flux install is not built here\n")
        partial.rename(source)
    version = versions.flux.lstrip("v")
    _build_into(
        builder,
        "flux: go build",
        [builder.go, "build", "-trimpath", "-ldflags", f"-s -w -X main.VERSION={version}"],
        cwd=source / "cmd" / "flux",
        target=bin_dir / "flux",
    )
