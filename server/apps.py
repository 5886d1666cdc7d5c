"""The three Starlette apps, built from explicit arguments."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from . import inference_api, management_api
from .http import EXCEPTION_HANDLERS, LimitRequestBody, ObserveResponses, json_response
from .metrics import Metrics
from .openapi import metrics_openapi
from .registry import ModelRegistry


def create_inference_app(registry: ModelRegistry, metrics: Metrics) -> inference_api.InferenceApp:
    return inference_api.InferenceApp(registry, metrics)


def create_management_app(registry: ModelRegistry, metrics: Metrics) -> ASGIApp:
    app = Starlette(routes=management_api.create_routes(registry), exception_handlers=EXCEPTION_HANDLERS)
    # TorchServe ignores a trailing slash; Starlette would answer it with a redirect.
    app.router.redirect_slashes = False
    return ObserveResponses(LimitRequestBody(app, registry.config.max_request_size), metrics)


def create_metrics_app(metrics: Metrics, max_request_size: int) -> ASGIApp:
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
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    return ObserveResponses(LimitRequestBody(app, max_request_size), metrics)
