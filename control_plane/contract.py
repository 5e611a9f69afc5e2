"""Names fixed by the interface contract (DESIGN.md), in one place for Python and Lua.

The Lua filter gets the header names and the metadata namespace from the rendered config
(translate/lua.py), so a name changes here or nowhere.
"""

# Internal request headers the gateway's filters set (client copies are removed first).
MODEL_HEADER = "x-hotpath-model"
SESSION_HEADER = "x-hotpath-session"
# Set on replies the Lua filter makes itself: already shaped, never rewritten again.
LUA_REPLY_HEADER = "x-hotpath-lua-reply"
# The host ("ip:port") a pinned session goes to: read by the override-host load balancer.
PIN_HEADER = "x-hotpath-pin"
INTERNAL_HEADERS = (MODEL_HEADER, SESSION_HEADER, LUA_REPLY_HEADER, PIN_HEADER)
# The response header that echoes the session key used.
SESSION_ECHO_HEADER = "x-session-id"
DEFAULT_SESSION_HEADER = "x-session-id"
# Route metadata the Lua filter reads (pool, session headers) lives under this namespace.
LUA_METADATA_NS = "envoy.filters.http.lua"

LISTENER_NAME = "hotpath"
ROUTE_CONFIG_NAME = "hotpath"

# Routed APIs; /v1/messages (Anthropic) answers errors in its own shape.
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
MESSAGES_PATH = "/v1/messages"
MODELS_PATH = "/v1/models"

# The bootstrap's cluster for the control plane (envoy/bootstrap.yaml.in): ADS and the
# access-log stream both use it.
XDS_CLUSTER = "hotpath_xds"
ACCESS_LOG_NAME = "hotpath"
