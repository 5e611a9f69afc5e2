"""Prometheus text exposition for the control plane, and its small HTTP server.

``render`` is pure (samples in, text out); ``serve_metrics`` is the aiohttp shell that also
answers ``/healthz`` (200 once etcd has been read and a snapshot published) for compose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter or gauge
    help: str
    samples: tuple[tuple[dict[str, str], float], ...] = field(default_factory=tuple)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + ",".join(escaped) + "}"


def render(metrics: Iterable[Metric]) -> str:
    lines = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            lines.append(f"{metric.name}{_labels(labels)} {value:g}")
    return "\n".join(lines) + "\n"


async def serve_metrics(host: str, port: int, collect: Callable[[], Iterable[Metric]],
                        healthy: Callable[[], bool]) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=render(collect()),
                            content_type="text/plain", charset="utf-8",
                            headers={"x-prometheus-format": "0.0.4"})

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "starting\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
