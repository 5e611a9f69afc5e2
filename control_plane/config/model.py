"""Config model: the etcd schema as frozen dataclasses, with validation.

Pure: no IO, no protobuf. Every error names the etcd key and the field, so an operator
reading a log line knows what to fix (``pools/chat: hash_balance_factor must be >= 100,
got 50``).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from control_plane import contract
from control_plane.config import limits
from control_plane.contract import DEFAULT_SESSION_HEADER
from control_plane.errors import ConfigError

if TYPE_CHECKING:
    from control_plane.config.drains import Drain
    from control_plane.config.pins import PinTable

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
HEADER_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
LB_POLICIES = ("ring_hash", "maglev", "round_robin", "least_request")
# Headers the gateway owns: a pool must not hash on them.
# Headers the gateway owns: a pool must not take its session key from them.
INTERNAL_HEADERS = contract.INTERNAL_HEADERS
MAX_SESSION_HEADERS = 8

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Pool.session_ttl_s: 10 minutes, longer than a user's pause between chat turns and about as
# long as a vLLM server keeps an idle prefix cached under load.
DEFAULT_SESSION_TTL_S = 600.0
SESSION_TTL_MAX_S = 7 * 24 * 3600.0


class WarmState(StrEnum):
    WARM = "warm"
    COLD = "cold"
    DOWN = "down"


@dataclass(frozen=True)
class Warmup:
    """How the prober primes an endpoint: one tiny real request on the pool's prefix."""

    path: str = "/v1/chat/completions"
    # None: a chat request on the pool's first model with DEFAULT_SYSTEM_PROMPT, max_tokens 1.
    body: Mapping[str, Any] | None = None
    interval_s: float = 10.0
    timeout_s: float = 30.0
    cold_ttft_ms: float = 1000.0


@dataclass(frozen=True)
class Pool:
    name: str
    models: tuple[str, ...]
    lb: str = "ring_hash"
    # Request headers whose value is the session key, first present wins.
    session_headers: tuple[str, ...] = (DEFAULT_SESSION_HEADER,)
    hash_balance_factor: int = 150
    warmup: Warmup = field(default_factory=Warmup)
    # Ring points per unit of endpoint weight (ring_hash only; docs/scale.md has the
    # measurements behind the default and when to lower it).
    ring_points_per_weight: int = limits.RING_POINTS_PER_WEIGHT_DEFAULT
    # A session served within this long is active: a split's weight change leaves it on its
    # arm until it has been idle this long (docs/splits.md).
    session_ttl_s: float = DEFAULT_SESSION_TTL_S


@dataclass(frozen=True)
class Endpoint:
    pool: str
    id: str
    address: str
    port: int
    weight: int = 1

    @property
    def is_ip(self) -> bool:
        return is_ip(self.address)


class Source(StrEnum):
    """Which signal decided a status: the prober's own probes, or real traffic."""

    PROBE = "probe"
    TRAFFIC = "traffic"


@dataclass(frozen=True)
class TrafficSummary:
    """Real traffic's time to first token over a window, as a status records it."""

    p50_ms: float
    p90_ms: float
    rps: float
    window_s: float


@dataclass(frozen=True)
class Status:
    pool: str
    id: str
    state: WarmState
    ttft_ms: float | None  # the value that decided ``state``
    checked_at: float
    source: Source | None = None  # None: a writer that does not say
    traffic: TrafficSummary | None = None


@dataclass(frozen=True)
class Config:
    """Everything the control plane translates: the last good value of every key."""

    pools: Mapping[str, Pool] = field(default_factory=dict)
    endpoints: Mapping[str, Mapping[str, Endpoint]] = field(default_factory=dict)
    statuses: Mapping[str, Mapping[str, Status]] = field(default_factory=dict)
    # splits/<model> in force, and the leader's split-slots/<model> tables (valid ones).
    splits: Mapping[str, Split] = field(default_factory=dict)
    split_slots: Mapping[str, SplitSlots] = field(default_factory=dict)
    # The leader's pins/<pool> tables (valid ones).
    pins: Mapping[str, PinTable] = field(default_factory=dict)
    # drain/<pool>/<id>: pool -> endpoint id -> its planned drain.
    drains: Mapping[str, Mapping[str, Drain]] = field(default_factory=dict)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_name(key: str, what: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ConfigError(key, f"{what} {value!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_object(key: str, raw: bytes | str) -> dict[str, Any]:
    try:
        # NaN/Infinity are not JSON; Python accepts them, and a NaN timestamp never goes stale.
        value = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        # ValueError also covers integer literals over Python's digit limit (10**5000).
        raise ConfigError(key, f"value is not valid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise ConfigError(key, "value is not usable JSON (nested too deeply)") from None
    except Exception as exc:  # noqa: BLE001 - any bytes are a value or one rejected key
        raise ConfigError(key, f"value is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ConfigError(key, f"value must be a JSON object, got {type(value).__name__}")
    return value


def reject_unknown(key: str, value: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(
            key, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )


def _number(key: str, name: str, value: Any, *, minimum: float, integer: bool = False) -> Any:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, f"{name} must be {kind}, got {json.dumps(value)}")
    if not math.isfinite(value):
        raise ConfigError(key, f"{name} must be a finite number, got {value}")
    if value < minimum:
        raise ConfigError(key, f"{name} must be >= {minimum:g}, got {value}")
    return value


def _string(key: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"{name} must be a non-empty string, got {json.dumps(value)}")
    return value


_WARMUP_FIELDS = ("path", "body", "interval_s", "timeout_s", "cold_ttft_ms")


def parse_warmup(key: str, value: Any) -> Warmup:
    if not isinstance(value, dict):
        raise ConfigError(key, f"warmup must be an object, got {json.dumps(value)}")
    unknown = sorted(set(value) - set(_WARMUP_FIELDS))
    if unknown:
        raise ConfigError(key, f"unknown warmup field(s) {', '.join(unknown)} "
                               f"(allowed: {', '.join(_WARMUP_FIELDS)})")
    default = Warmup()
    path = _string(key, "warmup.path", value.get("path", default.path))
    if not path.startswith("/"):
        raise ConfigError(key, f"warmup.path must start with '/', got {path!r}")
    body = value.get("body")
    if body is not None and not isinstance(body, dict):
        raise ConfigError(key, f"warmup.body must be an object, got {json.dumps(body)}")
    interval = _number(key, "warmup.interval_s", value.get("interval_s", default.interval_s),
                       minimum=limits.WARMUP_INTERVAL_MIN_S)
    limits.at_most(key, "warmup.interval_s", interval, limits.WARMUP_INTERVAL_MAX_S)
    timeout = _number(key, "warmup.timeout_s", value.get("timeout_s", default.timeout_s),
                      minimum=limits.WARMUP_TIMEOUT_MIN_S)
    limits.at_most(key, "warmup.timeout_s", timeout, limits.WARMUP_TIMEOUT_MAX_S)
    cold = _number(key, "warmup.cold_ttft_ms", value.get("cold_ttft_ms", default.cold_ttft_ms),
                   minimum=limits.WARMUP_COLD_TTFT_MIN_MS)
    limits.at_most(key, "warmup.cold_ttft_ms", cold, limits.WARMUP_COLD_TTFT_MAX_MS)
    return Warmup(path=path, body=body, interval_s=float(interval), timeout_s=float(timeout),
                  cold_ttft_ms=float(cold))


_POOL_FIELDS = ("models", "lb", "session_header", "session_headers", "hash_balance_factor",
                "warmup", "ring_points_per_weight", "session_ttl_s")


def _session_headers(key: str, value: Mapping[str, Any]) -> tuple[str, ...]:
    """``session_headers`` (a list, first present wins) or its one-element form
    ``session_header``; not both, since which one wins would be a guess."""
    if "session_header" in value and "session_headers" in value:
        raise ConfigError(key, "give session_header or session_headers, not both")
    if "session_headers" in value:
        field_name, headers = "session_headers", value["session_headers"]
        if not isinstance(headers, list) or not 1 <= len(headers) <= MAX_SESSION_HEADERS:
            raise ConfigError(key, f"session_headers must be a list of 1-{MAX_SESSION_HEADERS}"
                                   f" header names, got {json.dumps(headers)}")
    else:
        field_name, headers = "session_header", [value.get("session_header",
                                                           DEFAULT_SESSION_HEADER)]
    for header in headers:
        if not isinstance(header, str) or not HEADER_RE.fullmatch(header):
            raise ConfigError(key, f"{field_name} must be a lower-case HTTP header name, got "
                                   f"{json.dumps(header)}")
        if header in INTERNAL_HEADERS:
            raise ConfigError(key, f"{field_name} {header!r} is reserved for the gateway")
    if len(set(headers)) != len(headers):
        raise ConfigError(key, f"{field_name} lists a header twice")
    return tuple(headers)


def parse_pool(key: str, name: str, raw: bytes | str) -> Pool:
    check_name(key, "pool name", name)
    value = load_object(key, raw)
    reject_unknown(key, value, _POOL_FIELDS)
    if "models" not in value:
        raise ConfigError(key, "models is required (a list of model names)")
    models = value["models"]
    if not isinstance(models, list) or not models:
        raise ConfigError(
            key, f"models must be a non-empty list of strings, got {json.dumps(models)}"
        )
    for model in models:
        if not isinstance(model, str) or not model or len(model) > 256:
            raise ConfigError(
                key, f"models entries must be strings of 1-256 chars, got {json.dumps(model)}"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in model):
            raise ConfigError(key, f"model name {model!r} contains control characters")
    if len(set(models)) != len(models):
        raise ConfigError(key, "models lists a model twice")
    lb = value.get("lb", "ring_hash")
    if lb not in LB_POLICIES:
        raise ConfigError(key, f"lb must be one of {', '.join(LB_POLICIES)}, got {json.dumps(lb)}")
    headers = _session_headers(key, value)
    factor = _number(key, "hash_balance_factor", value.get("hash_balance_factor", 150),
                     minimum=0, integer=True)
    if factor != 0 and factor < limits.HASH_BALANCE_FACTOR_MIN:
        raise ConfigError(key, f"hash_balance_factor must be >= {limits.HASH_BALANCE_FACTOR_MIN}"
                               f" (or 0 for off), got {factor}")
    limits.at_most(key, "hash_balance_factor", factor, limits.HASH_BALANCE_FACTOR_MAX)
    warmup = parse_warmup(key, value["warmup"]) if "warmup" in value else Warmup()
    points = _number(key, "ring_points_per_weight",
                     value.get("ring_points_per_weight", limits.RING_POINTS_PER_WEIGHT_DEFAULT),
                     minimum=limits.RING_POINTS_PER_WEIGHT_MIN, integer=True)
    limits.at_most(key, "ring_points_per_weight", points, limits.RING_POINTS_PER_WEIGHT_MAX)
    ttl = _number(key, "session_ttl_s", value.get("session_ttl_s", DEFAULT_SESSION_TTL_S),
                  minimum=0)
    if ttl <= 0:
        raise ConfigError(key, f"session_ttl_s must be > 0, got {ttl}")
    limits.at_most(key, "session_ttl_s", ttl, SESSION_TTL_MAX_S)
    return Pool(name=name, models=tuple(models), lb=lb, session_headers=headers,
                hash_balance_factor=factor, warmup=warmup, ring_points_per_weight=points,
                session_ttl_s=float(ttl))


def _check_model_name(key: str, what: str, model: Any) -> str:
    if not isinstance(model, str) or not model or len(model) > 256:
        raise ConfigError(key, f"{what} must be a string of 1-256 chars, got {json.dumps(model)}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in model):
        raise ConfigError(key, f"{what} {model!r} contains control characters")
    return model


def check_models_free(key: str, pool: Pool, others: Iterable[Pool], where: str = "") -> None:
    """A model belongs to one pool: ConfigError when another of ``others`` serves one of
    ``pool``'s models (``where`` says where the others are)."""
    for other in others:
        if other.name == pool.name:
            continue
        shared = sorted(set(other.models) & set(pool.models))
        if shared:
            raise ConfigError(key, f"model {shared[0]!r} already belongs to pool "
                                   f"{other.name!r}{where} (a model belongs to one pool)")


_ENDPOINT_FIELDS = ("address", "port", "weight")


def parse_endpoint(key: str, pool: str, endpoint_id: str, raw: bytes | str) -> Endpoint:
    check_name(key, "pool name", pool)
    check_name(key, "endpoint id", endpoint_id)
    value = load_object(key, raw)
    reject_unknown(key, value, _ENDPOINT_FIELDS)
    if "address" not in value:
        raise ConfigError(key, "address is required (an IP or hostname)")
    address = value["address"]
    if not isinstance(address, str) or not (is_ip(address) or HOSTNAME_RE.fullmatch(address)):
        raise ConfigError(key, f"address must be an IP or hostname, got {json.dumps(address)}")
    if "port" not in value:
        raise ConfigError(key, "port is required")
    port = _number(key, "port", value["port"], minimum=limits.PORT_MIN, integer=True)
    limits.at_most(key, "port", port, limits.PORT_MAX)
    weight = _number(key, "weight", value.get("weight", 1), minimum=limits.WEIGHT_MIN,
                     integer=True)
    # hotpath's cap (limits.py says why; Envoy itself only needs >= 1).
    limits.at_most(key, "weight", weight, limits.WEIGHT_MAX)
    return Endpoint(pool=pool, id=endpoint_id, address=address, port=port, weight=weight)


_STATUS_FIELDS = ("state", "ttft_ms", "checked_at", "source", "traffic")


def parse_status(key: str, pool: str, endpoint_id: str, raw: bytes | str) -> Status:
    check_name(key, "pool name", pool)
    check_name(key, "endpoint id", endpoint_id)
    value = load_object(key, raw)
    reject_unknown(key, value, _STATUS_FIELDS)
    try:
        state = WarmState(str(value.get("state")))
    except ValueError:
        raise ConfigError(
            key, f"state must be warm, cold or down, got {json.dumps(value.get('state'))}"
        ) from None
    ttft = value.get("ttft_ms")
    if ttft is not None:
        ttft = float(_number(key, "ttft_ms", ttft, minimum=0))
    if "checked_at" not in value:
        raise ConfigError(key, "checked_at is required (unix seconds)")
    checked_at = float(_number(key, "checked_at", value["checked_at"], minimum=0))
    source = None
    if value.get("source") is not None:
        try:
            source = Source(str(value["source"]))
        except ValueError:
            raise ConfigError(key, f"source must be probe or traffic, got "
                                   f"{json.dumps(value['source'])}") from None
    traffic = None
    if value.get("traffic") is not None:
        traffic = _traffic_summary(key, value["traffic"])
    return Status(pool=pool, id=endpoint_id, state=state, ttft_ms=ttft, checked_at=checked_at,
                  source=source, traffic=traffic)


_TRAFFIC_FIELDS = ("p50_ms", "p90_ms", "rps", "window_s")


def _traffic_summary(key: str, value: Any) -> TrafficSummary:
    if not isinstance(value, dict):
        raise ConfigError(key, f"traffic must be an object, got {json.dumps(value)}")
    reject_unknown(key, value, _TRAFFIC_FIELDS)
    numbers = {}
    for name in _TRAFFIC_FIELDS:
        if name not in value:
            raise ConfigError(key, f"traffic.{name} is required")
        numbers[name] = float(_number(key, f"traffic.{name}", value[name], minimum=0))
    return TrafficSummary(**numbers)


def pool_to_json(pool: Pool) -> dict[str, Any]:
    """The etcd value of a pool, with defaults left out so later default changes apply."""
    default = Pool(name=pool.name, models=pool.models)
    value: dict[str, Any] = {"models": list(pool.models)}
    for name in ("lb", "hash_balance_factor", "ring_points_per_weight", "session_ttl_s"):
        if getattr(pool, name) != getattr(default, name):
            value[name] = getattr(pool, name)
    if len(pool.session_headers) > 1:
        value["session_headers"] = list(pool.session_headers)
    elif pool.session_headers != default.session_headers:
        value["session_header"] = pool.session_headers[0]
    if pool.warmup != Warmup():
        warm: dict[str, Any] = {}
        for name in _WARMUP_FIELDS:
            if getattr(pool.warmup, name) != getattr(Warmup(), name):
                warm[name] = getattr(pool.warmup, name)
        value["warmup"] = warm
    return value


def endpoint_to_json(endpoint: Endpoint) -> dict[str, Any]:
    value: dict[str, Any] = {"address": endpoint.address, "port": endpoint.port}
    if endpoint.weight != 1:
        value["weight"] = endpoint.weight
    return value


def status_to_json(status: Status) -> dict[str, Any]:
    value: dict[str, Any] = {"state": status.state.value, "ttft_ms": status.ttft_ms,
                             "checked_at": status.checked_at}
    if status.source is not None:
        value["source"] = status.source.value
    if status.traffic is not None:
        value["traffic"] = {name: round(getattr(status.traffic, name), 3)
                            for name in _TRAFFIC_FIELDS}
    return value


@dataclass(frozen=True)
class GatewaySettings:
    """Gateway-wide settings that come from the command line, not from etcd."""

    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    max_body_bytes: int = 8 * 1024 * 1024
    # No bytes from upstream for this long ends the request with 504. Long, because a
    # non-streaming generation sends nothing until it is done.
    idle_timeout_s: float = 900.0
    access_log_path: str = "/dev/stdout"
    # Stream every request's timings to the control plane (warmth from real traffic).
    traffic_stream: bool = True


# -- splits ---------------------------------------------------------------------------------
# splits/<model> (operator) and split-slots/<model> (the control planes' leader). The slot
# table itself (how sessions map to arms, and how it changes) is config/splits.py.

MAX_SPLIT_ARMS = 16
SPLIT_WEIGHT_MAX = 1_000_000


@dataclass(frozen=True)
class SplitArm:
    pool: str
    weight: int
    served_model: str  # the body's `model` this arm's servers receive


@dataclass(frozen=True)
class Split:
    """Clients ask for ``model``; each session is served by one arm (docs/splits.md)."""

    model: str
    arms: tuple[SplitArm, ...]

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(arm.pool for arm in self.arms)


@dataclass(frozen=True)
class SplitSlots:
    """The leader's slot table of a split: ``table[slot]`` is an index into ``pools`` (one
    character per slot, config/splits.py); ``pools`` are the arm pools the table was derived
    for, so an edit of the arm list is mapped by pool, not by position."""

    model: str
    pools: tuple[str, ...]
    table: str


_SPLIT_FIELDS = ("arms",)
_ARM_FIELDS = ("pool", "weight", "served_model")


def parse_split(key: str, model: str, raw: bytes | str) -> Split:
    _check_model_name(key, "split model", model)
    value = load_object(key, raw)
    reject_unknown(key, value, _SPLIT_FIELDS)
    arms = value.get("arms")
    if not isinstance(arms, list) or not 1 <= len(arms) <= MAX_SPLIT_ARMS:
        raise ConfigError(key, f"arms must be a list of 1-{MAX_SPLIT_ARMS} arms, got "
                               f"{json.dumps(arms)[:200]}")
    parsed = []
    for index, arm in enumerate(arms):
        where = f"arms[{index}]"
        if not isinstance(arm, dict):
            raise ConfigError(key, f"{where} must be an object, got {json.dumps(arm)[:200]}")
        unknown = sorted(set(arm) - set(_ARM_FIELDS))
        if unknown:
            raise ConfigError(key, f"unknown {where} field(s) {', '.join(unknown)} "
                                   f"(allowed: {', '.join(_ARM_FIELDS)})")
        if "pool" not in arm:
            raise ConfigError(key, f"{where}.pool is required")
        pool = arm["pool"]
        if not isinstance(pool, str):
            raise ConfigError(key, f"{where}.pool must be a pool name, got {json.dumps(pool)}")
        check_name(key, f"{where}.pool", pool)
        if "weight" not in arm:
            raise ConfigError(key, f"{where}.weight is required (an integer >= 0)")
        weight = _number(key, f"{where}.weight", arm["weight"], minimum=0, integer=True)
        limits.at_most(key, f"{where}.weight", weight, SPLIT_WEIGHT_MAX)
        served = _check_model_name(key, f"{where}.served_model", arm.get("served_model", model))
        parsed.append(SplitArm(pool=pool, weight=weight, served_model=served))
    pools = [arm.pool for arm in parsed]
    if len(set(pools)) != len(pools):
        raise ConfigError(key, "arms lists a pool twice (one arm per pool)")
    if sum(arm.weight for arm in parsed) <= 0:
        raise ConfigError(key, "arms' weights must have a positive sum, got 0")
    return Split(model=model, arms=tuple(parsed))


def split_to_json(split: Split) -> dict[str, Any]:
    arms: list[dict[str, Any]] = []
    for arm in split.arms:
        item: dict[str, Any] = {"pool": arm.pool, "weight": arm.weight}
        if arm.served_model != split.model:
            item["served_model"] = arm.served_model
        arms.append(item)
    return {"arms": arms}


_SPLIT_SLOTS_FIELDS = ("arms", "slots")


def parse_split_slots(key: str, model: str, raw: bytes | str, slot_count: int) -> SplitSlots:
    """``{"arms": [pool, ...], "slots": "<one arm index per slot>"}``; ``slot_count`` is the
    table size both the control plane and the Lua filter use."""
    _check_model_name(key, "split model", model)
    value = load_object(key, raw)
    reject_unknown(key, value, _SPLIT_SLOTS_FIELDS)
    pools = value.get("arms")
    if (not isinstance(pools, list) or not 1 <= len(pools) <= MAX_SPLIT_ARMS
            or not all(isinstance(p, str) and NAME_RE.fullmatch(p) for p in pools)
            or len(set(pools)) != len(pools)):
        raise ConfigError(key, f"arms must be a list of 1-{MAX_SPLIT_ARMS} distinct pool "
                               f"names, got {json.dumps(pools)[:200]}")
    table = value.get("slots")
    if not isinstance(table, str) or len(table) != slot_count:
        raise ConfigError(key, f"slots must be a string of {slot_count} arm indexes")
    allowed = SLOT_DIGITS[:len(pools)]
    if any(c not in allowed for c in set(table)):
        raise ConfigError(key, f"slots holds an arm index outside 0..{len(pools) - 1}")
    return SplitSlots(model=model, pools=tuple(pools), table=table)


# One character per slot: the arm's index as a hex digit (MAX_SPLIT_ARMS = 16).
SLOT_DIGITS = "0123456789abcdef"
