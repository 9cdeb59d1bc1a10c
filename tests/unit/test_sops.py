"""SOPS decryption at render: where keys come from, and the real `sops` decrypting,
refusing, and never quoting what it decrypts.

Files are encrypted with the real `sops` and `age-keygen` (built by the sandbox's
builder into conveyor's cache, like helm), so the documents are exactly what a team
commits."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conveyor.cluster.client import KubeClient
from conveyor.cluster.kubeconfig import ClusterCredentials
from conveyor.cluster.objects import Obj
from conveyor.config.manifest import is_sops_encrypted
from conveyor.config.project import Environment
from conveyor.reconcile.target import decryptor as target_decryptor
from conveyor.render import sops as sops_module
from conveyor.render.charts import ChartResolver
from conveyor.render.discover import AppSource, discover
from conveyor.render.documents import Document, load_documents
from conveyor.render.flux_kustomization import BuildContext, expand
from conveyor.render.helm import HelmCLI
from conveyor.render.sops import (
    AgeKeys,
    DecryptionError,
    Decryptor,
    KeySource,
    SecretRef,
    local_keys,
    parse_identities,
    secret_keys,
)
from conveyor.sandbox.build import ensure_tools
from tests.cluster.gitops import flux_kustomization

PASSWORD = "correct-horse-battery-staple"
SECRET = f"""\
apiVersion: v1
kind: Secret
metadata:
  name: db
  namespace: shop
  labels: {{app: db}}
stringData:
  password: {PASSWORD}
"""


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """Each test decrypts for itself (the cache test fills it on purpose)."""
    sops_module._decrypted.clear()
    yield
    sops_module._decrypted.clear()


@pytest.fixture(scope="module")
def tools() -> Path:
    return ensure_tools()


@pytest.fixture(scope="module")
def keypair(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An age key file as `age-keygen` writes it, and its recipient."""
    path = tmp_path_factory.mktemp("age") / "keys.txt"
    subprocess.run([str(tools / "age-keygen"), "-o", str(path)], check=True, capture_output=True)
    recipient = subprocess.run(
        [str(tools / "age-keygen"), "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return path, recipient


@pytest.fixture(scope="module")
def other_key(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("age-other") / "keys.txt"
    subprocess.run([str(tools / "age-keygen"), "-o", str(path)], check=True, capture_output=True)
    return path


def encrypt(tools: Path, path: Path, recipient: str, *, regex: str | None = None) -> None:
    """Encrypt `path` in place as a team does: `sops encrypt --age R [--encrypted-regex]`."""
    args = [str(tools / "sops"), "encrypt", "--age", recipient, "--in-place"]
    if regex:
        args += ["--encrypted-regex", regex]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


@pytest.fixture
def encrypted_file(tools: Path, keypair: tuple[Path, str], tmp_path: Path) -> Path:
    path = tmp_path / "secret.yaml"
    path.write_text(SECRET)
    encrypt(tools, path, keypair[1], regex="^(data|stringData)$")
    return path


def keys_of(path: Path) -> AgeKeys:
    return parse_identities(path.read_text(), origin=str(path))


def decryptor(tools: Path, keys: AgeKeys) -> Decryptor:
    return Decryptor(KeySource(lambda: keys), sops=str(tools / "sops"))


def no_local_keys() -> AgeKeys:
    raise AssertionError("the local keys were read")


def documents(path: Path) -> list[Document]:
    return load_documents(path, relative_to=path.parent)


# -- where keys come from ---------------------------------------------------------------


def test_key_file_given_replaces_the_environment_file_and_adds_sops_age_key(
    keypair: tuple[Path, str], other_key: Path, tmp_path: Path
) -> None:
    env_key = other_key.read_text().splitlines()[-1]
    environ = {"SOPS_AGE_KEY_FILE": str(other_key), "SOPS_AGE_KEY": env_key}
    assert local_keys(environ={}) == AgeKeys()
    from_env = local_keys(environ={"SOPS_AGE_KEY_FILE": str(other_key)})
    assert from_env.identities == (env_key,) and "$SOPS_AGE_KEY_FILE" in from_env.origin
    given = local_keys(key_file=keypair[0], environ=environ)
    assert given.identities == (keys_of(keypair[0]).identities[0], env_key)
    assert str(keypair[0]) in given.origin and "$SOPS_AGE_KEY" in given.origin


def test_a_line_that_is_no_age_identity_is_named_by_number_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# created by hand\n\n{PASSWORD}\n")
    with pytest.raises(DecryptionError) as caught:
        local_keys(key_file=path, environ={})
    assert f"{path}: line 3 is not an age identity" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_plugin_identities_are_refused_they_would_choose_a_program() -> None:
    plugin = "AGE-PLUGIN-YUBIKEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQ"
    with pytest.raises(DecryptionError, match="line 1 is not an age identity"):
        parse_identities(plugin, origin="$SOPS_AGE_KEY")


def test_unreadable_key_file_says_which(tmp_path: Path) -> None:
    missing = tmp_path / "absent.txt"
    with pytest.raises(DecryptionError, match=f"cannot read the age key file {missing}"):
        local_keys(environ={"SOPS_AGE_KEY_FILE": str(missing)})


def test_secret_keys_are_its_agekey_entries(keypair: tuple[Path, str], other_key: Path) -> None:
    ref = SecretRef("flux-system", "sops-age")
    secret: Obj = {
        "data": {
            "age.agekey": base64.b64encode(keypair[0].read_bytes()).decode(),
            "notes.txt": base64.b64encode(b"not a key").decode(),
        },
        "stringData": {"second.agekey": other_key.read_text()},
    }
    keys = secret_keys(secret, ref=ref)
    assert keys.identities == (*keys_of(keypair[0]).identities, *keys_of(other_key).identities)
    assert keys.origin == "Secret flux-system/sops-age"


def secret_with(key_file: Path) -> Obj:
    return {"data": {"age.agekey": base64.b64encode(key_file.read_bytes()).decode()}}


def test_a_named_secret_gives_only_its_own_keys_and_the_app_ref_beats_the_environment(
    keypair: tuple[Path, str], other_key: Path
) -> None:
    secrets = {
        "tenant/keys": secret_with(keypair[0]),
        "conveyor-system/keys": secret_with(other_key),
    }
    asked: list[str] = []

    async def lookup(ref: SecretRef) -> Obj | None:
        asked.append(str(ref))
        return secrets.get(str(ref))

    source = KeySource(
        no_local_keys, lookup=lookup, default_ref=SecretRef("conveyor-system", "keys")
    )
    assert asyncio.run(source.keys()) == secret_keys(
        secrets["conveyor-system/keys"], ref=SecretRef("conveyor-system", "keys")
    )
    own = asyncio.run(source.keys(SecretRef("tenant", "keys")))
    assert own.identities == keys_of(keypair[0]).identities
    assert asked == ["conveyor-system/keys", "tenant/keys"]
    with pytest.raises(DecryptionError, match="decryption Secret tenant/absent not found"):
        asyncio.run(source.keys(SecretRef("tenant", "absent")))
    secrets["tenant/empty"] = {"data": {"token": "eA=="}}
    with pytest.raises(DecryptionError, match=r"Secret tenant/empty has no \*\.agekey entry"):
        asyncio.run(source.keys(SecretRef("tenant", "empty")))


def test_without_a_cluster_the_local_keys_stand_in_for_a_named_secret(
    keypair: tuple[Path, str],
) -> None:
    local = keys_of(keypair[0])
    source = KeySource(lambda: local, default_ref=SecretRef("conveyor-system", "keys"))
    assert asyncio.run(source.keys(SecretRef("tenant", "keys"))) == local


# -- decrypting with the real sops ------------------------------------------------------


def test_an_encrypted_document_is_recognised_by_its_sops_metadata(encrypted_file: Path) -> None:
    (doc,) = documents(encrypted_file)
    assert is_sops_encrypted(doc.obj)
    assert not is_sops_encrypted({"sops": "a field of a CRD"})
    assert not is_sops_encrypted({"sops": {"version": "3.13.3"}})  # no MAC: not SOPS's


def test_decrypts_with_the_mac_checked_and_leaves_other_documents_alone(
    tools: Path, keypair: tuple[Path, str], encrypted_file: Path
) -> None:
    plain = encrypted_file.parent / "plain.yaml"
    plain.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n")
    given = [*documents(plain), *documents(encrypted_file)]
    out = asyncio.run(decryptor(tools, keys_of(keypair[0])).decrypt(given))
    assert out[0] is given[0]
    assert out[1].obj["stringData"] == {"password": PASSWORD}
    assert "sops" not in out[1].obj
    assert (out[1].file, out[1].line) == (given[1].file, given[1].line)


def test_a_document_encrypted_whole_is_decrypted_too(
    tools: Path, keypair: tuple[Path, str], tmp_path: Path
) -> None:
    path = tmp_path / "whole.yaml"
    path.write_text(SECRET)
    encrypt(tools, path, keypair[1])  # no regex: its kind and name are ciphertext too
    tree = discover(tmp_path, ".")  # discovery leaves an encrypted document unchecked
    (app,) = tree.apps
    assert app.error is None
    (doc,) = asyncio.run(decryptor(tools, keys_of(keypair[0])).decrypt(app.documents))
    assert doc.kind == "Secret" and doc.name == "db"
    assert doc.obj["stringData"]["password"] == PASSWORD


def decrypt_error(decrypting: Decryptor, given: list[Document], **kwargs: bool) -> str:
    with pytest.raises(DecryptionError) as caught:
        asyncio.run(decrypting.decrypt(given, **kwargs))
    message = str(caught.value)
    assert PASSWORD not in message
    return message


def test_the_wrong_key_fails_with_file_line_and_reason(
    tools: Path, other_key: Path, encrypted_file: Path
) -> None:
    message = decrypt_error(decryptor(tools, keys_of(other_key)), documents(encrypted_file))
    assert message == (
        "secret.yaml:1: Secret shop/db: cannot be decrypted: no age key given can decrypt it"
    )


def test_sops_sees_only_the_keys_given_not_those_of_its_environment(
    tools: Path,
    keypair: tuple[Path, str],
    other_key: Path,
    encrypted_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(keypair[0]))  # the right key, not given
    message = decrypt_error(decryptor(tools, keys_of(other_key)), documents(encrypted_file))
    assert message.endswith("no age key given can decrypt it")


def test_no_key_at_all_says_where_keys_come_from(tools: Path, encrypted_file: Path) -> None:
    message = decrypt_error(decryptor(tools, AgeKeys()), documents(encrypted_file))
    assert "cannot be decrypted: no age key is given" in message
    assert "SOPS_AGE_KEY_FILE" in message and "--sops-age-key-file" in message


def edited(path: Path, change: str, *, into: str) -> list[Document]:
    path.write_text(path.read_text().replace(change, into, 1))
    return load_documents(path, relative_to=path.parent)


def test_a_changed_clear_value_breaks_the_mac_unless_a_build_rewrote_it(
    tools: Path, keypair: tuple[Path, str], encrypted_file: Path
) -> None:
    given = edited(encrypted_file, "app: db", into="app: other")
    decrypting = decryptor(tools, keys_of(keypair[0]))
    assert "its MAC does not match" in decrypt_error(decrypting, given)
    (doc,) = asyncio.run(decrypting.decrypt(given, verify_mac=False))  # as kustomize output
    assert doc.obj["stringData"]["password"] == PASSWORD


def test_a_corrupt_value_is_reported_as_corrupt(
    tools: Path, keypair: tuple[Path, str], encrypted_file: Path
) -> None:
    text = encrypted_file.read_text()
    start = text.index("password: ENC[AES256_GCM,data:") + len("password: ENC[AES256_GCM,data:")
    flipped = "B" if text[start] != "B" else "C"
    given = edited(
        encrypted_file, text[start : start + 8], into=flipped + text[start + 1 : start + 8]
    )
    message = decrypt_error(decryptor(tools, keys_of(keypair[0])), given)
    assert message.endswith("a value cannot be decrypted: the file is corrupt")


def test_a_decrypted_object_that_is_invalid_is_named_without_its_value(
    tools: Path, keypair: tuple[Path, str], tmp_path: Path
) -> None:
    path = tmp_path / "nested.yaml"
    path.write_text(SECRET.replace(f"password: {PASSWORD}", f"password: {{nested: {PASSWORD}}}"))
    encrypt(tools, path, keypair[1], regex="^(data|stringData)$")
    message = decrypt_error(decryptor(tools, keys_of(keypair[0])), documents(path))
    assert "the decrypted object is not valid at stringData.password" in message


def test_a_missing_sops_is_named(keypair: tuple[Path, str], encrypted_file: Path) -> None:
    missing = Decryptor(KeySource(lambda: keys_of(keypair[0])), sops="/nonexistent/sops")
    assert "is not installed" in decrypt_error(missing, documents(encrypted_file))


def test_a_document_decrypted_once_is_not_decrypted_again(
    tools: Path, keypair: tuple[Path, str], encrypted_file: Path
) -> None:
    keys = keys_of(keypair[0])
    given = documents(encrypted_file)
    first = asyncio.run(decryptor(tools, keys).decrypt(given))
    # No sops at all the second time: the same document with the same keys is cached.
    again = asyncio.run(Decryptor(KeySource(lambda: keys), sops="/nonexistent/sops").decrypt(given))
    assert again[0].obj == first[0].obj


def test_keys_are_not_read_when_nothing_is_encrypted(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    given = documents(plain)
    assert asyncio.run(Decryptor(KeySource(no_local_keys)).decrypt(given)) == given


def test_a_failing_key_source_fails_the_app_at_its_first_encrypted_document(
    tools: Path, encrypted_file: Path
) -> None:
    async def lookup(_ref: SecretRef) -> Obj | None:
        return None

    source = KeySource(no_local_keys, lookup=lookup, default_ref=SecretRef("ops", "sops-age"))
    message = decrypt_error(Decryptor(source, sops=str(tools / "sops")), documents(encrypted_file))
    assert message == (
        "secret.yaml:1: Secret shop/db: SOPS-encrypted; decryption Secret ops/sops-age not found"
    )


def test_keys_stay_out_of_reprs(keypair: tuple[Path, str]) -> None:
    keys = keys_of(keypair[0])
    assert "AGE-SECRET-KEY" not in repr(keys) and "AGE-SECRET-KEY" not in str(keys)


def test_a_secret_entry_holding_an_encrypted_file_is_decrypted_in_its_own_format(
    tools: Path, keypair: tuple[Path, str], other_key: Path, tmp_path: Path
) -> None:
    """What a kustomize secretGenerator makes of encrypted `files:`: the file, base64."""
    entries = {
        "creds.yaml": f"user: shop\npassword: {PASSWORD}\n",
        "app.env": f"PASSWORD={PASSWORD}\n",
    }
    data = {}
    for name, text in entries.items():
        path = tmp_path / name
        path.write_text(text)
        encrypt(tools, path, keypair[1])
        encoded = base64.b64encode(path.read_bytes()).decode()
        # Folded over lines, as kustomize writes long values.
        data[name] = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    data["plain.txt"] = base64.b64encode(b"left alone").decode()
    generated = Document(
        obj={"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "g"}, "data": data},
        file="site",
        line=0,
    )
    (doc,) = asyncio.run(decryptor(tools, keys_of(keypair[0])).decrypt([generated]))
    decoded = {k: base64.b64decode(v).decode() for k, v in doc.obj["data"].items()}
    assert yaml.safe_load(decoded["creds.yaml"]) == {"user": "shop", "password": PASSWORD}
    assert decoded["app.env"].strip() == f"PASSWORD={PASSWORD}"
    assert decoded["plain.txt"] == "left alone"

    message = decrypt_error(decryptor(tools, keys_of(other_key)), [generated])
    assert message == (
        "site: Secret g: cannot be decrypted: "
        "data key 'creds.yaml': no age key given can decrypt it"
    )


def test_a_decryption_secret_the_api_refuses_stalls_the_app_saying_so(
    encrypted_file: Path,
) -> None:
    """Through the real client on a fake wire (the cluster tests read a real Secret)."""

    def apiserver(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1":
            resources = [{"name": "secrets", "kind": "Secret", "namespaced": True}]
            return httpx.Response(200, json={"resources": resources})
        status = {"kind": "Status", "reason": "Forbidden", "message": "no", "code": 403}
        return httpx.Response(403, json=status)

    async def scenario() -> str:
        credentials = ClusterCredentials(server="https://kube.test", context="t", token="tok")
        async with KubeClient(credentials, transport=httpx.MockTransport(apiserver)) as kube:
            decrypting = target_decryptor(
                kube,
                environment=Environment.model_validate(
                    {"name": "prod", "path": "prod", "decryption": {"secretRef": {"name": "keys"}}}
                ),
            )
            with pytest.raises(DecryptionError) as caught:
                await decrypting.decrypt(documents(encrypted_file))
            return str(caught.value)

    assert asyncio.run(scenario()) == (
        "secret.yaml:1: Secret shop/db: SOPS-encrypted; decryption Secret "
        "conveyor-system/keys cannot be read: HTTP 403 Forbidden: no"
    )


# -- files a kustomize secretGenerator reads ----------------------------------------------


def generator_repo(root: Path, tools: Path, recipient: str) -> dict[str, bytes]:
    """A Flux Kustomization whose build generates a Secret from a SOPS-encrypted values
    file (`files:`) and dotenv file (`envs:`), plus a plain file; the encrypted bytes
    as committed, by path."""
    web = root / "apps" / "web"
    web.mkdir(parents=True)
    (web / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "secretGenerator": [
                    {
                        "name": "web-secrets",
                        "namespace": "shop",
                        "files": ["values.yaml=secret-values.yaml", "note.txt"],
                        "envs": ["secret.env"],
                    }
                ],
                "generatorOptions": {"disableNameSuffixHash": True},
            }
        )
    )
    (web / "secret-values.yaml").write_text(f"db:\n  password: {PASSWORD}\n")
    (web / "secret.env").write_text(f"PASSWORD={PASSWORD}\nUSER=shop\n")
    (web / "note.txt").write_text("plain\n")
    for name in ("secret-values.yaml", "secret.env"):
        encrypt(tools, web / name, recipient)
    env = root / "env"
    env.mkdir()
    (env / "web.yaml").write_text(
        flux_kustomization("web", "./apps/web", decryption={"provider": "sops"})
    )
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in web.iterdir()
        if path.name.startswith("secret")
    }


def expand_with(root: Path, decrypting: Decryptor) -> dict[str, AppSource]:
    tree = discover(root, "env")
    context = BuildContext(
        repo_root=root,
        charts=ChartResolver(root / ".cache", HelmCLI(binary="false"), tree.sources),
        data_lookup=None,
        decryptor=decrypting,
    )
    asyncio.run(expand(tree, context))
    return {app.name: app for app in tree.apps}


def test_generator_files_and_envs_are_decrypted_before_the_build_never_in_the_checkout(
    tools: Path, keypair: tuple[Path, str], tmp_path: Path
) -> None:
    committed = generator_repo(tmp_path, tools, keypair[1])
    web = expand_with(tmp_path, decryptor(tools, keys_of(keypair[0])))["web"]
    assert web.error is None, web.error
    (secret,) = [d for d in web.documents if d.kind == "Secret"]
    data = {k: base64.b64decode(v).decode() for k, v in secret.obj["data"].items()}
    assert yaml.safe_load(data["values.yaml"]) == {"db": {"password": PASSWORD}}
    assert (data["PASSWORD"], data["USER"]) == (PASSWORD, "shop")
    assert not any(key.startswith("sops") for key in data)  # no SOPS metadata as entries
    assert data["note.txt"] == "plain\n"
    assert secret.file == "apps/web"  # named by the folder, as any generated object
    # The checkout still holds what was committed; no plaintext was left anywhere.
    for path, content in committed.items():
        assert (tmp_path / path).read_bytes() == content
    leftovers = [p for p in Path(tempfile.gettempdir()).glob("conveyor-build-*")]
    assert not any(
        PASSWORD.encode() in f.read_bytes() for d in leftovers for f in d.rglob("*") if f.is_file()
    )


def test_an_undecryptable_generator_file_stalls_only_its_app_naming_the_file(
    tools: Path, keypair: tuple[Path, str], other_key: Path, tmp_path: Path
) -> None:
    generator_repo(tmp_path, tools, keypair[1])
    (tmp_path / "env" / "plain.yaml").write_text(flux_kustomization("plain", "./apps/plain"))
    (tmp_path / "apps" / "plain").mkdir()
    (tmp_path / "apps" / "plain" / "config.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: plain, namespace: shop}\n"
    )
    found = expand_with(tmp_path, decryptor(tools, keys_of(other_key)))
    assert found["plain"].error is None
    message = str(found["web"].error)
    assert PASSWORD not in message
    assert message.startswith("env/web.yaml:1: Kustomization web: apps/web/secret")
    assert message.endswith(": cannot be decrypted: no age key given can decrypt it")
