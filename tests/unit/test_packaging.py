"""The wheel ships every package: setuptools' list in pyproject.toml is explicit (envoy/ and
lua/ beside control_plane/ defeat its discovery), so a new package must be added there."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_control_plane_package_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    on_disk = {".".join(path.parent.relative_to(REPO).parts)
               for path in (REPO / "control_plane").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
