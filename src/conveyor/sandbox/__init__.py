"""A real Kubernetes control plane on loopback, without Docker.

The sandbox is both a product feature (try conveyor locally, run it in CI) and the
ground every cluster test stands on. Binaries are built from the Go module proxy once
into a cache keyed by their versions; each named sandbox then runs its own etcd,
kube-apiserver, controller-manager, scheduler, kwok and OCI registry on free ports.
"""

from conveyor.sandbox.manager import Sandbox, SandboxError
from conveyor.sandbox.versions import VERSIONS, Versions

__all__ = ["VERSIONS", "Sandbox", "SandboxError", "Versions"]
