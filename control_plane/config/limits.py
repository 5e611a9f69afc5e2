"""Every numeric bound of a value hotpath writes into an Envoy resource, in one place.

Validation (config/model.py) rejects a value outside these bounds with a message naming the
etcd key and field; the resource builders (translate/) use the same constants, so a value
that passed validation always fits the Envoy field it lands in. Pure: no IO, no protobuf.

Bounds come from Envoy 1.40's proto validation rules (protoc-gen-validate annotations in
data-plane-api, readable from the xds-protos descriptors) and protobuf's own types:

==========================  ==========================================  ===================
field (etcd / flag)         Envoy field                                 Envoy's bound
==========================  ==========================================  ===================
hash_balance_factor         ConsistentHashingLbConfig.hash_balance_      UInt32Value, >= 100
                            factor
weight                      LbEndpoint.load_balancing_weight             UInt32Value, >= 1;
                                                                         a locality's sum
                                                                         <= 2^32-1
ring_points_per_weight      (x total weight = RingHashLbConfig.minimum_  <= 8388608 (hotpath:
                            ring_size; maximum_ring_size = the bound)     1..4096 per weight)
port                        SocketAddress.port_value                     <= 65535
warmup.*_s, --idle-timeout  google.protobuf.Duration                     |seconds| <=
                                                                         315576000000
--max-body-bytes            Listener.per_connection_buffer_limit_bytes   UInt32Value
(/v1/models body, derived)  RouteConfiguration.max_direct_response_      UInt32Value
                            body_size_bytes
==========================  ==========================================  ===================
"""

from __future__ import annotations

from typing import Final

from control_plane.errors import ConfigError

UINT32_MAX: Final = 2**32 - 1

# google.protobuf.Duration: seconds in [-315576000000, 315576000000] (10,000 years).
DURATION_MAX_S: Final = 315_576_000_000

# ConsistentHashingLbConfig.hash_balance_factor: UInt32Value, gte 100 (0 = hotpath's "off":
# the field is then not written at all).
HASH_BALANCE_FACTOR_MIN: Final = 100
HASH_BALANCE_FACTOR_MAX: Final = UINT32_MAX

# LbEndpoint.load_balancing_weight: Envoy needs >= 1 and a locality's sum <= 2^32-1. hotpath
# caps a host's configured weight at 128 itself: the EDS weight (weight x SPILL_SCALE 16 at
# most, translate/warmth.py) of even 10^6 hosts stays far below 2^32.
WEIGHT_MIN: Final = 1
WEIGHT_MAX: Final = 128

# RingHashLbConfig.minimum_ring_size and maximum_ring_size: UInt64Value, lte 8388608.
RING_SIZE_MAX: Final = 8 * 1024 * 1024

# pools/<pool> ring_points_per_weight (DESIGN.md Additions): a warm host of weight w has
# w x this many ring points, and the minimum ring size is about the sum over the ring. A pool whose
# total is over RING_SIZE_MAX is clamped to it (translate/clusters.py). The default keeps a
# 10 x 1,000-host fleet within Envoy's apply-time and memory targets while 3-host pools stay
# balanced; docs/scale.md has the measurements.
RING_POINTS_PER_WEIGHT_MIN: Final = 1
RING_POINTS_PER_WEIGHT_MAX: Final = 4096
RING_POINTS_PER_WEIGHT_DEFAULT: Final = 128

# SocketAddress.port_value: uint32, lte 65535 (0 would mean "any", never an upstream).
PORT_MIN: Final = 1
PORT_MAX: Final = 65535

# Durations hotpath writes (route/stream idle timeouts) or may write (warmup timings): a
# protobuf Duration. Lower bounds are hotpath's own (a 0.1 s probe loop is already busy).
WARMUP_INTERVAL_MIN_S: Final = 0.1
WARMUP_TIMEOUT_MIN_S: Final = 0.1
WARMUP_COLD_TTFT_MIN_MS: Final = 1
WARMUP_INTERVAL_MAX_S: Final = DURATION_MAX_S
WARMUP_TIMEOUT_MAX_S: Final = DURATION_MAX_S
WARMUP_COLD_TTFT_MAX_MS: Final = DURATION_MAX_S * 1000
IDLE_TIMEOUT_MAX_S: Final = DURATION_MAX_S

# Listener.per_connection_buffer_limit_bytes (the body limit): UInt32Value.
BODY_LIMIT_MAX: Final = UINT32_MAX
# RouteConfiguration.max_direct_response_body_size_bytes: UInt32Value. Envoy 1.40 refuses a
# direct response over 4096 bytes unless this is set (measured: "response body size is N
# bytes; maximum is 4096"); /v1/models is ~101 bytes per model, > 4 KiB at ~40 models.
DIRECT_RESPONSE_DEFAULT_MAX: Final = 4096
DIRECT_RESPONSE_MAX: Final = UINT32_MAX


def at_most(key: str, name: str, value: float, maximum: float) -> None:
    """ConfigError naming ``key`` and ``name`` when ``value`` is above ``maximum``."""
    if value > maximum:
        raise ConfigError(key, f"{name} must be <= {maximum}, got {value}")


def check_gateway(max_body_bytes: int, idle_timeout_s: float) -> None:
    """The command-line gateway settings that land in Envoy fields (flags as the key)."""
    if not 0 < max_body_bytes <= BODY_LIMIT_MAX:
        raise ConfigError("--max-body-bytes",
                          f"must be in 1..{BODY_LIMIT_MAX}, got {max_body_bytes}")
    if not 0 < idle_timeout_s <= IDLE_TIMEOUT_MAX_S:
        raise ConfigError("--idle-timeout",
                          f"must be in (0, {IDLE_TIMEOUT_MAX_S}] seconds, got {idle_timeout_s:g}")
