"""translate(): the config model -> every Envoy resource, by type URL and name.

Pure. Each pool's warmth routing (translate/warmth.py) is computed once and shapes both its
cluster (ring size) and its load assignment (health, weights).

``Translator`` is translate() memoized per pool, for the control plane: a pool is rebuilt
only when one of its inputs changed (its Pool, its endpoints, their resolved IPs, its
statuses, or the time passing a moment one of its statuses goes stale); otherwise its
cluster and load assignment are the very objects of the last call, which the snapshot
builder recognizes without serializing them again. The listener and the route
configuration are rebuilt only when the pools or the settings change. ``next_change``
says when time alone will change the output, so nothing needs a periodic rebuild.

The Translator also remembers each ring-hash pool's minimum ring size and keeps it while it
still gives every host exactly its ring points (translate/clusters.py ``minimum_ring_size``):
a weight change then usually changes only the pool's load assignment, not its cluster (EDS
alone, no CDS push and no cluster warming in Envoy). Two Translators with different
histories may so publish different sizes for one config; the ring is the same
(affinity/plan.py ``ring_id`` names it without the size).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from control_plane.config.drains import Drain
from control_plane.config.model import (
    Config,
    Endpoint,
    GatewaySettings,
    Pool,
    Split,
    SplitSlots,
    Status,
    is_ip,
)
from control_plane.config.pins import PinTable
from control_plane.config.splits import serving_table
from control_plane.translate.clusters import build_cluster, minimum_ring_size
from control_plane.translate.endpoints import build_load_assignment
from control_plane.translate.listeners import FilterPins, build_listener, build_lua_filter_config
from control_plane.translate.routes import SplitRoutes, build_route_configuration
from control_plane.translate.warmth import Route, is_stale, pinnable, pool_routes, stale_after_s
from control_plane.xds import types

# Endpoint -> its IP, or None while it is not (yet) resolved.
Resolve = Callable[[Endpoint], str | None]

# Parsing an address costs ~10 us; pools of thousands of endpoints ask again at every change.
cached_is_ip = functools.lru_cache(maxsize=1 << 16)(is_ip)


def translate(
    config: Config,
    resolved: Mapping[tuple[str, str], str],
    settings: GatewaySettings,
    now: float,
) -> dict[str, dict[str, Message]]:
    """Config model -> Envoy resources by type URL and name. ``resolved``: (pool, id) -> IP."""
    return Translator().translate(config, lambda e: resolved.get((e.pool, e.id)), settings,
                                  now)


def _same(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Equal mappings, cheaply when the values are the very same objects (the usual case:
    ConfigState keeps each parsed value until its key changes)."""
    if a is b:
        return True
    if len(a) != len(b) or list(a) != list(b):
        return False
    return all(map(operator.is_, a.values(), b.values())) or dict(a) == dict(b)


def stale_deadline(pool: Pool, statuses: Mapping[str, Status], now: float,
                   fleet: int = 0) -> float:
    """The last moment at which none of the pool's fresh statuses is stale yet (inf: never).
    ``fleet``: every endpoint in the config (translate/warmth.py stale_after_s)."""
    after = stale_after_s(pool.warmup.interval_s, fleet)
    deadlines = [s.checked_at + after for s in statuses.values()
                 if not is_stale(s, pool.warmup.interval_s, now, fleet)]
    return min(deadlines, default=math.inf)


@dataclass
class _PoolEntry:
    pool: Pool
    endpoints: Mapping[str, Endpoint]
    statuses: Mapping[str, Status]
    resolved: dict[str, str]
    uses_dns: bool
    dns_epoch: int
    computed_at: float
    valid_until: float
    stale_after: float
    routes: dict[str, Route]
    cluster: Message
    assignment: Message
    drains: Mapping[str, Drain]
    min_ring_size: int | None = None  # the cluster's minimum_ring_size (ring_hash pools)


class Translator:
    """translate(), memoized per pool; one per control plane."""

    def __init__(self) -> None:
        self._pools: dict[str, _PoolEntry] = {}
        self._listener: tuple[GatewaySettings, Message] | None = None
        self._routes: tuple[tuple[Pool, ...], GatewaySettings, tuple[SplitRoutes, ...],
                            Message] | None = None
        # (split, stored table, arm pools present) -> serving table, for the splits in force.
        self._tables: dict[str, tuple[tuple[Split, SplitSlots | None, frozenset[str]],
                                      str | None]] = {}
        # pool -> (pin table, routes, resolved) -> its pins for the filter, by host.
        self._pins: dict[str, tuple[PinTable, dict[str, Route], dict[str, str],
                                    tuple[tuple[str, str], ...]]] = {}
        self.rebuilt_pools = 0  # pools translated again, for tests and metrics
        self.splits: tuple[SplitRoutes, ...] = ()  # as last translated

    def next_change(self) -> float:
        """When time alone changes the output (a status goes stale); inf: never."""
        return min((e.valid_until for e in self._pools.values()), default=math.inf)

    def translate(self, config: Config, resolve: Resolve, settings: GatewaySettings,
                  now: float, dns_epoch: int = 0) -> dict[str, dict[str, Message]]:
        """``dns_epoch`` changes whenever a hostname's answer did: pools with hostnames are
        then resolved again."""
        clusters: dict[str, Message] = {}
        assignments: dict[str, Message] = {}
        fleet = sum(len(members) for members in config.endpoints.values())
        for name, pool in config.pools.items():
            entry = self._pool(pool, config.endpoints.get(name, {}),
                               config.statuses.get(name, {}), resolve, now, dns_epoch, fleet,
                               config.drains.get(name, {}))
            clusters[name] = entry.cluster
            assignments[name] = entry.assignment
        for gone in set(self._pools) - set(config.pools):
            del self._pools[gone]
        if self._listener is None or self._listener[0] != settings:
            self._listener = (settings, build_listener(settings))
        listener = self._listener[1]
        pools = tuple(config.pools.values())
        splits = self.split_routes(config)
        if (self._routes is None or self._routes[1] != settings
                or len(self._routes[0]) != len(pools)
                or not all(a is b or a == b for a, b in zip(self._routes[0], pools,
                                                             strict=True))
                or self._routes[2] != splits):
            self._routes = (pools, settings, splits,
                            build_route_configuration(pools, settings, splits))
        route_config = self._routes[3]
        return {
            types.CLUSTER: clusters,
            types.ENDPOINT: assignments,
            types.LISTENER: {getattr(listener, "name", ""): listener},
            # The Lua filter's config: ECDS, so a new filter never replaces the listener.
            types.EXTENSION_CONFIG: {
                (lua := build_lua_filter_config(settings, self.filter_pins(config))).name: lua},
            types.ROUTE: {getattr(route_config, "name", ""): route_config},
        }

    def routes(self, pool: str) -> dict[str, Route] | None:
        """The pool's routing as last translated (None: not translated)."""
        entry = self._pools.get(pool)
        return None if entry is None else entry.routes

    def filter_pins(self, config: Config) -> FilterPins:
        """The stored pins the filter applies: those of ring-hash pools whose endpoint is
        pinnable now (a pin to a host gone down, cold or away is dropped at once), grouped
        by the endpoint's "ip:port"."""
        result = []
        cache = {}
        for name, table in config.pins.items():
            entry = self._pools.get(name)
            if entry is None or entry.pool.lb != "ring_hash":
                continue
            cached = self._pins.get(name)
            if (cached is not None and cached[0] is table and cached[1] is entry.routes
                    and cached[2] is entry.resolved):
                grouped = cached[3]
            else:
                hosts = pinnable(entry.routes)
                by_host: dict[str, list[str]] = {}
                for session, pin in table.pins.items():
                    ip = entry.resolved.get(pin.endpoint)
                    if pin.endpoint in hosts and ip is not None:
                        address = f"{ip}:{entry.endpoints[pin.endpoint].port}"
                        by_host.setdefault(address, []).append(session)
                grouped = tuple(sorted((a, ",".join(sorted(s))) for a, s in by_host.items()))
            cache[name] = (table, entry.routes, entry.resolved, grouped)
            if grouped:
                result.append((name, grouped))
        self._pins = cache
        return tuple(result)

    def split_routes(self, config: Config) -> tuple[SplitRoutes, ...]:
        """Every split in force with its serving table (config/splits.py), memoized."""
        result = []
        tables = {}
        for model, split in config.splits.items():
            present = frozenset(pool for pool in split.pools if pool in config.pools)
            key = (split, config.split_slots.get(model), present)
            cached = self._tables.get(model)
            if cached is not None and cached[0] == key:
                table = cached[1]
            else:
                table = serving_table(split, key[1], present)
            tables[model] = (key, table)
            result.append(SplitRoutes(split, table, {p: config.pools[p] for p in sorted(present)}))
        self._tables = tables
        self.splits = tuple(result)
        return self.splits

    def _pool(self, pool: Pool, endpoints: Mapping[str, Endpoint],
              statuses: Mapping[str, Status], resolve: Resolve, now: float,
              dns_epoch: int, fleet: int = 0,
              drains: Mapping[str, Drain] | None = None) -> _PoolEntry:
        entry = self._pools.get(pool.name)
        stale_after = stale_after_s(pool.warmup.interval_s, fleet)
        if (entry is not None and (entry.pool is pool or entry.pool == pool)
                and entry.stale_after == stale_after
                and entry.computed_at <= now <= entry.valid_until
                and (not entry.uses_dns or entry.dns_epoch == dns_epoch)
                and _same(entry.endpoints, endpoints) and _same(entry.statuses, statuses)
                and _same(entry.drains, drains or {})):
            return entry
        resolved: dict[str, str] = {}
        uses_dns = False
        for eid, endpoint in endpoints.items():
            uses_dns = uses_dns or not cached_is_ip(endpoint.address)
            ip = resolve(endpoint)
            if ip is not None:
                resolved[eid] = ip
        # Endpoints not (yet) resolved are left out of EDS, and so out of the ring size.
        present = {eid: e for eid, e in endpoints.items() if eid in resolved}
        drains = drains or {}
        routes = pool_routes(pool, present, statuses, now, fleet, drains)
        # A drain ending is a moment time alone changes the routing, like a status going stale.
        valid_until = min([stale_deadline(pool, statuses, now, fleet)]
                          + [d.until for d in drains.values() if d.until > now])
        previous = entry.min_ring_size if entry is not None else None
        if (entry is not None and entry.pool == pool and entry.resolved == resolved
                and _same(entry.endpoints, endpoints) and entry.routes == routes):
            # Only a status refresh (or time): same routing, same resources.
            cluster, assignment, size = entry.cluster, entry.assignment, previous
        else:
            self.rebuilt_pools += 1
            # The last published size while it still gives every host its points.
            size = (minimum_ring_size(pool, routes, previous) if pool.lb == "ring_hash"
                    else None)
            if entry is not None and entry.pool == pool and size == previous:
                cluster = entry.cluster  # it depends on the routes only through the size
            else:
                cluster = build_cluster(pool, routes, size)
            assignment = build_load_assignment(pool, present, resolved, routes)
        entry = _PoolEntry(pool, endpoints, statuses, resolved, uses_dns, dns_epoch, now,
                           valid_until, stale_after, routes, cluster, assignment, drains,
                           size)
        self._pools[pool.name] = entry
        return entry
