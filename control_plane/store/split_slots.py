"""The split-slots writer: of several control planes, the leader keeps every split's slot
table (``split-slots/<model>``) moving toward the split's weights.

The leader holds ``<prefix without its final slash>.split-leader`` (``store/leader.py``'s
election, with a key of its own next to the prober's). Every ``interval_s`` it derives each
split's table from the stored one (config/splits.py ``leader_table``), leaving the slots of
active sessions (seen by the Envoys of this control plane and of its ``--peer`` control
planes within their pool's ``session_ttl_s``) where they are, and writes the tables that
changed. Every control plane, the leader included, translates from the stored tables, so
they all route alike; the leader only writes. A table whose split is gone is deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from etcd3aio import Etcd3Client

from control_plane.config.model import Config
from control_plane.config.splits import SLOTS, leader_table, slot_of
from control_plane.store.etcd import EtcdSettings, serve_forever, write_once
from control_plane.store.leader import LeaderElection

log = logging.getLogger(__name__)

# How often the leader derives the tables again (weight changes, sessions going idle).
INTERVAL_S = 0.5
LEADER_TTL_S = 5
# A table written is not written again for this long while the watch has not shown it.
CATCH_UP_S = 2.0

ActiveSessions = Callable[[str, float, float], list[str] | None]  # (pool, now, ttl) -> hashes
# How often the leader reads the other control planes' active sessions (``--peer``).
PEER_POLL_S = 1.0


class PeerSessions:
    """Active sessions as every control plane sees them: this one's window plus each peer's
    ``/sessions`` view (its Envoys' sessions). While a peer has not answered lately, the
    sessions are unknown (``None``): the leader then moves no slot, since a session only
    that peer's Envoys serve could be active."""

    def __init__(self, own: Callable[[str, float, float], list[str]], peers: int) -> None:
        self.own = own
        self.peers = peers
        # peer URL -> its view: pool -> session hash -> [ring hash, endpoint, seen]
        self.reports: dict[str, dict[str, Any] | None] = {}

    def seen(self, url: str, report: dict[str, Any] | None) -> None:
        """A peer's latest ``/sessions`` answer (None: it did not answer)."""
        self.reports[url] = report

    def __call__(self, pool: str, now: float, ttl_s: float) -> list[str] | None:
        mine = self.own(pool, now, ttl_s)
        if self.peers == 0:
            return mine
        views = list(self.reports.values())
        if len(views) < self.peers or any(view is None for view in views):
            return None
        merged = set(mine)
        for view in views:
            assert view is not None
            merged.update(view.get(pool, []))
        return sorted(merged)


def split_leader_key(prefix: str) -> str:
    return prefix.rstrip("/") + ".split-leader"


def active_slots(config: Config, model: str, sessions: ActiveSessions, now: float
                 ) -> set[int]:
    """Slots holding a session one of the split's arm pools served within its TTL; every
    slot while the sessions are unknown (a peer control plane did not answer)."""
    slots: set[int] = set()
    for pool_name in config.splits[model].pools:
        pool = config.pools.get(pool_name)
        if pool is None:
            continue
        seen = sessions(pool_name, now, pool.session_ttl_s)
        if seen is None:
            return set(range(SLOTS))
        for session in seen:
            try:
                slots.add(slot_of(session, SLOTS))
            except ValueError:
                continue
    return slots


def tables_to_write(config: Config, sessions: ActiveSessions, now: float
                    ) -> dict[str, dict[str, object] | None]:
    """split-slots values that differ from the stored ones (None: delete the key)."""
    writes: dict[str, dict[str, object] | None] = {}
    for model, split in config.splits.items():
        stored = config.split_slots.get(model)
        table = leader_table(split, stored, set(config.pools),
                             active_slots(config, model, sessions, now))
        if table is None:
            continue  # no arm left: keep the last table for when a pool comes back
        if stored is None or stored.table != table or stored.pools != split.pools:
            writes[model] = {"arms": list(split.pools), "slots": table}
    for model in config.split_slots:
        if model not in config.splits:
            writes[model] = None
    return writes


class SplitSlotsWriter:
    """Campaigns for the split leadership and, while leader, writes the tables."""

    def __init__(self, settings: EtcdSettings, identity: str, config: Callable[[], Config],
                 sessions: ActiveSessions, split_keys: Callable[[], set[str]],
                 interval_s: float = INTERVAL_S) -> None:
        self.settings = settings
        self.config = config
        self.sessions = sessions
        # Models with a splits/ key (in force or not): a table is deleted only when its
        # split key is gone, never because the split's latest value is refused.
        self.split_keys = split_keys
        self.interval_s = interval_s
        self.election = LeaderElection(settings, identity, LEADER_TTL_S, self._leading,
                                       role="control plane (split slots, pins)")
        self.election.key = split_leader_key(settings.prefix)
        self.writes = 0
        self._wake = asyncio.Event()

    def _leading(self, leader: bool) -> None:
        log.info("split-slots writer %s: %s", self.election.identity,
                 "leading" if leader else "standing by")
        self._wake.set()

    def poke(self) -> None:
        """Derive again now (the config changed)."""
        self._wake.set()

    async def run(self) -> None:
        election = asyncio.create_task(self.election.run(), name="split-leader")
        try:
            await serve_forever(self.settings, self._serve, "split-slots writer")
        finally:
            election.cancel()
            await asyncio.gather(election, return_exceptions=True)

    async def _serve(self, client: Etcd3Client) -> None:
        assert client.kv is not None
        # model -> (value written, when): not written again while the follower catches up.
        written: dict[str, tuple[str | None, float]] = {}
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.election.leader:
                written.clear()
                continue
            now = time.time()
            keys = self.split_keys()
            for model, value in tables_to_write(self.config(), self.sessions, now).items():
                if value is None and model in keys:
                    continue
                raw = None if value is None else json.dumps(value, separators=(",", ":"))
                key = f"split-slots/{model}"
                if not await write_once(client, self.settings, key, raw, written, now,
                                        CATCH_UP_S):
                    continue
                self.writes += 1
                log.info("%s%s: %s", self.settings.prefix, key,
                         "deleted (its split is gone)" if raw is None else "table written")
