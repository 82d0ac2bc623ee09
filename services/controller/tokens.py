"""Bootstrap tokens: minted at the center for one site, single use, expiring.

Only a hash of the secret is stored; checking a presented token is a pure function.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

# The token's wire format is shared with the edge (which must not import services).
from schemas.bootstrap import TOKEN_PREFIX, BootstrapToken

__all__ = [
    "TOKEN_PREFIX",
    "BootstrapToken",
    "TokenRecord",
    "TokenVerdict",
    "check",
    "hash_secret",
    "mint",
]


class TokenRecord(BaseModel):
    """What the center keeps about a token (KV value, key = site id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    secret_sha256: str
    expires_at: datetime
    used_at: datetime | None = None
    used_by: str | None = None  # public key of the site identity that consumed it


class TokenVerdict(StrEnum):
    VALID = "valid"
    # Already consumed by this very key (a retry after a lost reply): answer again.
    REPEAT = "repeat"
    UNKNOWN = "token_unknown"  # no token was ever minted for this site (or it was deleted)
    WRONG = "token_wrong"  # a token exists for this site but the secret does not match
    EXPIRED = "token_expired"
    USED = "token_used"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(site: str, now: datetime, ttl_s: float) -> tuple[str, TokenRecord]:
    """A fresh secret and the record to store for it."""
    secret = secrets.token_urlsafe(24)
    record = TokenRecord(
        site=site, secret_sha256=hash_secret(secret), expires_at=now + timedelta(seconds=ttl_s)
    )
    return secret, record


def check(
    record: TokenRecord | None, secret: str, now: datetime, public_key: str | None = None
) -> TokenVerdict:
    """Whether `secret` onboards the site of `record` now. Constant-time on the secret.

    A used token is refused, except to the key that used it while the token is still
    within its lifetime: a site whose reply was lost can ask again, and what it gets
    (a JWT for its own public key) is useless to anyone without that key's seed.
    """
    if record is None:
        return TokenVerdict.UNKNOWN
    if not hmac.compare_digest(record.secret_sha256, hash_secret(secret)):
        return TokenVerdict.WRONG
    if record.used_at is not None:
        if public_key and record.used_by == public_key and now < record.expires_at:
            return TokenVerdict.REPEAT
        return TokenVerdict.USED
    if now >= record.expires_at:
        return TokenVerdict.EXPIRED
    return TokenVerdict.VALID
