-- Envoy entry points. The control plane inlines this after lua/hotpath.lua (as HOTPATH) and
-- the rendered config (as HOTPATH_CONFIG); every decision is made in HOTPATH.decide.
-- Which pool serves a model, and its session header(s), come from the metadata of the route
-- the model header selects: pool changes arrive over RDS, so the listener (and with it every
-- open connection and stream) is never replaced when pools change.
-- Names come from HOTPATH_CONFIG when it has them (read once, at load), else the defaults.
local CONFIG = HOTPATH_CONFIG
local MODEL_HEADER = CONFIG.model_header or "x-hotpath-model"
local SESSION_HEADER = CONFIG.session_header_internal or "x-hotpath-session"
-- respond() replies pass through the connection manager's local_reply_config; its mappers
-- skip requests carrying this header, so the filter's JSON body goes out unchanged.
local LUA_REPLY_HEADER = CONFIG.lua_reply_header or "x-hotpath-lua-reply"
local METADATA_NS = CONFIG.metadata_namespace or "envoy.filters.http.lua"
-- The cluster's override-host balancer sends a request carrying it to that host.
local PIN_HEADER = CONFIG.pin_header or "x-hotpath-pin"
local INTERNAL_HEADERS = { MODEL_HEADER, SESSION_HEADER, LUA_REPLY_HEADER, PIN_HEADER }
-- Pins of active sessions (control_plane/affinity/), rendered per pool as host -> comma list
-- of session hashes (one Lua constant per host, not per pin): pool -> hash -> "ip:port".
local PINS = {}
for pool, hosts in pairs(CONFIG.pins or {}) do
  local pinned = {}
  for address, list in pairs(hosts) do
    for hash in string.gmatch(list, "[^,]+") do
      pinned[hash] = address
    end
  end
  PINS[pool] = pinned
end

function envoy_on_request(handle)
  local headers = handle:headers()
  -- Routes and the hash policy trust these headers: drop any client-sent copy.
  local spoofed = false
  for _, name in ipairs(INTERNAL_HEADERS) do
    if headers:get(name) then
      headers:remove(name)
      spoofed = true
    end
  end
  local method, path = headers:get(":method"), headers:get(":path")
  local body
  if HOTPATH.needs_body(method, path) then
    local buffered = handle:body() -- nil when the request has no body
    body = buffered and buffered:getBytes(0, buffered:length()) or ""
    -- body() yields: header objects taken before it raise "object used outside of proper
    -- scope" afterwards.
    headers = handle:headers()
  end
  local looked_up = false
  local function lookup(model)
    looked_up = true
    headers:replace(MODEL_HEADER, model)
    -- Re-pick the route on the model header; metadata() must not be read before this, as
    -- the filter keeps the first route metadata it reads.
    handle:clearRouteCache()
    local route = handle:metadata()
    if not route then
      return nil
    end
    local slots = route:get("slots")
    if slots then
      -- A split: the filter picks the arm, then reroute() selects the arm's route. The
      -- metadata read here stays the split route's (frozen at the first read), which is why
      -- it carries every arm's pool and served model.
      return {
        slots = slots,
        arm_pools = route:get("arm_pools"),
        served_models = route:get("served_models"),
        session_headers = route:get("session_headers"),
        session_header = route:get("session_header"),
      }
    end
    local pool = route:get("pool")
    if not pool then
      return nil
    end
    -- A list in the route metadata arrives as a Lua array.
    return {
      pool = pool,
      session_headers = route:get("session_headers"),
      session_header = route:get("session_header"),
    }
  end
  local function reroute(key)
    headers:replace(MODEL_HEADER, key)
    handle:clearRouteCache()
  end
  local result = HOTPATH.decide(CONFIG, method, path, function(name)
    return headers:get(name)
  end, body, lookup, reroute)
  if result and result.status then
    headers:remove(MODEL_HEADER)
    headers:replace(LUA_REPLY_HEADER, "1")
    handle:respond({ [":status"] = tostring(result.status), ["content-type"] = "application/json" },
      result.json)
    return
  end
  if result then
    headers:replace(MODEL_HEADER, result.model)
    headers:replace(SESSION_HEADER, result.session)
    -- The key leaves Envoy (access-log stream) only hashed: keys may be user ids. The echo
    -- (x-session-id) is a route response header formatted from the request header, so the
    -- filter has no response path at all.
    local metadata = handle:streamInfo():dynamicMetadata()
    local session_hash = result.session_hash or HOTPATH.hash(result.session)
    metadata:set(METADATA_NS, "session_hash", session_hash)
    -- Where the ring puts this key: the control plane computes ring changes from it.
    metadata:set(METADATA_NS, "ring_hash", HOTPATH.ring_hash(result.session))
    local pinned = PINS[result.pool]
    local host = pinned and pinned[session_hash]
    if host then
      headers:replace(PIN_HEADER, host)
    end
    if result.split then
      -- Per (model, arm) metrics in the control plane read these from the access log.
      metadata:set(METADATA_NS, "split_model", result.split)
      metadata:set(METADATA_NS, "split_arm", tostring(result.arm))
    end
    if result.body then
      -- The arm's served model differs: its server gets the body with that `model`.
      handle:body():setBytes(result.body)
      headers = handle:headers()
      headers:replace("content-length", tostring(#result.body))
    end
  end
  -- The route was picked and cached before this filter ran, from the original headers; the
  -- lookup re-picked it, and a request with forged internal headers removed needs it too.
  if spoofed and not looked_up then
    handle:clearRouteCache()
  end
end
