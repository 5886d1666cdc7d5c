"""The three Starlette apps, built from explicit arguments."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from . import inference_api, management_api
from .access_log import AccessLog
from .http import EXCEPTION_HANDLERS, ObserveResponses, json_response
from .metrics import Metrics
from .openapi import metrics_openapi
from .registry import ModelRegistry


def create_inference_app(
    registry: ModelRegistry, metrics: Metrics, access_log: AccessLog
) -> inference_api.InferenceApp:
    return inference_api.InferenceApp(registry, metrics, access_log)


def create_management_app(registry: ModelRegistry, metrics: Metrics, access_log: AccessLog) -> ASGIApp:
    app = Starlette(routes=management_api.create_routes(registry), exception_handlers=EXCEPTION_HANDLERS)
    # TorchServe ignores a trailing slash; Starlette would answer it with a redirect.
    app.router.redirect_slashes = False
    return ObserveResponses(app, metrics, access_log)


def create_metrics_app(metrics: Metrics, access_log: AccessLog) -> ASGIApp:
    async def scrape(request: Request) -> Response:
        names = request.query_params.getlist("name[]")
        body, content_type = metrics.render(names)
        return Response(body, media_type=content_type)

    async def api_description(request: Request) -> Response:
        return json_response(metrics_openapi())

    routes = [
        Route("/", api_description, methods=["OPTIONS"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]
    return ObserveResponses(Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS), metrics, access_log)
