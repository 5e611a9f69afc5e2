"""etcd adapter: connect (TLS, auth), read and write JSON values, and follow the prefix.

``follow`` lists the prefix, then watches it from the next revision. A compacted or
cancelled watch leads to a re-list that keeps the last good value of keys whose new value
is bad; an unreachable etcd is retried with backoff while Envoy keeps its last config.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from etcd3aio import Etcd3Client, EtcdError, SortOrder, SortTarget, prefix_range_end

from control_plane.config.state import ConfigState
from control_plane.errors import EtcdSettingsError

log = logging.getLogger(__name__)

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_PREFIX = "/hotpath/"
HEALTH_INTERVAL_S = 2.0
# How many earlier values of a refused key a fresh read looks at for a good one.
HISTORY_STEPS = 10


@dataclass(frozen=True)
class EtcdSettings:
    """Where etcd is and how to talk to it. ``urls``: comma-separated http(s) URLs."""

    urls: str = DEFAULT_ETCD
    prefix: str = DEFAULT_PREFIX
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None

    def endpoints(self) -> list[tuple[str, int]]:
        hosts = []
        for url in self.urls.split(","):
            parts = urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise EtcdSettingsError(f"etcd URL {url!r} must look like http://host:port")
            hosts.append((parts.hostname, parts.port or 2379))
        return hosts

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.urls.startswith("https://")


def child_etcd_args(settings: EtcdSettings) -> list[str]:
    """The `hotpath` flags that make a child process use the same etcd (password: env)."""
    args = ["--etcd", settings.urls, "--prefix", settings.prefix]
    for flag, value in (("--etcd-ca", settings.ca_file), ("--etcd-cert", settings.cert_file),
                        ("--etcd-key", settings.key_file), ("--etcd-user", settings.user)):
        if value is not None:
            args += [flag, value]
    return args


def child_etcd_env(settings: EtcdSettings) -> dict[str, str]:
    """The password travels in the environment, never on a command line others can read."""
    return {} if settings.password is None else {"HOTPATH_ETCD_PASSWORD": settings.password}


def _resolve(host: str) -> str:
    # etcd3aio dials an ipv4: target, so hostnames (compose service names) are resolved here.
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
    except socket.gaierror as exc:
        raise EtcdSettingsError(f"cannot resolve etcd host {host!r}: {exc}") from None


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EtcdSettingsError(f"cannot read etcd {what} {path!r}: {exc}") from None


@asynccontextmanager
async def etcd_client(settings: EtcdSettings) -> AsyncIterator[Etcd3Client]:
    """A connected client; authenticates when a user is set."""
    endpoints = settings.endpoints()
    addresses = [f"{_resolve(host)}:{port}" for host, port in endpoints]
    tls_args: dict[str, Any] = {}
    if settings.tls:
        ca = _read(settings.ca_file, "CA file")
        if ca is None:
            raise EtcdSettingsError("https etcd URLs need --etcd-ca (the CA certificate)")
        tls_args = {
            "ca_cert": ca,
            "cert_key": _read(settings.key_file, "client key"),
            "cert_chain": _read(settings.cert_file, "client certificate"),
            "tls_server_name": endpoints[0][0],
        }
    client = Etcd3Client(addresses, **tls_args)
    await client.connect()
    try:
        if settings.user:
            assert client.auth is not None
            reply = await client.auth.authenticate(settings.user, settings.password or "")
            client.set_token(reply.token)
        yield client
    finally:
        await client.close()


def full_key(settings: EtcdSettings, key: str) -> str:
    return settings.prefix + key


async def put_json(client: Etcd3Client, settings: EtcdSettings, key: str, value: Any,
                   lease: int = 0) -> None:
    assert client.kv is not None
    await client.kv.put(full_key(settings, key), json.dumps(value, separators=(",", ":")),
                        lease=lease, timeout=10)


async def delete(client: Etcd3Client, settings: EtcdSettings, key: str, *,
                 prefix: bool = False) -> int:
    assert client.kv is not None
    name = full_key(settings, key)
    reply = await client.kv.delete(name, range_end=prefix_range_end(name) if prefix else None,
                                   timeout=10)
    return int(reply.deleted)


async def list_prefix(client: Etcd3Client, settings: EtcdSettings, key: str = ""
                      ) -> tuple[int, list[tuple[str, bytes, int]]]:
    """(revision, [(key relative to the prefix, value, mod_revision)]) under ``key``."""
    assert client.kv is not None
    name = full_key(settings, key)
    reply = await client.kv.get(name, range_end=prefix_range_end(name), timeout=10)
    items = [
        (kv.key.decode()[len(settings.prefix):], bytes(kv.value), int(kv.mod_revision))
        for kv in reply.kvs
    ]
    return int(reply.header.revision), items


class EtcdFollower:
    """Feeds a ConfigState from etcd and calls ``on_change(revision)`` after each batch."""

    def __init__(self, settings: EtcdSettings, state: ConfigState,
                 on_change: Callable[[int], None]) -> None:
        self.settings = settings
        self.state = state
        self.on_change = on_change
        self.connected = False
        self.synced_revision = 0
        self.heard_at = time.monotonic()
        self.behind_since: float | None = None
        self._logged: dict[str, str] = {}

    def lag_seconds(self) -> float:
        """How long the watch has been behind the newest write under the prefix (0: not)."""
        return 0.0 if self.behind_since is None else time.monotonic() - self.behind_since

    def _apply(self, key: str, value: bytes | None, revision: int) -> None:
        rejection = self.state.apply(key, value, revision)
        still_refused = self.state.rejected
        for recovered in [k for k in self._logged if k not in still_refused]:
            del self._logged[recovered]
            log.info("%s%s: accepted", self.settings.prefix, recovered)
        if rejection is None:
            return
        # Logged once per distinct reason, however often the key is re-read.
        if self._logged.get(key) != rejection.message:
            self._logged[key] = rejection.message
            log.error("rejected %s%s; keeping its last good value", self.settings.prefix,
                      rejection.message)

    async def _relist(self, client: Etcd3Client) -> int:
        revision, items = await list_prefix(client, self.settings)
        present = {key for key, _, _ in items}
        for key in self.state.keys() - present:
            self._apply(key, None, revision)
        # In write order, so "a model belongs to one pool" keeps the pool that had it first.
        for key, value, mod_revision in sorted(items, key=lambda item: item[2]):
            if self.state.raw(key) != value:
                self._apply(key, value, mod_revision)
                if not self.state.in_force(key):
                    await self._recover(client, key, mod_revision)
        self.state.revision = max(self.state.revision, revision)
        return revision

    async def _recover(self, client: Etcd3Client, key: str, mod_revision: int) -> None:
        """A key refused on a fresh read (a restarted control plane) has no last good value in
        memory: look for one in etcd's history, back to the last compaction."""
        assert client.kv is not None
        revision = mod_revision - 1
        for _ in range(HISTORY_STEPS):
            if revision <= 0:
                return
            try:
                reply = await client.kv.get(full_key(self.settings, key), revision=revision,
                                            timeout=5)
            except (EtcdError, grpc.aio.AioRpcError):
                return  # compacted: nothing older to use
            if not reply.kvs:
                return  # the key did not exist yet
            old = reply.kvs[0]
            if self.state.restore(key, bytes(old.value)):
                log.warning("%s%s: keeping its last good value, from etcd revision %d",
                            self.settings.prefix, key, old.mod_revision)
                return
            revision = int(old.mod_revision) - 1

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with etcd_client(self.settings) as client:
                    revision = await self._relist(client)
                    self.connected = True
                    backoff = 0.2
                    self.synced_revision = revision
                    self.heard_at = time.monotonic()
                    self.on_change(revision)
                    health = asyncio.create_task(self._health(client), name="etcd-health")
                    try:
                        await self._watch(client, revision + 1)
                    finally:
                        health.cancel()
                        await asyncio.gather(health, return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: retry, keep last config
                if self.connected:
                    log.warning("etcd connection lost (%s); Envoy keeps its last config", exc)
                else:
                    log.warning("etcd unavailable at %s (%s); retrying", self.settings.urls, exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _health(self, client: Etcd3Client) -> None:
        """The watch retries a lost etcd silently: this check is what notices, and measures
        how long the watch has been behind the newest write under the prefix."""
        assert client.kv is not None
        name = self.settings.prefix
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                reply = await client.kv.get(
                    name, range_end=prefix_range_end(name), limit=1, keys_only=True,
                    sort_order=SortOrder.DESCEND, sort_target=SortTarget.MOD,
                    timeout=HEALTH_INTERVAL_S, max_attempts=1)
            except (EtcdError, TimeoutError) as exc:
                if self.connected:
                    log.warning("etcd unreachable at %s (%s); Envoy keeps its last config",
                                self.settings.urls, exc)
                self.connected = False
                continue
            if not self.connected:
                log.info("etcd reachable again at %s", self.settings.urls)
            self.connected = True
            self.heard_at = time.monotonic()
            newest = max((int(kv.mod_revision) for kv in reply.kvs), default=0)
            if newest > self.synced_revision:
                self.behind_since = self.behind_since or time.monotonic()
            else:
                self.behind_since = None

    async def _watch(self, client: Etcd3Client, start: int) -> None:
        assert client.watch is not None
        name = self.settings.prefix
        async for reply in client.watch.watch(name, range_end=prefix_range_end(name),
                                              start_revision=start, progress_notify=True):
            self.heard_at = time.monotonic()
            if reply.compact_revision or reply.canceled:
                log.warning("etcd watch %s (compacted at %d); re-listing",
                            "cancelled" if reply.canceled else "compacted",
                            reply.compact_revision)
                return
            for event in reply.events:
                key = event.kv.key.decode()[len(name):]
                deleted = event.type == 1  # mvccpb.Event.DELETE
                self._apply(key, None if deleted else bytes(event.kv.value),
                            int(event.kv.mod_revision))
            self.synced_revision = int(reply.header.revision)
            if reply.events:
                self.on_change(self.synced_revision)


class LeaseLost(RuntimeError):
    """etcd no longer knows the lease (it expired while etcd was unreachable)."""


async def keep_alive_once(client: Etcd3Client, lease_id: int) -> None:
    """Renew a lease once; LeaseLost when etcd no longer has it."""
    assert client.lease is not None
    call = client.lease.keep_alive(lease_id)
    try:
        async for reply in call:
            if reply.TTL <= 0:
                raise LeaseLost(f"lease {lease_id:x} expired")
            return
        raise LeaseLost(f"lease {lease_id:x}: keep-alive stream ended")
    finally:
        call.cancel()


async def hold_under_lease(settings: EtcdSettings, entries: list[tuple[str, Any]], ttl: int,
                           registered: asyncio.Event | None = None) -> None:
    """Keep ``entries`` (key, JSON value) in etcd under a lease until cancelled.

    Re-registers after etcd comes back or the lease expired; on cancellation revokes the
    lease so the keys go at once (graceful deregistration).
    """
    while True:
        try:
            async with etcd_client(settings) as client:
                assert client.lease is not None
                lease = await client.lease.grant(ttl=ttl, timeout=10)
                try:
                    for key, value in entries:
                        await put_json(client, settings, key, value, lease=lease.ID)
                    if registered is not None:
                        registered.set()
                    while True:
                        await asyncio.sleep(max(0.5, ttl / 3))
                        await asyncio.wait_for(keep_alive_once(client, lease.ID), timeout=5)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.lease.revoke(lease.ID), timeout=3)
                    raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep trying while asked to hold
            if registered is not None:
                registered.clear()
            log.warning("lease for %s lost (%s); registering again",
                        ", ".join(k for k, _ in entries), exc)
            await asyncio.sleep(1.0)
