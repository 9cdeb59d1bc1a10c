"""Registry credentials from the Docker client configuration, the file CI already has.

`$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`): `auths.<host>.auth` (base64
`user:password`) or `username`/`password`, and `credHelpers`/`credsStore` through the
`docker-credential-<helper>` programs (ECR, GCR, ...). Passwords never reach `repr`,
logs or error messages. A helper is a bare program name, checked when the file is read:
`credHelpers: {host: ../../tmp/x}` must not run `docker-credential-../../tmp/x`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from conveyor.config.names import UnsafeValueError, credential_helper
from conveyor.errors import ConveyorError
from conveyor.images.reference import DOCKER_HUB_API

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


class CredentialSource(Protocol):
    def for_host(self, host: str) -> Credentials | None: ...


class CredentialsError(ConveyorError, ValueError):
    """The Docker config exists but cannot be read; names the file, never a secret."""


def _host_of(key: str) -> str:
    """`https://index.docker.io/v1/` -> `index.docker.io`; `host:5000` stays."""
    bare = key.split("://", 1)[-1]
    return bare.split("/", 1)[0].lower()


def _decode(entry: Mapping[str, Any]) -> Credentials | None:
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, separator, password = decoded.partition(":")
        return Credentials(username, password) if separator else None
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    return None


@dataclass(frozen=True)
class DockerConfig:
    auths: Mapping[str, Credentials] = field(default_factory=dict, repr=False)
    helpers: Mapping[str, str] = field(default_factory=dict)
    store: str | None = None

    @classmethod
    def load(
        cls, path: Path | None = None, *, env: Mapping[str, str] | None = None
    ) -> DockerConfig:
        environ = os.environ if env is None else env
        if path is None:
            folder = environ.get("DOCKER_CONFIG")
            path = Path(folder) / "config.json" if folder else Path.home() / ".docker/config.json"
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CredentialsError(
                f"{path}: not a readable Docker config ({type(error).__name__})"
            ) from None
        if not isinstance(raw, dict):
            raise CredentialsError(f"{path}: not a readable Docker config (not an object)")
        auths = {}
        for key, entry in (raw.get("auths") or {}).items():
            credentials = _decode(entry) if isinstance(entry, dict) else None
            if credentials:
                auths[_host_of(key)] = credentials
        try:
            helpers = {
                _host_of(k): credential_helper(v, what=f"credHelpers.{k}")
                for k, v in (raw.get("credHelpers") or {}).items()
            }
            store = raw.get("credsStore")
            if store:
                credential_helper(store, what="credsStore")
        except UnsafeValueError as error:
            raise CredentialsError(f"{path}: {error}") from None
        return cls(auths, helpers, str(store) if store else None)

    def for_host(self, host: str) -> Credentials | None:
        keys = [host.lower()]
        if host == DOCKER_HUB_API:
            keys += [_host_of(k) for k in _DOCKER_HUB_KEYS]
        for key in keys:
            if key in self.auths:
                return self.auths[key]
        for key in keys:
            helper = self.helpers.get(key) or self.store
            if helper:
                server = _DOCKER_HUB_KEYS[0] if host == DOCKER_HUB_API else host
                return _from_helper(helper, server)
        return None


def _from_helper(helper: str, server: str) -> Credentials | None:
    """`docker-credential-<helper> get`; a missing helper or an unknown server gives None."""
    try:
        result = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not answer.get("Username") or not answer.get("Secret"):
        return None
    return Credentials(str(answer["Username"]), str(answer["Secret"]))
