"""Run the demo: sandbox up, the sample apps installed with Helm, a table of what runs.

`DEMO_EXIT=1` (CI) returns as soon as the table is printed; otherwise the sandbox is
left running for exploration and the command prints how to use and stop it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from conveyor.sandbox import Sandbox, SandboxError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NAMESPACE = "demo"
APPS = {
    "ui": {"replicaCount": "2", "image.repository": "registry.local/ui", "image.tag": "1.4.0"},
    "api": {"replicaCount": "2", "image.repository": "registry.local/api", "image.tag": "2.0.1"},
    "worker": {
        "replicaCount": "1",
        "image.repository": "registry.local/worker",
        "image.tag": "2.0.1",
        "service.enabled": "false",
    },
}


def main() -> int:
    console = Console()
    sandbox_name = os.environ.get("DEMO_SANDBOX", "demo")
    started = time.monotonic()
    with console.status("starting the sandbox (the first run builds Kubernetes)") as spinner:
        sandbox = Sandbox(sandbox_name, progress=spinner.update)
        try:
            state = sandbox.up()
        except SandboxError as error:
            console.print(f"[red]sandbox failed:[/] {error}")
            return 2
    env = {
        **os.environ,
        "KUBECONFIG": str(sandbox.kubeconfig),
        "PATH": f"{state.bin_dir}{os.pathsep}{os.environ['PATH']}",
    }

    def run(*args: str) -> str:
        return subprocess.run(
            list(args), env=env, check=True, capture_output=True, text=True
        ).stdout

    chart = str(EXAMPLES / "charts" / "service")
    with console.status("installing ui, api and worker with helm") as spinner:
        for app, values in APPS.items():
            spinner.update(f"helm upgrade --install {app}")
            sets = [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]
            run(
                "helm",
                "upgrade",
                "--install",
                app,
                chart,
                "--namespace",
                NAMESPACE,
                "--create-namespace",
                "--wait",
                "--timeout",
                "120s",
                *sets,
            )

    releases = json.loads(run("helm", "list", "-n", NAMESPACE, "-o", "json"))
    deployments = {
        d["metadata"]["name"]: d
        for d in json.loads(run("kubectl", "get", "deployments", "-n", NAMESPACE, "-o", "json"))[
            "items"
        ]
    }
    table = Table(title=f"sandbox {sandbox_name}: namespace {NAMESPACE}")
    for column in ("release", "chart", "revision", "status", "image", "ready"):
        table.add_column(column)
    all_ready = True
    for release in releases:
        deployment = deployments.get(release["name"], {})
        spec = deployment.get("spec", {})
        ready = deployment.get("status", {}).get("readyReplicas", 0)
        wanted = spec.get("replicas", 0)
        all_ready &= ready == wanted and wanted > 0
        image = spec.get("template", {}).get("spec", {}).get("containers", [{}])[0].get("image")
        table.add_row(
            release["name"],
            release["chart"],
            str(release["revision"]),
            release["status"],
            str(image),
            f"[green]{ready}/{wanted}" if ready == wanted else f"[red]{ready}/{wanted}",
        )
    console.print(table)
    console.print(
        f"done in {time.monotonic() - started:.0f}s. Explore with:\n"
        f'  eval "$(.venv/bin/conveyor sandbox env --name {sandbox_name})"\n'
        f"  kubectl get pods -n {NAMESPACE}; helm list -A\n"
        f"Stop it with: .venv/bin/conveyor sandbox down --name {sandbox_name}"
    )
    return 0 if all_ready else 1


if __name__ == "__main__":
    sys.exit(main())
