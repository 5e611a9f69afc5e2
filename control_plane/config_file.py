"""`hotpath apply -f FILE` and `hotpath export`: the whole configuration as one file.

The file (YAML or JSON) mirrors the etcd keys, with the same fields and defaults::

    pools:                     # pools/<pool>
      chat:
        models: [llama-3.1-8b-instruct]
        lb: ring_hash
    endpoints:                 # endpoints/<pool>/<id>
      chat:
        gpu-0: {address: 10.0.0.11, port: 8000}
        gpu-1: {address: gpu-1.internal, port: 8000, weight: 2}

``apply`` is declarative and idempotent, like ``kubectl apply``: it checks the whole file,
against itself and against what etcd holds, and writes nothing if anything is wrong;
otherwise it writes every change in one etcd transaction (one revision, all or nothing),
guarded so that a concurrent write under pools/ or endpoints/ makes it re-read and re-plan
instead of overwriting. Status keys belong to the prober and are never written. Endpoints
held under a lease belong to their `hotpath register`: apply never prunes or overwrites
them, and ``export`` leaves them out unless asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from etcd3aio import Etcd3Client, prefix_range_end

# etcd3aio has no builder for a mod_revision compare; its message type lives here.
from etcd3aio._protobuf import Compare

from control_plane.model import (
    ConfigError,
    Endpoint,
    Pool,
    endpoint_to_json,
    parse_endpoint,
    parse_pool,
    pool_to_json,
)
from control_plane.state import ConfigState
from control_plane.store.etcd import EtcdSettings, EtcdSettingsError, etcd_client

SECTIONS = ("pools", "endpoints")
# Attempts when another writer changes pools/ or endpoints/ between the read and the write.
MAX_ATTEMPTS = 5
ACTIONS = ("created", "updated", "unchanged", "deleted")


class ConfigFileError(ConfigError):
    """The file cannot be applied; one line per problem, each naming its key and field."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        listed = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(path, f"{len(problems)} problem(s), nothing written:\n{listed}")
        self.problems = list(problems)


class ApplyError(RuntimeError):
    """etcd refused the transaction, or kept changing while apply planned."""


@dataclass(frozen=True)
class Desired:
    """A validated file: what pools/ and endpoints/ should hold."""

    pools: dict[str, Pool]
    endpoints: dict[tuple[str, str], Endpoint]


@dataclass(frozen=True)
class Stored:
    """One key as etcd holds it."""

    raw: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Change:
    key: str
    action: str  # one of ACTIONS, or "kept" for a leased endpoint --prune leaves alone
    value: dict[str, Any] | None = None  # the value to put, for created and updated

    @property
    def writes(self) -> bool:
        return self.value is not None or self.action == "deleted"


@dataclass(frozen=True)
class ApplyResult:
    changes: list[Change]
    revision: int | None  # the transaction's revision; None when nothing was written

    def summary(self) -> str:
        counts = ", ".join(f"{sum(c.action == action for c in self.changes)} {action}"
                           for action in ACTIONS)
        if self.revision is None:
            return f"{counts}; nothing written"
        return f"{counts} (etcd revision {self.revision})"


# -- the file ------------------------------------------------------------------------------


def load_document(path: str, text: str) -> Any:
    """Parse JSON (a .json path) or YAML (anything else, JSON included)."""
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(path, [f"not valid JSON: {exc}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigFileError(path, [f"not valid YAML{where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(path, [f"not valid YAML: {exc}"]) from None


def _entries(problems: list[str], where: str, value: Any) -> list[tuple[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping of name -> value, "
                        f"got {type(value).__name__}")
        return []
    entries = []
    for name, item in value.items():
        if isinstance(name, str):
            entries.append((name, item))
        else:  # YAML turns unquoted 0, 1.5 or yes into numbers and booleans
            problems.append(f"{where}: name {name!r} must be a string (quote it)")
    return entries


def _as_json(value: Any) -> str:
    # default=str: a YAML date or similar becomes a string the schema then judges.
    return json.dumps(value, default=str)


def parse_document(path: str, data: Any) -> Desired:
    """Validate a whole file; ConfigFileError lists every problem, not just the first."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(path, [f"the file must be a mapping with pools and endpoints, "
                                     f"got {type(data).__name__}"])
    problems: list[str] = []
    unknown = sorted(str(key) for key in data if key not in SECTIONS)
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)} "
                        f"(allowed: {', '.join(SECTIONS)})")
    pools: dict[str, Pool] = {}
    for name, value in _entries(problems, "pools", data.get("pools")):
        try:
            pools[name] = parse_pool(f"pools/{name}", name, _as_json(value))
        except ConfigError as exc:
            problems.append(str(exc))
    owners: dict[str, str] = {}
    for pool in pools.values():
        for model in pool.models:
            if model in owners:
                problems.append(f"pools/{pool.name}: model {model!r} is also in pool "
                                f"{owners[model]!r} (a model belongs to one pool)")
            owners.setdefault(model, pool.name)
    endpoints: dict[tuple[str, str], Endpoint] = {}
    for pool_name, members in _entries(problems, "endpoints", data.get("endpoints")):
        for endpoint_id, value in _entries(problems, f"endpoints/{pool_name}", members):
            key = f"endpoints/{pool_name}/{endpoint_id}"
            try:
                endpoints[(pool_name, endpoint_id)] = parse_endpoint(
                    key, pool_name, endpoint_id, _as_json(value))
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigFileError(path, problems)
    return Desired(pools=pools, endpoints=endpoints)


# -- etcd ----------------------------------------------------------------------------------


async def read_stored(client: Etcd3Client, settings: EtcdSettings
                      ) -> tuple[int, dict[str, Stored]]:
    """(revision, {key relative to the prefix: Stored}) for pools/ and endpoints/."""
    assert client.kv is not None
    name = settings.prefix
    reply = await client.kv.get(name, range_end=prefix_range_end(name), timeout=10)
    stored = {}
    for kv in reply.kvs:
        key = kv.key.decode()[len(name):]
        if key.startswith(("pools/", "endpoints/")):
            stored[key] = Stored(raw=bytes(kv.value), mod_revision=int(kv.mod_revision),
                                 lease=int(kv.lease))
    return int(reply.header.revision), stored


def _stored_pool(key: str, raw: bytes) -> Pool | None:
    try:
        return parse_pool(key, key.split("/", 1)[1], raw)
    except ConfigError:
        return None


def _stored_endpoint(key: str, raw: bytes) -> Endpoint | None:
    _, pool, endpoint_id = key.split("/", 2)
    try:
        return parse_endpoint(key, pool, endpoint_id, raw)
    except ConfigError:
        return None


def plan(path: str, desired: Desired, stored: dict[str, Stored], prune: bool) -> list[Change]:
    """What applying ``desired`` over ``stored`` changes; ConfigFileError if it must not."""
    problems: list[str] = []
    changes: list[Change] = []
    for name, pool in desired.pools.items():
        key = f"pools/{name}"
        old = stored.get(key)
        if old is None:
            changes.append(Change(key, "created", pool_to_json(pool)))
        elif _stored_pool(key, old.raw) == pool:
            changes.append(Change(key, "unchanged"))
        else:
            changes.append(Change(key, "updated", pool_to_json(pool)))
    staying: dict[str, Pool | None] = {}  # pools in etcd, not in the file, that stay
    for key, old in sorted(stored.items()):
        kind, _, name = key.partition("/")
        if kind != "pools" or "/" in name or name in desired.pools:
            continue
        if prune:
            changes.append(Change(key, "deleted"))
        else:
            staying[name] = _stored_pool(key, old.raw)
    for pool in desired.pools.values():
        for other in (other for other in staying.values() if other is not None):
            shared = sorted(set(pool.models) & set(other.models))
            if shared:
                problems.append(
                    f"pools/{pool.name}: model {shared[0]!r} already belongs to pool "
                    f"{other.name!r} in etcd, which this file does not list (add that pool "
                    "to the file, remove it, or apply with --prune)")
    known_pools = set(desired.pools) | set(staying)
    for (pool_name, endpoint_id), endpoint in desired.endpoints.items():
        key = f"endpoints/{pool_name}/{endpoint_id}"
        if pool_name not in known_pools:
            problems.append(f"{key}: pool {pool_name!r} is neither in this file nor in etcd")
        old = stored.get(key)
        if old is None:
            changes.append(Change(key, "created", endpoint_to_json(endpoint)))
        elif _stored_endpoint(key, old.raw) == endpoint:
            changes.append(Change(key, "unchanged"))
        elif old.lease:
            problems.append(f"{key}: held under a lease by `hotpath register` with another "
                            "value; leave it out of the file or stop that registration")
        else:
            changes.append(Change(key, "updated", endpoint_to_json(endpoint)))
    if prune:
        for key, old in sorted(stored.items()):
            parts = tuple(key.split("/"))
            if parts[0] != "endpoints" or len(parts) != 3 or parts[1:] in desired.endpoints:
                continue
            changes.append(Change(key, "kept" if old.lease else "deleted"))
    if problems:
        raise ConfigFileError(path, problems)
    return changes


async def _transact(client: Etcd3Client, settings: EtcdSettings, revision: int,
                    changes: list[Change]) -> int | None:
    """Write ``changes`` in one transaction if nothing under pools/ or endpoints/ changed
    after ``revision``; the new revision, or None when something did."""
    kv = client.kv
    assert kv is not None
    operations = []
    for change in changes:
        name = settings.prefix + change.key
        if change.value is not None:
            operations.append(kv.txn_op_put(name, json.dumps(change.value,
                                                             separators=(",", ":"))))
        elif change.action == "deleted":
            operations.append(kv.txn_op_delete(name))
            if change.key.startswith("endpoints/"):  # its prober status goes with it
                operations.append(kv.txn_op_delete(
                    settings.prefix + "status/" + change.key.split("/", 1)[1]))
    guards = [
        Compare(result=Compare.LESS, target=Compare.MOD, key=section.encode(),
                range_end=prefix_range_end(section), mod_revision=revision + 1)
        for section in (settings.prefix + "pools/", settings.prefix + "endpoints/")
    ]
    try:
        reply = await kv.txn(guards, operations, timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise ApplyError(
            f"etcd refused the transaction ({exc.code().name}: {exc.details()}); one apply "
            f"writes {len(operations)} keys and etcd's --max-txn-ops (default 128) caps "
            "that: raise it or split the file") from None
    return int(reply.header.revision) if reply.succeeded else None


async def apply_document(settings: EtcdSettings, path: str, desired: Desired, *,
                         prune: bool = False, dry_run: bool = False) -> ApplyResult:
    """Plan against etcd and write the changes atomically (re-planning after a race)."""
    async with etcd_client(settings) as client:
        for _ in range(MAX_ATTEMPTS):
            revision, stored = await read_stored(client, settings)
            changes = plan(path, desired, stored, prune)
            if dry_run or not any(change.writes for change in changes):
                return ApplyResult(changes, None)
            written = await _transact(client, settings, revision, changes)
            if written is not None:
                return ApplyResult(changes, written)
    raise ApplyError(f"pools/ and endpoints/ under {settings.prefix} kept changing while "
                     f"applying {path} ({MAX_ATTEMPTS} attempts); try again")


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, [f"cannot read the file: {exc}"]) from None


async def export_document(settings: EtcdSettings, include_leased: bool = False
                          ) -> tuple[dict[str, Any], int, list[str]]:
    """(document, revision, notes): what apply would need to recreate pools/ and endpoints/.

    Values the control plane rejects are left out, as are endpoints under a lease unless
    ``include_leased`` (applying them would pin a registration that should expire).
    """
    async with etcd_client(settings) as client:
        revision, stored = await read_stored(client, settings)
    state = ConfigState()
    # In write order, so a model claimed twice stays with its first pool, as in the
    # control plane.
    for key, item in sorted(stored.items(), key=lambda entry: entry[1].mod_revision):
        state.apply(key, item.raw, item.mod_revision)
    notes = [f"left out {reason}" for _, reason in sorted(state.rejected.items())]
    config = state.config()
    endpoints: dict[str, dict[str, Any]] = {}
    leased = 0
    for pool_name, members in config.endpoints.items():
        for endpoint_id, endpoint in members.items():
            if stored[f"endpoints/{pool_name}/{endpoint_id}"].lease and not include_leased:
                leased += 1
                continue
            endpoints.setdefault(pool_name, {})[endpoint_id] = endpoint_to_json(endpoint)
    if leased:
        notes.append(f"left out {leased} endpoint(s) held under a lease by `hotpath "
                     "register` (--include-leased adds them)")
    document = {"pools": {name: pool_to_json(pool) for name, pool in config.pools.items()},
                "endpoints": endpoints}
    return document, revision, notes


# -- command line --------------------------------------------------------------------------


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True,
                        help="YAML or JSON file with pools: and endpoints: ('-': stdin)")
    parser.add_argument("--prune", action="store_true",
                        help="also delete pools and endpoints the file does not list "
                             "(never endpoints held under a lease by `hotpath register`)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print what would change; write nothing")


async def run_apply_from_args(args: argparse.Namespace) -> int:
    from control_plane.cli import etcd_settings  # imported here: cli imports this module

    path = "<stdin>" if args.file == "-" else args.file
    try:
        desired = parse_document(path, load_document(path, _read_text(args.file)))
        result = await apply_document(etcd_settings(args), path, desired, prune=args.prune,
                                      dry_run=args.dry_run)
    except (ConfigError, EtcdSettingsError) as exc:
        print(f"hotpath apply: {exc}", file=sys.stderr)
        return 2
    except ApplyError as exc:
        print(f"hotpath apply: {exc}", file=sys.stderr)
        return 1
    for change in result.changes:
        detail = " (held under a lease by `hotpath register`)" if change.action == "kept" else ""
        print(f"{change.key}: {change.action}{detail}")
    print(("dry run: " if args.dry_run else "") + result.summary())
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["yaml", "json"], default="yaml",
                        help="output format (default %(default)s)")
    parser.add_argument("--include-leased", action="store_true",
                        help="also list endpoints registered by `hotpath register`")


async def run_export_from_args(args: argparse.Namespace) -> int:
    from control_plane.cli import etcd_settings  # imported here: cli imports this module

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


def main(argv: Sequence[str] | None = None) -> int:
    """``hotpath apply`` and ``hotpath export`` on their own (the subcommands' arguments)."""
    from control_plane.cli import _add_etcd_options

    parser = argparse.ArgumentParser(prog="hotpath")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    apply = sub.add_parser("apply", help="make etcd match a config file")
    _add_etcd_options(apply)
    add_apply_arguments(apply)
    apply.set_defaults(run=run_apply_from_args)
    export = sub.add_parser("export", help="print the config in apply's format")
    _add_etcd_options(export)
    add_export_arguments(export)
    export.set_defaults(run=run_export_from_args)
    args = parser.parse_args(argv)
    result: int = asyncio.run(args.run(args))
    return result
