"""etcd adapter: connect (TLS, auth), read and write JSON values, and follow the prefix.

``follow`` lists the prefix, then watches it from the next revision. A compacted or
cancelled watch leads to a re-list that keeps the last good value of keys whose new value
is bad; an unreachable etcd is retried with backoff while Envoy keeps its last config.

A re-list reads the earlier values of keys from etcd's history (one get at the revision
before each value, back to the last compaction, the key's creation or what is already
known), so a restarted control plane keeps the same last good values as one that saw every
event (state.py has the rules). Any key under the prefix, whatever its bytes, is a value
or one rejected key: a key that is not UTF-8 is reported with its bytes escaped.

One retry policy (``Backoff``: 0.1 s doubling to 1 s, jittered) serves the follower, leased
registrations and the prober's leader election, and the etcd client's own reconnects (gRPC
channel and watch stream) are bounded the same way, so a change written after etcd comes
back is applied within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from etcd3aio import Etcd3Client, EtcdError, SortOrder, SortTarget, prefix_range_end

from control_plane.config.state import ConfigState, Rejection
from control_plane.errors import EtcdSettingsError

log = logging.getLogger(__name__)

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_PREFIX = "/hotpath/"
HEALTH_INTERVAL_S = 2.0
# The one retry policy for etcd trouble: first delay, cap (seconds), and jitter (a delay
# is drawn from [1 - JITTER, 1] times the current step).
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 1.0
RETRY_JITTER = 0.5


class Backoff:
    """Retry delays: ``first`` doubling to ``cap``, each scaled by a random factor in
    [1 - jitter, 1] so that replicas do not retry in step. ``reset()`` after a success."""

    def __init__(self, first: float = RETRY_FIRST_S, cap: float = RETRY_MAX_S,
                 jitter: float = RETRY_JITTER,
                 rand: Callable[[], float] = random.random) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._rand = rand
        self._step = first

    def reset(self) -> None:
        self._step = self.first

    def next_delay(self) -> float:
        delay = self._step * (1 - self.jitter * self._rand())
        self._step = min(self._step * 2, self.cap)
        return delay

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


def decode_key(raw: bytes, prefix: str) -> str | Rejection:
    """The key relative to ``prefix``, or a Rejection when it cannot be used as text (not
    UTF-8, or control characters): its ``key`` shows the bytes escaped, and is what a
    delete of the same bytes maps to, so one bad key is one rejected key."""
    head = prefix.encode()
    rest = raw[len(head):] if raw.startswith(head) else raw
    try:
        key = rest.decode()
    except UnicodeDecodeError:
        shown = _printable(rest.decode(errors="backslashreplace"))
        return Rejection(key=shown, message=f"{shown}: key is not valid UTF-8 "
                                            f"(bytes {rest!r}); delete it")
    if not key.isprintable():
        shown = _printable(key)
        return Rejection(key=shown, message=f"{shown}: key contains control or unprintable "
                                            "characters; delete it")
    return key


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


@dataclass(frozen=True)
class Entry:
    """One key under the prefix as a range read gives it."""

    key: str | Rejection
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    @property
    def name(self) -> str:
        return self.key.key if isinstance(self.key, Rejection) else self.key


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
    client = Etcd3Client(addresses, watch_reconnect_backoff_seconds=RETRY_FIRST_S,
                         watch_max_reconnect_backoff_seconds=RETRY_MAX_S, **tls_args)
    # gRPC's own reconnect backoff (1 s growing by 1.6 to 120 s) would otherwise decide how
    # long after etcd's return the watch resumes: bound it like every other retry.
    client._manager.grpc_options += [
        ("grpc.initial_reconnect_backoff_ms", int(RETRY_FIRST_S * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(RETRY_FIRST_S * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(RETRY_MAX_S * 1000)),
    ]
    await client.connect()
    try:
        if settings.user:
            assert client.auth is not None
            reply = await client.auth.authenticate(settings.user, settings.password or "")
            client.set_token(reply.token)
        yield client
    finally:
        await client.close()


async def serve_forever(settings: EtcdSettings, serve: Callable[[Etcd3Client], Awaitable[None]],
                        what: str) -> None:
    """Run ``serve`` with a connected client, again (with backoff) whenever etcd fails it."""
    backoff = Backoff()
    while True:
        try:
            async with etcd_client(settings) as client:
                await serve(client)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - etcd trouble: try again
            log.warning("%s: %s; retrying", what, exc or type(exc).__name__)
            await backoff.sleep()


async def write_once(client: Etcd3Client, settings: EtcdSettings, key: str, raw: str | None,
                     written: dict[str, tuple[str | None, float]], now: float,
                     catch_up_s: float) -> bool:
    """Put ``raw`` at ``key`` (None: delete it) unless the same value was written less than
    ``catch_up_s`` ago (the watch has not shown it yet); True when written."""
    last = written.get(key)
    if last is not None and last[0] == raw and now - last[1] < catch_up_s:
        return False
    if raw is None:
        await delete(client, settings, key)
    else:
        assert client.kv is not None
        await client.kv.put(settings.prefix + key, raw, timeout=5)
    written[key] = (raw, now)
    return True


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


async def list_entries(client: Etcd3Client, settings: EtcdSettings, key: str = ""
                       ) -> tuple[int, list[Entry]]:
    """(revision, entries) under ``key``; keys relative to the prefix, or a Rejection for
    a key that is not usable text."""
    assert client.kv is not None
    name = full_key(settings, key)
    reply = await client.kv.get(name, range_end=prefix_range_end(name), timeout=10)
    entries = [
        Entry(decode_key(bytes(kv.key), settings.prefix), bytes(kv.value), int(kv.mod_revision),
              int(kv.create_revision), int(kv.lease))
        for kv in reply.kvs
    ]
    return int(reply.header.revision), entries


async def list_prefix(client: Etcd3Client, settings: EtcdSettings, key: str = ""
                      ) -> tuple[int, list[tuple[str, bytes, int]]]:
    """(revision, [(key relative to the prefix, value, mod_revision)]) under ``key``; a key
    that is not usable text comes escaped (see decode_key)."""
    revision, entries = await list_entries(client, settings, key)
    return revision, [(entry.name, entry.value, entry.mod_revision) for entry in entries]


def feed(state: ConfigState, entries: list[Entry]) -> None:
    """Apply a range read's entries to ``state`` (the order does not matter)."""
    for entry in entries:
        if isinstance(entry.key, Rejection):
            state.refuse(entry.key.key, entry.value, entry.key.message, entry.mod_revision,
                         entry.create_revision)
    state.apply_all((entry.key, entry.value, entry.mod_revision, entry.create_revision)
                    for entry in entries if isinstance(entry.key, str))


def _is_compacted(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.OUT_OF_RANGE or "compacted" in str(exc.details())
    return "compacted" in str(exc)


async def read_history(client: Etcd3Client, settings: EtcdSettings, state: ConfigState,
                       key: str, mod_revision: int, known: int = 0) -> tuple[int, bool]:
    """Feed ``state`` the earlier values of ``key`` while it wants them (state.py says
    when): one get at the revision before each value, back to the key's creation, the last
    compaction, or ``known`` (a mod_revision whose value the state already has).

    Returns (values read, whether the walk ended at a compaction).
    """
    assert client.kv is not None
    created = state.created(key)
    revision = mod_revision - 1
    read = 0
    wanted = state.wants_history(key)
    while wanted and revision > known and revision > 0:
        try:
            reply = await client.kv.get(full_key(settings, key), revision=revision, timeout=5)
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            if _is_compacted(exc):
                return read, True
            raise
        if not reply.kvs:
            break  # the key did not exist yet
        old = reply.kvs[0]
        if int(old.create_revision) != created or int(old.mod_revision) <= known:
            break  # an earlier life of the key, or values already known
        read += 1
        wanted = state.remember(key, bytes(old.value), int(old.mod_revision))
        revision = int(old.mod_revision) - 1
    return read, False


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

    def _report(self) -> None:
        """Log each rejection once per distinct reason, and each key that recovered."""
        rejected = self.state.rejected
        for key in [k for k in self._logged if k not in rejected]:
            del self._logged[key]
            if self.state.raw(key) is not None:
                log.info("%s%s: accepted", self.settings.prefix, key)
        for key, message in rejected.items():
            if self._logged.get(key) != message:
                self._logged[key] = message
                log.error("rejected %s%s; %s", self.settings.prefix, message,
                          "keeping its last good value" if self.state.in_force(key)
                          else "no value of this key is in force")

    def _apply(self, key: str | Rejection, value: bytes | None, revision: int,
               created: int | None = None) -> None:
        if isinstance(key, Rejection):
            if value is None:
                self.state.apply(key.key, None, revision)
            else:
                self.state.refuse(key.key, value, key.message, revision, created)
        else:
            self.state.apply(key, value, revision, created)

    async def _relist(self, client: Etcd3Client) -> int:
        revision, entries = await list_entries(client, self.settings)
        known = {key: (self.state.created(key), self.state.modified(key))
                 for key in self.state.keys()}
        present = {entry.name for entry in entries}
        self.state.apply_all((key, None, revision, None) for key in set(known) - present)
        changed = [entry for entry in entries
                   if known.get(entry.name) != (entry.create_revision, entry.mod_revision)]
        # Settled by create revision, not in the order read: "a model belongs to one pool"
        # keeps the older pool, as it did live.
        feed(self.state, changed)
        for entry in changed:
            if isinstance(entry.key, str) and self.state.wants_history(entry.key):
                created, modified = known.get(entry.key, (None, None))
                floor = modified if created == entry.create_revision and modified else 0
                await self._recover(client, entry.key, entry.mod_revision, floor)
        self.state.revision = max(self.state.revision, revision)
        self._report()
        return revision

    async def _recover(self, client: Etcd3Client, key: str, mod_revision: int,
                       known: int = 0) -> None:
        """Read the key's earlier values from etcd's history, back to the last compaction
        (or what is already known), so a refused latest value keeps the last good one."""
        refused = key in self.state.rejected
        before = self.state.in_force(key)
        _, compacted = await read_history(client, self.settings, self.state, key,
                                          mod_revision, known)
        if not refused or key not in self.state.rejected:
            return
        if self.state.in_force(key) and not before:
            log.warning("%s%s: its latest value is refused; keeping its last good value, "
                        "from etcd's history", self.settings.prefix, key)
        elif not self.state.in_force(key) and compacted:
            log.warning("%s%s: its latest value is refused and etcd compacted its history: "
                        "no earlier good value is left, so the key is left out",
                        self.settings.prefix, key)

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with etcd_client(self.settings) as client:
                    revision = await self._relist(client)
                    self.connected = True
                    backoff.reset()
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
                await backoff.sleep()

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
                deleted = event.type == 1  # mvccpb.Event.DELETE
                self._apply(decode_key(bytes(event.kv.key), name),
                            None if deleted else bytes(event.kv.value),
                            int(event.kv.mod_revision), int(event.kv.create_revision) or None)
            self.synced_revision = int(reply.header.revision)
            if reply.events:
                self._report()
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
    backoff = Backoff()
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
                    backoff.reset()
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
            await backoff.sleep()
