"""Pin an app against image automation in its files, read the pin, lift it.

A rollback pins (see `images/pins.py` for the two annotation forms and why), and
`conveyor unpin` or a promotion into the environment lifts the pin. The pinned documents
are those that hold one of the app's image tags (`read_app_version`), the same ones image
automation writes, so a pin covers exactly what it protects. Files are edited through
the round-trip template, so comments and formatting survive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from conveyor.images.pins import Pin, pin_annotations, pin_keys, read_pin
from conveyor.promote.pipeline import PromotionError, Workspace, environment
from conveyor.promote.versions import load_template, read_app_version
from conveyor.render.discover import AppSource, discover
from conveyor.source.git import Author, RetryPolicy, change_trailer, commit_and_push


def now() -> str:
    """A pin's time: UTC to the second, ISO 8601."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _image_documents(root: Path, app: AppSource) -> dict[str, set[int]]:
    """file → indexes of the app's documents that hold one of its image tags."""
    documents: dict[str, set[int]] = {}
    for found in read_app_version(root, app).fields:
        if found.role == "image":
            documents.setdefault(found.file, set()).add(found.document)
    return documents


def _annotations(document: CommentedMap) -> dict[str, object]:
    metadata = document.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, CommentedMap) else None
    return dict(annotations) if isinstance(annotations, CommentedMap) else {}


def app_pin(root: Path, app: AppSource) -> Pin | None:
    """The app's pin as its files hold it (the first pinned document's), or None."""
    for file, indexes in sorted(_image_documents(root, app).items()):
        template = load_template(root, file)
        if template is None:
            continue
        for index in sorted(indexes):
            pin = read_pin(_annotations(template.documents[index]))
            if pin is not None:
                return pin
    return None


def _set_annotations(document: CommentedMap, values: dict[str, str]) -> None:
    metadata = document.get("metadata")
    if not isinstance(metadata, CommentedMap):
        # A kustomization may have no metadata: it goes after apiVersion and kind.
        metadata = CommentedMap()
        position = sum(1 for key in ("apiVersion", "kind") if key in document)
        document.insert(position, "metadata", metadata)
    annotations = metadata.get("annotations")
    if not isinstance(annotations, CommentedMap):
        annotations = CommentedMap()
        metadata["annotations"] = annotations
    for key, value in values.items():
        annotations[key] = DoubleQuotedScalarString(value)


def _remove_annotations(document: CommentedMap) -> bool:
    keys = pin_keys(_annotations(document))
    if not keys:
        return False
    metadata = document["metadata"]
    annotations = metadata["annotations"]
    for key in keys:
        del annotations[key]
    if not annotations:
        del metadata["annotations"]
    return True


def pin_app(root: Path, app: AppSource, pin: Pin) -> list[str]:
    """Pin every document of the app that holds an image tag; the files changed.
    A pin already there is replaced (who and why are the latest rollback's)."""
    written = []
    for file, indexes in sorted(_image_documents(root, app).items()):
        template = load_template(root, file)
        if template is None:
            continue
        for index in sorted(indexes):
            document = template.documents[index]
            _remove_annotations(document)
            _set_annotations(document, pin_annotations(_annotations(document), pin))
        (root / file).write_text(template.render())
        written.append(file)
    return written


def unpin_app(root: Path, app: AppSource) -> list[str]:
    """Lift the pin (either form) from the app's documents; the files changed."""
    written = []
    for file, indexes in sorted(_image_documents(root, app).items()):
        template = load_template(root, file)
        if template is None:
            continue
        removed = [_remove_annotations(template.documents[index]) for index in sorted(indexes)]
        if any(removed):
            (root / file).write_text(template.render())
            written.append(file)
    return written


@dataclass
class UnpinResult:
    env: str
    app: str
    pin: Pin | None  # the pin that was lifted, None when the app was not pinned
    commit: str | None
    files: list[str]

    def to_dict(self) -> dict[str, object]:
        return {
            "env": self.env,
            "app": self.app,
            "pin": self.pin.to_dict() if self.pin else None,
            "commit": self.commit,
            "files": self.files,
        }


def unpin_in_repo(
    workspace: Workspace,
    *,
    env: str,
    app: str,
    author: Author,
    retry: RetryPolicy | None = None,
) -> UnpinResult:
    """`conveyor unpin`: one commit on the environment's branch that lifts the app's pin;
    no commit when the app is not pinned."""
    target = environment(workspace.project(), env)
    source = workspace.app(target, app)  # PromotionError naming the apps otherwise
    result = UnpinResult(target.name, app, None, None, [])

    def lift(root: Path) -> None:
        apps = {a.name: a for a in discover(root, target.path).apps}
        if app not in apps:
            raise PromotionError(f"{target.name} has no app {app!r} any more")
        result.pin = app_pin(root, apps[app])
        result.files = unpin_app(root, apps[app])

    result.pin = app_pin(workspace.env_root(target), source)
    if result.pin is None:
        return result
    by = f" (pinned by {result.pin.by})" if result.pin.by else ""
    result.commit = commit_and_push(
        workspace.checkout(target.branch),
        lift,
        message=(
            f"Unpin {app} in {target.name}{by}: image automation follows it again"
            f"\n\n{change_trailer('unpin')}"
        ),
        author=author,
        retry=retry,
    )
    return result
