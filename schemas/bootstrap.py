"""The bootstrap token an operator hands to a new site: its id, a secret, where the center is.

Shared wire format of the center (which mints it) and the edge (which presents it once).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

TOKEN_PREFIX = "ebt1."


@dataclass(frozen=True)
class BootstrapToken:
    """The token an operator hands to a site: its id, the secret, and where the center is."""

    site: str
    secret: str
    center_urls: tuple[str, ...] = ()
    bootstrap_creds: str | None = None  # NATS creds allowed only to request onboarding

    def encode(self) -> str:
        body = {"site": self.site, "secret": self.secret, "center": list(self.center_urls)}
        if self.bootstrap_creds:
            body["creds"] = self.bootstrap_creds
        raw = json.dumps(body, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> BootstrapToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise ValueError("not an edgebus bootstrap token (expected 'ebt1.' prefix)")
        payload = text[len(TOKEN_PREFIX) :]
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return cls(
                site=str(body["site"]),
                secret=str(body["secret"]),
                center_urls=tuple(str(u) for u in body.get("center", [])),
                bootstrap_creds=body.get("creds"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed bootstrap token: {exc}") from None
