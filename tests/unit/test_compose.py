"""docker-compose.yml, the Dockerfile and the Prometheus config: valid and wired together.

No Docker engine is needed: the compose file is validated against the compose spec offline,
and every service name, port, image version and command line it relies on is checked
against the code and the binaries the other tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from control_plane.cli.main import COMMANDS, build_parser
from control_plane.runtime import processes
from control_plane.runtime.bootstrap import COMPOSE, render_bootstrap
from control_plane.runtime.register import registration_from_args

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SPEC = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = SPEC["services"]
ETCD_URL = "http://etcd:2379"
NEVER_PUBLISHED = {COMPOSE.admin_port, COMPOSE.xds_port, 2379, 2380}


def command(name: str) -> list[str]:
    return [str(part) for part in SERVICES[name].get("command", [])]


def option(argv: list[str], name: str) -> str | None:
    """The value after ``name`` (or of ``name=value``) before any ``--`` separator."""
    argv = argv[:argv.index("--")] if "--" in argv else argv
    for index, part in enumerate(argv):
        if part == name:
            return argv[index + 1]
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def published(name: str) -> list[tuple[str, int]]:
    """(published, target port) pairs, short ("[ip:]host:container") or long syntax."""
    pairs = []
    for port in SERVICES[name].get("ports", []):
        if isinstance(port, dict):
            pairs.append((str(port.get("published", "")), int(port["target"])))
        else:
            parts = str(port).split(":")
            pairs.append((":".join(parts[:-1]), int(parts[-1])))
    return pairs


def profiles(name: str) -> frozenset[str]:
    return frozenset(SERVICES[name].get("profiles", []))


def is_one_shot(name: str) -> bool:
    return SERVICES[name].get("restart", "no") == "no"


def register_args(name: str) -> argparse.Namespace:
    argv = command(name)
    assert argv[0] == "register"
    return build_parser(argv).parse_args(argv)


def pools_created() -> dict[str, tuple[str, list[str]]]:
    """pool -> (one-shot service that creates it, models), from `pool put` commands."""
    found = {}
    for name in SERVICES:
        argv = command(name)
        if argv[:2] == ["pool", "put"]:
            models = [argv[i + 1] for i, part in enumerate(argv) if part == "--model"]
            found[argv[2]] = (name, models)
    return found


# -- the file itself -----------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec_offline() -> None:
    # The schema ships inside check-jsonschema: no network is used.
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE_FILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_bootstrap_is_the_generated_one() -> None:
    path = REPO / "envoy" / "bootstrap.compose.yaml"
    assert path.read_text() == render_bootstrap(COMPOSE), (
        "envoy/bootstrap.compose.yaml is stale: regenerate it with "
        "`python -m control_plane bootstrap --compose > envoy/bootstrap.compose.yaml`")


def test_envoy_runs_the_generated_bootstrap_with_a_dynamic_base_id() -> None:
    argv = command("envoy")
    mounts = dict(volume.split(":")[:2] for volume in SERVICES["envoy"]["volumes"])
    assert mounts.get("./envoy/bootstrap.compose.yaml") == option(argv, "-c")
    assert "--use-dynamic-base-id" in argv


# -- names and ports -----------------------------------------------------------------------


def test_bootstraps_xds_address_is_the_control_planes_xds_listener() -> None:
    assert COMPOSE.xds_host in SERVICES
    xds = option(command(COMPOSE.xds_host), "--xds")
    assert xds == f"0.0.0.0:{COMPOSE.xds_port}"


def test_control_planes_listener_is_envoys_published_port() -> None:
    listen = option(command("control-plane"), "--listen")
    assert listen is not None
    host, _, port = listen.rpartition(":")
    assert host == "0.0.0.0", "inside its container Envoy must listen on every interface"
    assert [target for _, target in published("envoy")] == [int(port)]


def test_only_envoys_listener_is_published_by_default() -> None:
    default = {name: published(name) for name in SERVICES if not profiles(name)}
    assert {name: ports for name, ports in default.items() if ports} == {
        "envoy": [("127.0.0.1:10000", 10000)]}


def test_admin_xds_and_etcd_ports_are_never_published() -> None:
    for name in SERVICES:
        for _, target in published(name):
            assert target not in NEVER_PUBLISHED, f"{name} publishes {target}"


def test_every_etcd_url_is_the_etcd_service() -> None:
    etcd = command("etcd")
    assert option(etcd, "--advertise-client-urls") == ETCD_URL
    assert option(etcd, "--listen-client-urls") == "http://0.0.0.0:2379"
    users = [name for name in SERVICES if option(command(name), "--etcd") is not None]
    assert {"control-plane", "prober", "sim-pool", "sim-0"} <= set(users)
    for name in users:
        assert option(command(name), "--etcd") == ETCD_URL, name


def test_prober_reads_envoys_admin() -> None:
    admin = urlsplit(option(command("prober"), "--admin") or "")
    assert admin.hostname == "envoy" and "envoy" in SERVICES
    assert admin.port == COMPOSE.admin_port


def cli_subcommands() -> set[str]:
    return set(COMMANDS)


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if s.get("build")])
def test_hotpath_commands_parse_with_the_cli(name: str) -> None:
    argv = command(name)
    if argv[0] not in cli_subcommands():
        pytest.skip(f"`hotpath {argv[0]}` is not in the CLI yet")
    build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("name", [n for n in SERVICES if command(n)[:1] == ["register"]])
def test_registrations_validate_and_point_at_the_server(name: str) -> None:
    args = register_args(name)
    registration = registration_from_args(args)  # the control plane's own validation
    assert args.address in SERVICES, f"{name}: --address {args.address} is no service"
    if registration.command:  # wrapper: the server runs in this very container
        assert args.address == name
        server_argv = list(registration.command)
        if server_argv[0] == "hotpath":
            build_parser(server_argv[1:]).parse_args(server_argv[1:])
        models = [server_argv[i + 1] for i, p in enumerate(server_argv) if p == "--model"]
    else:  # sidecar: the server is another service
        server_argv = command(args.address)
        models = [option(server_argv, "--served-model-name") or ""]
    assert option(server_argv, "--port") == str(args.port)
    assert args.wait_healthy is not None
    health = urlsplit(args.wait_healthy)
    assert health.port == args.port and health.hostname in ("127.0.0.1", args.address)
    creator, pool_models = pools_created()[args.pool]
    assert set(models) <= set(pool_models), f"{name} serves {models}, pool has {pool_models}"
    assert profiles(creator) <= profiles(name), f"{creator} would not run with {name}"
    assert SERVICES[name]["depends_on"][creator]["condition"] == \
        "service_completed_successfully"


def test_the_demo_pool_is_served_by_three_simulators() -> None:
    registered = {register_args(name).id for name in SERVICES
                  if command(name)[:1] == ["register"] and register_args(name).pool == "sim"}
    assert registered == {"sim-0", "sim-1", "sim-2"}
    assert pools_created()["sim"][1] == ["sim-model"]


# -- start order ---------------------------------------------------------------------------


def test_dependencies_exist_and_start_in_a_working_order() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            assert profiles(dependency) <= profiles(name), (
                f"{name} depends on {dependency}, which its profiles do not start")
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
            if is_one_shot(dependency):
                assert condition == "service_completed_successfully", (name, dependency)


def test_every_one_shot_is_awaited_so_up_wait_succeeds() -> None:
    # `docker compose up --wait` fails on an exited container nothing waits for.
    for shot in (name for name in SERVICES if is_one_shot(name)):
        waiters = [name for name, service in SERVICES.items()
                   if not is_one_shot(name) and profiles(name) == profiles(shot)
                   and service.get("depends_on", {}).get(shot, {}).get("condition")
                   == "service_completed_successfully"]
        assert waiters, f"no long-running service waits for one-shot {shot}"


def test_long_running_hotpath_services_restart() -> None:
    for name, service in SERVICES.items():
        if not is_one_shot(name):
            assert service["restart"] == "unless-stopped", name


# -- images --------------------------------------------------------------------------------


def test_envoy_image_is_the_tested_binarys_version() -> None:
    try:
        binary = processes.find_binary("envoy")
    except processes.MissingBinary:
        pytest.skip("no envoy binary here")
    output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                            timeout=30).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", output)
    assert match, output
    assert SERVICES["envoy"]["image"] == f"envoyproxy/envoy:v{match.group(1)}"


def test_etcd_image_is_a_fixed_3_5_with_persistence_and_compaction() -> None:
    image, _, tag = SERVICES["etcd"]["image"].partition(":")
    assert image == "quay.io/coreos/etcd"
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
    assert match, tag
    version = tuple(int(part) for part in match.groups())
    # 3.5.3 fixed 3.5's crash-consistency bug; 3.6 is untested here.
    assert (3, 5, 3) <= version < (3, 6, 0)
    argv = command("etcd")
    data_dir = option(argv, "--data-dir")
    volumes = dict(volume.split(":")[::-1] for volume in SERVICES["etcd"]["volumes"])
    assert volumes[str(data_dir)] in SPEC["volumes"], "etcd data must be on a named volume"
    assert option(argv, "--auto-compaction-mode") and option(argv, "--auto-compaction-retention")
    assert SERVICES["etcd"]["healthcheck"]["test"][-2:] == ["endpoint", "health"]


def test_hotpath_services_share_one_image_built_once_here() -> None:
    image = SERVICES["control-plane"]["image"]
    users = {name for name, service in SERVICES.items() if service.get("image") == image}
    assert {"control-plane", "prober", "sim-0", "sim-pool"} <= users
    builders = {name for name, service in SERVICES.items() if service.get("build")}
    assert builders == {"control-plane"} and SERVICES["control-plane"]["build"] == "."
    # The others never try a registry for an image that exists only on this host.
    assert all(SERVICES[name]["pull_policy"] == "never" for name in users - builders)


def test_dockerfile_is_slim_non_root_and_runs_hotpath() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    bases = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert bases and bases[-1] == "python:3.11-slim"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoints = [line for line in instructions if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoints[-1].split(None, 1)[1]) == ["hotpath"]
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!.venv" not in ignored  # the venv never enters the context


def test_vllm_profile_reserves_a_gpu() -> None:
    assert profiles("vllm") == {"vllm"}
    assert SERVICES["vllm"]["image"].startswith("vllm/vllm-openai:")
    devices = SERVICES["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", []) for device in devices)


# -- metrics -------------------------------------------------------------------------------


def test_prometheus_scrapes_services_that_exist() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {job: [t for group in spec["static_configs"] for t in group["targets"]]
               for job, spec in jobs.items()}
    for job, hosts in targets.items():
        for target in hosts:
            assert target.rsplit(":", 1)[0] in SERVICES, f"{job}: {target} is no service"
    assert targets["envoy"] == [f"envoy:{COMPOSE.admin_port}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    for name in ("control-plane", "prober"):  # each serves /metrics on its --metrics
        metrics = option(command(name), "--metrics") or ""
        assert metrics.startswith("0.0.0.0:"), f"{name}: Prometheus scrapes from outside"
        assert targets[name] == [f"{name}:{metrics.rpartition(':')[2]}"]
    mounts = [volume.split(":")[0] for volume in SERVICES["prometheus"]["volumes"]]
    assert "./deploy/prometheus.yml" in mounts


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "hotpath-dashboard.json").read_text())
    provisioned = yaml.safe_load(SPEC["configs"]["grafana-datasource"]["content"])
    uid = provisioned["datasources"][0]["uid"]
    panels = dashboard["panels"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]


# -- the smoke script ----------------------------------------------------------------------


def test_smoke_script_is_executable_bash_that_always_tears_down() -> None:
    script = REPO / "scripts" / "compose-smoke"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "trap cleanup EXIT" in text and "docker compose down -v" in text
    assert "up -d --build --wait" in text
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
