"""The inference API (port 8080): /ping, /predictions and /explanations."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .batching import Job, Reply
from .errors import BadRequest, ServerError
from .http import error_response, json_response, read_body
from .openapi import inference_openapi
from .registry import ModelRegistry

# Form caps: a form with thousands of parts is an attack, not an inference request.
MAX_PARTS = 64
MAX_FIELDS = 1000

_NO_CACHE = {
    "Cache-Control": "no-cache; no-store, must-revalidate, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}

Param = tuple[str, str | None, bytes]


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def request_params(content_type: str | None, body: bytes) -> list[Param]:
    """The handler's input dict for one request, as (name, content type, bytes) triples (§3.1).

    Values stay the exact bytes the client sent: form values are never decoded to text and
    re-encoded here (the worker decodes by content type), so binary fields survive.
    """
    mime = _mime(content_type)
    if mime == "multipart/form-data":
        return parse_multipart(content_type or "", body)
    if mime == "application/x-www-form-urlencoded":
        return parse_urlencoded(body)
    # Like TorchServe (HttpUtil.getMimeType), the parameter carries the mime type alone.
    return [("body", mime or None, body)]


def parse_urlencoded(body: bytes) -> list[Param]:
    fields = [field for field in body.split(b"&") if field]
    if len(fields) > MAX_FIELDS:
        raise BadRequest(f"Invalid form request: more than {MAX_FIELDS} fields")
    params: list[Param] = []
    for field in fields:
        name, _, value = field.partition(b"=")
        name, value = unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))
        params.append((_text(name), None, value))
    return params


def parse_multipart(content_type: str, body: bytes) -> list[Param]:
    """Every part as (name, its own content type or None, its bytes), with or without a filename.

    Starlette's form parser is not used: it decodes parts without a filename to text (mangling
    binary), drops their content type, and caps them at 1 MiB.
    """
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadRequest("Invalid multipart/form request: no boundary")
    params: list[Param] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    chunks: list[bytes] = []
    ended = False

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field).strip().lower()] = bytes(value).strip()
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if len(params) >= MAX_PARTS:
            raise BadRequest(f"Invalid multipart/form request: more than {MAX_PARTS} parts")
        name = parse_options_header(headers.get(b"content-disposition", b""))[1].get(b"name")
        if name is None:
            raise BadRequest("Invalid multipart/form request: a part has no name")
        part_type = _mime(_text(headers.get(b"content-type", b""))) or None
        params.append((_text(name), part_type, b"".join(chunks)))

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise BadRequest(f"Invalid multipart/form request: {exc}") from None
    if not ended:
        raise BadRequest("Invalid multipart/form request: the body ends before the closing boundary")
    return params


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
            response.headers["connection"] = "close"  # TorchServe closes the connection on any status >= 400
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
    headers = {k.lower(): v for k, v in (*_NO_CACHE.items(), *reply.headers)}
    headers["x-request-id"] = request_id
    if reply.status >= 400:
        headers["connection"] = "close"  # as TorchServe, whoever chose the status
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
