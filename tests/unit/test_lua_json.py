"""lua/hotpath.lua's JSON extraction against Python's json module, under LuaJIT (as in Envoy)."""

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lupa import luajit21

from control_plane.translate.lua import lua_asset

WANTED = ("model", "prompt_cache_key", "user", "messages", "prompt")

_lua = luajit21.LuaRuntime(encoding=None)
M = _lua.execute(lua_asset("hotpath.lua").encode())
# Field name -> (raw JSON text of the value, decoded string or nil); or nil and the reason.
_extract = _lua.eval(
    """function(M, body)
      local fields, why = M.extract(body)
      if not fields then return nil, why end
      local out = {}
      for name, span in pairs(fields) do
        out[name] = {string.sub(body, span[1], span[2] - 1), M.string_at(body, span)}
      end
      return out, false
    end"""
)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_loads(body: bytes) -> Any:
    """Python's json.loads on UTF-8 text, without the NaN/Infinity extension."""
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)


def python_fields(body: bytes) -> dict[str, Any] | None:
    try:
        doc = strict_loads(body)
    except ValueError:
        return None
    return {k: doc[k] for k in WANTED if k in doc} if isinstance(doc, dict) else None


def lua_fields(body: bytes) -> dict[str, tuple[bytes, bytes | None]] | None:
    out, _ = _extract(M, body)
    if out is None:
        return None
    return {name.decode(): (item[1], item[2]) for name, item in out.items()}


def assert_same_fields(body: bytes) -> None:
    expected = python_fields(body)
    got = lua_fields(body)
    assert (got is None) == (expected is None), body[:300]
    if got is None or expected is None:
        return
    assert set(got) == set(expected)
    for name, (raw, decoded) in got.items():
        # The span is exactly the value: it parses on its own to the same thing.
        assert strict_loads(raw) == expected[name]
        if isinstance(expected[name], str):
            assert decoded == expected[name].encode("utf-8", "surrogatepass")
        else:
            assert decoded is None


# --- hand-written cases -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m"}',
        b' \t\r\n{ "model" : "m" , "user" : "u" } \n',
        b'{"model":"a","model":"b"}',
        b'{"model":"a","model":5}',
        b'{"model":"m\\"x\\\\y\\/z\\b\\f\\n\\r\\t"}',
        b'{"mod\\u0065l":"\\u00e9\\u4E2D\\ud83d\\ude00"}',
        b'{"model":"\\ud800","user":"\\udc00\\ud800x","prompt":"\\ud83d\\u0041"}',
        b'{"x":{"model":"inner","messages":[{"model":"deep"}]},"model":"outer"}',
        b'{"messages":[{"role":"user","content":"hi"}],"prompt":[1,2,[3]],"model":null}',
        b'{"prompt":-0.5e+10,"user":true,"model":false,"messages":{},"prompt_cache_key":[]}',
        '{"model":"caf\u00e9 \u4e2d\U0001f600"}'.encode(),
        b'{"a":[],"b":{},"c":[{}],"d":"","e":0,"f":-0,"g":1E3,"h":1.25e-3}',
        b"{}",
    ],
)
def test_valid_bodies_match_python(body: bytes) -> None:
    assert lua_fields(body) is not None
    assert_same_fields(body)


def test_nested_model_keys_do_not_leak_to_top_level() -> None:
    fields = lua_fields(b'{"meta":{"model":"inner"},"messages":[{"model":"x"}]}')
    assert fields is not None and "model" not in fields


def test_duplicate_keys_last_wins() -> None:
    fields = lua_fields(b'{"model":"first","user":"u","model":"second"}')
    assert fields is not None and fields["model"][1] == b"second"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"[]",
        b'"model"',
        b"null",
        b"{",
        b'{"model":"m"',
        b'{"model":"m"}}',
        b'{"model":"m"} x',
        b'{"model":"m",}',
        b'{"a":[1,]}',
        b"{'model':'m'}",
        b'{model:"m"}',
        b'{"model" "m"}',
        b'{"model":"m" "user":"u"}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'{"a":01}',
        b'{"a":-}',
        b'{"a":1.}',
        b'{"a":.5}',
        b'{"a":+1}',
        b'{"a":1e}',
        b'{"a":tru}',
        b'{"a":True}',
        b'{"a":"\\x41"}',
        b'{"a":"\\u12"}',
        b'{"a":"\\u12g4"}',
        b'{"a":"line\nbreak"}',
        b'{"a":"tab\there"}',
        b'{"a":"nul\x00"}',
        b'{"a":"unterminated}',
        b'{"a":"\\"}',
        b"\xef\xbb\xbf{}",
        b'{"a":"\xff"}',
        b'{"a":"\xc0\x80"}',
        b'{"a":"\xed\xa0\x80"}',
        b'{"a":"\xf4\x90\x80\x80"}',
        b'{"a":"\xe4\xb8"}',
        b'{"a":1}\xc3\xa9',
        b'{"a":1 // comment\n}',
        b'{"a":[1 2]}',
        b'{"a":{"b"}}',
    ],
)
def test_invalid_bodies_are_rejected(body: bytes) -> None:
    assert python_fields(body) is None
    out, why = _extract(M, body)
    assert out is None and why


def test_deep_nesting_is_rejected_without_overflow() -> None:
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    out, why = _extract(M, deep)
    assert out is None and why
    ok = b'{"a":' + b"[" * 900 + b"]" * 900 + b',"model":"m"}'
    assert lua_fields(ok) == {"model": (b'"m"', b"m")}


# --- property: random documents, serialised with random whitespace and escapes -------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
# Surrogates (lone or paired) can only travel as \u escapes; text() leaves them out.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20) | st.text()
json_values = st.recursive(
    json_scalars | any_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(WANTED) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
WHITESPACE = ["", "", "", " ", "\n", "\t", "\r\n  "]
SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def encode_string(text: str, rnd: random.Random) -> str:
    """A JSON string literal choosing per character between raw, short and \\u escapes."""
    if rnd.random() < 0.3:  # json.dumps' own output, both flavours
        return json.dumps(text, ensure_ascii=rnd.random() < 0.5)
    out = []
    for ch in text:
        cp = ord(ch)
        raw_ok = cp >= 0x20 and ch not in '"\\' and not 0xD800 <= cp < 0xE000
        choice = rnd.random()
        if raw_ok and choice < 0.6:
            out.append(ch)
        elif ch in SHORT_ESCAPES and choice < 0.8:
            out.append(SHORT_ESCAPES[ch])
        elif cp >= 0x10000:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04x}" if choice < 0.9 else f"\\u{cp:04X}")
    return '"' + "".join(out) + '"'


def serialise(value: Any, rnd: random.Random) -> str:
    def ws() -> str:
        return rnd.choice(WHITESPACE)

    if isinstance(value, str):
        return encode_string(value, rnd)
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        body = ",".join(
            f"{ws()}{encode_string(k, rnd)}{ws()}:{ws()}{serialise(v, rnd)}{ws()}" for k, v in items
        )
        return "{" + (body or ws()) + "}"
    if isinstance(value, list):
        body = ",".join(f"{ws()}{serialise(v, rnd)}{ws()}" for v in value)
        return "[" + (body or ws()) + "]"
    return json.dumps(value)


top_level = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text() | json_values,
        "prompt_cache_key": st.text() | json_values,
        "user": any_text | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user"]),
                    "content": any_text,
                    "model": st.text(max_size=5),
                }
            ),
            max_size=3,
        )
        | json_values,
        "prompt": st.text() | st.lists(st.integers(0, 50_000), max_size=5) | json_values,
        "extra": json_values,
        "nested": st.fixed_dictionaries({"model": st.text(), "user": json_values}),
    },
)


def render_body(doc: dict[str, Any], dupes: list[tuple[str, Any]], rnd: random.Random) -> bytes:
    """The document plus duplicate top-level keys, written by hand (dicts cannot hold them)."""
    items = [(k, serialise(v, rnd)) for k, v in doc.items()]
    rnd.shuffle(items)
    for key, value in dupes:
        items.insert(rnd.randint(0, len(items)), (key, serialise(value, rnd)))

    def ws() -> str:
        return rnd.choice(WHITESPACE)

    members = ",".join(f"{ws()}{encode_string(k, rnd)}{ws()}:{ws()}{v}{ws()}" for k, v in items)
    return f"{ws()}{{{members or ws()}}}{ws()}".encode("utf-8", "surrogatepass")


body_strategy = st.builds(
    render_body,
    top_level,
    st.lists(st.tuples(st.sampled_from(WANTED), st.text() | json_scalars), max_size=3),
    st.randoms(use_true_random=False),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body_strategy)
def test_extraction_matches_python_json(body: bytes) -> None:
    assert lua_fields(body) is not None or python_fields(body) is None
    assert_same_fields(body)


# Bytes that break JSON in interesting ways: structure, quotes, escapes, control characters,
# bytes that are never valid UTF-8 and truncated multi-byte sequences.
MUTATION_BYTES = list(b'{}[]:,"\\ 0-eE.+tfnu\x00\x01\x1f\x7f') + [
    0x80,
    0xBF,
    0xC0,
    0xE4,
    0xED,
    0xF4,
    0xF5,
    0xFF,
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body_strategy, st.data())
def test_mutated_bodies_are_judged_like_python(body: bytes, data: st.DataObject) -> None:
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        pos = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if kind == "delete" and mutated:
            del mutated[pos]
        elif kind == "insert":
            mutated.insert(pos, data.draw(st.sampled_from(MUTATION_BYTES)))
        elif kind == "replace" and mutated:
            mutated[pos] = data.draw(st.sampled_from(MUTATION_BYTES))
        else:
            del mutated[pos:]
    assert_same_fields(bytes(mutated))


# --- the eight-bytes-a-step string scan: every byte class at every offset ------------------

# Bytes the word scan must stop at (or, for 0x20 and 0x7f, must not), each as it stands in a
# string literal: quotes end strings, escapes good and bad, control characters, the UTF-8
# leads with their own second-byte ranges, bad leads, stray and truncated continuations.
SCAN_PIECES = [
    b"\\", b'\\"', b"\\\\", b"\\/", b"\\n", b"\\t", b"\\x", b"\\u00e9", b"\\u00G9", b"\\u12",
    b"\x00", b"\x01", b"\x1f", b"\x20", b"\x7f", b'"', b'""', b'"x',
    b"\xc2\x80", b"\xdf\xbf", b"\xc1\xbf", b"\xe0\xa0\x80", b"\xe0\x9f\xbf", b"\xe4\xb8\xad",
    b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf0\x8f\xbf\xbf",
    b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x80", b"\xbf",
    b"\xe4\xb8", b"\xe4\x41\x41", b"\xf0\x90\x80",
]


@pytest.mark.parametrize("piece", SCAN_PIECES)
def test_word_scan_judges_each_byte_at_each_offset_like_python(piece: bytes) -> None:
    # The piece at every offset of the string and of the word load (pad shifts the string's
    # start), followed by a long plain run, by the string's end, or by the body's end.
    for pad in range(8):
        for before in range(18):
            for after in (0, 1, 7, 8, 9, 23):
                text = b"a" * before + piece + b"b" * after
                head = b'{"user":"' + b"p" * pad + b'","model":"'
                assert_same_fields(head + text + b'"}')
                assert_same_fields(head + text + b'","prompt":"' + b"q" * 16 + b'"}')


def test_word_scan_stops_at_the_end_of_the_body() -> None:
    # Every prefix of a body whose last string is long is cut inside it: all are refused,
    # none reads past the end (a NUL follows the body), and the whole body is accepted.
    text = "plain text \u4e2d\u6587 caf\u00e9 \U0001f600 \"quoted\"\ttab\n" * 3
    body = json.dumps({"model": "m", "user": text}, ensure_ascii=False).encode()
    for cut in range(len(body)):
        assert_same_fields(body[:cut])
    assert lua_fields(body) is not None
    assert_same_fields(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(SCAN_PIECES)
        | st.integers(0, 40).map(lambda n: b"z" * n)
        | st.binary(max_size=12),
        max_size=12,
    ),
    st.integers(0, 15),
)
def test_word_scan_matches_python_on_long_mixed_strings(pieces: list[bytes], pad: int) -> None:
    text = b"".join(pieces)
    assert_same_fields(b'{"user":"' + b"p" * pad + b'","model":"' + text + b'"}')
    assert_same_fields(b'{"messages":[' + b" " * pad + b'"' + text + b'"],"model":"m"}')


@pytest.mark.parametrize("value", range(256))
def test_word_scan_judges_every_byte_value_like_python(value: int) -> None:
    # One byte, then one byte followed by each class, at every offset of the word load.
    for offset in range(10):
        for follow in (b"", b"\x00", b'"', b"\\n", b"\x80", b"\xc3\xa9", b"\xe4\xb8\xad"):
            text = b"a" * offset + bytes([value]) + follow + b"b" * 9
            assert_same_fields(b'{"model":"' + text + b'"}')
            assert_same_fields(b'{"model":"' + text[: offset + 1] + b'"}')
