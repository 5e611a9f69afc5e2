"""Prometheus metrics: counters, gauges and histograms rendered as text exposition 0.0.4,
and the small HTTP server every hotpath process uses for ``/metrics`` and ``/healthz``.

Families and ``render`` are pure; ``serve_metrics`` is the aiohttp shell. A family may carry
constant labels, written first on every sample (the simulator's ``model_name``, as vLLM
does). Label values are escaped (backslash, double quote, newline); numbers are written
as integers when whole (``le="1"``, ``3``), else as Python's shortest repr.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web

Labels = tuple[tuple[str, str], ...]

# Label-value tuples remembered per family (a bound: series come and go with endpoints).
MAX_CACHED_KEYS = 100_000
# Seconds; from a warm one-token answer (~10-50 ms) to a cold model load.
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Family:
    """One metric name with samples keyed by label values."""

    def __init__(self, name: str, kind: str, help: str, label_names: Sequence[str],
                 const_labels: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.label_names = tuple(label_names)
        self.const_labels: Labels = tuple((const_labels or {}).items())
        overlap = set(self.label_names) & {k for k, _ in self.const_labels}
        if overlap:
            raise ValueError(f"{name}: labels {sorted(overlap)} are both constant and variable")
        self.values: dict[Labels, float] = {}
        # label values -> key, for the series seen: the access-log receiver counts every
        # request, and zipping the names in each time was a third of its CPU.
        self._keys: dict[tuple[str, ...], Labels] = {}

    def key(self, values: Sequence[str]) -> Labels:
        values = tuple(values)
        known = self._keys.get(values)
        if known is not None:
            return known
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        key = tuple(zip(self.label_names, values, strict=True))
        if len(self._keys) < MAX_CACHED_KEYS:
            self._keys[values] = key
        return key

    def inc(self, *labels: str, by: float = 1.0) -> None:
        key = self.key(labels)
        self.values[key] = self.values.get(key, 0.0) + by

    def set(self, value: float, *labels: str) -> None:
        self.values[self.key(labels)] = value

    def get(self, *labels: str) -> float:
        return self.values.get(self.key(labels), 0.0)

    def remove(self, predicate: dict[str, str]) -> None:
        """Drop samples whose labels include ``predicate`` (an endpoint that went away)."""
        for key in [k for k in self.values if predicate.items() <= dict(k).items()]:
            del self.values[key]

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        out += [f"{self.name}{_labels(self.const_labels + k)} {_number(v)}"
                for k, v in sorted(self.values.items())]
        return out


class Histogram(Family):
    def __init__(self, name: str, help: str, label_names: Sequence[str],
                 buckets: Sequence[float] = PROBE_BUCKETS,
                 const_labels: Mapping[str, str] | None = None) -> None:
        super().__init__(name, "histogram", help, label_names, const_labels)
        self.buckets = tuple(buckets)
        # Per bucket, then above the last bound; cumulated when read (an observation
        # touches one bucket).
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def declare(self, *labels: str) -> None:
        """Expose the series (all zeros) before its first observation."""
        key = self.key(labels)
        self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        self.sums.setdefault(key, 0.0)

    def observe(self, value: float, *labels: str) -> None:
        key = self.key(labels)
        counts = self.counts.get(key)
        if counts is None:
            self.declare(*labels)
            counts = self.counts[key]
        counts[bisect.bisect_left(self.buckets, value)] += 1  # the first bound >= value
        self.sums[key] += value

    def total(self, *labels: str) -> float:
        """The sum of the observed values."""
        return self.sums.get(self.key(labels), 0.0)

    def count(self, *labels: str) -> int:
        return sum(self.counts.get(self.key(labels), ()))

    def remove(self, predicate: dict[str, str]) -> None:
        for key in [k for k in self.counts if predicate.items() <= dict(k).items()]:
            del self.counts[key]
            del self.sums[key]

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        bounds = [_number(b) for b in self.buckets] + ["+Inf"]
        for key in sorted(self.counts):
            labels = self.const_labels + key
            total = 0
            for bound, count in zip(bounds, self.counts[key], strict=True):
                total += count  # Prometheus buckets are cumulative
                le = 'le="' + bound + '"'
                out.append(f"{self.name}_bucket{_labels(labels, le)} {total}")
            out.append(f"{self.name}_sum{_labels(labels)} {_number(self.sums[key])}")
            out.append(f"{self.name}_count{_labels(labels)} {total}")
        return out


def render(families: Iterable[Family]) -> str:
    return "\n".join(line for family in families for line in family.lines()) + "\n"


def _json_handler(view: Callable[[], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_: web.Request) -> web.Response:
        return web.json_response(view())

    return handle


async def serve_metrics(host: str, port: int, families: Callable[[], Iterable[Family]],
                        healthy: Callable[[], bool],
                        json_views: Mapping[str, Callable[[], Any]] | None = None,
                        ) -> web.AppRunner:
    """Serve ``/metrics`` and ``/healthz`` (200 when ``healthy()``, else 503) on host:port,
    and each of ``json_views`` (path -> a function giving a JSON value).

    Port 0 picks a free port: ``runner.addresses`` has the one bound.
    """

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=render(families()), content_type="text/plain",
                            charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "starting\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    for path, view in (json_views or {}).items():
        app.router.add_get(path, _json_handler(view))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", port).start()
    return runner
