"""`hotpath bench`: multi-turn chat replay through hotpath, plain load balancers, peers and an
oracle, on simulated or real OpenAI-compatible servers; plus gateway overhead.

Modules: workload (pure, seeded sessions), replay (aiohttp client: TTFT, e2e, cache hits),
strategies (the stacks behind each strategy), peers (nginx, vllm-router, sglang-router),
overhead (wrk against a static upstream), report (table, JSON, PNG), run (CLI entry points).
"""

from control_plane.bench.run import BenchConfig, add_bench_arguments, run_bench, run_bench_from_args

__all__ = ["BenchConfig", "add_bench_arguments", "run_bench", "run_bench_from_args"]
