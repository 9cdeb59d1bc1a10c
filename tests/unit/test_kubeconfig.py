"""kubeconfig merging ($KUBECONFIG=a:b), in-cluster credentials and token re-reading,
on files in a temporary directory. The sandbox tests (tests/cluster/test_in_cluster.py)
check the same against a real apiserver and a real helm."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import yaml

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import BearerToken
from conveyor.cluster.kubeconfig import ClusterCredentials, KubeconfigError
from conveyor.reconcile.target import helm_cli


def _config(path: Path, name: str, *, server: str, current: bool = True, **user: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": name, "cluster": {"server": server}}],
                "users": [{"name": name, "user": user or {"token": f"token-{name}"}}],
                "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
                **({"current-context": name} if current else {}),
            }
        )
    )
    return path


def test_kubeconfig_lists_several_files_merged_as_kubectl_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = _config(tmp_path / "staging", "staging", server="https://staging:6443")
    production = _config(tmp_path / "production", "production", server="https://prod:6443")
    monkeypatch.setenv("KUBECONFIG", f"{staging}{os.pathsep}{production}")

    # current-context comes from the first file; the second file's context is found.
    assert kubeconfig.load().server == "https://staging:6443"
    credentials = kubeconfig.load(context="production")
    assert (credentials.server, credentials.token) == ("https://prod:6443", "token-production")


def test_the_first_file_to_name_an_entry_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _config(tmp_path / "first", "shared", server="https://first:6443")
    second = _config(tmp_path / "second", "shared", server="https://second:6443")
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{second}")
    assert kubeconfig.load(context="shared").server == "https://first:6443"


def test_missing_listed_files_are_skipped_but_not_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _config(tmp_path / "real", "real", server="https://real:6443")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'gone'}{os.pathsep}{real}")
    assert kubeconfig.load().server == "https://real:6443"
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'gone'}{os.pathsep}{tmp_path / 'also'}")
    with pytest.raises(KubeconfigError, match="none of these files exists"):
        kubeconfig.load()


def test_relative_file_fields_resolve_against_their_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _config(tmp_path / "a" / "config", "one", server="https://one:6443")
    second = _config(
        tmp_path / "b" / "config", "two", server="https://two:6443", tokenFile="secrets/token"
    )
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{second}")
    assert kubeconfig.load(context="two").token_file == str(tmp_path / "b" / "secrets" / "token")


def test_for_tools_hands_helm_one_file_with_the_merged_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = _config(tmp_path / "staging", "staging", server="https://staging:6443")
    production = _config(tmp_path / "production", "production", server="https://prod:6443")
    monkeypatch.setenv("KUBECONFIG", str(staging))
    assert kubeconfig.for_tools() == str(staging)
    assert kubeconfig.for_tools(production) == str(production)

    monkeypatch.setenv("KUBECONFIG", f"{staging}{os.pathsep}{production}")
    merged = kubeconfig.for_tools()
    assert merged is not None and os.pathsep not in merged
    assert Path(merged).stat().st_mode & 0o077 == 0  # tokens inside: owner only
    assert kubeconfig.load(merged, context="production").server == "https://prod:6443"
    assert kubeconfig.for_tools() == merged  # one file per merged content

    monkeypatch.delenv("KUBECONFIG")
    assert kubeconfig.for_tools() is None  # helm's own defaults (in-cluster, ~/.kube)


def _service_account(tmp_path: Path) -> Path:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("first-token")
    (account / "ca.crt").write_text("not read here")
    (account / "namespace").write_text("conveyor-system\n")
    return account


def test_in_cluster_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    account = _service_account(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    credentials = kubeconfig.in_cluster(account_dir=account)
    assert credentials.server == "https://10.96.0.1:443"
    assert credentials.token_file == str(account / "token")
    assert credentials.ca_file == str(account / "ca.crt")
    assert credentials.namespace == "conveyor-system"
    assert credentials.token is None  # read by the client, and read again as it rotates

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert kubeconfig.in_cluster(account_dir=account).server == "https://[fd00::1]:443"


def test_in_cluster_only_when_no_kubeconfig_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert kubeconfig.in_cluster_wanted()
    config = _config(tmp_path / "config", "dev", server="https://dev:6443")
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert not kubeconfig.in_cluster_wanted()
    assert kubeconfig.load().server == "https://dev:6443"


def test_helm_in_a_pod_gets_no_kubeconfig_and_no_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helm then finds the service account itself; a context would make it look for a
    kubeconfig entry that does not exist."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    helm = helm_cli(context="production")
    assert (helm.kubeconfig, helm.context) == (None, None)
    config = _config(tmp_path / "config", "production", server="https://prod:6443")
    monkeypatch.setenv("KUBECONFIG", str(config))
    helm = helm_cli(context="production")
    assert (helm.kubeconfig, helm.context) == (str(config), "production")


def test_in_cluster_without_a_token_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    with pytest.raises(KubeconfigError, match=f"no service account token at {tmp_path}"):
        kubeconfig.in_cluster(account_dir=tmp_path)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _authorization(auth: BearerToken, statuses: list[int]) -> list[str]:
    """Send one request through the auth flow, answering with `statuses` in turn."""
    flow = auth.auth_flow(httpx.Request("GET", "https://cluster/api"))
    sent = [next(flow).headers["Authorization"]]
    for status in statuses:
        try:
            sent.append(flow.send(httpx.Response(status)).headers["Authorization"])
        except StopIteration:
            break
    return sent


def test_token_file_is_read_again_every_minute(tmp_path: Path) -> None:
    account = _service_account(tmp_path)
    clock = _Clock()
    auth = BearerToken(
        ClusterCredentials(server="https://x", context="c", token_file=str(account / "token")),
        clock=clock,
    )
    assert auth.token() == "first-token"
    (account / "token").write_text("rotated-token\n")
    clock.now = 59
    assert auth.token() == "first-token"
    clock.now = 60
    assert auth.token() == "rotated-token"


def test_a_401_rereads_the_token_and_retries_once(tmp_path: Path) -> None:
    account = _service_account(tmp_path)
    auth = BearerToken(
        ClusterCredentials(server="https://x", context="c", token_file=str(account / "token")),
        clock=_Clock(),
    )
    (account / "token").write_text("rotated-token")
    assert _authorization(auth, [401, 200]) == ["Bearer first-token", "Bearer rotated-token"]
    # The same token again: no retry, the 401 is the answer.
    assert _authorization(auth, [401]) == ["Bearer rotated-token"]


def test_a_token_file_caught_mid_rotation_keeps_the_token(tmp_path: Path) -> None:
    account = _service_account(tmp_path)
    clock = _Clock()
    auth = BearerToken(
        ClusterCredentials(server="https://x", context="c", token_file=str(account / "token")),
        clock=clock,
    )
    (account / "token").unlink()
    clock.now = 120
    assert auth.token() == "first-token"


def test_a_kubeconfig_token_is_sent_as_is() -> None:
    auth = BearerToken(ClusterCredentials(server="https://x", context="c", token="static"))
    assert _authorization(auth, [401]) == ["Bearer static"]
