"""The inference API (port 8080): /ping, /predictions and /explanations."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .batching import Job, Reply
from .errors import BadRequest, ServerError
from .http import json_response, read_body
from .openapi import inference_openapi
from .registry import ModelRegistry

# Multipart caps: a form with thousands of parts is an attack, not an inference request.
MAX_PARTS = 64

_NO_CACHE = {
    "Cache-Control": "no-cache; no-store, must-revalidate, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}


async def _single(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def request_params(request: Request, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """The handler's input dict for one request, as (name, content type, bytes) triples (§3.1)."""
    content_type = request.headers.get("content-type")
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime == "multipart/form-data":
        parser = MultiPartParser(request.headers, _single(body), max_files=MAX_PARTS, max_fields=MAX_PARTS)
    elif mime == "application/x-www-form-urlencoded":
        parser = FormParser(request.headers, _single(body))  # type: ignore[assignment]
    else:
        return [("body", content_type, body)]
    try:
        form = await parser.parse()
    except Exception as exc:  # python-multipart raises several types for malformed input
        raise BadRequest(f"Invalid multipart/form request: {exc}") from None
    params = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            params.append((name, value.content_type, await value.read()))
        else:
            params.append((name, None, value.encode()))
    return params


def create_routes(registry: ModelRegistry) -> list[Route]:
    config = registry.config

    async def ping(request: Request) -> Response:
        return json_response({"status": "Healthy"})

    async def predict(request: Request, explain: bool = False) -> Response:
        received = time.perf_counter()
        path = request.path_params
        name = path["model_name"]
        version = path.get("version")
        model = registry.get(name, version)
        body = await read_body(request, config.max_request_size)
        request_id = str(uuid.uuid4())
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        headers.append(("explain", "True" if explain else "False"))
        headers.append(("url_path", path.get("rest", "")))
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        job = Job(request_id, headers, await request_params(request, body), future, received)
        model.submit(job, versioned=version is not None)
        reply = await _await_reply(request, future)
        response_headers = {**reply_headers(reply), "x-request-id": request_id}
        return Response(reply.body, reply.status, headers=response_headers, media_type=reply.content_type)

    async def explain(request: Request) -> Response:
        return await predict(request, explain=True)

    async def api_description(request: Request) -> Response:
        return json_response(inference_openapi())

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    return [
        Route("/", api_description, methods=["OPTIONS"]),
        Route("/api-description", api_description, methods=methods),
        Route("/ping", ping, methods=methods),
        Route("/predictions/{model_name}", predict, methods=methods),
        Route("/predictions/{model_name}/{version}", predict, methods=methods),
        Route("/predictions/{model_name}/{version}/{rest:path}", predict, methods=methods),
        Route("/explanations/{model_name}", explain, methods=methods),
        Route("/explanations/{model_name}/{version}", explain, methods=methods),
    ]


def reply_headers(reply: Reply) -> dict[str, str]:
    return {**_NO_CACHE, **dict(reply.headers)}


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
