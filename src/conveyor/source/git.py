"""Git through the `git` CLI: clone, fetch and pin a revision, commit, push with retry.

The CLI (not a library) so that deploy keys (`GIT_SSH_COMMAND`), credential helpers and
every transport behave exactly as they do for the teams' own scripts. Arguments are
always lists; URLs are shown with any password masked. URLs, branches and revisions that
come from files or requests are checked (`conveyor.config.names`) before git runs, and
`--end-of-options` ends the options wherever a subcommand takes it, so no such value
ever becomes an option (`--upload-pack=<command>`) or a transport that runs a command.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conveyor.config.names import UnsafeValueError, git_ref, git_revision, git_url
from conveyor.config.names import mask_url as mask_url  # where callers have always found it
from conveyor.errors import ConveyorError


class GitError(ConveyorError, RuntimeError):
    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        self.args_list = [mask_url(a) for a in args]
        self.returncode = returncode
        self.stderr = mask_url(stderr.strip())
        super().__init__(f"git {' '.join(self.args_list[1:])} failed ({returncode}): {self.stderr}")


class UnsafeGitArgument(GitError):
    """A value refused before git ran: git would have read it as an option or a command."""

    def __init__(self, command: str, reason: str) -> None:
        self.args_list = ["git", command]
        self.returncode = 2
        self.stderr = mask_url(reason)
        RuntimeError.__init__(self, f"git {command} refused: {self.stderr}")


def _checked(check: Callable[..., str], value: object, *, command: str, what: str) -> str:
    """`value` as `check` (a rule of conveyor.config.names) accepts it, else a GitError."""
    try:
        return check(value, what=what)
    except UnsafeValueError as error:
        raise UnsafeGitArgument(command, str(error)) from None


@dataclass(frozen=True)
class Author:
    name: str = "conveyor"
    email: str = "conveyor@localhost"


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password prompt in automation; fail with a clear error instead.
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    # The transports a repository may be fetched over: never `ext::` (runs a command) nor
    # another remote helper, whatever a URL in a file asks for.
    env.setdefault("GIT_ALLOW_PROTOCOL", "https:http:ssh:git:file")
    if extra:
        env.update(extra)
    return env


def run_git(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
    input: str | None = None,
) -> str:
    command = ["git", *args]
    result = subprocess.run(
        command,
        cwd=cwd,
        env=git_env(env),
        input=input,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise GitError(command, result.returncode, result.stderr or result.stdout)
    return result.stdout


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """An advisory lock between processes, released when the block ends (or they die)."""
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Checkout:
    """A local working copy of one branch of a remote repository."""

    path: Path
    url: str
    branch: str
    env: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        _checked(git_url, self.url, command="remote", what="repository URL")
        _checked(git_ref, self.branch, command="fetch", what="branch")

    def git(self, *args: str, check: bool = True) -> str:
        return run_git(list(args), cwd=self.path, env=self.env, check=check)

    @classmethod
    def open(
        cls, url: str, path: Path, *, branch: str = "main", env: Mapping[str, str] | None = None
    ) -> Checkout:
        """Clone `url` into `path` (or reuse the clone there) and sync to the remote branch.
        Processes sharing the clone (five `conveyor reconcile` at once) take turns: git
        refuses concurrent writers of one repository's config and index."""
        checkout = cls(path=path, url=url, branch=branch, env=env)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.parent / f"{path.name}.lock"):
            if not (path / ".git").exists():
                path.mkdir(parents=True, exist_ok=True)
                run_git(["init", "--quiet", f"--initial-branch={branch}", str(path)], env=env)
                checkout.git("remote", "add", "--end-of-options", "origin", url)
            else:
                checkout.git("remote", "set-url", "--end-of-options", "origin", url)
            checkout.sync()
        return checkout

    def fetch(self, branch: str | None = None) -> str | None:
        """Fetch the branch (default: ours); return the remote head SHA, or None if the
        branch does not exist (yet). An unreachable remote raises GitError."""
        name = _checked(git_ref, branch or self.branch, command="fetch", what="branch")
        try:
            self.git(
                "fetch",
                "--quiet",
                "--prune",
                "--end-of-options",
                "origin",
                f"+refs/heads/{name}:refs/remotes/origin/{name}",
            )
        except GitError:
            # Missing branch (empty repo) is fine; anything else, e.g. unreachable, raises.
            if self.git("ls-remote", "--heads", "--end-of-options", "origin", name).strip():
                raise
            return None
        return self.git("rev-parse", f"refs/remotes/origin/{name}").strip()

    def sync(self) -> str | None:
        """Make the working tree exactly the remote branch head (discarding local edits)."""
        head = self.fetch()
        if head is None:
            self.git("checkout", "--quiet", "--orphan", self.branch, check=False)
            return None
        # `head` is a SHA git just printed and the branch was checked on creation;
        # `checkout` and `reset` take no --end-of-options before these arguments.
        self.git("checkout", "--quiet", "-B", self.branch, head, "--")
        self.git("reset", "--quiet", "--hard", head, "--")
        self.git("clean", "--quiet", "-fdx")
        return head

    def head(self) -> str | None:
        sha = self.git("rev-parse", "--verify", "--quiet", "HEAD", check=False).strip()
        return sha or None

    def commit_all(self, message: str, *, author: Author) -> str | None:
        """Commit every change in the tree; None (and no commit) when nothing changed."""
        self.git("add", "--all")
        if not self.git("status", "--porcelain"):
            return None
        run_git(
            [
                "-c",
                f"user.name={author.name}",
                "-c",
                f"user.email={author.email}",
                "commit",
                "--quiet",
                "--no-verify",
                "-m",
                message,
            ],
            cwd=self.path,
            env=self.env,
        )
        return self.head()

    def push(self, *, branch: str | None = None, force: bool = False) -> bool:
        """Push HEAD to the branch (or to `branch`). False when the remote moved
        (non-fast-forward); `force` replaces the remote branch, for review branches."""
        name = _checked(git_ref, branch or self.branch, command="push", what="branch")
        return self._push(f"HEAD:refs/heads/{name}", *(["--force"] if force else []))

    def replace_branch(self, branch: str) -> str | None:
        """Make `branch` (a review branch, not ours) exactly HEAD: force-push with a lease on
        the head just fetched. Returns the branch head, the existing one when it already
        holds the same tree (nothing new to review); None when someone moved it meanwhile."""
        branch = _checked(git_ref, branch, command="push", what="branch")
        seen = self.fetch(branch)
        if seen is not None and self.git("rev-parse", f"{seen}^{{tree}}") == self.git(
            "rev-parse", "HEAD^{tree}"
        ):
            return seen
        lease = f"--force-with-lease=refs/heads/{branch}:{seen or ''}"
        return self.head() if self._push(f"HEAD:refs/heads/{branch}", lease) else None

    def replace_with(self, commit: str, branch: str, *, seen: str | None) -> bool:
        """Make `branch` exactly `commit` (a review branch, force-pushed), if it is still
        at `seen` (None: if it does not exist); False when someone moved it meanwhile."""
        branch = _checked(git_ref, branch, command="push", what="branch")
        commit = _checked(git_ref, commit, command="push", what="commit")
        lease = f"--force-with-lease=refs/heads/{branch}:{seen or ''}"
        return self._push(f"{commit}:refs/heads/{branch}", lease)

    def delete_branch(self, branch: str, *, seen: str) -> bool:
        """Delete the remote `branch` if it is still at `seen`; False when it moved."""
        branch = _checked(git_ref, branch, command="push", what="branch")
        return self._push(f":refs/heads/{branch}", f"--force-with-lease=refs/heads/{branch}:{seen}")

    def _push(self, refspec: str, *options: str) -> bool:
        """True when the push landed, False when it lost a race; other failures raise."""
        result = subprocess.run(
            ["git", "push", "--porcelain", *options, "--end-of-options", "origin", refspec],
            cwd=self.path,
            env=git_env(self.env),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            return True
        output = result.stdout + result.stderr
        if any(
            s in output
            for s in (
                "[rejected]",
                "non-fast-forward",
                "fetch first",
                "stale info",
                "cannot lock ref",
                "failed to update ref",
            )
        ):
            return False
        raise GitError(["git", "push", self.url], result.returncode, output)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter, so racing pipelines spread out."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311


class PushRaceLost(ConveyorError, RuntimeError):
    pass


def commit_and_push(
    checkout: Checkout,
    change: Callable[[Path], object],
    *,
    message: str | Callable[[], str],
    author: Author,
    retry: RetryPolicy | None = None,
    on_retry: Callable[[int, float], None] | None = None,
    push_branch: str | None = None,
) -> str | None:
    """Apply `change` on the latest remote head, commit once, push; retry on a lost race.

    Each attempt starts again from the remote head and re-runs `change`, so a concurrent
    writer's commit is never overwritten and ours lands exactly once. Returns the commit
    SHA, or None when `change` left the tree as it was (no empty commits). `message` may
    be a function, called after `change`, when the message describes what it did. With
    `push_branch`, the commit goes to that branch for review instead (replacing it, see
    `Checkout.replace_branch`), and the checked-out branch is left alone. `on_retry`
    hears of each lost race (the attempt that lost, the delay before the next one).
    """
    policy = retry or RetryPolicy()
    for attempt in range(policy.attempts):
        checkout.sync()
        change(checkout.path)
        text = message() if callable(message) else message
        sha = checkout.commit_all(text, author=author)
        if sha is None:
            return None
        if push_branch is None or push_branch == checkout.branch:
            if checkout.push():
                return sha
        elif (head := checkout.replace_branch(push_branch)) is not None:
            return head
        delay = policy.delay(attempt)
        if on_retry is not None:
            on_retry(attempt + 1, delay)
        time.sleep(delay)
    raise PushRaceLost(
        f"could not push to {mask_url(checkout.url)} ({checkout.branch}) after "
        f"{policy.attempts} attempts: the branch kept moving"
    )


def shallow_clone(url: str, path: Path, *, env: Mapping[str, str] | None = None) -> Path:
    """The default branch's latest tree of `url` in `path`, for reading files only."""
    url = _checked(git_url, url, command="clone", what="repository URL")
    run_git(["clone", "--quiet", "--depth", "1", "--end-of-options", url, str(path)], env=env)
    return path


@dataclass(frozen=True)
class CommitFiles:
    """One commit and the paths it touched (against its first parent)."""

    sha: str
    author_name: str
    author_email: str
    paths: tuple[str, ...]


def commits_between(repo: Path, base: str, head: str) -> list[CommitFiles]:
    """Every commit reachable from `head` but not `base`, oldest first, with its paths."""
    base, head = _revisions("log", base, head)
    out = run_git(
        [
            "log",
            "--reverse",
            "--no-renames",
            "--name-only",
            "-z",
            "--format=%x1e%H%x1f%an%x1f%ae",
            "--end-of-options",
            f"{base}..{head}",
            "--",
        ],
        cwd=repo,
    )
    commits = []
    for record in out.split("\x1e")[1:]:
        header, _, names = record.partition("\0")
        sha, name, email = header.split("\x1f")
        paths = tuple(p for p in names.lstrip("\n").split("\0") if p)
        commits.append(CommitFiles(sha, name, email, paths))
    return commits


def paths_changed(repo: Path, base: str, head: str) -> list[str]:
    """Paths that differ between the merge base of `base` and `head`, and `head`."""
    base, head = _revisions("diff", base, head)
    out = run_git(
        ["diff", "--no-renames", "--name-only", "-z", "--end-of-options", f"{base}...{head}", "--"],
        cwd=repo,
    )
    return [p for p in out.split("\0") if p]


def _revisions(command: str, *revisions: str) -> tuple[str, ...]:
    return tuple(_checked(git_revision, r, command=command, what="revision") for r in revisions)


def fetch_commit(mirror: Path, url: str, ref: str) -> str:
    """Fetch `ref` (a branch, tag, full ref or commit SHA) of `url` into the bare
    repository `mirror` and return its commit. Both come from files (a chart's git
    source), so both are checked first, and `--end-of-options` keeps them positional."""
    url = _checked(git_url, url, command="fetch", what="repository URL")
    ref = _checked(git_ref, ref, command="fetch", what="ref")
    run_git(["fetch", "--quiet", "--force", "--end-of-options", url, ref], cwd=mirror)
    return run_git(["rev-parse", "--verify", "FETCH_HEAD^{commit}"], cwd=mirror).strip()


def default_branch(repo: str) -> str:
    """The branch the remote repository's HEAD names; `main` when it names none."""
    out = run_git(["ls-remote", "--symref", "--end-of-options", repo, "HEAD"])
    for line in out.splitlines():
        if line.startswith("ref:") and "refs/heads/" in line:
            return line.split("refs/heads/", 1)[1].split()[0]
    return "main"


def remote_commit(url: str, ref: str) -> str | None:
    """The commit `ref` (a branch, tag or full ref) names in the remote `url`, by `git
    ls-remote`; None when the remote has no such ref. A SHA is its own answer. Both come
    from files (a chart's source), so both are checked first."""
    url = _checked(git_url, url, command="ls-remote", what="repository URL")
    ref = _checked(git_ref, ref, command="ls-remote", what="ref")
    if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", ref):
        return ref
    # The pattern `<ref>^{}` lists what an annotated tag peels to (`<ref>` alone does not).
    listed = run_git(["ls-remote", "--end-of-options", url, ref, f"{ref}^{{}}"])
    found: dict[str, str] = {}
    for line in listed.splitlines():
        sha, _, name = line.partition("\t")
        found[name] = sha
    # ls-remote matches any ref ending in `/<ref>` (refs/heads/feature/<ref> too): only
    # the ref itself, a branch or a tag of that name count; a peeled tag (`^{}`) names
    # the commit, not the tag object.
    names = (f"{ref}^{{}}", ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}")
    return next((found[name] for name in names if name in found), None)


def resolve_revision(repo: Path, revision: str) -> str:
    """The commit SHA `revision` names; GitError when it names none."""
    (revision,) = _revisions("rev-parse", revision)
    return run_git(
        ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}"], cwd=repo
    ).strip()


def tree_at(repo: Path, revision: str, path: str) -> str | None:
    """The id of the folder `path` in commit `revision`: equal ids, equal contents. None
    when the commit is not in `repo` or has no such folder."""
    (revision,) = _revisions("rev-parse", revision)
    folder = "" if path in ("", ".") else path  # `REV:` is the commit's whole tree
    found = run_git(
        ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}:{folder}"],
        cwd=repo,
        check=False,
    ).strip()
    return found or None


def fetch_tree(mirror: Path, url: str, ref: str, path: str) -> tuple[str, str]:
    """Fetch `ref` of `url` into the bare repository `mirror` (created when missing) and
    return the commit and the tree of `path` in it (`.` for the whole commit)."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    # One fetch at a time per mirror: each leaves its answer in FETCH_HEAD, which a
    # concurrent fetch of another ref (apps rendered at once, one chart repository at
    # several refs, as a staging sandbox beside the shared apps has) would overwrite.
    with _exclusive(mirror.parent / f"{mirror.name}.lock"):
        if not (mirror / "HEAD").exists():
            mirror.mkdir(parents=True, exist_ok=True)
            run_git(["init", "--quiet", "--bare", str(mirror)])
        commit = fetch_commit(mirror, url, ref)
    tree_spec = f"{commit}:{path}" if path != "." else f"{commit}^{{tree}}"
    return commit, run_git(["rev-parse", tree_spec], cwd=mirror).strip()


def read_file_at(repo: Path, revision: str, path: str) -> str | None:
    """The text of `path` at `revision`, or None when it has no such file."""
    (revision,) = _revisions("show", revision)
    spec = f"{revision}:{path}"
    present = subprocess.run(
        ["git", "cat-file", "-e", "--end-of-options", spec],
        cwd=repo,
        env=git_env(),
        capture_output=True,
        check=False,
    )
    return (
        run_git(["show", "--end-of-options", spec], cwd=repo) if present.returncode == 0 else None
    )


@dataclass(frozen=True)
class LogEntry:
    sha: str
    parents: tuple[str, ...]
    author_name: str
    author_email: str
    date: str  # ISO 8601, the author date
    subject: str
    body: str

    @property
    def author(self) -> str:
        return self.author_name

    @property
    def merge(self) -> bool:
        return len(self.parents) > 1


def _log(repo: Path, options: list[str], revisions: list[str], paths: list[str]) -> list[LogEntry]:
    out = run_git(
        [
            "log",
            "--format=%x1e%H%x1f%P%x1f%an%x1f%ae%x1f%aI%x1f%s%x1f%b",
            *options,
            "--end-of-options",
            *revisions,
            "--",
            *paths,
        ],
        cwd=repo,
    )
    entries = []
    for record in out.split("\x1e")[1:]:
        sha, parents, name, email, date, subject, body = record.split("\x1f", 6)
        entries.append(
            LogEntry(sha, tuple(parents.split()), name, email, date, subject, body.strip())
        )
    return entries


def file_log(
    repo: Path, paths: list[str], *, revision: str = "HEAD", limit: int = 50
) -> list[LogEntry]:
    """The commits that touched `paths` up to `revision`, newest first."""
    return _log(repo, [f"--max-count={limit}"], [*_revisions("log", revision)], paths)


# What changed an app, told from the commit: a `Conveyor-Change:` trailer wins, then the
# messages that publish, image automation (conveyor's and Flux's) and promotion write.
_TRAILER = re.compile(r"^Conveyor-Change:\s*(\S+)", re.MULTILINE | re.IGNORECASE)
_KINDS = (
    ("publish", re.compile(r"^Update from ", re.IGNORECASE)),
    ("image-automation", re.compile(r"^(Update images|Auto-release )", re.IGNORECASE)),
    ("rollback", re.compile(r"^(Roll ?back|Revert)", re.IGNORECASE)),
    ("promotion", re.compile(r"^Promot", re.IGNORECASE)),
)


def change_trailer(kind: str) -> str:
    """The trailer conveyor's own commits carry, read back by `change_kind`."""
    return f"Conveyor-Change: {kind}"


def change_kind(subject: str, body: str) -> str:
    """publish | image-automation | promotion | rollback | manual (or a trailer's word)."""
    trailer = _TRAILER.search(body)
    if trailer:
        return trailer.group(1).lower()
    for kind, pattern in _KINDS:
        if pattern.search(subject):
            return kind
    return "manual"


def last_change(repo: Path, paths: list[str], *, revision: str) -> LogEntry | None:
    """The newest commit up to `revision` that touched `paths`, if any."""
    entries = file_log(repo, paths, revision=revision, limit=1)
    return entries[0] if entries else None


def log_entries(repo: Path, base: str, head: str, *, first_parent: bool = False) -> list[LogEntry]:
    """Commits in `head` but not `base`, newest first, with their messages."""
    base, head = _revisions("log", base, head)
    return _log(repo, ["--first-parent"] if first_parent else [], [f"{base}..{head}"], [])


def export_tree(repo: Path, revision: str, destination: Path, *, paths: Sequence[str] = ()) -> Path:
    """The files of `revision` in `destination` (no .git), to render a past revision;
    only those under `paths` when given (GitError when one is not in that revision)."""
    (revision,) = _revisions("archive", revision)
    destination.mkdir(parents=True, exist_ok=True)
    archive = destination / ".export.tar"
    # Literal pathspecs: a folder's name is never read as git's pathspec magic.
    literal = [f":(literal){path}" for path in paths]
    run_git(
        ["archive", "--format=tar", "-o", str(archive), "--end-of-options", revision, *literal],
        cwd=repo,
    )
    try:
        subprocess.run(
            ["tar", "-xf", str(archive), "-C", str(destination)], check=True, capture_output=True
        )
    finally:
        archive.unlink()
    return destination


def file_history(repo: Path, paths: list[str], *, revision: str = "HEAD") -> list[str]:
    """Commits reachable from `revision` that touched any of `paths`, newest first."""
    (revision,) = _revisions("log", revision)
    out = run_git(["log", "--format=%H", "--end-of-options", revision, "--", *paths], cwd=repo)
    return out.split()


def origin_url(repo: Path) -> str:
    """Where a local clone came from (its `origin`), or the clone itself if it has none:
    the repository an environment deployed from it is known by."""
    result = run_git(["remote", "get-url", "origin"], cwd=repo, check=False).strip()
    return result or str(repo)


def repository_root(path: Path) -> Path:
    """The top of the git working tree holding `path`; GitError outside a repository."""
    return Path(run_git(["rev-parse", "--show-toplevel"], cwd=path).strip())


def create_branch(repo: Path, name: str, start: str) -> str:
    """Create branch `name` at `start` (not checked out); returns the commit. GitError when
    the branch exists or `start` names no commit."""
    name = _checked(git_ref, name, command="branch", what="branch")
    sha = resolve_revision(repo, start)
    run_git(["branch", "--no-track", "--end-of-options", name, sha], cwd=repo)
    return sha


def commit_to_review_branch(
    checkout: Checkout,
    change: Callable[[Path], object],
    *,
    branch: str,
    message: str,
    author: Author,
) -> str | None:
    """Apply `change` on the latest head of the checkout's branch, commit once and push the
    result to `branch`, replacing what a previous run left there (a branch for review,
    such as `candidates/<name>`). None, and no push, when `change` changed nothing."""
    checkout.sync()
    change(checkout.path)
    sha = checkout.commit_all(message, author=author)
    if sha is None:
        return None
    if not checkout.push(branch=branch, force=True):
        raise GitError(["git", "push", checkout.url, branch], 1, f"{branch} was rejected")
    return sha


def push_branch(repo: Path, branch: str, *, remote: str = "origin") -> None:
    """Publish a local branch to `remote` under the same name (never forced)."""
    branch = _checked(git_ref, branch, command="push", what="branch")
    remote = _checked(git_url, remote, command="push", what="remote")
    run_git(
        ["push", "--quiet", "--end-of-options", remote, f"refs/heads/{branch}:refs/heads/{branch}"],
        cwd=repo,
    )


def remote_heads(url: str) -> dict[str, str]:
    """Every branch of the remote repository and its head commit, by branch name."""
    url = _checked(git_url, url, command="ls-remote", what="repository URL")
    heads = {}
    for line in run_git(["ls-remote", "--heads", "--end-of-options", url]).splitlines():
        sha, _, ref = line.partition("\t")
        if ref.startswith("refs/heads/"):
            heads[ref.removeprefix("refs/heads/")] = sha
    return heads


def commit_paths(
    repo: Path,
    revision: str,
    paths: list[str],
    *,
    parent: str | None,
    message: str,
    author: Author,
) -> str:
    """A commit (not on any branch) whose tree holds only `paths` of `revision`, with
    `parent` as its parent (none: a root commit). The working tree and index of `repo`
    are left alone: the tree is built in an index of its own."""
    (revision,) = _revisions("ls-tree", revision)
    listed = run_git(
        ["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", revision, "--", *paths],
        cwd=repo,
    )
    with tempfile.TemporaryDirectory(prefix="conveyor-index-") as scratch:
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        run_git(["update-index", "-z", "--index-info"], cwd=repo, env=index, input=listed)
        tree = run_git(["write-tree"], cwd=repo, env=index).strip()
    parents = (
        ["-p", _checked(git_ref, parent, command="commit-tree", what="parent")] if parent else []
    )
    return _commit_tree(repo, tree, parents, message=message, author=author)


def _commit_tree(repo: Path, tree: str, parents: list[str], *, message: str, author: Author) -> str:
    identity = {
        "GIT_AUTHOR_NAME": author.name,
        "GIT_AUTHOR_EMAIL": author.email,
        "GIT_COMMITTER_NAME": author.name,
        "GIT_COMMITTER_EMAIL": author.email,
    }
    # The message goes on stdin: from a branch name, it must never be read as an option.
    return run_git(["commit-tree", *parents, tree], cwd=repo, env=identity, input=message).strip()


@dataclass(frozen=True)
class CommitInfo:
    tree: str
    parents: tuple[str, ...]
    message: str


def read_commit(repo: Path, revision: str) -> CommitInfo:
    """The tree, parents and message of the commit `revision` names."""
    (revision,) = _revisions("show", revision)
    out = run_git(["show", "-s", "--format=%T%x1f%P%x1f%B", "--end-of-options", revision], cwd=repo)
    tree, parents, message = out.split("\x1f", 2)
    return CommitInfo(tree, tuple(parents.split()), message.strip())


class MergeConflict(GitError):
    """Two revisions do not merge without a person: the files in conflict."""

    def __init__(self, base: str, head: str, files: list[str]) -> None:
        self.files = files
        super().__init__(["git", "merge-tree", base, head], 1, f"conflict in {', '.join(files)}")


def merge_commit(repo: Path, base: str, head: str, *, message: str, author: Author) -> str:
    """The commit that merging `head` into `base` would make (not on any branch), as a
    pull request's merge is; MergeConflict naming the files when they conflict."""
    base, head = (_checked(git_ref, r, command="merge-tree", what="revision") for r in (base, head))
    result = subprocess.run(
        ["git", "merge-tree", "--write-tree", "--name-only", "-z", base, head],
        cwd=repo,
        env=git_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 1:
        # The tree, then the conflicted files, then an empty field and git's messages.
        fields = result.stdout.split("\0")
        files = sorted({f for f in fields[1 : fields.index("")] if f} if "" in fields else set())
        raise MergeConflict(base, head, files)
    if result.returncode != 0:
        raise GitError(["git", "merge-tree", base, head], result.returncode, result.stderr)
    tree = result.stdout.split("\0")[0].strip()
    return _commit_tree(repo, tree, ["-p", base, "-p", head], message=message, author=author)
