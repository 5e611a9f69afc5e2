"""The gateways people pick instead of hotpath, started in front of the same backends.

- nginx (Debian package `nginx`): `hash $http_x_session_id consistent` (ketama), upstream
  keepalive, no response buffering so streams pass through, request bodies kept in memory.
- vllm-router (PyPI `vllm-router`, Rust): `--policy consistent_hash`, which keys on the
  `x-session-id` header.
- sglang-router (PyPI `sglang-router`, Rust): `--policy cache_aware`, its default and flagship
  (a prefix tree of recent requests per worker; this version has no consistent-hash policy).

Servers that join mid-run (`add_backends`) reach each one the way it takes them at runtime:
nginx by a new configuration and a reload (SIGHUP: new workers take the new upstreams, old
ones finish their requests; open-source nginx has no upstream API), vllm-router by `POST
/add_worker?url=`, sglang-router by `POST /workers` (it adds them in the background: the
bench waits until `GET /workers` lists them healthy).

Each is looked up in `--peers-bin` (or HOTPATH_BENCH_PEERS_BIN), then beside this Python, then
on PATH, and skipped with a note when absent. The two routers pull web frameworks of their own:
install them in a separate virtual environment and point `--peers-bin` at its bin/.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from control_plane.bench.strategies import Backend
from control_plane.errors import BenchError
from control_plane.runtime import processes
from control_plane.runtime.supervisor import ProcessGroup


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    binary: str
    install: str


PEERS = (
    Peer("nginx-hash", "nginx hash consistent", "nginx", "apt-get install -y nginx"),
    Peer("vllm-router", "vllm-router consistent_hash", "vllm-router",
         "python -m venv ~/.hotpath-peers && ~/.hotpath-peers/bin/pip install vllm-router; "
         "then --peers-bin ~/.hotpath-peers/bin"),
    Peer("sglang-router", "sglang-router cache_aware", "sglang-router",
         "python -m venv ~/.hotpath-peers && ~/.hotpath-peers/bin/pip install sglang-router; "
         "then --peers-bin ~/.hotpath-peers/bin"),
)
PEER_BY_NAME = {p.name: p for p in PEERS}


def find_peer(peer: Peer, peers_bin: str | None) -> str | None:
    dirs = [d for d in (peers_bin, os.environ.get("HOTPATH_BENCH_PEERS_BIN")) if d]
    dirs.append(str(Path(sys.executable).parent))
    for d in dirs:
        candidate = Path(d).expanduser() / peer.binary
        if candidate.exists():
            return str(candidate)
    found = shutil.which(peer.binary)
    if found is None and peer.binary == "nginx" and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"  # Debian's nginx is outside a normal user's PATH
    return found


def nginx_conf(workdir: Path, port: int, backends: Sequence[Backend]) -> str:
    servers = "\n".join(f"    server {b.host}:{b.port};" for b in backends)
    # Run as root (sandboxes, CI): workers would be `nobody` and could not use the temp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"  {kind}_temp_path {workdir}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}daemon off;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {workdir}/access.log;
{temp}
  upstream pool {{
    hash $http_x_session_id consistent;
{servers}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 8m;
    # Bodies stay in memory, as Envoy keeps them (up to the same 8 MiB): with nginx's 16 KiB
    # default a long chat's body goes to a temporary file first, ~40 ms a turn here.
    client_body_buffer_size 8m;
    location / {{
      add_header x-bench-upstreams {len(backends)} always;
      proxy_pass http://pool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 900s;
    }}
  }}
}}
"""


def peer_command(peer: Peer, binary: str, workdir: Path, port: int,
                 backends: Sequence[Backend]) -> list[str]:
    urls = [b.url for b in backends]
    if peer.name == "nginx-hash":
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, port, backends))
        return [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    metrics = str(processes.free_port())  # their Prometheus exporters default to a fixed port
    if peer.name == "vllm-router":
        return [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                "--policy", "consistent_hash", "--prometheus-host", "127.0.0.1",
                "--prometheus-port", metrics, "--log-level", "warning"]
    if peer.name == "sglang-router":
        return [binary, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                *urls, "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
                "--prometheus-port", metrics, "--log-level", "warn"]
    raise ValueError(f"unknown peer {peer.name}")


async def start_peer(group: ProcessGroup, peer: Peer, binary: str, backends: Sequence[Backend],
                     tag: str) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `peer` in front of `backends`; (its URL, the process) once it forwards requests."""
    port = processes.free_port()
    name = f"{peer.name}-{tag}"
    child = group.start(name, peer_command(peer, binary, group.workdir / name, port, backends))
    url = f"http://127.0.0.1:{port}"
    await group.wait(name, child, lambda: processes.port_open("127.0.0.1", port), 60,
                     "listening")
    # The routers accept connections before their workers are registered: wait until a
    # request that warms nothing (GET /v1/models) goes through.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            if child.poll() is not None:
                raise group.fail(name, f"exited with code {child.returncode}")
            try:
                async with http.get(f"{url}/v1/models") as resp:
                    if resp.status == 200:
                        break
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() > deadline:
                raise BenchError(f"{name} does not forward GET /v1/models after 60s; see "
                                 f"{group.log_path(name)}")
            await asyncio.sleep(0.2)
    return url, child


async def add_backends(group: ProcessGroup, peer: Peer, tag: str, url: str,
                       child: subprocess.Popen[bytes], backends: Sequence[Backend],
                       joining: Sequence[Backend], timeout_s: float = 30.0) -> None:
    """Add `joining` to a running peer (started by `start_peer(..., tag)`) whose servers are
    then `backends` (the old ones and `joining`); return once the peer routes to them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    name = f"{peer.name}-{tag}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        if peer.name == "nginx-hash":
            workdir = group.workdir / name
            conf = workdir / "nginx.conf"
            conf.write_text(nginx_conf(workdir, int(url.rsplit(":", 1)[1]), backends))
            child.send_signal(signal.SIGHUP)  # the master re-reads it and starts new workers

            async def ready() -> bool:
                # A new connection each time: an old worker keeps its open ones until done.
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as one, \
                        one.get(f"{url}/v1/models") as resp:
                    return resp.headers.get("x-bench-upstreams") == str(len(backends))
        elif peer.name == "vllm-router":
            for b in joining:
                async with http.post(f"{url}/add_worker", params={"url": b.url}) as resp:
                    if resp.status != 200:
                        raise BenchError(f"{name}: POST /add_worker?url={b.url} answered "
                                         f"{resp.status}: {(await resp.text())[:200]}")

            async def ready() -> bool:
                async with http.get(f"{url}/list_workers") as resp:
                    listed = (await resp.json(content_type=None)).get("urls", [])
                return {b.url for b in backends} <= set(listed)
        elif peer.name == "sglang-router":
            for b in joining:
                async with http.post(f"{url}/workers", json={"url": b.url}) as resp:
                    if resp.status not in (200, 201, 202):
                        raise BenchError(f"{name}: POST /workers {b.url} answered "
                                         f"{resp.status}: {(await resp.text())[:200]}")

            async def ready() -> bool:
                async with http.get(f"{url}/workers") as resp:
                    listed = (await resp.json(content_type=None)).get("workers", [])
                healthy = {w.get("url") for w in listed
                           if isinstance(w, dict) and w.get("is_healthy")}
                return {b.url for b in backends} <= healthy
        else:
            raise ValueError(f"unknown peer {peer.name}")
        while True:
            if child.poll() is not None:
                raise group.fail(name, f"exited with code {child.returncode}")
            try:
                if await ready():
                    return
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
                pass  # not up yet, or not the JSON shape expected: ask again
            if loop.time() > deadline:
                raise BenchError(f"{name} does not route to {[b.url for b in joining]} "
                                 f"{timeout_s:g}s after adding them; see {group.log_path(name)}")
            await asyncio.sleep(0.05)
