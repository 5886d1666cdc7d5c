"""What KServe's v1 routes and the Open Inference Protocol's v2 routes share.

- their error dialect, ``{"error": "..."}`` (``kserve_error``), as KServe's model server and
  Triton answer;
- queueing a request as a job on a model version with the envelope its protocol needs
  (``queue_job``), answered by the worker's reply as it arrives, as ``/predictions`` is;
- readiness: a model version is ready when one of its workers has its model loaded; the server
  is ready when every version that should have workers (``min_workers`` > 0) is;
- a last route per path prefix, so that an unknown path or method under it is answered in the
  dialect too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import orjson

from ..errors import MethodNotAllowed, NotFound, ServerError
from ..http.forms import Param
from ..http.request import Request
from ..http.responses import Response
from ..http.routing import Route, split_path
from ..metrics.recording import Metrics
from ..models.batching import Job, Reply
from ..models import shadow as shadows
from ..models.registry import ModelRegistry
from ..models.rollout import sampled
from ..models.version import ModelVersion

JSON = "application/json"


def kserve_error(error: ServerError) -> Response:
    """``{"error": message}`` with the error's status: the dialect of KServe's v1 and v2 routes."""
    return Response(error.status_code, orjson.dumps({"error": error.message}), JSON)


def json_answer(payload: object, status: int = 200) -> Response:
    """Compact JSON, as KServe's and Triton's REST APIs write it."""
    return Response(status, orjson.dumps(payload), JSON)


def server_ready(registry: ModelRegistry) -> bool:
    """Every registered version that should have workers has one serving; versions scaled to
    (or registered with) no workers do not count, and a server without models is ready, once its
    startup models are registered (never while it starts or stops: ``ModelRegistry.serving``)."""
    return registry.serving and all(model.ready for model in registry.all_models() if model.settings.min_workers > 0)


def queue_job(
    metrics: Metrics,
    request: Request,
    model: ModelVersion,
    url_version: str | None,
    params: list[Param],
    *,
    envelope: str,
    explain: bool,
    registry: ModelRegistry | None = None,
    route: str = "explicit",
) -> asyncio.Future[Reply]:
    """Queue ``request`` on ``model`` (named by ``url_version`` in the URL, or its model's default)
    for the worker to answer in ``envelope``; the future is the worker's reply. 503 when it has no
    worker or its queue is full, as ``/predictions`` answers. With ``registry``, the request is
    counted by ``route`` (``ModelRegistry.route``) and mirrored to the model's shadow, if any."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
    headers.append(("explain", "True" if explain else "False"))
    headers.append(("url_path", ""))
    future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    job = Job(request.request_id, headers, params, future, request.received, envelope=envelope)

    def record(status: int) -> None:
        queued = job.dispatched - job.received if job.dispatched else 0.0
        metrics.inference(model.name, url_version, model.version, time.perf_counter() - job.received, queued, status)

    # Counted once answered, even when refused at the queue, as TorchServe counts predictions.
    request.on_answered = record
    model.submit(job, versioned=url_version is not None)
    if registry is not None:
        rolled_out(registry, metrics, model, route, job)
    return future


def rolled_out(registry: ModelRegistry, metrics: Metrics, model: ModelVersion, route: str, job: Job) -> None:
    """Count a queued request by how its version was chosen, and mirror a sample of the requests
    the rollout chose a version for (never one that names its version) to the model's shadow."""
    metrics.routed(model.name, model.version, route)
    if route == "explicit":
        return
    found = registry.shadow_of(model)
    if found is None:
        return
    shadow, setting, stats = found
    if sampled(setting.percent):
        metrics.routed(model.name, shadow.version, "shadow")
        shadows.mirror(job, shadow, stats, metrics.shadowed)


def fallback(prefix: str, routes: Sequence[Route], key: str | None) -> Route:
    """The last route under ``/prefix``: 405 for a path one of ``routes`` has, else 404, in
    ``kserve_error``'s dialect (the router's own would answer in TorchServe's)."""

    def refuse(request: Request) -> Response:
        parts = split_path(request.path)
        if any(route.match(parts) is not None for route in routes):
            raise MethodNotAllowed()
        raise NotFound()

    return Route(f"/{prefix}/{{rest:path}}", refuse, None, key, reads_body=False, errors=kserve_error)
