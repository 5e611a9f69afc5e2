"""Which active sessions to pin, and which pins to drop. Pure.

A ring change (an endpoint added, a weight changed, a host back from cold) would move some
active sessions (served within the pool's ``session_ttl_s``) to another host, which holds
none of their KV cache. ``plan`` pins exactly those whose host is still healthy and warm:
the ones the new ring sends to a host other than the one that served them last. New
sessions follow the new ring at once. A pin ends when its session has been idle for the
TTL (expired), when its host goes down, cold or away (dropped; the session then follows the
ring), or when the ring sends the session to its pinned host anyway (released). Past
``cap`` pins, the least recently seen go first (capped, a documented exception).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from control_plane.affinity.ring import Ring, RingHost, fingerprint
from control_plane.config.model import Pool
from control_plane.config.pins import MAX_PINS, Pin, PinTable
from control_plane.translate.clusters import MAX_RING_SIZE, minimum_ring_size
from control_plane.translate.warmth import HEALTHY, Route, ring_size


@dataclass(frozen=True)
class Active:
    """An active session as the access logs saw it last."""

    ring_hash: int | None  # None: an older filter that does not report it
    endpoint: str  # endpoint id that served it
    seen: float  # unix s


@dataclass(frozen=True)
class Plan:
    table: PinTable
    added: int = 0
    expired: int = 0
    dropped: int = 0
    released: int = 0
    capped: int = 0


def ring_hosts(routes: Mapping[str, Route]) -> list[RingHost]:
    """The hosts of a pool's ring as Envoy builds it: healthy, with points, in EDS order
    (translate/endpoints.py sorts by id), with their EDS weight."""
    return [RingHost(eid, route.weight) for eid, route in sorted(routes.items())
            if route.health == HEALTHY and route.ring_points > 0]


def ring_id(pool: Pool, routes: Mapping[str, Route]) -> str:
    """The fingerprint of the ring Envoy builds from ``routes``: of what decides it, the
    hosts in EDS order, their EDS weights and their points, not of the minimum ring size
    the cluster carries (translate/clusters.py ``minimum_ring_size``: every size a control
    plane may publish gives every host exactly its points, and two control planes, or one
    before and after a restart, may publish different ones for the same ring). The points
    enter as their sum, clamped to Envoy's maximum as Envoy clamps the ring: with the EDS
    weights that fixes every host's points (they are proportional to the weights,
    translate/warmth.py), and it is the size the fingerprint had when the minimum ring size
    was always that sum, so stored pin tables and older control planes name a ring alike."""
    points = min(max(pool.ring_points_per_weight, ring_size(routes)), MAX_RING_SIZE)
    return fingerprint(ring_hosts(routes), points)


def pool_ring(pool: Pool, routes: Mapping[str, Route],
              last: tuple[str, Ring] | None = None) -> tuple[Ring, str]:
    """The pool's ring and its fingerprint (``ring_id``); ``last`` (id, ring) is reused
    when unchanged (a 1,000-host ring takes ~0.7 s to hash the first time). Built with the
    minimum ring size a fresh control plane would publish: Envoy's ring is the same for
    every size the Translator may have published instead."""
    name = ring_id(pool, routes)
    if last is not None and last[0] == name:
        return last[1], name
    return Ring(ring_hosts(routes), minimum_ring_size(pool, routes), MAX_RING_SIZE), name


def ring_points(routes: Mapping[str, Route]) -> dict[str, int]:
    return {eid: route.ring_points for eid, route in routes.items()
            if route.health == HEALTHY and route.ring_points > 0}


def moves_active(before: Mapping[str, int], after: Mapping[str, int],
                 hosts: Collection[str]) -> bool:
    """Whether a ring change can move sessions off a host they may stay on (``hosts``,
    pinnable): some host gains points (joins, heavier, back from cold), or a pinnable host
    loses some (lighter, draining). A host going down, cold or away moves only its own
    sessions, which must move."""
    return (any(points > before.get(eid, 0) for eid, points in after.items())
            or any(after.get(eid, 0) < points for eid, points in before.items()
                   if eid in hosts))


def plan(pool: str, stored: PinTable | None, ring: Ring, ring_id: str,
         active: Mapping[str, Active], hosts: Collection[str], now: float, ttl_s: float,
         cap: int = MAX_PINS, changing: bool = False) -> Plan:
    """The pin table for ``ring`` (named ``ring_id``), from the stored one and the active
    sessions; ``hosts``: the endpoints pins may point to (translate/warmth.py ``pinnable``).
    New pins are made when the stored table is for another ring, and while ``changing``
    (just after a ring change: a request in flight at the change is reported up to one
    access-log flush later, on the host the old ring gave it)."""
    pins: dict[str, Pin] = {}
    expired = dropped = released = added = 0
    for session, pin in (stored.pins if stored is not None else {}).items():
        seen_now = active.get(session)
        seen = max(pin.seen, seen_now.seen if seen_now is not None else 0.0)
        if now - seen > ttl_s:
            expired += 1
        elif pin.endpoint not in hosts:
            dropped += 1
        elif (seen_now is not None and seen_now.ring_hash is not None
              and ring.owner(seen_now.ring_hash) == pin.endpoint):
            released += 1
        else:
            pins[session] = Pin(pin.endpoint, seen)
    if changing or stored is None or stored.ring != ring_id:
        for session, seen_now in active.items():
            if (session in pins or seen_now.ring_hash is None or seen_now.endpoint not in hosts
                    or now - seen_now.seen > ttl_s):
                continue
            if ring.owner(seen_now.ring_hash) != seen_now.endpoint:
                pins[session] = Pin(seen_now.endpoint, seen_now.seen)
                added += 1
    capped = 0
    if len(pins) > cap:
        oldest = sorted(pins, key=lambda s: (pins[s].seen, s))[:len(pins) - cap]
        for session in oldest:
            del pins[session]
        capped = len(oldest)
    return Plan(PinTable(pool, ring_id, pins), added, expired, dropped, released, capped)


def needs_write(stored: PinTable | None, planned: PinTable, ttl_s: float) -> bool:
    """Whether the planned table must be written: the ring or a pin changed, or a pin's
    last-seen time moved by a quarter TTL (so a restarted leader does not expire it early;
    finer refreshes would rewrite the table for nothing)."""
    if stored is None or stored.ring != planned.ring or stored.pins.keys() != planned.pins.keys():
        return True
    return any(stored.pins[s].endpoint != p.endpoint or p.seen - stored.pins[s].seen > ttl_s / 4
               for s, p in planned.pins.items())
