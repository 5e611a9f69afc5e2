"""The etcd follower against a real etcd: restarts, compaction, last good values."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from control_plane.config.state import ConfigState
from control_plane.store.etcd import EtcdFollower, EtcdSettings, etcd_client, put_json
from tests.harness import Etcd, async_wait_for, new_etcd

pytestmark = pytest.mark.integration


async def put(settings: EtcdSettings, key: str, value: object) -> int:
    async with etcd_client(settings) as client:
        assert client.kv is not None
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        reply = await client.kv.put(settings.prefix + key, raw)
        return int(reply.header.revision)


async def test_compacted_watch_relists_and_keeps_last_good_values(etcd_server: Etcd,
                                                                  prefix: str) -> None:
    settings = EtcdSettings(urls=etcd_server.url, prefix=prefix)
    state = ConfigState()
    changes: list[int] = []
    follower = EtcdFollower(settings, state, changes.append)
    async with etcd_client(settings) as client:
        await put_json(client, settings, "pools/p", {"models": ["m"]})
        revision = await follower._relist(client)
        assert set(state.config().pools) == {"p"}

        # While the follower is away: a bad value for p, a new endpoint, then compaction.
        await put(settings, "pools/p", b'{"models": "m"}')
        await put(settings, "endpoints/p/e1", {"address": "127.0.0.1", "port": 9000})
        latest = await put(settings, "pools/q", {"models": ["n"]})
        assert client.kv is not None
        await client.kv.compact(latest)

        # Resuming the watch where it stopped meets the compaction: the follower returns
        # so that run() re-lists instead of silently missing events.
        await asyncio.wait_for(follower._watch(client, revision + 1), 10)
        await follower._relist(client)
    config = state.config()
    assert set(config.pools) == {"p", "q"}
    assert config.pools["p"].models == ("m",), "the last good value of p was lost"
    assert set(config.endpoints["p"]) == {"e1"}
    assert "pools/p" in state.rejected


async def test_follower_survives_an_etcd_restart(tmp_path: Path) -> None:
    etcd = new_etcd(tmp_path)
    try:
        settings = EtcdSettings(urls=etcd.url, prefix="/restart/")
        state = ConfigState()
        follower = EtcdFollower(settings, state, lambda revision: None)
        task = asyncio.create_task(follower.run())
        try:
            await put(settings, "pools/p", {"models": ["m"]})

            async def has(pool: str) -> bool:
                return pool in state.config().pools

            await async_wait_for(lambda: has("p"), 20, "the first pool")
            await asyncio.to_thread(etcd.stop)
            await async_wait_for(lambda: _false(follower.connected), 20, "the loss to be seen")
            assert "p" in state.config().pools, "config dropped while etcd was down"
            await asyncio.to_thread(etcd.start)
            await put(settings, "pools/q", {"models": ["n"]})
            await async_wait_for(lambda: has("q"), 30, "a change after the restart")
            await async_wait_for(lambda: _true(follower.connected), 20, "etcd seen again")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        etcd.stop()


async def _false(value: bool) -> bool:
    return not value


async def _true(value: bool) -> bool:
    return value


async def test_a_fresh_read_recovers_the_last_good_value_from_history(etcd_server: Etcd,
                                                                      prefix: str) -> None:
    """A restarted control plane must not drop a pool whose latest value is bad."""
    settings = EtcdSettings(urls=etcd_server.url, prefix=prefix)
    await put(settings, "pools/p", {"models": ["good"]})
    await put(settings, "pools/p", b'{"models": "not-a-list"}')
    await put(settings, "pools/p", {"models": ["x"], "typo_field": 1})
    await put(settings, "endpoints/p/e", {"address": "127.0.0.1", "port": "eighty"})
    state = ConfigState()
    follower = EtcdFollower(settings, state, lambda revision: None)
    async with etcd_client(settings) as client:
        await follower._relist(client)
    config = state.config()
    assert config.pools["p"].models == ("good",)
    assert set(state.rejected) == {"pools/p", "endpoints/p/e"}
    assert "p" not in config.endpoints, "an endpoint with no good value ever must stay out"

    # A later good value replaces the recovered one as usual.
    await put(settings, "pools/p", {"models": ["newer"]})
    async with etcd_client(settings) as client:
        await follower._relist(client)
    assert state.config().pools["p"].models == ("newer",)
    assert "pools/p" not in state.rejected
