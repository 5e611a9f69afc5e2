"""``drain/<pool>/<id>``: a planned drain of one endpoint (operator, ``hotpath endpoint
drain``). Value: ``{"until": <unix s>}``.

While draining, the endpoint takes no new sessions (it leaves the ring) and its active
sessions stay pinned to it until they go idle (affinity/); at ``until`` it takes no traffic
at all. Deleting the key ends the drain (the endpoint takes new sessions again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from control_plane.config.model import check_name, load_object, reject_unknown
from control_plane.errors import ConfigError

DRAIN = "drain/"
DEFAULT_DRAIN_TIMEOUT_S = 600.0
_FIELDS = ("until",)


@dataclass(frozen=True)
class Drain:
    pool: str
    id: str
    until: float  # unix s: no traffic at all from then on


def parse_drain(key: str, pool: str, endpoint_id: str, raw: bytes | str) -> Drain:
    check_name(key, "pool name", pool)
    check_name(key, "endpoint id", endpoint_id)
    value = load_object(key, raw)
    reject_unknown(key, value, _FIELDS)
    until = value.get("until")
    if isinstance(until, bool) or not isinstance(until, int | float) or not math.isfinite(
            until) or until < 0:
        raise ConfigError(key, "until is required: when the drain ends (unix seconds)")
    return Drain(pool=pool, id=endpoint_id, until=float(until))
