"""Operator actions on etcd: read the whole config, put pools and endpoints, remove keys.

Values are validated exactly as the control plane validates them before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from control_plane.config.drains import Drain, parse_drain
from control_plane.config.model import (
    Endpoint,
    Pool,
    check_models_free,
    endpoint_to_json,
    parse_endpoint,
    parse_pool,
    pool_to_json,
)
from control_plane.config.state import ConfigState
from control_plane.errors import ConfigError
from control_plane.store.etcd import (
    EtcdSettings,
    delete,
    etcd_client,
    feed,
    list_entries,
    put_json,
    read_history,
)


async def read_state(settings: EtcdSettings) -> ConfigState:
    """The config as a control plane starting now would have it: the latest values, settled
    by create revision (the older pool keeps a model), and earlier values from etcd's
    history where the latest is refused."""
    state = ConfigState()
    async with etcd_client(settings) as client:
        revision, entries = await list_entries(client, settings)
        feed(state, entries)
        for entry in entries:
            if isinstance(entry.key, str) and state.wants_history(entry.key):
                await read_history(client, settings, state, entry.key, entry.mod_revision)
    state.revision = revision
    return state


async def put_pool(settings: EtcdSettings, name: str, value: dict[str, Any]) -> Pool:
    """Validate like the control plane would, including model ownership, then write."""
    key = f"pools/{name}"
    pool = parse_pool(key, name, json.dumps(value))
    state = await read_state(settings)
    check_models_free(key, pool, state.config().pools.values())
    async with etcd_client(settings) as client:
        await put_json(client, settings, key, pool_to_json(pool))
    return pool


async def put_endpoint(settings: EtcdSettings, pool: str, endpoint_id: str,
                       value: dict[str, Any]) -> Endpoint:
    key = f"endpoints/{pool}/{endpoint_id}"
    endpoint = parse_endpoint(key, pool, endpoint_id, json.dumps(value))
    async with etcd_client(settings) as client:
        await put_json(client, settings, key, endpoint_to_json(endpoint))
    return endpoint


async def drain_endpoint(settings: EtcdSettings, pool: str, endpoint_id: str,
                         timeout_s: float, now: float) -> Drain:
    """Start (or extend) a planned drain of an endpoint that exists."""
    state = await read_state(settings)
    if endpoint_id not in state.config().endpoints.get(pool, {}):
        raise ConfigError(f"endpoints/{pool}/{endpoint_id}", "no such endpoint to drain")
    key = f"drain/{pool}/{endpoint_id}"
    drain = parse_drain(key, pool, endpoint_id, json.dumps({"until": round(now + timeout_s)}))
    async with etcd_client(settings) as client:
        await put_json(client, settings, key, {"until": drain.until})
    return drain


async def remove(settings: EtcdSettings, keys: Sequence[tuple[str, bool]]) -> int:
    """Delete (key, is_prefix) pairs; returns how many keys went."""
    removed = 0
    async with etcd_client(settings) as client:
        for key, prefix in keys:
            removed += await delete(client, settings, key, prefix=prefix)
    return removed


