"""The rules for names and references that a file, a webhook or a request hands to git,
helm or kubectl, in one place.

Such values end up as command-line arguments. One that starts with `-` becomes an option
(`--upload-pack=<command>` to `git fetch`, `--post-renderer=<program>` to `helm
template`), and some transports run programs themselves (`ext::<command>`). Every value
is checked here against the tool's own rules before any call, and the calls end their
options (`--end-of-options`, `--`) as well, so that neither alone is all that stands
between a config repository and a shell.
"""

from __future__ import annotations

import re

from conveyor.errors import ConveyorError

# Helm's own rule (pkg/chartutil/validate_name.go): a DNS-1123 subdomain of at most 53
# characters, so that the names Helm derives from it still fit Kubernetes' limits.
_HELM_RELEASE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
HELM_RELEASE_MAX = 53
# A Kubernetes namespace is a DNS-1123 label.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NAMESPACE_MAX = 63
# What Helm repositories and registries name charts (and Docker names credential
# helpers): letters, digits, `_`, `.`, `-`, never starting with `-` or `.`.
_BARE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA = re.compile(r"^([0-9a-f]{7,40}|[0-9a-f]{64})$")
# Characters `git check-ref-format` refuses anywhere in a ref name.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# `<transport>::<address>` hands the address to `git-remote-<transport>`; `ext::` runs it
# as a command. Only the schemes below are allowed (and `git_env` allows no others).
_REMOTE_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)")
GIT_SCHEMES = ("https", "http", "ssh", "git", "file")
# scp-like `[user@]host:path`: git's rule is a colon before any slash.
_SCP_LIKE = re.compile(r"^([^/:]+):")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CREDENTIALS = re.compile(r"(://[^/@:\s]+):[^/@\s]+@")


def mask_url(text: str) -> str:
    """Hide the password of `https://user:password@host/...` wherever it appears: every
    refusal below shows the value, and a URL may carry a token."""
    return _CREDENTIALS.sub(r"\1:***@", text)


class UnsafeValueError(ConveyorError, ValueError):
    """A value that cannot safely be given to git, helm or kubectl; the message names
    what it is for, shows the value and says which rule it breaks."""


def _refuse(what: str, value: str, rule: str) -> UnsafeValueError:
    return UnsafeValueError(f"{what} {mask_url(repr(value))} {rule}")


def _plain(value: object, what: str) -> str:
    """Common to every rule: a non-empty string without control characters that does not
    start with `-` (where every tool would read it as an option)."""
    if not isinstance(value, str) or not value:
        raise UnsafeValueError(f"{what} must be a non-empty string, not {mask_url(repr(value))}")
    if _CONTROL.search(value):
        raise _refuse(what, value, "contains a control character")
    if value.startswith("-"):
        raise _refuse(what, value, "must not start with '-'")
    return value


def git_ref(value: object, *, what: str = "git ref") -> str:
    """A branch, tag or full ref name by `git check-ref-format --allow-onelevel`, or a
    commit SHA (7 to 40 hex digits, or 64 for SHA-256 repositories)."""
    text = _plain(value, what)
    if _SHA.match(text):
        return text
    if _REF_FORBIDDEN.search(text):
        raise _refuse(
            what, text, "contains a character git refuses in a ref (space ~ ^ : ? * [ \\)"
        )
    if text == "@" or "@{" in text or ".." in text or "//" in text:
        raise _refuse(what, text, "is not a valid ref name (@, @{, .. or //)")
    if text.startswith("/") or text.endswith(("/", ".")):
        raise _refuse(what, text, "is not a valid ref name (starts with / or ends with / or .)")
    for component in text.split("/"):
        if component.startswith(".") or component.endswith(".lock"):
            raise _refuse(
                what, text, "is not a valid ref name (a part starts with . or ends with .lock)"
            )
    return text


def git_revision(value: object, *, what: str = "revision") -> str:
    """A revision expression given on our own command line or by CI (`HEAD~1`,
    `origin/main`, `v1.2^{commit}`, a SHA): git parses it, we only keep it an argument."""
    return _plain(value, what)


def git_url(value: object, *, what: str = "git URL") -> str:
    """A repository address git may fetch from: `https://`, `http://`, `ssh://`, `git://`,
    `file://`, scp-like `user@host:path`, or a local path. Never `<transport>::...`
    (`ext::` runs a command), never a host or user that ssh would read as an option."""
    text = _plain(value, what)
    if _REMOTE_HELPER.match(text):
        raise _refuse(what, text, "uses a git remote helper (<transport>::), which is not allowed")
    scheme = _URL_SCHEME.match(text)
    if scheme:
        if scheme.group(1).lower() not in GIT_SCHEMES:
            raise _refuse(what, text, f"must use one of {', '.join(GIT_SCHEMES)}")
        authority = scheme.group(2).rpartition("@")
        if authority[2].startswith("-") or authority[0].startswith("-"):
            raise _refuse(what, text, "has a host or user starting with '-'")
        return text
    scp = _SCP_LIKE.match(text)
    if scp:
        user, _, host = scp.group(1).rpartition("@")
        if host.startswith("-") or user.startswith("-") or not host:
            raise _refuse(what, text, "has a host or user starting with '-'")
    return text


def helm_release_name(value: object, *, what: str = "release name") -> str:
    """Helm's rule for release names: lowercase DNS-1123 subdomain, at most 53."""
    text = _plain(value, what)
    if len(text) > HELM_RELEASE_MAX or not _HELM_RELEASE.match(text):
        raise _refuse(
            what,
            text,
            f"is not a valid Helm release name (lowercase letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit, at most {HELM_RELEASE_MAX})",
        )
    return text


def kubernetes_namespace(value: object, *, what: str = "namespace") -> str:
    """A Kubernetes namespace: a DNS-1123 label, at most 63 characters."""
    text = _plain(value, what)
    if len(text) > NAMESPACE_MAX or not _DNS_LABEL.match(text):
        raise _refuse(
            what,
            text,
            f"is not a valid namespace (lowercase letters, digits and '-', starting and "
            f"ending with a letter or digit, at most {NAMESPACE_MAX})",
        )
    return text


def chart_name(value: object, *, what: str = "chart name") -> str:
    """A chart's name in a Helm repository or OCI registry."""
    text = _plain(value, what)
    if not _BARE_NAME.match(text):
        raise _refuse(what, text, "is not a valid chart name (letters, digits, '_', '.', '-')")
    return text


def chart_path(value: object, *, what: str = "chart path") -> str:
    """A chart's folder inside a git repository (a leading `/` means its root)."""
    text = _plain(value, what)
    if ".." in text.split("/"):
        raise _refuse(what, text, "must not leave the repository ('..')")
    return text


def chart_version(value: object, *, what: str = "chart version") -> str:
    """A chart version or range (`1.2.3`, `>=1.0.0 <2.0.0`, `~1.2`, `1.x`)."""
    return _plain(value, what)


def helm_repository_url(value: object, *, what: str = "Helm repository URL") -> str:
    """A Helm repository (`https://`, `http://`) or registry (`oci://host/path`). Other
    schemes would reach helm's getter plugins, which are programs."""
    text = _plain(value, what)
    scheme = _URL_SCHEME.match(text)
    if not scheme or scheme.group(1).lower() not in ("https", "http", "oci"):
        raise _refuse(what, text, "must start with https://, http:// or oci://")
    if not scheme.group(2) or scheme.group(2).rpartition("@")[2].startswith("-"):
        raise _refuse(what, text, "has no host, or a host starting with '-'")
    if " " in text:
        raise _refuse(what, text, "contains a space")
    return text


def oci_reference(value: object, *, what: str = "OCI chart reference") -> str:
    """`oci://host[:port]/path/name`, as `helm pull` takes it."""
    text = helm_repository_url(value, what=what)
    if not text.startswith("oci://") or "/" not in text.removeprefix("oci://").strip("/"):
        raise _refuse(what, text, "must be oci://<host>/<path>/<name>")
    return text


def credential_helper(value: object, *, what: str = "credential helper") -> str:
    """The `<name>` of a `docker-credential-<name>` program: a bare name, never a path."""
    text = _plain(value, what)
    if not _BARE_NAME.match(text):
        raise _refuse(what, text, "is not a program name (letters, digits, '_', '.', '-')")
    return text
