"""Config model: defaults, validation messages (key + field), round trips through JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.config import limits
from control_plane.config.model import (
    NAME_RE,
    Config,
    Endpoint,
    GatewaySettings,
    Pool,
    Status,
    WarmState,
    Warmup,
    check_name,
    endpoint_to_json,
    parse_endpoint,
    parse_pool,
    parse_status,
    pool_to_json,
    status_to_json,
)
from control_plane.errors import ConfigError
from control_plane.translate.clusters import ring_settings
from control_plane.translate.listeners import build_listener
from control_plane.translate.resources import translate
from control_plane.translate.routes import build_route_configuration
from control_plane.xds import types

POOL_KEY = "pools/chat"
EP_KEY = "endpoints/chat/gpu-0"
ST_KEY = "status/chat/gpu-0"
NAME_RULE = "must match [a-z0-9][a-z0-9._-]{0,62}"


def pool(value: Any, name: str = "chat") -> Pool:
    return parse_pool(f"pools/{name}", name, json.dumps(value))


def endpoint(value: Any) -> Endpoint:
    return parse_endpoint(EP_KEY, "chat", "gpu-0", json.dumps(value))


def status(value: Any) -> Status:
    return parse_status(ST_KEY, "chat", "gpu-0", json.dumps(value))


def pool_error(value: Any) -> str:
    with pytest.raises(ConfigError) as info:
        pool(value)
    return str(info.value)


def endpoint_error(value: Any) -> str:
    with pytest.raises(ConfigError) as info:
        endpoint(value)
    return str(info.value)


def status_error(value: Any) -> str:
    with pytest.raises(ConfigError) as info:
        status(value)
    return str(info.value)


# --- defaults -----------------------------------------------------------------------------


def test_pool_defaults_applied() -> None:
    parsed = parse_pool(POOL_KEY, "chat", b'{"models": ["llama"]}')
    assert parsed == Pool(name="chat", models=("llama",))
    assert parsed.lb == "ring_hash"
    assert parsed.session_headers == ("x-session-id",)
    assert parsed.hash_balance_factor == 150
    assert parsed.ring_points_per_weight == 128
    assert parsed.warmup == Warmup()
    assert parsed.warmup.path == "/v1/chat/completions"
    assert parsed.warmup.body is None
    assert parsed.warmup.interval_s == 10.0
    assert parsed.warmup.timeout_s == 30.0
    assert parsed.warmup.cold_ttft_ms == 1000.0


def test_warmup_partial_object_keeps_other_defaults() -> None:
    parsed = pool({"models": ["m"], "warmup": {"interval_s": 2}})
    assert parsed.warmup == Warmup(interval_s=2.0)
    assert isinstance(parsed.warmup.interval_s, float)
    assert pool({"models": ["m"], "warmup": {}}).warmup == Warmup()


def test_pool_all_fields_set() -> None:
    parsed = pool({
        "models": ["a", "b"],
        "lb": "maglev",
        "session_header": "x-conversation",
        "hash_balance_factor": 0,
        "warmup": {"path": "/v1/completions", "body": {"prompt": "hi"}, "interval_s": 1,
                   "timeout_s": 2.5, "cold_ttft_ms": 500},
        "ring_points_per_weight": 64,
    })
    assert parsed == Pool(
        name="chat", models=("a", "b"), lb="maglev", session_headers=("x-conversation",),
        hash_balance_factor=0, ring_points_per_weight=64,
        warmup=Warmup(path="/v1/completions", body={"prompt": "hi"}, interval_s=1.0,
                      timeout_s=2.5, cold_ttft_ms=500.0),
    )


@pytest.mark.parametrize("lb", ["ring_hash", "maglev", "round_robin", "least_request"])
def test_every_lb_policy_accepted(lb: str) -> None:
    assert pool({"models": ["m"], "lb": lb}).lb == lb


@pytest.mark.parametrize("factor", [0, 100, 150, 1000])
def test_hash_balance_factor_accepted(factor: int) -> None:
    assert pool({"models": ["m"], "hash_balance_factor": factor}).hash_balance_factor == factor


@pytest.mark.parametrize("points", [1, 3, 16, 100, 128, 1024, 4096])
def test_ring_points_per_weight_accepted(points: int) -> None:
    parsed = pool({"models": ["m"], "ring_points_per_weight": points})
    assert parsed.ring_points_per_weight == points


@pytest.mark.parametrize(("points", "message"), [
    (0, "ring_points_per_weight must be >= 1, got 0"),
    (-5, "ring_points_per_weight must be >= 1, got -5"),
    (4097, "ring_points_per_weight must be <= 4096, got 4097"),
    (2**40, f"ring_points_per_weight must be <= 4096, got {2**40}"),
    (128.0, "ring_points_per_weight must be an integer, got 128.0"),
    (128.5, "ring_points_per_weight must be an integer, got 128.5"),
    ("128", 'ring_points_per_weight must be an integer, got "128"'),
    (True, "ring_points_per_weight must be an integer, got true"),
    (None, "ring_points_per_weight must be an integer, got null"),
])
def test_ring_points_per_weight_rejected_naming_key_and_field(points: Any, message: str) -> None:
    assert pool_error({"models": ["m"], "ring_points_per_weight": points}) == (
        f"pools/chat: {message}")


def test_endpoint_defaults_applied() -> None:
    parsed = parse_endpoint(EP_KEY, "chat", "gpu-0", b'{"address": "10.0.0.1", "port": 8000}')
    assert parsed == Endpoint(pool="chat", id="gpu-0", address="10.0.0.1", port=8000, weight=1)
    assert parsed.is_ip


def test_status_defaults_and_parsing() -> None:
    parsed = status({"state": "cold", "checked_at": 1700000000})
    assert parsed == Status(pool="chat", id="gpu-0", state=WarmState.COLD, ttft_ms=None,
                            checked_at=1700000000.0)
    assert isinstance(parsed.checked_at, float)
    full = status({"state": "warm", "ttft_ms": 12, "checked_at": 1.5})
    assert full.state is WarmState.WARM
    assert full.ttft_ms == 12.0 and isinstance(full.ttft_ms, float)
    assert status({"state": "down", "ttft_ms": None, "checked_at": 0}).state is WarmState.DOWN


# --- errors name the key and the field ------------------------------------------------------


def test_config_error_carries_key_and_reason() -> None:
    with pytest.raises(ConfigError) as info:
        pool({"models": ["m"], "hash_balance_factor": 50})
    assert info.value.key == POOL_KEY
    assert info.value.reason == "hash_balance_factor must be >= 100 (or 0 for off), got 50"
    assert str(info.value) == f"{POOL_KEY}: {info.value.reason}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"models": ["m"], "hash_balance_factor": 50},
         "pools/chat: hash_balance_factor must be >= 100 (or 0 for off), got 50"),
        ({"models": ["m"], "hash_balance_factor": 99},
         "pools/chat: hash_balance_factor must be >= 100 (or 0 for off), got 99"),
        ({"models": ["m"], "hash_balance_factor": -1},
         "pools/chat: hash_balance_factor must be >= 0, got -1"),
        ({"models": ["m"], "hash_balance_factor": 150.0},
         "pools/chat: hash_balance_factor must be an integer, got 150.0"),
        ({"models": ["m"], "hash_balance_factor": True},
         "pools/chat: hash_balance_factor must be an integer, got true"),
        ({"models": ["m"], "hash_balance_factor": "150"},
         'pools/chat: hash_balance_factor must be an integer, got "150"'),
        ({}, "pools/chat: models is required (a list of model names)"),
        ({"models": "m"}, 'pools/chat: models must be a non-empty list of strings, got "m"'),
        ({"models": []}, "pools/chat: models must be a non-empty list of strings, got []"),
        ({"models": [5]}, "pools/chat: models entries must be strings of 1-256 chars, got 5"),
        ({"models": [""]}, 'pools/chat: models entries must be strings of 1-256 chars, got ""'),
        ({"models": ["x" * 257]},
         f'pools/chat: models entries must be strings of 1-256 chars, got "{"x" * 257}"'),
        ({"models": ["a\nb"]}, "pools/chat: model name 'a\\nb' contains control characters"),
        ({"models": ["a\x7fb"]}, "pools/chat: model name 'a\\x7fb' contains control characters"),
        ({"models": ["m", "m"]}, "pools/chat: models lists a model twice"),
        ({"models": ["m"], "lb": "random"},
         'pools/chat: lb must be one of ring_hash, maglev, round_robin, least_request, '
         'got "random"'),
        ({"models": ["m"], "lb": None},
         "pools/chat: lb must be one of ring_hash, maglev, round_robin, least_request, "
         "got null"),
        ({"models": ["m"], "session_header": "X-Session-Id"},
         'pools/chat: session_header must be a lower-case HTTP header name, got "X-Session-Id"'),
        ({"models": ["m"], "session_header": ""},
         'pools/chat: session_header must be a lower-case HTTP header name, got ""'),
        ({"models": ["m"], "session_header": "x session"},
         'pools/chat: session_header must be a lower-case HTTP header name, got "x session"'),
        ({"models": ["m"], "session_header": 7},
         "pools/chat: session_header must be a lower-case HTTP header name, got 7"),
        ({"models": ["m"], "session_header": "x-hotpath-session"},
         "pools/chat: session_header 'x-hotpath-session' is reserved for the gateway"),
        ({"models": ["m"], "session_header": "x-hotpath-model"},
         "pools/chat: session_header 'x-hotpath-model' is reserved for the gateway"),
        ({"models": ["m"], "session_headers": ["x-a", "x-hotpath-session"]},
         "pools/chat: session_headers 'x-hotpath-session' is reserved for the gateway"),
        ({"models": ["m"], "session_headers": []},
         "pools/chat: session_headers must be a list of 1-8 header names, got []"),
        ({"models": ["m"], "session_headers": "x-a"},
         'pools/chat: session_headers must be a list of 1-8 header names, got "x-a"'),
        ({"models": ["m"], "session_headers": ["x-a", "x-a"]},
         "pools/chat: session_headers lists a header twice"),
        ({"models": ["m"], "session_headers": ["x-a"], "session_header": "x-b"},
         "pools/chat: give session_header or session_headers, not both"),
        ({"models": ["m"], "warmup": 5}, "pools/chat: warmup must be an object, got 5"),
        ({"models": ["m"], "warmup": {"path": ""}},
         'pools/chat: warmup.path must be a non-empty string, got ""'),
        ({"models": ["m"], "warmup": {"path": 3}},
         "pools/chat: warmup.path must be a non-empty string, got 3"),
        ({"models": ["m"], "warmup": {"path": "v1/x"}},
         "pools/chat: warmup.path must start with '/', got 'v1/x'"),
        ({"models": ["m"], "warmup": {"body": [1]}},
         "pools/chat: warmup.body must be an object, got [1]"),
        ({"models": ["m"], "warmup": {"interval_s": 0}},
         "pools/chat: warmup.interval_s must be >= 0.1, got 0"),
        ({"models": ["m"], "warmup": {"interval_s": True}},
         "pools/chat: warmup.interval_s must be a number, got true"),
        ({"models": ["m"], "warmup": {"timeout_s": 0.05}},
         "pools/chat: warmup.timeout_s must be >= 0.1, got 0.05"),
        ({"models": ["m"], "warmup": {"timeout_s": "30"}},
         'pools/chat: warmup.timeout_s must be a number, got "30"'),
        ({"models": ["m"], "warmup": {"cold_ttft_ms": 0.5}},
         "pools/chat: warmup.cold_ttft_ms must be >= 1, got 0.5"),
        ({"models": ["m"], "warmup": {"cold_ttft_ms": False}},
         "pools/chat: warmup.cold_ttft_ms must be a number, got false"),
    ],
)
def test_pool_validation_messages(value: Any, message: str) -> None:
    assert pool_error(value) == message


def test_pool_unknown_fields_named() -> None:
    assert pool_error({"models": ["m"], "modles": 1, "hash_balance": 2}) == (
        "pools/chat: unknown field(s) hash_balance, modles "
        "(allowed: models, lb, session_header, session_headers, hash_balance_factor, warmup, "
        "ring_points_per_weight, session_ttl_s)"
    )


def test_warmup_unknown_fields_named() -> None:
    message = pool_error({"models": ["m"], "warmup": {"pathh": "/x"}})
    assert message.startswith("pools/chat")
    assert "unknown warmup field(s) pathh" in message
    assert "(allowed: path, body, interval_s, timeout_s, cold_ttft_ms)" in message


def test_warmup_unknown_field_error_key_is_the_etcd_key() -> None:
    with pytest.raises(ConfigError) as info:
        pool({"models": ["m"], "warmup": {"pathh": "/x"}})
    assert info.value.key == POOL_KEY


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[1, 2]", "pools/chat: value must be a JSON object, got list"),
        (b'"models"', "pools/chat: value must be a JSON object, got str"),
        (b"null", "pools/chat: value must be a JSON object, got NoneType"),
    ],
)
def test_pool_value_must_be_object(raw: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pool(POOL_KEY, "chat", raw)
    assert str(info.value) == message


@pytest.mark.parametrize("raw", [b"{models: []}", b"", b"\xff\xfe", b'{"models": ["m"]'])
def test_pool_value_not_json(raw: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pool(POOL_KEY, "chat", raw)
    assert str(info.value).startswith("pools/chat: value is not valid JSON (")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"port": 80}, "endpoints/chat/gpu-0: address is required (an IP or hostname)"),
        ({"address": "10.0.0.1"}, "endpoints/chat/gpu-0: port is required"),
        ({"address": "bad host", "port": 80},
         'endpoints/chat/gpu-0: address must be an IP or hostname, got "bad host"'),
        ({"address": 10, "port": 80},
         "endpoints/chat/gpu-0: address must be an IP or hostname, got 10"),
        ({"address": "10.0.0.1", "port": 0}, "endpoints/chat/gpu-0: port must be >= 1, got 0"),
        ({"address": "10.0.0.1", "port": -80},
         "endpoints/chat/gpu-0: port must be >= 1, got -80"),
        ({"address": "10.0.0.1", "port": 65536},
         "endpoints/chat/gpu-0: port must be <= 65535, got 65536"),
        ({"address": "10.0.0.1", "port": "80"},
         'endpoints/chat/gpu-0: port must be an integer, got "80"'),
        ({"address": "10.0.0.1", "port": 80.0},
         "endpoints/chat/gpu-0: port must be an integer, got 80.0"),
        ({"address": "10.0.0.1", "port": True},
         "endpoints/chat/gpu-0: port must be an integer, got true"),
        ({"address": "10.0.0.1", "port": 80, "weight": 0},
         "endpoints/chat/gpu-0: weight must be >= 1, got 0"),
        ({"address": "10.0.0.1", "port": 80, "weight": 129},
         "endpoints/chat/gpu-0: weight must be <= 128, got 129"),
        ({"address": "10.0.0.1", "port": 80, "weight": True},
         "endpoints/chat/gpu-0: weight must be an integer, got true"),
        ({"address": "10.0.0.1", "port": 80, "weight": 1.5},
         "endpoints/chat/gpu-0: weight must be an integer, got 1.5"),
        ({"address": "10.0.0.1", "port": 80, "host": "x"},
         "endpoints/chat/gpu-0: unknown field(s) host (allowed: address, port, weight)"),
    ],
)
def test_endpoint_validation_messages(value: Any, message: str) -> None:
    assert endpoint_error(value) == message


@pytest.mark.parametrize(
    ("port", "weight"), [(1, 1), (65535, 128), (8000, 64)]
)
def test_endpoint_port_and_weight_bounds_accepted(port: int, weight: int) -> None:
    parsed = endpoint({"address": "10.0.0.1", "port": port, "weight": weight})
    assert (parsed.port, parsed.weight) == (port, weight)


@pytest.mark.parametrize(
    ("address", "is_ip"),
    [
        ("10.0.0.1", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("2001:db8::7", True),
        ("localhost", False),
        ("gpu-1.example.com", False),
        ("GPU1.Example.COM", False),
        ("a" * 63, False),
        (".".join(["a" * 63] * 3) + "." + "a" * 61, False),  # 253 chars
    ],
)
def test_endpoint_address_ip_or_hostname_accepted(address: str, is_ip: bool) -> None:
    parsed = endpoint({"address": address, "port": 80})
    assert parsed.address == address
    assert parsed.is_ip is is_ip


@pytest.mark.parametrize(
    "address",
    [
        "",
        "bad host",
        "-gpu.example.com",
        "gpu-.example.com",
        "gpu..example.com",
        "gpu_1.example.com",
        "http://gpu",
        "[::1]",
        "10.0.0.1:8000",
        "a" * 64,
        ".".join(["a" * 63] * 4),  # 255 chars
        "gpu\n",
    ],
)
def test_endpoint_address_rejected(address: str) -> None:
    assert endpoint_error({"address": address, "port": 80}) == (
        f"endpoints/chat/gpu-0: address must be an IP or hostname, got {json.dumps(address)}"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"checked_at": 1}, "status/chat/gpu-0: state must be warm, cold or down, got null"),
        ({"state": "hot", "checked_at": 1},
         'status/chat/gpu-0: state must be warm, cold or down, got "hot"'),
        ({"state": "WARM", "checked_at": 1},
         'status/chat/gpu-0: state must be warm, cold or down, got "WARM"'),
        ({"state": 1, "checked_at": 1},
         "status/chat/gpu-0: state must be warm, cold or down, got 1"),
        ({"state": "warm"}, "status/chat/gpu-0: checked_at is required (unix seconds)"),
        ({"state": "warm", "checked_at": -1}, "status/chat/gpu-0: checked_at must be >= 0, got -1"),
        ({"state": "warm", "checked_at": True},
         "status/chat/gpu-0: checked_at must be a number, got true"),
        ({"state": "warm", "checked_at": "1"},
         'status/chat/gpu-0: checked_at must be a number, got "1"'),
        ({"state": "warm", "checked_at": 1, "ttft_ms": -1},
         "status/chat/gpu-0: ttft_ms must be >= 0, got -1"),
        ({"state": "warm", "checked_at": 1, "ttft_ms": False},
         "status/chat/gpu-0: ttft_ms must be a number, got false"),
        ({"state": "warm", "checked_at": 1, "ttfb_ms": 3},
         "status/chat/gpu-0: unknown field(s) ttfb_ms "
         "(allowed: state, ttft_ms, checked_at, source, traffic)"),
        ({"state": "warm", "checked_at": 1, "source": "guess"},
         'status/chat/gpu-0: source must be probe or traffic, got "guess"'),
        ({"state": "warm", "checked_at": 1, "traffic": {"p50_ms": 1}},
         "status/chat/gpu-0: traffic.p90_ms is required"),
    ],
)
def test_status_validation_messages(value: Any, message: str) -> None:
    assert status_error(value) == message


@pytest.mark.parametrize("raw", [b'{"state": "down", "checked_at": NaN}',
                                 b'{"state": "down", "checked_at": Infinity}'])
def test_status_checked_at_must_be_finite(raw: bytes) -> None:
    with pytest.raises(ConfigError):
        parse_status(ST_KEY, "chat", "gpu-0", raw)


@pytest.mark.parametrize("field", ["interval_s", "timeout_s", "cold_ttft_ms"])
def test_warmup_numbers_must_be_finite(field: str) -> None:
    with pytest.raises(ConfigError):
        parse_pool(POOL_KEY, "chat", f'{{"models": ["m"], "warmup": {{"{field}": NaN}}}}')


# --- names ----------------------------------------------------------------------------------


VALID_NAMES = ["a", "0", "chat", "llama-3.1_8b", "9gpu", "a" * 63, "a.b-c_d"]
INVALID_NAMES = ["", "Chat", "-a", ".a", "_a", "a" * 64, "a/b", "a b", "caf\u00e9", "a\n",
                 "a:b"]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    assert check_name("k", "pool name", name) == name
    assert pool({"models": ["m"]}, name=name).name == name
    assert parse_endpoint(f"endpoints/{name}/{name}", name, name,
                          b'{"address": "10.0.0.1", "port": 1}').id == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_pool_names(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pool(f"pools/{name}", name, b'{"models": ["m"]}')
    assert str(info.value) == f"pools/{name}: pool name {name!r} {NAME_RULE}"


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_endpoint_ids(name: str) -> None:
    key = f"endpoints/chat/{name}"
    with pytest.raises(ConfigError) as info:
        parse_endpoint(key, "chat", name, b'{"address": "10.0.0.1", "port": 1}')
    assert str(info.value) == f"{key}: endpoint id {name!r} {NAME_RULE}"
    with pytest.raises(ConfigError) as info:
        parse_status(f"status/chat/{name}", "chat", name, b'{"state": "warm", "checked_at": 1}')
    assert str(info.value) == f"status/chat/{name}: endpoint id {name!r} {NAME_RULE}"


def test_endpoint_pool_name_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_endpoint("endpoints/Chat/gpu", "Chat", "gpu", b'{"address": "10.0.0.1", "port": 1}')
    assert str(info.value) == f"endpoints/Chat/gpu: pool name 'Chat' {NAME_RULE}"


@given(st.from_regex(NAME_RE, fullmatch=True))
@settings(max_examples=60, deadline=None)
def test_names_matching_the_regex_are_accepted(name: str) -> None:
    assert check_name("k", "endpoint id", name) == name


# --- round trips ----------------------------------------------------------------------------


def test_pool_to_json_leaves_defaults_out() -> None:
    assert pool_to_json(Pool(name="chat", models=("a", "b"))) == {"models": ["a", "b"]}
    assert pool_to_json(
        Pool(name="chat", models=("a",), lb="maglev", hash_balance_factor=0,
             warmup=Warmup(interval_s=2.0))
    ) == {"models": ["a"], "lb": "maglev", "hash_balance_factor": 0,
          "warmup": {"interval_s": 2.0}}
    assert pool_to_json(Pool(name="chat", models=("a",), ring_points_per_weight=128)) == {
        "models": ["a"]}  # the default is left out: a later default change applies
    value = pool_to_json(Pool(name="chat", models=("a",), ring_points_per_weight=32))
    assert value == {"models": ["a"], "ring_points_per_weight": 32}
    assert parse_pool("pools/chat", "chat", json.dumps(value)).ring_points_per_weight == 32


def test_endpoint_to_json_leaves_default_weight_out() -> None:
    assert endpoint_to_json(Endpoint("chat", "gpu-0", "10.0.0.1", 8000)) == {
        "address": "10.0.0.1", "port": 8000}
    assert endpoint_to_json(Endpoint("chat", "gpu-0", "h.example", 8000, weight=3)) == {
        "address": "h.example", "port": 8000, "weight": 3}


_model_names = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
    min_size=1, max_size=20,
)
_warmups = st.builds(
    Warmup,
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/health"]),
    body=st.none() | st.just({"model": "m", "max_tokens": 1}),
    interval_s=st.sampled_from([0.1, 1.0, 10.0, 12.5]),
    timeout_s=st.sampled_from([0.5, 30.0, 60.0]),
    cold_ttft_ms=st.sampled_from([1.0, 1000.0, 2500.0]),
)
_pools = st.builds(
    Pool,
    name=st.from_regex(NAME_RE, fullmatch=True),
    models=st.lists(_model_names, min_size=1, max_size=4, unique=True).map(tuple),
    lb=st.sampled_from(["ring_hash", "maglev", "round_robin", "least_request"]),
    session_headers=st.lists(st.sampled_from(["x-session-id", "x-conversation", "session"]),
                             min_size=1, max_size=3, unique=True).map(tuple),
    hash_balance_factor=st.sampled_from([0, 100, 150, 250]),
    warmup=_warmups,
    ring_points_per_weight=st.integers(1, 4096),
)


@given(_pools)
@settings(max_examples=80, deadline=None)
def test_pool_round_trip(value: Pool) -> None:
    raw = json.dumps(pool_to_json(value))
    assert parse_pool(f"pools/{value.name}", value.name, raw) == value


@given(
    address=st.sampled_from(["10.0.0.1", "::1", "gpu-3.internal", "localhost"]),
    port=st.integers(1, 65535),
    weight=st.integers(1, 128),
)
@settings(max_examples=60, deadline=None)
def test_endpoint_round_trip(address: str, port: int, weight: int) -> None:
    value = Endpoint(pool="chat", id="gpu-0", address=address, port=port, weight=weight)
    assert parse_endpoint(EP_KEY, "chat", "gpu-0", json.dumps(endpoint_to_json(value))) == value


@pytest.mark.parametrize("ttft", [None, 0.0, 42.5])
@pytest.mark.parametrize("state", list(WarmState))
def test_status_round_trip(state: WarmState, ttft: float | None) -> None:
    value = Status(pool="chat", id="gpu-0", state=state, ttft_ms=ttft, checked_at=1700.25)
    assert parse_status(ST_KEY, "chat", "gpu-0", json.dumps(status_to_json(value))) == value


# --- numeric bounds: one source (config/limits.py) for validation and the builders ---------

BOUNDS = [
    # (etcd value at the bound with field path, field name as in the message, bound)
    ("pool", ("hash_balance_factor",), "hash_balance_factor", limits.HASH_BALANCE_FACTOR_MAX),
    ("pool", ("warmup", "interval_s"), "warmup.interval_s", limits.WARMUP_INTERVAL_MAX_S),
    ("pool", ("warmup", "timeout_s"), "warmup.timeout_s", limits.WARMUP_TIMEOUT_MAX_S),
    ("pool", ("warmup", "cold_ttft_ms"), "warmup.cold_ttft_ms", limits.WARMUP_COLD_TTFT_MAX_MS),
    ("endpoint", ("port",), "port", limits.PORT_MAX),
    ("endpoint", ("weight",), "weight", limits.WEIGHT_MAX),
]


def _bounded_value(kind: str, path: tuple[str, ...], number: int) -> dict[str, Any]:
    value: dict[str, Any] = ({"models": ["m"]} if kind == "pool"
                             else {"address": "10.0.0.1", "port": 80})
    target = value
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = number
    return value


def test_limits_are_envoys_own() -> None:
    assert limits.UINT32_MAX == 4_294_967_295
    assert limits.RING_SIZE_MAX == 8_388_608  # RingHashLbConfig: lte 8388608
    assert limits.DURATION_MAX_S == 315_576_000_000  # google.protobuf.Duration
    assert limits.PORT_MAX == 65535


@pytest.mark.parametrize(("kind", "path", "name", "bound"), BOUNDS)
def test_numeric_field_over_its_bound_is_rejected_naming_key_and_field(
        kind: str, path: tuple[str, ...], name: str, bound: int) -> None:
    value = _bounded_value(kind, path, bound + 1)
    message = pool_error(value) if kind == "pool" else endpoint_error(value)
    key = POOL_KEY if kind == "pool" else EP_KEY
    assert message == f"{key}: {name} must be <= {bound}, got {bound + 1}"


@pytest.mark.parametrize(("kind", "path", "name", "bound"), BOUNDS)
@pytest.mark.parametrize("lb", ["ring_hash", "maglev", "round_robin"])
def test_numeric_field_at_its_bound_builds_resources_that_serialize(
        kind: str, path: tuple[str, ...], name: str, bound: int, lb: str) -> None:
    value = _bounded_value(kind, path, bound)
    if kind == "pool":
        parsed_pool = pool({**value, "lb": lb})
        parsed_endpoint = endpoint({"address": "10.0.0.1", "port": 80})
    else:
        parsed_pool = pool({"models": ["m"], "lb": lb})
        parsed_endpoint = endpoint(value)
    config = Config(pools={"chat": parsed_pool},
                    endpoints={"chat": {"gpu-0": parsed_endpoint}})
    resources = translate(config, {("chat", "gpu-0"): "10.0.0.1"}, GatewaySettings(), 0.0)
    for by_name in resources.values():
        for resource in by_name.values():
            assert resource.SerializeToString(deterministic=True)
    if name == "hash_balance_factor" and lb != "round_robin":
        cluster = resources[types.CLUSTER]["chat"]
        ring = ring_settings(cluster)
        hashing = (ring if ring is not None else cluster.common_lb_config
                   ).consistent_hashing_lb_config
        assert hashing.hash_balance_factor.value == bound


def test_hash_balance_factor_of_2_to_the_32_no_longer_reaches_the_builder() -> None:
    # Finding 4: this passed validation and then failed inside the cluster builder.
    assert pool_error({"models": ["m"], "hash_balance_factor": 2**32}) == (
        f"pools/chat: hash_balance_factor must be <= 4294967295, got {2**32}")


@pytest.mark.parametrize(
    ("max_body", "idle", "message"),
    [
        (limits.BODY_LIMIT_MAX + 1, 900.0,
         f"--max-body-bytes: must be in 1..4294967295, got {limits.BODY_LIMIT_MAX + 1}"),
        (0, 900.0, "--max-body-bytes: must be in 1..4294967295, got 0"),
        (1024, limits.IDLE_TIMEOUT_MAX_S + 1,
         "--idle-timeout: must be in (0, 315576000000] seconds, got 3.15576e+11"),
    ],
)
def test_gateway_settings_over_their_bound_are_rejected(max_body: int, idle: float,
                                                        message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_listener(GatewaySettings(max_body_bytes=max_body, idle_timeout_s=idle))
    assert str(info.value) == message


def test_gateway_settings_at_their_bound_serialize() -> None:
    settings = GatewaySettings(max_body_bytes=limits.BODY_LIMIT_MAX,
                               idle_timeout_s=limits.IDLE_TIMEOUT_MAX_S)
    listener = build_listener(settings)
    assert listener.per_connection_buffer_limit_bytes.value == limits.UINT32_MAX
    assert listener.SerializeToString()
    routes = build_route_configuration([Pool(name="p", models=("m",))], settings)
    assert routes.SerializeToString()
