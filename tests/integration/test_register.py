"""`hotpath register` against a real etcd, and through a real Envoy where routing matters.

Every register process is started here and ended by PID in a finally; every condition is
polled with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from control_plane.cli.main import build_parser
from control_plane.runtime import processes
from control_plane.runtime.register import registration_from_args
from control_plane.store.etcd import EtcdSettings, etcd_client
from tests.harness import REPO, Etcd, Stack, Upstreams, async_wait_for, chat, stop, wait_for

integration = pytest.mark.integration

REGISTER = [sys.executable, "-m", "control_plane", "register"]


def start_register(tmp: Path, etcd: EtcdSettings, *args: str,
                   stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    command = [*REGISTER, "--etcd", etcd.urls, "--prefix", etcd.prefix, *args]
    with open(tmp / "register.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=stdin,
                                cwd=REPO)


async def value(etcd: EtcdSettings, key: str) -> bytes | None:
    async with etcd_client(etcd) as client:
        assert client.kv is not None
        reply = await client.kv.get(etcd.prefix + key, timeout=5)
    return bytes(reply.kvs[0].value) if reply.kvs else None


async def present(etcd: EtcdSettings, key: str) -> bool:
    return await value(etcd, key) is not None


async def absent(etcd: EtcdSettings, key: str) -> bool:
    return await value(etcd, key) is None


def settings(etcd_server: Etcd, prefix: str) -> EtcdSettings:
    return EtcdSettings(urls=etcd_server.url, prefix=prefix)


# -- arguments -----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    argv = ["register", *argv]
    return build_parser(argv).parse_args(argv)


def test_options_and_the_wrapped_command_are_parsed_apart() -> None:
    argv = ["sim", "sim-0", "--address", "sim-0", "--port", "8000", "--ttl", "3", "--",
            "vllm", "serve", "m", "--port", "8000", "--", "x"]
    registration = registration_from_args(parse(argv))
    assert registration.key == "endpoints/sim/sim-0"
    assert registration.value == {"address": "sim-0", "port": 8000}
    assert registration.ttl == 3
    assert registration.command == ("vllm", "serve", "m", "--port", "8000", "--", "x")
    sidecar = registration_from_args(parse(argv[:8]))
    assert sidecar.command == ()


def test_an_invalid_endpoint_is_refused_before_etcd_is_contacted() -> None:
    result = subprocess.run(
        [*REGISTER, "--etcd", "http://127.0.0.1:9", "p1", "e1", "--address", "not an address",
         "--port", "8000"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2
    assert "endpoints/p1/e1: address must be an IP or hostname" in result.stderr


# -- lifecycle -----------------------------------------------------------------------------


@integration
async def test_registered_endpoint_serves_and_sigkill_expires_it_within_the_ttl(
        stack: Stack, upstreams: Upstreams, tmp_path: Path) -> None:
    ttl = 2
    await stack.put("pools/p1", {"models": ["m1"]})
    port = await upstreams.add("u1")
    process = start_register(tmp_path, stack.etcd, "p1", "u1", "--address", "127.0.0.1",
                             "--port", str(port), "--ttl", str(ttl))
    try:
        await stack.wait_listener()
        await asyncio.to_thread(wait_for, lambda: stack.envoy.hosts("p1") == {"u1": "healthy"},
                                30, "the registered endpoint in Envoy")
        async with aiohttp.ClientSession() as session:
            status, _, body = await chat(session, stack.url, "m1")
        assert status == 200 and body["served_by"] == "u1"

        process.kill()
        process.wait(10)
        killed = time.monotonic()
        await async_wait_for(lambda: absent(stack.etcd, "endpoints/p1/u1"), ttl + 5,
                             "the lease to expire")
        # The lease was last renewed before the kill; etcd checks expiry every 500 ms and
        # deletes through raft: allow that, plus slack for a loaded machine.
        elapsed = time.monotonic() - killed
        assert elapsed <= ttl + 1.5, f"the key outlived its lease: {elapsed:.2f}s"
        await asyncio.to_thread(wait_for, lambda: stack.envoy.hosts("p1") == {}, 30,
                                "the endpoint to leave Envoy")
    finally:
        stop(process)


@integration
async def test_sigterm_deregisters_at_once_and_then_drains(
        etcd_server: Etcd, prefix: str, tmp_path: Path) -> None:
    etcd = settings(etcd_server, prefix)
    process = start_register(tmp_path, etcd, "p1", "e1", "--address", "127.0.0.1", "--port",
                             "8000", "--ttl", "30", "--drain-s", "60")
    try:
        await async_wait_for(lambda: present(etcd, "endpoints/p1/e1"), 30, "registration")
        process.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        await async_wait_for(lambda: absent(etcd, "endpoints/p1/e1"), 5, "deregistration")
        assert time.monotonic() - asked < 3, "the key must go at once, not after the TTL"
        assert process.poll() is None, "it must still be draining"
        process.send_signal(signal.SIGTERM)  # a second signal cuts the drain short
        assert process.wait(10) == 0
    finally:
        stop(process)


@integration
async def test_wrapper_deregisters_then_exits_with_the_commands_status(
        etcd_server: Etcd, prefix: str, tmp_path: Path) -> None:
    etcd = settings(etcd_server, prefix)
    # The command inherits our stdin: it exits with 7 when the test closes that pipe.
    child = [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(7)"]
    process = start_register(tmp_path, etcd, "p1", "e1", "--address", "127.0.0.1", "--port",
                             "8000", "--ttl", "30", "--", *child, stdin=subprocess.PIPE)
    try:
        await async_wait_for(lambda: present(etcd, "endpoints/p1/e1"), 30, "registration")
        assert process.stdin is not None
        process.stdin.close()
        assert await asyncio.to_thread(process.wait, 15) == 7
        assert await absent(etcd, "endpoints/p1/e1"), "deregistered before exiting"
    finally:
        stop(process)


@integration
async def test_wrapper_never_registers_a_command_that_dies_before_it_is_healthy(
        etcd_server: Etcd, prefix: str, tmp_path: Path) -> None:
    etcd = settings(etcd_server, prefix)
    port = processes.free_port()
    process = start_register(tmp_path, etcd, "p1", "e1", "--address", "127.0.0.1", "--port",
                             str(port), "--wait-healthy", f"http://127.0.0.1:{port}/health",
                             "--", sys.executable, "-c", "raise SystemExit(3)")
    try:
        assert await asyncio.to_thread(process.wait, 30) == 3
        assert await absent(etcd, "endpoints/p1/e1")
    finally:
        stop(process)


@integration
async def test_wrapped_simulator_joins_envoy_once_healthy_and_leaves_on_sigterm(
        stack: Stack, tmp_path: Path) -> None:
    await stack.put("pools/sim", {"models": ["sim-model"]})
    port = processes.free_port()
    process = start_register(
        tmp_path, stack.etcd, "sim", "s0", "--address", "127.0.0.1", "--port", str(port),
        "--ttl", "10", "--drain-s", "0.2", "--wait-healthy", f"http://127.0.0.1:{port}/health",
        "--", sys.executable, "-m", "control_plane", "sim", "--port", str(port), "--model",
        "sim-model", "--time-scale", "0.01")
    try:
        await stack.wait_listener()
        await asyncio.to_thread(wait_for, lambda: stack.envoy.hosts("sim") == {"s0": "healthy"},
                                30, "the simulator in Envoy")
        async with aiohttp.ClientSession() as session:
            status, _, body = await chat(session, stack.url, "sim-model")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]

        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for, lambda: stack.envoy.hosts("sim") == {}, 10,
                                "the simulator to leave Envoy")
        # Drained, then the simulator got SIGTERM and stopped cleanly: register exits with its 0.
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert not processes.port_open("127.0.0.1", port)
    finally:
        stop(process)
