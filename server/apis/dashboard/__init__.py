"""The dashboard on the metrics port: ``GET /dashboard`` (a page) and ``GET /dashboard/status`` (JSON).

Open without a token, like ``/metrics``: whoever reaches the metrics port sees the models' names.
The page is rendered on the server from the same status the JSON carries, so it reads without
JavaScript; its script then polls ``dashboard/status`` (a relative URL) and redraws it. Rates and
percentiles come from the histograms metrics already keep, differenced between polls
(``sampling``): the dashboard adds nothing to the request path and does nothing while nobody looks.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from ...http.request import Request
from ...http.responses import Response
from ...http.routing import Route, methods
from ...metrics.recording import Metrics
from ...metrics.system import SystemMetrics, rss_bytes
from ...models.registry import ModelRegistry
from ...models.status import VersionStatus
from ...version import TORCHSERVE_VERSION, marserve_version
from . import page
from .sampling import SPAN_SECONDS, STEP_SECONDS, Counts, Figures, Reading, Sampler, figures

#: Open connections per listener, by API name (inference, management, metrics), read when polled.
Connections = Callable[[], Mapping[str, int]]

#: Every reason the front door counts in marserve_http_refused_total, listed even at 0.
REFUSAL_REASONS = (
    "connection_cap", "evicted", "head_timeout", "read_timeout", "body_too_slow", "invalid",
    "head_too_large", "too_many_headers",
)  # fmt: skip
DEFAULT_REFRESH = 1.0  # seconds between the page's polls
MIN_REFRESH, MAX_REFRESH = 0.25, 60.0


def routes(registry: ModelRegistry, metrics: Metrics, connections: Connections, *, system_metrics: bool = True) -> list[Route]:
    """``system_metrics`` False (``disable_system_metrics``): no host CPU, memory or GPU figures."""
    dashboard = Dashboard(registry, metrics, connections, system_metrics=system_metrics)

    async def show(request: Request) -> Response:
        refresh = _refresh(request.query.get("refresh"))
        nonce = secrets.token_urlsafe(16)
        body = page.render(await dashboard.status(), refresh=refresh, nonce=nonce)
        return Response(200, body.encode(), "text/html; charset=utf-8", _page_headers(nonce))

    async def status(request: Request) -> Response:
        return Response(200, orjson.dumps(await dashboard.status()), "application/json", _JSON_HEADERS)

    return [
        Route("/dashboard", show, methods("GET"), None, reads_body=False),
        Route("/dashboard/status", status, methods("GET"), None, reads_body=False),
    ]


def _refresh(value: str | None) -> float:
    try:
        seconds = float(value) if value else DEFAULT_REFRESH
    except ValueError:
        return DEFAULT_REFRESH
    return min(MAX_REFRESH, max(MIN_REFRESH, seconds)) if math.isfinite(seconds) else DEFAULT_REFRESH


_JSON_HEADERS = (("x-content-type-options", "nosniff"),)


def _page_headers(nonce: str) -> tuple[tuple[str, str], ...]:
    # Only the page's own script runs, and it may only fetch from where the page came from.
    policy = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return (("content-security-policy", policy), ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer"))


class Dashboard:
    """Builds the status; owns the sampler and the readings of the host it keeps between polls."""

    def __init__(
        self, registry: ModelRegistry, metrics: Metrics, connections: Connections, *, system_metrics: bool = True
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.connections = connections
        self.started_at = time.time()
        self._latency_bounds = metrics.request_seconds.bounds
        self._batch_bounds = metrics.batch_size.bounds
        self.sampler = Sampler(self._read, self._latency_bounds)
        # Our own reader of the host's figures: its CPU figure is the change since our last poll,
        # so polling the dashboard leaves /metrics' CPUUtilization as it was.
        self._host = SystemMetrics(metrics.hostname, lambda: ()) if system_metrics else None
        self._host_lock = threading.Lock()
        self._frontend_cpu: tuple[float, float] | None = None  # (monotonic, CPU seconds) at the last poll

    def _read(self) -> Reading:
        metrics = self.metrics
        return Reading(
            at=time.monotonic(),
            wall=time.time(),
            latency={key: counts for key, (counts, _) in metrics.request_seconds.snapshot().items()},
            batches={key: counts for key, (counts, _) in metrics.batch_size.snapshot().items()},
            responses=metrics.responses_by_class(),
            refused=metrics.refusals(),
            answers=metrics.responses_by_model(),
        )

    async def status(self) -> dict[str, Any]:
        """The status as ``GET /dashboard/status`` answers it (README: Dashboard)."""
        models = self.registry.status()
        current, base = self.sampler.poll()
        connections = dict(self.connections())
        pids = sorted({w.pid for m in models for w in m.workers if w.pid})
        # /proc and NVML (which may take a while to answer) off the event loop.
        host, rss = await asyncio.to_thread(self._host_figures, pids)
        window = current.at - base.at if base is not None else None
        history = self.sampler.history()
        return {
            "time": current.wall,
            "window_seconds": window,
            "history_step_seconds": STEP_SECONDS,
            "history_span_seconds": SPAN_SECONDS,
            "server": {
                "version": marserve_version(),
                "torchserve_version": TORCHSERVE_VERSION,
                "hostname": self.metrics.hostname,
                "started_at": self.started_at,
                "uptime_seconds": current.wall - self.started_at,
                **host,
                "connections": connections,
                "responses": {
                    f"{cls}xx": _counter(current.responses.get(cls, 0), base.responses.get(cls, 0) if base else None, window)
                    for cls in (2, 4, 5)
                },
                "refused": {
                    reason: _counter(current.refused.get(reason, 0), base.refused.get(reason, 0) if base else None, window)
                    for reason in (*REFUSAL_REASONS, *sorted(set(current.refused) - set(REFUSAL_REASONS)))
                },
            },
            "models": [self._model(m, current, base, window, rss, history) for m in models],
        }

    def _model(
        self, m: VersionStatus, current: Reading, base: Reading | None, window: float | None,
        rss: Mapping[int, int], history: Any,
    ) -> dict[str, Any]:  # fmt: skip
        key = (m.name, m.version)
        latency = current.latency.get(key)
        batches = current.batches.get(key)
        recent: Figures | None = None
        if latency is not None and base is not None and window:
            recent = figures(self._latency_bounds, latency, base.latency.get(key), window)
        loaded = [w.loaded_at for w in m.workers if w.loaded_at]
        settings = m.settings
        batch_window = None
        if batches is not None and base is not None:
            old = base.batches.get(key)
            batch_window = [b - a for a, b in zip(old, batches)] if old is not None else list(batches)
        return {
            "name": m.name,
            "version": m.version,
            "default": m.is_default,
            "url": m.url,
            "handler": m.handler,
            "runtime": m.runtime,
            "loaded_at_startup": m.loaded_at_startup,
            "loaded_at": max(loaded) if loaded else None,
            "settings": {
                "batch_size": settings.batch_size,
                "max_batch_delay_ms": settings.max_batch_delay,
                "min_workers": settings.min_workers,
                "max_workers": settings.max_workers,
                "response_timeout_seconds": settings.response_timeout,
                "device_type": settings.device_type,
            },
            "queue": {"length": m.queue_length, "capacity": m.queue_capacity},
            "workers": [
                {
                    "id": w.id,
                    "state": str(w.state),
                    "pid": w.pid,
                    "rss_bytes": rss.get(w.pid) if w.pid else None,
                    "gpu": w.gpu_id,
                    "restarts": w.restarts,
                    "in_flight": w.in_flight,
                    "last_exit": w.last_exit or None,
                    "started_at": w.started_at or None,
                    "loaded_at": w.loaded_at or None,
                }
                for w in m.workers
            ],
            "requests": {
                "total": sum(latency) if latency is not None else 0,
                "per_second": (recent.per_second if recent is not None else 0.0) if window else None,
            },
            "latency_ms": _milliseconds(recent),
            "responses": _by_class(current.answers.get(key), base.answers.get(key) if base is not None else None, base, window),
            "batch_sizes": [
                {
                    "le": None if math.isinf(bound) else int(bound),
                    "label": _batch_label(self._batch_bounds, i),
                    "count": batch_window[i] if batch_window is not None else None,
                    "total": batches[i] if batches is not None else 0,
                }
                for i, bound in enumerate(self._batch_bounds)
            ],
            "history": [
                {"time": point.wall, "per_second": f.per_second, "p50_ms": _ms(f.p50), "p99_ms": _ms(f.p99)}
                for point in history
                if (f := point.figures.get(key)) is not None
            ],
        }

    def _host_figures(self, pids: list[int]) -> tuple[dict[str, Any], dict[int, int]]:
        """The host's CPU, memory and GPUs, the frontend's own figures, and each worker's RSS."""
        now = time.monotonic()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_seconds = usage.ru_utime + usage.ru_stime
        with self._host_lock:
            last, self._frontend_cpu = self._frontend_cpu, (now, cpu_seconds)
            families = {f.name: f for f in self._host.families()} if self._host is not None else {}
        frontend_cpu = None
        if last is not None and now > last[0]:
            frontend_cpu = round(100.0 * (cpu_seconds - last[1]) / (now - last[0]), 1)

        def value(name: str) -> float | None:
            family = families.get(name)
            return family.samples[0][2] if family is not None and family.samples else None

        memory = None
        used, available = value("MemoryUsed"), value("MemoryAvailable")
        if used is not None and available is not None:
            memory = {
                "used_bytes": int(used * 2**20),
                "total_bytes": int((used + available) * 2**20),
                "percent": value("MemoryUtilization"),
            }
        gpus: dict[str, dict[str, float]] = {}
        for name, field, scale in (
            ("GPUUtilization", "utilization_percent", 1.0),
            ("GPUMemoryUsed", "memory_used_bytes", 2**20),
            ("GPUMemoryUtilization", "memory_percent", 1.0),
        ):
            family = families.get(name)
            for _, labels, sample in family.samples if family is not None else ():
                device = dict(labels).get("DeviceId", "?")
                gpus.setdefault(device, {})[field] = sample * scale
        host = {
            "system_metrics": self._host is not None,
            "cpu_percent": value("CPUUtilization"),
            "memory": memory,
            "gpus": [{"id": device, **figures} for device, figures in gpus.items()],
            "frontend": {"pid": os.getpid(), "rss_bytes": rss_bytes(os.getpid()), "cpu_percent": frontend_cpu},
        }
        return host, {pid: rss_bytes(pid) for pid in pids}


def _counter(total: int, before: int | None, window: float | None) -> dict[str, Any]:
    per_second = max(0, total - before) / window if before is not None and window else None
    return {"total": total, "per_second": per_second}


def _by_class(now: Counts | None, before: Counts | None, base: Reading | None, window: float | None) -> dict[str, Any]:
    """A model version's answers by status class: in all, and a second over the window (none
    before the first window; a version new since the base had none then)."""
    counts = now or (0, 0, 0)
    old = (before or (0, 0, 0)) if base is not None else None
    return {f"{cls}xx": _counter(counts[i], old[i] if old is not None else None, window) for i, cls in enumerate((2, 4, 5))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _milliseconds(recent: Figures | None) -> dict[str, float | None] | None:
    if recent is None or recent.p50 is None:
        return None
    return {"p50": _ms(recent.p50), "p90": _ms(recent.p90), "p99": _ms(recent.p99)}


def _batch_label(bounds: tuple[float, ...], i: int) -> str:
    """``1``, ``2``, ``3–4``, ``5–8`` ... ``>256``: the batch sizes bucket ``i`` counts."""
    bound = bounds[i]
    lower = int(bounds[i - 1]) + 1 if i else 1
    if math.isinf(bound):
        return f">{lower - 1}"
    return str(lower) if lower == int(bound) else f"{lower}–{int(bound)}"
