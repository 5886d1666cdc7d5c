"""The inference API's ASGI side (port 8080): /ping, API descriptions and OPTIONS.

/predictions and /explanations are served by ``predictions``, straight from the connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .http.access_log import AccessLog
from .http import EXCEPTION_HANDLERS, LimitRequestBody, ObserveResponses, json_response
from .metrics.recording import Metrics
from .apis.openapi import for_model, inference_openapi
from .models.registry import ModelRegistry


def create_app(registry: ModelRegistry, metrics: Metrics, access_log: AccessLog) -> ASGIApp:
    """Port 8080's ASGI app: ping, API descriptions, OPTIONS and unknown paths.

    Predictions themselves never reach it: the connection answers them (``predictions``).
    """
    app = Starlette(routes=_routes(registry), exception_handlers=EXCEPTION_HANDLERS)
    return ObserveResponses(LimitRequestBody(app, registry.config.max_request_size), metrics, access_log)


def _routes(registry: ModelRegistry) -> list[Route]:
    async def ping(request: Request) -> Response:
        return json_response({"status": "Healthy"})

    async def api_description(request: Request) -> Response:
        return json_response(inference_openapi())

    async def model_description(request: Request) -> Response:
        # Reached only by OPTIONS: every other method on these paths is a prediction.
        name = request.path_params["model_name"]
        registry.get(name)
        return json_response(for_model(inference_openapi(), name, ("/predictions/", "/explanations/")))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

    def route(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> list[Route]:
        # TorchServe ignores a trailing slash; Starlette would answer it with a redirect.
        return [Route(path, endpoint, methods=methods), Route(f"{path}/", endpoint, methods=methods)]

    return [
        Route("/", api_description, methods=["OPTIONS"]),
        *route("/api-description", api_description),
        *route("/ping", ping),
        Route("/predictions/{model_name}{rest:path}", model_description, methods=["OPTIONS"]),
        Route("/explanations/{model_name}{rest:path}", model_description, methods=["OPTIONS"]),
    ]
