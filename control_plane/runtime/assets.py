"""The shipped data files (envoy/, lua/): package data in a wheel, else the repo folders."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def asset_text(folder: str, name: str) -> str:
    """A file of envoy/ or lua/ (``folder``), as text."""
    try:
        return (resources.files(f"control_plane.assets.{folder}") / name).read_text(
            encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return (_REPO_ROOT / folder / name).read_text(encoding="utf-8")
