"""What the controller needs from a credential authority: issue a site's JWT, revoke it.

`PushingAuthority` adapts `bus.auth.CredentialAuthority`, pushing each revocation at once.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from nats.aio.client import Client as NatsClient

from bus.auth import CredentialAuthority


class SiteAuthority(Protocol):
    def issue_site_credentials(self, site: str, group: str, public_key: str) -> str:
        """A user JWT for the site's own public key (it keeps the seed). Raises ValueError
        (e.g. `bus.auth.AuthError`) for a malformed or revoked key."""
        ...

    async def revoke(self, user_public_key: str) -> None:
        """Void every JWT issued to this key, on every server, before returning."""
        ...

    def bootstrap_credentials(self) -> str:
        """Creds text every bootstrap token carries: they may only request onboarding."""
        ...


class PushingAuthority:
    """A CredentialAuthority plus a system-account connection that pushes account updates.

    Revocations are serialised here: the authority's account JWT is the source of truth
    and two pushes must never race (the resolver accepts out-of-order pushes).
    """

    def __init__(self, authority: CredentialAuthority, system_nc: NatsClient) -> None:
        self.authority = authority
        self._system_nc = system_nc
        self._lock = asyncio.Lock()

    def issue_site_credentials(self, site: str, group: str, public_key: str) -> str:
        return self.authority.issue_site_credentials(site, group, public_key)

    def bootstrap_credentials(self) -> str:
        return self.authority.issue_bootstrap_credentials()

    async def revoke(self, user_public_key: str) -> None:
        async with self._lock:
            account_jwt = self.authority.revoke(user_public_key)
            await self.authority.push(self._system_nc, account_jwt)
