"""``pins/<pool>``: the leader's pin table of a pool (control plane only, like split-slots).

A pin keeps an active session (by its hashed key, the access log's ``session_hash``) on the
endpoint that served it while a ring change would move it (affinity/plan.py). The value::

    {"ring": "<16 hex: the ring the pins were computed for>",
     "pins": {"h-<16 hex>": ["<endpoint id>", <last seen, unix s>], ...}}

``ring`` tells every control plane that the pins for that ring are written, so it may
publish the ring (app.py holds a ring change back until then).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from control_plane.config.model import NAME_RE, load_object, reject_unknown
from control_plane.errors import ConfigError

PINS = "pins/"
# Pins kept per pool; past it the least recently seen go first (a logged, counted exception
# to "an active session never moves"). Measured (benchmarks/pins_scale.py): 10,000 pins are
# a 381 KiB etcd value with short endpoint ids (~1 MB with 63-character ids; etcd's default
# request limit is 1.5 MiB) and 186 KiB more filter config, applied by Envoy ~175 ms after
# the write.
MAX_PINS = 10_000
SESSION_RE = re.compile(r"h-[0-9a-f]{16}")
RING_RE = re.compile(r"[0-9a-f]{16}")
_FIELDS = ("ring", "pins")


@dataclass(frozen=True)
class Pin:
    endpoint: str  # endpoint id
    seen: float  # last time the session was known active (unix s)


@dataclass(frozen=True)
class PinTable:
    pool: str
    ring: str
    pins: Mapping[str, Pin] = field(default_factory=dict)  # session hash -> pin


def parse_pins(key: str, pool: str, raw: bytes | str) -> PinTable:
    if not NAME_RE.fullmatch(pool):
        raise ConfigError(key, f"pool name {pool!r} is not valid")
    value = load_object(key, raw)
    reject_unknown(key, value, _FIELDS)
    ring = value.get("ring")
    if not isinstance(ring, str) or not RING_RE.fullmatch(ring):
        raise ConfigError(key, "ring must be 16 lowercase hex digits")
    pins = value.get("pins", {})
    if not isinstance(pins, dict):
        raise ConfigError(key, "pins must be an object of session hash -> [endpoint, seen]")
    if len(pins) > MAX_PINS:
        raise ConfigError(key, f"pins holds {len(pins)} pins, over the limit of {MAX_PINS}")
    parsed: dict[str, Pin] = {}
    for session, item in pins.items():
        if not SESSION_RE.fullmatch(session):
            raise ConfigError(key, f"pins key {session[:40]!r} is not a session hash (h-<16 hex>)")
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not NAME_RE.fullmatch(item[0]) or isinstance(item[1], bool)
                or not isinstance(item[1], int | float) or not math.isfinite(item[1])
                or item[1] < 0):
            raise ConfigError(key, f"pins[{session}] must be [endpoint id, seen (unix s)]")
        parsed[session] = Pin(endpoint=item[0], seen=float(item[1]))
    return PinTable(pool=pool, ring=ring, pins=parsed)


def pins_to_json(table: PinTable) -> str:
    body: dict[str, Any] = {
        "ring": table.ring,
        "pins": {s: [p.endpoint, round(p.seen)] for s, p in sorted(table.pins.items())}}
    return json.dumps(body, separators=(",", ":"))
