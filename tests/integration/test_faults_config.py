"""Config faults against a real etcd: refused-value floods across a restart, conflicting
claims, keys and values that must not stall the follower, and reconnecting after an outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from control_plane.config.state import ConfigState
from control_plane.store import operations
from control_plane.store.etcd import EtcdFollower, EtcdSettings, etcd_client
from tests.harness import Etcd, async_wait_for, new_etcd

pytestmark = pytest.mark.integration


async def put(settings: EtcdSettings, key: str | bytes, value: object) -> int:
    async with etcd_client(settings) as client:
        assert client.kv is not None
        name = settings.prefix.encode() + (key if isinstance(key, bytes) else key.encode())
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        reply = await client.kv.put(name, raw)
        return int(reply.header.revision)


async def relisted(settings: EtcdSettings) -> ConfigState:
    """What a freshly started control plane has after its first read."""
    state = ConfigState()
    follower = EtcdFollower(settings, state, lambda revision: None)
    async with etcd_client(settings) as client:
        await follower._relist(client)
    return state


@asynccontextmanager
async def following(settings: EtcdSettings) -> AsyncIterator[tuple[ConfigState, EtcdFollower]]:
    state = ConfigState()
    follower = EtcdFollower(settings, state, lambda revision: None)
    task = asyncio.create_task(follower.run())
    try:
        yield state, follower
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def has_pool(state: ConfigState, name: str, models: tuple[str, ...] | None = None
                   ) -> bool:
    pool = state.config().pools.get(name)
    return pool is not None and (models is None or pool.models == models)


async def test_twelve_refused_values_then_a_restart_keep_the_last_good_value(
        etcd_server: Etcd, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = EtcdSettings(urls=etcd_server.url, prefix=prefix)
    await put(settings, "pools/p", {"models": ["good"]})
    await put(settings, "endpoints/p/e", {"address": "127.0.0.1", "port": 9000})
    for index in range(12):
        await put(settings, "pools/p", {"models": ["x"], f"typo{index}": 1})
        await put(settings, "endpoints/p/e", {"address": "127.0.0.1", "port": f"p{index}"})
    state = await relisted(settings)
    assert state.config().pools["p"].models == ("good",)
    assert state.config().endpoints["p"]["e"].port == 9000
    assert set(state.rejected) == {"pools/p", "endpoints/p/e"}
    # `hotpath status` reads the same way.
    assert (await operations.read_state(settings)).config() == state.config()

    # A compaction that erases every good value: the key is out, and a log line says why.
    latest = await put(settings, "endpoints/p/e", {"address": "127.0.0.1", "port": "last"})
    async with etcd_client(settings) as client:
        assert client.kv is not None
        await client.kv.compact(latest)
    caplog.set_level(logging.WARNING, logger="control_plane.store.etcd")
    state = await relisted(settings)
    assert "p" not in state.config().endpoints
    assert any("endpoints/p/e" in r.getMessage() and "compacted" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_a_younger_pools_conflicting_claim_is_refused_live_and_after_a_restart(
        etcd_server: Etcd, prefix: str) -> None:
    settings = EtcdSettings(urls=etcd_server.url, prefix=prefix)
    async with following(settings) as (state, _):
        await put(settings, "pools/owner", {"models": ["llama"]})
        await async_wait_for(lambda: has_pool(state, "owner"), 10, "the owner pool")
        await put(settings, "pools/late", {"models": ["llama", "qwen"]})

        async def late_refused() -> bool:
            return "pools/late" in state.rejected

        await async_wait_for(late_refused, 10, "the younger claim to be refused")
        # The owner is edited after the younger claim: its mod_revision is now the newer.
        await put(settings, "pools/owner", {"models": ["llama"], "lb": "maglev"})
        await async_wait_for(lambda: _lb(state, "owner", "maglev"), 10, "the owner's edit")
        live = state.config()
        assert set(live.pools) == {"owner"}
        assert "already belongs to pool 'owner'" in state.rejected["pools/late"]

    fresh = await relisted(settings)
    assert fresh.config() == live
    assert set(fresh.rejected) == {"pools/late"}
    assert (await operations.read_state(settings)).config() == live


async def _lb(state: ConfigState, pool: str, lb: str) -> bool:
    found = state.config().pools.get(pool)
    return found is not None and found.lb == lb


@pytest.mark.parametrize("restart", [False, True], ids=["live", "restart"])
async def test_bad_key_bytes_and_deep_values_do_not_stall_a_later_update(
        etcd_server: Etcd, prefix: str, restart: bool) -> None:
    settings = EtcdSettings(urls=etcd_server.url, prefix=prefix)
    bad = [
        (b"pools/\xff\xfe", {"models": ["m"]}),
        (b"endpoints/p/\xc3(", {"address": "127.0.0.1", "port": 1}),
        (b"pools/deep", b"[" * 100_000 + b"]" * 100_000),
        (b"pools/deeper", b'{"models": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        (b"pools/huge", b'{"models": ["h"], "hash_balance_factor": 1' + b"0" * 5000 + b"}"),
        (b"status/p/e", b'{"state": "warm", "checked_at": 1' + b"0" * 4000 + b"}"),
    ]
    if restart:
        for key, value in bad:
            await put(settings, key, value)
    async with following(settings) as (state, follower):
        await put(settings, "pools/before", {"models": ["b"]})
        await async_wait_for(lambda: has_pool(state, "before"), 10, "the first update")
        if not restart:
            for key, value in bad:
                await put(settings, key, value)
        await put(settings, "pools/ok", {"models": ["ok"]})
        started = time.monotonic()
        await async_wait_for(lambda: has_pool(state, "ok"), 5, "a valid update after bad keys")
        assert time.monotonic() - started < 5
        assert set(state.config().pools) == {"before", "ok"}
        rejected = state.rejected
        assert {"pools/\\xff\\xfe", "endpoints/p/\\xc3(", "pools/deep", "pools/deeper",
                "pools/huge", "status/p/e"} == set(rejected)
        assert "not valid UTF-8" in rejected["pools/\\xff\\xfe"]
        assert follower.connected
        # Deleting the bad key clears its rejection.
        async with etcd_client(settings) as client:
            assert client.kv is not None
            await client.kv.delete(settings.prefix.encode() + b"pools/\xff\xfe")

        async def cleared() -> bool:
            return "pools/\\xff\\xfe" not in state.rejected

        await async_wait_for(cleared, 5, "the bad key's rejection to clear")


async def test_a_change_after_an_etcd_outage_is_applied_within_a_second_or_two(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etcd = new_etcd(tmp_path)
    try:
        settings = EtcdSettings(urls=etcd.url, prefix="/outage/")
        async with following(settings) as (state, follower):
            await put(settings, "pools/p", {"models": ["m"]})
            await async_wait_for(lambda: has_pool(state, "p"), 10, "the first pool")
            await asyncio.to_thread(etcd.stop, signal.SIGKILL)
            down_at = time.monotonic()
            await async_wait_for(lambda: _not(follower.connected), 10, "the loss to be seen")
            # The outage itself lasts ~10 s (the scenario, not a synchronisation).
            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
            assert "p" in state.config().pools, "config dropped while etcd was down"
            await asyncio.to_thread(etcd.start)
            back_at = time.monotonic()
            # The writer retries too (its client may share gRPC's reconnect backoff).
            await async_wait_for(lambda: _put_ok(settings, "pools/q", {"models": ["n"]}), 20,
                                 "the write after the outage")
            written_at = time.monotonic()
            await async_wait_for(lambda: has_pool(state, "q"), 20, "a change after the outage")
            applied_at = time.monotonic()
        with capsys.disabled():
            print(f"\netcd outage {back_at - down_at:.1f} s; a key written "
                  f"{written_at - back_at:.2f} s after etcd was back was applied "
                  f"{applied_at - written_at:.2f} s after the write "
                  f"({applied_at - back_at:.2f} s after etcd was back)")
        assert applied_at - back_at < 3.0, "the follower waited on a long backoff"
    finally:
        etcd.stop()


async def _put_ok(settings: EtcdSettings, key: str, value: object) -> bool:
    await put(settings, key, value)
    return True


async def _not(value: bool) -> bool:
    return not value
