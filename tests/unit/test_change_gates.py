"""Which gates judge which change: a new release (every gate), a rollback to a release
the environment ran (`rollback.gates`), a change that keeps the release
(`config-change.gates`); told apart on real git history, refused in conveyor.yaml when
a gate cannot judge such a change."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.config.project import ConfigError, Project, parse_project
from conveyor.promote.gates import ChangeKind, change_kind, gates_for
from conveyor.promote.pipeline import app_version_at
from conveyor.promote.versions import read_app_version
from conveyor.reconcile.actions.hold import GateHold, GateVerdict
from conveyor.reconcile.status import HISTORY_LENGTH, AppStatus
from conveyor.render.discover import discover
from conveyor.source.git import run_git

GATES = [
    {"type": "approval"},
    {"type": "soak", "duration": "1h"},
    {"type": "healthy"},
    {"type": "http", "url": "http://127.0.0.1:9/status", "name": "jobs-idle"},
    {"type": "queue-empty", "queues": ["jobs"]},
]


def project(**extra: Any) -> Project:
    text = yaml.safe_dump(
        {
            "environments": [
                {"name": "staging", "path": "staging"},
                {"name": "production", "path": "production", "gates": GATES},
            ],
            **extra,
        },
        sort_keys=False,
    )
    return parse_project(text, source="conveyor.yaml")


def test_a_new_release_meets_every_gate_and_other_changes_only_those_listed() -> None:
    chosen = project(
        rollback={"gates": ["approval"]}, **{"config-change": {"gates": ["jobs-idle"]}}
    )
    env = chosen.environment("production")

    def types(kind: ChangeKind) -> list[str]:
        return [g.type for g in gates_for(kind, env, chosen)]

    assert types(ChangeKind.RELEASE) == ["approval", "soak", "healthy", "http", "queue-empty"]
    assert types(ChangeKind.ROLLBACK) == ["approval"]
    assert types(ChangeKind.CONFIG) == ["http"]  # by the gate's name
    plain = project()
    assert gates_for(ChangeKind.ROLLBACK, plain.environment("production"), plain) == []
    assert gates_for(ChangeKind.CONFIG, plain.environment("production"), plain) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"rollback": {"gates": ["soak"]}},
            "conveyor.yaml:19: rollback.gates: 'soak' judges a new version by the previous "
            "environment; it cannot judge a change to a version this environment ran or keeps",
        ),
        (
            {"config-change": {"gates": ["healthy"]}},
            "conveyor.yaml:19: config-change.gates: 'healthy' judges a new version",
        ),
        (
            {"rollback": {"gates": ["aproval"]}},
            "conveyor.yaml:18: rollback: 'aproval' is neither a gate type (approval, http, "
            "queue-empty) nor the name of a gate of an environment",
        ),
        ({"rollback": {"gate": ["approval"]}}, "conveyor.yaml:19: rollback.gate"),
    ],
)
def test_gates_that_cannot_judge_the_change_are_refused(
    extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        project(**extra)
    assert str(error.value).startswith(message), str(error.value)


def _deployment(tag: str, replicas: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: ui, namespace: prod}}
        spec:
          replicas: {replicas}
          template:
            spec:
              containers:
                - {{name: main, image: registry.local/ui:{tag}}}
        """
    ).lstrip()


def test_the_kind_of_change_comes_from_what_the_environment_ran(tmp_path: Path) -> None:
    run_git(["init", "--quiet", "--initial-branch", "main", str(tmp_path)])
    revisions = {}
    for name, tag, replicas in (("first", "1.4.2", 3), ("second", "1.4.3", 3)):
        (tmp_path / "production" / "ui").mkdir(parents=True, exist_ok=True)
        (tmp_path / "production" / "ui" / "deploy.yaml").write_text(_deployment(tag, replicas))
        run_git(["add", "--all"], cwd=tmp_path)
        run_git(
            ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", name],
            cwd=tmp_path,
        )
        revisions[name] = run_git(["rev-parse", "HEAD"], cwd=tmp_path).strip()
    ran = [revisions["second"], revisions["first"]]  # the one applied last first
    looked_up: list[str] = []

    def identity_at(revision: str) -> frozenset[tuple[str, str]] | None:
        looked_up.append(revision)
        past = app_version_at(tmp_path, "production", "ui", revision)
        return past.identity if past is not None else None

    def kind_of(tag: str, replicas: int) -> ChangeKind:
        (tmp_path / "production" / "ui" / "deploy.yaml").write_text(_deployment(tag, replicas))
        [app] = discover(tmp_path, "production").apps
        return change_kind(read_app_version(tmp_path, app).identity, ran, identity_at)

    assert kind_of("1.4.3", 5) is ChangeKind.CONFIG  # replicas only: the same release
    assert looked_up == [revisions["second"]]  # no further back than needed
    assert kind_of("1.4.2", 3) is ChangeKind.ROLLBACK  # ran here before
    assert kind_of("1.4.2", 4) is ChangeKind.ROLLBACK  # ... with settings of today
    assert kind_of("1.4.4", 3) is ChangeKind.RELEASE  # never ran here
    assert change_kind(None, ran, identity_at) is ChangeKind.RELEASE  # unreadable: all gates
    assert change_kind(frozenset(), [], identity_at) is ChangeKind.RELEASE  # never applied
    assert app_version_at(tmp_path, "production", "ui", "0" * 40) is None


def test_a_status_remembers_the_revisions_it_ran() -> None:
    status = AppStatus(scope="prod", app="ui", last_applied_revision="legacy")
    assert status.applied_revisions == ["legacy"]  # written before histories
    for number in range(HISTORY_LENGTH + 2):
        status.record_history(f"r{number}", f"2026-01-01T00:00:{number:02d}Z")
        status.last_applied_revision = f"r{number}"
    status.record_history("r5", "2026-01-02T00:00:00Z")  # ran again: first, once
    status.last_applied_revision = "r5"
    revisions = status.applied_revisions
    assert revisions[:3] == ["r5", "r11", "r10"] and len(revisions) == HISTORY_LENGTH
    assert revisions.count("r5") == 1
    again = AppStatus.from_object({"spec": {"app": "ui"}, "status": status.status_body()})
    assert again.history == status.history and again.applied_revisions == revisions


def test_a_verdict_names_every_hold_of_a_pass_once() -> None:
    release = GateHold("approval", "1.4.4 needs 1 approval(s)", 10.0)
    rollback = GateHold("http", "rollback of ui: GET answered 503", 2.0)
    verdict = GateVerdict(apps={"ui": rollback, "api": release, "db": release}, removal=release)
    assert verdict.held == GateHold(
        "http, approval", "rollback of ui: GET answered 503; 1.4.4 needs 1 approval(s)", 2.0
    )
    assert GateVerdict().held is None
