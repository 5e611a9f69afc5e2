"""Route configuration: one route per model, matched on the header the Lua filter sets."""

from __future__ import annotations

import json
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import any_pb2, duration_pb2

from control_plane.config.model import GatewaySettings, Pool
from control_plane.xds.types import ROUTE_CONFIG_NAME

LUA_FILTER = "envoy.filters.http.lua"
MODEL_HEADER = "x-hotpath-model"
SESSION_HEADER = "x-hotpath-session"
# Retries only where the request never reached a model server's generation: a connect
# failure, a refused stream or a reset before any response header. They go to another host.
RETRY_ON = "connect-failure,refused-stream,reset"


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration


def _retry_policy() -> route_components_pb2.RetryPolicy:
    predicate = any_pb2.Any()
    predicate.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    return route_components_pb2.RetryPolicy(
        retry_on=RETRY_ON,
        num_retries={"value": 2},
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=predicate
            )
        ],
        host_selection_retry_max_attempts=5,
    )


def _route_metadata(pool: Pool) -> base_pb2.Metadata:
    """What the Lua filter reads once it has picked the route by model."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[LUA_FILTER].update(
        {"pool": pool.name, "session_header": pool.session_header})
    return metadata


def _models_route(pools: list[Pool]) -> route_components_pb2.Route:
    """GET /v1/models, answered by Envoy from the current pools."""
    models = sorted((model, pool.name) for pool in pools for model in pool.models)
    body = json.dumps({"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": pool}
        for model, pool in models]}, separators=(",", ":"))
    return route_components_pb2.Route(
        name="models",
        match=route_components_pb2.RouteMatch(
            path="/v1/models",
            headers=[route_components_pb2.HeaderMatcher(name=":method",
                                                        string_match={"exact": "GET"})],
        ),
        direct_response=route_components_pb2.DirectResponseAction(
            status=200, body=base_pb2.DataSource(inline_string=body)),
        response_headers_to_add=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", value="application/json"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)],
    )


def _model_route(model: str, pool: Pool, settings: GatewaySettings) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=f"{pool.name}/{model}",
        metadata=_route_metadata(pool),
        match=route_components_pb2.RouteMatch(
            prefix="/",
            headers=[
                route_components_pb2.HeaderMatcher(
                    name=MODEL_HEADER,
                    string_match={"exact": model},
                )
            ],
        ),
        route=route_components_pb2.RouteAction(
            cluster=pool.name,
            hash_policy=[
                route_components_pb2.RouteAction.HashPolicy(
                    header=route_components_pb2.RouteAction.HashPolicy.Header(
                        header_name=SESSION_HEADER
                    )
                )
            ],
            # Generations run for minutes: no overall deadline, only an idle timeout.
            timeout=_duration(0),
            idle_timeout=_duration(settings.idle_timeout_s),
            retry_policy=_retry_policy(),
        ),
    )


def _not_found(name: str, match: route_components_pb2.RouteMatch, message: str
               ) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=name,
        match=match,
        direct_response=route_components_pb2.DirectResponseAction(
            status=404, body=base_pb2.DataSource(inline_string=message)
        ),
    )


def build_route_configuration(
    pools: Iterable[Pool], settings: GatewaySettings
) -> route_pb2.RouteConfiguration:
    ordered = sorted(pools, key=lambda p: p.name)
    routes = [_models_route(ordered)]
    routes += [_model_route(model, pool, settings) for pool in ordered for model in pool.models]
    # A model the routes do not know yet (Lua and RDS update separately): 404, not a hang.
    routes.append(
        _not_found(
            "unknown-model",
            route_components_pb2.RouteMatch(
                prefix="/",
                headers=[route_components_pb2.HeaderMatcher(name=MODEL_HEADER,
                                                            present_match=True)],
            ),
            "the requested model is not served by any pool",
        )
    )
    routes.append(
        _not_found("no-route", route_components_pb2.RouteMatch(prefix="/"),
                   "no route for this path; hotpath serves /v1/chat/completions, "
                   "/v1/completions and /v1/models")
    )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="hotpath", domains=["*"], routes=routes)
        ],
        # Client copies of the internal headers are stripped by the Lua filter; never echo
        # them back either.
        response_headers_to_remove=[MODEL_HEADER, SESSION_HEADER],
    )

