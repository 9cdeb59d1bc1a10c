"""What each sandbox server is: its command line and how to tell it is healthy.

Pure functions of the layout, the ports and the binaries, so the command lines can be
unit-tested without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from conveyor.sandbox.layout import Layout
from conveyor.sandbox.pki import Pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.1/16"  # kwok hands Pod IPs out of this; /16 fits thousands of Pods
PORT_NAMES = (
    "etcd",
    "etcd-peer",
    "apiserver",
    "controller-manager",
    "scheduler",
    "kwok",
    "registry",
)
NODE_NAME = "sandbox-node"


@dataclass(frozen=True)
class Health:
    url: str
    # "client-cert": the apiserver, verified against our CA with the admin cert;
    # "insecure": self-signed serving certs of controller-manager and scheduler;
    # "plain": http.
    mode: str


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    argv: list[str]
    health: Health


def kubeconfig_text(*, name: str, server: str, pki: Pki) -> str:
    context = f"sandbox-{name}"
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": f"{context}-admin",
                    "user": {
                        "client-certificate": str(pki.admin_cert),
                        "client-key": str(pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": context, "context": {"cluster": context, "user": f"{context}-admin"}}
            ],
            "current-context": context,
        },
        sort_keys=False,
    )


def registry_config(layout: Layout, port: int) -> str:
    return yaml.safe_dump(
        {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(layout.registry_data)},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{port}"},
        }
    )


def audit_policy() -> str:
    """Who wrote what, when: every write at Metadata level (user, User-Agent, verb, object,
    times), nothing for reads. Conveyor names its process in its User-Agent, so the log
    tells one writer of an environment from another (the one-writer tests read it)."""
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {
                "level": "Metadata",
                "verbs": ["create", "update", "patch", "delete", "deletecollection"],
            },
            {"level": "None"},
        ],
    }
    return yaml.safe_dump(policy, sort_keys=False)


def audit_log(layout: Layout) -> Path:
    return layout.log_dir / "kube-apiserver-audit.log"


def node_manifest(sandbox: str) -> dict[str, object]:
    """One fake Node. No kwok NoSchedule taint, so ordinary Pods land on it. Room for
    50,000 Pods: the shards benchmark's 10,000 apps need 10,000 (at 5,000, half of them
    stayed Pending and their apps never Ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "conveyor.dev/sandbox": sandbox,
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
        },
        "status": {
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "50000"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "50000"},
        },
    }


def component_specs(
    layout: Layout,
    ports: dict[str, int],
    bin_dir: Path,
    pki: Pki,
) -> list[ComponentSpec]:
    """In start order. The manager starts etcd and the registry, then the apiserver,
    then the rest together."""
    b = bin_dir
    kubeconfig = str(layout.kubeconfig)
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    api = ports["apiserver"]
    return [
        ComponentSpec(
            "etcd",
            [
                str(b / "etcd"),
                "--name=sandbox",
                f"--data-dir={layout.etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=sandbox={peer_url}",
                "--unsafe-no-fsync",  # a throwaway local cluster: speed over durability
                "--log-level=warn",
            ],
            Health(f"{etcd_url}/health", "plain"),
        ),
        ComponentSpec(
            "registry",
            [str(b / "registry"), "serve", str(layout.config_dir / "registry.yaml")],
            Health(f"http://127.0.0.1:{ports['registry']}/v2/", "plain"),
        ),
        ComponentSpec(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api}",
                f"--tls-cert-file={pki.server_cert}",
                f"--tls-private-key-file={pki.server_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # No real network: the kubernetes Service has no reachable endpoint.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--event-ttl=1h",
                f"--audit-policy-file={layout.config_dir / 'audit-policy.yaml'}",
                f"--audit-log-path={audit_log(layout)}",
                "--audit-log-maxsize=200",  # MB, then rotated once: a sandbox's lifetime
                "--audit-log-maxbackup=1",
            ],
            Health(f"https://127.0.0.1:{api}/readyz", "client-cert"),
        ),
        ComponentSpec(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['controller-manager']}",
                f"--cert-dir={layout.root / 'controller-manager'}",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
            ],
            Health(f"https://127.0.0.1:{ports['controller-manager']}/healthz", "insecure"),
        ),
        ComponentSpec(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={layout.root / 'scheduler'}",
                "--leader-elect=false",
                # As for the controller-manager: the client defaults (50 QPS) would pace
                # the binding of a thousand Pods, not the machine.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
            ],
            Health(f"https://127.0.0.1:{ports['scheduler']}/healthz", "insecure"),
        ),
        ComponentSpec(
            "kwok",
            [
                str(b / "kwok"),
                f"--kubeconfig={kubeconfig}",
                f"--config={b / 'kwok-stages.yaml'}",
                "--manage-all-nodes=true",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.1",
                f"--server-address=127.0.0.1:{ports['kwok']}",
                # Renew the node's Lease like a kubelet; without it the node lifecycle
                # controller marks the node (and its Pods) NotReady every grace period.
                "--node-lease-duration-seconds=40",
            ],
            Health(f"http://127.0.0.1:{ports['kwok']}/healthz", "plain"),
        ),
    ]
