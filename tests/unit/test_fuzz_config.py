"""Fuzzing every reader of users' files through the entry point a command calls.

The property (issue #10, "nothing lost, nothing run"): whatever bytes a file holds, the
reader returns, or raises one of conveyor's errors with a one-line message; never another
exception, never a hang, and never more than a bounded amount of memory. Inputs are the
issue's reproducers, byte mutations of the example files and of valid seeds, and valid
files with a random subtree swapped for a random YAML value.

The unit run is derandomized and small (CI time matters); `make fuzz` runs the same tests
with the `fuzz` profile: many more examples, new ones each run.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from conveyor.config.channel import load_channel
from conveyor.config.project import ConfigError, load_project
from conveyor.config.publish_profile import load_publish_profile
from conveyor.config.userfile import load_json
from conveyor.images.automation import discover
from conveyor.images.writeback import write_changes
from conveyor.images.yamltext import YamlTextError
from conveyor.promote.approvals import approvers
from conveyor.publish.ci_privileges import CiPrivilegesError, load_repositories, render_template
from conveyor.publish.publisher import PublishError, plan, prepare
from conveyor.publish.template import Setting, TemplateError
from conveyor.publish.version import Event, VersionError
from conveyor.reconcile.agent import Agent, AgentOptions
from conveyor.reconcile.target import Target
from conveyor.render.documents import RenderError, load_all, load_documents
from conveyor.source.webhook import WebhookLimits

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

settings.register_profile(
    "unit",
    max_examples=int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "12")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "1500")),
    # No "explain" phase: its line tracing makes a slow case look like a hang.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    deadline=None,  # failures are kept in .hypothesis/ and tried first on the next run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile(os.environ.get("CONVEYOR_FUZZ_PROFILE", "unit"))

# Each case: at most this much CPU time and memory (Python allocations, measured). CPU
# time, not wall time: the machine running the tests may be busy with other work.
MAX_CPU_SECONDS = 2.0
MAX_BYTES = 64 * 1024 * 1024
HANG_SECONDS = 30  # a case still running then (wall time) is stopped and fails as a hang


# -- the readers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    """One entry point: `run(folder, data)` writes `data` where the reader looks, reads."""

    name: str
    seeds: tuple[bytes, ...]
    errors: tuple[type[Exception], ...]
    run: Callable[[Path, bytes], object]


def _example(*parts: str) -> bytes:
    return EXAMPLES.joinpath(*parts).read_bytes()


PROJECT_SEED = b"""\
environments:
  - name: staging
    path: staging
    gates:
      - {type: healthy}
  - name: production
    path: production
    branch: main
    cluster: {context: prod}
    gates:
      - type: queue-empty
        queues: [jobs]
        regions: [us-west-2]
        timeout: 30m
      - type: approval
        count: 2
        approvers: [alice, bob]
      - type: soak
        duration: 24h
      - type: http
        url: http://127.0.0.1:1/ready
        json: {status: ok}
guard:
  protected: ["production/**"]
  identities: [ci@example.com]
notifications:
  - events: [applied, failed]
    slack: {url-from: {env: CONVEYOR_SLACK}}
  - webhook: {url: "http://127.0.0.1:1/hook", secret: {file: hook}}
"""


def _manifests(folder: Path, data: bytes) -> object:
    (folder / "app.yaml").write_bytes(data)
    return load_documents(folder / "app.yaml", relative_to=folder)


def _generated(folder: Path, data: bytes) -> object:
    return load_all(data)  # helm and kustomize output: no file, same bounds


def _project(folder: Path, data: bytes) -> object:
    (folder / "conveyor.yaml").write_bytes(data)
    return load_project(folder)


def _channel(folder: Path, data: bytes) -> object:
    (folder / "test.yaml").write_bytes(data)
    return load_channel(folder / "test.yaml")


def _profile(folder: Path, data: bytes) -> object:
    (folder / "publish.yaml").write_bytes(data)
    return load_publish_profile(folder / "publish.yaml")


def _publish(folder: Path, profile: bytes, template: bytes) -> object:
    """What `conveyor publish --dry-run` does: the profile, the plan, every file filled."""
    (folder / "publish.yaml").write_bytes(profile)
    (folder / ".flux.yaml").write_bytes(template)
    loaded = load_publish_profile(folder / "publish.yaml")
    build = plan(
        {}, profile=loaded, app="ui", ref="refs/heads/master", sha="ab" * 20, event=Event.push
    )
    return prepare(
        build,
        profile=loaded,
        profile_source="publish.yaml",
        template_path=folder / ".flux.yaml",
        environments=list(loaded.environments),
    )


PROFILE_SEED = _example("apps", "ui", ".conveyor", "publish.yaml")
TEMPLATE_SEED = _example("apps", "ui", ".flux.yaml")


def _template(folder: Path, data: bytes) -> object:
    return _publish(folder, PROFILE_SEED, data)


def _filled_by_profile(folder: Path, data: bytes) -> object:
    return _publish(folder, data, TEMPLATE_SEED)


def _set_option(folder: Path, data: bytes) -> object:
    return Setting.parse("HelmRelease:spec.values.x=" + data.decode("utf-8", "replace"))


def _ci(folder: Path, data: bytes) -> object:
    (folder / ".ci.yaml").write_bytes(data)
    return render_template(load_repositories([str(folder)], owner="o"), role_prefix="ci")


def _images(folder: Path, data: bytes) -> object:
    """`conveyor images scan` then the write-back of `images update`, for every watch."""
    (folder / "app.yaml").write_bytes(data)
    found = discover(folder)
    return write_changes(folder, ".", {a.watch: "9.9.9" for a in found.automations})


def _approvals(folder: Path, data: bytes) -> object:
    (folder / "approvals" / "production").mkdir(parents=True)
    (folder / "approvals" / "production" / "1.0.0.yaml").write_bytes(data)
    return approvers(folder, "production", "1.0.0")


SECRET = b"hook secret"


def _webhook(folder: Path, data: bytes) -> object:
    """The agent's /hooks/git with a correctly signed body: 202 or 200, or 413 for a body
    past the receiver's cap (source/webhook.py); nothing else."""
    agent = Agent(Target(repo="unused"), options=AgentOptions(webhook_secret=SECRET))
    signature = "sha256=" + hmac.new(SECRET, data, hashlib.sha256).hexdigest()
    with TestClient(agent.http_app(), raise_server_exceptions=True) as client:
        response = client.post(
            "/hooks/git", content=data, headers={"X-Hub-Signature-256": signature}
        )
    allowed = (200, 202, 413) if len(data) > WebhookLimits().max_body_bytes else (200, 202)
    assert response.status_code in allowed, response.text
    return response


IMAGE_SEEDS = tuple(
    p.read_bytes() for p in sorted((ROOT / "tests/fixtures/images").rglob("*.yaml"))
)
MANIFEST_SEEDS = tuple(
    p.read_bytes()
    for p in sorted(EXAMPLES.rglob("*.yaml"))
    if "templates" not in p.parts and not p.name.startswith(".")
)
PUBLISH_ERRORS = (ConfigError, VersionError, PublishError, TemplateError)

READERS = [
    Reader("manifests", MANIFEST_SEEDS, (RenderError,), _manifests),
    Reader("generated", MANIFEST_SEEDS, (RenderError,), _generated),
    Reader("conveyor.yaml", (PROJECT_SEED,), (ConfigError,), _project),
    Reader("channel", (_example("calitp", "channels", "test.yaml"),), (ConfigError,), _channel),
    Reader("publish profile", (PROFILE_SEED,), (ConfigError,), _profile),
    Reader(
        "template",
        (TEMPLATE_SEED, _example("apps", "api", ".flux.yaml")),
        PUBLISH_ERRORS,
        _template,
    ),
    Reader("profile filling", (PROFILE_SEED,), PUBLISH_ERRORS, _filled_by_profile),
    Reader("--set", (b"3", b"{a: 1}", b"[x, y]"), (TemplateError,), _set_option),
    Reader(".ci.yaml", (_example("apps", "ui", ".ci.yaml"),), (CiPrivilegesError,), _ci),
    Reader("image policies", IMAGE_SEEDS, (YamlTextError,), _images),
    Reader(
        "approvals", (b"approvals:\n  - {by: alice, at: '2024-01-01T00:00:00Z'}\n",), (), _approvals
    ),
    Reader(
        "webhook body", (b'{"ref": "refs/heads/main", "after": "ab12"}', b"payload=x"), (), _webhook
    ),
]


# -- the property ----------------------------------------------------------------------------


class Hang(Exception):
    """A case ran past HANG_SECONDS (no reader catches it: it is not one of their errors)."""


@contextmanager
def bounded() -> Iterator[None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(reader: Reader, data: bytes) -> None:
    """Run one case; fail unless it returned or raised one of the reader's errors, with a
    one-line message, within MAX_CPU_SECONDS and MAX_BYTES."""
    with tempfile.TemporaryDirectory(prefix="conveyor-fuzz-") as folder:
        tracemalloc.start()
        started = time.process_time()
        try:
            with bounded():
                reader.run(Path(folder), data)
        except reader.errors as error:
            message = str(error)
            assert message.strip(), f"{reader.name}: {type(error).__name__} without a message"
            assert "\n" not in message.strip(), (
                f"{reader.name}: message on several lines: {message!r}"
            )
            assert "Traceback" not in message
        finally:
            elapsed = time.process_time() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert elapsed < MAX_CPU_SECONDS, f"{reader.name}: {elapsed:.1f} s CPU for {len(data)} bytes"
    assert peak < MAX_BYTES, f"{reader.name}: {peak / 2**20:.0f} MiB for {len(data)} bytes"


# -- inputs ----------------------------------------------------------------------------------

BOMB = b"a: &a [x,x,x,x,x,x,x,x,x]\n" + b"".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n".encode()
    for i in range(8)
)
REPRODUCERS = {
    "5000 digits": b"data: {n: " + b"1" * 5000 + b"}\n",
    "recursive alias": b"data: &a {x: *a}\n",
    "recursive merge": b"data: &a {<<: *a}\n",
    "alias bomb": BOMB,
    "string bomb": b"a: &a " + b"x" * 50_000 + b"\nb: [" + b",".join([b"*a"] * 200) + b"]\n",
    "not UTF-8": b"environments:\n  - name: \xff\xfe\n",
    "gate duration [1]": PROJECT_SEED.replace(b"duration: 24h", b"duration: [1]"),
    "3000 levels": b"".join(b" " * i + b"a:\n" for i in range(3000)),
    "3000 flow levels": b"[" * 3000 + b"]" * 3000,
    "200 levels": b"[" * 200 + b"]" * 200,
    "bad date": b"a: 2024-02-30\n",
    "tagged int": b"a: !!int abc\n",
    "bad escape in a setter": b'image: x:1 # {"$imagepolicy": "a\\q"}\n',
    "too large": b"a: " + b"x" * (9 * 1024 * 1024) + b"\n",
    "empty": b"",
    "a list": b"- 1\n- 2\n",
    "a scalar": b"just text\n",
    "documents": b"---\n---\na: 1\n---\n",
    "custom tag": b"a: !Ref x\n",
    # Found by `make fuzz`: PyYAML's IndexError on an empty tagged int; a key written
    # across lines made a message of two lines.
    "empty tagged int": b"a: !!int \n",
    "key across lines": b"? '\n\n  '\n: null\n",
    # and a FILLED_IN_BY_CI left under such a key: a two-line PublishError.
    "marker under a key across lines": TEMPLATE_SEED.replace(
        b"apiVersion: v1\n", b"apiVersion:\n  ? '\n\n    '\n  : FILLED_IN_BY_CI\n", 1
    ),
}

TOKENS = [
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!int ",
    b"!!timestamp ",
    b"!!binary ",
    b"!!set ",
    b"!!float ",
    b"!!bool ",
    b"!!python/object:os.system ",
    b"!Ref ",
    b"[",
    b"]",
    b"{",
    b"}",
    b": ",
    b"\n- ",
    b"\n  ",
    b"---\n",
    b"...\n",
    b"? ",
    b"|\n",
    b">-\n",
    b"'",
    b'"',
    b"# ",
    b"\t",
    b"\xff",
    b"\xef\xbb\xbf",
    b"1" * 200,
    b"0" + b"9" * 150,
    b"2024-02-30",
    b"~",
    b"null",
    b"true",
    b"1e999",
    b".nan",
    b"-.inf",
    b"0x" + b"f" * 300,
    b"\x00",
    b"%YAML 1.1\n",
    b"1..5m",
    b"-1",
    b"${x}",
    b"FILLED_IN_BY_CI",
    b"{{ .Values.x }}",
    b'# {"$imagepolicy": "flux-system:api:tag"}',
    b"\r\n",
    b"\\",
    b"\xc3",
    "\u2028".encode(),
]


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    """A seed with a few byte-level edits: flips, deletions, YAML tokens, copies."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "delete", "token", "copy", "byte"]))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "token":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "copy" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 64))]
        else:
            data[at:at] = bytes([draw(st.integers(0, 255))])
    return bytes(data)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        ["24h", "5m", "", "-", "..", "/etc", "glob:*", "semver:>=1", "FILLED_IN_BY_CI"]
    )
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


@st.composite
def reshaped(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    """A valid seed with one of its values (any depth) replaced by a random YAML value."""
    documents = list(yaml.safe_load_all(draw(st.sampled_from(seeds))))
    index = draw(st.integers(0, len(documents) - 1))
    paths = list(_paths(documents[index]))
    path = draw(st.sampled_from(paths))
    replacement = draw(VALUES)
    if not path:
        documents[index] = replacement
    else:
        parent = documents[index]
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = replacement
    return yaml.safe_dump_all(documents, sort_keys=False).encode()


# -- the tests --------------------------------------------------------------------------------

IDS = [r.name for r in READERS]


@pytest.mark.parametrize("reader", READERS, ids=IDS)
@pytest.mark.parametrize("name", list(REPRODUCERS))
def test_issue_reproducers_are_errors_with_a_message(reader: Reader, name: str) -> None:
    check(reader, REPRODUCERS[name])


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_seeds_are_read(reader: Reader) -> None:
    for seed in reader.seeds:
        check(reader, seed)


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_mutated_bytes(reader: Reader) -> None:
    @FUZZ
    @given(data=mutated(reader.seeds))
    def case(data: bytes) -> None:
        check(reader, data)

    case()


@pytest.mark.parametrize("reader", [r for r in READERS if r.name != "webhook body"], ids=IDS[:-1])
def test_random_values_in_valid_files(reader: Reader) -> None:
    @FUZZ
    @given(data=reshaped(reader.seeds))
    def case(data: bytes) -> None:
        check(reader, data)

    case()


def test_the_bounds_hold_for_the_reproducers() -> None:
    """The reproducers are refused, fast and with the cause named (not only "an error")."""
    causes = {
        "5000 digits": "integer of 5000 digits",
        "recursive alias": "recursive alias",
        "alias bomb": "aliases expand",
        "string bomb": "aliases expand",
        "not UTF-8": "not a UTF-8 text file",
        "3000 levels": "nesting depth",
        "200 levels": "nested deeper than 100 levels",
        "too large": "more than the 8388608 bytes",
    }
    for name, cause in causes.items():
        started = time.process_time()
        with pytest.raises(ConfigError, match=cause) as error:
            load_project_text(REPRODUCERS[name])
        assert time.process_time() - started < 0.5, name
        assert str(error.value).startswith("conveyor.yaml:"), str(error.value)
    with pytest.raises(ConfigError) as error:
        load_project_text(REPRODUCERS["gate duration [1]"])
    assert str(error.value) == (
        "conveyor.yaml:19: environments[1].gates[2].duration: expected a duration like 24h, "
        "got a list"
    )
    assert load_json(b'{"a": [1, 2]}', file="body") == {"a": [1, 2]}


def load_project_text(data: bytes) -> object:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "conveyor.yaml").write_bytes(data)
        try:
            return load_project(Path(folder))
        except ConfigError as error:
            raise ConfigError(str(error).replace(f"{folder}/", "")) from None
