"""Per-request cost of the Lua filter's decide() under LuaJIT (lupa), for chat bodies by size.

Run from the repository root: python benchmarks/lua_extract.py [--repeats N]
Times are taken inside LuaJIT (os.clock, CPU time) around decide() alone, so they leave out
lupa's call overhead and Envoy's own body buffering and copy (getBytes).
"""

import argparse
import json
from pathlib import Path
from typing import Any

from lupa import luajit21

LUA_DIR = Path(__file__).resolve().parents[1] / "lua"

# Warm-up runs first: Envoy's workers run decide() hot, so JIT traces are already compiled.
TIMER = """
function(M, config, body, header, repeats)
  local get = function() return header end
  for _ = 1, repeats do
    M.decide(config, "POST", "/v1/chat/completions", get, body)
  end
  local times = {}
  for k = 1, repeats do
    local start = os.clock()
    M.decide(config, "POST", "/v1/chat/completions", get, body)
    times[k] = os.clock() - start
  end
  table.sort(times)
  return times[math.floor((repeats + 1) / 2)] * 1e6
end
"""


def chat_body(size: int, filler: str) -> bytes:
    """A multi-turn chat of about size bytes: system prompt, then alternating turns."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."},
        {"role": "user", "content": 'Summarise "the document" below.\n'},
    ]
    turn_chars = max(64, min(2000, size // 8))
    turn = (filler * turn_chars)[:turn_chars] + '\n"quoted"\tline\n'
    turn_bytes = len(json.dumps(turn, ensure_ascii=False).encode()) + 32
    for _ in range(max(0, -(-(size - 200) // turn_bytes))):
        role = "assistant" if len(messages) % 2 == 0 else "user"
        messages.append({"role": role, "content": turn})
    return json.dumps(
        {"model": "m", "messages": messages, "stream": True}, ensure_ascii=False
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed runs per case (median taken); default: by body size",
    )
    args = parser.parse_args()

    lua = luajit21.LuaRuntime(encoding=None)
    module = lua.execute((LUA_DIR / "hotpath.lua").read_bytes())
    config = lua.eval(
        "{models = {m = {pool = 'p', session_header = 'x-session-id'}},"
        " max_body_bytes = 16 * 1024 * 1024}"
    )
    timer = lua.eval(TIMER)
    one_message = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "y" * (8 << 20)}]}
    ).encode()
    cases = [
        ("chat 1 KiB", chat_body(1 << 10, "x"), None),
        ("chat 100 KiB", chat_body(100 << 10, "x"), None),
        ("chat 8 MiB", chat_body(8 << 20, "x"), None),
        ("chat 8 MiB, session header", chat_body(8 << 20, "x"), b"s-1"),
        ("chat 8 MiB, CJK text", chat_body(8 << 20, "\u4e2d\u6587"), None),
        ("chat 8 MiB, one user message", one_message, None),
    ]
    print(f"{'case':32} {'bytes':>10} {'median':>12} {'per MiB':>10}")
    for name, body, header in cases:
        repeats = args.repeats or max(11, min(2001, (32 << 20) // len(body)))
        micros = timer(module, config, body, header, repeats)
        per_mib = micros / (len(body) / (1 << 20))
        print(f"{name:32} {len(body):>10} {micros:>9.1f} us {per_mib / 1000:>7.2f} ms")


if __name__ == "__main__":
    main()
