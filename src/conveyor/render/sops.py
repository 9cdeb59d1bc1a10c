"""Decrypt SOPS-encrypted documents at render time, with the real `sops`, as Flux does.

Teams keep their Secrets in git encrypted with SOPS and age. The cluster must get them
decrypted; nothing else may ever see the plaintext. A document is encrypted when it
carries SOPS's metadata (`config.manifest.is_sops_encrypted`), in whatever layout it
sits: such a document is always decrypted, never applied as it is. So is a Secret's data
entry that holds a SOPS-encrypted file (what a kustomize secretGenerator makes of an
encrypted `files:` entry), as Flux decrypts them; and so are the files a secretGenerator
reads (`files:` and `envs:`, `decrypt_file`), before kustomize builds, as Flux does: the
plaintext goes into the build's temporary copy of the source, never into the checkout.

`sops decrypt` runs as a subprocess, as Flux's kustomize-controller decrypts: the
document goes in on stdin as JSON and comes back on stdout, never through a file. The
age identities go in through `SOPS_AGE_KEY`, in an environment holding nothing else
that sops reads keys from (a private, empty HOME: no `~/.ssh` key, no keys.txt). A
document that cannot be decrypted fails its app with its file, its line and a reason
read from sops's exit status, never from its output, which may quote the document.

Where the keys come from (`KeySource.keys`):

- a Secret named by `secretRef` (a Flux Kustomization's `spec.decryption.secretRef`,
  or an environment's `decryption.secretRef` in conveyor.yaml): its `*.agekey`
  entries, read from the cluster, and only those, as Flux does (a tenant's Secret holds
  that tenant's keys). Without a cluster (an offline diff) the local keys stand in;
- otherwise the local keys (`local_keys`): the file given with
  `--sops-age-key-file`, else `$SOPS_AGE_KEY_FILE`, and the keys in `$SOPS_AGE_KEY`.

A document read from a file keeps the values SOPS computed its MAC over, so the MAC is
checked; a kustomize build rewrites documents (namespaces, labels), so there, as in
Flux, it is not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from conveyor.cluster.objects import Obj
from conveyor.config.manifest import check_object, is_sops_encrypted
from conveyor.config.userfile import USER_FILE
from conveyor.config.validation import field_path
from conveyor.render.documents import Document, RenderError

AGE_KEY_SUFFIX = ".agekey"
KEY_FILE_ENV = "SOPS_AGE_KEY_FILE"
KEY_ENV = "SOPS_AGE_KEY"
# age's native identities. Plugin identities (AGE-PLUGIN-...) are refused: they name a
# program for sops to run, and a key file or a Secret must never choose a program.
_IDENTITY = re.compile(r"^AGE-SECRET-KEY-1[02-9AC-HJ-NP-Z]{58}$")
# sops's exit statuses (cmd/sops/codes) and what they mean for one document.
_REASONS = {
    24: "its MAC cannot be decrypted: the file is corrupt",
    25: "a value cannot be decrypted: the file is corrupt",
    51: "its MAC does not match: the file was changed after it was encrypted, or is corrupt",
    52: "it has no MAC: the file is corrupt",
    128: "no age key given can decrypt it",
}
_NO_KEY = (
    "no age key is given (the cluster Secret of a Flux Kustomization's "
    f"spec.decryption, ${KEY_FILE_ENV}, ${KEY_ENV} or --sops-age-key-file)"
)
# Decrypted objects by (document, keys, MAC check), and decrypted generator files by
# (content, format, keys): an agent renders every app on every pass, and sops costs a
# process per document. Kept in memory only, and bounded.
_CACHE_SIZE = 1024
_decrypted: OrderedDict[str, Obj | bytes] = OrderedDict()
_PARALLEL = 4  # sops processes at once, per render


class DecryptionError(RenderError):
    """A document, or the keys for it, cannot be used: the message never holds a secret."""


@dataclass(frozen=True)
class AgeKeys:
    """age identities and where they came from (`origin`, for messages)."""

    identities: tuple[str, ...] = field(default=(), repr=False)
    origin: str = "no key"

    def __bool__(self) -> bool:
        return bool(self.identities)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.identities)).encode()).hexdigest()

    def __or__(self, other: AgeKeys) -> AgeKeys:
        if not other:
            return self
        if not self:
            return other
        identities = tuple(dict.fromkeys([*self.identities, *other.identities]))
        return AgeKeys(identities, origin=f"{self.origin} and {other.origin}")


def parse_identities(text: str, *, origin: str) -> AgeKeys:
    """The identities of an age key file (`age-keygen`'s output: comments and blank lines
    are skipped). A line that is no age identity is an error naming its number only."""
    identities = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not _IDENTITY.match(line):
            raise DecryptionError(
                f"{origin}: line {number} is not an age identity (AGE-SECRET-KEY-1...)"
            )
        identities.append(line)
    return AgeKeys(tuple(identities), origin=origin)


def local_keys(
    *, key_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> AgeKeys:
    """The keys conveyor was given where it runs: `key_file` (`--sops-age-key-file`), else
    `$SOPS_AGE_KEY_FILE`; and `$SOPS_AGE_KEY`. DecryptionError for an unreadable file."""
    env = os.environ if environ is None else environ
    keys = AgeKeys()
    path = key_file or (Path(env[KEY_FILE_ENV]) if env.get(KEY_FILE_ENV) else None)
    if path is not None:
        origin = str(path) if key_file else f"{path} (${KEY_FILE_ENV})"
        try:
            text = path.read_text()
        except OSError as error:
            raise DecryptionError(
                f"cannot read the age key file {origin}: {error.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise DecryptionError(f"the age key file {origin} is not text") from None
        keys = parse_identities(text, origin=origin)
    if env.get(KEY_ENV):
        keys = keys | parse_identities(env[KEY_ENV], origin=f"${KEY_ENV}")
    return keys


@dataclass(frozen=True)
class SecretRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def secret_keys(secret: Obj, *, ref: SecretRef) -> AgeKeys:
    """The identities in a Secret's `*.agekey` entries (`data`, or `stringData`)."""
    texts: list[tuple[str, str]] = []
    for key, value in sorted((secret.get("data") or {}).items()):
        if str(key).endswith(AGE_KEY_SUFFIX):
            try:
                texts.append((str(key), base64.b64decode(str(value), validate=True).decode()))
            except (binascii.Error, UnicodeDecodeError):
                raise DecryptionError(f"Secret {ref} key {key!r} is not base64 text") from None
    for key, value in sorted((secret.get("stringData") or {}).items()):
        if str(key).endswith(AGE_KEY_SUFFIX):
            texts.append((str(key), str(value)))
    identities = [
        identity
        for key, text in texts
        for identity in parse_identities(text, origin=f"Secret {ref} key {key!r}").identities
    ]
    return AgeKeys(tuple(dict.fromkeys(identities)), origin=f"Secret {ref}")


SecretLookup = Callable[[SecretRef], Awaitable[Obj | None]]


class KeySource:
    """Which keys decrypt an app's documents: the local ones (read when needed, so that
    a missing key file fails only the apps that need it), or those of a Secret in the
    cluster (`secret_ref` of the app, else `default_ref` of the environment) when
    `lookup` can read it."""

    def __init__(
        self,
        local: Callable[[], AgeKeys] = local_keys,
        *,
        lookup: SecretLookup | None = None,
        default_ref: SecretRef | None = None,
    ) -> None:
        self.local = local
        self.lookup = lookup
        self.default_ref = default_ref

    async def keys(self, secret_ref: SecretRef | None = None) -> AgeKeys:
        ref = secret_ref or self.default_ref
        if ref is None or self.lookup is None:
            return self.local()
        secret = await self.lookup(ref)
        if secret is None:
            raise DecryptionError(f"decryption Secret {ref} not found")
        keys = secret_keys(secret, ref=ref)
        if not keys:
            raise DecryptionError(f"decryption Secret {ref} has no *{AGE_KEY_SUFFIX} entry")
        return keys


class Decryptor:
    """Decrypts the SOPS-encrypted documents among an app's documents (`decrypt`)."""

    def __init__(self, keys: KeySource, *, sops: str = "sops") -> None:
        self.key_source = keys
        self.sops = sops
        self._parallel = asyncio.Semaphore(_PARALLEL)

    async def decrypt(
        self,
        documents: list[Document],
        *,
        secret_ref: SecretRef | None = None,
        verify_mac: bool = True,
    ) -> list[Document]:
        """`documents` with each encrypted one decrypted and checked as any object to
        apply is (config/manifest.py); the others as they are. The keys are looked up
        only when a document is encrypted. `verify_mac=False` for documents a build has
        rewritten. DecryptionError, naming the document's file and line, when one cannot
        be decrypted: then none is returned, so nothing of the app is applied or pruned."""
        encrypted = [doc for doc in documents if is_sops_encrypted(doc.obj) or _entries(doc.obj)]
        if not encrypted:
            return documents
        try:
            keys = await self.key_source.keys(secret_ref)
        except DecryptionError as error:
            first = encrypted[0]
            raise DecryptionError(
                f"{_named(first)}SOPS-encrypted; {error.detail}",
                file=first.file,
                line=first.line or None,
            ) from None
        decrypted = await asyncio.gather(
            *(self._document(doc, keys, verify_mac=verify_mac) for doc in encrypted)
        )
        by_id = {id(old): new for old, new in zip(encrypted, decrypted, strict=True)}
        return [by_id.get(id(doc), doc) for doc in documents]

    async def decrypt_file(
        self, path: Path, fmt: str, *, file: str, secret_ref: SecretRef | None = None
    ) -> bytes | None:
        """The plaintext of the SOPS-encrypted file at `path` in its format `fmt`
        (`generator_format`); None when the file is not encrypted. DecryptionError naming
        `file` (as the repository shows it), never quoting it, when it cannot be."""

        def failed(reason: str) -> DecryptionError:
            return DecryptionError(f"cannot be decrypted: {reason}", file=file)

        try:
            size = path.stat().st_size
            if size > USER_FILE.max_bytes:  # as kustomize-controller bounds what it decrypts
                raise failed(f"{size} bytes, more than {USER_FILE.max_bytes}")
            content = path.read_bytes()
        except OSError as error:
            raise failed(f"cannot be read: {error.strerror}") from None
        if _MARKER[fmt] not in content:
            return None
        try:
            keys = await self.key_source.keys(secret_ref)
        except DecryptionError as error:
            raise DecryptionError(f"SOPS-encrypted; {error.detail}", file=file) from None
        if not keys:
            raise failed(_NO_KEY)
        cache_key = hashlib.sha256(
            b"%s\0file:%s\0%s" % (keys.fingerprint().encode(), fmt.encode(), content)
        ).hexdigest()
        if isinstance(cached := _decrypted.get(cache_key), bytes):
            _decrypted.move_to_end(cache_key)
            return cached
        try:
            plain = await self._run(content, (fmt, fmt), keys, verify_mac=True)
        except _SopsFailed as error:
            raise failed(error.reason) from None
        _remember(cache_key, plain)
        return plain

    async def _document(self, doc: Document, keys: AgeKeys, *, verify_mac: bool) -> Document:
        def failed(reason: str) -> DecryptionError:
            return DecryptionError(
                f"{_named(doc)}cannot be decrypted: {reason}", file=doc.file, line=doc.line or None
            )

        if not keys:
            raise failed(_NO_KEY)
        payload = json.dumps(doc.obj, separators=(",", ":")).encode()
        cache_key = hashlib.sha256(
            b"%s\0%s\0%s" % (keys.fingerprint().encode(), b"mac" if verify_mac else b"", payload)
        ).hexdigest()
        if isinstance(cached := _decrypted.get(cache_key), dict):
            _decrypted.move_to_end(cache_key)
            return replace(doc, obj=cached)
        if is_sops_encrypted(doc.obj):
            try:
                plain = await self._run(payload, ("json", "json"), keys, verify_mac=verify_mac)
            except _SopsFailed as error:
                raise failed(error.reason) from None
            obj = _json_object(plain, failed)
        else:
            obj = await self._entries(doc.obj, keys, failed)
        try:
            checked = check_object(obj)
        except ValidationError as error:
            # Never `describe` it: the value that failed is plaintext now.
            problem = error.errors(include_url=False)[0]
            inside = str((problem.get("ctx") or {}).get("inside", ""))
            raise failed(
                f"the decrypted object is not valid at {field_path(problem['loc'], inside)}"
            ) from None
        _remember(cache_key, checked)
        return replace(doc, obj=checked)

    async def _entries(
        self, secret: Obj, keys: AgeKeys, failed: Callable[[str], DecryptionError]
    ) -> Obj:
        """A Secret whose `data` entries are SOPS-encrypted files (a kustomize
        secretGenerator's `files`), each entry decrypted: what Flux does for them."""
        data = dict(secret["data"])
        for key, formats in _entries(secret).items():
            try:
                plain = await self._run(base64.b64decode(data[key]), formats, keys, verify_mac=True)
            except _SopsFailed as error:
                raise failed(f"data key {key!r}: {error.reason}") from None
            data[key] = base64.b64encode(plain).decode()
        return {**secret, "data": data}

    async def _run(
        self, payload: bytes, formats: tuple[str, str], keys: AgeKeys, *, verify_mac: bool
    ) -> bytes:
        """`sops decrypt` of `payload` from the `formats` (input, output) given; its
        plaintext. _SopsFailed with the reason its exit status gives."""
        input_type, output_type = formats
        argv = [self.sops, "decrypt", "--input-type", input_type, "--output-type", output_type]
        if not verify_mac:
            argv.append("--ignore-mac")
        # A private, empty HOME and working directory: sops finds no other key (keys.txt,
        # ~/.ssh) and no .sops.yaml there; the identities come only from SOPS_AGE_KEY.
        async with self._parallel:
            with tempfile.TemporaryDirectory(prefix="conveyor-sops-") as home:
                env = {
                    "PATH": os.environ.get("PATH", os.defpath),
                    "HOME": home,
                    "XDG_CONFIG_HOME": home,
                    KEY_ENV: "\n".join(keys.identities),
                }
                try:
                    process = await asyncio.create_subprocess_exec(
                        *argv,
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.DEVNULL,  # it may quote the document
                        cwd=home,
                        env=env,
                    )
                except FileNotFoundError:
                    raise _SopsFailed(
                        f"{self.sops} is not installed (looked for it on PATH)"
                    ) from None
                stdout, _ = await process.communicate(payload)
        if process.returncode != 0:
            code = process.returncode
            reason = _REASONS.get(code if code is not None else -1)
            raise _SopsFailed(reason or f"sops could not decrypt it (exit status {code})")
        return stdout


def _remember(cache_key: str, decrypted: Obj | bytes) -> None:
    _decrypted[cache_key] = decrypted
    while len(_decrypted) > _CACHE_SIZE:
        _decrypted.popitem(last=False)


class _SopsFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _json_object(text: bytes, failed: Callable[[str], DecryptionError]) -> Obj:
    try:
        obj = json.loads(text)
    except ValueError:
        raise failed("sops returned no JSON") from None
    if not isinstance(obj, dict):
        raise failed("sops returned no object")
    return obj


# How a SOPS-encrypted file shows inside a Secret's data entry, by its format (as Flux
# tells them apart), and the format an entry's name asks for on the way out.
_MARKERS = (
    ("yaml", b"mac: ENC["),
    ("json", b'"mac": "ENC['),
    ("dotenv", b"sops_mac=ENC["),
    ("ini", b"[sops]"),
)
_OUTPUT_BY_SUFFIX = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".env": "dotenv",
    ".ini": "ini",
}


_MARKER = {fmt: marker for fmt, marker in _MARKERS} | {"binary": dict(_MARKERS)["json"]}


def generator_format(key: str, *, env: bool) -> str:
    """The SOPS format of a file a secretGenerator reads, as Flux tells it: by the
    extension of the entry's key (`files:`) or of the file (`envs:`, dotenv unless it
    says otherwise); a `.dockerconfigjson` is JSON; anything else is binary."""
    if key.endswith(".dockerconfigjson"):
        return "json"
    fmt = _OUTPUT_BY_SUFFIX.get(Path(key).suffix, "binary")
    return "dotenv" if env and fmt == "binary" else fmt


def _entries(obj: Obj) -> dict[str, tuple[str, str]]:
    """The data entries of a v1 Secret that hold a SOPS-encrypted file: (input format,
    output format) by key. A JSON envelope is sops's binary format unless the key names
    a JSON file."""
    if obj.get("kind") != "Secret" or obj.get("apiVersion") != "v1":
        return {}
    found: dict[str, tuple[str, str]] = {}
    for key, value in (obj.get("data") or {}).items():
        try:  # kustomize folds long values over lines, which base64 allows
            content = base64.b64decode("".join(str(value).split()), validate=True)
        except binascii.Error:
            continue  # not base64: the API server says so when it is applied
        output = _OUTPUT_BY_SUFFIX.get(Path(str(key)).suffix, "binary")
        for fmt, marker in _MARKERS:
            if marker in content:
                found[str(key)] = ("binary" if fmt == "json" and output != "json" else fmt, output)
                break
    return found


def _named(doc: Document) -> str:
    """`Secret ns/name: ` when the document's identity is in clear text, else nothing."""
    metadata = doc.obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    kind = doc.obj.get("kind")
    if not all(isinstance(v, str) and not v.startswith("ENC[") for v in (kind, name)):
        return ""
    shown = f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name
    return f"{kind} {shown}: "
