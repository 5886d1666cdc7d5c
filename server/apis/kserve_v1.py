"""KServe's v1 protocol on the inference port, whatever ``service_envelope`` says.

    GET  /v1/models                      {"models": [names]}
    GET  /v1/models/{m}                  {"name": m, "ready": bool, "model_version_status": [...]}
                                         (503 when not ready)
    POST /v1/models/{m}:predict          {"instances": [...]} -> {"predictions": [...]}
    POST /v1/models/{m}:explain          {"instances": [...]} -> {"explanations": [...]}
    GET, POST /v1/models/{m}/versions/{v}[:predict|:explain]    TF Serving's REST forms: one version,
    GET, POST /v1/models/{m}/labels/{l}[:predict|:explain]      or the one a label names

``{m}:predict`` is one path segment: the routes take ``/v1/models/{target}`` and split the verb
off (model names cannot hold a colon). Predictions that name no version go where the model's
traffic split or default version sends them, with the body handed over as on ``/predictions`` and
the worker applying TorchServe's ``kserve`` envelope. ``model_version_status`` is TF Serving's
(``AVAILABLE``, ``LOADING``, ``UNLOADING``, ``END``). Errors are ``{"error": "..."}``, as KServe's
model server answers.
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
        name, version, label, verb = _address(request)
        if verb is not None:
            raise MethodNotAllowed()
        if version is None and label is None:
            is_ready = registry.get(name).ready
            states = registry.version_states(name)
        else:
            model, _ = registry.route(name, version, label, None)
            is_ready = model.ready
            states = [(model.version, "AVAILABLE" if is_ready else "LOADING")]
        status = [{"version": v, "state": state, "status": {"error_code": "OK", "error_message": ""}} for v, state in states]
        return json_answer({"name": name, "ready": is_ready, "model_version_status": status}, 200 if is_ready else 503)

    def predict(request: Request) -> asyncio.Future[Reply]:
        name, version, label, verb = _address(request)
        if verb is None:
            raise MethodNotAllowed()
        model, route = registry.route(name, version, label, request.header(b"x-route-key"))
        params = request_params(request.content_type(), request.body)
        return queue_job(
            metrics, request, model, version, params, envelope=ENVELOPE, explain=VERBS[verb], registry=registry, route=route
        )

    table = [
        Route("/v1/models/{target}", predict, methods("POST"), INFERENCE, errors=kserve_error),
        Route("/v1/models/{target}", model_ready, methods("GET"), INFERENCE, reads_body=False, errors=kserve_error),
        Route("/v1/models/{model_name}/{kind}/{target}", predict, methods("POST"), INFERENCE, errors=kserve_error),
        Route("/v1/models/{model_name}/{kind}/{target}", model_ready, methods("GET"), INFERENCE, reads_body=False, errors=kserve_error),
        Route("/v1/models", list_models, methods("GET"), INFERENCE, reads_body=False, errors=kserve_error),
    ]
    table.append(fallback("v1", tuple(table), INFERENCE))
    return table


def _split(target: str) -> tuple[str, str | None]:
    """``m:predict`` -> ("m", "predict"), ``m`` -> ("m", None); 404 for another verb."""
    name, colon, verb = target.partition(":")
    if not colon:
        return name, None
    if verb not in VERBS:
        raise NotFound()
    return name, verb


def _address(request: Request) -> tuple[str, str | None, str | None, str | None]:
    """(model, version, label, verb) of ``/v1/models/m[:verb]``, ``/v1/models/m/versions/v[:verb]``
    or ``/v1/models/m/labels/l[:verb]``."""
    params = request.path_params
    target, verb = _split(params["target"])
    kind = params.get("kind")
    if kind is None:
        return target, None, None, verb
    if kind == "versions":
        return params["model_name"], target, None, verb
    if kind == "labels":
        return params["model_name"], None, target, verb
    raise NotFound()
