"""A small async Kubernetes client on httpx: discovery, get/list, server-side apply,
delete and watch.

conveyor applies thousands of objects per pass, so the client is async with one shared
connection pool, and it speaks only the JSON REST API it needs. Discovery is cached per
group-version and refreshed on a miss, so CRDs created mid-run are found.

Only the holder of an environment's Lease may write to its cluster, so a client can be
given a write guard: called before every write, it refuses (raises) once the lease is
lost and otherwise says how long the write may take; a write still in flight at that
deadline is cancelled, so it cannot land after the lease passed to another holder. The
User-Agent names the writing process, which the apiserver's audit log records.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from conveyor.causes import short_cause
from conveyor.cluster.kubeconfig import ClusterCredentials
from conveyor.cluster.objects import Obj
from conveyor.errors import ConveyorError, LocatedError

RETRIES = 5
TOKEN_REFRESH_SECONDS = 60.0
# Called before each write: the seconds the write may take, or raises (not the writer).
WriteGuard = Callable[[], float]


class ApiError(ConveyorError, RuntimeError):
    """The apiserver answered with a Status failure."""

    def __init__(self, status: int, reason: str, message: str, *, body: Obj | None = None) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}
        super().__init__(f"HTTP {status} {reason}: {message}")

    @property
    def cause(self) -> str:
        """What the server refused, in one line: the Status's causes by field
        (`spec.replicas: ...`), values it quotes whole left out (conveyor.causes)."""
        details = self.body.get("details")
        causes = details.get("causes") if isinstance(details, dict) else None
        parts = []
        for cause in causes if isinstance(causes, list) else []:
            if not isinstance(cause, dict) or not cause.get("message"):
                continue
            message, where = str(cause["message"]), str(cause.get("field") or "")
            parts.append(f"{where}: {message}" if where and where not in message else message)
        return short_cause("; ".join(parts) if parts else self.message)

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def forbidden(self) -> bool:
        """RBAC refused the request (the token is fine, its permissions are not)."""
        return self.status == 403


class UnknownKindError(LocatedError, RuntimeError):
    """The cluster serves no such kind; `file` and `line` name the object's document
    once the caller that rendered it knows them (`at`)."""

    def __init__(
        self, api_version: str, kind: str, *, file: str | None = None, line: int | None = None
    ) -> None:
        self.api_version = api_version
        self.kind = kind
        message = f"the cluster does not serve kind {kind} in {api_version}"
        super().__init__(message, file=file, line=line)

    def at(self, file: str, line: int | None) -> UnknownKindError:
        return UnknownKindError(self.api_version, self.kind, file=file, line=line)


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, *, namespace: str | None = None, name: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        return "/".join(parts)


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    raise ApiError(
        response.status_code,
        str(body.get("reason") or response.reason_phrase),
        str(body.get("message") or response.text[:500]),
        body=body,
    )


class BearerToken(httpx.Auth):
    """The bearer token of a kubeconfig user or of a Pod's service account.

    A token file is read again once a minute, and at once when the apiserver answers 401
    (the request is then sent once more with the new token): the kubelet rotates a bound
    service-account token in place, well before the old one expires, as client-go expects.
    """

    def __init__(
        self,
        credentials: ClusterCredentials,
        *,
        refresh_every: float = TOKEN_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._file = Path(credentials.token_file) if credentials.token_file else None
        self._token = credentials.token or ""
        self._refresh_every = refresh_every
        self._clock = clock
        self._read_at = -math.inf
        self._reread()

    def _reread(self) -> bool:
        """Read the file again; True if the token changed. A file caught mid-rotation
        (missing, empty) keeps the token we had: the apiserver is the judge of it."""
        if self._file is None:
            return False
        self._read_at = self._clock()
        try:
            token = self._file.read_text().strip()
        except OSError:
            return False
        changed = bool(token) and token != self._token
        if changed:
            self._token = token
        return changed

    def token(self) -> str:
        if self._file is not None and self._clock() - self._read_at >= self._refresh_every:
            self._reread()
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        response = yield request
        if response.status_code == 401 and self._reread():
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request


class KubeClient:
    def __init__(
        self,
        credentials: ClusterCredentials,
        *,
        timeout: float = 30.0,
        max_connections: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the wire for both clients (a fake in unit tests)."""
        self.credentials = credentials
        headers = {"Accept": "application/json", "User-Agent": "conveyor"}
        auth = BearerToken(credentials) if credentials.token or credentials.token_file else None
        ssl_context = credentials.ssl_context()
        self._http = httpx.AsyncClient(
            base_url=credentials.server,
            verify=ssl_context,
            headers=headers,
            auth=auth,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        # httpcore looks at every connection of its pool, and at every queued request,
        # each time a request starts or ends: with long-lived watch streams in the pool and
        # hundreds of requests queued, that bookkeeping took a quarter of the agent's CPU
        # (py-spy, 1000 apps). So watches get a client of their own, and requests wait
        # here, not in httpcore's queue.
        self._watch_http = httpx.AsyncClient(
            base_url=credentials.server,
            verify=ssl_context,
            headers=headers,
            auth=auth,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            transport=transport,
        )
        self._in_flight = asyncio.Semaphore(max_connections)
        self._resources: dict[str, dict[str, Resource]] = {}
        self._discovery_lock = asyncio.Lock()
        self.writes = 0  # API writes made by this client: the "no-op costs nothing" check
        self.write_guard: WriteGuard | None = None

    def identify(self, identity: str) -> None:
        """Name this process in the User-Agent of every request (watches included), so the
        apiserver's audit log tells one writer from another."""
        user_agent = f"conveyor/{identity}"
        self._http.headers["User-Agent"] = user_agent
        self._watch_http.headers["User-Agent"] = user_agent

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._watch_http.aclose()

    # -- raw requests -------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Obj:
        headers = {"Content-Type": content_type} if content_type else None
        writes = method not in ("GET", "HEAD") and not (params and "dryRun" in params)
        if writes:
            self._write_deadline()  # refused before it counts (or waits for a slot)
            self.writes += 1
        for attempt in range(RETRIES):
            try:
                async with self._in_flight:
                    deadline = self._write_deadline() if writes else None
                    try:
                        async with asyncio.timeout(deadline):
                            response = await self._http.request(
                                method,
                                path,
                                params=params,
                                json=json_body,
                                content=content,
                                headers=headers,
                            )
                    except TimeoutError:
                        self._write_deadline()  # raises the guard's own error: lease gone
                        raise
            except httpx.TransportError:
                # Reads are safe to repeat; a write may have landed, so let callers decide.
                if method != "GET" or attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            # 429: the apiserver asks us to come back (priority and fairness, or a CRD's
            # storage still initialising). Honour Retry-After, briefly.
            if response.status_code == 429 and attempt < RETRIES - 1:
                await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 2.0))
                continue
            break
        _raise_for_status(response)
        return response.json() if response.content else {}

    async def ping(self, *, timeout: float) -> None:
        """One GET /version within `timeout`, never retried: is the apiserver answering
        now? Raises httpx.HTTPError (or ApiError) when not."""
        response = await self._http.get("/version", timeout=timeout)
        _raise_for_status(response)

    def _write_deadline(self) -> float | None:
        """The guard's verdict, checked when the write is about to be sent (after any
        wait for a connection slot): None when unguarded, else the seconds it may take."""
        return None if self.write_guard is None else self.write_guard()

    # -- discovery ------------------------------------------------------------------

    async def resource(self, api_version: str, kind: str) -> Resource:
        known = self._resources.get(api_version)
        if known is None or kind not in known:
            async with self._discovery_lock:
                # Asked again under the lock: the thousand tasks of a pass that queued
                # here while the first one discovered the group find it known (each used
                # to send a discovery GET of its own, in turn: 17% of a 2,000-app pass).
                known = self._resources.get(api_version)
                if known is None or kind not in known:
                    known = await self._discover(api_version)
        if kind not in known:
            raise UnknownKindError(api_version, kind)
        return known[kind]

    async def _discover(self, api_version: str) -> dict[str, Resource]:
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        response = await self._http.get(path)
        if response.status_code == 404:
            self._resources[api_version] = {}
            return {}
        _raise_for_status(response)
        found: dict[str, Resource] = {}
        for item in response.json().get("resources", []):
            if "/" in item["name"]:  # subresources such as deployments/status
                continue
            found[item["kind"]] = Resource(
                api_version, item["kind"], item["name"], bool(item["namespaced"])
            )
        self._resources[api_version] = found
        return found

    def forget_discovery(self) -> None:
        self._resources.clear()

    # -- objects --------------------------------------------------------------------

    async def get(
        self, api_version: str, kind: str, name: str, *, namespace: str | None = None
    ) -> Obj | None:
        res = await self.resource(api_version, kind)
        try:
            return await self.request("GET", res.path(namespace=namespace, name=name))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def list(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[Obj]:
        items, _ = await self.list_with_version(
            api_version, kind, namespace=namespace, label_selector=label_selector
        )
        return items

    async def list_with_version(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> tuple[builtins.list[Obj], str]:
        """Items and the list's resourceVersion, from which a watch can continue."""
        res = await self.resource(api_version, kind)
        params = {"labelSelector": label_selector} if label_selector else {}
        body = await self.request("GET", res.path(namespace=namespace), params=params)
        items: builtins.list[Obj] = body.get("items", [])
        for item in items:  # list items carry no apiVersion/kind; restore them
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items, str(body.get("metadata", {}).get("resourceVersion", ""))

    async def apply(
        self,
        obj: Obj,
        *,
        field_manager: str,
        force: bool = False,
        dry_run: bool = False,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Obj:
        """Server-side apply (PATCH application/apply-patch+yaml; JSON is valid YAML)."""
        res = await self.resource(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata", {})
        ns = meta.get("namespace") or namespace
        if res.namespaced and not ns:
            ns = "default"
        path = res.path(namespace=ns, name=meta["name"])
        if subresource:
            path += f"/{subresource}"
        params = {"fieldManager": field_manager}
        if force:
            params["force"] = "true"
        if dry_run:
            params["dryRun"] = "All"
        return await self.request(
            "PATCH",
            path,
            params=params,
            content=json.dumps(obj).encode(),
            content_type="application/apply-patch+yaml",
        )

    async def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        *,
        namespace: str | None = None,
        propagation: str = "Background",
        uid: str | None = None,
    ) -> bool:
        """Delete one object (only the one with `uid`, when given: not a namesake that
        replaced it since it was read). False if it was not there."""
        res = await self.resource(api_version, kind)
        options: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": propagation,
        }
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request(
                "DELETE", res.path(namespace=namespace, name=name), json_body=options
            )
        except ApiError as error:
            if error.not_found:
                return False
            raise
        return True

    async def watch(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        resource_version: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[Obj]:
        """Yield watch events ({"type", "object"}) until the server ends the stream."""
        res = await self.resource(api_version, kind)
        params = {
            "watch": "true",
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if resource_version:
            params["resourceVersion"] = resource_version
        async with self._watch_http.stream(
            "GET",
            res.path(namespace=namespace),
            params=params,
            timeout=httpx.Timeout(timeout_seconds + 10, connect=10),
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for_status(response)
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)
