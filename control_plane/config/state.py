"""ConfigState: the last good value of every etcd key, fed one event at a time.

Pure. The etcd adapter (or the in-memory store) feeds puts and deletes; a value that does
not validate is rejected and the previous good value for that key stays in force, while
every other key keeps updating. ``config()`` gives the translated view.

The rules, as a pure function of each key's history since it was (last) created, so that a
control plane that followed every event and one that restarted and read etcd's history
agree:

- Any bytes as a key or value are either a valid value or one rejected key: parsing never
  raises (deep nesting, huge numbers, bad UTF-8 and any other failure become a rejection
  naming the key).
- Endpoints and statuses: the value in force is the newest value in the key's history that
  validates. A refused value changes nothing.
- Pools (a model belongs to one pool): pools are settled in the order their keys were
  created (etcd ``create_revision``, then key name for keys created in one transaction).
  The older pool keeps a model: each pool's value in force is the newest value in its
  history that validates and claims no model of an older pool in force. So a younger
  pool's conflicting claim is refused, live and after a restart alike; when an older pool
  is edited to claim a younger pool's model, the older wins and the younger falls back to
  its newest earlier value that does not conflict (or is out, with the conflict reported,
  if none). Every pool change settles every pool again, so a refused pool comes in as soon
  as the model is free. A refused value never changes the config in force.
- Splits (``splits/<model>``) settle after the pools. A pool claiming the model of a split
  key created before it is refused, like a pool claiming an older pool's model; a split
  whose model an (older) pool serves is refused. A split value naming a pool that does not
  exist when it is written is refused (its last good value stays in force); a split whose
  arm pool is deleted later stays in force, degraded (config/splits.py gives the gone arm's
  sessions to the others). After a restart the control plane cannot tell whether a pool
  that is gone now existed when the split was written: such a value is taken as degraded,
  and one naming a pool created after it as refused.
- ``split-slots/<model>`` (the leader's tables), ``pins/<pool>`` (the leader's pin
  tables) and ``drain/<pool>/<id>`` (planned drains): like endpoints, the newest valid value.
- A delete ends a key's history; a key created again starts a new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from control_plane.config.drains import Drain, parse_drain
from control_plane.config.model import (
    Config,
    Endpoint,
    Pool,
    Split,
    SplitSlots,
    Status,
    check_models_free,
    parse_endpoint,
    parse_pool,
    parse_split,
    parse_split_slots,
    parse_status,
)
from control_plane.config.pins import PinTable, parse_pins
from control_plane.config.splits import SLOTS
from control_plane.errors import ConfigError

Parsed = Pool | Endpoint | Status | Split | SplitSlots | PinTable | Drain
V = TypeVar("V", Endpoint, Status, Drain)

SPLITS = "splits/"
SPLIT_SLOTS = "split-slots/"


class _PerPool(Generic[V]):
    """pool -> id -> value, and its view for config(): one dict per pool, sorted by id,
    rebuilt only for the pools that changed since the last view (10,000 endpoints re-sorted
    on every change took ~25 ms a rebuild). A view's dicts are never changed afterwards."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, V]] = {}
        self._views: dict[str, dict[str, V]] = {}
        self._dirty: set[str] = set()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key[1] in self._items.get(key[0], {})

    def put(self, pool: str, item_id: str, value: V) -> None:
        self._items.setdefault(pool, {})[item_id] = value
        self._dirty.add(pool)

    def pop(self, pool: str, item_id: str) -> None:
        items = self._items.get(pool)
        if items is not None and items.pop(item_id, None) is not None:
            if not items:
                del self._items[pool]
            self._dirty.add(pool)

    def view(self) -> dict[str, dict[str, V]]:
        for pool in self._dirty:
            items = self._items.get(pool)
            if items:
                self._views[pool] = dict(sorted(items.items()))
            else:
                self._views.pop(pool, None)
        self._dirty.clear()
        return dict(sorted(self._views.items()))


@dataclass(frozen=True)
class Rejection:
    """A key whose latest value was refused; ``message`` names the key and the reason."""

    key: str
    message: str


@dataclass
class _Key:
    raw: bytes
    created: int
    modified: int
    # The latest value, parsed, or the message saying why it does not validate.
    latest: Parsed | str
    # Earlier values that validate, newest first, as (mod_revision, value). Pools keep every
    # distinct one (an older pool's later claim may push a pool back to an earlier value);
    # endpoints and statuses only the newest.
    history: list[tuple[int, Parsed]] = field(default_factory=list)


def parse_value(key: str, value: bytes) -> Parsed:
    """The value of ``key`` (relative to the prefix), validated; ConfigError otherwise.

    Never raises anything else: whatever goes wrong while parsing is that key's rejection.
    """
    parts = key.split("/")
    kind = parts[0]
    try:
        # A model name may hold '/': everything after the kind is the model.
        if key.startswith(SPLITS) and len(key) > len(SPLITS):
            return parse_split(key, key[len(SPLITS):], value)
        if key.startswith(SPLIT_SLOTS) and len(key) > len(SPLIT_SLOTS):
            return parse_split_slots(key, key[len(SPLIT_SLOTS):], value, SLOTS)
        if kind == "pins" and len(parts) == 2:
            return parse_pins(key, parts[1], value)
        if kind == "pools" and len(parts) == 2:
            return parse_pool(key, parts[1], value)
        if kind == "endpoints" and len(parts) == 3:
            return parse_endpoint(key, parts[1], parts[2], value)
        if kind == "status" and len(parts) == 3:
            return parse_status(key, parts[1], parts[2], value)
        if kind == "drain" and len(parts) == 3:
            return parse_drain(key, parts[1], parts[2], value)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(key, "value is nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse is this key's rejection
        raise ConfigError(key, f"value cannot be used ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
    raise ConfigError(
        key, "unknown key (expected pools/<pool>, endpoints/<pool>/<id>, status/<pool>/<id>, "
             "drain/<pool>/<id>, splits/<model>, split-slots/<model> or pins/<pool>)"
    )


def _is_pool(key: str) -> bool:
    return key.startswith("pools/") and key.count("/") == 1


def _is_split(key: str) -> bool:
    return key.startswith(SPLITS) and len(key) > len(SPLITS)


def _settles_all(key: str) -> bool:
    """Keys whose change settles pools and splits together (they constrain each other)."""
    return _is_pool(key) or _is_split(key)


class ConfigState:
    """Last-good values keyed by the key relative to the prefix (``pools/chat``)."""

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}
        self._pools: dict[str, Pool] = {}
        self._endpoints: _PerPool[Endpoint] = _PerPool()
        self._statuses: _PerPool[Status] = _PerPool()
        self._splits: dict[str, Split] = {}
        self._split_slots: dict[str, SplitSlots] = {}
        self._pins: dict[str, PinTable] = {}
        self._drains: _PerPool[Drain] = _PerPool()
        self._rejected: dict[str, str] = {}
        self.revision = 0
        # config(), built once per change: its callers (the rebuild, the leader's writers
        # every 0.5 s) ask far more often than etcd changes, and building it sorts every
        # endpoint (10,000 endpoints: ~25 ms a call, 20% of a core when idle).
        self._config: Config | None = None
        self._split_keys: set[str] = set()  # models of the splits/<model> keys (keys())

    @property
    def rejected(self) -> dict[str, str]:
        """Keys whose latest value is refused, with the reason (last good value in force)."""
        return dict(self._rejected)

    def keys(self) -> set[str]:
        """Every key with a value, accepted or not."""
        return set(self._keys)

    def split_keys(self) -> set[str]:
        """The model of every splits/<model> key with a value, accepted or not."""
        return set(self._split_keys)

    def raw(self, key: str) -> bytes | None:
        """The latest value seen for a key, accepted or not."""
        entry = self._keys.get(key)
        return None if entry is None else entry.raw

    def created(self, key: str) -> int | None:
        """The key's create_revision as given (None: no value)."""
        entry = self._keys.get(key)
        return None if entry is None else entry.created

    def modified(self, key: str) -> int | None:
        """The mod_revision of the key's latest value as given (None: no value)."""
        entry = self._keys.get(key)
        return None if entry is None else entry.modified

    def apply(self, key: str, value: bytes | None, revision: int = 0,
              created: int | None = None) -> Rejection | None:
        """Apply a put (value) or a delete (None) seen at ``revision``; ``created`` is the
        key's create_revision (default: kept from the key's earlier value, else
        ``revision``). Returns the key's rejection, if any."""
        self._config = None
        self._put(key, value, revision, created)
        if _is_split(key) and value is not None:
            self._check_arm_pools(key, live=True)
        return self._settle(key)

    def apply_all(self, items: Iterable[tuple[str, bytes | None, int, int | None]]) -> None:
        """Apply many (key, value, revision, created) at once (a re-list), settling the
        pools once; the outcome does not depend on the order of ``items``."""
        self._config = None
        pools = False
        splits: list[str] = []
        for key, value, revision, created in items:
            self._put(key, value, revision, created)
            if _settles_all(key):
                pools = True
                if _is_split(key) and value is not None:
                    splits.append(key)
            else:
                self._settle_one(key)
        if pools:
            for key in splits:  # against the pools as given, whatever the order of items
                self._check_arm_pools(key, live=False)
            self._settle_pools()

    def refuse(self, key: str, value: bytes, message: str, revision: int = 0,
               created: int | None = None) -> Rejection:
        """Record a value refused before parsing (a key that is not valid UTF-8);
        ``message`` names the key. A later delete of ``key`` clears it."""
        self._config = None
        self.revision = max(self.revision, revision)
        old = self._keys.get(key)
        if created is None:
            created = old.created if old is not None else revision
        self._keys[key] = _Key(raw=value, created=created, modified=revision, latest=message)
        if _is_split(key):
            self._split_keys.add(key[len(SPLITS):])
        self._settle(key)
        return Rejection(key=key, message=message)

    def wants_history(self, key: str) -> bool:
        """Whether values of ``key`` older than its latest (from etcd's history) could
        change what is in force: always for a pool (an older pool's later claim may push it
        back to one), else only while the latest is refused."""
        entry = self._keys.get(key)
        if entry is None:
            return False
        return _settles_all(key) or isinstance(entry.latest, str)

    def remember(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Add an earlier value of ``key`` read from etcd's history (walking back from the
        latest). Returns whether still earlier values could matter: for a pool always, else
        until one that validates is found."""
        self._config = None
        entry = self._keys.get(key)
        if entry is None:
            return False
        try:
            parsed = parse_value(key, value)
        except ConfigError:
            return True
        self._add_history(key, entry, mod_revision, parsed)
        self._settle(key)
        return _settles_all(key)

    def in_force(self, key: str) -> bool:
        """Whether some value of this key (its latest or an earlier good one) is in force."""
        parts = key.split("/")
        if parts[0] == "pools" and len(parts) == 2:
            return parts[1] in self._pools and key in self._keys
        if parts[0] == "endpoints" and len(parts) == 3:
            return (parts[1], parts[2]) in self._endpoints
        if parts[0] == "status" and len(parts) == 3:
            return (parts[1], parts[2]) in self._statuses
        if parts[0] == "drain" and len(parts) == 3:
            return (parts[1], parts[2]) in self._drains
        if _is_split(key):
            return key[len(SPLITS):] in self._splits and key in self._keys
        if key.startswith(SPLIT_SLOTS):
            return key[len(SPLIT_SLOTS):] in self._split_slots
        if parts[0] == "pins" and len(parts) == 2:
            return parts[1] in self._pins
        return False

    # -- internals -----------------------------------------------------------------------

    def _put(self, key: str, value: bytes | None, revision: int, created: int | None) -> None:
        self.revision = max(self.revision, revision)
        old = self._keys.pop(key, None)
        if _is_split(key):
            if value is None:
                self._split_keys.discard(key[len(SPLITS):])
            else:
                self._split_keys.add(key[len(SPLITS):])
        if value is None:
            return
        if created is None:
            created = old.created if old is not None else revision
        entry = _Key(raw=value, created=created, modified=revision, latest="")
        try:
            entry.latest = parse_value(key, value)
        except ConfigError as exc:
            entry.latest = str(exc)
        if old is not None and old.created == created:
            entry.history = old.history
            if not isinstance(old.latest, str):
                self._add_history(key, entry, old.modified, old.latest)
        self._keys[key] = entry

    @staticmethod
    def _add_history(key: str, entry: _Key, mod_revision: int, parsed: Parsed) -> None:
        history = entry.history
        if not _is_pool(key):
            if not history or history[0][0] <= mod_revision:
                entry.history = [(mod_revision, parsed)]
            return
        for index, (at, value) in enumerate(history):
            if value == parsed:
                if at >= mod_revision:
                    return  # a newer copy of the same value is known
                del history[index]
                break
        history.append((mod_revision, parsed))
        history.sort(key=lambda item: -item[0])

    def _check_arm_pools(self, key: str, live: bool) -> None:
        """Refuse the latest split value of ``key`` when an arm's pool does not exist as it
        is written (live: in force now; from a listing: created after the value, see the
        module docstring)."""
        entry = self._keys.get(key)
        if entry is None or not isinstance(entry.latest, Split):
            return
        for index, arm in enumerate(entry.latest.arms):
            pool_entry = self._keys.get(f"pools/{arm.pool}")
            if live:
                missing = arm.pool not in self._pools
            else:
                missing = pool_entry is not None and pool_entry.created > entry.modified
            if missing:
                entry.latest = (f"{key}: arms[{index}].pool {arm.pool!r} does not exist "
                                "(create the pool first)")
                return

    def _settle(self, key: str) -> Rejection | None:
        if _settles_all(key):
            self._settle_pools()
        else:
            self._settle_one(key)
        message = self._rejected.get(key)
        return None if message is None else Rejection(key=key, message=message)

    def _settle_one(self, key: str) -> None:
        entry = self._keys.get(key)
        parts = key.split("/")
        table: _PerPool[Endpoint] | _PerPool[Status] | _PerPool[Drain] | None = None
        if len(parts) == 3 and parts[0] == "endpoints":
            table = self._endpoints
        elif len(parts) == 3 and parts[0] == "status":
            table = self._statuses
        elif len(parts) == 3 and parts[0] == "drain":
            table = self._drains
        elif key.startswith(SPLIT_SLOTS):
            self._settle_slots(key, entry)
        elif len(parts) == 2 and parts[0] == "pins":
            self._settle_pins(parts[1], entry)
        if entry is None or not isinstance(entry.latest, str):
            self._rejected.pop(key, None)
        else:
            self._rejected[key] = entry.latest
        if table is None:
            return
        value: Parsed | None = None
        if entry is not None:
            if not isinstance(entry.latest, str):
                value = entry.latest
            elif entry.history:
                value = entry.history[0][1]
        if value is None:
            table.pop(parts[1], parts[2])
        else:
            table.put(parts[1], parts[2], value)  # type: ignore[arg-type]

    def _settle_slots(self, key: str, entry: _Key | None) -> None:
        model = key[len(SPLIT_SLOTS):]
        value: Parsed | None = None
        if entry is not None:
            value = entry.latest if not isinstance(entry.latest, str) else (
                entry.history[0][1] if entry.history else None)
        if isinstance(value, SplitSlots):
            self._split_slots[model] = value
        else:
            self._split_slots.pop(model, None)

    def _settle_pins(self, pool: str, entry: _Key | None) -> None:
        value: Parsed | None = None
        if entry is not None:
            value = entry.latest if not isinstance(entry.latest, str) else (
                entry.history[0][1] if entry.history else None)
        if isinstance(value, PinTable):
            self._pins[pool] = value
        else:
            self._pins.pop(pool, None)

    def _split_claims(self) -> dict[str, int]:
        """Split model -> its key's create revision, for split keys with a valid value."""
        claims = {}
        for key, entry in self._keys.items():
            if _is_split(key) and (not isinstance(entry.latest, str) or entry.history):
                claims[key[len(SPLITS):]] = entry.created
        return claims

    def _settle_splits(self) -> None:
        splits: dict[str, Split] = {}
        served = {model: pool.name for pool in self._pools.values() for model in pool.models}
        for key in sorted(k for k in self._keys if _is_split(k)):
            entry = self._keys[key]
            model = key[len(SPLITS):]
            value = entry.latest if not isinstance(entry.latest, str) else (
                entry.history[0][1] if entry.history else None)
            if model in served:
                self._rejected[key] = (f"{key}: model {model!r} already belongs to pool "
                                       f"{served[model]!r} (a split's model must be in no "
                                       "pool's models)")
                continue
            if isinstance(value, Split):
                splits[model] = value
            if isinstance(entry.latest, str):
                self._rejected[key] = entry.latest
            else:
                self._rejected.pop(key, None)
        for key in [k for k in self._rejected if _is_split(k) and k not in self._keys]:
            del self._rejected[key]
        self._splits = splits

    def _settle_pools(self) -> None:
        """Every pool again, oldest key first: the older pool keeps a model (and an older
        split key its model); then the splits against the pools in force."""
        order = sorted((entry.created, key) for key, entry in self._keys.items()
                       if _is_pool(key))
        claims = self._split_claims()
        pools: dict[str, Pool] = {}
        for _, key in order:
            entry = self._keys[key]
            candidates = [] if isinstance(entry.latest, str) else [entry.latest]
            candidates += [value for _, value in entry.history]
            conflict: str | None = None
            for candidate in candidates:
                assert isinstance(candidate, Pool)
                try:
                    check_models_free(key, candidate, pools.values())
                    for model in candidate.models:
                        if claims.get(model, entry.created) < entry.created:
                            raise ConfigError(key, f"model {model!r} is split by "
                                                   f"splits/{model} (a split's model "
                                                   "belongs to no pool)")
                except ConfigError as exc:
                    if candidate is entry.latest:
                        conflict = str(exc)
                    continue
                pools[candidate.name] = candidate
                break
            if isinstance(entry.latest, str):
                self._rejected[key] = entry.latest
            elif conflict is not None:
                self._rejected[key] = conflict
            else:
                self._rejected.pop(key, None)
        for key in [k for k in self._rejected if _is_pool(k) and k not in self._keys]:
            del self._rejected[key]
        self._pools = pools
        self._settle_splits()

    def config(self) -> Config:
        if self._config is None:
            self._config = self._build_config()
        return self._config

    def _build_config(self) -> Config:
        return Config(pools=dict(sorted(self._pools.items())), endpoints=self._endpoints.view(),
                      statuses=self._statuses.view(), splits=dict(sorted(self._splits.items())),
                      split_slots=dict(sorted(self._split_slots.items())),
                      pins=dict(sorted(self._pins.items())), drains=self._drains.view())
