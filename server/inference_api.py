"""The inference API (port 8080): /ping, /predictions and /explanations."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .batching import Job, Reply
from .errors import ServerError
from .forms import request_params
from .http import NO_CACHE, error_response, json_response, read_body
from .openapi import inference_openapi
from .registry import ModelRegistry

def create_routes(registry: ModelRegistry) -> list[Route]:
    config = registry.config

    async def ping(request: Request) -> Response:
        return json_response({"status": "Healthy"})

    async def predict(request: Request, explain: bool = False) -> Response:
        received = time.perf_counter()
        request_id = str(uuid.uuid4())
        path = request.path_params
        name = path["model_name"]
        version = path.get("version")
        try:
            model = registry.get(name, version)
            if request.method == "OPTIONS":
                return json_response(model_openapi(name))
            body = await read_body(request, config.max_request_size)
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
            headers.append(("explain", "True" if explain else "False"))
            headers.append(("url_path", path.get("rest", "").strip("/")))
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            job = Job(request_id, headers, request_params(request.headers.get("content-type"), body), future, received)
            model.submit(job, versioned=version is not None)
            reply = await _await_reply(request, future)
        except ServerError as error:
            response = error_response(error)
            # Failures still name the request, so a client can match them with the server's logs.
            response.headers["x-request-id"] = request_id
            return response
        return Response(reply.body, reply.status, headers=reply_headers(reply, request_id))

    async def explain(request: Request) -> Response:
        return await predict(request, explain=True)

    async def api_description(request: Request) -> Response:
        return json_response(inference_openapi())

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

    def route(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> list[Route]:
        # TorchServe ignores a trailing slash; Starlette would answer it with a redirect.
        return [Route(path, endpoint, methods=methods), Route(f"{path}/", endpoint, methods=methods)]

    return [
        Route("/", api_description, methods=["OPTIONS"]),
        *route("/api-description", api_description),
        *route("/ping", ping),
        *route("/predictions/{model_name}", predict),
        Route("/predictions/{model_name}/{version}", predict, methods=methods),
        # Also matches the versioned path with a trailing slash (rest is then empty).
        Route("/predictions/{model_name}/{version}/{rest:path}", predict, methods=methods),
        *route("/explanations/{model_name}", explain),
        *route("/explanations/{model_name}/{version}", explain),
    ]


def model_openapi(name: str) -> dict[str, object]:
    """``OPTIONS /predictions/{m}``: the inference API's model routes, for this model (as TorchServe)."""
    description = inference_openapi()
    description["paths"] = {
        path.replace("{model_name}", name): operations
        for path, operations in description["paths"].items()
        if path.startswith(("/predictions/", "/explanations/"))
    }
    return description


def reply_headers(reply: Reply, request_id: str) -> dict[str, str]:
    # Lowercased so that a handler's own Cache-Control or similar replaces ours instead of doubling it.
    headers = {k.lower(): v for k, v in (*NO_CACHE.items(), *reply.headers)}
    headers["x-request-id"] = request_id
    if reply.content_type:
        # As a header rather than media_type: Starlette would append a charset to text types,
        # and TorchServe sends the handler's value as is.
        headers["content-type"] = reply.content_type
    return headers


async def _await_reply(request: Request, future: asyncio.Future[Reply]) -> Reply:
    """Wait for the reply; if the client disconnects first, cancel the job so no worker runs it."""
    # The body is fully read, so the next receive() returns only when the client goes away.
    watcher = asyncio.ensure_future(request.receive())
    watcher.add_done_callback(lambda _: future.cancel())
    try:
        return await future
    except asyncio.CancelledError:
        if not watcher.done():
            raise  # the server itself is cancelling this request
        raise ClientGone("Client disconnected before the response was ready") from None
    finally:
        watcher.cancel()


class ClientGone(ServerError):
    # Nobody reads this response; the status only shows in the access log.
    status_code = 499
