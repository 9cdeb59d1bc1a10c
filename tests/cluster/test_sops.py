"""SOPS-encrypted Secrets (age) in git, on the sandbox: applied decrypted, and the
plaintext in no output conveyor makes (the reconcile report, `-o json`, diffs, the
ConveyorApp status, Events, the agent's log); an undecryptable file stalls only its app
and prunes nothing; the agent reads its key from a cluster Secret (`*.agekey`).

Keys and files are made with the real `age-keygen` and `sops`, which `conveyor sandbox`
puts on PATH beside kubectl and helm."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conveyor.render.discover import app_name
from conveyor.sandbox.versions import TOOL_VERSIONS
from tests.cluster.gitops import (
    CHART,
    ConfigRepo,
    by_name,
    conveyor,
    conveyor_apps,
    deployment,
    flux_kustomization,
    kubectl_json,
    reconcile_json,
    wait_for,
)
from tests.cluster.serve import ServeProcess
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


def age_key(sandbox: SandboxHandle, path: Path) -> str:
    """A new age key file at `path`; its recipient (public key)."""
    sandbox.run("age-keygen", "-o", str(path))
    return sandbox.run("age-keygen", "-y", str(path)).stdout.strip()


def encrypted(
    sandbox: SandboxHandle, repo: ConfigRepo, path: str, text: str, recipient: str
) -> None:
    """Write `text` to `path` in the repo encrypted as Flux's guide says: only data and
    stringData, for `recipient`."""
    repo.write(path, text)
    sandbox.run(
        "sops",
        *("encrypt", "--in-place", "--age", recipient),
        *("--encrypted-regex", "^(data|stringData)$"),
        str(repo.work / path),
    )


def secret(name: str, namespace: str | None, password: str) -> str:
    where = f"\n  namespace: {namespace}" if namespace else ""
    return f"""
apiVersion: v1
kind: Secret
metadata:
  name: {name}{where}
type: Opaque
stringData:
  password: {password}
"""


def forms(*plaintexts: str) -> list[str]:
    """Each value as written and as the API stores it (base64)."""
    return [*plaintexts, *(base64.b64encode(p.encode()).decode() for p in plaintexts)]


def live_password(sandbox: SandboxHandle, name: str, namespace: str) -> str | None:
    live = kubectl_json(sandbox, "get", "secret", name, "-n", namespace)
    if live is None:
        return None
    return base64.b64decode(live["data"]["password"]).decode()


def everything_conveyor_shows(sandbox: SandboxHandle, namespace: str) -> str:
    """The ConveyorApp statuses and the Events of the app's namespace and conveyor's."""
    shown = [
        sandbox.run("kubectl", "get", "conveyorapps", "-n", "conveyor-system", "-o", "json").stdout
    ]
    for where in (namespace, "conveyor-system"):
        shown.append(sandbox.run("kubectl", "get", "events", "-n", where, "-o", "json").stdout)
    return "\n".join(shown)


@pytest.fixture
def keyed(sandbox: SandboxHandle, tmp_path: Path) -> Iterator[tuple[SandboxHandle, Path, str]]:
    """The sandbox with an age key given as $SOPS_AGE_KEY_FILE, the file, its recipient."""
    key_file = tmp_path / "age.agekey"
    recipient = age_key(sandbox, key_file)
    env = {**sandbox.env, "SOPS_AGE_KEY_FILE": str(key_file)}
    env.pop("SOPS_AGE_KEY", None)
    yield SandboxHandle(sandbox.sandbox, env, sandbox.registry), key_file, recipient


def test_encrypted_secrets_in_manifests_and_kustomize_are_applied_and_never_shown(
    keyed: tuple[SandboxHandle, Path, str], namespace: str, tmp_path: Path
) -> None:
    box, key_file, recipient = keyed
    first, second = f"first-{uuid.uuid4().hex}", f"second-{uuid.uuid4().hex}"
    generated, changed = f"generated-{uuid.uuid4().hex}", f"changed-{uuid.uuid4().hex}"
    forbidden = forms(first, second, generated, changed)
    repo = ConfigRepo(tmp_path)
    path = f"envs/sops-{namespace}"
    encrypted(box, repo, f"{path}/web/secret.yaml", secret("web-db", namespace, first), recipient)
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace))
    # kustomize sets the namespace, so the MAC no longer matches: ignored, as Flux does.
    # And a secretGenerator's file encrypted whole: decrypted inside the Secret, as Flux.
    repo.write(
        f"{path}/site/kustomization.yaml",
        f"""
        namespace: {namespace}
        resources: [secret.yaml, deploy.yaml]
        secretGenerator:
          - name: site-creds
            files: [creds.yaml]
        """,
    )
    encrypted(box, repo, f"{path}/site/secret.yaml", secret("site-db", None, second), recipient)
    repo.write(f"{path}/site/creds.yaml", f"user: site\npassword: {generated}\n")
    creds_file = repo.work / path / "site/creds.yaml"
    box.run("sops", "encrypt", "--in-place", "--age", recipient, str(creds_file))
    repo.write(f"{path}/site/deploy.yaml", deployment("site", namespace))
    base = repo.commit("encrypted secrets")

    code, report = reconcile_json(box, repo, path)
    assert code == 0, report
    assert {by_name(report)[a]["ready"] for a in ("web", "site")} == {True}
    assert live_password(box, "web-db", namespace) == first
    assert live_password(box, "site-db", namespace) == second
    secrets = kubectl_json(box, "get", "secrets", "-n", namespace)
    assert secrets is not None
    (creds,) = [s for s in secrets["items"] if s["metadata"]["name"].startswith("site-creds-")]
    plain = base64.b64decode(creds["data"]["creds.yaml"]).decode()
    assert yaml.safe_load(plain) == {"user": "site", "password": generated}
    table = conveyor(box, "reconcile", "--repo", repo.url, "--path", path)
    assert table.returncode == 0, table.stdout + table.stderr
    shown = json.dumps(report) + table.stdout + table.stderr
    shown += everything_conveyor_shows(box, namespace)
    assert not [value for value in forbidden if value in shown]

    encrypted(box, repo, f"{path}/web/secret.yaml", secret("web-db", namespace, changed), recipient)
    head = repo.commit("the web password changes")
    live = conveyor(box, "diff", "--repo", repo.url, "--path", path)
    assert live.returncode == 1, live.stdout + live.stderr
    assert "# web: update Secret" in live.stdout
    assert "password: '*** (secret value changed)'" in live.stdout
    offline = conveyor(
        box,
        *("diff", "--repo", str(repo.work), "--base", base, "--head", head, "--path", path),
        *("--sops-age-key-file", str(key_file)),
    )
    assert offline.returncode == 1, offline.stdout + offline.stderr
    assert "password: '*** (secret value changed)'" in offline.stdout
    serve = ServeProcess(box, tmp_path, "--repo", repo.url)
    try:
        scope = app_name(path.replace("/", "-"))
        api = httpx.get(f"{serve.url}/api/v1/environments/{scope}/apps/web/diff", timeout=120)
        assert api.json()["error"] is None, api.text
        dashboard = api.text + "".join(
            httpx.get(f"{serve.url}{page}", timeout=120).text.replace("&#39;", "'")
            for page in (f"/partials/diff/{scope}/web", f"/environments/{scope}/apps/web")
        )
    finally:
        serve.stop()
    assert "password: '*** (secret value changed)'" in dashboard
    for output in (
        live.stdout + live.stderr,
        offline.stdout + offline.stderr,
        dashboard + serve.log.read_text(),
    ):
        assert not [value for value in forbidden if value in output], output
    assert live_password(box, "web-db", namespace) == first  # a diff applies nothing


def test_an_undecryptable_file_stalls_only_its_app_and_prunes_nothing(
    keyed: tuple[SandboxHandle, Path, str], namespace: str, tmp_path: Path
) -> None:
    box, _key_file, recipient = keyed
    password = f"kept-{uuid.uuid4().hex}"
    repo = ConfigRepo(tmp_path)
    path = f"envs/sops-bad-{namespace}"
    encrypted(
        box, repo, f"{path}/web/secret.yaml", secret("web-db", namespace, password), recipient
    )
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace))
    repo.write(f"{path}/other/deploy.yaml", deployment("other", namespace))
    repo.commit("good")
    code, report = reconcile_json(box, repo, path)
    assert code == 0, report

    stranger = age_key(box, tmp_path / "stranger.agekey")
    encrypted(box, repo, f"{path}/web/secret.yaml", secret("web-db", namespace, "new"), stranger)
    repo.write(f"{path}/other/deploy.yaml", deployment("other", namespace, replicas=2))
    repo.commit("web's secret for a key the cluster does not have; other scales")
    code, report = reconcile_json(box, repo, path)
    assert code == 1, report
    web, other = by_name(report)["web"], by_name(report)["other"]
    assert other["ready"] is True
    assert web["ready"] is False and web["reason"] == "RenderFailed", web
    assert web["message"] == (
        f"{path}/web/secret.yaml:1: Secret {namespace}/web-db: cannot be decrypted: "
        "no age key given can decrypt it"
    )
    assert live_password(box, "web-db", namespace) == password  # nothing pruned or changed
    assert kubectl_json(box, "get", "deployment", "web", "-n", namespace) is not None
    other_live = kubectl_json(box, "get", "deployment", "other", "-n", namespace)
    assert other_live is not None and other_live["spec"]["replicas"] == 2

    corrupt = (repo.work / path / "web" / "secret.yaml").read_text()
    marker = "password: ENC[AES256_GCM,data:"
    start = corrupt.index(marker) + len(marker)
    flipped = ("A" if corrupt[start] != "A" else "B") + corrupt[start + 1 :]
    repo.write(f"{path}/web/secret.yaml", corrupt[:start] + flipped)
    repo.commit("a corrupt file")
    code, report = reconcile_json(box, repo, path)
    assert code == 1, report
    assert by_name(report)["web"]["message"].startswith(f"{path}/web/secret.yaml:1: ")
    assert live_password(box, "web-db", namespace) == password


def test_helm_values_from_an_encrypted_secret_beside_the_release(
    keyed: tuple[SandboxHandle, Path, str], namespace: str, tmp_path: Path
) -> None:
    box, key_file, recipient = keyed
    token = f"token-{uuid.uuid4().hex}"
    box.run("helm", "package", str(CHART), "--destination", str(tmp_path))
    box.run(
        "helm",
        *("push", str(tmp_path / "service-0.1.0.tgz")),
        *(f"oci://{box.registry}/sops-charts", "--plain-http"),
    )
    repo = ConfigRepo(tmp_path)
    path = f"envs/sops-helm-{namespace}"
    values = f"""
apiVersion: v1
kind: Secret
metadata: {{name: api-values, namespace: {namespace}}}
stringData:
  values.yaml: |
    replicaCount: 2
    token: {token}
"""
    release = f"""
apiVersion: source.toolkit.fluxcd.io/v1beta2
kind: OCIRepository
metadata: {{name: service-chart, namespace: {namespace}}}
spec:
  url: oci://{box.registry}/sops-charts/service
  ref: {{tag: 0.1.0}}
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata: {{name: api, namespace: {namespace}}}
spec:
  chartRef: {{kind: OCIRepository, name: service-chart}}
  valuesFrom:
    - kind: Secret
      name: api-values
"""
    encrypted(box, repo, f"{path}/values.yaml", values, recipient)
    # The Secret goes with the release: the same file, encrypted in place as a whole.
    text = (repo.work / path / "values.yaml").read_text()
    repo.write(f"{path}/api.yaml", release + "\n---\n" + text)
    (repo.work / path / "values.yaml").unlink()
    repo.commit("a release whose values are encrypted")

    code, report = reconcile_json(box, repo, path)
    assert code == 0, report
    got = json.loads(box.run("helm", "get", "values", "api", "-n", namespace, "-o", "json").stdout)
    assert got == {"replicaCount": 2, "token": token}
    offline = conveyor(
        box,
        *("diff", "--repo", str(repo.work), "--base", "HEAD", "--head", "HEAD", "--path", path),
        *("--sops-age-key-file", str(key_file)),
    )
    assert offline.returncode == 0, offline.stdout + offline.stderr
    shown = json.dumps(report) + offline.stdout + offline.stderr
    shown += everything_conveyor_shows(box, namespace)
    assert not [value for value in forms(token) if value in shown]


def test_the_agent_decrypts_with_the_agekey_of_the_secret_conveyor_yaml_names(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    password = f"agent-{uuid.uuid4().hex}"
    key_file = tmp_path / "keys.txt"
    recipient = age_key(sandbox, key_file)
    sandbox.run(
        "kubectl",
        *("create", "secret", "generic", "sops-age", "-n", namespace),
        f"--from-file=age.agekey={key_file}",
    )
    repo = ConfigRepo(tmp_path)
    env_name = f"sops-{namespace}"
    path = f"envs/{env_name}"
    repo.write(
        "conveyor.yaml",
        f"""
        environments:
          - name: {env_name}
            path: {path}
            decryption:
              provider: sops
              secretRef: {{name: sops-age, namespace: {namespace}}}
        """,
    )
    encrypted(
        sandbox, repo, f"{path}/web/secret.yaml", secret("web-db", namespace, password), recipient
    )
    repo.commit("an environment whose keys are in the cluster")
    env = {k: v for k, v in sandbox.env.items() if not k.startswith("SOPS_AGE_")}
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "agent", "--repo", repo.url, "--env", env_name],
        env=env,
        stdout=log.open("w"),  # the agent logs on stdout
        stderr=subprocess.STDOUT,
    )

    def web_ready() -> bool:
        items = [i for i in conveyor_apps(sandbox, env_name) if i["spec"].get("app") == "web"]
        assert agent.poll() is None, log.read_text()
        return bool(items) and items[0].get("status", {}).get("state") == "Ready"

    try:
        wait_for(web_ready, timeout=180, what="the agent to apply the decrypted Secret")
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert live_password(sandbox, "web-db", namespace) == password
    shown = log.read_text()
    assert "web" in shown  # the agent logged its work on the app
    shown += everything_conveyor_shows(sandbox, namespace)
    assert not [value for value in forms(password) if value in shown]


def test_a_flux_kustomization_decrypts_with_its_decryption_secret_ref(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    """A Flux Kustomization with `spec.decryption: {provider: sops, secretRef}`: its
    build is decrypted with that Secret's `*.agekey`, read from the cluster in the
    Kustomization's namespace (flux-system), with no key on the machine."""
    password = f"flux-{uuid.uuid4().hex}"
    key_file = tmp_path / "keys.txt"
    recipient = age_key(sandbox, key_file)
    sandbox.run("kubectl", "create", "namespace", "flux-system", check=False)
    secret_name = f"sops-{namespace}"
    sandbox.run(
        "kubectl",
        *("create", "secret", "generic", secret_name, "-n", "flux-system"),
        f"--from-file=age.agekey={key_file}",
    )
    repo = ConfigRepo(tmp_path)
    cluster = f"clusters/{namespace}"
    repo.write(
        f"{cluster}/apps.yaml",
        flux_kustomization(
            "apps",
            f"./apps/{namespace}",
            decryption={"provider": "sops", "secretRef": {"name": secret_name}},
        ),
    )
    repo.write(f"apps/{namespace}/kustomization.yaml", "resources: [secret.yaml]\n")
    encrypted(
        sandbox,
        repo,
        f"apps/{namespace}/secret.yaml",
        secret("flux-db", namespace, password),
        recipient,
    )
    repo.commit("a Flux Kustomization with an encrypted Secret")
    env = {k: v for k, v in sandbox.env.items() if not k.startswith("SOPS_AGE_")}
    box = SandboxHandle(sandbox.sandbox, env, sandbox.registry)
    try:
        code, report = reconcile_json(box, repo, cluster)
        assert code == 0, report
        assert by_name(report)["apps"]["ready"] is True
        assert live_password(sandbox, "flux-db", namespace) == password
        shown = json.dumps(report) + everything_conveyor_shows(sandbox, namespace)
        assert not [value for value in forms(password) if value in shown]
    finally:
        sandbox.run("kubectl", "delete", "secret", secret_name, "-n", "flux-system", check=False)


def test_generator_files_encrypted_with_sops_give_a_release_its_values(
    keyed: tuple[SandboxHandle, Path, str], namespace: str, tmp_path: Path
) -> None:
    """A Flux Kustomization whose overlay generates a Secret from a SOPS-encrypted values
    file (`files:`) and dotenv file (`envs:`): decrypted before the build, as Flux does,
    into a copy (the checkout stays encrypted); a HelmRelease takes its values from the
    generated Secret. A file for a key nobody has stalls the app naming the file."""
    box, _key_file, recipient = keyed
    password, token = f"pw-{uuid.uuid4().hex}", f"tk-{uuid.uuid4().hex}"
    box.run("helm", "package", str(CHART), "--destination", str(tmp_path))
    box.run(
        "helm",
        *("push", str(tmp_path / "service-0.1.0.tgz")),
        *(f"oci://{box.registry}/sops-generated", "--plain-http"),
    )
    repo = ConfigRepo(tmp_path)
    cluster, apps = f"clusters/{namespace}", f"apps/{namespace}"
    repo.write(
        f"{cluster}/apps.yaml",
        flux_kustomization("apps", f"./{apps}", decryption={"provider": "sops"}),
    )
    repo.write(
        f"{apps}/kustomization.yaml",
        f"""
        namespace: {namespace}
        resources: [release.yaml]
        secretGenerator:
          - name: api-values
            files: [values.yaml=values.sops.yaml]
            envs: [api.env]
        generatorOptions: {{disableNameSuffixHash: true}}
        """,
    )
    repo.write(
        f"{apps}/release.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1beta2
        kind: OCIRepository
        metadata: {{name: service-chart}}
        spec:
          url: oci://{box.registry}/sops-generated/service
          ref: {{tag: 0.1.0}}
        ---
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {{name: api}}
        spec:
          chartRef: {{kind: OCIRepository, name: service-chart}}
          valuesFrom:
            - {{kind: Secret, name: api-values, valuesKey: values.yaml}}
            - {{kind: Secret, name: api-values, valuesKey: TOKEN, targetPath: token}}
        """,
    )
    repo.write(f"{apps}/values.sops.yaml", f"replicaCount: 2\npassword: {password}\n")
    repo.write(f"{apps}/api.env", f"TOKEN={token}\n")
    for name in ("values.sops.yaml", "api.env"):
        box.run("sops", "encrypt", "--in-place", "--age", recipient, str(repo.work / apps / name))
    repo.commit("values in encrypted generator files")

    code, report = reconcile_json(box, repo, cluster)
    assert code == 0, json.dumps(report)
    got = json.loads(box.run("helm", "get", "values", "api", "-n", namespace, "-o", "json").stdout)
    assert got == {"replicaCount": 2, "password": password, "token": token}
    live = kubectl_json(box, "get", "secret", "api-values", "-n", namespace)
    assert live is not None
    assert base64.b64decode(live["data"]["TOKEN"]).decode() == token
    shown = json.dumps(report) + everything_conveyor_shows(box, namespace)
    assert not [value for value in forms(password, token) if value in shown]

    stranger = age_key(box, tmp_path / "stranger.agekey")
    repo.write(f"{apps}/api.env", "TOKEN=other\n")
    box.run("sops", "encrypt", "--in-place", "--age", stranger, str(repo.work / apps / "api.env"))
    repo.commit("api.env for a key the cluster does not have")
    code, report = reconcile_json(box, repo, cluster)
    assert code == 1, report
    failed = by_name(report)["apps"]
    assert failed["reason"] == "RenderFailed", failed
    assert failed["message"] == (
        f"{cluster}/apps.yaml:1: Kustomization apps: {apps}/api.env: cannot be decrypted: "
        "no age key given can decrypt it"
    )
    got = json.loads(box.run("helm", "get", "values", "api", "-n", namespace, "-o", "json").stdout)
    assert got["token"] == token  # the release keeps what it had


def test_sandbox_env_puts_sops_and_age_on_path(sandbox: SandboxHandle, tmp_path: Path) -> None:
    lines = conveyor(sandbox, "sandbox", "env", "--name", sandbox.sandbox.name, check=True).stdout
    shell = subprocess.run(
        [
            "bash",
            "-c",
            f"{lines}\nsops --version --disable-version-check; age --version; age-keygen --version",
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # nothing but what env printed
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.split() == [
        "sops",
        TOOL_VERSIONS.sops.lstrip("v"),
        TOOL_VERSIONS.age,
        TOOL_VERSIONS.age,
    ]
