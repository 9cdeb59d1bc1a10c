"""Failures the API server reports, as a person reads them (#16): a change refused with a
422 that quotes the object whole, and an admission webhook's denial spread over lines.
Each reads as its cause in one line in the report, the status (its Ready condition) and
`conveyor get apps`; the full text is kept, capped, in the status's `details` and the
Event. A failed Helm upgrade is tests/cluster/test_reconcile.py's
test_failed_helm_upgrade_says_its_cause_and_where_the_value_is_written."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conveyor.causes import DETAILS_LIMIT
from tests.cluster.gitops import ConfigRepo, by_name, kubectl_json, reconcile_json
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


@pytest.fixture
def repo(tmp_path: Path) -> ConfigRepo:
    return ConfigRepo(tmp_path)


def job(namespace: str, image: str) -> str:
    return f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: migrate, namespace: {namespace}}}
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: registry.local/{image}
          env: [{{name: DATABASE, value: api}}]
"""


def recorded(sandbox: SandboxHandle, scope: str, app: str) -> tuple[dict[str, Any], list[str]]:
    """The app's ConveyorApp status and the messages of its Events."""
    status = kubectl_json(sandbox, "get", "conveyorapp", f"{scope}.{app}", "-n", "conveyor-system")
    assert status is not None
    events = kubectl_json(
        sandbox,
        "get",
        "events",
        "-n",
        "conveyor-system",
        "--field-selector",
        f"involvedObject.name={scope}.{app}",
    )
    assert events is not None
    return status["status"], [e["message"] for e in events["items"]]


def assert_readable(
    sandbox: SandboxHandle, repo: ConfigRepo, path: str, app: str, cause: str, *, full: str
) -> None:
    """`cause` leads the one-line message everywhere; `full` is only in the details."""
    code, report = reconcile_json(sandbox, repo, path, "--timeout", "10")
    assert code == 1, report
    summary = by_name(report)[app]
    message = summary["message"]
    assert message.startswith(cause) and len(message) < 400 and "\n" not in message, message
    assert full not in message and full not in json.dumps(report)
    scope = path.replace("/", "-")
    status, events = recorded(sandbox, scope, app)
    assert status["message"] == message and full in status["details"]
    assert len(status["details"]) <= DETAILS_LIMIT
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == message
    event = next(m for m in events if m.startswith(cause))
    assert full in event and len(event) <= DETAILS_LIMIT
    table = subprocess.run(
        [sys.executable, "-m", "conveyor", "get", "apps", "--scope", scope],
        env={**sandbox.env, "COLUMNS": "400"},  # a terminal wide enough for the message
        capture_output=True,
        text=True,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert message in table.stdout and full not in table.stdout


def test_an_immutable_field_refused_with_a_422_reads_as_its_field(
    sandbox: SandboxHandle, repo: ConfigRepo, namespace: str
) -> None:
    path = f"envs/e{uuid.uuid4().hex[:8]}"
    repo.write(f"{path}/migrate/job.yaml", job(namespace, "migrate:1"))
    repo.commit("the migration job")
    code, report = reconcile_json(sandbox, repo, path, "--timeout", "60")
    assert code == 0, report
    # A Job's template cannot change: the API server quotes the whole template back.
    repo.write(f"{path}/migrate/job.yaml", job(namespace, "migrate:2"))
    repo.commit("migrate 2")
    assert_readable(
        sandbox,
        repo,
        path,
        "migrate",
        f"Job {namespace}/migrate: spec.template: field is immutable",
        full="Containers",
    )


class _Denier(BaseHTTPRequestHandler):
    """A validating webhook that refuses Deployments of more than 3 replicas with a
    message over several lines, as policy engines (Kyverno) word theirs."""

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        replicas = (request["object"].get("spec") or {}).get("replicas", 1)
        allowed = replicas <= 3
        metadata = request["object"]["metadata"]
        message = (
            f"\n\nresource Deployment/{request['namespace']}/{metadata['name']} was blocked "
            "due to the following policies\n\nmax-replicas:\n  check-replicas: "
            f"'validation error: at most 3 replicas, got {replicas}. rule check-replicas "
            "failed at path /spec/replicas/'\n"
        )
        response = {"uid": request["uid"], "allowed": allowed}
        if not allowed:
            response["status"] = {"code": 403, "message": message}
        body = json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def denying_webhook(sandbox: SandboxHandle, namespace: str, tmp_path: Path) -> Iterator[None]:
    """The webhook on loopback over TLS (a certificate made here), for `namespace` only."""
    key, cert = tmp_path / "hook.key", tmp_path / "hook.crt"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Denier)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"deny-{namespace}"
    manifest = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "max-replicas.conveyor.test",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{server.server_address[1]}/validate",
                    "caBundle": base64.b64encode(cert.read_bytes()).decode(),
                },
                "rules": [
                    {
                        "apiGroups": ["apps"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["deployments"],
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }
        ],
    }
    sandbox.run("kubectl", "apply", "-f", "-", input=json.dumps(manifest))
    yield
    sandbox.run("kubectl", "delete", "validatingwebhookconfiguration", name, check=False)
    server.shutdown()


def test_an_admission_webhook_denial_reads_as_one_line(
    sandbox: SandboxHandle, repo: ConfigRepo, namespace: str, denying_webhook: None
) -> None:
    path = f"envs/e{uuid.uuid4().hex[:8]}"
    repo.write(
        f"{path}/web/deploy.yaml",
        textwrap.dedent(
            f"""
            apiVersion: apps/v1
            kind: Deployment
            metadata: {{name: web, namespace: {namespace}}}
            spec:
              replicas: 5
              selector: {{matchLabels: {{app: web}}}}
              template:
                metadata: {{labels: {{app: web}}}}
                spec: {{containers: [{{name: main, image: registry.local/web:1}}]}}
            """
        ),
    )
    repo.commit("five replicas")
    assert_readable(
        sandbox,
        repo,
        path,
        "web",
        f'Deployment {namespace}/web: admission webhook "max-replicas.conveyor.test" denied '
        f"the request: resource Deployment/{namespace}/web was blocked due to the following "
        "policies max-replicas: check-replicas: 'validation error: at most 3 replicas, got 5.",
        full="HTTP 403 Forbidden",
    )
