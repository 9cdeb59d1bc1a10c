"""What each kind of receiver gets: the request for one notification, built up front.

Built once per delivery and resent unchanged on retries, so a webhook signature always
matches the exact bytes on the wire and a receiver can de-duplicate on the delivery id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from conveyor.config.project import NotificationRule

SIGNATURE_HEADER = "X-Conveyor-Signature-256"
GIT_STATE = {
    "applied": "success",
    "drift-corrected": "success",
    "promoted": "success",
    "waiting-for-gate": "pending",
    "failed": "failure",
    "rolled-back": "error",
}


@dataclass(frozen=True)
class Notification:
    event: str  # applied | failed | drift-corrected | waiting-for-gate | promoted | rolled-back
    environment: str  # the environment's name, as statuses are scoped
    app: str
    # The environment's identity (EnvironmentIdentity.source and .id): two config repos
    # may both have a `staging`, and `--path` names an environment after its folder.
    source: str | None = None
    owner: str | None = None
    state: str = ""
    reason: str = ""
    message: str = ""
    revision: str = ""
    time: str = ""
    actor: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "environment": self.environment,
            "source": self.source,
            "owner": self.owner,
            "app": self.app,
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "revision": self.revision,
            "time": self.time,
            "actor": self.actor,
        }

    def text(self) -> str:
        revision = f" at {self.revision[:12]}" if self.revision else ""
        by = f" by {self.actor}" if self.actor else ""
        return f"[{self.environment}] {self.app}: {self.event}{revision}{by}: {self.message}"


@dataclass(frozen=True)
class Request:
    sink: str  # webhook | slack | git-status, for metrics and logs
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def build_request(rule: NotificationRule, note: Notification, secrets: dict[str, str]) -> Request:
    """The HTTP request for `note` under `rule`; `secrets` holds the rule's read secrets
    (`secret`, `url`, `token`). Raises ValueError when the rule cannot send this one."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "conveyor",
        "X-Conveyor-Event": note.event,
        "X-Conveyor-Delivery": uuid.uuid4().hex,
    }
    if rule.webhook is not None:
        body = json.dumps(note.to_json(), sort_keys=True).encode()
        if "secret" in secrets:
            headers[SIGNATURE_HEADER] = sign(secrets["secret"].encode(), body)
        return Request("webhook", rule.webhook.url, body, headers)
    if rule.slack is not None:
        url = rule.slack.url or secrets["url"]
        return Request("slack", url, json.dumps({"text": note.text()}).encode(), headers)
    if rule.git_status is not None:
        if not note.revision:
            raise ValueError("no revision to set a commit status on")
        sink = rule.git_status
        headers["Authorization"] = f"Bearer {secrets['token']}"
        headers["Accept"] = "application/vnd.github+json"
        body = json.dumps(
            {
                "state": GIT_STATE.get(note.event, "pending"),
                "context": sink.context.format(environment=note.environment, app=note.app),
                "description": f"{note.app}: {note.event}: {note.message}"[:140],
            }
        ).encode()
        url = f"{sink.api.rstrip('/')}/repos/{sink.repository}/statuses/{note.revision}"
        return Request("git-status", url, body, headers)
    raise ValueError("rule has no sink")
