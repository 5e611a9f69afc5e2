"""Stateful fuzz: ConfigState + the follower's re-list and history walk, against a tiny
model of "the last good config".

A fake etcd (revisions, create revisions, history, compaction) stands in for the real one;
the follower's own ``_apply`` (watch path), ``_relist`` and ``read_history`` run against it.
The model keeps, per key, the values the running control plane can know (what it saw live,
or etcd's retained history after a restart) and derives the config by the rules in
state.py. Invariant after every step: the config in force equals the model's, and a
refused put never changes it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from etcd3aio import EtcdError
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from control_plane.config.model import Config, Endpoint, Pool, Status
from control_plane.config.state import ConfigState, parse_value
from control_plane.errors import ConfigError
from control_plane.store.etcd import EtcdFollower, EtcdSettings, decode_key

PREFIX = "/fz/"
SETTINGS = EtcdSettings(urls="http://127.0.0.1:1", prefix=PREFIX)
POOL_KEYS = [b"pools/a", b"pools/b", b"pools/c", b"pools/d"]
OTHER_KEYS = [b"endpoints/a/e1", b"endpoints/b/e2", b"status/a/e1"]
STATS = {"cases": 0, "steps": 0, "restarts": 0, "reconnects": 0, "refused_puts": 0,
         "conflicts": 0, "history_reads": 0}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


DEPTH = 3_000  # over Python's recursion limit (1000): json.loads raises RecursionError
NAMED_BAD = {
    "deep list": b"[" * DEPTH + b"]" * DEPTH,
    "deep models": b'{"models": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "deep object": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "inf factor": b'{"models": ["m1"], "hash_balance_factor": 1e400}',
    "5000-digit factor": b'{"models": ["m1"], "hash_balance_factor": 1' + b"0" * 5000 + b"}",
    "4000-digit port": b'{"address": "10.0.0.1", "port": 1' + b"0" * 4000 + b"}",
    "4000-digit checked_at": b'{"state": "warm", "checked_at": 1' + b"0" * 4000 + b"}",
    "models not a list": b'{"models": "m1"}',
    "unknown field": b'{"models": ["m1"], "typo": 1}',
    "utf-16 bom": b"\xff\xfe{}",
    "null": b"null",
}


def named_bad(name: str) -> bytes:
    return NAMED_BAD[name]


BAD_VALUES = st.one_of(st.binary(max_size=24), st.sampled_from(sorted(NAMED_BAD)).map(named_bad))
MODELS = st.lists(st.sampled_from(["m1", "m2", "m3", "m4"]), min_size=1, max_size=3,
                  unique=True)
GOOD_POOL = MODELS.map(lambda models: dumps({"models": models}))
GOOD_OTHER = st.one_of(
    st.integers(1, 65535).map(lambda port: dumps({"address": "10.0.0.1", "port": port})),
    st.sampled_from(["warm", "cold", "down"]).map(
        lambda state: dumps({"state": state, "checked_at": 100})),
)
ANY_KEY = st.one_of(st.sampled_from(POOL_KEYS + OTHER_KEYS),
                    st.binary(min_size=1, max_size=12),
                    st.binary(max_size=6).map(lambda tail: b"pools/" + tail))


# -- a fake etcd with history and compaction ---------------------------------------------

@dataclass
class Event:
    mod: int
    value: bytes | None  # None: a delete
    created: int


@dataclass
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass
class Header:
    revision: int


@dataclass
class Reply:
    header: Header
    kvs: list[KV]


@dataclass
class FakeEtcd:
    revision: int = 1
    compacted: int = 0
    events: dict[bytes, list[Event]] = field(default_factory=dict)
    reads: int = 0
    shuffle: list[int] | None = None

    def put(self, key: bytes, value: bytes) -> tuple[int, int]:
        self.revision += 1
        current = self.current(key)
        created = current.created if current is not None else self.revision
        self.events.setdefault(key, []).append(Event(self.revision, value, created))
        return self.revision, created

    def delete(self, key: bytes) -> int | None:
        if self.current(key) is None:
            return None
        self.revision += 1
        self.events[key].append(Event(self.revision, None, 0))
        return self.revision

    def current(self, key: bytes, at: int | None = None) -> Event | None:
        found = None
        for event in self.events.get(key, []):
            if at is None or event.mod <= at:
                found = event
        return found if found is not None and found.value is not None else None

    def retained(self, key: bytes) -> list[Event]:
        """The values of the key's current life that a get at some revision can still
        return (newer than the compaction, or the one current at it), oldest first."""
        now = self.current(key)
        if now is None:
            return []
        life = [e for e in self.events[key] if e.value is not None and e.created == now.created]
        at_compaction = self.current(key, self.compacted)
        return [e for e in life if e.mod > self.compacted or e is at_compaction]

    # The two calls the follower makes: a range read, and a get at a revision.
    async def get(self, key: str, range_end: Any = None, revision: int | None = None,
                  timeout: float | None = None, **_: Any) -> Reply:
        if range_end is not None:
            kvs = []
            for name in sorted(self.events):
                event = self.current(name)
                if event is not None and name.startswith(PREFIX.encode()):
                    assert event.value is not None
                    kvs.append(KV(name, event.value, event.mod, event.created))
            order = self.shuffle or []
            kvs = [kvs[i] for i in order if i < len(kvs)] + kvs[len(order):] if order else kvs
            return Reply(Header(self.revision), kvs)
        self.reads += 1
        assert revision is not None
        if revision < self.compacted:
            raise EtcdError("etcdserver: mvcc: required revision has been compacted")
        event = self.current(key.encode(), revision)
        if event is None:
            return Reply(Header(self.revision), [])
        assert event.value is not None
        return Reply(Header(self.revision),
                     [KV(key.encode(), event.value, event.mod, event.created)])


class FakeClient:
    def __init__(self, etcd: FakeEtcd) -> None:
        self.kv = etcd


# -- the model: the rules of state.py, written plainly ------------------------------------

def model_key(raw_key: bytes) -> str | None:
    try:
        key = raw_key.decode()
    except UnicodeDecodeError:
        return None
    return key if key.isprintable() else None


def valid(key: str, value: bytes) -> object | None:
    try:
        return parse_value(key, value)
    except ConfigError:
        return None


Known = dict[bytes, tuple[int, list[tuple[int, bytes]]]]


def model_config(known: Known) -> Config:
    """known: raw key -> (create revision, [(mod revision, value)] known, oldest first)."""
    pools: dict[str, Pool] = {}
    endpoints: dict[str, dict[str, Endpoint]] = {}
    statuses: dict[str, dict[str, Status]] = {}
    order = sorted((created, model_key(raw) or "", raw) for raw, (created, _) in known.items())
    for _, key, raw in order:
        if not key:
            continue
        values = [v for v in (valid(key, value) for _, value in reversed(known[raw][1])) if v]
        if isinstance(values[0] if values else None, Pool):
            owned = {m for pool in pools.values() for m in pool.models}
            for value in values:
                assert isinstance(value, Pool)
                if not owned & set(value.models):
                    pools[value.name] = value
                    break
        elif values and isinstance(values[0], Endpoint):
            endpoint = values[0]
            endpoints.setdefault(endpoint.pool, {})[endpoint.id] = endpoint
        elif values and isinstance(values[0], Status):
            status = values[0]
            statuses.setdefault(status.pool, {})[status.id] = status
    return Config(
        pools=dict(sorted(pools.items())),
        endpoints={p: dict(sorted(m.items())) for p, m in sorted(endpoints.items())},
        statuses={p: dict(sorted(m.items())) for p, m in sorted(statuses.items())})


class LastGoodConfig(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        STATS["cases"] += 1
        self.etcd = FakeEtcd()
        self.client = FakeClient(self.etcd)
        self.new_follower()
        # What the running control plane can know: key -> (create revision, values).
        self.known: Known = {}
        self.away = False

    def new_follower(self) -> None:
        self.state = ConfigState()
        self.follower = EtcdFollower(SETTINGS, self.state, lambda revision: None)

    def relist(self) -> None:
        asyncio.run(self.follower._relist(self.client))  # type: ignore[arg-type]

    def _put(self, key: bytes, value: bytes) -> None:
        mod, created = self.etcd.put(PREFIX.encode() + key, value)
        if self.away:
            return
        before = self.state.config()
        decoded = decode_key(PREFIX.encode() + key, PREFIX)
        self.follower._apply(decoded, value, mod, created)
        entry = self.known.get(key)
        if entry is None or entry[0] != created:
            entry = (created, [])
        self.known[key] = (created, [*entry[1], (mod, value)])
        name = decoded if isinstance(decoded, str) else decoded.key
        if name in self.state.rejected:
            STATS["refused_puts"] += 1
            if "already belongs" in self.state.rejected[name]:
                STATS["conflicts"] += 1
            assert self.state.config() == before, f"a refused put of {key!r} changed the config"

    @rule(key=ANY_KEY, value=st.one_of(GOOD_POOL, GOOD_OTHER, BAD_VALUES))
    def put_anything(self, key: bytes, value: bytes) -> None:
        self._put(key, value)

    @rule(key=st.sampled_from(POOL_KEYS), value=GOOD_POOL)
    def put_pool(self, key: bytes, value: bytes) -> None:
        self._put(key, value)

    @rule(key=st.sampled_from(OTHER_KEYS), value=GOOD_OTHER)
    def put_other(self, key: bytes, value: bytes) -> None:
        self._put(key, value)

    @rule(key=st.sampled_from(POOL_KEYS + OTHER_KEYS), values=st.lists(BAD_VALUES, min_size=1,
                                                                       max_size=15))
    def flood_refused(self, key: bytes, values: list[bytes]) -> None:
        for value in values:
            self._put(key, value)

    @rule(key=st.one_of(st.sampled_from(POOL_KEYS + OTHER_KEYS), ANY_KEY))
    def delete(self, key: bytes) -> None:
        revision = self.etcd.delete(PREFIX.encode() + key)
        if revision is None or self.away:
            return
        self.follower._apply(decode_key(PREFIX.encode() + key, PREFIX), None, revision)
        self.known.pop(key, None)

    @rule(back=st.integers(0, 5))
    def compact(self, back: int) -> None:
        self.etcd.compacted = max(self.etcd.compacted, self.etcd.revision - back)

    @rule()
    def lose_etcd(self) -> None:
        """The watch stops (etcd gone, or compacted past it); writes go on meanwhile."""
        self.away = True

    def _learn_from_etcd(self, keep_known: bool) -> None:
        known: Known = {}
        for name in self.etcd.events:
            current = self.etcd.current(name)
            if current is None:
                continue
            key = name[len(PREFIX):]
            retained = self.etcd.retained(name)
            old = self.known.get(key) if keep_known else None
            life = [(e.mod, e.value) for e in retained if e.value is not None]
            if old is not None and old[0] == current.created:
                last = old[1][-1][0]
                known[key] = (current.created, [*old[1], *[i for i in life if i[0] > last]])
            else:
                known[key] = (current.created, life)
        self.known = known

    @rule(order=st.permutations(list(range(12))))
    def reconnect(self, order: list[int]) -> None:
        """The follower re-lists on the state it has (the watch came back or was compacted)."""
        STATS["reconnects"] += 1
        self.etcd.shuffle = order
        self.relist()
        self._learn_from_etcd(keep_known=True)
        self.away = False

    @rule(order=st.permutations(list(range(12))))
    def restart(self, order: list[int]) -> None:
        """A fresh control plane: re-list (in any order) and walk etcd's history."""
        STATS["restarts"] += 1
        reads = self.etcd.reads
        self.etcd.shuffle = order
        self.new_follower()
        self.relist()
        STATS["history_reads"] += self.etcd.reads - reads
        self._learn_from_etcd(keep_known=False)
        self.away = False

    @invariant()
    def config_is_the_last_good_one(self) -> None:
        STATS["steps"] += 1
        if self.away:
            return
        assert self.state.config() == model_config(self.known)


def test_last_good_config_state_machine() -> None:
    for key in STATS:
        STATS[key] = 0
    run_state_machine_as_test(LastGoodConfig, settings=settings(
        max_examples=150, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
    print(f"\nstate machine: {STATS}")
    assert STATS["restarts"] and STATS["conflicts"] and STATS["refused_puts"]
