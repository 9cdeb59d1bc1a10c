"""A client for the OCI distribution API: list tags, check manifests, read build times.

What image automation needs from a registry and nothing more, built for many repositories
at once: one connection pool, a semaphore bounding requests in flight, retries with
backoff on connection errors and 5xx, bearer tokens cached per scope. Registries on
loopback (and hosts marked insecure) are reached over http, all others over https.
Errors say which registry and what went wrong; they never contain credentials.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from conveyor import __version__
from conveyor.errors import ConveyorError
from conveyor.images.credentials import Credentials, CredentialSource
from conveyor.images.reference import ImageName, is_loopback

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_INDEX_TYPES = frozenset(MANIFEST_TYPES[2:])
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_AUTH_ITEM = re.compile(
    r'[\s,]*(?:(?P<key>[A-Za-z0-9_-]+)\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,\s]*)'
    r"|(?P<scheme>[A-Za-z][A-Za-z0-9._~+/-]*))"
)
_FRACTION = re.compile(r"(\.\d{6})\d+")


class RegistryError(ConveyorError, RuntimeError):
    """A registry could not answer a question; `host` says which one."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"registry {host}: {message}")


class RegistryUnavailable(RegistryError):
    """Connection refused, timed out, or 5xx on every attempt."""


class RegistryProtocolError(RegistryError):
    """An answer that is not what the distribution API specifies (e.g. not JSON)."""


class RegistryAuthError(RegistryError):
    """401/403: no credentials, or the registry rejected them."""


class RepositoryNotFound(RegistryError):
    """404 for the repository: it does not exist in that registry (or is hidden)."""


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: `Bearer realm="...",service="...",scope="..."`."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges of a `WWW-Authenticate` header, in order (RFC 7235 auth-params)."""
    parsed: list[tuple[str, dict[str, str]]] = []
    for match in _AUTH_ITEM.finditer(header):
        if match["scheme"]:
            parsed.append((match["scheme"].lower(), {}))
        elif parsed:
            value = match["value"]
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            parsed[-1][1][match["key"].lower()] = value
    return [Challenge(scheme, params) for scheme, params in parsed]


@dataclass(frozen=True)
class Backoff:
    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 4.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311


@dataclass(frozen=True)
class RegistrySettings:
    concurrency: int = 16
    timeout: float = 10.0
    page_size: int = 1000
    backoff: Backoff = Backoff()
    insecure: frozenset[str] = frozenset()

    def scheme(self, host: str) -> str:
        return "http" if is_loopback(host) or host in self.insecure else "https"


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


class _NoCredentials:
    def for_host(self, host: str) -> Credentials | None:
        return None


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:80] + ("..." if len(text) > 80 else "")


def _json(response: httpx.Response, host: str, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise RegistryProtocolError(
            host, f"{what}: answer is not JSON ({kind}): {_snippet(response)!r}"
        ) from None


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", text.replace("Z", "+00:00")))
    except ValueError:
        return None


class RegistryClient:
    """Use as `async with RegistryClient(...) as registry:`; safe for concurrent calls."""

    def __init__(
        self,
        *,
        credentials: CredentialSource | None = None,
        settings: RegistrySettings | None = None,
    ) -> None:
        self.settings = settings or RegistrySettings()
        self.requests = 0
        self._credentials = credentials or _NoCredentials()
        self._limit = asyncio.Semaphore(self.settings.concurrency)
        self._http = httpx.AsyncClient(
            timeout=self.settings.timeout,
            follow_redirects=True,
            headers={"User-Agent": f"conveyor/{__version__}"},
            limits=httpx.Limits(
                max_connections=self.settings.concurrency,
                max_keepalive_connections=self.settings.concurrency,
            ),
        )
        self._challenges: dict[str, Challenge] = {}
        self._authorization: dict[tuple[str, str], str] = {}
        self._auth_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._configs: dict[tuple[str, str], datetime | None] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self._http.aclose()

    # -- the questions ----------------------------------------------------------

    async def list_tags(self, name: ImageName) -> list[str]:
        """Every tag of the repository, following `Link` pagination."""
        url: str | None = self._url(name.host, f"/v2/{name.path}/tags/list")
        params: dict[str, str] | None = {"n": str(self.settings.page_size)}
        tags: list[str] = []
        seen: set[str] = set()
        while url is not None:
            response = await self._request("GET", name, url, params=params)
            what = f"tags of {name.path}"
            if response.status_code == 404:
                raise RepositoryNotFound(name.host, f"no repository {name.path!r}")
            self._expect_ok(response, name, what)
            body = _json(response, name.host, what)
            page = body.get("tags") if isinstance(body, dict) else None
            if page is None and isinstance(body, dict) and "tags" in body:
                page = []  # an empty repository answers `"tags": null`
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryProtocolError(
                    name.host, f"{what}: expected {{'tags': [...]}}, got {_snippet(response)!r}"
                )
            tags.extend(page)
            url, params = self._next_page(response), None
            if url in seen:
                raise RegistryProtocolError(name.host, f"{what}: pagination loops at {url}")
            if url is not None:
                seen.add(url)
        return tags

    async def has_manifest(self, name: ImageName, reference: str) -> bool:
        """Whether a tag (or digest) exists: HEAD, falling back to GET where HEAD is refused."""
        url = self._url(name.host, f"/v2/{name.path}/manifests/{reference}")
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        response = await self._request("HEAD", name, url, headers=headers)
        if response.status_code in (405, 501):
            response = await self._request("GET", name, url, headers=headers)
        if response.status_code == 404:
            return False
        self._expect_ok(response, name, f"manifest {name.path}:{reference}")
        return True

    async def built_at(self, name: ImageName, tag: str) -> datetime | None:
        """The `created` time in the image config (linux/amd64 for multi-platform images);
        None when the image does not record one."""
        manifest = await self._manifest(name, tag)
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            entries = [m for m in manifest.get("manifests") or [] if isinstance(m, dict)]
            if not entries:
                return None
            chosen = next(
                (
                    m
                    for m in entries
                    if (m.get("platform") or {}).get("os") == "linux"
                    and (m.get("platform") or {}).get("architecture") == "amd64"
                ),
                entries[0],
            )
            manifest = await self._manifest(name, str(chosen.get("digest")))
        config = manifest.get("config")
        digest = config.get("digest") if isinstance(config, dict) else None
        if not isinstance(digest, str):
            return None
        key = (name.host, digest)
        if key not in self._configs:
            url = self._url(name.host, f"/v2/{name.path}/blobs/{digest}")
            response = await self._request("GET", name, url)
            self._expect_ok(response, name, f"config of {name.path}:{tag}")
            body = _json(response, name.host, f"config of {name.path}:{tag}")
            self._configs[key] = _parse_time(
                body.get("created") if isinstance(body, dict) else None
            )
        return self._configs[key]

    # -- plumbing ----------------------------------------------------------------

    def _url(self, host: str, path: str) -> str:
        return f"{self.settings.scheme(host)}://{host}{path}"

    def _next_page(self, response: httpx.Response) -> str | None:
        match = _LINK_NEXT.search(response.headers.get("link", ""))
        if not match:
            return None
        return str(response.url.join(match.group(1)))

    async def _manifest(self, name: ImageName, reference: str) -> dict[str, Any]:
        url = self._url(name.host, f"/v2/{name.path}/manifests/{reference}")
        response = await self._request(
            "GET", name, url, headers={"Accept": ", ".join(MANIFEST_TYPES)}
        )
        what = f"manifest {name.path}:{reference}"
        if response.status_code == 404:
            raise RepositoryNotFound(name.host, f"no manifest {name.path}:{reference}")
        self._expect_ok(response, name, what)
        body = _json(response, name.host, what)
        if not isinstance(body, dict):
            raise RegistryProtocolError(name.host, f"{what}: not a manifest object")
        return body

    def _expect_ok(self, response: httpx.Response, name: ImageName, what: str) -> None:
        status = response.status_code
        if status in (401, 403):
            has = self._credentials.for_host(name.host) is not None
            reason = "credentials were rejected" if has else "no credentials configured"
            raise RegistryAuthError(name.host, f"{what}: access denied ({status}); {reason}")
        if status >= 400:
            raise RegistryProtocolError(
                name.host, f"{what}: unexpected status {status}: {_snippet(response)!r}"
            )

    async def _request(
        self,
        method: str,
        name: ImageName,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One API call with authorization, retries on transport errors and 5xx, and one
        re-authorization when a 401 shows a token expired or a new scope is needed."""
        scope = f"repository:{name.path}:pull"
        backoff = self.settings.backoff
        reauthorized = False
        problem = ""
        attempt = 0
        while attempt < backoff.attempts:
            request_headers = dict(headers or {})
            authorization = await self._authorization_for(name.host, scope)
            if authorization:
                request_headers["Authorization"] = authorization
            try:
                async with self._limit:
                    self.requests += 1
                    response = await self._http.request(
                        method, url, headers=request_headers, params=params
                    )
            except httpx.TransportError as error:
                problem = f"unreachable ({type(error).__name__}: {error or 'no detail'})"
            else:
                if response.status_code == 401 and not reauthorized:
                    reauthorized = True
                    if self._learn_challenge(name.host, response, scope):
                        continue
                    return response
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"answered {response.status_code} {response.reason_phrase}"
            attempt += 1
            if attempt < backoff.attempts:
                await asyncio.sleep(backoff.delay(attempt))
        raise RegistryUnavailable(name.host, f"{problem} after {backoff.attempts} attempts")

    def _learn_challenge(self, host: str, response: httpx.Response, scope: str) -> bool:
        """Remember how the registry wants us to authenticate; True if retrying can help."""
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        by_scheme = {c.scheme: c for c in challenges}
        challenge = by_scheme.get("bearer") or by_scheme.get("basic")
        if challenge is None:
            return False
        if challenge.scheme == "basic" and self._credentials.for_host(host) is None:
            return False
        self._challenges[host] = challenge
        self._authorization.pop((host, scope), None)
        self._authorization.pop((host, ""), None)
        return True

    async def _authorization_for(self, host: str, scope: str) -> str | None:
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        key = (host, scope if challenge.scheme == "bearer" else "")
        if key in self._authorization:
            return self._authorization[key]
        lock = self._auth_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._authorization:
                self._authorization[key] = await self._authorize(host, challenge, scope)
            return self._authorization[key]

    async def _authorize(self, host: str, challenge: Challenge, scope: str) -> str:
        credentials = self._credentials.for_host(host)
        if challenge.scheme == "basic":
            if credentials is None:
                raise RegistryAuthError(host, "basic authentication required; no credentials")
            return _basic(credentials)
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("http://", "https://")):
            raise RegistryAuthError(host, f"bearer challenge without a usable realm ({realm!r})")
        params = {"scope": scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        auth = httpx.BasicAuth(credentials.username, credentials.password) if credentials else None
        try:
            async with self._limit:
                self.requests += 1
                response = await self._http.get(realm, params=params, auth=auth)
        except httpx.TransportError as error:
            raise RegistryUnavailable(
                host, f"token service {httpx.URL(realm).host} unreachable ({type(error).__name__})"
            ) from None
        if response.status_code in (401, 403):
            reason = "credentials were rejected" if credentials else "no credentials configured"
            raise RegistryAuthError(
                host, f"token service refused {scope} ({response.status_code}); {reason}"
            )
        if response.status_code >= 400:
            raise RegistryAuthError(
                host, f"token service answered {response.status_code} for {scope}"
            )
        body = _json(response, host, "token service")
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryProtocolError(host, "token service answered without a token")
        return f"Bearer {token}"
