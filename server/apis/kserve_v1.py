"""KServe's v1 protocol on the inference port, whatever ``service_envelope`` says.

    GET  /v1/models                      {"models": [names]}
    GET  /v1/models/{m}                  {"name": m, "ready": bool} (503 when not ready)
    POST /v1/models/{m}:predict          {"instances": [...]} -> {"predictions": [...]}
    POST /v1/models/{m}:explain          {"instances": [...]} -> {"explanations": [...]}

``{m}:predict`` is one path segment: the routes take ``/v1/models/{target}`` and split the verb
off (model names cannot hold a colon). Predictions use the model's default version, with the body
handed over as on ``/predictions`` and the worker applying TorchServe's ``kserve`` envelope.
Errors are ``{"error": "..."}``, as KServe's model server answers.
"""

from __future__ import annotations

import asyncio

from ..errors import MethodNotAllowed, NotFound
from ..http.auth import INFERENCE
from ..http.forms import request_params
from ..http.request import Request
from ..http.responses import Response
from ..http.routing import Route, methods
from ..metrics.recording import Metrics
from ..models.batching import Reply
from ..models.registry import ModelRegistry
from .dataplane import fallback, json_answer, kserve_error, queue_job

ENVELOPE = "kserve"
VERBS = {"predict": False, "explain": True}  # verb -> whether it explains


def routes(registry: ModelRegistry, metrics: Metrics) -> list[Route]:
    def list_models(request: Request) -> Response:
        return json_answer({"models": registry.names()})

    def model_ready(request: Request) -> Response:
        name, verb = _split(request)
        if verb is not None:
            raise MethodNotAllowed()
        is_ready = registry.get(name).ready
        return json_answer({"name": name, "ready": is_ready}, 200 if is_ready else 503)

    def predict(request: Request) -> asyncio.Future[Reply]:
        name, verb = _split(request)
        if verb is None:
            raise MethodNotAllowed()
        model = registry.get(name)
        params = request_params(request.content_type(), request.body)
        return queue_job(metrics, request, model, None, params, envelope=ENVELOPE, explain=VERBS[verb])

    table = [
        Route("/v1/models/{target}", predict, methods("POST"), INFERENCE, errors=kserve_error),
        Route("/v1/models/{target}", model_ready, methods("GET"), INFERENCE, reads_body=False, errors=kserve_error),
        Route("/v1/models", list_models, methods("GET"), INFERENCE, reads_body=False, errors=kserve_error),
    ]
    table.append(fallback("v1", tuple(table), INFERENCE))
    return table


def _split(request: Request) -> tuple[str, str | None]:
    """``m:predict`` -> ("m", "predict"), ``m`` -> ("m", None); 404 for another verb."""
    name, colon, verb = request.path_params["target"].partition(":")
    if not colon:
        return name, None
    if verb not in VERBS:
        raise NotFound()
    return name, verb
