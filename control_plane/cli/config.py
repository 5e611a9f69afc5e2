"""`hotpath pool`, `endpoint`, `apply`, `export`, `status`: configuration through etcd."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from control_plane.cli.options import (
    add_etcd_options,
    admin_urls_from_env,
    etcd_settings,
    positive,
    urls_from_env,
)
from control_plane.cli.status import (
    format_splits,
    format_table,
    session_counts,
    split_rows,
    status_rows,
    traffic_rows,
)
from control_plane.config.drains import DEFAULT_DRAIN_TIMEOUT_S
from control_plane.config.file import load_document, parse_document
from control_plane.config.model import LB_POLICIES, parse_split, pool_to_json, split_to_json
from control_plane.config.state import ConfigState
from control_plane.errors import ConfigError, UsageError
from control_plane.runtime.envoy_admin import fetch_hosts, fetch_sessions, fetch_traffic
from control_plane.runtime.signals import Shutdown
from control_plane.runtime.up import read_up_state
from control_plane.store import operations
from control_plane.store.apply import apply_document, export_document, read_text
from control_plane.store.etcd import etcd_client, put_json

# -- pool ----------------------------------------------------------------------------------


async def cmd_pool_put(args: argparse.Namespace, _: Shutdown) -> int:
    value: dict[str, Any] = {"models": args.model}
    for name in ("lb", "hash_balance_factor"):
        if getattr(args, name) is not None:
            value[name] = getattr(args, name)
    if args.session_header:
        value["session_headers"] = args.session_header
    if args.warmup is not None:
        try:
            value["warmup"] = json.loads(args.warmup)
        except ValueError as exc:
            raise UsageError(f"--warmup must be a JSON object: {exc}") from None
    pool = await operations.put_pool(etcd_settings(args), args.name, value)
    print(f"pool {pool.name}: models {', '.join(pool.models)}, lb {pool.lb}")
    return 0


async def cmd_pool_list(args: argparse.Namespace, _: Shutdown) -> int:
    state = await operations.read_state(etcd_settings(args))
    for pool in state.config().pools.values():
        print(json.dumps({"pool": pool.name, **pool_to_json(pool)}))
    return 0


async def cmd_pool_rm(args: argparse.Namespace, _: Shutdown) -> int:
    keys = [(f"pools/{args.name}", False)]
    if args.with_endpoints:
        keys += [(f"endpoints/{args.name}/", True), (f"status/{args.name}/", True)]
    removed = await operations.remove(etcd_settings(args), keys)
    print(f"removed {removed} key(s)")
    return 0 if removed else 1


def configure_pool(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = actions.add_parser("put", help="create or replace a pool")
    put.set_defaults(handler=cmd_pool_put)
    add_etcd_options(put)
    put.add_argument("name")
    put.add_argument("--model", action="append", required=True, help="model name (repeatable)")
    put.add_argument("--lb", choices=LB_POLICIES)
    put.add_argument("--session-header", dest="session_header", action="append",
                     help="header whose value is the session key (repeatable: the first "
                          "present wins; default x-session-id)")
    put.add_argument("--hash-balance-factor", dest="hash_balance_factor", type=int)
    put.add_argument("--warmup", help="warmup settings as a JSON object")
    ls = actions.add_parser("list", help="list pools (JSON lines)")
    ls.set_defaults(handler=cmd_pool_list)
    add_etcd_options(ls)
    rm = actions.add_parser("rm", help="remove a pool")
    rm.set_defaults(handler=cmd_pool_rm)
    add_etcd_options(rm)
    rm.add_argument("name")
    rm.add_argument("--with-endpoints", action="store_true",
                    help="also remove the pool's endpoints and statuses")


# -- endpoint ------------------------------------------------------------------------------


async def cmd_endpoint_put(args: argparse.Namespace, _: Shutdown) -> int:
    value: dict[str, Any] = {"address": args.address, "port": args.port}
    if args.weight is not None:
        value["weight"] = args.weight
    endpoint = await operations.put_endpoint(etcd_settings(args), args.pool, args.id, value)
    print(f"endpoint {endpoint.pool}/{endpoint.id}: {endpoint.address}:{endpoint.port}")
    return 0


async def cmd_endpoint_list(args: argparse.Namespace, _: Shutdown) -> int:
    state = await operations.read_state(etcd_settings(args))
    for pool, endpoints in state.config().endpoints.items():
        if args.pool and pool != args.pool:
            continue
        for endpoint in endpoints.values():
            print(json.dumps({"pool": pool, "id": endpoint.id, "address": endpoint.address,
                              "port": endpoint.port, "weight": endpoint.weight}))
    return 0


async def cmd_endpoint_rm(args: argparse.Namespace, _: Shutdown) -> int:
    removed = await operations.remove(etcd_settings(args), [
        (f"endpoints/{args.pool}/{args.id}", False), (f"status/{args.pool}/{args.id}", False),
        (f"drain/{args.pool}/{args.id}", False)])
    print(f"removed {removed} key(s)")
    return 0 if removed else 1


async def cmd_endpoint_drain(args: argparse.Namespace, _: Shutdown) -> int:
    settings = etcd_settings(args)
    if args.cancel:
        removed = await operations.remove(settings, [(f"drain/{args.pool}/{args.id}", False)])
        print(f"endpoint {args.pool}/{args.id}: " + ("drain cancelled; it takes new sessions "
                                                     "again" if removed else "was not draining"))
        return 0 if removed else 1
    drain = await operations.drain_endpoint(settings, args.pool, args.id, args.timeout,
                                            time.time())
    print(f"endpoint {drain.pool}/{drain.id}: draining until "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(drain.until))} (no new "
          "sessions; its active ones finish there). `hotpath status` shows it drained once "
          "none is left; then `hotpath endpoint rm` it.")
    return 0


def configure_endpoint(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = actions.add_parser("put", help="create or replace an endpoint")
    put.set_defaults(handler=cmd_endpoint_put)
    add_etcd_options(put)
    put.add_argument("pool")
    put.add_argument("id")
    put.add_argument("--address", required=True, help="IP or hostname")
    put.add_argument("--port", type=int, required=True)
    put.add_argument("--weight", type=int)
    ls = actions.add_parser("list", help="list endpoints (JSON lines)")
    ls.set_defaults(handler=cmd_endpoint_list)
    add_etcd_options(ls)
    ls.add_argument("pool", nargs="?")
    rm = actions.add_parser("rm", help="remove an endpoint")
    rm.set_defaults(handler=cmd_endpoint_rm)
    add_etcd_options(rm)
    rm.add_argument("pool")
    rm.add_argument("id")
    drain = actions.add_parser(
        "drain", help="take no new sessions; active ones finish there (docs/affinity.md)")
    drain.set_defaults(handler=cmd_endpoint_drain)
    add_etcd_options(drain)
    drain.add_argument("pool")
    drain.add_argument("id")
    drain.add_argument("--timeout", type=positive, default=DEFAULT_DRAIN_TIMEOUT_S,
                       help="seconds after which it takes no traffic at all, active sessions "
                            "or not (default %(default)s)")
    drain.add_argument("--cancel", action="store_true",
                       help="end the drain: the endpoint takes new sessions again")


# -- split ---------------------------------------------------------------------------------


def _pairs(values: list[str] | None, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{what} takes POOL=VALUE, got {item!r}")
        pairs.append((name, value))
    return pairs


def check_split_against(state: ConfigState, key: str, model: str, value: dict[str, Any]
                        ) -> None:
    """What the control plane checks when a split is written: its pools exist and no pool
    serves its model."""
    split = parse_split(key, model, json.dumps(value))
    config = state.config()
    for index, arm in enumerate(split.arms):
        if arm.pool not in config.pools:
            raise ConfigError(key, f"arms[{index}].pool {arm.pool!r} does not exist (create "
                                   "the pool first)")
    for pool in config.pools.values():
        if model in pool.models:
            raise ConfigError(key, f"model {model!r} already belongs to pool {pool.name!r} "
                                   "(a split's model must be in no pool's models)")


async def cmd_split_put(args: argparse.Namespace, _: Shutdown) -> int:
    served = dict(_pairs(args.served, "--served"))
    arms: list[dict[str, Any]] = []
    for pool, weight in _pairs(args.arm, "--arm"):
        try:
            arm: dict[str, Any] = {"pool": pool, "weight": int(weight)}
        except ValueError:
            raise UsageError(f"--arm {pool}={weight}: the weight must be an integer") from None
        if pool in served:
            arm["served_model"] = served.pop(pool)
        arms.append(arm)
    if served:
        raise UsageError(f"--served names pool(s) with no --arm: {', '.join(sorted(served))}")
    settings = etcd_settings(args)
    key = f"splits/{args.model}"
    check_split_against(await operations.read_state(settings), key, args.model, {"arms": arms})
    split = parse_split(key, args.model, json.dumps({"arms": arms}))
    async with etcd_client(settings) as client:
        await put_json(client, settings, key, split_to_json(split))
    print(f"split {split.model}: " + ", ".join(
        f"{arm.pool}={arm.weight}" + (f" (as {arm.served_model})"
                                      if arm.served_model != split.model else "")
        for arm in split.arms))
    return 0


async def cmd_split_list(args: argparse.Namespace, _: Shutdown) -> int:
    state = await operations.read_state(etcd_settings(args))
    for row in split_rows(state):
        print(json.dumps(row))
    return 0


async def cmd_split_rm(args: argparse.Namespace, _: Shutdown) -> int:
    # The leader deletes split-slots/<model> once the split is gone.
    removed = await operations.remove(etcd_settings(args), [(f"splits/{args.model}", False)])
    print(f"removed {removed} key(s)")
    return 0 if removed else 1


def configure_split(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = actions.add_parser("put", help="create or change a split (docs/splits.md)")
    put.set_defaults(handler=cmd_split_put)
    add_etcd_options(put)
    put.add_argument("model", help="the model name clients ask for")
    put.add_argument("--arm", action="append", required=True, metavar="POOL=WEIGHT",
                     help="an arm: pool and integer weight (repeatable, in order)")
    put.add_argument("--served", action="append", metavar="POOL=MODEL",
                     help="the model name that arm's servers receive (default: MODEL)")
    ls = actions.add_parser("list", help="list splits, one arm per line (JSON lines)")
    ls.set_defaults(handler=cmd_split_list)
    add_etcd_options(ls)
    rm = actions.add_parser("rm", help="remove a split")
    rm.set_defaults(handler=cmd_split_rm)
    add_etcd_options(rm)
    rm.add_argument("model")


# -- apply / export ------------------------------------------------------------------------


async def cmd_apply(args: argparse.Namespace, _: Shutdown) -> int:
    path = "<stdin>" if args.file == "-" else args.file
    desired = parse_document(path, load_document(path, read_text(args.file)))
    result = await apply_document(etcd_settings(args), path, desired, prune=args.prune,
                                  dry_run=args.dry_run)
    for change in result.changes:
        detail = " (held under a lease by `hotpath register`)" if change.action == "kept" else ""
        print(f"{change.key}: {change.action}{detail}")
    print(("dry run: " if args.dry_run else "") + result.summary())
    return 0


def configure_apply(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_apply)
    add_etcd_options(p)
    p.add_argument("-f", "--file", required=True,
                   help="YAML or JSON file with pools: and endpoints: ('-': stdin)")
    p.add_argument("--prune", action="store_true",
                   help="also delete pools and endpoints the file does not list "
                        "(never endpoints held under a lease by `hotpath register`)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print what would change; write nothing")


async def cmd_export(args: argparse.Namespace, _: Shutdown) -> int:
    settings = etcd_settings(args)
    document, revision, notes = await export_document(settings, args.include_leased)
    for note in notes:
        print(f"hotpath export: {note}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(document, indent=2))
    else:
        print(f"# hotpath export of {settings.prefix} at etcd revision {revision}; "
              "re-apply with: hotpath apply -f FILE")
        print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
    return 0


def configure_export(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_export)
    add_etcd_options(p)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml",
                   help="output format (default %(default)s)")
    p.add_argument("--include-leased", action="store_true",
                   help="also list endpoints registered by `hotpath register` (left out by "
                        "default: applying them would pin a registration that should expire)")


# -- status --------------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, _: Shutdown) -> int:
    args.traffic = args.traffic or args.traffic_default
    state = await operations.read_state(etcd_settings(args))
    hosts = await asyncio.to_thread(fetch_hosts, args.admin)
    reports = [r for r in [await asyncio.to_thread(fetch_traffic, url)
                           for url in args.traffic] if r is not None]
    traffic = traffic_rows(reports)
    views = [v for v in [await asyncio.to_thread(fetch_sessions, url) for url in args.traffic]
             if isinstance(v, dict)]
    rows = status_rows(state, hosts, time.time(), traffic,
                       session_counts(views) if views else None)
    splits = split_rows(state, traffic)
    up = read_up_state(Path(args.data_dir))
    if args.json:
        print(json.dumps({"revision": state.revision, "envoy_reachable": hosts is not None,
                          "endpoints": rows, "splits": splits, "rejected": state.rejected,
                          "up": up}, indent=2))
    else:
        print(format_table(rows, state.rejected, up))
        if splits:
            print()
            print(format_splits(splits))
        if hosts is None:
            print(f"(Envoy admin at {args.admin} unreachable: ENVOY column unknown)")
    return 0


def configure_status(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_status)
    add_etcd_options(p)
    admin = admin_urls_from_env()
    p.add_argument("--admin", default=admin[0] if admin else "http://127.0.0.1:9901",
                   help="Envoy admin URL (env HOTPATH_ADMIN, its first URL; default "
                        "%(default)s)")
    p.add_argument("--traffic", action="append", default=None, metavar="URL",
                   help="control-plane metrics URL whose /traffic window shows real traffic "
                        "and /sessions the active sessions (repeatable; env HOTPATH_TRAFFIC; "
                        "default http://127.0.0.1:9101)")
    p.set_defaults(traffic_default=urls_from_env("HOTPATH_TRAFFIC")
                   or ["http://127.0.0.1:9101"])
    p.add_argument("--data-dir", default=".hotpath",
                   help="where `hotpath up` runs: its children and restarts are shown "
                        "(default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


COMMANDS = {
    "pool": configure_pool,
    "endpoint": configure_endpoint,
    "split": configure_split,
    "apply": configure_apply,
    "export": configure_export,
    "status": configure_status,
}
