"""Read a kubeconfig: which server, which CA, which credentials, for a context.

Only what conveyor needs (client certificates, bearer tokens, CA files or inline
data), so that the client can be plain httpx without the heavy official library.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class KubeconfigError(RuntimeError):
    pass


@dataclass(frozen=True)
class ClusterCredentials:
    server: str
    context: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    insecure: bool = False
    namespace: str = "default"

    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def default_path() -> Path:
    first = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return Path(first) if first else Path.home() / ".kube" / "config"


def _named(entries: list[dict[str, Any]], name: str, what: str, path: Path) -> dict[str, Any]:
    for entry in entries or []:
        if entry.get("name") == name:
            return dict(entry.get(what) or {})
    raise KubeconfigError(f"{path}: no {what} named {name!r}")


def _materialize(data_b64: str | None, file: str | None, base: Path) -> str | None:
    """Inline `*-data` fields become private temp files, since ssl wants paths."""
    if data_b64:
        handle = tempfile.NamedTemporaryFile(prefix="conveyor-kube-", delete=False)
        handle.write(base64.b64decode(data_b64))
        handle.close()
        os.chmod(handle.name, 0o600)
        return handle.name
    if file:
        return str((base / file) if not os.path.isabs(file) else Path(file))
    return None


def load(path: Path | str | None = None, *, context: str | None = None) -> ClusterCredentials:
    config_path = Path(path) if path else default_path()
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except FileNotFoundError:
        raise KubeconfigError(f"kubeconfig {config_path} does not exist") from None
    except yaml.YAMLError as error:
        raise KubeconfigError(f"kubeconfig {config_path} is not valid YAML: {error}") from None
    context_name = context or config.get("current-context")
    if not context_name:
        raise KubeconfigError(f"{config_path}: no context given and no current-context set")
    ctx = _named(config.get("contexts", []), context_name, "context", config_path)
    cluster = _named(config.get("clusters", []), ctx.get("cluster", ""), "cluster", config_path)
    user = _named(config.get("users", []), ctx.get("user", ""), "user", config_path)
    base = config_path.parent
    return ClusterCredentials(
        server=str(cluster["server"]).rstrip("/"),
        context=context_name,
        ca_file=_materialize(
            cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), base
        ),
        cert_file=_materialize(
            user.get("client-certificate-data"), user.get("client-certificate"), base
        ),
        key_file=_materialize(user.get("client-key-data"), user.get("client-key"), base),
        token=user.get("token"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=ctx.get("namespace") or "default",
    )
