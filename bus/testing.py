"""Hub plus edge sites on real nats-servers, for tests, the demo and fault drills.
Sites reach the hub through their own LinkProxy; with an authority the hub uses operator mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from bus.auth import CredentialAuthority, SiteIdentity, write_private
from bus.linkproxy import LinkProxy
from bus.natsserver import NatsServerProcess, NatsServerSpec

__all__ = ["EdgeTopology"]

HUB_NAME = "hub"
# Sites retry a lost hub link this often (nats-server default: 1 s); short, so a
# restored link or restarted hub heals in ~0.25 s and fault tests stay fast.
DEFAULT_LEAF_RECONNECT_SECONDS = 0.25
_POLL_INTERVAL = 0.02


@dataclass
class _Site:
    server: NatsServerProcess
    proxy: LinkProxy | None


class EdgeTopology:
    """One hub (JetStream domain "hub") and any number of leaf-node sites under base_dir.

    Layout: base_dir/hub/{hub.conf,hub.log,store}, base_dir/sites/<id>/{...}.
    Blocking API: call it from a worker thread (asyncio.to_thread) when an event loop
    with live clients must keep running meanwhile.

    With `authority`, the hub trusts only its operator (decentralized auth, full account
    resolver in base_dir/hub/accounts): every client and leaf needs creds, see
    `site_credentials`, `service_credentials` and `add_site(..., credentials=...)`.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        leaf_reconnect_seconds: float | None = DEFAULT_LEAF_RECONNECT_SECONDS,
        authority: CredentialAuthority | None = None,
    ) -> None:
        self.base_dir = base_dir
        # None keeps nats-server's own 1 s retry interval.
        self.leaf_reconnect_seconds = leaf_reconnect_seconds
        self.authority = authority
        self._hub: NatsServerProcess | None = None
        self._sites: dict[str, _Site] = {}

    # -- hub -----------------------------------------------------------------

    def start_hub(self, timeout: float = 10.0) -> NatsServerProcess:
        if self._hub is not None:
            raise RuntimeError("the hub was already started; use hub.start()/stop() directly")
        workdir = self.base_dir / HUB_NAME
        extra = (
            self.authority.server_config_block(workdir / "accounts")
            if self.authority is not None
            else ""
        )
        spec = NatsServerSpec.hub(HUB_NAME, workdir / "store", extra_config=extra)
        hub = NatsServerProcess(spec, workdir)
        hub.start(timeout)
        self._hub = hub
        return hub

    @property
    def hub(self) -> NatsServerProcess:
        if self._hub is None:
            raise RuntimeError("start_hub() first")
        return self._hub

    # -- sites ---------------------------------------------------------------

    def add_site(
        self,
        site_id: str,
        *,
        mqtt: bool = True,
        via_proxy: bool = True,
        credentials: Path | None = None,
        timeout: float = 10.0,
    ) -> NatsServerProcess:
        """Start a site whose leaf remote points at the hub (through a LinkProxy by default).

        `credentials`: the site's creds file for its leaf remote (needed with an authority).
        Returns once the site's leaf connection to the hub is up.
        """
        if site_id in self._sites:
            raise ValueError(f"site {site_id!r} already exists")
        if self.authority is not None and credentials is None:
            # Fail now rather than wait out `timeout` for a leaf the hub will refuse.
            raise ValueError(f"the hub requires creds: add_site({site_id!r}, credentials=...)")
        hub = self.hub
        proxy = self._start_proxy(site_id, hub) if via_proxy else None
        workdir = self.base_dir / "sites" / site_id
        spec = NatsServerSpec.site(
            site_id,
            workdir / "store",
            proxy.url if proxy is not None else hub.leaf_url,
            mqtt=mqtt,
            credentials=credentials,
            leaf_reconnect_seconds=self.leaf_reconnect_seconds,
        )
        server = NatsServerProcess(spec, workdir)
        self._sites[site_id] = _Site(server, proxy)
        # Registered before start so stop() cleans up even if the start fails.
        server.start(timeout)
        self.wait_link_up(site_id, timeout)
        return server

    # -- credentials (only with an authority) -----------------------------------------

    def _require_authority(self) -> CredentialAuthority:
        if self.authority is None:
            raise RuntimeError("this topology has no CredentialAuthority")
        return self.authority

    def site_identity(self, site_id: str) -> SiteIdentity:
        """The site's own key store (base_dir/sites/<id>/identity); its seed stays there."""
        return SiteIdentity(self.base_dir / "sites" / site_id / "identity")

    def site_credentials(self, site_id: str, groups: tuple[str, ...] = ("default",)) -> Path:
        """Onboard as production does: the site makes its keypair, the authority signs
        its public key, the site writes its creds file. Returns that file's path."""
        identity = self.site_identity(site_id)
        user_jwt = self._require_authority().issue_site_credentials(
            site_id, groups, identity.public_key
        )
        return identity.install(user_jwt)

    def service_credentials(self, name: str = "center") -> Path:
        """A creds file for a center service (every permission of the EDGE account)."""
        creds = self._require_authority().issue_service_credentials(name)
        return write_private(self.base_dir / "creds" / f"{name}.creds", creds)

    def system_credentials(self) -> Path:
        """A creds file for a system-account user (pushes account updates)."""
        creds = self._require_authority().system_credentials()
        return write_private(self.base_dir / "creds" / "system.creds", creds)

    def _start_proxy(self, site_id: str, hub: NatsServerProcess) -> LinkProxy:
        leaf_port = hub.spec.leaf_listen_port
        if leaf_port is None:
            raise RuntimeError("the hub has no leaf-node listener")
        proxy = LinkProxy(hub.spec.host, leaf_port, name=site_id)
        proxy.start()
        return proxy

    def site(self, site_id: str) -> NatsServerProcess:
        return self._get(site_id).server

    def proxy(self, site_id: str) -> LinkProxy:
        proxy = self._get(site_id).proxy
        if proxy is None:
            raise RuntimeError(f"site {site_id!r} was added with via_proxy=False")
        return proxy

    @property
    def site_ids(self) -> list[str]:
        return list(self._sites)

    def _get(self, site_id: str) -> _Site:
        try:
            return self._sites[site_id]
        except KeyError:
            raise KeyError(f"unknown site {site_id!r}; known: {self.site_ids}") from None

    # -- link faults ---------------------------------------------------------

    def cut_link(self, site_id: str, timeout: float = 10.0) -> None:
        """Sever the site<->hub link; returns once neither side sees the leaf connection."""
        self.proxy(site_id).cut()
        self._wait(lambda: not self.link_up(site_id), timeout, f"{site_id} link still up")

    def restore_link(self, site_id: str, timeout: float = 10.0) -> None:
        """Heal the link; returns once the site has reconnected (it retries on its own)."""
        self.proxy(site_id).restore()
        self.wait_link_up(site_id, timeout)

    def link_up(self, site_id: str) -> bool:
        """True when both the site and the hub report the leaf connection between them."""
        site = self.site(site_id)
        if not site.running or not self.hub.running:
            return False
        return site.leaf_connections() > 0 and site_id in self.hub.leaf_names()

    def wait_link_up(self, site_id: str, timeout: float = 10.0) -> None:
        self._wait(lambda: self.link_up(site_id), timeout, f"{site_id} link not up")

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, failure: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"after {timeout:.1f}s: {failure}")
            time.sleep(_POLL_INTERVAL)

    # -- teardown ------------------------------------------------------------

    def stop(self) -> None:
        """Stop sites, then proxies, then the hub. Idempotent; tries every part."""
        errors: list[BaseException] = []
        for entry in self._sites.values():
            _collect(errors, entry.server.stop)
            if entry.proxy is not None:
                _collect(errors, entry.proxy.stop)
        if self._hub is not None:
            _collect(errors, self._hub.stop)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _collect(errors: list[BaseException], step: Callable[[], None]) -> None:
    try:
        step()
    except Exception as exc:
        errors.append(exc)
