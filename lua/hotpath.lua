-- hotpath request logic for the Envoy Lua filter: pure functions, no Envoy API calls, so it
-- runs unchanged under Envoy's LuaJIT and under lupa in the unit tests. Lua 5.1 semantics;
-- `bit` is LuaJIT's built-in library (Envoy has no JSON or hash library).
local M = {}

local bor, bxor = bit.bor, bit.bxor
local lshift, rshift, rol = bit.lshift, bit.rshift, bit.rol
local tobit, tohex = bit.tobit, bit.tohex
local byte, char, find, format, gsub, sub =
  string.byte, string.char, string.find, string.format, string.gsub, string.sub
local concat, sort = table.concat, table.sort
local floor, min = math.floor, math.min

local CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
local RESPONSES, MESSAGES = "/v1/responses", "/v1/messages" -- OpenAI Responses, Anthropic
local MAX_KEY_BYTES = 256
local PROMPT_PREFIX_BYTES = 1024
-- The prefix hash (chat, Responses, Messages) reads at most PREFIX_HASH_BYTES of decoded
-- prompt text: the system part (chat's system/developer message, Responses' `instructions`,
-- Messages' `system`) cut to its first SYSTEM_PREFIX_BYTES, then the first user message cut
-- to its first PREFIX_HASH_BYTES minus the bytes kept of the system part. Bodies that differ
-- only past these cuts share a key; text is decoded only up to the cut.
local PREFIX_HASH_BYTES = 65536
local SYSTEM_PREFIX_BYTES = 32768
-- Python's json module fails near this depth too (RecursionError); the scanner itself is
-- iterative, the cap only bounds its stack table.
local MAX_DEPTH = 1000

---------------------------------------------------------------------------------------------
-- JSON scanning. The body is validated in full (RFC 8259, which is Python's json.loads with
-- NaN/Infinity refused, on UTF-8 text), but only the top-level fields that routing needs are
-- decoded. Positions are byte indexes; a value's span is {first, stop}: stop is the index
-- after it. Scanning is loops that LuaJIT compiles; string contents, nearly all of a large
-- body, are read eight bytes a step through an FFI pointer (scan_string: 0.2-0.3 ns a byte,
-- against 1-2 ns for string.byte loops). string.find with a character class runs the pattern
-- matcher at every position, about 10x slower than the byte loops.

local SIMPLE_ESCAPES = {
  [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r",
  [116] = "\t",
}
local LITERALS = { [116] = "true", [102] = "false", [110] = "null" }
local WS = { [32] = true, [9] = true, [10] = true, [13] = true }
local DIGIT, HEX, PLAIN, SIMPLE = {}, {}, {}, {}
for c = 0, 255 do
  DIGIT[c] = c >= 48 and c <= 57
  HEX[c] = DIGIT[c] or (c >= 65 and c <= 70) or (c >= 97 and c <= 102)
  -- String content that needs no attention: not '"', '\', a control character or non-ASCII.
  PLAIN[c] = c >= 32 and c < 128 and c ~= 34 and c ~= 92
  SIMPLE[c] = SIMPLE_ESCAPES[c] ~= nil -- the byte after '\' in a two-byte escape
end

local function skip_ws(s, i)
  while WS[byte(s, i)] do
    i = i + 1
  end
  return i
end

-- Strings are read through an FFI byte pointer, not string.byte: p = ffi.cast(BYTES, s) and
-- p[j] is byte j + 1 of s (j 0-based). LuaJIT ends every string's bytes with a NUL, so p[#s]
-- reads 0. A read either stays under #s or comes right after a byte that was checked to be
-- something else than 0, and 0 ends every loop below (it is not PLAIN, not HEX, not a
-- continuation byte), so nothing is read past that NUL. s is the argument of the scanning
-- function and the body the caller holds, so it stays alive while p is used.
local ffi = require("ffi")
local band, cast = bit.band, ffi.cast
local BYTES, WORDS = ffi.typeof("const uint8_t *"), ffi.typeof("const uint64_t *")
-- Eight bytes a step. In
--   m = ((x - 0x2020..20) | ((x ^ 0x2222..22) - 0x0101..01) | ((x ^ 0x5C5C..5C) - 0x0101..01))
--       & 0x8080..80
-- (x a little-endian load: its low byte comes first in s) the first byte that is not PLAIN
-- has bit 7 set and none before it has. The PLAIN bytes before it (0x20-0x7F, not '"' or '\')
-- borrow nowhere and leave bit 7 clear in all three terms. The first byte not PLAIN: a
-- control character borrows in x - 0x20.. (to >= 0xE0); '"' or '\' xors to 0, which borrows
-- to 0xFF; a byte b >= 0x80 keeps bit 7 in (b ^ 0x22) - 1, but for b = 0xA2, which has it in
-- (b ^ 0x5C) - 1. Bytes after it may be flagged or not: only the lowest flag counts. Its
-- index k: the lowest set bit, 2^(8k+7), shifted to 2^(8k), times POSITIONS brings byte
-- 7 - k of POSITIONS, which is k, into the top byte. (tests/unit/test_lua_json.py puts
-- every byte value, alone and before each kind of byte, at every offset of a word.)
local ONES, BIT7 = 0x0101010101010101ULL, 0x8080808080808080ULL
local SPACES, QUOTES, BACKSLASHES =
  0x2020202020202020ULL, 0x2222222222222222ULL, 0x5C5C5C5C5C5C5C5CULL
local POSITIONS = 0x0001020304050607ULL

-- p[j] is a UTF-8 lead byte c. Python's strict decoding: no overlongs, no surrogates, nothing
-- above U+10FFFF. Returns the (0-based) index after the sequence, or nil.
local function scan_utf8(p, j, c)
  local n, lo, hi
  if c < 0xC2 then
    return nil
  elseif c < 0xE0 then
    n, lo, hi = 1, 0x80, 0xBF
  elseif c < 0xF0 then
    n = 2
    lo = c == 0xE0 and 0xA0 or 0x80
    hi = c == 0xED and 0x9F or 0xBF
  elseif c < 0xF5 then
    n = 3
    lo = c == 0xF0 and 0x90 or 0x80
    hi = c == 0xF4 and 0x8F or 0xBF
  else
    return nil
  end
  c = p[j + 1]
  if c < lo or c > hi then
    return nil
  end
  -- The other continuation bytes unrolled: a loop of one or two steps is a trace of its own.
  if n > 1 then
    c = p[j + 2]
    if c < 0x80 or c > 0xBF then
      return nil
    end
    if n > 2 then
      c = p[j + 3]
      if c < 0x80 or c > 0xBF then
        return nil
      end
    end
  end
  return j + n + 1
end

-- i is at the opening quote. Returns the index after the closing quote and whether the
-- string holds escapes, or nil.
-- Measured, string.byte four bytes a step -> FFI eight bytes a step (one run each, 2 shared
-- cores): benchmarks/lua_extract.py, decide() under LuaJIT, "chat 8 MiB, one user message"
-- 14209 -> 2515 us (1.78 -> 0.31 ms per MiB), "chat 8 MiB, CJK text" 29369 -> 6066 us,
-- "messages 1 MiB agent" 3416 -> 1799 us; benchmarks/gateway_cost.py --only-8mib, the
-- filter's share of Envoy CPU for an 8 MiB ASCII first message (body buffering and the
-- getBytes copy included) 12.78 -> 7.27 ms. Sixteen bytes a step was faster on plain text
-- (about 1.2 vs 1.5 ms per 8 MiB) but half again slower on escape-dense agent bodies.
local function scan_string(s, i)
  local p, len = cast(BYTES, s), #s
  local escaped = false
  local j = i -- 0-based index of the byte after the quote
  while true do
    while j + 8 <= len do
      local x = cast(WORDS, p + j)[0] -- unaligned loads: fine on x86-64 and arm64
      local m = band(bor(x - SPACES, bxor(x, QUOTES) - ONES, bxor(x, BACKSLASHES) - ONES), BIT7)
      if m == 0ULL then
        j = j + 8
      else
        j = j + tonumber(rshift(rshift(band(m, -m), 7) * POSITIONS, 56)) -- the first non-PLAIN
        -- Two-byte escapes stay in this loop (tool output in agent bodies has one every ~12
        -- bytes): benchmarks/lua_extract.py "messages 1 MiB agent" 2585 -> 1927 us,
        -- "responses 1 MiB agent" 2245 -> 1800 us; plain text unchanged.
        if p[j] ~= 92 or not SIMPLE[p[j + 1]] then
          break
        end
        escaped = true
        j = j + 2
      end
    end
    local c = p[j]
    while PLAIN[c] do -- only within the body's last 8 bytes
      j = j + 1
      c = p[j]
    end
    if c == 34 then
      return j + 2, escaped
    elseif c == 92 then
      escaped = true
      c = p[j + 1]
      if c == 117 then
        if not (HEX[p[j + 2]] and HEX[p[j + 3]] and HEX[p[j + 4]] and HEX[p[j + 5]]) then
          return nil
        end
        j = j + 6
      elseif SIMPLE_ESCAPES[c] then
        j = j + 2
      else
        return nil
      end
    elseif c >= 128 then
      -- Non-ASCII text is mostly multi-byte characters in a row. The common 3-byte leads
      -- (E1-EC, EE, EF: any two continuation bytes follow) are checked inline, the rest by
      -- scan_utf8: 8 MiB of CJK text took half the time of scan_utf8 for every character.
      repeat
        if c >= 0xE1 and c <= 0xEF and c ~= 0xED and band(p[j + 1], 0xC0) == 0x80
          and band(p[j + 2], 0xC0) == 0x80 then
          j = j + 3
        else
          j = scan_utf8(p, j, c)
          if not j then
            return nil
          end
        end
        c = p[j]
      until c < 128
    else
      return nil -- a raw control character, or the NUL after the body's last byte
    end
  end
end

local function utf8_char(cp)
  if cp < 0x80 then
    return char(cp)
  elseif cp < 0x800 then
    return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
  elseif cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
    0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

-- Decodes the contents of an already validated string literal. Surrogate pairs combine the
-- way Python's json does; a lone surrogate becomes its 3-byte form (Python's
-- .encode("utf-8", "surrogatepass")). With limit, decodes only about that many bytes: every
-- escape yields at least 1 byte per 6 source bytes, so 6 * limit + 12 source bytes suffice
-- and no escape is cut.
local function decode_string(s, first, stop, escaped, limit)
  local last = stop - 2
  if limit then
    last = min(last, first + 6 * limit + 12)
  end
  local raw = sub(s, first + 1, last)
  if not escaped then
    return limit and sub(raw, 1, limit) or raw
  end
  local out, n, size, i = {}, 0, 0, 1
  if not find(raw, "\\", 1, true) then -- `escaped` was only "maybe" (a trusted walk)
    return limit and sub(raw, 1, limit) or raw
  end
  while true do
    local j = find(raw, "\\", i, true)
    if not j then
      out[n + 1] = sub(raw, i)
      break
    end
    n = n + 1
    out[n] = sub(raw, i, j - 1)
    size = size + j - i
    if limit and size >= limit then
      break
    end
    local c = byte(raw, j + 1)
    if c == 117 then
      local cp = tonumber(sub(raw, j + 2, j + 5), 16)
      i = j + 6
      if cp >= 0xD800 and cp < 0xDC00 and byte(raw, i) == 92 and byte(raw, i + 1) == 117 then
        local low = tonumber(sub(raw, i + 2, i + 5), 16)
        if low >= 0xDC00 and low < 0xE000 then
          cp = 0x10000 + (cp - 0xD800) * 1024 + (low - 0xDC00)
          i = i + 6
        end
      end
      n = n + 1
      out[n] = utf8_char(cp)
      size = size + #out[n]
    else
      n = n + 1
      out[n] = SIMPLE_ESCAPES[c]
      size = size + 1
      i = j + 2
    end
  end
  local text = concat(out)
  return limit and sub(text, 1, limit) or text
end

local function skip_digits(s, i)
  while DIGIT[byte(s, i)] do
    i = i + 1
  end
  return i
end

-- -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)? ; returns the index after it, or nil.
local function scan_number(s, i)
  if byte(s, i) == 45 then
    i = i + 1
  end
  local c = byte(s, i)
  if c == 48 then
    i = i + 1
  elseif DIGIT[c] then
    i = skip_digits(s, i + 1)
  else
    return nil
  end
  if byte(s, i) == 46 then
    if not DIGIT[byte(s, i + 1)] then
      return nil
    end
    i = skip_digits(s, i + 2)
  end
  c = byte(s, i)
  if c == 101 or c == 69 then
    i = i + 1
    c = byte(s, i)
    if c == 43 or c == 45 then
      i = i + 1
    end
    if not DIGIT[byte(s, i)] then
      return nil
    end
    i = skip_digits(s, i + 1)
  end
  return i
end

-- i is at a member's opening quote; returns the index of its value (whitespace skipped).
local function scan_member_key(s, i)
  if byte(s, i) ~= 34 then
    return nil
  end
  i = scan_string(s, i)
  if not i then
    return nil
  end
  i = skip_ws(s, i)
  if byte(s, i) ~= 58 then
    return nil
  end
  return skip_ws(s, i + 1)
end

-- Validates one JSON value starting at i (not whitespace); returns the index after it.
-- Iterative, so deep nesting cannot overflow the Lua stack.
local function scan_value(s, i)
  local closers, depth = {}, 0
  while true do
    local c = byte(s, i)
    local opened = false
    if c == 34 then
      i = scan_string(s, i)
    elseif c == 123 or c == 91 then
      local close = c + 2 -- '{' + 2 == '}', '[' + 2 == ']'
      i = skip_ws(s, i + 1)
      if byte(s, i) == close then
        i = i + 1
      elseif depth == MAX_DEPTH then
        return nil
      else
        depth = depth + 1
        closers[depth] = close
        if close == 125 then
          i = scan_member_key(s, i)
        end
        opened = true
      end
    elseif c == 45 or DIGIT[c] then
      i = scan_number(s, i)
    else
      local lit = LITERALS[c]
      if not lit or sub(s, i, i + #lit - 1) ~= lit then
        return nil
      end
      i = i + #lit
    end
    if not i then
      return nil
    end
    -- After a complete value: close containers until a separator asks for the next value.
    while not opened do
      if depth == 0 then
        return i
      end
      i = skip_ws(s, i)
      c = byte(s, i)
      if c == 44 then
        i = skip_ws(s, i + 1)
        if closers[depth] == 125 then
          i = scan_member_key(s, i)
          if not i then
            return nil
          end
        end
        opened = true
      elseif c == closers[depth] then
        depth = depth - 1
        i = i + 1
      else
        return nil
      end
    end
  end
end

-- i is at '{'. Validates the object; returns the spans of the members named in `wanted`
-- (keyed by decoded name, the last duplicate wins as in Python) and the index after it.
-- A string member's span also records whether it holds escapes.
local function scan_object(s, i, wanted)
  local fields = {}
  i = skip_ws(s, i + 1)
  if byte(s, i) == 125 then
    return fields, i + 1
  end
  while true do
    if byte(s, i) ~= 34 then
      return nil
    end
    local key_stop, key_escaped = scan_string(s, i)
    if not key_stop then
      return nil
    end
    local key = decode_string(s, i, key_stop, key_escaped)
    i = skip_ws(s, key_stop)
    if byte(s, i) ~= 58 then
      return nil
    end
    local first, escaped = skip_ws(s, i + 1), nil
    if byte(s, first) == 34 then
      i, escaped = scan_string(s, first)
    else
      i = scan_value(s, first)
    end
    if not i then
      return nil
    end
    if wanted[key] then
      fields[key] = { first, i, escaped }
    end
    i = skip_ws(s, i)
    local c = byte(s, i)
    if c == 125 then
      return fields, i + 1
    end
    if c ~= 44 then
      return nil
    end
    i = skip_ws(s, i + 1)
  end
end

-- The top-level fields each API routes on. M.extract's default is chat's and completions'.
local TOP_FIELDS =
  { model = true, prompt_cache_key = true, user = true, messages = true, prompt = true }
local API_FIELDS = {
  [CHAT] = TOP_FIELDS,
  [COMPLETIONS] = TOP_FIELDS,
  [RESPONSES] =
    { model = true, prompt_cache_key = true, user = true, instructions = true, input = true },
  [MESSAGES] = {
    model = true, prompt_cache_key = true, user = true, metadata = true, system = true,
    messages = true,
  },
}
local MESSAGE_FIELDS = { role = true, content = true }
local ITEM_FIELDS = { type = true, role = true, content = true }
local PART_FIELDS = { type = true, text = true }
local METADATA_FIELDS = { user_id = true }
-- Which content parts count as text; nil: every part with a string `text`.
local RESPONSES_TEXT = { input_text = true, text = true }
local MESSAGES_TEXT = { text = true }

-- Validates the whole body as one JSON object. Returns spans of the top-level fields named in
-- wanted (default: model, prompt_cache_key, user, messages and prompt), or nil and a reason.
function M.extract(body, wanted)
  local i = skip_ws(body, 1)
  if byte(body, i) ~= 123 then
    return nil, "request body must be a JSON object"
  end
  local fields, stop = scan_object(body, i, wanted or TOP_FIELDS)
  if not fields or skip_ws(body, stop) <= #body then
    return nil, "request body is not valid JSON"
  end
  return fields
end

-- The decoded string at span, or nil when the span is absent or not a string.
function M.string_at(body, span, limit)
  if not span or byte(body, span[1]) ~= 34 then
    return nil
  end
  if limit and limit <= 0 then
    return ""
  end
  return decode_string(body, span[1], span[2], span[3], limit)
end

-- Walking an already validated body: strings are skipped with plain find (memchr) for the
-- closing quote, so the walk to the first user message costs little next to validation
-- (8 MiB in about 0.2 ms, against about 1.3 ms for scan_string's FFI word loop: it stays).

-- i is at a validated string's opening quote; returns the index after its closing quote.
local function skip_string(s, i)
  local j = i
  while true do
    j = find(s, '"', j + 1, true)
    local k = j - 1
    while byte(s, k) == 92 do
      k = k - 1
    end
    if (j - k) % 2 == 1 then -- an even number of backslashes before it: the closing quote
      return j + 1
    end
  end
end

-- i is at a validated value; returns the index after it.
local function skip_value(s, i)
  local c = byte(s, i)
  if c == 34 then
    return skip_string(s, i)
  end
  if c ~= 123 and c ~= 91 then -- number or literal: up to the next separator
    while c and c ~= 44 and c ~= 93 and c ~= 125 and not WS[c] do
      i = i + 1
      c = byte(s, i)
    end
    return i
  end
  local depth = 0
  while c do -- (always true on a validated body; the test only bounds the loop)
    if c == 34 then
      i = skip_string(s, i)
    else
      if c == 123 or c == 91 then
        depth = depth + 1
      elseif c == 125 or c == 93 then
        depth = depth - 1
        if depth == 0 then
          return i + 1
        end
      end
      i = i + 1
    end
    c = byte(s, i)
  end
  return i
end

-- scan_object for a validated object at span: the spans of the members named in wanted (the
-- last duplicate wins); string spans say "maybe escaped".
local function object_at(s, span, wanted)
  local fields = {}
  if not span or byte(s, span[1]) ~= 123 then
    return fields
  end
  local i = skip_ws(s, span[1] + 1)
  if byte(s, i) == 125 then
    return fields
  end
  while true do
    local key_stop = skip_string(s, i)
    local key = decode_string(s, i, key_stop, true)
    local first = skip_ws(s, skip_ws(s, key_stop) + 1)
    local stop = skip_value(s, first)
    if wanted[key] then
      fields[key] = { first, stop, true }
    end
    i = skip_ws(s, stop)
    if byte(s, i) == 125 then
      return fields
    end
    i = skip_ws(s, i + 1)
  end
end

-- Elements of a validated array at span: each call returns the next element's span, or nil.
local function elements(s, span)
  local i
  if span and byte(s, span[1]) == 91 then
    i = skip_ws(s, span[1] + 1)
  end
  return function()
    local c = i and byte(s, i)
    if not c or c == 93 then
      return nil
    end
    local stop = skip_value(s, i)
    local element = { i, stop, true }
    i = skip_ws(s, stop)
    if byte(s, i) == 44 then
      i = skip_ws(s, i + 1)
    end
    return element
  end
end

-- Content as text of at most limit bytes: a string as is; for an array of parts, the
-- concatenated `text` of the parts that have one (of a type in `types`, when given), so that
-- re-serialising a turn cannot change it; else "". Decoding stops at the limit.
local function content_text(body, span, limit, types)
  if not span or limit <= 0 then
    return ""
  end
  local c = byte(body, span[1])
  if c == 34 then
    return M.string_at(body, span, limit)
  end
  local texts, n = {}, 0
  for part in elements(body, span) do
    local fields = object_at(body, part, PART_FIELDS)
    if not types or types[M.string_at(body, fields.type) or ""] then
      local text = M.string_at(body, fields.text, limit)
      if text then
        n = n + 1
        texts[n] = text
        limit = limit - #text
        if limit <= 0 then
          break
        end
      end
    end
  end
  return concat(texts)
end

-- The first user message's text, given the system part already kept.
local function first_user_text(body, span, system, types)
  return content_text(body, span, PREFIX_HASH_BYTES - #system, types)
end

-- The stable prefix of a chat: the first system (or developer) message before the first
-- user message, and that user message (both capped, see PREFIX_HASH_BYTES). Appending turns
-- never changes either, and the walk stops at the first user message.
function M.chat_prefix(body, span)
  local system
  for element in elements(body, span) do
    local msg = object_at(body, element, MESSAGE_FIELDS)
    local role = M.string_at(body, msg.role)
    if role == "user" then
      system = system or ""
      return system, first_user_text(body, msg.content, system)
    elseif not system and (role == "system" or role == "developer") then
      system = content_text(body, msg.content, SYSTEM_PREFIX_BYTES)
    end
  end
  return system or "", ""
end

-- Responses: `instructions` (a string) and the first user input: `input` itself when it is a
-- string, else the first item of the `input` array with role "user" and type "message" or
-- none; its content a string or input_text/text parts.
function M.responses_prefix(body, fields)
  local instructions = M.string_at(body, fields.instructions, SYSTEM_PREFIX_BYTES) or ""
  local input = fields.input
  if input and byte(body, input[1]) == 34 then
    return instructions, first_user_text(body, input, instructions)
  end
  for element in elements(body, input) do
    local item = object_at(body, element, ITEM_FIELDS)
    local kind = M.string_at(body, item.type)
    if M.string_at(body, item.role) == "user" and (not item.type or kind == "message") then
      return instructions, first_user_text(body, item.content, instructions, RESPONSES_TEXT)
    end
  end
  return instructions, ""
end

-- Messages: `system` (a string or text blocks) and the first message with role "user"
-- (content a string or blocks, of which only type "text" counts).
function M.messages_prefix(body, fields)
  local system = content_text(body, fields.system, SYSTEM_PREFIX_BYTES, MESSAGES_TEXT)
  for element in elements(body, fields.messages) do
    local msg = object_at(body, element, MESSAGE_FIELDS)
    if M.string_at(body, msg.role) == "user" then
      return system, first_user_text(body, msg.content, system, MESSAGES_TEXT)
    end
  end
  return system, ""
end

-- The first PROMPT_PREFIX_BYTES of a completions prompt: of the string, of the first element
-- when that is a string, else of the prompt's raw JSON (token-id arrays).
function M.prompt_prefix(body, span)
  if not span then
    return ""
  end
  local c = byte(body, span[1])
  if c == 34 then
    return M.string_at(body, span, PROMPT_PREFIX_BYTES)
  end
  if c == 91 then
    local first = skip_ws(body, span[1] + 1)
    if byte(body, first) == 34 then
      local stop, escaped = scan_string(body, first)
      return decode_string(body, first, stop, escaped, PROMPT_PREFIX_BYTES)
    end
  end
  return sub(body, span[1], min(span[2] - 1, span[1] + PROMPT_PREFIX_BYTES - 1))
end

---------------------------------------------------------------------------------------------
-- Hash: 64 bits from two independent 32-bit functions over the same little-endian words:
-- murmur3_x86_32 (seed 0) and XXH32's short-input path (seed 0; equal to XXH32 for inputs
-- under 16 bytes). Whole words are read through an FFI pointer and mixed in uint64_t cdata
-- masked to 32 bits (native integer multiplies); the tail bytes and the finalizers use `bit` on
-- signed 32-bit numbers, where 32x32-bit products are split in 16-bit halves so that every
-- intermediate double stays exact. Words in doubles took 380 us per 64 KiB prefix, 76 us in
-- cdata (lupa's LuaJIT, 200 calls); in Envoy a 100 KiB body without a session header went
-- from 803 to 519 us of Envoy CPU (benchmarks/gateway_cost.py's static filters).

local function mul32(a, hi, lo)
  return tobit(a * lo + tobit(a * hi) * 65536)
end

local function murmur_block(k)
  k = mul32(k, 0xcc9e, 0x2d51)
  return mul32(rol(k, 15), 0x1b87, 0x3593)
end

local U64, U32P = ffi.typeof("uint64_t"), ffi.typeof("const uint32_t *")
local LOW32 = 0xffffffffULL

-- h(s) = "h-" followed by 16 lowercase hex digits; deterministic in every LuaJIT.
function M.hash(s)
  local len = #s
  local words_end = len - len % 4
  -- Written out, no helper calls: the JIT blacklists a small cdata helper whose own traces
  -- keep aborting, and from then on every trace calling it aborts too (seen in Envoy after
  -- many short keys: a 64 KiB hash then took ~50 ms, interpreted).
  -- a: murmur3 (seed 0); b: XXH32, seed + PRIME5 + length.
  local p, a, b = cast(U32P, s), 0ULL, U64((0x165667b1 + len) % 4294967296)
  for k = 0, len / 4 - 1 do -- a fractional limit: the loop stops at the last whole word
    local w = p[k] + 0ULL
    local m = band(w * 0xcc9e2d51ULL, LOW32)
    m = band(band(bor(lshift(m, 15), rshift(m, 17)), LOW32) * 0x1b873593ULL, LOW32)
    a = bxor(a, m)
    a = band(bor(lshift(a, 13), rshift(a, 19)), LOW32)
    a = band(a * 5ULL + 0xe6546b64ULL, LOW32)
    b = band(b + w * 0xc2b2ae3dULL, LOW32)
    b = band(band(bor(lshift(b, 17), rshift(b, 15)), LOW32) * 0x27d4eb2fULL, LOW32)
  end
  local h1, h2, i = tobit(tonumber(a)), tobit(tonumber(b)), words_end + 1
  local tail = 0
  for k = len, i, -1 do
    tail = bor(lshift(tail, 8), byte(s, k))
  end
  for k = i, len do
    h2 = mul32(rol(tobit(h2 + mul32(byte(s, k), 0x1656, 0x67b1)), 11), 0x9e37, 0x79b1)
  end
  if i <= len then
    h1 = bxor(h1, murmur_block(tail))
  end
  h1 = bxor(h1, len)
  h1 = bxor(h1, rshift(h1, 16))
  h1 = mul32(h1, 0x85eb, 0xca6b)
  h1 = bxor(h1, rshift(h1, 13))
  h1 = mul32(h1, 0xc2b2, 0xae35)
  h1 = bxor(h1, rshift(h1, 16))
  h2 = bxor(h2, rshift(h2, 15))
  h2 = mul32(h2, 0x85eb, 0xca77)
  h2 = bxor(h2, rshift(h2, 13))
  h2 = mul32(h2, 0xc2b2, 0xae3d)
  h2 = bxor(h2, rshift(h2, 16))
  return "h-" .. tohex(h1) .. tohex(h2)
end

---------------------------------------------------------------------------------------------
-- Ring position: XXH64 (seed 0) of the session key, the hash Envoy's header hash policy puts
-- on the ring (control_plane/affinity/ring.py mirrors the ring). uint64_t cdata arithmetic
-- wraps modulo 2^64 and `bit` accepts 64-bit cdata; lanes are little-endian loads.

local U64P, U8P = WORDS, BYTES
local X1, X2 = 0x9E3779B185EBCA87ULL, 0xC2B2AE3D27D4EB4FULL
local X3, X4, X5 = 0x165667B19E3779F9ULL, 0x85EBCA77C2B2AE63ULL, 0x27D4EB2F165667C5ULL

local function xround(acc, lane)
  return rol(acc + lane * X2, 31) * X1
end

local function xmerge(acc, v)
  return bxor(acc, xround(0ULL, v)) * X1 + X4
end

-- 16 lowercase hex digits.
function M.ring_hash(s)
  local len = #s
  local p = ffi.cast(U8P, s)
  local i = 0
  local h
  if len >= 32 then
    local v1, v2, v3, v4 = X1 + X2, U64(X2), 0ULL, 0ULL - X1
    while i + 32 <= len do
      v1 = xround(v1, ffi.cast(U64P, p + i)[0])
      v2 = xround(v2, ffi.cast(U64P, p + i + 8)[0])
      v3 = xround(v3, ffi.cast(U64P, p + i + 16)[0])
      v4 = xround(v4, ffi.cast(U64P, p + i + 24)[0])
      i = i + 32
    end
    h = rol(v1, 1) + rol(v2, 7) + rol(v3, 12) + rol(v4, 18)
    h = xmerge(xmerge(xmerge(xmerge(h, v1), v2), v3), v4)
  else
    h = U64(X5)
  end
  h = h + len
  while i + 8 <= len do
    h = rol(bxor(h, xround(0ULL, ffi.cast(U64P, p + i)[0])), 27) * X1 + X4
    i = i + 8
  end
  if i + 4 <= len then
    h = rol(bxor(h, ffi.cast(U32P, p + i)[0] * X1), 23) * X2 + X3
    i = i + 4
  end
  while i < len do
    h = rol(bxor(h, p[i] * X5), 11) * X1
    i = i + 1
  end
  h = bxor(h, rshift(h, 33)) * X2
  h = bxor(h, rshift(h, 29)) * X3
  h = bxor(h, rshift(h, 32))
  return tohex(h)
end

---------------------------------------------------------------------------------------------
-- Session keys.

-- Hash input of a list of strings; length prefixes keep the boundaries unambiguous.
local function hash_fields(list)
  local parts = {}
  for k, v in ipairs(list) do
    parts[k] = #v .. ":" .. v
  end
  return M.hash(concat(parts))
end

-- Client keys that are too long or hold control characters or other binary (non-ASCII)
-- bytes cannot go into a header as is: they are replaced by their hash.
function M.sanitize_key(key)
  if #key > MAX_KEY_BYTES or find(key, "[%z\1-\31\127-\255]") then
    return M.hash(key)
  end
  return key
end

local function present(v)
  return v ~= nil and v ~= ""
end

-- First found: the pool's session header value (header_value, already chosen by decide),
-- body prompt_cache_key, body metadata.user_id (Messages only), body user, else the hash of
-- the stable prefix. Client keys are sanitised (sanitize_key).
function M.session_key(body, fields, path, model, header_value)
  local key = header_value
  if not present(key) then
    key = M.string_at(body, fields.prompt_cache_key)
  end
  if not present(key) and path == MESSAGES then
    key = M.string_at(body, object_at(body, fields.metadata, METADATA_FIELDS).user_id)
  end
  if not present(key) then
    key = M.string_at(body, fields.user)
  end
  if present(key) then
    return M.sanitize_key(key)
  end
  if path == CHAT then
    local system, user = M.chat_prefix(body, fields.messages)
    return hash_fields({ "chat", model, system, user })
  elseif path == RESPONSES then
    local instructions, user = M.responses_prefix(body, fields)
    return hash_fields({ "responses", model, instructions, user })
  elseif path == MESSAGES then
    local system, user = M.messages_prefix(body, fields)
    return hash_fields({ "messages", model, system, user })
  end
  return hash_fields({ "completions", model, M.prompt_prefix(body, fields.prompt) })
end

---------------------------------------------------------------------------------------------
-- Replies and the decision.

local JSON_ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\" }
for c = 0, 31 do
  JSON_ESCAPES[char(c)] = format("\\u%04x", c)
end

local function json_string(s)
  return '"' .. gsub(s, '[%z\1-\31"\\]', JSON_ESCAPES) .. '"'
end

-- Anthropic's error types for the statuses the filter replies with.
local ANTHROPIC_TYPES = {
  [400] = "invalid_request_error", [404] = "not_found_error", [413] = "request_too_large",
  [503] = "overloaded_error",
}

-- OpenAI-shaped {"error":{"message","type","code"}}; on /v1/messages Anthropic-shaped
-- {"type":"error","error":{"type","message"}} (code is then only in the returned table).
local function error_reply(path, status, code, message)
  if path == MESSAGES then
    local err_type = ANTHROPIC_TYPES[status] or "api_error"
    return {
      status = status,
      type = err_type,
      code = code,
      message = message,
      json = '{"type":"error","error":{"type":' .. json_string(err_type) .. ',"message":'
        .. json_string(message) .. "}}",
    }
  end
  local err_type = status >= 500 and "server_error" or "invalid_request_error"
  return {
    status = status,
    type = err_type,
    code = code,
    message = message,
    json = '{"error":{"message":' .. json_string(message) .. ',"type":' .. json_string(err_type)
      .. ',"code":' .. json_string(code) .. "}}",
  }
end

local function strip_query(path)
  local q = find(path, "?", 1, true)
  return q and sub(path, 1, q - 1) or path
end

-- Whether the filter must buffer the request body for decide().
function M.needs_body(method, path)
  path = strip_query(path or "")
  return method == "POST" and API_FIELDS[path] ~= nil
end

-- The value of the first of the pool's session headers that the request carries (non-empty):
-- entry.session_headers (a list) when it has any, else entry.session_header (one name).
local function session_header_value(entry, get_header)
  local names = entry.session_headers
  if type(names) ~= "table" or names[1] == nil then
    names = { entry.session_header }
  end
  for _, name in ipairs(names) do
    local value = get_header(name)
    if present(value) then
      return value
    end
  end
  return nil
end

---------------------------------------------------------------------------------------------
-- Splits (docs/splits.md). A split's route metadata carries its slot table (one hex digit,
-- the arm index, per slot), each arm's pool and served model; the session's slot is the low
-- 32 bits of HOTPATH.hash(session key) (its last 8 hex digits) mod the table's length, which
-- the control plane computes the same way from the access log's session_hash.

-- The route key of a split's arm: model names hold no control characters, so a tab cannot
-- collide with a real model (decide refuses client models that hold one).
local ARM_SEPARATOR = "\t"

function M.slot(hash, slots)
  return tonumber(sub(hash, 11, 18), 16) % slots
end

-- The arm index (0-based) of the session with this hash, or nil when the table is empty
-- (no arm left).
function M.split_arm(slots, hash)
  local n = #slots
  if n == 0 then
    return nil
  end
  local s = M.slot(hash, n) + 1
  return tonumber(sub(slots, s, s), 16)
end

function M.arm_route(model, arm)
  return model .. ARM_SEPARATOR .. arm
end

-- The body with the value of `model` (span: its string literal) replaced by `served`.
function M.replace_model(body, span, served)
  return sub(body, 1, span[1] - 1) .. json_string(served) .. sub(body, span[2])
end

local function split_decision(path, body, fields, model, entry, get_header, reroute)
  local session = M.session_key(body, fields, path, model, session_header_value(entry, get_header))
  local hash = M.hash(session)
  local arm = M.split_arm(entry.slots, hash)
  if not arm then
    return error_reply(path, 503, "no_healthy_upstream",
      "no arm of the split serving `" .. model .. "` is left (every arm's pool was deleted)")
  end
  local route = M.arm_route(model, arm)
  if reroute then
    reroute(route)
  end
  local served = entry.served_models and entry.served_models[arm + 1] or model
  local result = {
    model = route,
    pool = entry.arm_pools and entry.arm_pools[arm + 1],
    session = session,
    session_hash = hash,
    split = model,
    arm = arm,
  }
  if served ~= model then
    result.body = M.replace_model(body, fields.model, served)
  end
  return result
end

-- Returns nil to pass the request through untouched; {status, json, ...} for a local reply
-- (errors also carry type, code and message); or {model, pool, session} to route.
-- get_header(name) returns a request header's value or nil; lookup(model) returns the
-- model's {pool, session_headers (list), session_header} or nil when no pool serves it. (In
-- Envoy the lookup reads the route's metadata, so pool changes arrive over RDS and the
-- listener never changes.) A split's entry has `slots`, `arm_pools`, `served_models` and its
-- session headers instead of `pool`: the result then also has `split`, `arm`, `session_hash`
-- and `body` (the rewritten body, only when the arm's served model differs), and
-- reroute(route key) is called to point the model header at the arm's route.
function M.decide(config, method, path, get_header, body, lookup, reroute)
  path = strip_query(path or "")
  if not M.needs_body(method, path) then
    return nil
  end
  body = body or ""
  if #body > config.max_body_bytes then
    return error_reply(path, 413, "request_too_large",
      "request body is over the limit of " .. config.max_body_bytes .. " bytes")
  end
  local fields, why = M.extract(body, API_FIELDS[path])
  if not fields then
    return error_reply(path, 400, "invalid_json", why)
  end
  local model = M.string_at(body, fields.model)
  if not present(model) then
    return error_reply(path, 400, "missing_model", "request body has no string field `model`")
  end
  -- No model name holds a tab (pools and splits refuse control characters): refusing it
  -- keeps arm route keys (model .. "\t" .. arm) from being addressed by clients.
  local entry = not find(model, ARM_SEPARATOR, 1, true) and lookup(model)
  if not entry then
    return error_reply(path, 404, "model_not_found", "The model `" .. model .. "` does not exist")
  end
  if entry.slots then
    return split_decision(path, body, fields, model, entry, get_header, reroute)
  end
  return {
    model = model,
    pool = entry.pool,
    session = M.session_key(body, fields, path, model, session_header_value(entry, get_header)),
  }
end

return M
