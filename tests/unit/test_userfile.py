"""The bounded loader: what it accepts as before, what it refuses, and how it says so."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from conveyor.config.channel import load_channel
from conveyor.config.project import ConfigError, parse_project
from conveyor.config.userfile import (
    Limits,
    UserFileError,
    check_yaml,
    load_documents,
    load_json,
    load_yaml,
    read_text,
)
from conveyor.images.yamltext import Scalar
from conveyor.publish.template import Template, TemplateError
from conveyor.reconcile.agent import Agent, AgentOptions
from conveyor.reconcile.target import ResolvedTarget, Target
from conveyor.render.documents import RenderError, load_all
from conveyor.source.git import Checkout
from conveyor.source.webhook import pushed_branch

ROOT = Path(__file__).resolve().parents[2]


def test_what_safe_load_read_reads_the_same() -> None:
    text = (
        "a: &base {x: 1, y: [1, 2]}\nb: *base\nc: {<<: *base, z: 3}\n"
        "when: 2024-01-02\nn: 0x1f\nf: 1.5e3\nbig: " + "9" * 100 + "\nq: '" + "1" * 500 + "'\n"
    )
    assert load_yaml(text, file="f.yaml") == yaml.safe_load(text)
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        if "templates" in path.parts:
            continue  # helm templates are not YAML until rendered
        text = path.read_text()
        expected = [d for d in yaml.safe_load_all(text) if d is not None]
        assert [d.data for d in load_documents(text, file=path.name)] == expected, path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {n: " + "1" * 5000 + "}\n", "f.yaml:1: integer of 5000 digits (at most 100;"),
        ("a: 0" + "9" * 101 + "\n", "f.yaml:1: integer of 102 digits"),
        ("x: 1\ndata: &a {x: *a}\n", "f.yaml:2: an alias refers to the anchor it is inside"),
        ("x: &a [1, {y: *a}]\n", "f.yaml:1: an alias refers to the anchor it is inside"),
        ("[" * 101 + "]" * 101, "f.yaml:1: nested deeper than 100 levels"),
        (
            "".join(" " * i + "a:\n" for i in range(3000)),
            "f.yaml:1000: invalid YAML: exceeded maximum nesting",
        ),
        ("a: 2024-02-30\n", "f.yaml:1: invalid YAML: cannot read '2024-02-30' as timestamp"),
        ("a: 1\nb: !!int abc\n", "f.yaml:2: invalid YAML: cannot read 'abc' as int"),
        ("a: 1\n---\nb: 2\n", "f.yaml:3: expected one YAML document, found another"),
        ("a: [1,\n", "f.yaml:2: invalid YAML: did not find expected node content"),
    ],
)
def test_refused_with_file_and_line(text: str, message: str) -> None:
    with pytest.raises(UserFileError) as error:
        load_yaml(text, file="f.yaml")
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


def test_an_alias_bomb_is_refused_in_milliseconds() -> None:
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for i in range(1, 9):
        previous, name = chr(96 + i), chr(97 + i)
        levels.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    bomb = "\n".join(levels) + "\n"
    assert len(bomb) < 1024
    started = time.process_time()
    with pytest.raises(UserFileError, match="aliases expand to more than 100000"):
        load_yaml(bomb, file="bomb.yaml")
    assert time.process_time() - started < 0.1
    # A big scalar repeated by aliases counts its characters, not one node per use.
    text = "a: &a " + "x" * 20_000 + "\nb: [" + ", ".join(["*a"] * 10) + "]\n"
    with pytest.raises(UserFileError, match="aliases expand"):
        load_yaml(text, file="f.yaml")
    assert load_yaml(text, file="f.yaml", limits=Limits(max_alias_expansion=300_000))


def test_files_that_are_not_utf8_or_too_large(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(UserFileError) as error:
        read_text(path, file="prod/x.yaml")
    assert str(error.value) == "prod/x.yaml:2: not a UTF-8 text file (byte 0xe9 at offset 11)"
    path.write_bytes(b"a: " + b"x" * 100 + b"\n")
    with pytest.raises(UserFileError, match=r"x\.yaml: file is 104 bytes, more than the 64"):
        read_text(path, limits=Limits(max_bytes=64))
    with pytest.raises(UserFileError, match="cannot read: No such file"):
        read_text(tmp_path / "missing.yaml")


def test_offsets_are_exact_after_a_byte_order_mark() -> None:
    text = "\ufeffimage: app:1.0 # {x}\ntag: v2\n"
    [document] = load_documents(text, file=None)
    scalars = [Scalar.of(value) for _, value in document.node.value]
    assert [text[s.start : s.end] for s in scalars if s] == ["app:1.0", "v2"]


def test_custom_tags_pass_the_check_for_round_trip_readers() -> None:
    assert len(check_yaml("a: !Ref x\n---\nb: 1\n", file="t.yaml")) == 2
    with pytest.raises(UserFileError, match="could not determine a constructor"):
        load_yaml("a: !Ref x\n", file="t.yaml")


def test_json_is_bounded_like_yaml() -> None:
    assert load_json(b'{"ref": "refs/heads/main", "n": 12}', file="body") == {
        "ref": "refs/heads/main",
        "n": 12,
    }
    for body, message in [
        (b'{"n": ' + b"1" * 5000 + b"}", "body: integer of 5000 digits"),
        (b"[" * 100_000, "body: nested deeper than 100 levels"),
        (b"[" * 150 + b"]" * 150, "body: nested deeper than 100 levels"),
        (b'{"a":\n', "body:2: invalid JSON: Expecting value"),
        (b"\xff", "body:1: not a UTF-8 text file"),
    ]:
        with pytest.raises(UserFileError) as error:
            load_json(body, file="body")
        assert str(error.value).startswith(message), str(error.value)


def test_pydantic_errors_name_the_line_and_the_field_as_written(tmp_path: Path) -> None:
    text = (
        "environments:\n"
        "  - name: staging\n"
        "    path: staging\n"
        "  - name: production\n"
        "    path: production\n"
        "    gates:\n"
        "      - type: soak\n"
        "        duration: [1]\n"
    )
    with pytest.raises(ConfigError) as error:
        parse_project(text, source="conveyor.yaml")
    assert str(error.value) == (
        "conveyor.yaml:8: environments[1].gates[0].duration: expected a duration like 24h, "
        "got a list"
    )
    channel = tmp_path / "test.yaml"
    channel.write_text("calitp:\n  channel: test\n  releases:\n    - name: a\n      driver: ftp\n")
    with pytest.raises(ConfigError) as error:
        load_channel(channel)
    assert str(error.value) == (
        f"{channel}:5: calitp.releases[0].driver: expected 'helm' or 'kustomize', got 'ftp'"
    )


def test_generated_output_is_bounded_and_a_render_error() -> None:
    assert load_all("a: 1\n---\n---\nb: 2\n") == [{"a": 1}, None, {"b": 2}]  # as before
    with pytest.raises(RenderError, match="recursive alias"):
        load_all(b"a: &a [*a]\n")


def test_templates_are_checked_before_ruamel_reads_them() -> None:
    for text, message in [
        ("kind: ConfigMap\nx: &a [*a]\n", "t.yaml:2: an alias refers to the anchor"),
        ("kind: ConfigMap\nmetadata: [1]\n", "t.yaml:2: metadata: expected a mapping, got a list"),
        ("kind: ConfigMap\nwhen: 2024-02-30\n", "t.yaml:2: invalid YAML: cannot read '2024-02-30'"),
    ]:
        with pytest.raises(TemplateError) as error:
            Template(text, source="t.yaml")
        assert str(error.value).startswith(message), str(error.value)
    assert Template("kind: X  # kept\ny: !Ref z\n", source="t.yaml").render() == (
        "kind: X  # kept\ny: !Ref z\n"
    )


def test_webhook_pushes_to_another_branch_are_answered_and_ignored() -> None:
    assert pushed_branch(b'{"ref": "refs/heads/main"}') == "main"
    assert pushed_branch(b'{"ref": "refs/tags/v1"}') is None
    assert pushed_branch(b"payload=%7B%7D") is None
    assert pushed_branch(b"[" * 10_000) is None
    secret = b"s"
    agent = Agent(Target(repo="unused"), options=AgentOptions(webhook_secret=secret))
    agent._resolved = ResolvedTarget(
        checkout=Checkout(path=Path("."), url="unused", branch="main"),
        revision="0" * 40,
        env_path=".",
        scope="s",
        context=None,
        kubeconfig=None,
    )

    def post(body: bytes) -> httpx.Response:
        signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        return client.post("/hooks/git", content=body, headers={"X-Hub-Signature-256": signature})

    with TestClient(agent.http_app()) as client:
        assert client.post("/hooks/git", content=b"{}").status_code == 401
        ignored = post(b'{"ref": "refs/heads/feature"}')
        assert ignored.status_code == 200
        assert ignored.json() == {"status": "ignored: a push to feature, not main"}
        assert not agent.trigger.is_set()
        assert post(b"[" * 5000).status_code == 202  # unreadable: fetch, as before
        agent.trigger.clear()
        assert post(b'{"ref": "refs/heads/main"}').status_code == 202
    assert agent.trigger.is_set()
