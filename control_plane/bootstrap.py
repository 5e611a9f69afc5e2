"""Envoy bootstrap rendering and the shipped data files (envoy/, lua/)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def asset_text(folder: str, name: str) -> str:
    """A file from envoy/ or lua/: package data in a wheel, the repo folder in a checkout."""
    try:
        return (resources.files(f"control_plane.assets.{folder}") / name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (_REPO_ROOT / folder / name).read_text()


@dataclass(frozen=True)
class BootstrapSettings:
    node_id: str = "hotpath-envoy"
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901


# The compose variant: control plane by service name, admin on the compose network only.
COMPOSE = BootstrapSettings(node_id="hotpath-envoy", xds_host="control-plane", xds_port=18000,
                            admin_host="0.0.0.0", admin_port=9901)


def render_bootstrap(settings: BootstrapSettings) -> str:
    template = string.Template(asset_text("envoy", "bootstrap.yaml.in"))
    return template.substitute(
        node_id=settings.node_id,
        xds_host=settings.xds_host,
        xds_port=settings.xds_port,
        admin_host=settings.admin_host,
        admin_port=settings.admin_port,
    )
