"""TorchServe's management API (port 8081): register, list, describe, scale, unregister,
set-default, and token rotation; and marserve's rollouts (server/models/rollout.py): labels, the
traffic split and the shadow version."""

from __future__ import annotations

import json
import re
from datetime import datetime, UTC
from typing import Any

from ..config import ServerConfig
from ..errors import BadRequest, MethodNotAllowed
from ..http.auth import API, MANAGEMENT, ROTATABLE, TokenAuth
from ..http.request import Request
from ..http.responses import Response, json_response, status_response
from ..http.routing import Route, methods
from ..metrics.system import rss_bytes
from ..models.registry import ModelRegistry, RegisterRequest
from ..models.rollout import parse_shadow, parse_weights
from ..models.status import VersionStatus, WorkerState
from .openapi import for_model, management_openapi


def routes(registry: ModelRegistry, auth: TokenAuth | None, config: ServerConfig) -> list[Route]:
    def require_model_api() -> None:
        if not config.enable_model_api:
            raise MethodNotAllowed()

    def api_description(request: Request) -> Response:
        return json_response(management_openapi())

    def list_models(request: Request) -> Response:
        params = request.query
        limit = _int(params, "limit")
        limit = 100 if limit is None or limit > 100 or limit < 0 else limit
        return json_response(list_page(registry, _int_or_zero(params.get("next_page_token")), limit))

    async def register(request: Request) -> Response:
        require_model_api()
        params = _params(request)
        status, message = await registry.register(
            RegisterRequest(
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
                max_batches_in_flight=_int(params, "max_batches_in_flight"),
            )
        )
        return status_response(message, status)

    def describe_model(request: Request) -> Response:
        # The default version, one version, or "all" of them.
        return json_response(describe_versions(registry, request.path_params["model_name"], request.path_params.get("version")))

    def list_labels(request: Request) -> Response:
        return json_response(dict(sorted(registry.rollout(request.path_params["model_name"]).labels.items())))

    async def put_label(request: Request) -> Response:
        version = request.query.get("version")
        if not version:
            raise BadRequest("Parameter version is required: the version the label names")
        params = request.path_params
        return status_response(await registry.set_label(params["model_name"], params["label"], version))

    async def delete_label(request: Request) -> Response:
        params = request.path_params
        return status_response(await registry.delete_label(params["model_name"], params["label"]))

    def get_traffic(request: Request) -> Response:
        return json_response(registry.rollout(request.path_params["model_name"]).split)

    async def put_traffic(request: Request) -> Response:
        weights = {} if request.method == "DELETE" else parse_weights(_json_body(request))
        return status_response(await registry.set_traffic(request.path_params["model_name"], weights))

    def get_shadow(request: Request) -> Response:
        name = request.path_params["model_name"]
        shadow = registry.rollout(name).shadow
        if shadow is None:
            return json_response({})
        stats = registry.shadow_stats(name).as_json()
        return json_response({"version": shadow.version, "percent": shadow.percent, "stats": stats})

    async def put_shadow(request: Request) -> Response:
        shadow = None if request.method == "DELETE" else parse_shadow(_json_body(request))
        return status_response(await registry.set_shadow(request.path_params["model_name"], shadow))

    async def scale(request: Request) -> Response:
        params = request.query
        name = request.path_params["model_name"]
        version = request.path_params.get("version") or params.get("model_version")
        min_worker = _int(params, "min_worker")
        min_worker = 1 if min_worker is None else min_worker
        max_worker = _int(params, "max_worker")
        status, message = await registry.scale(
            name, version, min_worker, min_worker if max_worker is None else max_worker,
            _bool(params, "synchronous", False),
        )  # fmt: skip
        return status_response(message, status)

    async def unregister(request: Request) -> Response:
        require_model_api()
        return status_response(await registry.unregister(request.path_params["model_name"], request.path_params.get("version")))

    def model_description(request: Request) -> Response:
        name = request.path_params["model_name"]
        registry.get(name, request.path_params.get("version"))
        return json_response(for_model(management_openapi(), name, ("/models/{model_name}",)))

    async def set_default(request: Request) -> Response:
        message = await registry.set_default(request.path_params["model_name"], request.path_params["version"])
        return status_response(message)

    def rotate_token(request: Request) -> Response:
        assert auth is not None  # the route exists only with tokens
        kinds = request.query_list("type")
        if not kinds:
            raise BadRequest("Parameter type is required: management or inference")
        if kinds[0] not in ROTATABLE:
            raise BadRequest(f"Invalid token type: {kinds[0]!r} (expected management or inference)")
        auth.rotate(kinds[0])
        # TorchServe's body: nothing; the new key is in the key file.
        return Response(200, b"\n", "application/json")

    def per_model(pattern: str) -> list[Route]:
        return [
            Route(pattern, describe_model, methods("GET"), MANAGEMENT, reads_body=False),
            Route(pattern, scale, methods("PUT"), MANAGEMENT, reads_body=False),
            Route(pattern, unregister, methods("DELETE"), MANAGEMENT, reads_body=False),
            Route(pattern, model_description, methods("OPTIONS"), MANAGEMENT, reads_body=False),
        ]

    table = [
        # Open without a token, as in TorchServe: the API description.
        Route("/", api_description, methods("OPTIONS"), None, reads_body=False),
        Route("/api-description", api_description, methods("GET", "OPTIONS"), None, reads_body=False),
        Route("/models", list_models, methods("GET"), MANAGEMENT, reads_body=False),
        Route("/models", register, methods("POST"), MANAGEMENT),
        # Before the per-version routes: a version cannot be named labels, traffic or shadow here.
        Route("/models/{model_name}/labels", list_labels, methods("GET"), MANAGEMENT, reads_body=False),
        Route("/models/{model_name}/labels/{label}", put_label, methods("PUT"), MANAGEMENT, reads_body=False),
        Route("/models/{model_name}/labels/{label}", delete_label, methods("DELETE"), MANAGEMENT, reads_body=False),
        Route("/models/{model_name}/traffic", get_traffic, methods("GET"), MANAGEMENT, reads_body=False),
        Route("/models/{model_name}/traffic", put_traffic, methods("PUT", "DELETE"), MANAGEMENT),
        Route("/models/{model_name}/shadow", get_shadow, methods("GET"), MANAGEMENT, reads_body=False),
        Route("/models/{model_name}/shadow", put_shadow, methods("PUT", "DELETE"), MANAGEMENT),
        *per_model("/models/{model_name}"),
        *per_model("/models/{model_name}/{version}"),
        Route("/models/{model_name}/{version}/set-default", set_default, methods("PUT"), MANAGEMENT, reads_body=False),
    ]
    if auth is not None:
        # Without tokens there is nothing to rotate: 404, as in TorchServe.
        table.append(Route("/token", rotate_token, methods("GET"), API, reads_body=False))
    return table


def list_page(registry: ModelRegistry, start: int, limit: int) -> dict[str, Any]:
    """TorchServe's list of models, ``limit`` of them from ``start`` by name, with the token of the
    next page if there is one (REST's and gRPC's ListModels)."""
    names = registry.names()
    listing: dict[str, Any] = {}
    if start + limit < len(names):
        listing["nextPageToken"] = str(start + limit)
    listing["models"] = [{"modelName": n, "modelUrl": registry.get(n).url} for n in names[start : start + limit]]
    return listing


def describe_versions(registry: ModelRegistry, name: str, version: str | None) -> list[dict[str, Any]]:
    """Describe of the default version, one version, or "all" of them, each with the labels that
    name it (REST's and gRPC's DescribeModel)."""
    labels = registry.rollout(name).labels
    return [
        describe(status) | {"labels": sorted(label for label, named in labels.items() if named == status.version)}
        for status in registry.status(name, version)
    ]


def describe(model: VersionStatus) -> dict[str, Any]:
    """TorchServe's description of a model version, field for field."""
    s = model.settings
    workers = [
        {
            "id": worker.id,
            "startTime": _iso_millis(worker.started_at),
            # TorchServe reports any worker that is not running as UNLOADING (its OpenAPI allows only
            # these two); marserve's own field beside it says which state it is in.
            "status": "READY" if worker.state == WorkerState.READY else "UNLOADING",
            "state": worker.state.value,
            "batchesInFlight": worker.in_flight,
            # marserve's: processes that died in this slot and were replaced, and how the last ended.
            "restarts": worker.restarts,
            "lastExit": worker.last_exit,
            "memoryUsage": rss_bytes(worker.pid) if worker.pid and worker.state == WorkerState.READY else 0,
            "pid": worker.pid or -1,
            "gpu": worker.gpu_id is not None,
            "gpuUsage": "N/A",
        }
        for worker in model.workers
    ]
    description: dict[str, Any] = {
        "modelName": model.name,
        "modelVersion": model.version,
        "modelUrl": model.url,
        "runtime": model.runtime,
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
    return description | {
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
        # marserve's: batches a worker may hold at once, and whether its handler's stages overlap.
        "maxBatchesInFlight": s.max_batches_in_flight,
        "overlapStages": s.overlap_stages,
        # marserve's: scaling between minWorkers and maxWorkers on queue pressure, and its last decision.
        "autoscaling": _autoscaling(model),
        "jobQueueStatus": {
            "remainingCapacity": model.queue_capacity - model.queue_length,
            "pendingRequests": model.queue_length,
        },
    }


def _autoscaling(model: VersionStatus) -> dict[str, Any]:
    s, scaled = model.settings, model.autoscaling
    last = None
    if scaled.action is not None:
        last = {"action": scaled.action, "reason": scaled.reason, "detail": scaled.detail, "time": _iso_millis(scaled.at)}
    return {
        "enabled": s.max_workers > s.min_workers,
        "windowMs": s.autoscale_window_ms,
        "cooldownMs": s.autoscale_cooldown_ms,
        "scaleUps": scaled.scale_ups,
        "scaleDowns": scaled.scale_downs,
        "lastDecision": last,
    }


def _iso_millis(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _params(request: Request) -> dict[str, str]:
    """Query-string parameters, or a JSON body's when the client sends one (TorchServe accepts both)."""
    params = request.query
    content_type = request.content_type() or ""
    if content_type.split(";")[0].strip().lower() == "application/json" and request.body.strip():
        try:
            data = json.loads(request.body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise BadRequest(f"Invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("The JSON body must be an object")
        # JSON null means "not given", like a parameter left out of the query string.
        params.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items() if v is not None})
    return params


def _json_body(request: Request) -> object:
    """A JSON body; an empty one is ``{}``."""
    if not request.body.strip():
        return {}
    try:
        return json.loads(request.body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None


def _int(params: dict[str, str], key: str) -> int | None:
    """An integer parameter, None if not given. Its range is checked where the setting is used
    (server/models/settings.py), the same for every way a setting arrives."""
    value = params.get(key)
    if value is None or value == "":
        return None
    # ASCII digits only: int() would also take "1_000" and other scripts' digits.
    if not _INTEGER.fullmatch(value):
        raise BadRequest(f"Invalid value for {key}: {value!r} (expected an integer)")
    return int(value)


_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,1000}\s*")


def _bool(params: dict[str, str], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise BadRequest(f"Invalid value for {key}: {value!r} (expected true or false)")
    return value.lower() == "true"


def _int_or_zero(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0
