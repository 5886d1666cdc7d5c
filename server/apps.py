"""The three Starlette apps, built from explicit arguments."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import inference_api
from .apis import management as management_api
from .http.access_log import AccessLog
from .http.auth import API, INFERENCE, MANAGEMENT, RequireToken, TokenAuth
from .http import EXCEPTION_HANDLERS, LimitRequestBody, ObserveResponses, json_response
from .metrics.recording import Metrics
from .apis.openapi import metrics_openapi
from .models.registry import ModelRegistry


# Open without a token: the API descriptions (as in TorchServe) and, on the inference port, /ping,
# so that health checks and load balancers need no secret.
_OPEN_INFERENCE_PATHS = frozenset({"/", "/api-description", "/api-description/", "/ping", "/ping/"})
_OPEN_MANAGEMENT_PATHS = frozenset({"/", "/api-description"})


def _inference_key(scope: Scope) -> str | None:
    return None if scope["path"] in _OPEN_INFERENCE_PATHS else INFERENCE


def _management_key(scope: Scope) -> str | None:
    path = scope["path"]
    if path == "/token":
        return API
    return None if path in _OPEN_MANAGEMENT_PATHS else MANAGEMENT


def create_inference_app(
    registry: ModelRegistry, metrics: Metrics, access_log: AccessLog, auth: TokenAuth | None
) -> ASGIApp:
    app = inference_api.create_app(registry, metrics, access_log)
    return app if auth is None else RequireToken(app, auth, _inference_key, metrics, access_log)


def create_management_app(
    registry: ModelRegistry, metrics: Metrics, access_log: AccessLog, auth: TokenAuth | None
) -> ASGIApp:
    app = Starlette(routes=management_api.create_routes(registry, auth), exception_handlers=EXCEPTION_HANDLERS)
    # TorchServe ignores a trailing slash; Starlette would answer it with a redirect.
    app.router.redirect_slashes = False
    observed = ObserveResponses(LimitRequestBody(app, registry.config.max_request_size), metrics, access_log)
    return observed if auth is None else RequireToken(observed, auth, _management_key, metrics, access_log)


def create_metrics_app(metrics: Metrics, access_log: AccessLog, max_request_size: int) -> ASGIApp:
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
    return ObserveResponses(LimitRequestBody(app, max_request_size), metrics, access_log)


def serve_both(inference: ASGIApp, management: ASGIApp) -> ASGIApp:
    """Both APIs on one listener, as TorchServe serves them when their addresses are the same:
    the management API's paths go to it, everything else to the inference API."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        managed = path == "/models" or path.startswith("/models/") or path == "/token"
        await (management if managed else inference)(scope, receive, send)

    return app
