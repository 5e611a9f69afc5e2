"""TrafficWindow: per endpoint, the requests of the last ``window_s`` seconds. Pure.

Fed ``Observation``s (entries.py) with the time they arrived; ``summary`` gives, per (pool,
upstream address), what the prober needs to judge warmth:

- ``samples``: time to first token of each request that got its first body byte within the
  window, plus, for each request still waiting for it, its age so far: a hung request is the
  slowest sample of all, not a missing one. Each sample carries the request's body size.
- Low rates: an endpoint still serving (a request ended within the window or in flight)
  keeps its last ``LOW_RATE_SAMPLES`` ended requests as samples for up to
  ``LOW_RATE_HORIZON_S``, so one serving a request every 5-15 s still has enough samples
  for a verdict (and, when it turns slow, is judged slow: it is never idle enough to be
  probed). An endpoint with nothing within the window keeps nothing: probes decide.
- ``requests``, ``rps``: requests that ended within the window.
- ``abandoned``: requests that ended without a first byte and without an upstream failure
  (the client gave up or the idle timeout fired); each is also a sample of its duration, a
  lower bound of its time to first token. ``failures``: no host answered.
- ``covered_s``: how much of the window an Envoy stream was connected. A window that saw no
  stream says it has no data instead of inventing any (0 requests with ``covered_s`` 0).

For splits, ``active_sessions`` gives the session hashes a pool served within a TTL (the
pool's ``session_ttl_s``): the split leader leaves their slots alone. ``placements`` adds,
per session, where it lands on a ring and the host that served it last: the pins of a ring
change are computed from them (affinity/plan.py). At most ``MAX_ACTIVE_SESSIONS`` per pool
are kept, the least recently seen dropped first.

A request in flight whose periodic entries stop (its Envoy went away) is dropped after
``STALE_FLIGHT_S``. Entries are never sampled: every request counts.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from control_plane.traffic.entries import Observation

DEFAULT_WINDOW_S = 10.0
# Periodic entries come every flush interval (1 s); a request silent for this long is gone.
STALE_FLIGHT_S = 5.0
# Samples kept per endpoint per window: the most recent ones, enough for a p90 at any rate.
# Bounded because the prober reads every window each poll: at 10k entries/s over 100
# endpoints, 512 samples each made /traffic 920 KiB and 0.78 s of CPU to build; 128 keeps a
# p90 of the last 128 requests per endpoint.
MAX_SAMPLES = 128
# Kept past the window for low-rate endpoints: the judge's minimum sample count (judge.py), up
# to this age. At one request every 15 s the last 4 span 45-60 s.
LOW_RATE_SAMPLES = 4
LOW_RATE_HORIZON_S = 60.0
# Session hashes remembered per pool (splits' active sessions): ~100 bytes each.
MAX_ACTIVE_SESSIONS = 100_000

Endpoint = tuple[str, str]  # (pool, "ip:port")


# Placement, _Flight and _Ended are tuples: one of each is built per access-log record,
# ~10,000 a second, where a dataclass took microseconds to build.
class Placement(NamedTuple):
    """Where an active session was served last."""

    seen: float  # when (the control plane's clock)
    address: str  # "ip:port" of the host
    ring_hash: int | None  # its key's place on a ring (None: an older filter)


@dataclass(frozen=True)
class Sample:
    ttft_ms: float
    request_bytes: int
    waiting: bool = False  # no first byte yet: ``ttft_ms`` is a lower bound


@dataclass(frozen=True)
class EndpointTraffic:
    samples: tuple[Sample, ...]
    requests: int
    abandoned: int
    failures: int
    rps: float
    covered_s: float


class _Flight(NamedTuple):
    endpoint: Endpoint
    seen_at: float
    elapsed_ms: float
    first_byte_ms: float | None
    request_bytes: int


class _Ended(NamedTuple):
    at: float
    elapsed_ms: float
    first_byte_ms: float | None
    request_bytes: int
    abandoned: bool
    failure: bool


@dataclass
class TrafficWindow:
    window_s: float = DEFAULT_WINDOW_S
    _flights: dict[tuple[str, str], _Flight] = field(default_factory=dict)
    _ended: dict[Endpoint, deque[_Ended]] = field(default_factory=dict)
    _streams: int = 0  # Envoy access-log streams connected now
    _covered_since: float | None = None  # since when some stream has been connected
    # pool -> session hash -> placement, least recently seen first.
    _sessions: dict[str, OrderedDict[str, Placement]] = field(default_factory=dict)

    def connected(self, now: float) -> None:
        if self._streams == 0:
            self._covered_since = now
        self._streams += 1

    def disconnected(self, now: float) -> None:
        self._streams = max(0, self._streams - 1)
        if self._streams == 0:
            self._covered_since = None

    def observe(self, obs: Observation, now: float) -> None:
        endpoint = (obs.pool, obs.address)
        if obs.session_hash:
            seen = self._sessions.setdefault(obs.pool, OrderedDict())
            old = seen.get(obs.session_hash)
            if obs.upstream_failure and old is not None:
                # No host answered: the session is where it was served last.
                seen[obs.session_hash] = Placement(now, old.address, old.ring_hash)
            else:
                seen[obs.session_hash] = Placement(now, obs.address, obs.ring_hash)
            seen.move_to_end(obs.session_hash)
            if len(seen) > MAX_ACTIVE_SESSIONS:
                seen.popitem(last=False)
        if not obs.final:
            self._flights[obs.stream] = _Flight(endpoint, now, obs.elapsed_ms,
                                                obs.first_byte_ms, obs.request_bytes)
            return
        self._flights.pop(obs.stream, None)
        ended = self._ended.setdefault(endpoint, deque(maxlen=MAX_SAMPLES))
        ended.append(_Ended(
            at=now, elapsed_ms=obs.elapsed_ms, first_byte_ms=obs.first_byte_ms,
            request_bytes=obs.request_bytes,
            abandoned=obs.first_byte_ms is None and not obs.upstream_failure,
            failure=obs.upstream_failure))

    def active_sessions(self, pool: str, now: float, ttl_s: float) -> list[str]:
        """Session hashes ``pool`` served (or is serving) within the last ``ttl_s``; older
        ones are forgotten."""
        return list(self.placements(pool, now, ttl_s))

    def placements(self, pool: str, now: float, ttl_s: float) -> dict[str, Placement]:
        """Like ``active_sessions``, with each session's placement."""
        seen = self._sessions.get(pool)
        if seen is None:
            return {}
        while seen and now - next(iter(seen.values())).seen > ttl_s:
            seen.popitem(last=False)
        return dict(seen)

    def _expire(self, now: float) -> None:
        for stream in [s for s, f in self._flights.items() if now - f.seen_at > STALE_FLIGHT_S]:
            del self._flights[stream]
        flying = {flight.endpoint for flight in self._flights.values()}
        for endpoint in list(self._ended):
            ended = self._ended[endpoint]
            horizon = self.window_s
            if endpoint in flying or now - ended[-1].at <= self.window_s:
                horizon = max(self.window_s, LOW_RATE_HORIZON_S)  # still serving
            while ended and (now - ended[0].at > horizon or (
                    now - ended[0].at > self.window_s and len(ended) > LOW_RATE_SAMPLES)):
                ended.popleft()
            if not ended:
                del self._ended[endpoint]

    def summary(self, now: float) -> dict[Endpoint, EndpointTraffic]:
        self._expire(now)
        covered = 0.0
        if self._covered_since is not None:
            covered = min(self.window_s, now - self._covered_since)
        samples: dict[Endpoint, list[Sample]] = {}
        for flight in self._flights.values():
            if flight.first_byte_ms is not None:
                sample = Sample(flight.first_byte_ms, flight.request_bytes)
            else:  # still waiting: its age, counted up to now
                age = flight.elapsed_ms + 1000 * (now - flight.seen_at)
                sample = Sample(age, flight.request_bytes, waiting=True)
            samples.setdefault(flight.endpoint, []).append(sample)
        result: dict[Endpoint, EndpointTraffic] = {}
        for endpoint in set(samples) | set(self._ended):
            ended: Iterable[_Ended] = self._ended.get(endpoint, ())
            mine = samples.get(endpoint, [])
            requests = abandoned = failures = 0
            for item in ended:
                if now - item.at <= self.window_s:  # else a low-rate sample only
                    requests += 1
                    abandoned += item.abandoned
                    failures += item.failure
                if item.first_byte_ms is not None:
                    mine.append(Sample(item.first_byte_ms, item.request_bytes))
                elif item.abandoned:  # waited this long for a first byte that never came
                    mine.append(Sample(item.elapsed_ms, item.request_bytes, waiting=True))
            result[endpoint] = EndpointTraffic(
                samples=tuple(mine[-MAX_SAMPLES:]), requests=requests, abandoned=abandoned,
                failures=failures, rps=requests / covered if covered > 0 else 0.0,
                covered_s=covered)
        return result
