"""The `hotpath` command. Each subcommand only parses arguments and calls one function."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from etcd3aio import EtcdError

from control_plane import admin
from control_plane.bench import add_bench_arguments, run_bench_from_args
from control_plane.config_file import (
    add_apply_arguments,
    add_export_arguments,
    run_apply_from_args,
    run_export_from_args,
)
from control_plane.model import ConfigError, GatewaySettings
from control_plane.register import add_register_arguments, run_register_from_args
from control_plane.sim.server import add_sim_arguments
from control_plane.store.etcd import DEFAULT_ETCD, DEFAULT_PREFIX, EtcdSettings, EtcdSettingsError
from control_plane.warmth.service import add_prober_arguments, run_prober_from_args
from control_plane.xds.server import XdsServerTls

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _add_etcd_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("etcd")
    group.add_argument("--etcd", default=env("HOTPATH_ETCD", DEFAULT_ETCD),
                       help="etcd URL(s), comma-separated (env HOTPATH_ETCD; default %(default)s)")
    group.add_argument("--prefix", default=env("HOTPATH_PREFIX", DEFAULT_PREFIX),
                       help="key prefix (env HOTPATH_PREFIX; default %(default)s)")
    group.add_argument("--etcd-ca", default=env("HOTPATH_ETCD_CA"), help="CA certificate (PEM)")
    group.add_argument("--etcd-cert", default=env("HOTPATH_ETCD_CERT"),
                       help="client certificate (PEM) for mTLS")
    group.add_argument("--etcd-key", default=env("HOTPATH_ETCD_KEY"),
                       help="client key (PEM) for mTLS")
    group.add_argument("--etcd-user", default=env("HOTPATH_ETCD_USER"), help="etcd user")
    group.add_argument("--etcd-password", default=env("HOTPATH_ETCD_PASSWORD"),
                       help="etcd password (prefer the env variable HOTPATH_ETCD_PASSWORD)")


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    return EtcdSettings(urls=args.etcd, prefix=prefix, ca_file=args.etcd_ca,
                        cert_file=args.etcd_cert, key_file=args.etcd_key, user=args.etcd_user,
                        password=args.etcd_password)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)


# -- subcommands -------------------------------------------------------------------------


async def cmd_up(args: argparse.Namespace) -> int:
    from control_plane.up import UpSettings, run_up

    host, port = args.listen
    return await run_up(UpSettings(
        listen_host=host, listen_port=port, admin_port=args.admin_port, xds_port=args.xds_port,
        metrics_port=args.metrics_port, prober_metrics_port=args.prober_metrics_port,
        etcd_url=args.etcd, etcd_client_port=args.etcd_port, etcd_peer_port=args.etcd_peer_port,
        sim_base_port=args.sim_port, with_sim=not args.no_sim, with_prober=not args.no_prober,
        data_dir=Path(args.data_dir), prefix=args.prefix,
    ))


async def cmd_control_plane(args: argparse.Namespace) -> int:
    from control_plane.app import ControlPlaneSettings, run_control_plane

    host, port = args.listen
    gateway = GatewaySettings(listen_address=host, listen_port=port,
                              max_body_bytes=args.max_body_bytes,
                              idle_timeout_s=args.idle_timeout, access_log_path=args.access_log)
    await run_control_plane(ControlPlaneSettings(
        etcd=etcd_settings(args), gateway=gateway, xds_address=args.xds,
        metrics_address=None if args.metrics == "off" else args.metrics,
        xds_tls=_xds_server_tls(args)))
    return 0


def _xds_server_tls(args: argparse.Namespace) -> XdsServerTls | None:
    if not (args.xds_cert or args.xds_key or args.xds_client_ca):
        return None
    if not (args.xds_cert and args.xds_key):
        raise ConfigError("--xds-cert/--xds-key", "xDS TLS needs both a certificate and a key")
    try:
        return XdsServerTls(
            cert=Path(args.xds_cert).read_bytes(), key=Path(args.xds_key).read_bytes(),
            client_ca=Path(args.xds_client_ca).read_bytes() if args.xds_client_ca else None)
    except OSError as exc:
        raise ConfigError("xDS TLS", f"cannot read {exc.filename}: {exc.strerror}") from None
    return 0


async def cmd_bootstrap(args: argparse.Namespace) -> int:
    from control_plane.bootstrap import COMPOSE, BootstrapSettings, XdsClientTls, render_bootstrap

    tls = None
    if args.xds_ca or args.xds_cert or args.xds_key:
        if not (args.xds_ca and args.xds_cert and args.xds_key):
            raise ConfigError("bootstrap", "xDS mTLS needs --xds-ca, --xds-cert and --xds-key")
        tls = XdsClientTls(ca_file=args.xds_ca, cert_file=args.xds_cert, key_file=args.xds_key)
    if args.compose:
        settings = dataclasses.replace(COMPOSE, xds_tls=tls)
    else:
        xds_host, xds_port = args.xds
        admin_host, admin_port = args.admin
        settings = BootstrapSettings(node_id=args.node_id, xds_host=xds_host, xds_port=xds_port,
                                     admin_host=admin_host, admin_port=admin_port, xds_tls=tls)
    sys.stdout.write(render_bootstrap(settings))
    return 0


async def cmd_pool_put(args: argparse.Namespace) -> int:
    value: dict[str, Any] = {"models": args.model}
    for name in ("lb", "session_header", "hash_balance_factor"):
        if getattr(args, name) is not None:
            value[name] = getattr(args, name)
    if args.warmup is not None:
        value["warmup"] = json.loads(args.warmup)
    pool = await admin.put_pool(etcd_settings(args), args.name, value)
    print(f"pool {pool.name}: models {', '.join(pool.models)}, lb {pool.lb}")
    return 0


async def cmd_pool_list(args: argparse.Namespace) -> int:
    state = await admin.read_state(etcd_settings(args))
    for pool in state.config().pools.values():
        print(json.dumps({"pool": pool.name, **_pool_json(pool)}))
    return 0


def _pool_json(pool: Any) -> dict[str, Any]:
    from control_plane.model import pool_to_json

    return pool_to_json(pool)


async def cmd_pool_rm(args: argparse.Namespace) -> int:
    keys = [(f"pools/{args.name}", False)]
    if args.with_endpoints:
        keys += [(f"endpoints/{args.name}/", True), (f"status/{args.name}/", True)]
    removed = await admin.remove(etcd_settings(args), keys)
    print(f"removed {removed} key(s)")
    return 0 if removed else 1


async def cmd_endpoint_put(args: argparse.Namespace) -> int:
    value: dict[str, Any] = {"address": args.address, "port": args.port}
    if args.weight is not None:
        value["weight"] = args.weight
    endpoint = await admin.put_endpoint(etcd_settings(args), args.pool, args.id, value)
    print(f"endpoint {endpoint.pool}/{endpoint.id}: {endpoint.address}:{endpoint.port}")
    return 0


async def cmd_endpoint_list(args: argparse.Namespace) -> int:
    state = await admin.read_state(etcd_settings(args))
    for pool, endpoints in state.config().endpoints.items():
        if args.pool and pool != args.pool:
            continue
        for endpoint in endpoints.values():
            print(json.dumps({"pool": pool, "id": endpoint.id, "address": endpoint.address,
                              "port": endpoint.port, "weight": endpoint.weight}))
    return 0


async def cmd_endpoint_rm(args: argparse.Namespace) -> int:
    removed = await admin.remove(etcd_settings(args), [
        (f"endpoints/{args.pool}/{args.id}", False), (f"status/{args.pool}/{args.id}", False)])
    print(f"removed {removed} key(s)")
    return 0 if removed else 1


async def cmd_status(args: argparse.Namespace) -> int:
    state = await admin.read_state(etcd_settings(args))
    hosts = await asyncio.to_thread(admin.envoy_hosts, args.admin)
    rows = admin.status_rows(state, hosts, time.time())
    if args.json:
        print(json.dumps({"revision": state.revision, "envoy_reachable": hosts is not None,
                          "endpoints": rows, "rejected": state.rejected}, indent=2))
    else:
        print(admin.format_table(rows, state.rejected))
        if hosts is None:
            print(f"(Envoy admin at {args.admin} unreachable: ENVOY column unknown)")
    return 0


async def cmd_sim(args: argparse.Namespace) -> int:
    from control_plane.sim.server import run_from_args

    await run_from_args(args)
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotpath",
        description="Session-affinity gateway for LLM model servers (Envoy + xDS + etcd).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str, etcd: bool = True
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        if etcd:
            _add_etcd_options(p)
        return p

    up = command("up", cmd_up, "run the whole stack on this machine (etcd, control plane, "
                 "prober, Envoy; simulated GPUs when no endpoint is configured)")
    up.set_defaults(etcd=None)
    up.add_argument("--listen", type=_host_port, default=("127.0.0.1", 10000),
                    help="Envoy listener HOST:PORT (default 127.0.0.1:10000)")
    up.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (loopback)")
    up.add_argument("--xds-port", type=int, default=18000, help="xDS port (loopback)")
    up.add_argument("--metrics-port", type=int, default=9101,
                    help="control-plane /metrics port (loopback; default %(default)s)")
    up.add_argument("--prober-metrics-port", type=int, default=9102,
                    help="prober /metrics port (loopback; default %(default)s)")
    up.add_argument("--etcd-port", type=int, default=2379,
                    help="embedded etcd client port (loopback; default %(default)s)")
    up.add_argument("--etcd-peer-port", type=int, default=2380,
                    help="embedded etcd peer port (loopback; default %(default)s)")
    up.add_argument("--sim-port", type=int, default=8001,
                    help="first port of the simulated GPU servers (default %(default)s)")
    up.add_argument("--data-dir", default=".hotpath", help="etcd data and logs (%(default)s)")
    up.add_argument("--no-sim", action="store_true", help="never start simulated GPU servers")
    up.add_argument("--no-prober", action="store_true", help="do not start the prober")
    for action in up._actions:
        if action.dest == "etcd":
            action.default = None
            action.help = "use this etcd instead of starting the embedded one"

    cp = command("control-plane", cmd_control_plane,
                 "run the xDS control plane (etcd -> Envoy over ADS)")
    cp.add_argument("--xds", default="127.0.0.1:18000", help="ADS listen HOST:PORT")
    cp.add_argument("--xds-cert", help="serve xDS over TLS with this certificate (PEM)")
    cp.add_argument("--xds-key", help="private key (PEM) for --xds-cert")
    cp.add_argument("--xds-client-ca", help="require Envoys to present a client certificate "
                    "signed by this CA (mTLS)")
    cp.add_argument("--metrics", default="127.0.0.1:9101",
                    help="HOST:PORT for /metrics and /healthz, or 'off' (default %(default)s)")
    cp.add_argument("--listen", type=_host_port, default=("127.0.0.1", 10000),
                    help="address Envoy's listener binds (default 127.0.0.1:10000)")
    cp.add_argument("--max-body-bytes", type=int, default=GatewaySettings.max_body_bytes,
                    help="request body limit; larger bodies get 413 (default 8 MiB)")
    cp.add_argument("--idle-timeout", type=float, default=GatewaySettings.idle_timeout_s,
                    help="seconds without upstream bytes before 504 (default %(default)s)")
    cp.add_argument("--access-log", default=GatewaySettings.access_log_path,
                    help="Envoy access log path (default %(default)s)")

    boot = command("bootstrap", cmd_bootstrap, "print an Envoy bootstrap for hotpath",
                   etcd=False)
    boot.add_argument("--compose", action="store_true", help="the docker-compose variant")
    boot.add_argument("--xds", type=_host_port, default=("127.0.0.1", 18000))
    boot.add_argument("--admin", type=_host_port, default=("127.0.0.1", 9901))
    boot.add_argument("--node-id", default="hotpath-envoy")
    boot.add_argument("--xds-ca", help="CA (PEM path) that signed the control plane's cert")
    boot.add_argument("--xds-cert", help="Envoy's client certificate (PEM path) for xDS mTLS")
    boot.add_argument("--xds-key", help="Envoy's client key (PEM path) for xDS mTLS")

    pool = sub.add_parser("pool", help="put, list or remove pools").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    put = pool.add_parser("put", help="create or replace a pool")
    put.set_defaults(handler=cmd_pool_put)
    _add_etcd_options(put)
    put.add_argument("name")
    put.add_argument("--model", action="append", required=True, help="model name (repeatable)")
    put.add_argument("--lb", choices=["ring_hash", "maglev", "round_robin", "least_request"])
    put.add_argument("--session-header", dest="session_header")
    put.add_argument("--hash-balance-factor", dest="hash_balance_factor", type=int)
    put.add_argument("--warmup", help="warmup settings as a JSON object")
    ls = pool.add_parser("list", help="list pools (JSON lines)")
    ls.set_defaults(handler=cmd_pool_list)
    _add_etcd_options(ls)
    rm = pool.add_parser("rm", help="remove a pool")
    rm.set_defaults(handler=cmd_pool_rm)
    _add_etcd_options(rm)
    rm.add_argument("name")
    rm.add_argument("--with-endpoints", action="store_true",
                    help="also remove the pool's endpoints and statuses")

    endpoint = sub.add_parser("endpoint", help="put, list or remove endpoints").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    eput = endpoint.add_parser("put", help="create or replace an endpoint")
    eput.set_defaults(handler=cmd_endpoint_put)
    _add_etcd_options(eput)
    eput.add_argument("pool")
    eput.add_argument("id")
    eput.add_argument("--address", required=True, help="IP or hostname")
    eput.add_argument("--port", type=int, required=True)
    eput.add_argument("--weight", type=int)
    els = endpoint.add_parser("list", help="list endpoints (JSON lines)")
    els.set_defaults(handler=cmd_endpoint_list)
    _add_etcd_options(els)
    els.add_argument("pool", nargs="?")
    erm = endpoint.add_parser("rm", help="remove an endpoint")
    erm.set_defaults(handler=cmd_endpoint_rm)
    _add_etcd_options(erm)
    erm.add_argument("pool")
    erm.add_argument("id")

    status = command("status", cmd_status, "pools, endpoints, warmth and Envoy's view")
    status.add_argument("--admin", default=os.environ.get("HOTPATH_ADMIN",
                                                          "http://127.0.0.1:9901"),
                        help="Envoy admin URL (env HOTPATH_ADMIN; default %(default)s)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    add_bench_arguments(command(
        "bench", run_bench_from_args,
        "replay multi-turn chat sessions through routing strategies and gateways, and report",
        etcd=False))
    add_sim_arguments(command("sim", cmd_sim,
                              "run simulated OpenAI-compatible GPU model servers", etcd=False))
    add_prober_arguments(command(
        "prober", run_prober_from_args,
        "keep endpoints warm with 1-token requests and report warm/cold/down to etcd"))
    add_register_arguments(command(
        "register", run_register_from_args,
        "keep a model server registered in a pool while it runs (etcd lease)"))
    add_apply_arguments(command("apply", run_apply_from_args,
                                "make etcd match a YAML/JSON config file"))
    add_export_arguments(command("export", run_export_from_args,
                                 "print pools and endpoints in apply's format"))
    return parser


async def _until_signal(handler: Handler, args: argparse.Namespace) -> int:
    """Run a subcommand; SIGTERM (as from compose or `up`) stops it cleanly, like Ctrl-C."""
    task = asyncio.ensure_future(handler(args))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    handler: Handler = args.handler
    try:
        return asyncio.run(_until_signal(handler, args))
    except KeyboardInterrupt:
        return 130
    except (ConfigError, EtcdSettingsError) as exc:
        print(f"hotpath: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, EtcdError) as exc:
        print(f"hotpath: etcd at {getattr(args, 'etcd', '?')} failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
