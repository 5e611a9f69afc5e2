"""One Envoy access-log entry (HTTPAccessLogEntry) as an ``Observation``. Pure.

The entries are configured by translate/listeners.py: the gRPC access logger adds custom
tags, and the HTTP connection manager flushes an entry for every request still in flight
once per flush interval (``intermediate_log_entry``), so a request waiting for its first
token is seen before it ends. Measured on Envoy 1.40 (headers at once, first SSE chunk 1.5 s
later): ``common_properties.time_to_first_upstream_rx_byte`` was 1.8 ms (the headers),
``%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%`` 1504 ms (the first body byte), absent
until that byte arrived, and absent for Envoy's own replies (a 503 on a dead host).

What is read: the built-in fields (stream id, upstream cluster and host, response code and
flags, request body bytes, duration), the Lua filter's keys in the dynamic metadata
(session_hash, ring_hash, split_model, split_arm) and the two custom tags, the only
formatters (``CUSTOM_TAGS``; each costs Envoy ~0.6 k instructions per entry of the ~35 k an
entry costs: translate/listeners.py). ``%DURATION%`` is what a periodic entry has of its
age: ``duration`` is set on the final entry only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.contract import LUA_METADATA_NS

# Custom tags of the access logger (translate/listeners.py renders them from these names).
TAG_FIRST_BODY_MS = "ttfb_body_ms"
TAG_ELAPSED_MS = "elapsed_ms"
FIRST_BODY_FORMAT = "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%"
ELAPSED_FORMAT = "%DURATION%"
# (tag, substitution format) of each custom tag, in order: what translate/listeners.py asks
# Envoy for, all that observe() reads from custom_tags.
CUSTOM_TAGS: tuple[tuple[str, str], ...] = ((TAG_FIRST_BODY_MS, FIRST_BODY_FORMAT),
                                            (TAG_ELAPSED_MS, ELAPSED_FORMAT))
SESSION_HASH_KEY = "session_hash"
# Set by the Lua filter: XXH64 of the session key (16 hex), its place on the ring.
RING_HASH_KEY = "ring_hash"
# Set by the Lua filter on a split's requests: the split's model and the arm index.
SPLIT_MODEL_KEY = "split_model"
SPLIT_ARM_KEY = "split_arm"


@dataclass(frozen=True)
class Observation:
    """What one entry says about one request to one upstream host."""

    stream: tuple[str, str]  # (Envoy node, stream id): the same on every entry of a request
    pool: str  # the upstream cluster
    address: str  # "ip:port" of the upstream host
    final: bool  # the request ended (else a periodic entry of a request in flight)
    first_byte_ms: float | None  # first response body byte since the request began
    elapsed_ms: float  # since the request began, when the entry was made
    request_bytes: int  # request body bytes (prompt size)
    status: int  # response code, 0 before any
    upstream_failure: bool  # no host answered: connect failure, reset, overflow
    session_hash: str | None
    split: tuple[str, str] | None = None  # (split model, arm index) of a split's request
    ring_hash: int | None = None  # where the session key lands on a ring (affinity/ring.py)


def _number(tags: Mapping[str, str], name: str) -> float | None:
    text = tags.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def observe(node: str, entry: accesslog_pb2.HTTPAccessLogEntry) -> Observation | None:
    """The observation in ``entry``, or None when no upstream host served it (a direct
    response, a request refused by the Lua filter)."""
    common = entry.common_properties
    socket = common.upstream_remote_address.socket_address
    if not common.upstream_cluster or not socket.address:
        return None
    tags = dict(common.custom_tags)
    flags = common.response_flags
    session = None
    split = None
    metadata = common.metadata.filter_metadata.get(LUA_METADATA_NS)
    if metadata is not None and SESSION_HASH_KEY in metadata.fields:
        session = metadata.fields[SESSION_HASH_KEY].string_value or None
    ring_hash = None
    if metadata is not None and RING_HASH_KEY in metadata.fields:
        try:
            ring_hash = int(metadata.fields[RING_HASH_KEY].string_value, 16)
        except ValueError:
            ring_hash = None
    if metadata is not None and SPLIT_MODEL_KEY in metadata.fields:
        split = (metadata.fields[SPLIT_MODEL_KEY].string_value,
                 metadata.fields[SPLIT_ARM_KEY].string_value if SPLIT_ARM_KEY in
                 metadata.fields else "")
    elapsed = _number(tags, TAG_ELAPSED_MS)
    if elapsed is None:
        elapsed = common.duration.ToMilliseconds() if common.HasField("duration") else 0.0
    return Observation(
        stream=(node, common.stream_id),
        pool=common.upstream_cluster,
        address=f"{socket.address}:{socket.port_value}",
        final=not common.intermediate_log_entry,
        first_byte_ms=_number(tags, TAG_FIRST_BODY_MS),
        elapsed_ms=float(elapsed),
        request_bytes=int(entry.request.request_body_bytes),
        status=int(entry.response.response_code.value),
        upstream_failure=bool(flags.upstream_connection_failure or flags.no_healthy_upstream
                              or flags.upstream_overflow or flags.upstream_remote_reset
                              or flags.upstream_connection_termination),
        session_hash=session,
        split=split,
        ring_hash=ring_hash if ring_hash is not None and ring_hash < 1 << 64 else None,
    )
