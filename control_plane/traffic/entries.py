"""One Envoy access-log record (an OpenTelemetry LogRecord's body) as an ``Observation``. Pure.

translate/listeners.py configures Envoy's OpenTelemetry access logger with ``BODY_FORMAT``:
one line per request, its fields joined by ``SEPARATOR`` (a control character: no field can
hold one; model names refuse them). The HTTP connection manager also logs every request
still in flight once per flush interval (``DownstreamPeriodic``), so a request waiting for
its first token is seen before it ends.

Why this logger and one formatted line (benchmarks/traffic_stream.py, Envoy 1.40, tiny
non-streamed requests, all stacks loaded at once, one run): Envoy's CPU per request +15.7 %
with the gRPC HTTP access logger (it builds a full HTTPAccessLogEntry, ~25 sub-messages, ~54
allocations per entry, whatever is configured), +4.5 % with this one. Envoy renders absent
values as ``-``.

Measured on Envoy 1.40 (headers at once, first SSE chunk 1.5 s later): the time to the first
upstream byte was 1.8 ms (the headers); ``%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%``
1504 ms (the first body byte), absent until that byte arrived and for Envoy's own replies (a
503 on a dead host). ``%DURATION%`` is a request's age so far on a periodic record.
"""

from __future__ import annotations

from typing import NamedTuple

from control_plane.contract import LUA_METADATA_NS

SEPARATOR = "\x1f"  # ASCII unit separator
# The Lua filter's keys in the dynamic metadata.
SESSION_HASH_KEY = "session_hash"
RING_HASH_KEY = "ring_hash"  # XXH64 of the session key (16 hex): its place on the ring
SPLIT_MODEL_KEY = "split_model"  # set on a split's requests: the split's model ...
SPLIT_ARM_KEY = "split_arm"  # ... and the arm index
PERIODIC = "DownstreamPeriodic"  # %ACCESS_LOG_TYPE% of a request still in flight
# Response flags that say no host answered: connect failure, no healthy host, overflow,
# reset, connection terminated.
UPSTREAM_FAILURE_FLAGS = frozenset({"UF", "UH", "UO", "UR", "UC"})


def _metadata(key: str) -> str:
    return f"%DYNAMIC_METADATA({LUA_METADATA_NS}:{key})%"


# (field, substitution operator), in record order.
FIELDS: tuple[tuple[str, str], ...] = (
    ("pool", "%UPSTREAM_CLUSTER%"),
    ("host", "%UPSTREAM_HOST%"),
    ("stream", "%STREAM_ID%"),
    ("type", "%ACCESS_LOG_TYPE%"),
    ("first_body_ms", "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%"),
    ("elapsed_ms", "%DURATION%"),
    ("request_bytes", "%BYTES_RECEIVED%"),
    ("status", "%RESPONSE_CODE%"),
    ("flags", "%RESPONSE_FLAGS%"),
    ("session_hash", _metadata(SESSION_HASH_KEY)),
    ("ring_hash", _metadata(RING_HASH_KEY)),
    ("split_arm", _metadata(SPLIT_ARM_KEY)),
    ("split_model", _metadata(SPLIT_MODEL_KEY)),
)
BODY_FORMAT = SEPARATOR.join(operator for _, operator in FIELDS)
ABSENT = "-"


class Observation(NamedTuple):
    """What one record says about one request to one upstream host (a tuple: built for
    every record, ~10,000 a second, where a frozen dataclass took ~4 us to build)."""

    stream: tuple[str, str]  # (Envoy node, stream id): the same on every record of a request
    pool: str  # the upstream cluster
    address: str  # "ip:port" of the upstream host
    final: bool  # the request ended (else a periodic record of a request in flight)
    first_byte_ms: float | None  # first response body byte since the request began
    elapsed_ms: float  # since the request began, when the record was made
    request_bytes: int  # request body bytes (prompt size)
    status: int  # response code, 0 before any
    upstream_failure: bool  # no host answered: connect failure, reset, overflow
    session_hash: str | None
    split: tuple[str, str] | None = None  # (split model, arm index) of a split's request
    ring_hash: int | None = None  # where the session key lands on a ring (affinity/ring.py)


def _number(text: str) -> float | None:
    if text.isdigit():  # what Envoy writes: whole milliseconds, bytes, a status code
        return float(text)
    if text == ABSENT:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def _value(text: str) -> str | None:
    """A metadata value as Envoy renders it (a string may come JSON-quoted)."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return None if text in ("", ABSENT) else text


def observe(node: str, body: str) -> Observation | None:
    """The observation in a record's ``body``, or None when no upstream host served it (a
    direct response, a request refused by the Lua filter) or it is not one of ours."""
    parts = body.split(SEPARATOR)
    if len(parts) != len(FIELDS):
        return None
    (pool, host, stream, kind, first_body, elapsed, request_bytes, status, flags, session,
     ring, arm, split_model) = parts
    if pool == ABSENT or host == ABSENT or not host:
        return None
    ring_hash = None
    ring_text = _value(ring)
    if ring_text is not None:
        try:
            ring_hash = int(ring_text, 16)
        except ValueError:
            ring_hash = None
    model = _value(split_model)
    return Observation(
        stream=(node, stream),
        pool=pool,
        address=host,
        final=kind != PERIODIC,
        first_byte_ms=_number(first_body),
        elapsed_ms=_number(elapsed) or 0.0,
        request_bytes=int(_number(request_bytes) or 0),
        status=int(_number(status) or 0),
        upstream_failure=not UPSTREAM_FAILURE_FLAGS.isdisjoint(flags.split(",")),
        session_hash=_value(session),
        split=None if model is None else (model, _value(arm) or ""),
        ring_hash=ring_hash if ring_hash is not None and ring_hash < 1 << 64 else None,
    )
