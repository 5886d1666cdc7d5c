"""The Open Inference Protocol's REST API (KServe v2) on the inference port, always on.

    GET  /v2                                            server metadata
    GET  /v2/health/live, /v2/health/ready              probes (open without a token, like /ping)
    GET  /v2/models/{m}[/versions/{v}]                  model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready            model readiness
    POST /v2/models/{m}[/versions/{v}]/infer|explain    inference, explanations

Inference is a job queued on the model version with the ``oip`` envelope: the worker reads the
request (JSON, or JSON followed by binary tensors: Triton's binary tensor data extension) and
writes the response, which passes through unchanged. The frontend only refuses what it can see
without parsing the body. Errors are ``{"error": "..."}`` with the status.

A model's tensors come from the ``oip`` key of its model YAML (``oip: {inputs: [{name,
datatype, shape}], outputs: [...]}``, -1 for a variable dimension, and optionally ``platform``);
without it the metadata lists none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..errors import BadRequest, ServerError
from ..http.auth import INFERENCE
from ..http.request import Request
from ..http.responses import Response
from ..http.routing import Route, methods
from ..metrics.recording import Metrics
from ..models.batching import Reply
from ..models.registry import ModelRegistry
from ..models.version import ModelVersion
from ..oip_signature import PLATFORM, read_signature
from ..version import marserve_version
from .dataplane import fallback, json_answer, kserve_error, queue_job, server_ready

ENVELOPE = "oip"
SERVER_NAME = "marserve"
#: Triton's name for the binary tensor data extension, as its server metadata lists it.
EXTENSIONS = ("binary_tensor_data",)
#: What a model's metadata reports as its platform unless its ``oip`` signature names one: OIP's
#: ``<project>_<format>`` for a TorchServe archive, whose handler may run eager, TorchScript or
#: exported models alike.
_GET = methods("GET")
_POST = methods("POST")


def routes(registry: ModelRegistry, metrics: Metrics) -> list[Route]:
    extensions = list(EXTENSIONS)

    def server_metadata(request: Request) -> Response:
        return json_answer({"name": SERVER_NAME, "version": marserve_version(), "extensions": extensions})

    def live(request: Request) -> Response:
        return json_answer({"live": True})

    def ready(request: Request) -> Response:
        is_ready = server_ready(registry)
        return json_answer({"ready": is_ready}, 200 if is_ready else 503)

    def model_metadata(request: Request) -> Response:
        name, version = _target(request)
        model = registry.get(name, version)
        versions = [m.version for m in registry.versions(name)]
        inputs, outputs, platform = signature(model)
        return json_answer({"name": name, "versions": versions, "platform": platform, "inputs": inputs, "outputs": outputs})

    def model_ready(request: Request) -> Response:
        name, version = _target(request)
        is_ready = registry.get(name, version).ready
        return json_answer({"name": name, "ready": is_ready}, 200 if is_ready else 503)

    def inference(explain: bool) -> Callable[[Request], asyncio.Future[Reply]]:
        def infer(request: Request) -> asyncio.Future[Reply]:
            name, version = _target(request)
            label = request.path_params.get("label")
            model, route = registry.route(name, version, label, request.header(b"x-route-key"))
            check_body(request)
            params = [("body", request.content_type(), request.body)]
            return queue_job(
                metrics, request, model, version, params, envelope=ENVELOPE, explain=explain, registry=registry, route=route
            )

        return infer

    table: list[Route] = []
    table += [
        # A label wherever a version can be named (server/models/rollout.py).
        Route("/v2/models/{model_name}/labels/{label}/infer", inference(False), _POST, INFERENCE, errors=kserve_error),
        Route("/v2/models/{model_name}/labels/{label}/explain", inference(True), _POST, INFERENCE, errors=kserve_error),
    ]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        table += [
            Route(f"{prefix}/infer", inference(False), _POST, INFERENCE, errors=kserve_error),
            Route(f"{prefix}/explain", inference(True), _POST, INFERENCE, errors=kserve_error),
            Route(f"{prefix}/ready", model_ready, _GET, INFERENCE, reads_body=False, errors=kserve_error),
            Route(prefix, model_metadata, _GET, INFERENCE, reads_body=False, errors=kserve_error),
        ]
    table += [
        # Probes are open, like /ping: Kubernetes sends no token.
        Route("/v2/health/live", live, _GET, None, reads_body=False, errors=kserve_error),
        Route("/v2/health/ready", ready, _GET, None, reads_body=False, errors=kserve_error),
        Route("/v2", server_metadata, _GET, INFERENCE, reads_body=False, errors=kserve_error),
    ]
    table.append(fallback("v2", tuple(table), INFERENCE))
    return table


def _target(request: Request) -> tuple[str, str | None]:
    params = request.path_params
    return params["model_name"], params.get("model_version")


def check_body(request: Request) -> None:
    """Refuse what the frontend sees without parsing the body: a compressed body (415), no body,
    and an ``Inference-Header-Content-Length`` that is not a length within the body (400)."""
    encoding = request.header(b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        coding = encoding.decode("latin-1")
        raise ServerError(f"Content-Encoding {coding} is not supported: send the inference request uncompressed", 415)
    size = len(request.body)
    if not size:
        raise BadRequest("The inference request has no body: an inference request JSON object is required")
    value = request.header(b"inference-header-content-length")
    if value is None:
        return
    text = value.strip()
    if not text.isdigit():
        shown = value.decode("latin-1")
        raise BadRequest(f"Inference-Header-Content-Length must be a number of bytes, not {shown!r}")
    length = int(text)
    if length == 0 or length > size:
        raise BadRequest(f"Inference-Header-Content-Length {length} must be between 1 and the body's length ({size} bytes)")


Tensor = dict[str, Any]


def signature(model: ModelVersion) -> tuple[list[Tensor], list[Tensor], str]:
    """The model's tensors (inputs, outputs) and platform from its model YAML's ``oip`` key, as the
    worker reads it (``oip_signature``); none without one. A signature that is not what the key
    documents is a 500 naming what is wrong."""
    try:
        read = read_signature(model.model_yaml_config)
    except ValueError as exc:
        raise ServerError(f"model {model.name} version {model.version}: {exc}") from None
    if read is None:
        return [], [], PLATFORM
    tensors = [[{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in side] for side in (read.inputs, read.outputs)]
    return tensors[0], tensors[1], read.platform
