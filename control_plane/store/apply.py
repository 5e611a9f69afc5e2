"""`hotpath apply` and `hotpath export` against etcd: read, plan (config/file.py), write.

One transaction per apply, guarded so that a concurrent write under pools/ or endpoints/
makes it re-read and re-plan instead of overwriting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc
from etcd3aio import Etcd3Client, prefix_range_end

# etcd3aio has no builder for a mod_revision compare; its message type lives here.
from etcd3aio._protobuf import Compare

from control_plane.config.file import ApplyResult, Change, Desired, Stored, plan
from control_plane.config.model import endpoint_to_json, pool_to_json, split_to_json
from control_plane.config.state import ConfigState
from control_plane.errors import ApplyError, ConfigFileError
from control_plane.store.etcd import Entry, EtcdSettings, etcd_client, feed, list_entries

# Attempts when another writer changes pools/ or endpoints/ between the read and the write.
MAX_ATTEMPTS = 5


async def _read_entries(client: Etcd3Client, settings: EtcdSettings
                        ) -> tuple[int, list[Entry]]:
    """pools/ and endpoints/ entries with usable keys; a key that is not UTF-8 text is the
    control plane's rejection, not something apply can plan for."""
    revision, entries = await list_entries(client, settings)
    return revision, [entry for entry in entries if isinstance(entry.key, str)
                      and entry.key.startswith(("pools/", "endpoints/", "splits/"))]


async def read_stored(client: Etcd3Client, settings: EtcdSettings
                      ) -> tuple[int, dict[str, Stored]]:
    """(revision, {key relative to the prefix: Stored}) for pools/ and endpoints/."""
    revision, entries = await _read_entries(client, settings)
    return revision, {entry.name: Stored(raw=entry.value, mod_revision=entry.mod_revision,
                                         lease=entry.lease) for entry in entries}


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
        for section in (settings.prefix + "pools/", settings.prefix + "endpoints/",
                        settings.prefix + "splits/")
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


def read_text(path: str) -> str:
    """The file's text ('-': stdin); ConfigFileError when it cannot be read."""
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
        revision, entries = await _read_entries(client, settings)
    stored = {entry.name: Stored(raw=entry.value, mod_revision=entry.mod_revision,
                                 lease=entry.lease) for entry in entries}
    state = ConfigState()
    # Settled by create revision, so a model claimed twice stays with the older pool, as
    # in the control plane.
    feed(state, entries)
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
    document: dict[str, Any] = {
        "pools": {name: pool_to_json(pool) for name, pool in config.pools.items()},
        "endpoints": endpoints}
    if config.splits:
        document["splits"] = {model: split_to_json(split)
                              for model, split in config.splits.items()}
    return document, revision, notes
