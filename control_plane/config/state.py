"""ConfigState: the last good value of every etcd key, fed one event at a time.

Pure. The etcd adapter (or the in-memory store) feeds puts and deletes; a value that does
not validate is rejected and the previous good value for that key stays in force, while
every other key keeps updating. ``config()`` gives the translated view.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.config.model import (
    Config,
    Endpoint,
    Pool,
    Status,
    check_models_free,
    parse_endpoint,
    parse_pool,
    parse_status,
)
from control_plane.errors import ConfigError


@dataclass(frozen=True)
class Rejection:
    """A key whose latest value was refused; ``message`` names the key and the reason."""

    key: str
    message: str


class ConfigState:
    """Last-good values keyed by the key relative to the prefix (``pools/chat``)."""

    def __init__(self) -> None:
        self._pools: dict[str, Pool] = {}
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._statuses: dict[tuple[str, str], Status] = {}
        self._rejected: dict[str, str] = {}
        self._seen: dict[str, bytes] = {}
        self._seen_at: dict[str, int] = {}
        self.revision = 0

    @property
    def rejected(self) -> dict[str, str]:
        """Keys whose latest value is refused, with the reason (last good value in force)."""
        return dict(self._rejected)

    def keys(self) -> set[str]:
        """Every key with a value, accepted or not."""
        return set(self._seen)

    def raw(self, key: str) -> bytes | None:
        """The latest value seen for a key, accepted or not."""
        return self._seen.get(key)

    def apply(self, key: str, value: bytes | None, revision: int = 0) -> Rejection | None:
        """Apply a put (value) or a delete (None). Returns the rejection, if any."""
        self.revision = max(self.revision, revision)
        if value is None:
            self._seen.pop(key, None)
            self._seen_at.pop(key, None)
        else:
            self._seen[key] = value
            self._seen_at[key] = revision
        rejection = self._try(key, value)
        if key.startswith("pools/") and rejection is None:
            self._retry_refused_pools()
        return rejection

    def in_force(self, key: str) -> bool:
        """Whether some value of this key (its latest or an earlier good one) is in force."""
        parts = key.split("/")
        if parts[0] == "pools" and len(parts) == 2:
            return parts[1] in self._pools
        if parts[0] == "endpoints" and len(parts) == 3:
            return (parts[1], parts[2]) in self._endpoints
        if parts[0] == "status" and len(parts) == 3:
            return (parts[1], parts[2]) in self._statuses
        return False

    def restore(self, key: str, value: bytes) -> bool:
        """Put an earlier value of a refused key in force (read from etcd's history after a
        restart); the latest value stays reported as refused. False if it does not validate."""
        try:
            self._apply(key, value)
        except ConfigError:
            return False
        return True

    def _try(self, key: str, value: bytes | None) -> Rejection | None:
        try:
            self._apply(key, value)
        except ConfigError as exc:
            self._rejected[key] = str(exc)
            return Rejection(key=key, message=str(exc))
        self._rejected.pop(key, None)
        return None

    def _retry_refused_pools(self) -> None:
        """A pool refused for a model another pool owned may apply once that pool changed."""
        refused = [k for k in self._rejected if k.startswith("pools/") and k in self._seen]
        # In write order: the pool that asked first gets the model, as on a fresh read.
        for key in sorted(refused, key=lambda k: (self._seen_at.get(k, 0), k)):
            self._try(key, self._seen[key])

    def _apply(self, key: str, value: bytes | None) -> None:
        parts = key.split("/")
        kind = parts[0]
        if kind == "pools" and len(parts) == 2:
            if value is None:
                self._pools.pop(parts[1], None)
                return
            pool = parse_pool(key, parts[1], value)
            check_models_free(key, pool, self._pools.values())
            self._pools[pool.name] = pool
        elif kind == "endpoints" and len(parts) == 3:
            if value is None:
                self._endpoints.pop((parts[1], parts[2]), None)
                return
            self._endpoints[(parts[1], parts[2])] = parse_endpoint(key, parts[1], parts[2], value)
        elif kind == "status" and len(parts) == 3:
            if value is None:
                self._statuses.pop((parts[1], parts[2]), None)
                return
            self._statuses[(parts[1], parts[2])] = parse_status(key, parts[1], parts[2], value)
        elif value is not None:
            raise ConfigError(
                key, "unknown key (expected pools/<pool>, endpoints/<pool>/<id> or "
                "status/<pool>/<id>)"
            )

    def config(self) -> Config:
        endpoints: dict[str, dict[str, Endpoint]] = {}
        for (pool, endpoint_id), endpoint in sorted(self._endpoints.items()):
            endpoints.setdefault(pool, {})[endpoint_id] = endpoint
        statuses: dict[str, dict[str, Status]] = {}
        for (pool, endpoint_id), status in sorted(self._statuses.items()):
            statuses.setdefault(pool, {})[endpoint_id] = status
        return Config(pools=dict(sorted(self._pools.items())), endpoints=endpoints,
                      statuses=statuses)
