"""judge(): an endpoint's real traffic as a verdict, fast or slow. Pure.

The rule (docs/prober.md):

- Samples are the window's times to first token (window.py); a request still waiting counts
  once it has waited past the threshold (it is slow whatever comes), not before.
- Long prompts take longer to first token on a healthy server: each sample is first reduced
  by ``prefill_ms_per_kib`` per KiB of request body (the prefill a healthy server needs for
  it), so a long-context session does not make its host look cold.
- With at least ``min_samples`` samples, the verdict is slow when the 90th percentile of the
  reduced samples exceeds the pool's ``cold_ttft_ms``; with fewer, there is no verdict and
  the prober probes as for an idle host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from control_plane.traffic.window import LOW_RATE_SAMPLES, EndpointTraffic, Sample

# The window keeps this many samples of a low-rate endpoint past its length (window.py).
DEFAULT_MIN_SAMPLES = LOW_RATE_SAMPLES
# Prefill a healthy server needs per KiB of request body: ~200-250 tokens per KiB of English
# chat JSON (205 measured with SmolLM2's tokenizer), and 5,000+ prompt tokens/s on a GPU for
# 8B-class models. Raise it for CPU servers: llama.cpp with SmolLM2-135M Q4 on one CPU thread
# prefills 70-90 tokens/s, ~3,000 ms per KiB (benchmarks/prefill_rule.py, docs/prober.md).
DEFAULT_PREFILL_MS_PER_KIB = 50.0


@dataclass(frozen=True)
class Verdict:
    slow: bool
    decided_ms: float  # the reduced 90th percentile the verdict compares
    p50_ms: float  # of the samples as measured (not reduced)
    p90_ms: float
    samples: int
    rps: float
    window_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def merge(parts: Iterable[EndpointTraffic]) -> EndpointTraffic | None:
    """One endpoint's traffic as several control planes (each with its Envoys) saw it."""
    parts = list(parts)
    if not parts:
        return None
    return EndpointTraffic(
        samples=tuple(s for p in parts for s in p.samples),
        requests=sum(p.requests for p in parts),
        abandoned=sum(p.abandoned for p in parts),
        failures=sum(p.failures for p in parts),
        rps=sum(p.rps for p in parts),
        covered_s=max(p.covered_s for p in parts),
    )


def judge(traffic: EndpointTraffic, cold_ttft_ms: float,
          prefill_ms_per_kib: float = DEFAULT_PREFILL_MS_PER_KIB,
          min_samples: int = DEFAULT_MIN_SAMPLES) -> Verdict | None:
    def reduce(sample: Sample) -> float:
        return max(0.0, sample.ttft_ms - prefill_ms_per_kib * sample.request_bytes / 1024)

    counted: list[Sample] = [s for s in traffic.samples
                             if not s.waiting or reduce(s) > cold_ttft_ms]
    if len(counted) < min_samples:
        return None
    measured = [s.ttft_ms for s in counted]
    reduced = [reduce(s) for s in counted]
    decided = percentile(reduced, 0.9)
    return Verdict(slow=decided > cold_ttft_ms, decided_ms=decided,
                   p50_ms=percentile(measured, 0.5), p90_ms=percentile(measured, 0.9),
                   samples=len(counted), rps=traffic.rps, window_s=traffic.covered_s)
