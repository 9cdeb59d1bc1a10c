"""Where one sandbox's certificates are: a CA, the apiserver's serving cert, an admin
client, the service-account signing key. Every sandbox gets its own CA so that
kubeconfigs of two sandboxes can never be mixed up.

The paths alone, without `cryptography`: the sandbox's components and its state are
read by code that never makes a certificate (sandbox/certificates.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    service_account_key: Path
    service_account_pub: Path

    @classmethod
    def at(cls, directory: Path) -> Pki:
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            server_cert=directory / "apiserver.crt",
            server_key=directory / "apiserver.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            service_account_key=directory / "sa.key",
            service_account_pub=directory / "sa.pub",
        )

    def exists(self) -> bool:
        return all(Path(p).exists() for p in vars(self).values())
