"""Leader election on an etcd lease: of several probers, only the leader probes and writes.

The leader holds one key, created only if absent (a transaction on create_revision 0) and
attached to its lease, which it keeps alive. On a clean stop it revokes the lease, so a
standby takes over within a third of the TTL; if it dies, when the lease expires. A leader
that cannot renew its lease steps down at once, before etcd could hand the key to another
prober, so two probers never write statuses at the same time.

The key is ``<prefix without its final slash>.prober-leader`` (``/hotpath.prober-leader``):
next to the prefix, not under it, so the control plane, which treats every key under the
prefix as configuration, never sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from etcd3aio import Etcd3Client
from etcd3aio.kv import KVService

from control_plane.store.etcd import Backoff, EtcdSettings, etcd_client, keep_alive_once

log = logging.getLogger(__name__)


def leader_key(prefix: str) -> str:
    return prefix.rstrip("/") + ".prober-leader"


class LeaderElection:
    """Calls ``on_change(True)`` when this process becomes leader, ``on_change(False)`` when
    it stops being one; ``run`` campaigns until cancelled. ``role`` names it in the log."""

    def __init__(self, settings: EtcdSettings, identity: str, ttl_s: int,
                 on_change: Callable[[bool], None], role: str = "prober") -> None:
        self.settings = settings
        self.role = role
        self.identity = identity
        self.ttl_s = max(2, ttl_s)  # etcd's minimum lease TTL
        self.on_change = on_change
        self.key = leader_key(settings.prefix)
        self.leader = False
        self.holder: str | None = None  # who leads, as last read

    def _set(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            self.on_change(leader)

    async def _campaign(self, client: Etcd3Client, lease_id: int) -> None:
        assert client.kv is not None
        reply = await client.kv.txn(
            [KVService.txn_compare_create_revision(self.key, 0)],
            [KVService.txn_op_put(self.key, self.identity, lease=lease_id)],
            [KVService.txn_op_get(self.key)],
            timeout=5,
        )
        if reply.succeeded:
            self.holder = self.identity
            log.info("%s %s is the leader (%s)", self.role, self.identity, self.key)
            self._set(True)
            return
        kvs = reply.responses[0].response_range.kvs
        holder = kvs[0].value.decode(errors="replace") if kvs else None
        if holder != self.holder:
            log.info("%s %s stands by; %s leads", self.role, self.identity, holder)
        self.holder = holder

    async def _still_held(self, client: Etcd3Client, lease_id: int) -> None:
        """Step down if the key is gone or held under another lease (deleted by hand)."""
        assert client.kv is not None
        reply = await client.kv.get(self.key, timeout=5)
        if not reply.kvs or int(reply.kvs[0].lease) != lease_id:
            log.warning("%s %s no longer holds %s; standing by", self.role, self.identity,
                        self.key)
            self._set(False)

    async def run(self) -> None:
        period = self.ttl_s / 3
        backoff = Backoff()
        while True:
            try:
                async with etcd_client(self.settings) as client:
                    assert client.lease is not None
                    lease = await client.lease.grant(ttl=self.ttl_s, timeout=5)
                    try:
                        while True:
                            if self.leader:
                                await self._still_held(client, lease.ID)
                            if not self.leader:
                                await self._campaign(client, lease.ID)
                            await asyncio.wait_for(keep_alive_once(client, lease.ID),
                                                   timeout=period)
                            backoff.reset()
                            await asyncio.sleep(period)
                    finally:
                        # Step down first: no write may follow the loss of the lease.
                        self._set(False)
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(client.lease.revoke(lease.ID), timeout=2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: stand down, try again
                log.warning("prober leader election: %s; retrying", exc or type(exc).__name__)
                await backoff.sleep()
