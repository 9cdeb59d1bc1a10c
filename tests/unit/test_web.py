"""The dashboard's pure parts: tokens and CSRF, cross-site checks, the action registry,
what changed an app, versions from images, and the matrix's shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from starlette.requests import Request

from conveyor.cluster.shards import ShardLoad, owner_of
from conveyor.reconcile.status import READY, SOURCE_KIND, WAITING_FOR_GATE, AppStatus
from conveyor.source.git import change_kind
from conveyor.web import views
from conveyor.web.actions import ActionRegistry, ActionRequest, ActionResult, default_registry
from conveyor.web.auth import (
    Auth,
    FailureLimiter,
    Throttled,
    TokenFileError,
    cross_site,
    load_tokens,
)
from conveyor.web.sse import sse_message

TOKEN = "0123456789abcdef-0123456789abcdef-token"


def request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "http",
            "path": "/x",
            "headers": [(b"host", b"127.0.0.1:8080"), *raw],
            "server": ("127.0.0.1", 8080),
        }
    )


def test_token_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# ops\nalice {TOKEN}\n{TOKEN}-2  # the CI\n\n")
    path.chmod(0o600)
    assert load_tokens(path) == {TOKEN: "alice", f"{TOKEN}-2": "operator"}
    path.write_text("bob short\n")
    with pytest.raises(TokenFileError, match=r"tokens:1: the token has 5 characters; .* need 32"):
        load_tokens(path)
    path.write_text(f"bob {'x' * 31}\n")
    with pytest.raises(TokenFileError, match="need 32 or more"):
        load_tokens(path)
    path.write_text("# nothing\n")
    with pytest.raises(TokenFileError, match="no token"):
        load_tokens(path)
    with pytest.raises(TokenFileError, match="cannot read"):
        load_tokens(tmp_path / "missing")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_token_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice {TOKEN}\n")
    path.chmod(mode)
    with pytest.raises(TokenFileError, match=rf"open to others \(mode {mode:04o}\): run `chmod"):
        load_tokens(path)


def test_wrong_tokens_are_limited_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("conveyor.web.auth.time.monotonic", lambda: now[0])
    auth = Auth({TOKEN: "alice"})
    for _ in range(5):
        assert auth.verify("guess", client="10.0.0.9") is None
    with pytest.raises(Throttled) as throttled:
        auth.verify(TOKEN, client="10.0.0.9")  # refused before the token is compared
    assert throttled.value.retry_after == 12
    assert auth.verify(TOKEN, client="10.0.0.8") == "alice"  # others are not affected
    now[0] += 12
    assert auth.verify(TOKEN, client="10.0.0.9") == "alice"  # one more try a refill
    assert auth.verify("guess", client="10.0.0.9") is None
    with pytest.raises(Throttled):
        auth.login(TOKEN, client="10.0.0.9")


def test_the_failure_limiter_forgets_the_quietest_clients_first() -> None:
    limiter = FailureLimiter(burst=1, refill=60, clients=2)
    for client in ("a", "b", "c"):
        limiter.failed(client)
    assert limiter.retry_after("a") is None  # forgotten: memory stays bounded
    assert limiter.retry_after("c") is not None


def test_sessions_and_csrf_tokens() -> None:
    auth = Auth({TOKEN: "alice"})
    assert auth.enabled and not Auth().enabled
    assert auth.name_for(TOKEN) == "alice" and auth.name_for("nope") is None
    assert auth.login("wrong", client="127.0.0.1") is None
    session = auth.login(TOKEN, client="127.0.0.1")
    assert session is not None and auth.session_name(session) == "alice"
    csrf = auth.csrf_token(session)
    assert auth.csrf_ok(session, csrf)
    assert not auth.csrf_ok(session, "forged") and not auth.csrf_ok(None, csrf)
    other = auth.login(TOKEN, client="127.0.0.1")
    assert not auth.csrf_ok(other, csrf)  # bound to its session
    auth.logout(session)
    assert auth.session_name(session) is None


def test_cross_site_requests_are_recognised() -> None:
    assert cross_site(request({})) is None
    assert cross_site(request({"Origin": "http://127.0.0.1:8080"})) is None
    assert cross_site(request({"Sec-Fetch-Site": "same-origin"})) is None
    assert cross_site(request({"Sec-Fetch-Site": "none"})) is None
    assert "Origin" in str(cross_site(request({"Origin": "http://evil.example"})))
    assert "Origin" in str(cross_site(request({"Origin": "null"})))
    assert "Sec-Fetch-Site" in str(cross_site(request({"Sec-Fetch-Site": "same-site"})))


def test_actions_plug_in_with_one_function() -> None:
    registry = ActionRegistry()

    @registry.action("approve", label="Approve", when=lambda s: s.state == WAITING_FOR_GATE)
    async def approve(_context: object, request: ActionRequest) -> ActionResult:
        """Approve the gate."""
        return ActionResult(f"approved {request.subject}")

    waiting = AppStatus(scope="prod", app="api", state=WAITING_FOR_GATE)
    assert [a.name for a in registry.for_app(waiting)] == ["approve"]
    assert registry.for_app(AppStatus(scope="prod", app="api", state=READY)) == []
    action = registry.get("approve")
    assert action is not None and action.description == "Approve the gate."
    with pytest.raises(ValueError, match="twice"):
        registry.action("approve", label="again")(approve)

    defaults = default_registry()
    status = AppStatus(scope="dev", app="api")
    shared = ["promote", "approve", "rollback"]
    assert [a.name for a in defaults.for_app(status)] == ["reconcile", "suspend", *shared]
    status.suspended = True
    assert [a.name for a in defaults.for_app(status)] == ["reconcile", "resume", *shared]
    assert [a.name for a in defaults.for_environment()] == ["reconcile", "promote", "approve"]


@pytest.mark.parametrize(
    ("subject", "body", "kind"),
    [
        ("Update from https://github.com/acme/api/commit/abc", "", "publish"),
        ("Update images", "registry/api: 1 -> 2", "image-automation"),
        ("Auto-release registry/api:2", "", "image-automation"),
        ("Promote api 1.2.0 from staging to production", "", "promotion"),
        ("Rollback api in production to 1.1.0", "", "rollback"),
        ('Revert "bump"', "", "rollback"),
        ("bump replicas", "", "manual"),
        ("anything", "Conveyor-Change: promotion\n", "promotion"),
    ],
)
def test_what_changed_an_app(subject: str, body: str, kind: str) -> None:
    assert change_kind(subject, body) == kind


def test_versions_from_images() -> None:
    pod = {
        "template": {
            "spec": {
                "initContainers": [{"image": "busybox"}],
                "containers": [
                    {"image": "registry:5000/team/api:1.4.2"},
                    {"image": "envoy@sha256:" + "a" * 64},
                ],
            }
        }
    }
    assert views.tags_of(views.images_in(pod)) == ["latest", "1.4.2", "sha256:aaaaaaaaaaaa"]
    helm_values = {"values": {"image": {"repository": "api", "tag": "0.90.0"}}}
    assert views.tags_of(views.images_in(helm_values)) == ["0.90.0"]


def test_matrix_orders_environments_and_fills_cells() -> None:
    statuses = [
        AppStatus(scope="production", app="api", state=READY, last_applied_revision="b" * 40),
        AppStatus(scope="dev", app="api", state=READY, last_applied_revision="a" * 40),
        AppStatus(scope="dev", app="web", state=WAITING_FOR_GATE, message="approval"),
        AppStatus(
            scope="dev", app="", kind=SOURCE_KIND, state=READY, last_applied_revision="a" * 40
        ),
        AppStatus(scope="adhoc", app="tool"),
    ]
    matrix = views.matrix(statuses, {"dev.api": "1.2.0"}, order=["dev", "staging", "production"])
    assert [e.name for e in matrix.environments] == ["dev", "production", "adhoc"]
    assert matrix.apps == ["api", "tool", "web"]
    cell = matrix.cell("dev", "api")
    assert cell is not None and cell.version == "1.2.0"
    other = matrix.cell("production", "api")
    assert other is not None and other.version == "b" * 12  # no live version: the revision
    assert matrix.cell("production", "web") is None
    assert matrix.environments[0].revision == "a" * 40 and matrix.environments[0].apps == 2
    (gate,) = views.gates(statuses)
    assert (gate.environment, gate.app, gate.message) == ("dev", "web", "approval")


def test_sse_messages_are_single_data_lines() -> None:
    assert sse_message("status", {"a": "x\ny"}) == 'event: status\ndata: {"a":"x\\ny"}\n\n'


@pytest.mark.parametrize(
    ("mode", "content", "message"),
    [
        (0o644, f"alice {TOKEN}\n", "is open to others (mode 0644): run `chmod 600"),
        (0o600, "alice too-short-a-token\n", "the token has 17 characters; tokens need 32"),
    ],
    ids=["readable-by-others", "short-token"],
)
def test_serve_refuses_a_weak_token_file_with_one_line(
    tmp_path: Path, mode: int, content: str, message: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    path.chmod(mode)
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "serve", "--token-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_each_live_shard_shows_the_apps_it_owns_now_and_its_last_pass() -> None:
    apps = [f"app-{i}" for i in range(40)]
    loads = [
        ShardLoad(identity="agent-a", apps=25, pass_seconds=3.5),
        ShardLoad(identity="agent-b", apps=None, pass_seconds=None),  # no pass published yet
    ]
    shown = views.shards(loads, apps)
    assert [s.shard for s in shown] == ["agent-a", "agent-b"]
    assert sum(s.apps for s in shown) == len(apps)
    assert shown[0].apps == sum(owner_of(a, ["agent-a", "agent-b"]) == "agent-a" for a in apps)
    assert shown[0].model_dump(by_alias=True) == {
        "shard": "agent-a",
        "apps": shown[0].apps,
        "lastPassApps": 25,
        "passSeconds": 3.5,
    }
    assert (shown[1].last_pass_apps, shown[1].pass_seconds) == (None, None)
    assert views.shards([], apps) == []
