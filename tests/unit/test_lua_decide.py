"""lua/hotpath.lua's decide(): statuses, session keys and the hash."""

import json
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lupa import luajit21

from control_plane.translate.lua import lua_asset, lua_literal

CHAT, COMPLETIONS = b"/v1/chat/completions", b"/v1/completions"

_lua = luajit21.LuaRuntime(encoding=None)
M = _lua.execute(lua_asset("hotpath.lua").encode())
CONFIG = _lua.execute(("return " + lua_literal({"max_body_bytes": 65536})).encode())
# What the route metadata says in Envoy: model -> {pool, session_header}.
ROUTES = _lua.execute(
    (
        "return "
        + lua_literal(
            {
                "chat-a": {"pool": "pool-a", "session_header": "x-session-id"},
                "chat-b": {"pool": "pool-b", "session_header": "x-conv"},
                'we"ird\n\u00e9': {"pool": "pool-b", "session_header": "x-session-id"},
            }
        )
    ).encode()
)


def lookup(model: bytes) -> Any:
    return ROUTES[model]


def decide(
    path: bytes,
    body: bytes | None,
    headers: dict[bytes, bytes] | None = None,
    method: bytes = b"POST",
) -> dict[str, Any] | None:
    hdrs = headers or {}
    # A fresh Python callable per call: lupa 2.8 sometimes hands Lua a nil result for a
    # Python function object passed in again and again under GC pressure (measured: ~6% of
    # 20,000 calls with a module-level function, 0 with a new lambda each time).
    result = M.decide(CONFIG, method, path, lambda name: hdrs.get(name), body,
                      lambda model: lookup(model))
    return None if result is None else {k.decode(): v for k, v in result.items()}


def chat_body(messages: list[dict[str, Any]], model: str = "chat-a", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": messages, **extra}).encode()


def session(body: bytes, path: bytes = CHAT, headers: dict[bytes, bytes] | None = None) -> bytes:
    result = decide(path, body, headers)
    assert result is not None and "session" in result, result
    key: bytes = result["session"]
    return key


# --- reference hash: murmur3_x86_32 and XXH32's short-input path, one lane each -----------

MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & MASK


def _murmur_block(k: int) -> int:
    return (_rotl((k * 0xCC9E2D51) & MASK, 15) * 0x1B873593) & MASK


def ref_hash(data: bytes) -> bytes:
    n = len(data)
    h1, h2 = 0, (0x165667B1 + n) & MASK
    words = n - n % 4
    for i in range(0, words, 4):
        w = int.from_bytes(data[i : i + 4], "little")
        h1 = (_rotl(h1 ^ _murmur_block(w), 13) * 5 + 0xE6546B64) & MASK
        h2 = (_rotl((h2 + w * 0xC2B2AE3D) & MASK, 17) * 0x27D4EB2F) & MASK
    tail = data[words:]
    for b in tail:
        h2 = (_rotl((h2 + b * 0x165667B1) & MASK, 11) * 0x9E3779B1) & MASK
    if tail:
        h1 ^= _murmur_block(int.from_bytes(tail, "little"))
    h1 ^= n
    h1 ^= h1 >> 16
    h1 = (h1 * 0x85EBCA6B) & MASK
    h1 ^= h1 >> 13
    h1 = (h1 * 0xC2B2AE35) & MASK
    h1 ^= h1 >> 16
    h2 ^= h2 >> 15
    h2 = (h2 * 0x85EBCA77) & MASK
    h2 ^= h2 >> 13
    h2 = (h2 * 0xC2B2AE3D) & MASK
    h2 ^= h2 >> 16
    return f"h-{h1:08x}{h2:08x}".encode()


def ref_prefix_key(*fields: str | bytes) -> bytes:
    parts = [f.encode() if isinstance(f, str) else f for f in fields]
    return ref_hash(b"".join(b"%d:%s" % (len(p), p) for p in parts))


@pytest.mark.parametrize(
    ("data", "murmur3", "xxh32"),
    [
        (b"", "00000000", "02cc5d05"),
        (b"a", "3c2569b2", "550d7456"),
        (b"abc", "b3dd93fa", "32d153ff"),
        (b"hello", "248bfa47", "fb0077f9"),
        (b"The quick brown fox jumps over the lazy dog", "2e4ff723", None),
    ],
)
def test_hash_lanes_are_murmur3_and_short_xxh32(
    data: bytes, murmur3: str, xxh32: str | None
) -> None:
    key = M.hash(data)
    assert key[:10] == b"h-" + murmur3.encode()
    if xxh32 is not None:  # XXH32 proper switches to 4 lanes from 16 bytes on
        assert key[10:] == xxh32.encode()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.binary(min_size=1000, max_size=1100))
def test_hash_matches_reference(data: bytes) -> None:
    assert M.hash(data) == ref_hash(data)


@pytest.mark.parametrize("size", [65_533, 65_534, 65_535, 65_536, 65_539])
def test_hash_matches_reference_on_prefix_sized_inputs(size: int) -> None:
    # The capped prefix is hashed in one call: the word loop runs over the whole 64 KiB.
    data = random.Random(size).randbytes(size)
    assert M.hash(data) == ref_hash(data)


def test_hash_spreads_keys_evenly_over_three_buckets() -> None:
    keys = [M.hash(f"session-{i}".encode()) for i in range(10_000)]
    assert len(set(keys)) == len(keys)
    for lane in (slice(2, 10), slice(10, 18)):
        buckets = Counter(int(k[lane], 16) % 3 for k in keys)
        assert all(3000 <= n <= 3667 for n in buckets.values()), buckets


# --- statuses and replies --------------------------------------------------------------------


def error_of(result: dict[str, Any] | None) -> tuple[int, str, str]:
    assert result is not None
    doc = json.loads(result["json"])
    err = doc["error"]
    assert set(doc) == {"error"} and set(err) == {"message", "type", "code"}
    assert (err["type"].encode(), err["code"].encode()) == (result["type"], result["code"])
    return result["status"], err["code"], err["message"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, CHAT + b"?stream=true"])
@pytest.mark.parametrize(
    ("body", "code"),
    [
        (None, "invalid_json"),
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b'{"model":"chat-a"', "invalid_json"),
        (b'["chat-a"]', "invalid_json"),
        (b"{}", "missing_model"),
        (b'{"model":""}', "missing_model"),
        (b'{"model":5}', "missing_model"),
        (b'{"model":null}', "missing_model"),
        (b'{"model":["chat-a"]}', "missing_model"),
        (b'{"model":"chat-a","model":{"id":"chat-a"}}', "missing_model"),
        (b'{"meta":{"model":"chat-a"}}', "missing_model"),
    ],
)
def test_bad_bodies_get_400(path: bytes, body: bytes | None, code: str) -> None:
    status, got_code, message = error_of(decide(path, body))
    assert (status, got_code) == (400, code) and message


def test_unknown_model_gets_404_naming_it() -> None:
    status, code, message = error_of(decide(COMPLETIONS, b'{"model":"gpt-\\"9\\"","prompt":"x"}'))
    assert (status, code) == (404, "model_not_found")
    assert 'gpt-"9"' in message


def test_body_over_the_limit_gets_413() -> None:
    body = chat_body([{"role": "user", "content": "x" * 65536}])
    status, code, _ = error_of(decide(CHAT, body))
    assert (status, code) == (413, "request_too_large")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"GET", CHAT),
        (b"PUT", COMPLETIONS),
        (b"POST", b"/v1/embeddings"),
        (b"POST", b"/v1/chat/completions/extra"),
        (b"POST", b"/v1/models"),
        (b"GET", b"/v1/models"),
        (b"GET", b"/health"),
    ],
)
def test_other_requests_pass_through(method: bytes, path: bytes) -> None:
    assert decide(path, b'{"model":"chat-a"}', method=method) is None
    assert M.needs_body(method, path) is False


def test_routes_known_model_to_its_pool() -> None:
    weird = json.dumps({"model": 'we"ird\n\u00e9', "prompt": "p"}).encode()
    assert decide(COMPLETIONS, weird) == {
        "model": 'we"ird\n\u00e9'.encode(),
        "pool": b"pool-b",
        "session": ref_prefix_key("completions", 'we"ird\n\u00e9', "p"),
    }


# --- session keys ------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
FULL = {"prompt_cache_key": "pck", "user": "usr"}


def test_session_header_wins() -> None:
    assert session(chat_body(MESSAGES, **FULL), headers={b"x-session-id": b"hdr"}) == b"hdr"


def test_session_header_is_the_pools() -> None:
    body = chat_body(MESSAGES, model="chat-b", **FULL)
    assert session(body, headers={b"x-session-id": b"other"}) == b"pck"
    assert session(body, headers={b"x-conv": b"conv-1"}) == b"conv-1"


def test_prompt_cache_key_then_user_then_prefix_hash() -> None:
    empty_header = {b"x-session-id": b""}
    assert session(chat_body(MESSAGES, **FULL), headers=empty_header) == b"pck"
    assert session(chat_body(MESSAGES, prompt_cache_key="", user="usr")) == b"usr"
    assert session(chat_body(MESSAGES, prompt_cache_key=7, user="usr")) == b"usr"
    assert session(chat_body(MESSAGES, user="")) == ref_prefix_key(
        "chat", "chat-a", "be brief", "hi"
    )


def test_escaped_keys_are_decoded() -> None:
    assert session(b'{"model":"chat-a","user":"k\\u0065y\\/1"}') == b"key/1"
    # Non-ASCII keys are hashed: the hash is of the decoded UTF-8.
    body = b'{"model":"chat-a","user":"caf\\u00e9 \\ud83d\\ude00"}'
    assert session(body) == ref_hash("caf\u00e9 \U0001f600".encode())


@pytest.mark.parametrize(
    "key",
    ["x" * 257, "tab\there", "nl\nx", "nul\u0000x", "del\u007fx", "caf\u00e9", "\u4e2d"],
)
def test_unsafe_client_keys_are_hashed_and_still_route(key: str) -> None:
    result = decide(CHAT, chat_body(MESSAGES, prompt_cache_key=key))
    assert result is not None and result["model"] == b"chat-a"
    assert result["session"] == ref_hash(key.encode())
    hdr = {b"x-session-id": key.encode()}
    assert session(chat_body(MESSAGES), headers=hdr) == ref_hash(key.encode())


@pytest.mark.parametrize("key", ["k" * 256, "spaces, punctuation: ~!@#$%^&*()[]{}\\\"'"])
def test_keys_up_to_256_bytes_are_kept(key: str) -> None:
    assert session(chat_body(MESSAGES, user=key)) == key.encode()


def conversation(system: str, first_user: Any, turns: int, seed: str) -> list[bytes]:
    """Request bodies of successive turns: each resends the history plus one more exchange."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": first_user},
    ]
    bodies = []
    for turn in range(turns):
        # Clients re-serialise every turn; the key must not depend on the bytes chosen.
        bodies.append(
            json.dumps(
                {"model": "chat-a", "messages": messages, "stream": True},
                ensure_ascii=turn % 2 == 0,
                indent=turn % 3 or None,
            ).encode()
        )
        messages = messages + [
            {"role": "assistant", "content": f"answer {turn} to {seed}"},
            {"role": "user", "content": f"follow-up {turn} \u00e9\U0001f600 {seed}"},
        ]
    return bodies


def test_every_turn_of_a_chat_keeps_its_key() -> None:
    keys = {session(body) for body in conversation("sys \u4e2d", "question?", 6, "a")}
    assert keys == {ref_prefix_key("chat", "chat-a", "sys \u4e2d", "question?")}


def test_content_parts_hash_their_text() -> None:
    parts = [
        {"type": "text", "text": "look at "},
        {"type": "image_url", "image_url": {"url": "data:..."}},
        {"type": "text", "text": "this"},
    ]
    keys = {session(body) for body in conversation("sys", parts, 6, "p")}
    assert keys == {ref_prefix_key("chat", "chat-a", "sys", "look at this")}


def test_different_chats_get_different_keys() -> None:
    keys = [
        session(conversation("sys", "question A", 1, "x")[0]),
        session(conversation("sys", "question B", 1, "x")[0]),
        session(conversation("other sys", "question A", 1, "x")[0]),
        session(chat_body([{"role": "user", "content": "question A"}])),
        session(chat_body([{"role": "user", "content": "question A"}], model="chat-b")),
    ]
    assert len(set(keys)) == len(keys)


def test_chat_prefix_is_system_before_first_user() -> None:
    messages = [
        {"role": "assistant", "content": "ignored"},
        {"role": "developer", "content": "dev prompt"},
        {"role": "system", "content": "second system"},
        {"role": "user", "content": "first"},
        {"role": "system", "content": "late system"},
        {"role": "user", "content": "second"},
    ]
    assert session(chat_body(messages)) == ref_prefix_key("chat", "chat-a", "dev prompt", "first")
    late = [{"role": "user", "content": "first"}, {"role": "system", "content": "late"}]
    assert session(chat_body(late)) == ref_prefix_key("chat", "chat-a", "", "first")


@pytest.mark.parametrize("messages", [None, "text", [], [1, "x", None], [{"role": 5}]])
def test_odd_messages_still_route(messages: Any) -> None:
    assert session(chat_body(messages)) == ref_prefix_key("chat", "chat-a", "", "")


def completion_key(prompt: Any) -> bytes:
    return session(json.dumps({"model": "chat-a", "prompt": prompt}).encode(), COMPLETIONS)


def test_completions_hash_the_first_kib_of_the_prompt() -> None:
    base = "p" * 1500
    assert completion_key(base) == completion_key(base[:1024] + "different tail")
    assert completion_key(base) != completion_key("q" + base[1:])
    assert completion_key(base) == ref_prefix_key("completions", "chat-a", base[:1024])
    assert completion_key([base, "second"]) == completion_key(base)
    assert completion_key([1, 2, 3]) == ref_prefix_key("completions", "chat-a", "[1, 2, 3]")
    assert completion_key([1, 2, 3]) != completion_key([1, 2, 4])


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300), st.booleans())
def test_prompt_prefix_decodes_exactly_1024_bytes(text: str, ascii_only: bool) -> None:
    # Escapes of every width land on the 1 KiB cut: \n, \u00e9-style, surrogate pairs.
    prompt = text * (1100 // len(text.encode()) + 1)
    body = json.dumps({"model": "chat-a", "prompt": prompt}, ensure_ascii=ascii_only).encode()
    expected = prompt.encode()[:1024]
    assert session(body, COMPLETIONS) == ref_prefix_key("completions", "chat-a", expected)
