"""The management API (port 8081): register, list, describe, scale, unregister, set-default, token."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..http.auth import ROTATABLE, TokenAuth
from ..errors import BadRequest, MethodNotAllowed
from ..http import NO_CACHE, json_response, status_response
from ..models.version import ModelVersion
from .openapi import for_model, management_openapi
from ..models.registry import ModelRegistry, RegisterRequest
from ..metrics.system import rss_bytes

async def _params(request: Request) -> dict[str, str]:
    """Query-string parameters, or a JSON body's when the client sends one (TorchServe accepts both)."""
    params: dict[str, Any] = dict(request.query_params)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        # The app's LimitRequestBody caps it at max_request_size.
        body = await request.body()
        if body.strip():
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                raise BadRequest(f"Invalid JSON body: {exc}") from None
            if not isinstance(data, dict):
                raise BadRequest("The JSON body must be an object")
            # JSON null means "not given", like a parameter left out of the query string.
            params.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items() if v is not None})
    return params


def _int(params: dict[str, str], key: str) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"Invalid value for {key}: {value!r} (expected an integer)") from None


def _bool(params: dict[str, str], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise BadRequest(f"Invalid value for {key}: {value!r} (expected true or false)")
    return value.lower() == "true"


def describe(model: ModelVersion) -> dict[str, Any]:
    s = model.settings
    workers = []
    for slot in model.slots:
        process = slot.process
        started = process.started_at if process else 0.0
        workers.append(
            {
                "id": slot.id,
                "startTime": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "status": "READY" if slot.status == "READY" else "UNLOADING",
                "memoryUsage": rss_bytes(process.pid) if process and process.pid and slot.status == "READY" else 0,
                "pid": process.pid if process and process.pid else -1,
                "gpu": slot.gpu_id is not None,
                "gpuUsage": "N/A",
            }
        )
    description: dict[str, Any] = {
        "modelName": model.name,
        "modelVersion": model.version,
        "modelUrl": model.url,
        "runtime": model.archive.manifest.runtime,
        "minWorkers": s.min_workers,
        "maxWorkers": s.max_workers,
        "batchSize": s.batch_size,
        "maxBatchDelay": s.max_batch_delay,
        "responseTimeout": s.response_timeout,
        "startupTimeout": s.startup_timeout,
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": 0,
        "parallelType": "",
        "parallelLevel": 0,
        "deviceType": s.device_type,
    }
    if s.device_ids:
        description["deviceIds"] = s.device_ids
    description.update(
        {
            "continuousBatching": False,
            "useJobTicket": False,
            "useVenv": False,
            "stateful": False,
            "sequenceMaxIdleMSec": 0,
            "sequenceTimeoutMSec": 0,
            "maxNumSequence": 0,
            "maxSequenceJobQueueSize": 0,
            "loadedAtStartup": model.loaded_at_startup,
            "workers": workers,
            "jobQueueStatus": {"remainingCapacity": model.queue.capacity - len(model.queue), "pendingRequests": len(model.queue)},
        }
    )
    return description


def create_routes(registry: ModelRegistry, auth: TokenAuth | None) -> list[Route]:
    config = registry.config

    def require_model_api() -> None:
        if not config.enable_model_api:
            raise MethodNotAllowed()

    async def models(request: Request) -> Response:
        if request.method == "POST":
            return await register(request)
        if request.method != "GET":
            raise MethodNotAllowed()
        params = dict(request.query_params)
        limit = _int(params, "limit")
        limit = 100 if limit is None or limit > 100 or limit < 0 else limit
        start = _int_or_zero(params.get("next_page_token"))
        names = registry.names()
        page = names[start : start + limit]
        listing: dict[str, Any] = {}
        if start + limit < len(names):
            listing["nextPageToken"] = str(start + limit)
        listing["models"] = [{"modelName": n, "modelUrl": registry.get(n).url} for n in page]
        return json_response(listing)

    async def register(request: Request) -> Response:
        require_model_api()
        params = await _params(request)
        register_request = RegisterRequest(
            url=params.get("url"),
            model_name=params.get("model_name") or None,
            handler=params.get("handler") or None,
            runtime=params.get("runtime") or None,
            batch_size=_int(params, "batch_size"),
            max_batch_delay=_int(params, "max_batch_delay"),
            initial_workers=_int(params, "initial_workers"),
            synchronous=_bool(params, "synchronous", True),
            response_timeout=_int(params, "response_timeout"),
            startup_timeout=_int(params, "startup_timeout"),
        )
        status, message = await registry.register(register_request)
        return status_response(message, status)

    async def model(request: Request) -> Response:
        name = request.path_params["model_name"]
        version = request.path_params.get("version")
        if request.method == "OPTIONS":
            registry.get(name, version)
            return json_response(for_model(management_openapi(), name, ("/models/{model_name}",)))
        if request.method == "GET":
            if version == "all":
                return json_response([describe(m) for m in registry.versions(name)])
            return json_response([describe(registry.get(name, version))])
        if request.method == "PUT":
            params = dict(request.query_params)
            version = version or params.get("model_version")
            min_worker = _int(params, "min_worker")
            min_worker = 1 if min_worker is None else min_worker
            max_worker = _int(params, "max_worker")
            status, message = await registry.scale(
                name, version, min_worker, min_worker if max_worker is None else max_worker,
                _bool(params, "synchronous", False),
            )  # fmt: skip
            return status_response(message, status)
        if request.method == "DELETE":
            require_model_api()
            return status_response(await registry.unregister(name, version))
        raise MethodNotAllowed()

    async def set_default(request: Request) -> Response:
        return status_response(await registry.set_default(request.path_params["model_name"], request.path_params["version"]))

    async def api_description(request: Request) -> Response:
        return json_response(management_openapi())

    async def rotate_token(request: Request) -> Response:
        # Reached only with the API key (see apps.py).
        assert auth is not None
        kinds = request.query_params.getlist("type")
        if not kinds:
            raise BadRequest("Parameter type is required: management or inference")
        if kinds[0] not in ROTATABLE:
            raise BadRequest(f"Invalid token type: {kinds[0]!r} (expected management or inference)")
        auth.rotate(kinds[0])
        # TorchServe's body: nothing; the new key is in the key file.
        return Response("\n", media_type="application/json", headers={**NO_CACHE, "x-request-id": str(uuid.uuid4())})

    routes = [
        Route("/", api_description, methods=["OPTIONS"]),
        Route("/api-description", api_description, methods=["GET", "OPTIONS"]),
        Route("/models", models, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/models/{model_name}", model, methods=["GET", "PUT", "DELETE", "POST", "OPTIONS"]),
        Route("/models/{model_name}/{version}", model, methods=["GET", "PUT", "DELETE", "POST", "OPTIONS"]),
        Route("/models/{model_name}/{version}/set-default", set_default, methods=["PUT"]),
    ]
    if auth is not None:
        # Without tokens there is nothing to rotate: 404, as in TorchServe.
        routes.append(Route("/token", rotate_token, methods=["GET"]))
    return routes


def _int_or_zero(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0
