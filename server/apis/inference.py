"""TorchServe's inference API (port 8080): predictions, explanations, ping and API descriptions.

A prediction is queued as a job on its model version and answered by the worker's reply as it
arrives: the route returns the job's future, and the connection writes the reply when it is set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..http.auth import INFERENCE
from ..http.forms import request_params
from ..http.request import Request
from ..http.responses import Response, json_response
from ..http.routing import Route, methods
from ..metrics.recording import Metrics
from ..models.batching import Job, Reply, stream_format
from ..models.registry import ModelRegistry
from .dataplane import rolled_out
from .openapi import for_model, inference_openapi

# TorchServe does not check the method of a prediction: curl -T (PUT) and GET work too.
_PREDICT_METHODS = methods("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
_ANY = methods("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def routes(registry: ModelRegistry, metrics: Metrics) -> list[Route]:
    def ping(request: Request) -> Response:
        return json_response({"status": "Healthy"})

    def api_description(request: Request) -> Response:
        return json_response(inference_openapi())

    def model_description(request: Request) -> Response:
        name = request.path_params["model_name"]
        registry.get(name)
        return json_response(for_model(inference_openapi(), name, ("/predictions/", "/explanations/")))

    return [
        # Open without a token: the API descriptions (as in TorchServe) and /ping, so that health
        # checks and load balancers need no secret.
        Route("/", api_description, methods("OPTIONS"), None, reads_body=False),
        Route("/api-description", api_description, _ANY, None, reads_body=False),
        Route("/ping", ping, _ANY, None, reads_body=False),
        # The prediction first: the router tries a path's routes in order, and this is the hot one.
        Route("/predictions/{model_name}/{rest:path}", _predict(registry, metrics, False), _PREDICT_METHODS, INFERENCE),
        Route("/predictions/{model_name}/{rest:path}", model_description, methods("OPTIONS"), INFERENCE, False),
        Route("/explanations/{model_name}/{rest:path}", _predict(registry, metrics, True), _PREDICT_METHODS, INFERENCE),
        Route("/explanations/{model_name}/{rest:path}", model_description, methods("OPTIONS"), INFERENCE, False),
    ]


def _predict(registry: ModelRegistry, metrics: Metrics, explain: bool) -> Callable[[Request], asyncio.Future[Reply]]:
    explain_header = ("explain", "True" if explain else "False")

    def predict(request: Request) -> asyncio.Future[Reply]:
        """Queue the request on its model version (``/predictions/m/v``), the one a label names
        (``/predictions/m/labels/l``), or the one the model's traffic split or default picks;
        segments after the version or label become the ``url_path`` header handlers can read."""
        name = request.path_params["model_name"]
        version, _, url_path = request.path_params["rest"].partition("/")
        label = None
        if version == "labels" and url_path:
            label, _, url_path = url_path.partition("/")
            version = ""
        model, route = registry.route(name, version or None, label, request.header(b"x-route-key"))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        headers.append(explain_header)
        headers.append(("url_path", url_path.strip("/")))
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        job = Job(request.request_id, headers, request_params(request.content_type(), request.body), future, request.received)
        # Used only if the handler streams its answer.
        job.stream_format = stream_format(request.header(b"accept"))

        def record(status: int) -> None:
            queued = job.dispatched - job.received if job.dispatched else 0.0
            metrics.inference(name, version or None, model.version, time.perf_counter() - job.received, queued, status)
            if job.stream is not None:
                metrics.stream(name, model.version, job.stream.first_at - job.received, job.stream.pieces)

        # TorchServe counts every request that reached its queue, even one refused there.
        request.on_answered = record
        model.submit(job, versioned=bool(version))
        rolled_out(registry, metrics, model, route, job)
        return future

    return predict
