"""The registry client against small loopback HTTP servers: pagination, token and basic
auth, retries, bounded concurrency, and clear errors for broken registries."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conveyor.images.credentials import Credentials, DockerConfig
from conveyor.images.reference import (
    ImageName,
    ImageReferenceError,
    is_loopback,
    parse_image,
)
from conveyor.images.registry import (
    Backoff,
    Challenge,
    RegistryAuthError,
    RegistryClient,
    RegistryProtocolError,
    RegistrySettings,
    RegistryUnavailable,
    RepositoryNotFound,
    parse_challenges,
)
from tests.imagetools import Reply, Request, closed_port, loopback_server

FAST = RegistrySettings(backoff=Backoff(attempts=3, base_delay=0.01, max_delay=0.02), timeout=5)


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


async def tags_of(host: str, path: str, **kwargs: object) -> list[str]:
    async with RegistryClient(**kwargs) as registry:  # type: ignore[arg-type]
        return await registry.list_tags(ImageName(host, path))


@pytest.mark.parametrize(
    ("text", "host", "path", "tag"),
    [
        ("nginx", "registry-1.docker.io", "library/nginx", None),
        ("nginx:1.25", "registry-1.docker.io", "library/nginx", "1.25"),
        ("docker.io/bitnami/mongodb:4.0.3", "registry-1.docker.io", "bitnami/mongodb", "4.0.3"),
        ("127.0.0.1:5000/ui", "127.0.0.1:5000", "ui", None),
        ("127.0.0.1:5000/team/ui:1.0.0", "127.0.0.1:5000", "team/ui", "1.0.0"),
        ("localhost/ui:x", "localhost", "ui", "x"),
        ("ghcr.io/org/app@sha256:" + "a" * 64, "ghcr.io", "org/app", None),
        ("[::1]:5000/ui:1", "[::1]:5000", "ui", "1"),
    ],
)
def test_parse_image(text: str, host: str, path: str, tag: str | None) -> None:
    reference = parse_image(text)
    assert (reference.name.host, reference.name.path, reference.tag) == (host, path, tag)


@pytest.mark.parametrize("bad", ["", "UPPER/case", "repo:bad tag", "host.io/repo:-x", "a b"])
def test_parse_image_rejects(bad: str) -> None:
    with pytest.raises(ImageReferenceError):
        parse_image(bad)


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1:5000")
    assert is_loopback("localhost:5000")
    assert is_loopback("[::1]:5000")
    assert not is_loopback("registry.example.com")
    assert RegistrySettings().scheme("127.0.0.1:5000") == "http"
    assert RegistrySettings().scheme("ghcr.io") == "https"
    assert RegistrySettings(insecure=frozenset({"reg.lan:5000"})).scheme("reg.lan:5000") == "http"


def test_parse_token_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull,push"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/nginx:pull,push",
            },
        )
    ]
    several = parse_challenges('Basic realm="a \\"b\\"", Bearer realm=https://t/x , service=s')
    assert several == [
        Challenge("basic", {"realm": 'a "b"'}),
        Challenge("bearer", {"realm": "https://t/x", "service": "s"}),
    ]
    assert parse_challenges("") == []


def test_docker_config_credentials(tmp_path: Path) -> None:
    auth = base64.b64encode(b"ci:s3cret:with:colons").decode()
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                    "127.0.0.1:5000": {"auth": auth},
                    "reg.example.com": {"username": "u", "password": "p"},
                    "broken.example.com": {"auth": "!!notbase64"},
                },
                "credHelpers": {"ecr.example.com": "conveyor-test-missing-helper"},
            }
        )
    )
    config = DockerConfig.load(env={"DOCKER_CONFIG": str(tmp_path)})
    assert config.for_host("127.0.0.1:5000") == Credentials("ci", "s3cret:with:colons")
    assert config.for_host("registry-1.docker.io") == Credentials("hub", "pw")
    assert config.for_host("reg.example.com") == Credentials("u", "p")
    assert config.for_host("broken.example.com") is None
    assert config.for_host("ecr.example.com") is None  # helper not installed
    assert config.for_host("other.example.com") is None
    assert "s3cret" not in repr(config) and "s3cret" not in repr(config.for_host("127.0.0.1:5000"))
    assert DockerConfig.load(env={"DOCKER_CONFIG": str(tmp_path / "none")}) == DockerConfig()


class FakeRegistry:
    """Tags with pagination; optional auth; counts requests and concurrency."""

    def __init__(self, repositories: dict[str, list[str]], *, delay: float = 0.0) -> None:
        self.repositories = repositories
        self.delay = delay
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.bearer: str | None = None  # token required, if set
        self.token_host = ""
        self.basic: str | None = None  # "user:password" required, if set
        self.failures = 0  # answer 503 this many times first

    def token_service(self, request: Request) -> Reply:
        expected = "Basic " + base64.b64encode(b"ci:s3cret").decode()
        if request.headers.get("Authorization") != expected:
            return Reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
        query = parse_qs(urlsplit(request.path).query)
        assert query["service"] == ["fake-registry"]
        return Reply(200, {"token": f"token-for-{query['scope'][0]}", "expires_in": 300})

    def __call__(self, request: Request) -> Reply:
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return self.answer(request)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, request: Request) -> Reply:
        url = urlsplit(request.path)
        if url.path == "/token":
            return self.token_service(request)
        if self.failures > 0:
            self.failures -= 1
            return Reply(503, "busy")
        repository = url.path.removeprefix("/v2/").split("/tags/list")[0].split("/manifests/")[0]
        if self.bearer is not None:
            wanted = f"Bearer token-for-repository:{repository}:pull"
            if request.headers.get("Authorization") != wanted:
                challenge = (
                    f'Bearer realm="http://{self.token_host}/token",service="fake-registry",'
                    f'scope="repository:{repository}:pull"'
                )
                return Reply(401, {"errors": []}, {"WWW-Authenticate": challenge})
        if self.basic is not None:
            wanted = "Basic " + base64.b64encode(self.basic.encode()).decode()
            if request.headers.get("Authorization") != wanted:
                return Reply(401, "", {"WWW-Authenticate": 'Basic realm="fake"'})
        if repository not in self.repositories:
            return Reply(404, {"errors": [{"code": "NAME_UNKNOWN"}]})
        if "/manifests/" in url.path:
            tag = url.path.rsplit("/", 1)[1]
            if tag not in self.repositories[repository]:
                return Reply(404, {"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            return Reply(200, {"schemaVersion": 2}, {"Content-Type": "application/json"})
        tags = sorted(self.repositories[repository])
        query = parse_qs(url.query)
        size = int(query.get("n", ["100"])[0])
        last = query.get("last", [""])[0]
        remaining = [t for t in tags if t > last]
        page, rest = remaining[:size], remaining[size:]
        headers = {}
        if rest:
            headers["Link"] = f'</v2/{repository}/tags/list?last={page[-1]}&n={size}>; rel="next"'
        return Reply(200, {"name": repository, "tags": page}, headers)


def test_pagination_follows_link_headers() -> None:
    tags = [f"1.0.{i:03d}" for i in range(250)]
    fake = FakeRegistry({"team/ui": tags})
    with loopback_server(fake) as host:
        settings = RegistrySettings(page_size=100)
        assert run(tags_of(host, "team/ui", settings=settings)) == tags
    listed = [r.path for r in fake.requests]
    assert listed == [
        "/v2/team/ui/tags/list?n=100",
        "/v2/team/ui/tags/list?last=1.0.099&n=100",
        "/v2/team/ui/tags/list?last=1.0.199&n=100",
    ]


class StaticCredentials:
    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials

    def for_host(self, host: str) -> Credentials | None:
        return self.credentials


def test_bearer_token_challenge_and_token_reuse() -> None:
    fake = FakeRegistry({"a": ["1"], "b": ["2"]})
    fake.bearer = "required"
    with loopback_server(fake) as host:
        fake.token_host = host

        async def scenario() -> tuple[list[str], list[str], list[str], int]:
            async with RegistryClient(
                credentials=StaticCredentials(Credentials("ci", "s3cret")), settings=FAST
            ) as registry:
                first = await registry.list_tags(ImageName(host, "a"))
                again = await registry.list_tags(ImageName(host, "a"))
                other = await registry.list_tags(ImageName(host, "b"))
                return first, again, other, registry.requests

        first, again, other, requests = run(scenario())
    assert (first, again, other) == (["1"], ["1"], ["2"])
    paths = [urlsplit(r.path).path for r in fake.requests]
    # a: challenged, token, retried; a again: token reused; b: known realm, token first.
    assert paths == [
        "/v2/a/tags/list",
        "/token",
        "/v2/a/tags/list",
        "/v2/a/tags/list",
        "/token",
        "/v2/b/tags/list",
    ]
    assert requests == 6


def test_bearer_without_or_with_wrong_credentials_is_a_clear_error() -> None:
    fake = FakeRegistry({"a": ["1"]})
    fake.bearer = "required"
    with loopback_server(fake) as host:
        fake.token_host = host
        with pytest.raises(RegistryAuthError, match="no credentials configured"):
            run(tags_of(host, "a", settings=FAST))
        with pytest.raises(RegistryAuthError, match="credentials were rejected") as error:
            run(
                tags_of(
                    host,
                    "a",
                    settings=FAST,
                    credentials=StaticCredentials(Credentials("ci", "wrong-password")),
                )
            )
    assert "wrong-password" not in str(error.value)


def test_basic_auth() -> None:
    fake = FakeRegistry({"a": ["1"]})
    fake.basic = "ci:s3cret"
    with loopback_server(fake) as host:
        credentials = StaticCredentials(Credentials("ci", "s3cret"))
        assert run(tags_of(host, "a", settings=FAST, credentials=credentials)) == ["1"]
        with pytest.raises(RegistryAuthError, match=r"access denied \(401\)"):
            run(tags_of(host, "a", settings=FAST))


def test_retries_5xx_then_succeeds_or_gives_up() -> None:
    fake = FakeRegistry({"a": ["1"]})
    fake.failures = 2
    with loopback_server(fake) as host:
        assert run(tags_of(host, "a", settings=FAST)) == ["1"]
        fake.failures = 10
        with pytest.raises(RegistryUnavailable, match="503 Service Unavailable after 3 attempts"):
            run(tags_of(host, "a", settings=FAST))


def test_registry_down_is_unavailable() -> None:
    host = closed_port()
    with pytest.raises(RegistryUnavailable, match=f"registry {host}: unreachable .*3 attempts"):
        run(tags_of(host, "a", settings=FAST))


def test_garbage_answers_are_protocol_errors() -> None:
    def garbage(request: Request) -> Reply:
        return Reply(200, "<html>hello from a proxy</html>", {"Content-Type": "text/html"})

    with loopback_server(garbage) as host:
        with pytest.raises(RegistryProtocolError, match="not JSON \\(text/html\\)"):
            run(tags_of(host, "a", settings=FAST))

    def wrong_shape(request: Request) -> Reply:
        return Reply(200, {"tags": "1.0.0"})

    with loopback_server(wrong_shape) as host:
        with pytest.raises(RegistryProtocolError, match="expected"):
            run(tags_of(host, "a", settings=FAST))


def test_unknown_repository_and_empty_repository() -> None:
    fake = FakeRegistry({"empty": []})
    with loopback_server(fake) as host:
        with pytest.raises(RepositoryNotFound, match="no repository 'nope'"):
            run(tags_of(host, "nope", settings=FAST))
        assert run(tags_of(host, "empty", settings=FAST)) == []


def test_has_manifest() -> None:
    fake = FakeRegistry({"a": ["1.0.0"]})
    with loopback_server(fake) as host:

        async def scenario() -> tuple[bool, bool]:
            async with RegistryClient(settings=FAST) as registry:
                name = ImageName(host, "a")
                return await registry.has_manifest(name, "1.0.0"), await registry.has_manifest(
                    name, "2.0.0"
                )

        assert run(scenario()) == (True, False)
    accept = fake.requests[0].headers["Accept"]
    assert "application/vnd.oci.image.manifest.v1+json" in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept
    assert fake.requests[0].method == "HEAD"


def test_concurrency_is_bounded() -> None:
    fake = FakeRegistry({f"r{i}": ["1"] for i in range(24)}, delay=0.02)
    with loopback_server(fake) as host:

        async def scenario() -> list[list[str]]:
            settings = RegistrySettings(concurrency=4)
            async with RegistryClient(settings=settings) as registry:
                return await asyncio.gather(
                    *(registry.list_tags(ImageName(host, f"r{i}")) for i in range(24))
                )

        assert run(scenario()) == [["1"]] * 24
    assert 1 < fake.max_in_flight <= 4


def test_build_time_from_an_index_picks_linux_amd64() -> None:
    def index_registry(request: Request) -> Reply:
        path = urlsplit(request.path).path
        if path == "/v2/a/manifests/multi":
            return Reply(
                200,
                {
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [
                        {
                            "digest": "sha256:arm",
                            "platform": {"os": "linux", "architecture": "arm64"},
                        },
                        {
                            "digest": "sha256:amd",
                            "platform": {"os": "linux", "architecture": "amd64"},
                        },
                    ],
                },
            )
        if path == "/v2/a/manifests/sha256:amd":
            return Reply(200, {"config": {"digest": "sha256:cfg"}})
        if path == "/v2/a/blobs/sha256:cfg":
            return Reply(200, {"created": "2024-03-01T10:00:00.123456789Z"})
        return Reply(404, {})

    with loopback_server(index_registry) as host:

        async def scenario() -> str:
            async with RegistryClient(settings=FAST) as registry:
                built = await registry.built_at(ImageName(host, "a"), "multi")
                return built.isoformat() if built else ""

        assert run(scenario()) == "2024-03-01T10:00:00.123456+00:00"
