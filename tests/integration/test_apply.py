"""`hotpath apply -f` and `hotpath export` against a real etcd (and a real Envoy once)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from control_plane.store.etcd import EtcdSettings, etcd_client, list_prefix, put_json
from tests.harness import REPO, Etcd, Stack, Upstreams, chat, wait_for

pytestmark = pytest.mark.integration

HOTPATH = [sys.executable, "-m", "control_plane"]

CONFIG: dict[str, Any] = {
    "pools": {
        "chat": {"models": ["llama", "yes"], "hash_balance_factor": 200,
                 "warmup": {"interval_s": 5.0, "body": {"model": "llama", "max_tokens": 1}}},
        "code": {"models": ["coder"], "lb": "maglev"},
    },
    "endpoints": {
        "chat": {"gpu-0": {"address": "127.0.10.1", "port": 8000},
                 "gpu-1": {"address": "gpu-1.internal", "port": 8000, "weight": 2}},
        "code": {"c-0": {"address": "127.0.10.3", "port": 9000}},
    },
}
KEYS = ["pools/chat", "pools/code", "endpoints/chat/gpu-0", "endpoints/chat/gpu-1",
        "endpoints/code/c-0"]


async def hotpath(etcd: EtcdSettings, command: str, *args: str,
                  stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*HOTPATH, command, "--etcd", etcd.urls, "--prefix", etcd.prefix, *args]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   input=stdin, timeout=60, cwd=REPO)


async def apply(etcd: EtcdSettings, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await hotpath(etcd, "apply", "-f", str(path), *args)


def actions(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """key -> action from apply's output (the summary line left out)."""
    found = {}
    for line in result.stdout.splitlines()[:-1]:
        key, _, action = line.partition(": ")
        found[key] = action
    return found


async def snapshot(etcd: EtcdSettings) -> tuple[int, dict[str, tuple[bytes, int]]]:
    async with etcd_client(etcd) as client:
        revision, items = await list_prefix(client, etcd)
    return revision, {key: (value, mod) for key, value, mod in items}


def write(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document) if path.suffix != ".json" else json.dumps(document))
    return path


@pytest.fixture
def etcd(etcd_server: Etcd, prefix: str) -> EtcdSettings:
    return EtcdSettings(urls=etcd_server.url, prefix=prefix)


async def test_apply_is_atomic_and_idempotent_and_export_round_trips(
        etcd: EtcdSettings, tmp_path: Path) -> None:
    first = await apply(etcd, write(tmp_path / "pools.yaml", CONFIG))
    assert first.returncode == 0, first.stderr
    assert actions(first) == dict.fromkeys(KEYS, "created")
    revision, stored = await snapshot(etcd)
    assert set(stored) == set(KEYS)
    assert {mod for _, mod in stored.values()} == {revision}, "one transaction, one revision"
    assert first.stdout.splitlines()[-1].endswith(f"(etcd revision {revision})")

    again = await apply(etcd, tmp_path / "pools.yaml")
    assert again.returncode == 0, again.stderr
    assert actions(again) == dict.fromkeys(KEYS, "unchanged")
    assert (await snapshot(etcd))[0] == revision, "an unchanged apply writes nothing"

    exported = await hotpath(etcd, "export")
    assert exported.returncode == 0, exported.stderr
    assert yaml.safe_load(exported.stdout) == CONFIG
    as_json = await hotpath(etcd, "export", "--format", "json")
    assert json.loads(as_json.stdout) == CONFIG
    (tmp_path / "exported.yaml").write_text(exported.stdout)
    (tmp_path / "exported.json").write_text(as_json.stdout)
    for path in ("exported.yaml", "exported.json"):
        result = await apply(etcd, tmp_path / path)
        assert actions(result) == dict.fromkeys(KEYS, "unchanged"), result.stdout
    assert (await snapshot(etcd))[0] == revision


async def test_a_changed_field_updates_only_its_key(etcd: EtcdSettings, tmp_path: Path) -> None:
    assert (await apply(etcd, write(tmp_path / "a.yaml", CONFIG))).returncode == 0
    changed = json.loads(json.dumps(CONFIG))
    changed["endpoints"]["code"]["c-0"]["weight"] = 3
    result = await apply(etcd, write(tmp_path / "b.json", changed))
    assert result.returncode == 0, result.stderr
    assert actions(result) == {**dict.fromkeys(KEYS, "unchanged"),
                               "endpoints/code/c-0": "updated"}
    _, stored = await snapshot(etcd)
    assert json.loads(stored["endpoints/code/c-0"][0]) == {"address": "127.0.10.3", "port": 9000,
                                                           "weight": 3}


async def test_an_invalid_file_writes_nothing_and_names_every_bad_field(
        etcd: EtcdSettings, tmp_path: Path) -> None:
    assert (await apply(etcd, write(tmp_path / "good.yaml", CONFIG))).returncode == 0
    before = await snapshot(etcd)
    bad = json.loads(json.dumps(CONFIG))
    bad["pools"]["chat"]["lb"] = "random"  # also a valid change elsewhere would be lost
    bad["pools"]["code"]["hash_balance_factor"] = 50
    bad["pools"]["new"] = {"models": ["n"], "colour": "red"}
    bad["endpoints"]["chat"]["gpu-0"]["port"] = "8000"
    path = write(tmp_path / "bad.yaml", bad)
    result = await apply(etcd, path)
    assert result.returncode == 2
    assert f"{path}: 4 problem(s), nothing written" in result.stderr
    for expected in ("pools/chat: lb must be one of", "pools/code: hash_balance_factor must be",
                     "pools/new: unknown field(s) colour",
                     'endpoints/chat/gpu-0: port must be an integer, got "8000"'):
        assert expected in result.stderr
    assert await snapshot(etcd) == before

    broken = tmp_path / "broken.yaml"
    broken.write_text("pools:\n  chat: {models: [llama]\n")
    result = await apply(etcd, broken)
    assert result.returncode == 2 and f"{broken}: 1 problem(s)" in result.stderr
    assert "not valid YAML at line" in result.stderr
    assert await snapshot(etcd) == before


async def test_a_model_belongs_to_one_pool_in_the_file_and_in_etcd(
        etcd: EtcdSettings, tmp_path: Path) -> None:
    twice = write(tmp_path / "twice.yaml", {"pools": {"a": {"models": ["m"]},
                                                      "b": {"models": ["m"]}}})
    result = await apply(etcd, twice)
    assert result.returncode == 2
    assert "pools/b: model 'm' already belongs to pool 'a'" in result.stderr

    async with etcd_client(etcd) as client:
        await put_json(client, etcd, "pools/other", {"models": ["m"]})
    before = await snapshot(etcd)
    mine = write(tmp_path / "mine.yaml", {"pools": {"mine": {"models": ["m"]}}})
    result = await apply(etcd, mine)
    assert result.returncode == 2
    assert "pools/mine: model 'm' already belongs to pool 'other' in etcd" in result.stderr
    assert await snapshot(etcd) == before

    # --prune removes `other`, so the claim is no longer shared.
    result = await apply(etcd, mine, "--prune")
    assert result.returncode == 0, result.stderr
    assert actions(result) == {"pools/mine": "created", "pools/other": "deleted"}


async def test_endpoints_need_a_known_pool(etcd: EtcdSettings, tmp_path: Path) -> None:
    orphan = write(tmp_path / "orphan.yaml",
                   {"endpoints": {"ghost": {"g-0": {"address": "127.0.10.9", "port": 1}}}})
    result = await apply(etcd, orphan)
    assert result.returncode == 2
    assert "endpoints/ghost/g-0: pool 'ghost' is neither in this file nor in etcd" in result.stderr


async def test_prune_and_export_leave_leased_endpoints_to_their_registrar(
        etcd: EtcdSettings, tmp_path: Path) -> None:
    assert (await apply(etcd, write(tmp_path / "all.yaml", CONFIG))).returncode == 0
    async with etcd_client(etcd) as client:
        assert client.lease is not None
        lease = await client.lease.grant(ttl=60, timeout=10)
        try:
            await put_json(client, etcd, "endpoints/chat/reg", {"address": "127.0.10.7",
                                                                "port": 8000}, lease=lease.ID)
            await put_json(client, etcd, "status/chat/gpu-1",
                           {"state": "warm", "ttft_ms": 5.0, "checked_at": 1.0})

            exported = await hotpath(etcd, "export")
            assert "reg" not in yaml.safe_load(exported.stdout)["endpoints"]["chat"]
            assert "1 endpoint(s) held under a lease" in exported.stderr
            everything = await hotpath(etcd, "export", "--include-leased")
            assert yaml.safe_load(everything.stdout)["endpoints"]["chat"]["reg"] == {
                "address": "127.0.10.7", "port": 8000}

            fewer = json.loads(json.dumps(CONFIG))
            del fewer["endpoints"]["chat"]["gpu-1"]
            del fewer["pools"]["code"], fewer["endpoints"]["code"]
            path = write(tmp_path / "fewer.yaml", fewer)
            dry = await apply(etcd, path, "--prune", "--dry-run")
            assert dry.returncode == 0 and "nothing written" in dry.stdout
            assert set((await snapshot(etcd))[1]) >= set(KEYS)

            result = await apply(etcd, path, "--prune")
            assert result.returncode == 0, result.stderr
            assert actions(result) == {
                "pools/chat": "unchanged", "endpoints/chat/gpu-0": "unchanged",
                "pools/code": "deleted", "endpoints/chat/gpu-1": "deleted",
                "endpoints/code/c-0": "deleted",
                "endpoints/chat/reg": "kept (held under a lease by `hotpath register`)"}
            _, stored = await snapshot(etcd)
            assert set(stored) == {"pools/chat", "endpoints/chat/gpu-0", "endpoints/chat/reg"}

            takeover = json.loads(json.dumps(fewer))
            takeover["endpoints"]["chat"]["reg"] = {"address": "127.0.10.8", "port": 8000}
            result = await apply(etcd, write(tmp_path / "takeover.yaml", takeover))
            assert result.returncode == 2
            assert "endpoints/chat/reg: held under a lease by `hotpath register`" in result.stderr
        finally:
            await client.lease.revoke(lease.ID, timeout=10)


async def test_apply_reads_stdin(etcd: EtcdSettings) -> None:
    result = await hotpath(etcd, "apply", "-f", "-", stdin="pools: {p: {models: [m]}}\n")
    assert result.returncode == 0, result.stderr
    assert actions(result) == {"pools/p": "created"}


async def test_applied_config_routes_through_envoy(stack: Stack, upstreams: Upstreams,
                                                   tmp_path: Path) -> None:
    port = await upstreams.add("u1")
    path = write(tmp_path / "route.yaml", {
        "pools": {"p1": {"models": ["m1"]}},
        "endpoints": {"p1": {"u1": {"address": "127.0.0.1", "port": port}}}})
    result = await apply(stack.etcd, path)
    assert result.returncode == 0, result.stderr
    await stack.wait_listener()
    await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts("p1")) == {"u1"}, 30,
                            "the applied endpoint in Envoy")
    async with aiohttp.ClientSession() as session:
        status, _, body = await chat(session, stack.url, "m1")
    assert status == 200 and body["served_by"] == "u1"
