"""`hotpath up`, `control-plane`, `prober`, `register`, `bootstrap`: the long-running parts."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from control_plane.app import ControlPlaneSettings, run_control_plane
from control_plane.cli.options import (
    add_etcd_options,
    address_or_off,
    admin_urls_from_env,
    at_least,
    etcd_settings,
    host_port,
    positive,
    urls_from_env,
)
from control_plane.config.model import DEFAULT_SYSTEM_PROMPT, GatewaySettings
from control_plane.config.pins import MAX_PINS
from control_plane.errors import UsageError
from control_plane.prober import state as machine
from control_plane.prober.service import (
    DEFAULT_IDLE_HORIZON_S,
    DEFAULT_LEADER_TTL_S,
    DEFAULT_METRICS,
    ProberSettings,
    run_prober,
)
from control_plane.runtime.bootstrap import (
    COMPOSE,
    DELTA_DEFAULT,
    BootstrapSettings,
    XdsClientTls,
    render_bootstrap,
)
from control_plane.runtime.register import MIN_TTL_S, registration_from_args, run_register
from control_plane.runtime.signals import Shutdown
from control_plane.runtime.up import UpSettings, run_up
from control_plane.traffic.judge import DEFAULT_PREFILL_MS_PER_KIB
from control_plane.xds.server import XdsServerTls

# -- up ----------------------------------------------------------------------------------


async def cmd_up(args: argparse.Namespace, _: Shutdown) -> int:
    host, port = args.listen
    etcd = etcd_settings(args)
    return await run_up(UpSettings(
        listen_host=host, listen_port=port, admin_port=args.admin_port, xds_port=args.xds_port,
        metrics_port=args.metrics_port, prober_metrics_port=args.prober_metrics_port,
        etcd=etcd if args.etcd is not None else None, prefix=etcd.prefix,
        etcd_client_port=args.etcd_port, etcd_peer_port=args.etcd_peer_port,
        sim_base_port=args.sim_port, with_sim=not args.no_sim, with_prober=not args.no_prober,
        data_dir=Path(args.data_dir), delta=args.delta,
    ))


def add_ads_flavour(p: argparse.ArgumentParser) -> None:
    """--delta / --sotw: the bootstrap's ADS api_type (docs/scale.md has the figures)."""
    flavour = p.add_mutually_exclusive_group()
    flavour.add_argument("--delta", dest="delta", action="store_true", default=DELTA_DEFAULT,
                         help="Envoy uses incremental (delta) ADS, DELTA_GRPC"
                              + (" (default)" if DELTA_DEFAULT else ""))
    flavour.add_argument("--sotw", dest="delta", action="store_false",
                         help="Envoy uses state-of-the-world ADS, GRPC"
                              + ("" if DELTA_DEFAULT else " (default)"))


def configure_up(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_up)
    add_etcd_options(p)
    p.set_defaults(etcd=None)
    for action in p._actions:
        if action.dest == "etcd":
            action.default = None
            action.help = "use this etcd instead of starting the embedded one"
    p.add_argument("--listen", type=host_port, default=("127.0.0.1", 10000),
                   help="Envoy listener HOST:PORT (default 127.0.0.1:10000)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (loopback)")
    p.add_argument("--xds-port", type=int, default=18000, help="xDS port (loopback)")
    p.add_argument("--metrics-port", type=int, default=9101,
                   help="control-plane /metrics port (loopback; default %(default)s)")
    p.add_argument("--prober-metrics-port", type=int, default=9102,
                   help="prober /metrics port (loopback; default %(default)s)")
    p.add_argument("--etcd-port", type=int, default=2379,
                   help="embedded etcd client port (loopback; default %(default)s)")
    p.add_argument("--etcd-peer-port", type=int, default=2380,
                   help="embedded etcd peer port (loopback; default %(default)s)")
    p.add_argument("--sim-port", type=int, default=8001,
                   help="first port of the simulated GPU servers (default %(default)s)")
    p.add_argument("--data-dir", default=".hotpath", help="etcd data and logs (%(default)s)")
    p.add_argument("--no-sim", action="store_true", help="never start simulated GPU servers")
    p.add_argument("--no-prober", action="store_true", help="do not start the prober")
    add_ads_flavour(p)


# -- control-plane -------------------------------------------------------------------------


def _xds_server_tls(args: argparse.Namespace) -> XdsServerTls | None:
    if not (args.xds_cert or args.xds_key or args.xds_client_ca):
        return None
    if not (args.xds_cert and args.xds_key):
        raise UsageError("xDS TLS needs both --xds-cert and --xds-key")
    try:
        return XdsServerTls(
            cert=Path(args.xds_cert).read_bytes(), key=Path(args.xds_key).read_bytes(),
            client_ca=Path(args.xds_client_ca).read_bytes() if args.xds_client_ca else None)
    except OSError as exc:
        raise UsageError(f"xDS TLS: cannot read {exc.filename}: {exc.strerror}") from None


async def cmd_control_plane(args: argparse.Namespace, _: Shutdown) -> int:
    host, port = args.listen
    if args.max_body_bytes <= 0:
        raise UsageError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    gateway = GatewaySettings(listen_address=host, listen_port=port,
                              max_body_bytes=args.max_body_bytes,
                              idle_timeout_s=args.idle_timeout, access_log_path=args.access_log,
                              traffic_stream=not args.no_traffic_stream)
    await run_control_plane(ControlPlaneSettings(
        etcd=etcd_settings(args), gateway=gateway, xds_address=args.xds,
        metrics_address=args.metrics or None, xds_tls=_xds_server_tls(args),
        peers=tuple(args.peer or args.peer_default), max_pins=args.max_pins))
    return 0


def _pin_cap(text: str) -> int:
    value = int(at_least(0, int)(text))
    if value > MAX_PINS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_PINS}, got {text}")
    return value


def configure_control_plane(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_control_plane)
    add_etcd_options(p)
    p.add_argument("--xds", default="127.0.0.1:18000", help="ADS listen HOST:PORT")
    p.add_argument("--xds-cert", help="serve xDS over TLS with this certificate (PEM)")
    p.add_argument("--xds-key", help="private key (PEM) for --xds-cert")
    p.add_argument("--xds-client-ca", help="require Envoys to present a client certificate "
                   "signed by this CA (mTLS)")
    p.add_argument("--metrics", type=address_or_off, default="127.0.0.1:9101",
                   help="HOST:PORT for /metrics and /healthz, or 'off' (default %(default)s)")
    p.add_argument("--listen", type=host_port, default=("127.0.0.1", 10000),
                   help="address Envoy's listener binds (default 127.0.0.1:10000)")
    p.add_argument("--max-body-bytes", type=int, default=GatewaySettings.max_body_bytes,
                   help="request body limit; larger bodies get 413 (default 8 MiB)")
    p.add_argument("--idle-timeout", type=positive, default=GatewaySettings.idle_timeout_s,
                   help="seconds without upstream bytes before 504 (default %(default)s)")
    p.add_argument("--access-log", default=GatewaySettings.access_log_path,
                   help="Envoy access log path (default %(default)s)")
    p.add_argument("--peer", action="append", default=None, metavar="URL",
                   help="another control plane's metrics URL (repeatable; env HOTPATH_PEERS, "
                        "comma-separated): with several control planes, list the others on "
                        "each, so the split leader keeps every Envoy's active sessions on "
                        "their arm")
    p.set_defaults(peer_default=urls_from_env("HOTPATH_PEERS"))
    p.add_argument("--no-traffic-stream", action="store_true",
                   help="do not have Envoy stream request timings to the control plane "
                        "(warmth then comes from probes only)")
    p.add_argument("--max-pins", type=_pin_cap, default=MAX_PINS, metavar="N",
                   help="pins kept per ring-hash pool when a ring change would move active "
                        "sessions; past it the least recently seen go first; 0 turns pins "
                        "off (default %(default)s; docs/affinity.md)")


# -- bootstrap -----------------------------------------------------------------------------


async def cmd_bootstrap(args: argparse.Namespace, _: Shutdown) -> int:
    tls = None
    if args.xds_ca or args.xds_cert or args.xds_key:
        if not (args.xds_ca and args.xds_cert and args.xds_key):
            raise UsageError("xDS mTLS needs --xds-ca, --xds-cert and --xds-key")
        tls = XdsClientTls(ca_file=args.xds_ca, cert_file=args.xds_cert, key_file=args.xds_key)
    if args.compose:
        settings = dataclasses.replace(COMPOSE, xds_tls=tls, delta=args.delta)
    else:
        xds_host, xds_port = args.xds
        admin_host, admin_port = args.admin
        settings = BootstrapSettings(node_id=args.node_id, xds_host=xds_host, xds_port=xds_port,
                                     admin_host=admin_host, admin_port=admin_port, xds_tls=tls,
                                     delta=args.delta)
    sys.stdout.write(render_bootstrap(settings))
    return 0


def configure_bootstrap(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_bootstrap)
    p.add_argument("--compose", action="store_true", help="the docker-compose variant")
    p.add_argument("--xds", type=host_port, default=("127.0.0.1", 18000))
    p.add_argument("--admin", type=host_port, default=("127.0.0.1", 9901))
    p.add_argument("--node-id", default="hotpath-envoy")
    p.add_argument("--xds-ca", help="CA (PEM path) that signed the control plane's cert")
    p.add_argument("--xds-cert", help="Envoy's client certificate (PEM path) for xDS mTLS")
    p.add_argument("--xds-key", help="Envoy's client key (PEM path) for xDS mTLS")
    add_ads_flavour(p)


# -- prober --------------------------------------------------------------------------------


def _min_warm(value: str) -> tuple[str | None, int]:
    pool, _, count = value.rpartition("=")
    if not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected N or POOL=N, got {value!r}")
    return (pool or None), int(count)


def prober_settings(args: argparse.Namespace) -> ProberSettings:
    min_warm: int | None = None
    per_pool: dict[str, int] = {}
    for pool, count in args.min_warm or []:
        if pool is None:
            min_warm = count
        else:
            per_pool[pool] = count
    return ProberSettings(
        etcd=etcd_settings(args),
        admin_urls=tuple(args.admin or args.admin_default),
        traffic_urls=tuple(args.traffic or args.traffic_default),
        prefill_ms_per_kib=args.prefill_ms_per_kib,
        metrics_address=args.metrics or None,
        system_prompt=args.system_prompt,
        thresholds=machine.Thresholds(rise=args.rise, fall=args.fall),
        idle_horizon_s=args.idle_horizon,
        min_warm=min_warm,
        min_warm_per_pool=per_pool,
        election=not args.no_election,
        leader_ttl_s=args.leader_ttl,
    )


async def cmd_prober(args: argparse.Namespace, _: Shutdown) -> int:
    await run_prober(prober_settings(args))
    return 0


def configure_prober(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_prober)
    add_etcd_options(p)
    p.add_argument("--admin", action="append", default=None, metavar="URL",
                   help="Envoy admin URL whose per-host counters show real traffic; "
                        "hosts with traffic get no probes (repeatable; env HOTPATH_ADMIN, "
                        "comma-separated; none: always probe)")
    p.set_defaults(admin_default=admin_urls_from_env())
    p.add_argument("--traffic", action="append", default=None, metavar="URL",
                   help="control-plane metrics URL whose /traffic window has real traffic's "
                        "time to first token: endpoints with traffic are judged by it, not "
                        "probed (repeatable: every control plane; env HOTPATH_TRAFFIC, "
                        "comma-separated; none: probes only)")
    p.set_defaults(traffic_default=urls_from_env("HOTPATH_TRAFFIC"))
    p.add_argument("--prefill-ms-per-kib", type=at_least(0, float),
                   default=DEFAULT_PREFILL_MS_PER_KIB, metavar="MS",
                   help="time to first token a healthy server needs per KiB of request body, "
                        "taken off each real request's before judging it, so long prompts do "
                        "not make a host look cold (default %(default)s: a GPU; llama.cpp on "
                        "a CPU needs ~1000)")
    p.add_argument("--metrics", type=address_or_off, default=DEFAULT_METRICS,
                   metavar="HOST:PORT",
                   help="serve /metrics and /healthz here (default %(default)s; off: none)")
    p.add_argument("--idle-horizon", type=positive, default=DEFAULT_IDLE_HORIZON_S,
                   metavar="SECONDS",
                   help="an endpoint without real traffic for this long may be let go "
                        "cold (no more probes), see --min-warm (default %(default)s)")
    p.add_argument("--min-warm", type=_min_warm, action="append", default=None,
                   metavar="N|POOL=N",
                   help="keep at least N endpoints per pool warm; idle ones beyond that "
                        "are let go cold (repeatable; default: keep all warm)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt of the default warm-up request: the prefix your "
                        "sessions share (default %(default)r)")
    p.add_argument("--rise", type=at_least(1, int), default=machine.Thresholds.rise,
                   help="consecutive better probes to move to a better state "
                        "(default %(default)s)")
    p.add_argument("--fall", type=at_least(1, int), default=machine.Thresholds.fall,
                   help="consecutive worse probes to move to a worse state "
                        "(default %(default)s)")
    p.add_argument("--leader-ttl", type=at_least(2, int), default=DEFAULT_LEADER_TTL_S,
                   metavar="SECONDS",
                   help="lease of the leader among several probers (default %(default)s)")
    p.add_argument("--no-election", action="store_true",
                   help="probe without electing a leader (one prober only)")


# -- register ------------------------------------------------------------------------------


async def cmd_register(args: argparse.Namespace, shutdown: Shutdown) -> int:
    return await run_register(etcd_settings(args), registration_from_args(args), shutdown)


def configure_register(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_register, watches_stop=True)
    add_etcd_options(p)
    p.add_argument("pool", help="pool the endpoint joins")
    p.add_argument("id", help="endpoint id, unique in the pool (Envoy's hostname for it)")
    p.add_argument("--address", required=True,
                   help="IP or hostname the gateway reaches the server at")
    p.add_argument("--port", type=int, required=True, help="the server's port")
    p.add_argument("--weight", type=int, help="load-balancing weight, 1-128 (default 1)")
    p.add_argument("--ttl", type=at_least(MIN_TTL_S, int), default=10,
                   help="lease seconds: the key vanishes this long after this process "
                        "dies without deregistering (default %(default)s)")
    p.add_argument("--wait-healthy", metavar="URL",
                   help="register only once URL answers 200 (e.g. the server's /health)")
    p.add_argument("--wait-timeout", type=at_least(0, float), metavar="S",
                   help="give up (exit 1) if --wait-healthy is not 200 after S seconds "
                        "(default: wait as long as the command runs)")
    p.add_argument("--drain-s", type=at_least(0, float), default=10.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds between deregistering and stopping "
                        "the command, for in-flight streams (default %(default)s)")
    p.add_argument("--stop-timeout", type=at_least(0, float), default=20.0, metavar="S",
                   help="seconds the command gets to exit after SIGTERM before SIGKILL "
                        "(default %(default)s)")
    command = p.add_argument(
        "command", nargs=argparse.PARSER, default=[], metavar="-- COMMAND",
        help="optional: the model server to run and supervise; its exit status becomes ours")
    # PARSER ("A...") only matches after the options, unlike "*" or REMAINDER, which
    # swallow or drop them on Python 3.11; it is required by default.
    command.required = False


COMMANDS = {
    "up": configure_up,
    "control-plane": configure_control_plane,
    "bootstrap": configure_bootstrap,
    "prober": configure_prober,
    "register": configure_register,
}
