"""Per-request cost of the Lua filter's decide() under LuaJIT (lupa), by API and body size.

Run from the repository root: python benchmarks/lua_extract.py [--repeats N] [--lua-dir DIR]
(--lua-dir: time another copy of hotpath.lua, e.g. the previous version, in the same way)
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
function(M, config, path, body, header, repeats)
  local get = function() return header end
  local entry = {pool = "p", session_headers = {"x-session-id"}}
  local lookup = function() return entry end
  for _ = 1, repeats do
    assert(M.decide(config, "POST", path, get, body, lookup).session)
  end
  local times = {}
  for k = 1, repeats do
    local start = os.clock()
    M.decide(config, "POST", path, get, body, lookup)
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


TOOLS = [
    {
        "name": f"tool_{i}",
        "description": "Runs a shell command in the workspace and returns its output. " * 8,
        "input_schema": {
            "type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
            "required": ["command"],
        },
    }
    for i in range(16)
]


def tool_output(n: int) -> str:
    line = 'src/app.py:42: def handler(request):  # "quoted"\treturn {"ok": True}\n'
    return (line * (n // len(line) + 1))[:n]


def messages_body(size: int) -> bytes:
    """An Anthropic agent turn of about size bytes: tools, then tool_use/tool_result rounds."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing test."}]
    doc: dict[str, Any] = {
        "model": "m",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "You are a coding agent.\n" * 40}],
        "tools": TOOLS,
        "messages": messages,
        "stream": True,
    }
    k = 0
    while len(json.dumps(doc)) < size:
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": f"tu_{k}",
                        "name": "tool_1",
                        "input": {"command": f"cat file_{k}.py"},
                    },
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": f"tu_{k}",
                        "content": tool_output(min(8192, size // 16)),
                    }
                ],
            }
        )
        k += 1
    return json.dumps(doc, ensure_ascii=False).encode()


def responses_body(size: int) -> bytes:
    """An OpenAI Responses agent turn of about size bytes: function calls and their outputs."""
    items: list[dict[str, Any]] = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Fix the failing test."}],
        }
    ]
    tools = [
        {
            "type": "function",
            "name": t["name"],
            "description": t["description"],
            "parameters": t["input_schema"],
        }
        for t in TOOLS
    ]
    doc: dict[str, Any] = {
        "model": "m",
        "instructions": "You are a coding agent.\n" * 40,
        "tools": tools,
        "input": items,
        "store": False,
        "stream": True,
    }
    k = 0
    while len(json.dumps(doc)) < size:
        items.append(
            {
                "type": "function_call",
                "call_id": f"c_{k}",
                "name": "tool_1",
                "arguments": json.dumps({"command": f"cat file_{k}.py"}),
            }
        )
        items.append(
            {
                "type": "function_call_output",
                "call_id": f"c_{k}",
                "output": tool_output(min(8192, size // 16)),
            }
        )
        k += 1
    return json.dumps(doc, ensure_ascii=False).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed runs per case (median taken); default: by body size",
    )
    parser.add_argument(
        "--lua-dir",
        type=Path,
        default=LUA_DIR,
        help="folder holding the hotpath.lua to time (default: lua/)",
    )
    args = parser.parse_args()

    lua = luajit21.LuaRuntime(encoding=None)
    module = lua.execute((args.lua_dir / "hotpath.lua").read_bytes())
    config = lua.eval("{max_body_bytes = 16 * 1024 * 1024}")
    timer = lua.eval(TIMER)
    chat, responses, messages = (
        b"/v1/chat/completions",
        b"/v1/responses",
        b"/v1/messages",
    )
    big = "y" * (8 << 20)
    one_message = json.dumps({"model": "m", "messages": [{"role": "user", "content": big}]})
    one_input = json.dumps({"model": "m", "input": big})
    cases = [
        ("chat 1 KiB", chat, chat_body(1 << 10, "x"), None),
        ("chat 100 KiB", chat, chat_body(100 << 10, "x"), None),
        ("chat 8 MiB", chat, chat_body(8 << 20, "x"), None),
        ("chat 8 MiB, session header", chat, chat_body(8 << 20, "x"), b"s-1"),
        ("chat 8 MiB, CJK text", chat, chat_body(8 << 20, "\u4e2d\u6587"), None),
        ("chat 8 MiB, one user message", chat, one_message.encode(), None),
        ("responses 100 KiB agent", responses, responses_body(100 << 10), None),
        ("responses 1 MiB agent", responses, responses_body(1 << 20), None),
        ("responses 8 MiB, one input", responses, one_input.encode(), None),
        ("messages 100 KiB agent", messages, messages_body(100 << 10), None),
        ("messages 1 MiB agent", messages, messages_body(1 << 20), None),
        ("messages 8 MiB, one user message", messages, one_message.encode(), None),
    ]
    print(f"{'case':34} {'bytes':>10} {'median':>12} {'per MiB':>10}")
    for name, path, body, header in cases:
        repeats = args.repeats or max(11, min(2001, (32 << 20) // len(body)))
        micros = timer(module, config, path, body, header, repeats)
        per_mib = micros / (len(body) / (1 << 20))
        print(f"{name:34} {len(body):>10} {micros:>9.1f} us {per_mib / 1000:>7.2f} ms")


if __name__ == "__main__":
    main()
