"""lua/hotpath.lua and lua/filter.lua for agent APIs: OpenAI Responses and Anthropic Messages.

Session keys (session headers, prompt_cache_key, metadata.user_id, user, prefix hash), the
64 KiB cap on hashed prefix text, Anthropic-shaped errors, and the filter's configurable
names. The Lua files are read straight from the checkout and run under LuaJIT (as in Envoy).
"""

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lupa import luajit21

LUA_DIR = Path(__file__).resolve().parents[2] / "lua"
CHAT, COMPLETIONS = b"/v1/chat/completions", b"/v1/completions"
RESPONSES, MESSAGES = b"/v1/responses", b"/v1/messages"
PREFIX_HASH_BYTES, SYSTEM_PREFIX_BYTES = 65536, 32768

_lua = luajit21.LuaRuntime(encoding=None)
M = _lua.execute((LUA_DIR / "hotpath.lua").read_bytes())
CONFIG = _lua.execute(
    b"""return {
      max_body_bytes = 16 * 1024 * 1024,
      model_header = "x-hotpath-model",
      session_header_internal = "x-hotpath-session",
      lua_reply_header = "x-hotpath-lua-reply",
      metadata_namespace = "envoy.filters.http.lua",
    }"""
)
# What the route metadata says in Envoy: model -> {pool, session_headers, session_header}.
ROUTES_LUA = b"""{
  ["agent-a"] = {pool = "pool-a", session_headers = {"x-session-id", "x-claude-session"}},
  ["legacy"] = {pool = "pool-b", session_header = "x-conv"},
  ["both"] = {pool = "pool-c", session_header = "x-old", session_headers = {"x-new"}},
  ["empty-list"] = {pool = "pool-d", session_header = "x-old", session_headers = {}},
}"""
ROUTES = _lua.execute(b"return " + ROUTES_LUA)


def decide(
    path: bytes, body: bytes | None, headers: dict[bytes, bytes] | None = None
) -> dict[str, Any] | None:
    hdrs = headers or {}
    result = M.decide(CONFIG, b"POST", path, lambda name: hdrs.get(name), body, lambda m: ROUTES[m])
    return None if result is None else {k.decode(): v for k, v in result.items()}


def session(path: bytes, doc: Any, headers: dict[bytes, bytes] | None = None) -> bytes:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    result = decide(path, body, headers)
    assert result is not None and "session" in result, result
    key: bytes = result["session"]
    return key


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def prefix_key(api: str, model: str, system: str | bytes, user: str | bytes) -> bytes:
    """The hash of length-prefixed (api, model, system, user), as lua/hotpath.lua builds it."""
    parts = [p if isinstance(p, bytes) else enc(p) for p in (api, model, system, user)]
    key: bytes = M.hash(b"".join(b"%d:%s" % (len(p), p) for p in parts))
    return key


# --- a Python reference of the rules -----------------------------------------------------


def text_of(content: Any, types: frozenset[str] | None) -> bytes:
    if isinstance(content, str):
        return enc(content)
    if not isinstance(content, list):
        return b""
    out = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            continue
        kind = part.get("type")
        if types is None or (isinstance(kind, str) and kind in types):
            out.append(enc(part["text"]))
    return b"".join(out)


RESPONSES_TEXT = frozenset({"input_text", "text"})
MESSAGES_TEXT = frozenset({"text"})


def capped(system: bytes, user: bytes) -> tuple[bytes, bytes]:
    system = system[:SYSTEM_PREFIX_BYTES]
    return system, user[: PREFIX_HASH_BYTES - len(system)]


def ref_prefix(path: bytes, doc: dict[str, Any]) -> tuple[bytes, bytes]:
    if path == CHAT:
        system: bytes | None = None
        for msg in doc.get("messages") if isinstance(doc.get("messages"), list) else []:
            role = msg.get("role") if isinstance(msg, dict) else None
            if role == "user":
                return capped(system or b"", text_of(msg.get("content"), None))
            if system is None and role in ("system", "developer"):
                system = text_of(msg.get("content"), None)[:SYSTEM_PREFIX_BYTES]
        return system or b"", b""
    if path == RESPONSES:
        instructions = doc.get("instructions")
        system = enc(instructions) if isinstance(instructions, str) else b""
        items = doc.get("input")
        if isinstance(items, str):
            return capped(system, enc(items))
        for item in items if isinstance(items, list) else []:
            if (
                isinstance(item, dict)
                and item.get("role") == "user"
                and ("type" not in item or item["type"] == "message")
            ):
                return capped(system, text_of(item.get("content"), RESPONSES_TEXT))
        return capped(system, b"")
    assert path == MESSAGES
    system = text_of(doc.get("system"), MESSAGES_TEXT)
    for msg in doc.get("messages") if isinstance(doc.get("messages"), list) else []:
        if isinstance(msg, dict) and msg.get("role") == "user":
            return capped(system, text_of(msg.get("content"), MESSAGES_TEXT))
    return capped(system, b"")


def sanitize(key: bytes) -> bytes:
    if len(key) > 256 or any(b < 32 or b >= 127 for b in key):
        hashed: bytes = M.hash(key)
        return hashed
    return key


def ref_session(path: bytes, doc: dict[str, Any], header: bytes | None = None) -> bytes:
    def text(value: Any) -> bytes | None:
        return enc(value) if isinstance(value, str) and value else None

    metadata = doc.get("metadata")
    candidates = [
        header or None,
        text(doc.get("prompt_cache_key")),
        text(metadata.get("user_id")) if path == MESSAGES and isinstance(metadata, dict) else None,
        text(doc.get("user")),
    ]
    for key in candidates:
        if key:
            return sanitize(key)
    api = {CHAT: "chat", RESPONSES: "responses", MESSAGES: "messages"}[path]
    return prefix_key(api, doc["model"], *ref_prefix(path, doc))


# --- routing and session-key order --------------------------------------------------------


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES, RESPONSES + b"?x=1"])
def test_new_paths_need_the_body_and_route(path: bytes) -> None:
    assert M.needs_body(b"POST", path) is True
    assert M.needs_body(b"GET", path) is False
    result = decide(path, b'{"model":"agent-a","input":"hi","messages":[]}')
    assert result is not None and (result["model"], result["pool"]) == (b"agent-a", b"pool-a")


@pytest.mark.parametrize(
    "path", [b"/v1/responses/resp_1", b"/v1/messages/count_tokens", b"/v1/response"]
)
def test_other_paths_pass_through(path: bytes) -> None:
    assert M.needs_body(b"POST", path) is False
    assert decide(path, b'{"model":"agent-a"}') is None


FULL = {
    "model": "agent-a",
    "prompt_cache_key": "pck",
    "metadata": {"user_id": "uid"},
    "user": "usr",
    "input": "hi",
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES])
def test_first_listed_session_header_present_wins(path: bytes) -> None:
    both = {b"x-session-id": b"first", b"x-claude-session": b"second"}
    assert session(path, FULL, both) == b"first"
    assert session(path, FULL, {b"x-claude-session": b"second"}) == b"second"
    empty = {b"x-session-id": b"", b"x-claude-session": b"second"}
    assert session(path, FULL, empty) == b"second"
    assert session(path, FULL, {b"x-other": b"o"}) == b"pck"


def test_session_header_single_form_and_precedence() -> None:
    legacy = {**FULL, "model": "legacy"}
    assert session(MESSAGES, legacy, {b"x-conv": b"c"}) == b"c"
    assert session(MESSAGES, legacy, {b"x-session-id": b"c"}) == b"pck"
    both = {**FULL, "model": "both"}
    assert session(RESPONSES, both, {b"x-old": b"old", b"x-new": b"new"}) == b"new"
    assert session(RESPONSES, both, {b"x-old": b"old"}) == b"pck"
    # An empty list is no list: the single form applies.
    empty = {**FULL, "model": "empty-list"}
    assert session(RESPONSES, empty, {b"x-old": b"old"}) == b"old"


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_prompt_cache_key_wins_over_the_body_rest(path: bytes) -> None:
    assert session(path, FULL) == b"pck"
    assert session(path, {**FULL, "prompt_cache_key": ""}) == (
        b"uid" if path == MESSAGES else b"usr"
    )


def test_metadata_user_id_counts_only_for_messages() -> None:
    doc = {**FULL, "prompt_cache_key": None}
    assert session(MESSAGES, doc) == b"uid"
    assert session(RESPONSES, doc) == b"usr"
    assert session(CHAT, doc) == b"usr"
    for metadata in [{"user_id": ""}, {"user_id": 5}, {"other": "x"}, "uid", ["uid"], None]:
        assert session(MESSAGES, {**doc, "metadata": metadata}) == b"usr"
    nested = {**doc, "metadata": {"x": [{"user_id": "no"}], "user_id": "u\u00e9"}}
    assert session(MESSAGES, nested) == ref_hash_of(enc("u\u00e9"))


def ref_hash_of(data: bytes) -> bytes:
    key: bytes = M.hash(data)
    return key


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_user_then_prefix(path: bytes) -> None:
    doc = {"model": "agent-a", "user": "usr", "input": "hi", "messages": FULL["messages"]}
    assert session(path, doc) == b"usr"
    del doc["user"]
    api = "responses" if path == RESPONSES else "messages"
    assert session(path, doc) == prefix_key(api, "agent-a", "", "hi")


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
@pytest.mark.parametrize("field", ["prompt_cache_key", "user", "metadata"])
@pytest.mark.parametrize("key", ["x" * 257, "tab\there", "caf\u00e9", "k" * 256])
def test_client_keys_are_sanitised_from_every_source(path: bytes, field: str, key: str) -> None:
    if field == "metadata" and path != MESSAGES:
        return
    value: Any = {"user_id": key} if field == "metadata" else key
    doc = {"model": "agent-a", field: value, "input": "hi"}
    assert session(path, doc) == sanitize(enc(key))
    assert session(path, {"model": "agent-a"}, {b"x-claude-session": enc(key)}) == sanitize(
        enc(key)
    )


# --- prefix hash: Responses ----------------------------------------------------------------


def test_responses_string_input_is_the_first_user_input() -> None:
    doc = {"model": "agent-a", "instructions": "be brief", "input": "question"}
    assert session(RESPONSES, doc) == prefix_key("responses", "agent-a", "be brief", "question")


def test_responses_array_input_takes_the_first_user_message_item() -> None:
    items = [
        {"type": "message", "role": "developer", "content": "dev"},
        {"type": "function_call_output", "role": "user", "call_id": "c", "output": "no"},
        "junk",
        {"type": "message", "role": "assistant", "content": "no"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look at "},
                {"type": "input_image", "image_url": "data:...", "text": "no"},
                {"type": "text", "text": "this"},
            ],
        },
        {"role": "user", "content": "second"},
    ]
    doc = {"model": "agent-a", "instructions": "sys", "input": items}
    assert session(RESPONSES, doc) == prefix_key("responses", "agent-a", "sys", "look at this")
    # No type means a message too; a non-string instructions counts as none.
    doc = {"model": "agent-a", "instructions": ["x"], "input": [{"role": "user", "content": "q"}]}
    assert session(RESPONSES, doc) == prefix_key("responses", "agent-a", "", "q")


# --- prefix hash: Messages -----------------------------------------------------------------


def test_messages_system_string_and_blocks() -> None:
    messages = [{"role": "user", "content": "question"}]
    as_string = {"model": "agent-a", "system": "you are claude", "messages": messages}
    blocks = [
        {"type": "text", "text": "you are "},
        {"type": "image", "source": {}, "text": "no"},
        {"type": "text", "text": "claude", "cache_control": {"type": "ephemeral"}},
    ]
    as_blocks = {**as_string, "system": blocks}
    expected = prefix_key("messages", "agent-a", "you are claude", "question")
    assert session(MESSAGES, as_string) == session(MESSAGES, as_blocks) == expected


def test_messages_first_user_content_blocks_count_only_text() -> None:
    messages = [
        {"role": "assistant", "content": "prefill"},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": "no", "text": "no"},
                {"type": "text", "text": "hello "},
                {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                {"type": "text", "text": "world"},
            ],
        },
        {"role": "user", "content": "later"},
    ]
    doc = {"model": "agent-a", "messages": messages}
    assert session(MESSAGES, doc) == prefix_key("messages", "agent-a", "", "hello world")


TOOLS = [
    {
        "name": f"tool_{i}",
        "description": "does things " * 20,
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
    for i in range(5)
]


def agent_turns(path: bytes, first: str, turns: int, seed: str) -> list[bytes]:
    """Bodies of successive agent turns: each resends the whole history plus one exchange."""
    bodies = []
    if path == MESSAGES:
        history: list[dict[str, Any]] = [{"role": "user", "content": first}]
    else:
        history = [{"type": "message", "role": "user", "content": first}]
    for turn in range(turns):
        if path == MESSAGES:
            doc: dict[str, Any] = {
                "model": "agent-a",
                "system": [{"type": "text", "text": "agent system \u4e2d"}],
                "tools": TOOLS,
                "messages": history,
                "max_tokens": 1024,
            }
        else:
            doc = {
                "model": "agent-a",
                "instructions": "agent system \u4e2d",
                "tools": TOOLS,
                "input": history,
                "store": False,
            }
        # Clients re-serialise every turn; the key must not depend on the bytes chosen.
        bodies.append(json.dumps(doc, ensure_ascii=turn % 2 == 0, indent=turn % 3 or None).encode())
        if path == MESSAGES:
            history = history + [
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": f"t{turn}",
                            "name": "tool_1",
                            "input": {"path": seed},
                        }
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": f"t{turn}",
                            "content": f"result {turn} \u00e9 {seed}" * 50,
                        }
                    ],
                },
            ]
        else:
            history = history + [
                {
                    "type": "function_call",
                    "call_id": f"c{turn}",
                    "name": "tool_1",
                    "arguments": json.dumps({"path": seed}),
                },
                {
                    "type": "function_call_output",
                    "call_id": f"c{turn}",
                    "output": f"result {turn} \u00e9 {seed}" * 50,
                },
                {"type": "message", "role": "user", "content": f"next {turn}"},
            ]
    return bodies


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_every_turn_of_an_agent_session_keeps_its_key(path: bytes) -> None:
    keys = {session(path, body) for body in agent_turns(path, "fix the bug", 5, "a")}
    api = "responses" if path == RESPONSES else "messages"
    assert keys == {prefix_key(api, "agent-a", "agent system \u4e2d", "fix the bug")}


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_different_first_messages_get_different_keys(path: bytes) -> None:
    keys = {session(path, agent_turns(path, f"task {i}", 1, "a")[0]) for i in range(20)}
    assert len(keys) == 20


def test_apis_do_not_share_prefix_keys() -> None:
    chat = {"model": "agent-a", "messages": [{"role": "user", "content": "q"}]}
    keys = {
        session(CHAT, chat),
        session(MESSAGES, chat),
        session(RESPONSES, {**chat, "input": "q"}),
    }
    assert len(keys) == 3


def test_previous_response_id_alone_does_not_change_the_rules() -> None:
    # A chained request sends only the new input: its prefix differs from the first turn's.
    first = {"model": "agent-a", "instructions": "s", "input": "start"}
    chained = {**first, "input": "next", "previous_response_id": "resp_1"}
    assert session(RESPONSES, chained) == prefix_key("responses", "agent-a", "s", "next")
    assert session(RESPONSES, {**chained, "prompt_cache_key": "k"}) == b"k"


# --- the 64 KiB cap ------------------------------------------------------------------------


def cap_doc(path: bytes, system: str, user: str) -> dict[str, Any]:
    if path == CHAT:
        return {
            "model": "agent-a",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
    if path == RESPONSES:
        return {
            "model": "agent-a",
            "instructions": system,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": user}]}],
        }
    return {
        "model": "agent-a",
        "system": [{"type": "text", "text": system}],
        "messages": [{"role": "user", "content": user}],
    }


@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES])
@pytest.mark.parametrize("system_len", [0, 100, SYSTEM_PREFIX_BYTES + 10])
def test_first_user_text_is_cut_at_the_rest_of_64_kib(path: bytes, system_len: int) -> None:
    system = "s" * system_len
    budget = PREFIX_HASH_BYTES - min(system_len, SYSTEM_PREFIX_BYTES)
    base = "u" * (budget + 100)

    def key(user: str) -> bytes:
        return session(path, cap_doc(path, system, user))

    assert key(base) == key(base[:budget] + "different tail")
    assert key(base) != key(base[: budget - 1] + "X" + base[budget:])
    api = {CHAT: "chat", RESPONSES: "responses", MESSAGES: "messages"}[path]
    assert key(base) == prefix_key(api, "agent-a", system[:SYSTEM_PREFIX_BYTES], base[:budget])


@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES])
def test_system_text_is_cut_at_32_kib(path: bytes) -> None:
    system = "s" * (SYSTEM_PREFIX_BYTES + 50)

    def key(system: str, user: str = "q") -> bytes:
        return session(path, cap_doc(path, system, user))

    assert key(system) == key(system[:SYSTEM_PREFIX_BYTES] + "tail")
    assert key(system) != key(
        system[: SYSTEM_PREFIX_BYTES - 1] + "X" + system[SYSTEM_PREFIX_BYTES:]
    )
    # Past the system cut the first user message still tells sessions apart.
    assert key(system, "a") != key(system, "b")


def test_cap_counts_joined_parts_and_decoded_bytes() -> None:
    # Parts are joined before the cut; escapes (\u00e9: 2 bytes, \n: 1) count decoded.
    parts = [{"type": "text", "text": "\u00e9\n" * 15000} for _ in range(3)]
    doc = {"model": "agent-a", "system": "sys", "messages": [{"role": "user", "content": parts}]}
    joined = enc("\u00e9\n" * 45000)
    for ascii_only in (True, False):
        body = json.dumps(doc, ensure_ascii=ascii_only).encode()
        assert session(MESSAGES, body) == prefix_key(
            "messages", "agent-a", "sys", joined[: PREFIX_HASH_BYTES - 3]
        )


def test_huge_single_first_message_hashes_only_its_start() -> None:
    body = json.dumps(
        {"model": "agent-a", "messages": [{"role": "user", "content": "y" * (8 << 20)}]}
    ).encode()
    assert session(MESSAGES, body) == prefix_key("messages", "agent-a", "", "y" * PREFIX_HASH_BYTES)
    assert session(CHAT, body) == prefix_key("chat", "agent-a", "", "y" * PREFIX_HASH_BYTES)


# --- errors --------------------------------------------------------------------------------

BAD = [
    (b"not json", 400, "invalid_request_error"),
    (None, 400, "invalid_request_error"),
    (b'{"messages":[]}', 400, "invalid_request_error"),
    (b'{"model":"nope\\n\\"x\\""}', 404, "not_found_error"),
    (b'{"model":"agent-a","pad":"' + b"x" * (16 << 20) + b'"}', 413, "request_too_large"),
]


@pytest.mark.parametrize(("body", "status", "err_type"), BAD)
def test_messages_errors_are_anthropic_shaped(
    body: bytes | None, status: int, err_type: str
) -> None:
    result = decide(MESSAGES + b"?beta=true", body)
    assert result is not None and result["status"] == status
    doc = json.loads(result["json"])
    assert set(doc) == {"type", "error"} and doc["type"] == "error"
    assert set(doc["error"]) == {"type", "message"}
    assert doc["error"]["type"] == err_type == result["type"].decode()
    assert doc["error"]["message"].encode() == result["message"]
    if status == 404:
        assert 'nope\n"x"' in doc["error"]["message"]


@pytest.mark.parametrize(("body", "status", "_"), BAD)
@pytest.mark.parametrize("path", [RESPONSES, CHAT])
def test_other_errors_stay_openai_shaped(
    path: bytes, body: bytes | None, status: int, _: str
) -> None:
    result = decide(path, body)
    assert result is not None and result["status"] == status
    doc = json.loads(result["json"])
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "code"}
    assert doc["error"]["type"] == "invalid_request_error"
    code = {
        400: ("invalid_json", "missing_model"),
        404: ("model_not_found",),
        413: ("request_too_large",),
    }[status]
    assert doc["error"]["code"] in code


# --- properties: Lua against Python's json -------------------------------------------------

WHITESPACE = ["", "", " ", "\n", "\t"]


def encode_string(text: str, rnd: random.Random) -> str:
    """A JSON string literal choosing per character between raw and escaped forms."""
    if rnd.random() < 0.3:
        # A lone surrogate only as an escape: raw, it is not UTF-8 (the body would be invalid).
        lone = any(0xD800 <= ord(ch) < 0xE000 for ch in text)
        return json.dumps(text, ensure_ascii=lone or rnd.random() < 0.5)
    out = []
    for ch in text:
        cp = ord(ch)
        raw_ok = cp >= 0x20 and ch not in '"\\' and not 0xD800 <= cp < 0xE000
        if raw_ok and rnd.random() < 0.6:
            out.append(ch)
        elif cp >= 0x10000:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(json.dumps(ch)[1:-1] if rnd.random() < 0.5 else f"\\u{cp:04x}")
    return '"' + "".join(out) + '"'


def serialise(value: Any, rnd: random.Random) -> str:
    def ws() -> str:
        return rnd.choice(WHITESPACE)

    if isinstance(value, str):
        return encode_string(value, rnd)
    if isinstance(value, dict):
        body = ",".join(
            f"{ws()}{encode_string(k, rnd)}{ws()}:{ws()}{serialise(v, rnd)}{ws()}"
            for k, v in value.items()
        )
        return "{" + (body or ws()) + "}"
    if isinstance(value, list):
        return "[" + (",".join(f"{ws()}{serialise(v, rnd)}{ws()}" for v in value) or ws()) + "]"
    return json.dumps(value)


texts = st.text(max_size=12) | st.text(st.characters(codec=None, exclude_categories=()), max_size=6)
scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | texts
kinds = st.sampled_from(["text", "input_text", "image", "tool_result", "message", ""]) | scalars
part = st.fixed_dictionaries({}, optional={"type": kinds, "text": texts | scalars, "x": scalars})
content = texts | st.lists(part | scalars, max_size=4) | scalars
roles = st.sampled_from(["user", "system", "developer", "assistant"]) | scalars
message = st.fixed_dictionaries(
    {}, optional={"role": roles, "content": content, "type": kinds, "model": texts}
)
documents = st.fixed_dictionaries(
    {"model": st.just("agent-a")},
    optional={
        "prompt_cache_key": texts | scalars,
        "user": texts | scalars,
        "metadata": st.fixed_dictionaries({}, optional={"user_id": texts | scalars}) | scalars,
        "instructions": texts | scalars,
        "system": content,
        "input": texts | st.lists(message | scalars, max_size=4),
        "messages": st.lists(message | scalars, max_size=4) | scalars,
        "tools": st.lists(st.dictionaries(texts, scalars, max_size=3), max_size=2),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    documents,
    st.sampled_from([CHAT, RESPONSES, MESSAGES]),
    st.none() | st.text(max_size=8),
    st.integers(0, 2**32),
)
def test_session_keys_match_the_python_reference(
    doc: dict[str, Any], path: bytes, header: str | None, seed: int
) -> None:
    body = serialise(doc, random.Random(seed)).encode("utf-8", "surrogatepass")
    hdr = {b"x-claude-session": enc(header)} if header is not None else {}
    assert session(path, body, hdr) == ref_session(path, doc, enc(header) if header else None)


_prefix = _lua.eval(
    b"""function(M, body, path)
      local fields = M.extract(body, {instructions = true, input = true, system = true,
                                      messages = true})
      if path == "/v1/responses" then return M.responses_prefix(body, fields) end
      if path == "/v1/messages" then return M.messages_prefix(body, fields) end
      return M.chat_prefix(body, fields.messages)
    end"""
)

big_texts = st.builds(lambda t, n: t * n, st.text(min_size=1, max_size=4), st.integers(1, 20000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([CHAT, RESPONSES, MESSAGES]),
    big_texts,
    st.lists(big_texts, min_size=1, max_size=3),
    st.integers(0, 2**32),
)
def test_capped_prefix_matches_python_near_the_cut(
    path: bytes, system: str, user_parts: list[str], seed: int
) -> None:
    # Long texts of every escape width, so the cuts land inside escapes and characters.
    parts = [{"type": "text", "text": t} for t in user_parts]
    if path == CHAT:
        doc: dict[str, Any] = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": parts}]
        }
    elif path == RESPONSES:
        doc = {"instructions": system, "input": [{"role": "user", "content": parts}]}
    else:
        doc = {"system": system, "messages": [{"role": "user", "content": parts}]}
    body = serialise({"model": "agent-a", **doc}, random.Random(seed)).encode(
        "utf-8", "surrogatepass"
    )
    assert tuple(_prefix(M, body, path)) == ref_prefix(path, doc)


# --- lua/filter.lua with configured names --------------------------------------------------

FAKE_ENVOY = b"""
function fake_handle(headers, body, metadata, routes)
  local state = {headers = headers, metadata = metadata}
  local map = {}
  function map:get(name) return state.headers[string.lower(name)] end
  function map:remove(name) state.headers[string.lower(name)] = nil end
  function map:replace(name, value) state.headers[string.lower(name)] = value end
  local handle = {}
  function handle:headers() return map end
  function handle:metadata()
    local route = routes and routes[state.headers["x-m"] or ""] or {}
    return {get = function(_, key) return route[key] end}
  end
  function handle:body()
    if body == nil then return nil end
    return {length = function() return #body end,
            getBytes = function(_, start, n) return string.sub(body, start + 1, start + n) end}
  end
  function handle:respond(h, b) state.reply = {headers = h, body = b} end
  function handle:clearRouteCache() end
  function handle:streamInfo()
    return {dynamicMetadata = function()
      return {set = function(_, ns, key, value)
                metadata[ns] = metadata[ns] or {}; metadata[ns][key] = value end,
              get = function(_, ns) return metadata[ns] end}
    end}
  end
  return handle, state
end
"""


@pytest.fixture(scope="module")
def filter_lua() -> Any:
    lua = luajit21.LuaRuntime(encoding=None)
    lua.execute(b"HOTPATH = (function()\n" + (LUA_DIR / "hotpath.lua").read_bytes() + b"\nend)()")
    lua.execute(
        b"""HOTPATH_CONFIG = {max_body_bytes = 1048576, model_header = "x-m",
             session_header_internal = "x-s", lua_reply_header = "x-r",
             metadata_namespace = "ns"}"""
    )
    lua.execute((LUA_DIR / "filter.lua").read_bytes())
    lua.execute(FAKE_ENVOY)
    lua.execute(b"ROUTES = " + ROUTES_LUA)
    return lua


def run_filter(lua: Any, headers: dict[str, str], body: bytes | None) -> tuple[Any, Any, Any]:
    g = lua.globals()
    hdrs = lua.table_from({k.encode(): v.encode() for k, v in headers.items()})
    metadata = lua.table()
    handle, state = g.fake_handle(hdrs, body, metadata, g.ROUTES)
    g.envoy_on_request(handle)
    assert g.envoy_on_response is None  # the echo is a route response header (routes.py)
    return state, g.HOTPATH.hash, metadata


def test_filter_uses_the_configured_names(filter_lua: Any) -> None:
    base = {":method": "POST", ":path": "/v1/messages", "x-m": "forged", "x-s": "forged"}
    body = b'{"model":"agent-a","messages":[]}'
    state, hash_, metadata = run_filter(filter_lua, {**base, "x-claude-session": "c"}, body)
    headers = state[b"headers"]
    assert (headers[b"x-m"], headers[b"x-s"]) == (b"agent-a", b"c")
    assert metadata[b"ns"][b"session_hash"] == hash_(b"c") and metadata[b"ns"][b"session"] is None

    state, _, _ = run_filter(filter_lua, {**base, "x-r": "forged"}, b'{"model":"nope"}')
    reply = state[b"reply"]
    assert reply[b"headers"][b":status"] == b"404"
    assert json.loads(reply[b"body"])["error"]["type"] == "not_found_error"
    assert state[b"headers"][b"x-r"] == b"1" and state[b"headers"][b"x-m"] is None


def test_filter_falls_back_to_the_default_names() -> None:
    lua = luajit21.LuaRuntime(encoding=None)
    lua.execute(b"HOTPATH = (function()\n" + (LUA_DIR / "hotpath.lua").read_bytes() + b"\nend)()")
    lua.execute(b"HOTPATH_CONFIG = {max_body_bytes = 1048576}")
    lua.execute((LUA_DIR / "filter.lua").read_bytes())
    lua.execute(FAKE_ENVOY.replace(b'"x-m"', b'"x-hotpath-model"'))
    lua.execute(b"ROUTES = " + ROUTES_LUA)
    headers = {":method": "POST", ":path": "/v1/responses", "x-session-id": "s"}
    state, hash_, metadata = run_filter(lua, headers, b'{"model":"agent-a","input":"q"}')
    assert state[b"headers"][b"x-hotpath-model"] == b"agent-a"
    assert state[b"headers"][b"x-hotpath-session"] == b"s"
    assert metadata[b"envoy.filters.http.lua"][b"session_hash"] == hash_(b"s")
