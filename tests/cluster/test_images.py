"""Image automation against the sandbox's real OCI registry and real git repositories:
a burst of pushes becomes one commit, a quiet scan none; the newest-build order without
`created` or with one `created` for all; broken registries write nothing;
`images verify`; and bearer-token auth against a real registry run with `auth.token`."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from conveyor.cli.main import app
from conveyor.images.push import push
from conveyor.source.git import Author, Checkout, commit_and_push, run_git
from tests.conftest import SandboxHandle
from tests.imagetools import (
    FIXTURE_REGISTRY,
    FIXTURES,
    Reply,
    Request,
    closed_port,
    config_repo,
    log,
    loopback_server,
    show,
)

pytestmark = pytest.mark.cluster
runner = CliRunner()

UI_NOW = "refs-heads-master-4f5c0a1-1700000000"
API_NOW = "refs-heads-master-0a1b2c3-1700000000"


@pytest.fixture(autouse=True)
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Docker config, so a developer's own credentials never take part."""
    folder = tmp_path / "docker"
    folder.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(folder))
    return folder


@pytest.fixture
def images(sandbox: SandboxHandle) -> str:
    """A fresh `REGISTRY/t-XXXX` prefix holding the tags the fixture files name today."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    registry = sandbox.registry
    push(registry, f"{prefix}/ui", [UI_NOW], created="2023-11-14T22:13:20Z")
    push(registry, f"{prefix}/ui", ["0.90.0"])
    push(registry, f"{prefix}/worker-r", ["1.4.0"])
    push(registry, f"{prefix}/worker-python", ["1.4.0"])
    push(registry, f"{prefix}/api", [API_NOW])
    push(registry, f"{prefix}/docs", ["1.0.0"])
    return f"{registry}/{prefix}"


def burst(images: str) -> int:
    """Twenty new tags across five repositories, as a busy CI day would push them."""
    registry, prefix = images.split("/", 1)
    pushes = [
        ("ui", ["refs-heads-master-fff0001-1700000100"], "2023-11-14T22:15:00Z"),
        ("ui", ["refs-heads-master-ccc0003-1700000150"], "2023-11-14T22:15:50Z"),
        ("ui", ["refs-heads-master-aaa0002-1700000200"], "2023-11-14T22:16:40Z"),
        ("ui", ["refs-pull-7-merge-bbb0004", "latest"], "2023-11-15T00:00:00Z"),
        ("ui", ["0.91.0", "0.92.0-rc.1", "1.0.0"], "2023-11-15T00:00:00Z"),
        ("worker-r", ["1.5.0", "2.0.0", "2.0.0-beta.1"], "2023-11-15T00:00:00Z"),
        ("worker-python", ["1.4.3", "1.5.0", "1234567"], "2023-11-15T00:00:00Z"),
        (
            "api",
            [
                "refs-heads-master-0b0b0b0-1700000300",
                "refs-heads-master-9f9f9f9-1700000250",
                "refs-heads-master-1111111-999999999",
                "feature-x-1800000000",
                "refs-heads-master-abcdef0-1700000500",
            ],
            "2023-11-15T00:00:00Z",
        ),
        ("docs", ["2.0.0"], "2023-11-15T00:00:00Z"),
    ]
    for repository, tags, created in pushes:
        push(registry, f"{prefix}/{repository}", tags, created=created)
    return sum(len(tags) for _, tags, _ in pushes)


def fixture_bytes(path: str, images: str) -> bytes:
    return (FIXTURES / path).read_bytes().replace(FIXTURE_REGISTRY.encode(), images.encode())


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["images", *args])
    return result.exit_code, result.output


def scan_json(*args: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, ["images", *args, "-o", "json"])
    return result.exit_code, json.loads(result.stdout)


def test_burst_of_pushes_becomes_one_commit(images: str, tmp_path: Path) -> None:
    repo = config_repo(tmp_path, images)
    code, output = invoke("update", "--repo", repo)
    assert code == 0, output
    assert "nothing to update" in output
    assert log(repo) == ["config"]

    assert burst(images) == 20
    code, output = invoke("update", "--repo", repo, "--author-name", "bot")
    assert code == 0, output
    assert len(log(repo)) == 2
    message = run_git(["--git-dir", repo, "log", "-1", "--format=%B%n%an", "main"])
    assert message.splitlines() == [
        "Update images",
        "",
        f"{images}/api: {API_NOW} -> refs-heads-master-abcdef0-1700000500",
        f"{images}/ui: 0.90.0 -> 1.0.0",
        f"{images}/ui: {UI_NOW} -> refs-heads-master-aaa0002-1700000200",
        f"{images}/worker-python: 1.4.0 -> 1.4.3",
        f"{images}/worker-r: 1.4.0 -> 2.0.0",
        "",
        "bot",
    ]
    replacements = {
        "staging/ui.yaml": [(UI_NOW, "refs-heads-master-aaa0002-1700000200")],
        "staging/api.yaml": [(API_NOW, "refs-heads-master-abcdef0-1700000500")],
        "production/ui.yaml": [("tag: 0.90.0 #", "tag: 1.0.0 #")],
        "production/worker.yaml": [
            ("worker-r:1.4.0", "worker-r:2.0.0"),
            ("worker-python:1.4.0", "worker-python:1.4.3"),
        ],
        "staging/docs.yaml": [],
    }
    for path, pairs in replacements.items():
        expected = fixture_bytes(path, images)
        for old, new in pairs:
            expected = expected.replace(old.encode(), new.encode())
        assert show(repo, path) == expected, path

    # Nothing new in the registries: the next scan makes no commit.
    code, output = invoke("update", "--repo", repo)
    assert code == 0, output
    assert "nothing to update" in output
    assert len(log(repo)) == 2


def test_scan_reports_without_writing(images: str, tmp_path: Path) -> None:
    repo = config_repo(tmp_path, images)
    burst(images)
    code, report = scan_json("scan", "--repo", repo, "--path", "production")
    assert code == 0
    rows = {r["name"]: r for r in report["automations"]}  # type: ignore[union-attr, index]
    assert {n: (r["current"], r["latest"], r["status"]) for n, r in rows.items()} == {
        "HelmRelease worker-default/worker r": ("1.4.0", "2.0.0", "update"),
        "HelmRelease worker-default/worker python": ("1.4.0", "1.4.3", "update"),
        "ImagePolicy ui-production:ui": ("0.90.0", "1.0.0", "update"),
    }
    assert rows["ImagePolicy ui-production:ui"]["sites"] == ["production/ui.yaml:48"]
    assert log(repo) == ["config"]


def test_push_branch_for_review_is_replaced_not_stacked(images: str, tmp_path: Path) -> None:
    repo = config_repo(tmp_path, images)
    burst(images)
    main_before = run_git(["--git-dir", repo, "rev-parse", "main"]).strip()
    code, output = invoke("update", "--repo", repo, "--push-branch", "images/proposed")
    assert code == 0, output
    assert run_git(["--git-dir", repo, "rev-parse", "main"]).strip() == main_before
    assert len(log(repo, "images/proposed")) == 2
    proposed = run_git(["--git-dir", repo, "rev-parse", "images/proposed"]).strip()

    code, output = invoke("update", "--repo", repo, "--push-branch", "images/proposed")
    assert code == 0, output
    assert run_git(["--git-dir", repo, "rev-parse", "images/proposed"]).strip() == proposed

    registry, prefix = images.split("/", 1)
    push(registry, f"{prefix}/worker-r", ["2.1.0"])
    code, output = invoke("update", "--repo", repo, "--push-branch", "images/proposed")
    assert code == 0, output
    assert len(log(repo, "images/proposed")) == 2  # one proposal on top of main, rebuilt
    assert b"worker-r:2.1.0" in show(repo, "production/worker.yaml", "images/proposed")


def v1_release(name: str, image: str, tag: str, tag_filter: str) -> str:
    return f"""\
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: {name}
  namespace: {name}-staging
  annotations:
    fluxcd.io/automated: "true"
    filter.fluxcd.io/chart-image: '{tag_filter}'
spec:
  releaseName: {name}
  chart: {{git: https://github.com/hms-dbmi-cellenics/{name}, path: chart-infra, ref: master}}
  values:
    image:
      repository: {image}
      tag: "{tag}" # filled in by CI. do not modify.
"""


def files_repo(tmp_path: Path, files: dict[str, str]) -> str:
    """A bare repository whose `main` holds `files`; returns its path."""
    bare = tmp_path / "config.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])

    def add(root: Path) -> None:
        for path, text in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)

    commit_and_push(
        Checkout.open(str(bare), tmp_path / "seed"), add, message="config", author=Author()
    )
    return str(bare)


def test_newest_build_without_created_or_with_one_created_orders_by_the_tag_timestamp(
    sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Images without `created` (ui), and reproducible builds that all carry the epoch
    (api): the `-<unix time>` in Cellenics' tags decides, not the alphabet."""
    registry, prefix = sandbox.registry, f"t-{uuid.uuid4().hex[:8]}"
    ui_tags = [
        UI_NOW,
        "refs-heads-master-fff0001-1700000100",
        "refs-heads-master-aaa0002-1700000200",
    ]
    for tag in ui_tags:
        push(registry, f"{prefix}/ui", [tag], created=None)
    api_tags = [
        API_NOW,
        "refs-heads-master-0b0b0b0-1700000300",
        "refs-heads-master-9f9f9f9-1700000250",
    ]
    push(registry, f"{prefix}/api", api_tags, created="1970-01-01T00:00:00Z")
    images = f"{registry}/{prefix}"
    repo = files_repo(
        tmp_path,
        {
            "staging/ui.yaml": v1_release("ui", f"{images}/ui", UI_NOW, "glob:refs-heads-master-*"),
            "staging/api.yaml": v1_release(
                "api", f"{images}/api", API_NOW, "regex:^refs-heads-master-"
            ),
        },
    )
    code, report = scan_json("scan", "--repo", repo)
    assert code == 0
    rows = {r["name"]: r for r in report["automations"]}  # type: ignore[union-attr, index]
    assert {n: (r["latest"], r["status"]) for n, r in rows.items()} == {
        "HelmRelease ui-staging/ui chart-image": ("refs-heads-master-aaa0002-1700000200", "update"),
        "HelmRelease api-staging/api chart-image": (
            "refs-heads-master-0b0b0b0-1700000300",
            "update",
        ),
    }
    assert report["warnings"] == []
    code, output = invoke("update", "--repo", repo)
    assert code == 0, output
    assert b'tag: "refs-heads-master-aaa0002-1700000200"' in show(repo, "staging/ui.yaml")
    assert b'tag: "refs-heads-master-0b0b0b0-1700000300"' in show(repo, "staging/api.yaml")


def test_one_created_and_no_timestamps_keeps_the_current_tag_and_warns(
    sandbox: SandboxHandle, tmp_path: Path
) -> None:
    registry, prefix = sandbox.registry, f"t-{uuid.uuid4().hex[:8]}"
    push(registry, f"{prefix}/ui", ["main-0000001"], created="2024-01-01T00:00:00Z")
    push(registry, f"{prefix}/ui", ["main-zzz9999", "main-aaa1111"], created="2024-02-01T00:00:00Z")
    images = f"{registry}/{prefix}"
    repo = files_repo(
        tmp_path,
        {"staging/ui.yaml": v1_release("ui", f"{images}/ui", "main-0000001", "glob:main-*")},
    )
    result = runner.invoke(app, ["images", "update", "--repo", repo])
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())
    assert (
        "warning: staging/ui.yaml: HelmRelease ui-staging/ui chart-image: policy glob:main-* "
        "(newest build) cannot tell the newest of 2 tags apart (main-aaa1111, main-zzz9999): "
        "same build time and no timestamp in the tag to order by; keeping main-0000001"
    ) in warning
    assert "nothing to update; 1 automation(s) undecided keep their tag" in warning
    assert log(repo) == ["config"]  # the alphabetically smallest (main-aaa1111) was not taken
    code, report = scan_json("scan", "--repo", repo)
    assert code == 0
    [row] = report["automations"]  # type: ignore[misc]
    assert (row["status"], row["current"], row["latest"]) == ("undecided", "main-0000001", None)
    assert row["tied"] == ["main-aaa1111", "main-zzz9999"]
    assert report["warnings"] == [row["warning"]]
    # A newer build decides again.
    push(registry, f"{prefix}/ui", ["main-bbb2222"], created="2024-03-01T00:00:00Z")
    code, output = invoke("update", "--repo", repo)
    assert code == 0, output
    assert b'tag: "main-bbb2222"' in show(repo, "staging/ui.yaml")


def test_registry_down_writes_nothing(tmp_path: Path) -> None:
    repo = config_repo(tmp_path, closed_port())
    code, report = scan_json("update", "--repo", repo, "--timeout", "2")
    assert code == 1
    statuses = {r["status"] for r in report["automations"]}  # type: ignore[union-attr, index]
    assert statuses == {"error"}
    errors = [r["error"] for r in report["automations"]]  # type: ignore[union-attr, index]
    assert all("unreachable" in e and "attempts" in e for e in errors)
    assert report["commit"] is None
    assert log(repo) == ["config"]


def test_garbage_registry_writes_nothing(tmp_path: Path) -> None:
    def garbage(request: Request) -> Reply:
        return Reply(
            200, "<html><body>Welcome to nginx!</body></html>", {"Content-Type": "text/html"}
        )

    with loopback_server(garbage) as host:
        repo = config_repo(tmp_path, host)
        code, output = invoke("update", "--repo", repo)
    assert code == 1
    assert "answer is not JSON (text/html)" in output
    assert "nothing to update" in output
    assert log(repo) == ["config"]


def test_verify_finds_present_and_missing_tags(images: str) -> None:
    worker_r, worker_python, missing = (
        f"{images}/worker-r",
        f"{images}/worker-python",
        f"{images}/never-built",
    )
    code, output = invoke("verify", "--version", "1.4.0", worker_r, worker_python)
    assert code == 0, output
    assert output.count("present") == 2

    code, output = invoke("verify", "--version", "1.4.0", worker_r, missing)
    assert code == 1
    assert f"1 is missing: {missing}:1.4.0" in " ".join(output.split())

    code, output = invoke("verify", "--version", "1.4.0", "--immutable", worker_r, missing)
    assert code == 1
    assert f"1 already exists: {worker_r}:1.4.0" in " ".join(output.split())

    code, output = invoke("verify", "--version", "9.9.9", "--immutable", worker_r, missing)
    assert code == 0, output

    code, output = invoke("verify", "--version", "1.4.0", f"{closed_port()}/x", "--timeout", "1")
    assert code == 2
    assert "unreachable" in output


# -- a real registry with token authentication -----------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues registry JWTs (ES256, x5c chain) to `ci:s3cret`, as a token server would."""

    service = "conveyor-test"
    issuer = "conveyor-test-issuer"

    def __init__(self, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conveyor token signer")])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = folder / "token-ca.pem"
        self.bundle.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self.issued = 0

    def token(self, scopes: list[str]) -> str:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": self.issuer,
            "sub": "ci",
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        self.issued += 1
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def __call__(self, request: Request) -> Reply:
        expected = "Basic " + base64.b64encode(b"ci:s3cret").decode()
        if request.headers.get("Authorization") != expected:
            return Reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
        query = parse_qs(urlsplit(request.path).query)
        assert query.get("service") == [self.service]
        return Reply(200, {"token": self.token(query.get("scope", [])), "expires_in": 300})


@pytest.fixture
def token_registry(sandbox: SandboxHandle, tmp_path: Path) -> Iterator[tuple[str, TokenService]]:
    """The sandbox's registry binary, run here with `auth.token` against `TokenService`."""
    state = sandbox.sandbox.state()
    assert state is not None
    tokens = TokenService(tmp_path)
    with loopback_server(tokens) as token_host:
        host = closed_port()
        config = tmp_path / "registry.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
                    "http": {"addr": host},
                    "auth": {
                        "token": {
                            "realm": f"http://{token_host}/token",
                            "service": tokens.service,
                            "issuer": tokens.issuer,
                            "rootcertbundle": str(tokens.bundle),
                        }
                    },
                }
            )
        )
        registry_log = (tmp_path / "registry.log").open("w")
        process = subprocess.Popen(
            [str(Path(state.bin_dir) / "registry"), "serve", str(config)],
            stdout=registry_log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://{host}/v2/", timeout=1).status_code == 401:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "registry.log").read_text()
                time.sleep(0.1)
            yield host, tokens
        finally:
            process.terminate()
            process.wait(timeout=10)
            registry_log.close()


def test_bearer_token_auth_against_a_real_registry(
    token_registry: tuple[str, TokenService], docker_config: Path, tmp_path: Path
) -> None:
    host, tokens = token_registry
    push_token = tokens.token(["repository:team/app:pull,push"])
    push(host, "team/app", ["1.0.0", "1.1.0"], headers={"Authorization": f"Bearer {push_token}"})

    code, output = invoke("verify", "--version", "1.1.0", f"{host}/team/app")
    assert code == 2
    assert "no credentials configured" in output

    auth = base64.b64encode(b"ci:s3cret").decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    code, output = invoke("verify", "--version", "1.1.0", f"{host}/team/app")
    assert code == 0, output
    assert "present" in output

    repo = config_repo(tmp_path, "unused.example.com")
    setter_file = (
        "apiVersion: image.toolkit.fluxcd.io/v1beta2\nkind: ImageRepository\n"
        f"metadata: {{name: app, namespace: apps}}\nspec:\n  image: {host}/team/app\n---\n"
        "apiVersion: image.toolkit.fluxcd.io/v1beta2\nkind: ImagePolicy\n"
        "metadata: {name: app, namespace: apps}\nspec:\n  imageRepositoryRef: {name: app}\n"
        "  policy: {semver: {range: '^1'}}\n---\n"
        f'image: {host}/team/app:1.0.0 # {{"$imagepolicy": "apps:app"}}\n'
    )
    checkout = tmp_path / "edit"
    run_git(["clone", "--quiet", repo, str(checkout)])
    (checkout / "apps").mkdir()
    (checkout / "apps/app.yaml").write_text(setter_file)
    run_git(["-C", str(checkout), "add", "."])
    run_git(
        ["-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "app"]
    )
    run_git(["-C", str(checkout), "push", "--quiet", "origin", "main"])

    code, output = invoke("update", "--repo", repo, "--path", "apps")
    assert code == 0, output
    assert show(repo, "apps/app.yaml") == setter_file.replace("app:1.0.0", "app:1.1.0").encode()

    (docker_config / "config.json").write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"ci:hunter2").decode()}}})
    )
    code, output = invoke("verify", "--version", "1.1.0", f"{host}/team/app")
    assert code == 2
    assert "credentials were rejected" in output
    assert "hunter2" not in output
