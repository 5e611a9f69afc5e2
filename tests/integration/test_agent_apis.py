"""Agent traffic through the real Envoy: the OpenAI Responses and Anthropic Messages APIs with
their unmodified SDKs, routed by model and sticky per conversation with no client change."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from tests.harness import Stack, async_wait_for, wait_for

pytestmark = pytest.mark.integration

SYSTEM = "You are a coding agent working in the hotpath repository."


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class AgentUpstreams:
    """Fake model servers answering /v1/responses and /v1/messages as the APIs define them;
    each records which requests (model, conversation marker) it served."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.seen: dict[str, list[dict[str, Any]]] = {}

    async def add(self, name: str) -> int:
        self.seen[name] = []

        async def responses(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen[name].append({"api": "responses", "model": body["model"], "body": body})
            text = f"served by {name}"
            response = {"id": f"resp_{name}", "object": "response", "created_at": 0,
                        "status": "completed", "model": body["model"],
                        "output": [{"type": "message", "id": "msg_1", "status": "completed",
                                    "role": "assistant",
                                    "content": [{"type": "output_text", "text": text,
                                                 "annotations": []}]}],
                        "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
            if not body.get("stream"):
                return web.json_response(response, headers={"x-served-by": name})
            reply = web.StreamResponse(headers={"content-type": "text/event-stream",
                                                "x-served-by": name})
            await reply.prepare(request)
            created = {**response, "status": "in_progress", "output": []}
            await reply.write(_sse("response.created", {"type": "response.created",
                                                        "sequence_number": 0,
                                                        "response": created}))
            await reply.write(_sse("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1",
                "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}))
            await reply.write(_sse("response.completed", {"type": "response.completed",
                                                          "sequence_number": 2,
                                                          "response": response}))
            await reply.write_eof()
            return reply

        async def messages(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen[name].append({"api": "messages", "model": body["model"], "body": body})
            text = f"served by {name}"
            usage = {"input_tokens": 10, "output_tokens": 3}
            message = {"id": f"msg_{name}", "type": "message", "role": "assistant",
                       "model": body["model"], "content": [{"type": "text", "text": text}],
                       "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
            if not body.get("stream"):
                return web.json_response(message, headers={"x-served-by": name})
            reply = web.StreamResponse(headers={"content-type": "text/event-stream",
                                                "x-served-by": name})
            await reply.prepare(request)
            await reply.write(_sse("message_start", {"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None}}))
            await reply.write(_sse("content_block_start", {
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}))
            await reply.write(_sse("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}))
            await reply.write(_sse("content_block_stop", {"type": "content_block_stop",
                                                          "index": 0}))
            await reply.write(_sse("message_delta", {
                "type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                   "stop_sequence": None},
                "usage": {"output_tokens": 3}}))
            await reply.write(_sse("message_stop", {"type": "message_stop"}))
            await reply.write_eof()
            return reply

        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/responses", responses)
        app.router.add_post("/v1/messages", messages)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def agents(stack: Stack) -> AsyncIterator[AgentUpstreams]:
    servers = AgentUpstreams()
    try:
        pools = {"agents": ("agent-model", ["a0", "a1", "a2"]), "other": ("other-model", ["o0"])}
        for pool, (model, names) in pools.items():
            await stack.put(f"pools/{pool}", {"models": [model]})
            for name in names:
                port = await servers.add(name)
                await stack.put(f"endpoints/{pool}/{name}", {"address": "127.0.0.1",
                                                             "port": port})
        await stack.wait_listener()
        for pool, (_, names) in pools.items():
            await asyncio.to_thread(wait_for, lambda p=pool, n=names: set(
                stack.envoy.hosts(p)) == set(n), 30, f"pool {pool} in Envoy")
        async with aiohttp.ClientSession() as session:
            async def routable() -> bool:
                async with session.post(f"{stack.url}/v1/messages", json={
                        "model": "other-model", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "hi"}]}) as reply:
                    return reply.status == 200
            await async_wait_for(routable, 30, "the Messages API to route")
        yield servers
    finally:
        await servers.close()


def server_of(agents: AgentUpstreams, api: str, marker: str) -> set[str]:
    return {name for name, seen in agents.seen.items() for item in seen
            if item["api"] == api and marker in json.dumps(item["body"])}


async def test_responses_api_with_the_openai_sdk(stack: Stack, agents: AgentUpstreams) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    reply = await client.responses.create(model="other-model", input="hello")
    assert reply.output_text == "served by o0"
    events = [e async for e in await client.responses.create(
        model="other-model", input="hello", stream=True)]
    assert events[-1].type == "response.completed"
    # A 5-turn stateless conversation (the whole history every turn) stays on one upstream.
    history: list[dict[str, Any]] = [{"role": "user", "content": "conversation-r7: fix the bug"}]
    for turn in range(5):
        reply = await client.responses.create(  # type: ignore[assignment]
            model="agent-model", instructions=SYSTEM,
            input=history,  # type: ignore[arg-type]
            stream=False)
        history += [{"role": "assistant", "content": reply.output_text},
                    {"role": "user", "content": f"turn {turn} of conversation-r7"}]
    assert len(server_of(agents, "responses", "conversation-r7")) == 1
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="no-such-model", input="x")
    assert missing.value.status_code == 404
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    await client.close()


async def test_messages_api_with_the_anthropic_sdk(stack: Stack, agents: AgentUpstreams) -> None:
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key="unused", max_retries=0)
    reply = await client.messages.create(model="other-model", max_tokens=8,
                                         messages=[{"role": "user", "content": "hello"}])
    assert reply.content[0].text == "served by o0"  # type: ignore[union-attr]
    async with client.messages.stream(model="other-model", max_tokens=8, messages=[
            {"role": "user", "content": "hello"}]) as stream:
        text = "".join([chunk async for chunk in stream.text_stream])
    assert text == "served by o0"
    history: list[dict[str, Any]] = [{"role": "user", "content": "conversation-m3: refactor"}]
    for turn in range(5):
        reply = await client.messages.create(model="agent-model", max_tokens=8, system=SYSTEM,
                                             messages=history)  # type: ignore[arg-type]
        history += [{"role": "assistant", "content": reply.content[0].text},  # type: ignore
                    {"role": "user", "content": f"turn {turn} of conversation-m3"}]
    assert len(server_of(agents, "messages", "conversation-m3")) == 1
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=8,
                                     messages=[{"role": "user", "content": "x"}])
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    await client.close()


async def test_conversations_spread_over_every_upstream(stack: Stack,
                                                        agents: AgentUpstreams) -> None:
    async with aiohttp.ClientSession() as session:
        for index in range(50):
            api = "responses" if index % 2 else "messages"
            first = f"conversation-s{index}: task {index}"
            body: dict[str, Any] = {"model": "agent-model", "max_tokens": 8}
            if api == "responses":
                body |= {"instructions": SYSTEM, "input": [{"role": "user", "content": first}]}
            else:
                body |= {"system": SYSTEM, "messages": [{"role": "user", "content": first}]}
            async with session.post(f"{stack.url}/v1/{api}", json=body) as reply:
                assert reply.status == 200, await reply.text()
                assert reply.headers["x-session-id"].startswith("h-")
    served = Counter(name for name, seen in agents.seen.items() if name.startswith("a")
                     for _ in seen)
    assert set(served) == {"a0", "a1", "a2"}, served


async def test_envoy_replies_on_messages_are_anthropic_shaped(stack: Stack,
                                                               agents: AgentUpstreams) -> None:
    await stack.put("pools/empty", {"models": ["empty-model"]})
    async with aiohttp.ClientSession() as session:
        async def status() -> int:
            async with session.post(f"{stack.url}/v1/messages", json={
                    "model": "empty-model", "max_tokens": 1,
                    "messages": [{"role": "user", "content": "x"}]}) as reply:
                return reply.status
        await async_wait_for(lambda: _is(status, 503), 30, "the empty pool's 503")
        async with session.post(f"{stack.url}/v1/messages", json={
                "model": "empty-model", "max_tokens": 1,
                "messages": [{"role": "user", "content": "x"}]}) as reply:
            body = await reply.json(content_type=None)
        assert body["type"] == "error" and body["error"]["type"] == "overloaded_error", body
        async with session.post(f"{stack.url}/v1/responses", json={
                "model": "empty-model", "input": "x"}) as reply:
            body = await reply.json(content_type=None)
        assert reply.status == 503 and body["error"]["code"] == "no_healthy_upstream", body
        async with session.post(f"{stack.url}/v1/messages", data=b"{not json") as reply:
            body = await reply.json(content_type=None)
        assert reply.status == 400 and body["error"]["type"] == "invalid_request_error", body


async def _is(status: Any, wanted: int) -> bool:
    return bool(await status() == wanted)


async def test_session_headers_first_present_wins(stack: Stack, agents: AgentUpstreams) -> None:
    await stack.put("pools/other", {"models": ["other-model"],
                                    "session_headers": ["x-agent-session", "x-session-id"]})
    body = {"model": "other-model", "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        async def echo(headers: dict[str, str]) -> str | None:
            async with session.post(f"{stack.url}/v1/messages", json=body,
                                    headers=headers) as reply:
                return reply.headers.get("x-session-id") if reply.status == 200 else None

        both = {"x-agent-session": "agent-7", "x-session-id": "plain-7"}
        await async_wait_for(lambda: _equals(echo(both), "agent-7"), 30,
                             "the pool's session_headers in Envoy")
        assert await echo({"x-session-id": "plain-7"}) == "plain-7"
        assert await echo({"x-agent-session": "agent-8"}) == "agent-8"


async def _equals(value: Any, wanted: str) -> bool:
    return bool(await value == wanted)
