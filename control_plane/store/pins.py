"""The pin writer: the control planes' leader keeps ``pins/<pool>`` (config/pins.py) in step
with each ring-hash pool's ring and its active sessions.

It runs under the split-slots writer's election (store/split_slots.py): one leader writes
both. On every config change and every tick it plans each pool's pins (affinity/plan.py)
against the ring the pool's routing has now (translate/), from the active sessions that
this control plane's Envoys and its ``--peer`` control planes' Envoys reported, and writes
the tables that changed. Every control plane renders the stored pins into its Envoys' Lua
filter and publishes a ring change only once the pins for that ring are stored and
acknowledged (app.py), so a ring change never moves an active session of a healthy, warm
host. Expiries are batched by the tick: at most one write per pool per tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from etcd3aio import Etcd3Client

from control_plane.affinity.plan import Active, needs_write, plan, pool_ring
from control_plane.affinity.plan import ring_id as plan_ring_id
from control_plane.affinity.ring import Ring
from control_plane.config.model import Config, Pool
from control_plane.config.pins import MAX_PINS, pins_to_json
from control_plane.store.etcd import EtcdSettings, serve_forever, write_once
from control_plane.translate.warmth import Route, pinnable

log = logging.getLogger(__name__)

EMPTY_RING = Ring([], 1, 1)
# The tick: a pool's pins are re-planned (expiries, refreshes) every session_ttl_s / 10,
# within these bounds. Expiry is late by at most one tick.
TICK_MIN_S = 0.5
TICK_MAX_S = 30.0
# A table written is not written again for this long while the watch has not shown it.
CATCH_UP_S = 2.0
# After a ring change, sessions the access log reports on a host the new ring does not give
# them are pinned for this long: a turn in flight at the change shows up at the next flush
# (1 s), possibly after the plan. Measured with `hotpath bench --scenario servers-join`:
# without it, 2 of 15 sessions spanning the join moved, both with their first turn in flight.
CHANGE_GRACE_S = 3.0

Placements = Callable[[str, float, float], Mapping[str, Active]]  # (pool, now, ttl)


def tick_s(ttl_s: float) -> float:
    return min(TICK_MAX_S, max(TICK_MIN_S, ttl_s / 10))


@dataclass
class PinCounters:
    """Since start, for /metrics: pins added, expired, dropped, released, capped by pool."""

    added: dict[str, int] = field(default_factory=dict)
    expired: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    capped: dict[str, int] = field(default_factory=dict)

    def count(self, pool: str, **amounts: int) -> None:
        for name, amount in amounts.items():
            if amount:
                table: dict[str, int] = getattr(self, name)
                table[pool] = table.get(pool, 0) + amount


class PinWriter:
    """While leader, writes the pin tables (see the module docstring)."""

    def __init__(self, settings: EtcdSettings, config: Callable[[], Config],
                 leader: Callable[[], bool], routes: Callable[[str], dict[str, Route] | None],
                 placements: Placements, cap: int = MAX_PINS) -> None:
        self.settings = settings
        self.config = config
        self.leader = leader
        self.routes = routes
        self.placements = placements
        self.cap = cap
        self.counters = PinCounters()
        self.writes = 0
        self._wake = asyncio.Event()
        self._rings: dict[str, tuple[str, Ring]] = {}  # pool -> (ring id, ring)
        # pool -> (its routes and Pool when computed, ring id)
        self._ring_ids: dict[str, tuple[dict[str, Route], Pool, str]] = {}
        self._due: dict[str, float] = {}  # pool -> next tick
        self._changed: dict[str, tuple[str, float]] = {}  # pool -> (ring id, when seen)

    def poke(self) -> None:
        """Plan again now (the config or a pool's routing changed)."""
        self._wake.set()

    def _ring_id(self, name: str, pool: Pool, routes: dict[str, Route]) -> str:
        """plan_ring_id, once per translation of the pool (the translator keeps its routes
        object until then): ~5 ms for 1,000 hosts, asked every TICK_MIN_S."""
        cached = self._ring_ids.get(name)
        if cached is not None and cached[0] is routes and cached[1] is pool:
            return cached[2]
        ring_id = plan_ring_id(pool, routes)
        self._ring_ids[name] = (routes, pool, ring_id)
        return ring_id

    def _ring(self, name: str, config: Config, routes: dict[str, Route]) -> tuple[Ring, str]:
        ring, ring_id = pool_ring(config.pools[name], routes, self._rings.get(name))
        self._rings[name] = (ring_id, ring)
        return ring, ring_id

    def writes_due(self, now: float) -> dict[str, str | None]:
        """pins/<pool> values to write now (None: delete the key)."""
        config = self.config()
        writes: dict[str, str | None] = {}
        for name, pool in config.pools.items():
            routes = self.routes(name)
            if pool.lb != "ring_hash" or routes is None:
                continue
            stored = config.pins.get(name)
            ring_id = self._ring_id(name, pool, routes)
            changed = self._changed.get(name)
            if changed is None or changed[0] != ring_id:
                self._changed[name] = changed = (ring_id, now)
            changing = now - changed[1] < CHANGE_GRACE_S
            # Between ticks only a ring change needs a plan (no table: nothing expires).
            if ((stored is None or stored.ring == ring_id) and not changing
                    and now < self._due.get(name, 0)):
                continue
            self._due[name] = now + tick_s(pool.session_ttl_s)
            active = self.placements(name, now, pool.session_ttl_s)
            # Without an active session no ring is consulted: skip building it (~0.1 s for
            # 1,000 hosts at 128 points).
            ring = self._ring(name, config, routes)[0] if active else EMPTY_RING
            planned = plan(name, stored, ring, ring_id, active, pinnable(routes), now,
                           pool.session_ttl_s, self.cap, changing)
            self.counters.count(name, added=planned.added, expired=planned.expired,
                                dropped=planned.dropped, released=planned.released,
                                capped=planned.capped)
            if planned.capped and self.cap:
                log.warning("pins/%s: over %d pins; the %d least recently seen dropped (their "
                            "sessions follow the ring)", name, self.cap, planned.capped)
            if needs_write(stored, planned.table, pool.session_ttl_s):
                writes[name] = pins_to_json(planned.table)
        for name in config.pins:
            owner = config.pools.get(name)
            if owner is None or owner.lb != "ring_hash":
                writes[name] = None
        for gone in (set(self._rings) | set(self._ring_ids)) - set(config.pools):
            self._rings.pop(gone, None)
            self._ring_ids.pop(gone, None)
            self._due.pop(gone, None)
            self._changed.pop(gone, None)
        return writes

    async def run(self) -> None:
        await serve_forever(self.settings, self._serve, "pin writer")

    async def _serve(self, client: Etcd3Client) -> None:
        assert client.kv is not None
        written: dict[str, tuple[str | None, float]] = {}
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_MIN_S)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.leader():
                written.clear()
                continue
            now = time.time()
            for name, raw in self.writes_due(now).items():
                if await write_once(client, self.settings, f"pins/{name}", raw, written, now,
                                    CATCH_UP_S):
                    self.writes += 1
