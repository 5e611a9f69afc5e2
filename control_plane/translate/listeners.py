"""The `hotpath` listener: HTTP connection manager, Lua filter, router, OpenAI-shaped errors.

The Lua filter's config (its source) is not in the listener: the listener's HttpFilter
discovers it over ECDS (``config_discovery`` on ADS) as the TypedExtensionConfig
``hotpath-lua`` (``build_lua_filter_config``). A new filter version is then an ECDS update
that applies to new requests, while the listener, and every open connection and stream on
it, stays (a listener change drains them all).
"""

from __future__ import annotations

import functools
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    substitution_format_string_pb2,
)
from envoy.config.core.v3 import (
    extension_pb2 as core_extension_pb2,
)
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as accesslog_data_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2
from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2 as otel_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from opentelemetry.proto.common.v1 import common_pb2 as otel_common_pb2

from control_plane import contract
from control_plane.config import limits
from control_plane.config.model import GatewaySettings
from control_plane.traffic import entries
from control_plane.translate.lua import render_lua_source

ACCESS_LOG_FORMAT = {
    "start": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "model": "%REQ(X-HOTPATH-MODEL)%",
    # Session keys may be user ids: only their hash leaves Envoy.
    "session": f"%DYNAMIC_METADATA({contract.LUA_METADATA_NS}:session_hash)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "upstream": "%UPSTREAM_HOST%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "duration_ms": "%DURATION%",
    "ttfb_ms": "%RESPONSE_DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
}


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic: the snapshot's content hash must not change with map order.
    packed.Pack(message, deterministic=True)
    return packed


def _header(name: str, **match: Any) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(
        header=route_components_pb2.HeaderMatcher(name=name, **match)))


def _error_mapper(status: int, body_value: dict[str, Any], messages_api: bool
                  ) -> hcm_pb2.ResponseMapper:
    """Envoy's own reply with ``status`` gets ``body_value`` as its JSON body, unless the Lua
    filter made the reply (already shaped); ``messages_api`` selects /v1/messages requests
    (Anthropic shape) or the others (OpenAI shape)."""
    body = struct_pb2.Struct()
    body.update(body_value)
    filters = [
        accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(default_value=status, runtime_key="hotpath.none"),
            ))),
        _header(contract.LUA_REPLY_HEADER, present_match=True, invert_match=True),
        # A request refused before its headers are read (431) has no :path: it counts as
        # empty, so it gets the OpenAI shape instead of Envoy's plain text.
        _header(":path", string_match={"prefix": contract.MESSAGES_PATH},
                invert_match=not messages_api, treat_missing_header_as_empty=True),
    ]
    return hcm_pb2.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=filters)),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=body),
    )


def local_reply_config(settings: GatewaySettings) -> hcm_pb2.LocalReplyConfig:
    """Envoy's own replies as JSON errors (the contract's error table): Anthropic-shaped on
    /v1/messages, OpenAI-shaped everywhere else."""
    mib = settings.max_body_bytes / (1024 * 1024)
    # status, message, OpenAI type, OpenAI code, Anthropic type
    errors = [
        (400, "bad request: %LOCAL_REPLY_BODY%", "invalid_request_error", "bad_request",
         "invalid_request_error"),
        (404, "%LOCAL_REPLY_BODY%", "invalid_request_error", "not_found", "not_found_error"),
        (413, f"request body exceeds the limit of {settings.max_body_bytes} bytes "
              f"({mib:g} MiB)", "invalid_request_error", "request_too_large",
         "request_too_large"),
        (431, "request headers too large", "invalid_request_error", "headers_too_large",
         "invalid_request_error"),
        (503, "no endpoint of the pool serving %REQ(X-HOTPATH-MODEL)% is available "
              "(%LOCAL_REPLY_BODY%)", "server_error", "no_healthy_upstream",
         "overloaded_error"),
        (504, "upstream timeout (%LOCAL_REPLY_BODY%)", "server_error", "upstream_timeout",
         "api_error"),
        (502, "bad gateway (%LOCAL_REPLY_BODY%)", "server_error", "bad_gateway", "api_error"),
        (500, "internal error (%LOCAL_REPLY_BODY%)", "server_error", "internal_error",
         "api_error"),
    ]
    mappers = []
    for status, message, openai_type, code, anthropic_type in errors:
        mappers.append(_error_mapper(status, {"type": "error", "error": {
            "type": anthropic_type, "message": message}}, messages_api=True))
        mappers.append(_error_mapper(status, {"error": {
            "message": message, "type": openai_type, "code": code}}, messages_api=False))
    return hcm_pb2.LocalReplyConfig(mappers=mappers)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration


# The access-log stream (measured: see _access_logs). An entry reaches the control plane
# within ACCESS_LOG_FLUSH_S (buffer_flush_interval), or sooner when the worker's buffer fills.
ACCESS_LOG_FLUSH_S = 1.0
# buffer_size_bytes of each worker's logger (~400 records). The control plane's CPU per
# record falls with bigger exports (fewer gRPC calls): benchmarks/gateway_cost.py's stack and
# wrk helpers, wrk -c8, 1 KiB, 3 runs each: 4 KiB 52-56 us per request, 16 KiB 42-48, 64 KiB
# 31-34; the added p99 at 1 connection was the same within the spread (0.69-1.08 ms). Below
# a buffer's worth of records per second per worker, records go at the flush interval.
ACCESS_LOG_BUFFER_BYTES = 65536
# access_log_flush_interval: an entry per request in flight, this often (None: none). Only
# with the stream: the file log takes ended requests only, and the timer costs every request.
PERIODIC_ENTRY_S: float | None = 1.0


def _access_logs(settings: GatewaySettings, file_format: struct_pb2.Struct
                 ) -> list[accesslog_pb2.AccessLog]:
    """The file log (one line per request that ended) and, unless turned off, the stream of
    every request's timings to the control plane, periodic records of requests in flight
    included.

    The stream is Envoy's OpenTelemetry access logger with one formatted line as the record
    body (traffic/entries.py). What it costs Envoy 1.40 (benchmarks/traffic_stream.py,
    figures in docs/prober.md: stacks loaded at once, tiny non-streamed requests, 2
    workers): CPU per request +4.5 % (rounds +3.4 .. +5.3 %), where the gRPC HTTP access
    logger cost +15.7 % in the same run (+10.4 .. +12.6 % in earlier ones): it builds a full
    HTTPAccessLogEntry per request (~54 allocations, ~35 k instructions), whatever its
    config; no custom tag, buffer size (8 KiB - 1 MiB) or flush interval (0.25 - 2 s)
    changed that by more than a run's spread, and a message per entry was worse (+22.5 %).
    The logger sends one unary Export per flush interval or full buffer, to the xDS cluster
    (the control plane's port). Entries are never sampled."""
    ended_only = accesslog_pb2.AccessLogFilter(log_type_filter=accesslog_pb2.LogTypeFilter(
        types=[accesslog_data_pb2.AccessLogType.DownstreamEnd]))
    logs = [accesslog_pb2.AccessLog(
        name="envoy.access_loggers.file", filter=ended_only,
        typed_config=_any(file_pb2.FileAccessLog(
            path=settings.access_log_path,
            log_format=substitution_format_string_pb2.SubstitutionFormatString(
                json_format=file_format))))]
    if settings.traffic_stream:
        stream = otel_pb2.OpenTelemetryAccessLogConfig(
            common_config=als_config_pb2.CommonGrpcAccessLogConfig(
                log_name=contract.ACCESS_LOG_NAME,
                transport_api_version=config_source_pb2.V3,
                grpc_service=grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                        cluster_name=contract.XDS_CLUSTER)),
                buffer_flush_interval=_duration(ACCESS_LOG_FLUSH_S),
                buffer_size_bytes=wrappers_pb2.UInt32Value(value=ACCESS_LOG_BUFFER_BYTES),
            ),
            body=otel_common_pb2.AnyValue(string_value=entries.BODY_FORMAT))
        logs.append(accesslog_pb2.AccessLog(name="envoy.access_loggers.open_telemetry",
                                            typed_config=_any(stream)))
    return logs


LUA_FILTER_CONFIG_NAME = "hotpath-lua"
LUA_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"


# pool -> ("ip:port", comma-separated session hashes) pairs, sorted: hashable, for the cache.
FilterPins = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


@functools.lru_cache(maxsize=8)
def build_lua_filter_config(settings: GatewaySettings, pins: FilterPins = ()
                            ) -> core_extension_pb2.TypedExtensionConfig:
    """The ECDS resource the listener's Lua filter discovers: the filter's whole source and
    the pins of active sessions. Cached, so an unchanged filter is the very object the
    snapshot builder already knows (no re-serialization of ~40 KiB of Lua per rebuild)."""
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(
        inline_string=render_lua_source(settings.max_body_bytes,
                                        {pool: dict(hosts) for pool, hosts in pins})))
    return core_extension_pb2.TypedExtensionConfig(name=LUA_FILTER_CONFIG_NAME,
                                                   typed_config=_any(lua))


# What the listener runs when the filter's config has not arrived by the end of the initial
# fetch (15 s): every request gets a 503 that says so, in the shape of its API. Constant, so
# the listener never changes with the filter.
_FILTER_MISSING_LUA = f"""
function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path") or ""
  headers:replace("{contract.LUA_REPLY_HEADER}", "1")
  local message = "hotpath: the gateway filter has not arrived from the control plane yet"
  local body
  if path:sub(1, {len(contract.MESSAGES_PATH)}) == "{contract.MESSAGES_PATH}" then
    body = '{{"type":"error","error":{{"type":"overloaded_error","message":"' .. message .. '"}}}}'
  else
    body = '{{"error":{{"message":"' .. message .. '","type":"server_error",' ..
      '"code":"filter_not_loaded"}}}}'
  end
  handle:respond({{[":status"] = "503", ["content-type"] = "application/json"}}, body)
end
"""


def _lua_http_filter() -> hcm_pb2.HttpFilter:
    """The Lua filter, its config from ECDS. Measured on Envoy 1.40: the listener warms (its
    port stays closed) until the first ECDS answer, for at most the initial fetch timeout
    (15 s); then it serves the default config, a 503 here. No request is ever routed
    without the filter. (Without a default, Envoy answers 500 after the timeout; with
    ``apply_default_config_without_warming`` the listener serves the default at once.)"""
    default = any_pb2.Any()
    default.Pack(lua_pb2.Lua(default_source_code=base_pb2.DataSource(
        inline_string=_FILTER_MISSING_LUA)), deterministic=True)
    return hcm_pb2.HttpFilter(
        name=LUA_FILTER_CONFIG_NAME,
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3),
            default_config=default,
            apply_default_config_without_warming=False,
            type_urls=[LUA_TYPE_URL]))


def build_listener(settings: GatewaySettings) -> listener_pb2.Listener:
    """Depends on gateway settings only: pool changes never replace the listener (which would
    drain every open connection, cutting long generations), nor do filter changes (ECDS)."""
    # Both land in Envoy fields (UInt32Value buffer limit, Duration idle timeouts).
    limits.check_gateway(settings.max_body_bytes, settings.idle_timeout_s)
    access_log_format = struct_pb2.Struct()
    access_log_format.update(ACCESS_LOG_FORMAT)
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="hotpath",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(
            route_config_name=contract.ROUTE_CONFIG_NAME,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        http_filters=[
            _lua_http_filter(),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                               typed_config=_any(router_pb2.Router())),
        ],
        access_log=_access_logs(settings, access_log_format),
        # In-flight requests get an entry per interval: one waiting for its first token is
        # seen before it ends (traffic/entries.py).
        access_log_options=hcm_pb2.HttpConnectionManager.HcmAccessLogOptions(
            access_log_flush_interval=_duration(PERIODIC_ENTRY_S))
        if settings.traffic_stream and PERIODIC_ENTRY_S is not None else None,
        # A non-streaming generation is silent until done: only a long idle stops it.
        stream_idle_timeout=_duration(settings.idle_timeout_s),
        request_timeout=_duration(0),
        local_reply_config=local_reply_config(settings),
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
    )
    return listener_pb2.Listener(
        name=contract.LISTENER_NAME,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=settings.listen_address, port_value=settings.listen_port
            )
        ),
        # The Lua filter buffers the whole request body; this is the body limit (413 above).
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=settings.max_body_bytes),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm),
                    )
                ]
            )
        ],
    )

