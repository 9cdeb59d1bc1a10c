"""Find the cluster and its credentials: a kubeconfig, or the Pod's service account.

Only what conveyor needs (client certificates, bearer tokens and token files, CA files
or inline data), so that the client can be plain httpx without the heavy official
library. `$KUBECONFIG` may list several files, merged as kubectl merges them; helm is
handed that same merged view as one file (`for_tools`), since its `--kubeconfig` takes
one path. Inside a Pod (`KUBERNETES_SERVICE_HOST` set, no kubeconfig named) the
service account's token and CA are used, and the token is re-read as it rotates.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from conveyor.errors import ConveyorError

# Where the kubelet mounts a Pod's service account (token, ca.crt, namespace).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER = "in-cluster"
_SECTIONS = ("clusters", "users", "contexts")
# kubeconfig fields that name files, resolved against the file that holds them.
_PATH_FIELDS = {
    "clusters": ("certificate-authority",),
    "users": ("client-certificate", "client-key", "tokenFile"),
}


class KubeconfigError(ConveyorError, RuntimeError):
    pass


@dataclass(frozen=True)
class ClusterCredentials:
    server: str
    context: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    # A token to read from this file, and to read again as it rotates (bound tokens).
    token_file: str | None = None
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


def env_paths() -> list[Path]:
    """The files `$KUBECONFIG` lists (kubectl's convention: `a:b`, empty parts ignored)."""
    listed = os.environ.get("KUBECONFIG", "").split(os.pathsep)
    return [Path(entry) for entry in listed if entry]


def default_path() -> Path:
    """The first kubeconfig file kubectl would read: where it writes new contexts."""
    listed = env_paths()
    return listed[0] if listed else Path.home() / ".kube" / "config"


def in_cluster_wanted() -> bool:
    """Inside a Pod and no kubeconfig named: the service account, as client-go does."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not env_paths()


def _read(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise KubeconfigError(f"kubeconfig {path} does not exist") from None
    except OSError as error:
        raise KubeconfigError(f"kubeconfig {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise KubeconfigError(f"kubeconfig {path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a mapping")
    return config


def _absolute_paths(section: str, entry: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a named entry whose file fields no longer depend on where it was read."""
    inner = dict(entry.get(section[:-1]) or {})
    for field in _PATH_FIELDS.get(section, ()):
        value = inner.get(field)
        if value and not os.path.isabs(value):
            inner[field] = str(base / value)
    return {**entry, section[:-1]: inner}


def merge(paths: list[Path]) -> dict[str, Any]:
    """kubectl's merge: of each cluster, user and context name the first file to define
    it wins; current-context is the first file's that sets one. A listed file that does
    not exist is skipped, as kubectl skips it; none existing at all is an error."""
    merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config"}
    sections: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in _SECTIONS}
    found = False
    for path in paths:
        if len(paths) > 1 and not path.exists():
            continue
        config = _read(path)
        found = True
        if not merged.get("current-context") and config.get("current-context"):
            merged["current-context"] = config["current-context"]
        for section in _SECTIONS:
            for entry in config.get(section) or []:
                name = entry.get("name") if isinstance(entry, dict) else None
                if name and name not in sections[section]:
                    sections[section][name] = _absolute_paths(section, entry, path.parent)
    if not found:
        listed = os.pathsep.join(str(p) for p in paths)
        raise KubeconfigError(f"kubeconfig {listed}: none of these files exists")
    for section in _SECTIONS:
        merged[section] = list(sections[section].values())
    return merged


def _named(config: dict[str, Any], section: str, name: str, where: str) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if entry.get("name") == name:
            return dict(entry.get(section[:-1]) or {})
    raise KubeconfigError(f"{where}: no {section[:-1]} named {name!r}")


def _materialize(data_b64: str | None, file: str | None) -> str | None:
    """Inline `*-data` fields become private temp files, since ssl wants paths."""
    if data_b64:
        handle = tempfile.NamedTemporaryFile(prefix="conveyor-kube-", delete=False)
        handle.write(base64.b64decode(data_b64))
        handle.close()
        os.chmod(handle.name, 0o600)
        return handle.name
    return file or None


def load(path: Path | str | None = None, *, context: str | None = None) -> ClusterCredentials:
    """Credentials for `context` (default: the current one) from `path`, else from the
    files `$KUBECONFIG` lists, else the service account inside a Pod (where `context`,
    which names an entry of people's kubeconfigs, does not apply), else ~/.kube/config."""
    if path is None and in_cluster_wanted():
        return in_cluster()
    paths = [Path(path)] if path else env_paths() or [default_path()]
    where = os.pathsep.join(str(p) for p in paths)
    config = merge(paths)
    context_name = context or config.get("current-context")
    if not context_name:
        raise KubeconfigError(f"{where}: no context given and no current-context set")
    ctx = _named(config, "contexts", context_name, where)
    cluster = _named(config, "clusters", ctx.get("cluster", ""), where)
    user = _named(config, "users", ctx.get("user", ""), where)
    if "server" not in cluster:
        raise KubeconfigError(f"{where}: cluster {ctx.get('cluster')!r} names no server")
    return ClusterCredentials(
        server=str(cluster["server"]).rstrip("/"),
        context=context_name,
        ca_file=_materialize(
            cluster.get("certificate-authority-data"), cluster.get("certificate-authority")
        ),
        cert_file=_materialize(user.get("client-certificate-data"), user.get("client-certificate")),
        key_file=_materialize(user.get("client-key-data"), user.get("client-key")),
        token=user.get("token"),
        token_file=user.get("tokenFile"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=ctx.get("namespace") or "default",
    )


def in_cluster(*, account_dir: Path = SERVICE_ACCOUNT_DIR) -> ClusterCredentials:
    """The Pod's own service account, as client-go's rest.InClusterConfig reads it."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeconfigError("KUBERNETES_SERVICE_HOST is not set: not inside a Pod")
    token_file = account_dir / "token"
    if not token_file.is_file():
        raise KubeconfigError(f"in-cluster: no service account token at {token_file}")
    ca_file = account_dir / "ca.crt"
    namespace_file = account_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else ""
    return ClusterCredentials(
        server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
        context=IN_CLUSTER,
        ca_file=str(ca_file) if ca_file.is_file() else None,
        token_file=str(token_file),
        namespace=namespace or "default",
    )


def for_tools(path: Path | str | None = None) -> str | None:
    """The one kubeconfig file to hand helm (`--kubeconfig` takes a single path): `path`
    itself, the only file `$KUBECONFIG` lists, or the merge of all it lists, written to
    a private file. None leaves helm to its own defaults (in-cluster, ~/.kube/config)."""
    if path:
        return str(path)
    paths = env_paths()
    if len(paths) <= 1:
        return str(paths[0]) if paths else None
    text = yaml.safe_dump(merge(paths), sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest not in _merged_files:
        # A private directory of this process (mkdtemp: 0700), so the credentials stay
        # private and no other user can plant a file under a name we would trust.
        fd, merged = tempfile.mkstemp(prefix="kubeconfig-", dir=_private_dir())
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        _merged_files[digest] = merged
    return _merged_files[digest]


_merged_files: dict[str, str] = {}


@functools.cache
def _private_dir() -> str:
    return tempfile.mkdtemp(prefix="conveyor-kubeconfig-")
