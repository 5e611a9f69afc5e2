"""Envoy's ring-hash ring, mirrored in Python, so the control plane knows which host a
session's key lands on before and after a change. Pure.

Mirrors Envoy 1.40 (source/extensions/load_balancing_policies/ring_hash/ring_hash_lb.cc,
common/thread_aware_lb_impl.cc): the ring holds the healthy hosts of the pool's one
locality; each host's weight is normalized by the sum of those weights; ``scale = min(ceil(
min_weight x min_ring_size) / min_weight, max_ring_size)``; walking the hosts in EDS order,
a running sum gives each host ``scale x weight`` entries keyed ``"<hash key>_<i>"``, where
the hash key is the endpoint's ``envoy.lb`` ``hash_key`` metadata (its id,
translate/endpoints.py), hashed with XXH64 (seed 0). A request with key hash ``h`` goes to
the first entry whose hash is ``>= h``, wrapping to the first. The same floating-point
operations in the same order make the same counts. The request's ``h`` is XXH64 of the
``x-hotpath-session`` value, which the Lua filter reports in the access log
(``ring_hash``). The bounded-load factor can still send a request past its entry while the
host is loaded; the pins follow where sessions were actually served, so that is covered.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_MASK = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    return _rotl((acc + lane * _P2) & _MASK, 31) * _P1 & _MASK


def _merge(acc: int, value: int) -> int:
    return ((acc ^ _round(0, value)) * _P1 + _P4) & _MASK


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 (the reference algorithm), as Envoy's HashUtil::xxHash64."""
    length = len(data)
    i = 0
    if length >= 32:
        v1 = (seed + _P1 + _P2) & _MASK
        v2 = (seed + _P2) & _MASK
        v3 = seed
        v4 = (seed - _P1) & _MASK
        while i + 32 <= length:
            v1 = _round(v1, int.from_bytes(data[i:i + 8], "little"))
            v2 = _round(v2, int.from_bytes(data[i + 8:i + 16], "little"))
            v3 = _round(v3, int.from_bytes(data[i + 16:i + 24], "little"))
            v4 = _round(v4, int.from_bytes(data[i + 24:i + 32], "little"))
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _MASK
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + _P5) & _MASK
    h = (h + length) & _MASK
    while i + 8 <= length:
        h ^= _round(0, int.from_bytes(data[i:i + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _MASK
        i += 8
    if i + 4 <= length:
        h ^= int.from_bytes(data[i:i + 4], "little") * _P1 & _MASK
        h = (_rotl(h, 23) * _P2 + _P3) & _MASK
        i += 4
    while i < length:
        h ^= data[i] * _P5 & _MASK
        h = _rotl(h, 11) * _P1 & _MASK
        i += 1
    h ^= h >> 33
    h = h * _P2 & _MASK
    h ^= h >> 29
    h = h * _P3 & _MASK
    h ^= h >> 32
    return h


def key_hash(session: str) -> int:
    """Where Envoy's hash policy puts a session key (one header value) on the ring."""
    return xxh64(session.encode())


@functools.lru_cache(maxsize=1 << 14)
def _points(hash_key: str, count: int) -> tuple[int, ...]:
    """The ring entries of one host: the same for the same key and count, so a change
    hashes only the hosts it touched."""
    return tuple(xxh64(f"{hash_key}_{i}".encode()) for i in range(count))


@dataclass(frozen=True)
class RingHost:
    """A host as Envoy's ring builder sees it: in EDS order, with its EDS weight."""

    key: str  # the envoy.lb hash_key (the endpoint id)
    weight: int


class Ring:
    """One ring: entry hashes in order and the host of each."""

    def __init__(self, hosts: Sequence[RingHost], min_ring_size: int, max_ring_size: int):
        self.hosts = tuple(hosts)
        # hash -> host, and the hashes sorted: sorting plain ints is ~10x faster than sorting
        # (hash, host) pairs (a 1,000-host ring at 128 points: ~60 ms instead of ~0.6 s).
        # Equal hashes of two hosts (2^-64 per pair) would make Envoy's order unspecified.
        owners: dict[int, str] = {}
        total = sum(h.weight for h in hosts)
        if total > 0:
            normalized = [(h, h.weight * 1.0 / total) for h in hosts]
            smallest = min(w for _, w in normalized)
            scale = min(math.ceil(smallest * min_ring_size) / smallest, float(max_ring_size))
            current = 0.0
            target = 0.0
            for host, weight in normalized:
                target += scale * weight
                # Envoy adds entries while current < target, current counting whole entries
                # (exact in a double): as many as take it to ceil(target).
                count = max(0, math.ceil(target) - int(current))
                current += count
                owners.update(dict.fromkeys(_points(host.key, count), host.key))
        self._hashes = sorted(owners)
        self._owners = owners

    def __len__(self) -> int:
        return len(self._hashes)

    def owner(self, h: int) -> str | None:
        """The host a request with key hash ``h`` goes to (None: empty ring)."""
        if not self._hashes:
            return None
        index = bisect.bisect_left(self._hashes, h)
        return self._owners[self._hashes[index if index < len(self._hashes) else 0]]

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for key in self._owners.values():
            result[key] = result.get(key, 0) + 1
        return result


def fingerprint(hosts: Iterable[RingHost], min_ring_size: int) -> str:
    """Names a ring: equal for equal hosts, weights and size (every replica computes it
    from the same etcd state)."""
    parts = [str(min_ring_size)] + [f"{h.key}={h.weight}" for h in hosts]
    return f"{xxh64(','.join(parts).encode()):016x}"
