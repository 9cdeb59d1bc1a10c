"""Who may act through the dashboard, and the checks that stop other sites acting for them.

Reading needs no token; every action does. The API takes `Authorization: Bearer`; pages
log in once with the token and get an HttpOnly, SameSite=Strict session cookie, and
every form carries a CSRF token bound to that session. Whatever the credentials, a
state-changing request whose `Sec-Fetch-Site` or `Origin` says it came from another
site is refused, so a browser cannot be made to act from elsewhere. A client that keeps
presenting wrong tokens is slowed to a few guesses a minute, and the token file itself must
be private and its tokens long enough not to be guessed at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from conveyor.errors import ConveyorError

SESSION_COOKIE = "conveyor_session"
SESSION_SECONDS = 12 * 3600
MIN_TOKEN_LENGTH = 32
DEFAULT_NAME = "operator"


class TokenFileError(ConveyorError, ValueError):
    pass


class Throttled(ConveyorError):
    """Too many wrong tokens from one client; it may try again in `retry_after` s."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, round(retry_after + 0.5))
        super().__init__(f"too many wrong tokens: try again in {self.retry_after}s")


@dataclass(frozen=True)
class Principal:
    """Who did it: the name given to their token, and how they came in."""

    name: str
    via: str  # api | dashboard
    remote: str


@dataclass
class _Session:
    name: str
    expires: float


def load_tokens(path: Path) -> dict[str, str]:
    """Token → name, from lines `TOKEN` or `NAME TOKEN` (`#` starts a comment). The file
    must be readable by its owner only, as ssh demands of a private key."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TokenFileError(f"cannot read token file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"{path}: not UTF-8 text") from None
    if mode & 0o077:
        raise TokenFileError(
            f"token file {path} is open to others (mode {mode:04o}): run `chmod 600 {path}`"
        )
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise TokenFileError(f"{path}:{number}: expected `TOKEN` or `NAME TOKEN`")
        name, token = (DEFAULT_NAME, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        if len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(
                f"{path}:{number}: the token has {len(token)} characters; tokens need "
                f"{MIN_TOKEN_LENGTH} or more (e.g. `openssl rand -hex 32`)"
            )
        tokens[token] = name
    if not tokens:
        raise TokenFileError(f"{path} holds no token")
    return tokens


class FailureLimiter:
    """Wrong tokens per client: `burst` at once, then one more every `refill` seconds
    (a token bucket). A client past it is refused before its token is even compared.
    At most `clients` are tracked; the longest quiet ones are forgotten first."""

    def __init__(self, *, burst: int = 5, refill: float = 12.0, clients: int = 10_000) -> None:
        self.burst = burst
        self.refill = refill
        self.clients = clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # left, at

    def _left(self, client: str, now: float) -> float:
        left, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), left + (now - at) / self.refill)

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None when it may now."""
        left = self._left(client, time.monotonic())
        return None if left >= 1 else (1 - left) * self.refill

    def failed(self, client: str) -> None:
        now = time.monotonic()
        self._buckets[client] = (max(0.0, self._left(client, now) - 1), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)


class Auth:
    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self._tokens = {hashlib.sha256(t.encode()).digest(): n for t, n in (tokens or {}).items()}
        self._sessions: dict[str, _Session] = {}
        self._key = secrets.token_bytes(32)
        self.failures = FailureLimiter()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def name_for(self, token: str) -> str | None:
        """The token's name, compared in constant time against every known token."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, name in self._tokens.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found

    def verify(self, token: str, *, client: str) -> str | None:
        """The token's name; a wrong token counts against `client`, and a client with
        too many is refused (`Throttled`) before the token is looked at."""
        wait = self.failures.retry_after(client)
        if wait is not None:
            raise Throttled(wait)
        name = self.name_for(token)
        if name is None:
            self.failures.failed(client)
        return name

    def login(self, token: str, *, client: str) -> str | None:
        name = self.verify(token, client=client)
        if name is None:
            return None
        now = time.monotonic()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        session = secrets.token_urlsafe(32)
        self._sessions[session] = _Session(name, now + SESSION_SECONDS)
        return session

    def logout(self, session: str) -> None:
        self._sessions.pop(session, None)

    def session_name(self, session: str | None) -> str | None:
        entry = self._sessions.get(session or "")
        if entry is None or entry.expires < time.monotonic():
            return None
        return entry.name

    def csrf_token(self, session: str | None) -> str:
        if not session:
            return ""
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str | None, token: str | None) -> bool:
        return bool(session and token) and hmac.compare_digest(self.csrf_token(session), str(token))


def cross_site(request: Request) -> str | None:
    """Why a state-changing request looks cross-site, or None when it is same-origin."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("origin")
    if origin is not None:
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != expected:
            return f"cross-site request refused (Origin {origin} is not {expected})"
    return None


def remote(request: Request) -> str:
    return request.client.host if request.client else "unknown"
