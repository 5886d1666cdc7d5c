"""The metrics API (port 8082): Prometheus text on ``/metrics``, open without a token."""

from __future__ import annotations

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..http.request import Request
from ..http.responses import Response, json_response
from ..http.routing import Route, methods
from ..metrics.recording import Metrics
from .openapi import metrics_openapi

# What TorchServe's metrics_mode=legacy leaves on /metrics.
LEGACY = frozenset({"ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds"})


def routes(metrics: Metrics, mode: str) -> list[Route]:
    """``mode`` is ``metrics_mode``: ``prometheus`` (everything), ``legacy`` (TorchServe's three
    counters) or ``log`` (an empty page, as TorchServe serves it in that mode)."""

    def scrape(request: Request) -> Response:
        names = request.query_list("name[]")
        if mode == "legacy":
            names = [n for n in names if n in LEGACY] if names else sorted(LEGACY)
        if mode == "log" or (mode == "legacy" and not names):
            return Response(200, b"", CONTENT_TYPE_LATEST)
        body, content_type = metrics.render(names)
        return Response(200, body, content_type)

    def api_description(request: Request) -> Response:
        return json_response(metrics_openapi())

    return [
        Route("/", api_description, methods("OPTIONS"), None, reads_body=False),
        # TorchServe answers any path whose first segment is "metrics".
        Route("/metrics/{rest:path}", scrape, methods("GET"), None, reads_body=False),
    ]

