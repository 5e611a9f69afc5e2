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
    splits:                    # splits/<model> (docs/splits.md)
      chat:
        arms: [{pool: chat, weight: 95}, {pool: chat-next, weight: 5, served_model: m2}]

``apply`` is declarative and idempotent, like ``kubectl apply``: it checks the whole file,
against itself and against what etcd holds, and writes nothing if anything is wrong;
otherwise it writes every change in one etcd transaction (one revision, all or nothing),
guarded so that a concurrent write under pools/ or endpoints/ makes it re-read and re-plan
instead of overwriting. Status keys belong to the prober and are never written. Endpoints
held under a lease belong to their `hotpath register`: apply never prunes or overwrites
them, and ``export`` leaves them out unless asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from control_plane.config.model import (
    Endpoint,
    Pool,
    Split,
    check_models_free,
    endpoint_to_json,
    parse_endpoint,
    parse_pool,
    parse_split,
    pool_to_json,
    split_to_json,
)
from control_plane.errors import ConfigError, ConfigFileError

SECTIONS = ("pools", "endpoints", "splits")
ACTIONS = ("created", "updated", "unchanged", "deleted")


@dataclass(frozen=True)
class Desired:
    """A validated file: what pools/ and endpoints/ should hold."""

    pools: dict[str, Pool]
    endpoints: dict[tuple[str, str], Endpoint]
    splits: dict[str, Split] = field(default_factory=dict)


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
    accepted: list[Pool] = []
    for pool in pools.values():
        try:
            check_models_free(f"pools/{pool.name}", pool, accepted)
        except ConfigError as exc:
            problems.append(str(exc))
        accepted.append(pool)
    endpoints: dict[tuple[str, str], Endpoint] = {}
    for pool_name, members in _entries(problems, "endpoints", data.get("endpoints")):
        for endpoint_id, value in _entries(problems, f"endpoints/{pool_name}", members):
            key = f"endpoints/{pool_name}/{endpoint_id}"
            try:
                endpoints[(pool_name, endpoint_id)] = parse_endpoint(
                    key, pool_name, endpoint_id, _as_json(value))
            except ConfigError as exc:
                problems.append(str(exc))
    splits: dict[str, Split] = {}
    for model, value in _entries(problems, "splits", data.get("splits")):
        key = f"splits/{model}"
        try:
            splits[model] = parse_split(key, model, _as_json(value))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        owners = [pool.name for pool in pools.values() if model in pool.models]
        if owners:
            problems.append(f"{key}: model {model!r} already belongs to pool {owners[0]!r} "
                            "(a split's model must be in no pool's models)")
    if problems:
        raise ConfigFileError(path, problems)
    return Desired(pools=pools, endpoints=endpoints, splits=splits)


def _stored_split(key: str, raw: bytes) -> Split | None:
    try:
        return parse_split(key, key.split("/", 1)[1], raw)
    except ConfigError:
        return None


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
        try:
            check_models_free(f"pools/{pool.name}", pool,
                              (other for other in staying.values() if other is not None),
                              where=" in etcd, which this file does not list (add that pool "
                                    "to the file, remove it, or apply with --prune)")
        except ConfigError as exc:
            problems.append(str(exc))
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
    for model, split in desired.splits.items():
        key = f"splits/{model}"
        for index, arm in enumerate(split.arms):
            if arm.pool not in known_pools:
                problems.append(f"{key}: arms[{index}].pool {arm.pool!r} is neither in this "
                                "file nor in etcd")
        for name, other in staying.items():
            if other is not None and model in other.models:
                problems.append(f"{key}: model {model!r} already belongs to pool {name!r} in "
                                "etcd (a split's model must be in no pool's models)")
        old = stored.get(key)
        if old is None:
            changes.append(Change(key, "created", split_to_json(split)))
        elif _stored_split(key, old.raw) == split:
            changes.append(Change(key, "unchanged"))
        else:
            changes.append(Change(key, "updated", split_to_json(split)))
    if prune:
        for key in sorted(stored):
            if key.startswith("splits/") and key.split("/", 1)[1] not in desired.splits:
                changes.append(Change(key, "deleted"))
    if problems:
        raise ConfigFileError(path, problems)
    return changes
