"""Write chosen tags back into the config repository as one commit per scan.

Flux v1 committed each image separately (`Auto-release <image>:<tag>`), and a burst of CI
pushes became a storm of commits. Here every change of one scan lands in a single commit
that lists them, or no commit at all when nothing changed. Edits are re-planned against
the latest remote head on each push attempt (see `commit_and_push`), so a concurrent
writer's changes are kept and a value someone already updated is not touched twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.images.automation import Watch, discover, read_text
from conveyor.images.yamltext import Edit, YamlTextError, apply_edits, load_documents
from conveyor.source.git import Author, Checkout, RetryPolicy, commit_and_push

DEFAULT_MESSAGE = "Update images\n\n{changes}\n"
MESSAGE_FIELDS = ("changes", "count", "files")


class MessageTemplateError(ConveyorError, ValueError):
    """A commit message template with a field other than {changes}, {count}, {files}."""


@dataclass(frozen=True)
class Change:
    file: str
    image: str
    old: str | None
    new: str
    automation: str

    @property
    def line(self) -> str:
        return f"{self.image}: {self.old or '(none)'} -> {self.new}"


def check_template(template: str) -> str:
    try:
        template.format(changes="", count=0, files="")
    except (KeyError, IndexError, ValueError) as error:
        raise MessageTemplateError(
            f"commit message template {template!r}: {error!s} "
            f"(fields: {', '.join('{' + f + '}' for f in MESSAGE_FIELDS)})"
        ) from None
    return template


def commit_message(changes: list[Change], template: str = DEFAULT_MESSAGE) -> str:
    """`{changes}` is one `<image>: <old> -> <new>` line per distinct change, sorted."""
    lines = sorted({c.line for c in changes})
    files = sorted({c.file for c in changes})
    return template.format(changes="\n".join(lines), count=len(lines), files="\n".join(files))


def write_changes(root: Path, folder: str, chosen: Mapping[Watch, str]) -> list[Change]:
    """Rewrite, in place, every site whose automation has a chosen tag it does not hold;
    pinned automations are never written."""
    discovery = discover(root, folder)
    edits: dict[str, list[Edit]] = {}
    changes: list[Change] = []
    for automation in discovery.automations:
        tag = chosen.get(automation.watch)
        if tag is None or automation.pin is not None:
            continue
        for site in automation.sites:
            value = site.value_for(tag, repository=automation.repository)
            if value == site.scalar.value:
                continue
            edits.setdefault(site.file, []).append(Edit(site.scalar, value))
            changes.append(
                Change(
                    site.file,
                    str(automation.watch.image),
                    automation.current,
                    tag,
                    automation.name,
                )
            )
    for file, file_edits in edits.items():
        path = root / file
        text = apply_edits(read_text(path), file_edits)
        try:
            load_documents(text)
        except YamlTextError as error:
            raise YamlTextError(f"{file}: the edit would break the file: {error}") from None
        path.write_bytes(text.encode("utf-8"))
    return changes


@dataclass(frozen=True)
class UpdateResult:
    commit: str | None
    changes: list[Change]
    branch: str


def update_repository(
    checkout: Checkout,
    chosen: Mapping[Watch, str],
    *,
    folder: str = ".",
    author: Author | None = None,
    message_template: str = DEFAULT_MESSAGE,
    push_branch: str | None = None,
    retry: RetryPolicy | None = None,
) -> UpdateResult:
    """Write `chosen` tags under `folder`, commit once and push (to `push_branch` for
    review if given). No commit when every file already holds its tag."""
    template = check_template(message_template)
    applied: list[Change] = []

    def change(root: Path) -> None:
        applied[:] = write_changes(root, folder, chosen)

    sha = commit_and_push(
        checkout,
        change,
        message=lambda: commit_message(applied, template),
        author=author or Author(),
        retry=retry,
        push_branch=push_branch,
    )
    return UpdateResult(sha, applied if sha else [], push_branch or checkout.branch)
