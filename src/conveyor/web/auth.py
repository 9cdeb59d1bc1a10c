"""Who may act through the dashboard, and the checks that stop other sites acting for them.

Reading needs no token; every action does. The API takes `Authorization: Bearer`; pages
log in once with the token and get an HttpOnly, SameSite=Strict session cookie, and
every form carries a CSRF token bound to that session. Whatever the credentials, a
state-changing request whose `Sec-Fetch-Site` or `Origin` says it came from another
site is refused, so a browser cannot be made to act from elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

SESSION_COOKIE = "conveyor_session"
SESSION_SECONDS = 12 * 3600
MIN_TOKEN_LENGTH = 16
DEFAULT_NAME = "operator"


class TokenFileError(ValueError):
    pass


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
    """Token → name, from lines `TOKEN` or `NAME TOKEN` (`#` starts a comment)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise TokenFileError(f"cannot read token file {path}: {error.strerror}") from None
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
            raise TokenFileError(f"{path}:{number}: tokens need {MIN_TOKEN_LENGTH}+ characters")
        tokens[token] = name
    if not tokens:
        raise TokenFileError(f"{path} holds no token")
    return tokens


class Auth:
    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self._tokens = {hashlib.sha256(t.encode()).digest(): n for t, n in (tokens or {}).items()}
        self._sessions: dict[str, _Session] = {}
        self._key = secrets.token_bytes(32)

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

    def login(self, token: str) -> str | None:
        name = self.name_for(token)
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
