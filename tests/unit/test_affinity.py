"""Pins, pure: the ring mirror, the planner, the pin and drain keys, drains in routing, and
the filter's view of the stored pins."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from control_plane.affinity.plan import (
    Active,
    moves_active,
    needs_write,
    plan,
    pool_ring,
    ring_hosts,
    ring_id,
)
from control_plane.affinity.ring import Ring, RingHost, fingerprint, key_hash
from control_plane.cli.status import drain_state, session_counts
from control_plane.config.drains import Drain, parse_drain
from control_plane.config.model import (
    Config,
    Endpoint,
    GatewaySettings,
    Pool,
    Status,
    WarmState,
)
from control_plane.config.pins import Pin, PinTable, parse_pins, pins_to_json
from control_plane.errors import ConfigError
from control_plane.translate.clusters import MAX_RING_SIZE, ring_settings
from control_plane.translate.resources import Translator
from control_plane.translate.warmth import (
    DEGRADED,
    HEALTHY,
    UNHEALTHY,
    Route,
    pinnable,
    pool_routes,
)
from control_plane.xds import types

POOL = Pool(name="chat", models=("m",))
NOW = 1_000_000.0
TTL = POOL.session_ttl_s


def endpoints(n: int) -> dict[str, Endpoint]:
    return {f"gpu-{i}": Endpoint("chat", f"gpu-{i}", "127.0.0.1", 8000 + i) for i in range(n)}


def ring_of(n: int) -> tuple[Ring, str]:
    return pool_ring(POOL, pool_routes(POOL, endpoints(n), {}, NOW))


def sessions(ring: Ring, count: int = 400) -> dict[str, Active]:
    """Active sessions, each where ``ring`` put it."""
    result = {}
    for n in range(count):
        h = key_hash(f"s{n}")
        owner = ring.owner(h)
        assert owner is not None
        result[f"h-{n:016x}"] = Active(h, owner, NOW - 5)
    return result


# --- ring mirror -------------------------------------------------------------------------


def test_ring_gives_each_host_its_points_and_wraps() -> None:
    ring = Ring([RingHost("a", 1), RingHost("b", 2)], 3 * 128, 1 << 23)
    assert len(ring) == 384 and ring.counts() == {"a": 128, "b": 256}
    assert ring.owner((1 << 64) - 1) == ring.owner(0)  # past the last entry: the first
    assert Ring([], 128, 1 << 23).owner(5) is None


def test_a_joining_host_takes_only_its_share() -> None:
    three, _ = ring_of(3)
    four, _ = ring_of(4)
    keys = [key_hash(f"k{n}") for n in range(4000)]
    moved = [h for h in keys if three.owner(h) != four.owner(h)]
    assert all(four.owner(h) == "gpu-3" for h in moved)  # only to the new host
    assert 0.2 < len(moved) / len(keys) < 0.3


def test_ring_id_names_hosts_weights_and_points() -> None:
    routes = pool_routes(POOL, endpoints(3), {}, NOW)
    assert ring_id(POOL, routes) == ring_id(POOL, dict(routes))
    assert ring_id(POOL, routes) != ring_id(POOL, pool_routes(POOL, endpoints(4), {}, NOW))
    heavy = {**endpoints(3), "gpu-0": Endpoint("chat", "gpu-0", "127.0.0.1", 8000, 2)}
    assert ring_id(POOL, routes) != ring_id(POOL, pool_routes(POOL, heavy, {}, NOW))
    assert [h.key for h in ring_hosts(routes)] == ["gpu-0", "gpu-1", "gpu-2"]
    # The same hosts and weights with other points per weight: another ring.
    finer = Pool(name="chat", models=("m",), ring_points_per_weight=256)
    assert ring_id(POOL, routes) != ring_id(finer, pool_routes(finer, endpoints(3), {}, NOW))
    # The name a ring had while the minimum ring size was always the sum of the points:
    # pin tables stored by then, and control planes of then, name the ring alike.
    assert ring_id(POOL, routes) == fingerprint(ring_hosts(routes), 3 * 128)


def test_ring_id_and_ring_do_not_depend_on_the_size_a_control_plane_published() -> None:
    """Two control planes with other histories publish other minimum ring sizes for one
    config; they name it alike, and Envoy's ring (ring.py) is the same with either size."""
    pool = Pool(name="chat", models=("m",), ring_points_per_weight=16)

    def publish(translator: Translator, count: int) -> tuple[int, dict[str, Route]]:
        eps = {f"gpu-{i}": Endpoint("chat", f"gpu-{i}", "127.0.0.1", 8000 + i)
               for i in range(count)}
        out = translator.translate(Config(pools={"chat": pool}, endpoints={"chat": eps}),
                                   lambda e: e.address, GatewaySettings(), NOW)
        ring = ring_settings(out[types.CLUSTER]["chat"])  # type: ignore[arg-type]
        assert ring is not None
        return ring.minimum_ring_size.value, translator.routes("chat") or {}

    fresh, routes = publish(Translator(), 100)
    older = Translator()
    publish(older, 97)  # 97 hosts first: a size that still serves 100
    kept, same = publish(older, 100)
    assert routes == same and fresh != kept, (fresh, kept)
    assert ring_id(pool, routes) == ring_id(pool, same)
    hosts = ring_hosts(routes)
    a, b = Ring(hosts, fresh, MAX_RING_SIZE), Ring(hosts, kept, MAX_RING_SIZE)
    assert a.counts() == b.counts() == dict.fromkeys((h.key for h in hosts), 16)
    keys = [key_hash(f"k{n}") for n in range(2000)]
    assert [a.owner(h) for h in keys] == [b.owner(h) for h in keys]
    mirrored, name = pool_ring(pool, routes)
    assert name == ring_id(pool, routes)
    assert [mirrored.owner(h) for h in keys] == [b.owner(h) for h in keys]


# --- planner -----------------------------------------------------------------------------


def test_a_ring_change_pins_exactly_the_sessions_it_would_move() -> None:
    three, _ = ring_of(3)
    four, four_id = ring_of(4)
    active = sessions(three)
    result = plan("chat", None, four, four_id, active, {"gpu-0", "gpu-1", "gpu-2", "gpu-3"},
                  NOW, TTL)
    would_move = {s for s, a in active.items() if four.owner(a.ring_hash or 0) != a.endpoint}
    assert set(result.table.pins) == would_move and result.added == len(would_move) > 0
    assert all(result.table.pins[s].endpoint == active[s].endpoint for s in would_move)
    assert result.table.ring == four_id


def test_without_a_ring_change_nothing_new_is_pinned() -> None:
    four, four_id = ring_of(4)
    three, _ = ring_of(3)
    stored = PinTable("chat", four_id, {})
    # Sessions placed by the old ring (as bounded load could), but the ring did not change.
    result = plan("chat", stored, four, four_id, sessions(three), {"gpu-0", "gpu-1", "gpu-2"},
                  NOW, TTL)
    assert result.table.pins == {} and result.added == 0


def test_pins_expire_drop_and_release() -> None:
    four, four_id = ring_of(4)
    agreeing = next(h for h in (key_hash(f"x{n}") for n in range(100))
                    if four.owner(h) == "gpu-1")
    stored = PinTable("chat", four_id, {
        "h-0000000000000001": Pin("gpu-0", NOW - TTL - 1),  # idle past the TTL
        "h-0000000000000002": Pin("gpu-0", NOW - TTL - 1),  # ... but seen again since
        "h-0000000000000003": Pin("gpu-2", NOW),  # its host went cold
        "h-0000000000000004": Pin("gpu-1", NOW),  # the ring sends it there anyway
    })
    active = {"h-0000000000000002": Active(None, "gpu-0", NOW - 1),
              "h-0000000000000004": Active(agreeing, "gpu-1", NOW)}
    result = plan("chat", stored, four, four_id, active, {"gpu-0", "gpu-1", "gpu-3"}, NOW, TTL)
    assert result.table.pins == {"h-0000000000000002": Pin("gpu-0", NOW - 1)}
    assert (result.expired, result.dropped, result.released) == (1, 1, 1)


def test_over_the_cap_the_least_recently_seen_go_first() -> None:
    three, _ = ring_of(3)
    four, four_id = ring_of(4)
    active = sessions(three)
    everyone = {"gpu-0", "gpu-1", "gpu-2", "gpu-3"}
    full = plan("chat", None, four, four_id, active, everyone, NOW, TTL)
    newest = sorted(full.table.pins, key=lambda s: full.table.pins[s].seen)[-3:]
    active = {s: Active(a.ring_hash, a.endpoint, NOW if s in newest else a.seen)
              for s, a in active.items()}
    capped = plan("chat", None, four, four_id, active, everyone, NOW, TTL, cap=3)
    assert set(capped.table.pins) == set(newest) and capped.capped == len(full.table.pins) - 3


def test_needs_write_only_for_changes_and_coarse_refreshes() -> None:
    table = PinTable("chat", "00000000000000aa", {"h-0000000000000001": Pin("gpu-0", NOW)})
    assert needs_write(None, table, TTL)
    assert not needs_write(table, table, TTL)
    later = PinTable("chat", table.ring, {"h-0000000000000001": Pin("gpu-0", NOW + TTL / 8)})
    assert not needs_write(table, later, TTL)
    much_later = PinTable("chat", table.ring, {"h-0000000000000001": Pin("gpu-0", NOW + TTL)})
    assert needs_write(table, much_later, TTL)
    assert needs_write(table, PinTable("chat", "00000000000000bb", table.pins), TTL)


@pytest.mark.parametrize(("before", "after", "hosts", "moves"), [
    ({"a": 128, "b": 128}, {"a": 128, "b": 128, "c": 128}, {"a", "b", "c"}, True),  # joins
    ({"a": 128, "b": 128}, {"a": 256, "b": 128}, {"a", "b"}, True),  # heavier
    ({"a": 128, "b": 128}, {"a": 128}, {"a"}, False),  # b down, cold or gone
    ({"a": 128, "b": 128}, {"a": 128}, {"a", "b"}, True),  # b draining
    ({"a": 128, "b": 128}, {"a": 128, "b": 128}, {"a", "b"}, False),
])
def test_which_ring_changes_wait_for_pins(before: dict[str, int], after: dict[str, int],
                                          hosts: set[str], moves: bool) -> None:
    assert moves_active(before, after, hosts) is moves


# --- pins/<pool> and drain/<pool>/<id> -----------------------------------------------------


def test_pin_table_round_trips() -> None:
    table = PinTable("chat", "0123456789abcdef", {"h-0123456789abcdef": Pin("gpu-1", NOW)})
    assert parse_pins("pins/chat", "chat", pins_to_json(table)) == table


@pytest.mark.parametrize(("value", "message"), [
    ({"pins": {}}, "ring must be 16 lowercase hex digits"),
    ({"ring": "0123456789ABCDEF"}, "ring must be 16 lowercase hex digits"),
    ({"ring": "0123456789abcdef", "pins": []}, "pins must be an object"),
    ({"ring": "0123456789abcdef", "pins": {"user-1": ["gpu-1", 1]}}, "is not a session hash"),
    ({"ring": "0123456789abcdef", "pins": {"h-0123456789abcdef": ["GPU", 1]}},
     "must be [endpoint id, seen (unix s)]"),
    ({"ring": "0123456789abcdef", "pins": {"h-0123456789abcdef": ["gpu-1", -1]}},
     "must be [endpoint id, seen (unix s)]"),
    ({"ring": "0123456789abcdef", "extra": 1}, "unknown field"),
])
def test_bad_pin_tables_are_refused_naming_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pins("pins/chat", "chat", json.dumps(value))
    assert "pins/chat" in str(caught.value) and message in str(caught.value)


def test_drain_key() -> None:
    assert parse_drain("drain/chat/gpu-1", "chat", "gpu-1", '{"until": 5}') == Drain(
        "chat", "gpu-1", 5.0)
    for bad in ('{}', '{"until": "soon"}', '{"until": true}', '{"until": 1, "x": 2}'):
        with pytest.raises(ConfigError, match="drain/chat/gpu-1"):
            parse_drain("drain/chat/gpu-1", "chat", "gpu-1", bad)


def test_a_draining_endpoint_leaves_the_ring_but_stays_pinnable() -> None:
    drains = {"gpu-0": Drain("chat", "gpu-0", NOW + 60)}
    routes = pool_routes(POOL, endpoints(3), {}, NOW, drains=drains)
    assert (routes["gpu-0"].health, routes["gpu-0"].ring_points) == (DEGRADED, 0)
    assert routes["gpu-1"].health == HEALTHY and "gpu-0" in pinnable(routes)
    after = pool_routes(POOL, endpoints(3), {}, NOW + 61, drains=drains)
    assert after["gpu-0"].health == UNHEALTHY and "gpu-0" not in pinnable(after)


def test_drains_of_every_serving_endpoint_are_ignored() -> None:
    drains = {e: Drain("chat", e, NOW + 60) for e in ("gpu-0", "gpu-1")}
    routes = pool_routes(POOL, endpoints(2), {}, NOW, drains=drains)
    assert all(r.health == HEALTHY and r.ring_points for r in routes.values())


def test_the_filter_gets_only_pins_to_pinnable_hosts() -> None:
    eps = endpoints(3)
    table = PinTable("chat", "0123456789abcdef", {"h-0000000000000001": Pin("gpu-0", NOW),
                                                   "h-0000000000000002": Pin("gpu-1", NOW),
                                                   "h-0000000000000003": Pin("gpu-9", NOW)})
    config = Config(pools={"chat": POOL}, endpoints={"chat": eps}, pins={"chat": table})
    translator = Translator()
    translator.translate(config, lambda e: e.address, GatewaySettings(), time.time())
    assert translator.filter_pins(config) == (("chat", (
        ("127.0.0.1:8000", "h-0000000000000001"), ("127.0.0.1:8001", "h-0000000000000002"))),)
    down = Status("chat", "gpu-0", WarmState.DOWN, None, time.time())
    config = Config(pools={"chat": POOL}, endpoints={"chat": eps}, pins={"chat": table},
                    statuses={"chat": {"gpu-0": down}})
    translator.translate(config, lambda e: e.address, GatewaySettings(), time.time())
    assert translator.filter_pins(config) == (("chat", (
        ("127.0.0.1:8001", "h-0000000000000002"),)),)


# --- status ------------------------------------------------------------------------------


def test_status_counts_each_session_once_where_it_was_served_last() -> None:
    views: list[dict[str, Any]] = [
        {"chat": {"h-1": ["00", "gpu-0", 10.0], "h-2": [None, "gpu-1", 10.0]}},
        {"chat": {"h-1": ["00", "gpu-2", 11.0]}}]
    assert session_counts(views) == {("chat", "gpu-2"): 1, ("chat", "gpu-1"): 1}
    assert drain_state(None, NOW, 5) is None
    assert drain_state(NOW + 1, NOW, 5) == "draining"
    assert drain_state(NOW + 1, NOW, 0) == "drained"
    assert drain_state(NOW - 1, NOW, 5) == "drained"


def test_just_after_a_ring_change_late_reports_are_pinned_too() -> None:
    three, _ = ring_of(3)
    four, four_id = ring_of(4)
    stored = PinTable("chat", four_id, {})  # the change was planned already
    late = sessions(three)  # turns that were in flight at the change, reported after it
    everyone = {"gpu-0", "gpu-1", "gpu-2", "gpu-3"}
    quiet = plan("chat", stored, four, four_id, late, everyone, NOW, TTL)
    assert quiet.added == 0
    grace = plan("chat", stored, four, four_id, late, everyone, NOW, TTL, changing=True)
    assert grace.added == len(grace.table.pins) > 0
    assert all(four.owner(late[s].ring_hash or 0) != p.endpoint
               for s, p in grace.table.pins.items())
