"""A model version's settings: the register call, then the archive's model YAML, then the
``models=`` JSON of config.properties, then the server's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (
    BATCH_SIZE,
    MAX_BATCH_DELAY,
    RESPONSE_TIMEOUT,
    STARTUP_TIMEOUT,
    BATCHES_IN_FLIGHT,
    ModelYamlConfig,
    Range,
    ServerConfig,
    WorkerCaps,
)
from ..errors import BadRequest


@dataclass
class RegisterRequest:
    """The register API's parameters (query string or JSON body); None means "not given"."""

    url: str | None = None
    model_name: str | None = None
    handler: str | None = None
    runtime: str | None = None
    batch_size: int | None = None
    max_batch_delay: int | None = None
    initial_workers: int | None = None
    synchronous: bool = True
    response_timeout: int | None = None
    startup_timeout: int | None = None
    max_batches_in_flight: int | None = None


@dataclass(frozen=True, slots=True)
class ModelSettings:
    batch_size: int = 1
    max_batch_delay: int = 100  # ms
    response_timeout: int = 120  # s
    startup_timeout: int = 120  # s
    min_workers: int = 0
    max_workers: int = 0
    job_queue_size: int = 100
    device_type: str = "cpu"
    device_ids: list[int] | None = None
    # Batches a worker may hold: the one it runs and the next (1: one at a time).
    max_batches_in_flight: int = 2
    # Whether a worker runs its handler's stages of consecutive batches as a pipeline.
    overlap_stages: bool = False
    # Autoscaling (when max_workers > min_workers): ms of queue pressure before a worker is added,
    # and of quiet before one is removed (server/workers/autoscaler.py).
    autoscale_window_ms: int = 1000
    autoscale_cooldown_ms: int = 30_000


def resolve_settings(
    request: RegisterRequest, yaml: ModelYamlConfig, config: ServerConfig, *, name: str, version: str, gpu_count: int
) -> ModelSettings:
    """The settings of model ``name`` version ``version``, each from the first source that sets it."""
    models_json: dict[str, Any] = (config.models or {}).get(name, {}).get(version, {})

    def pick(api: int | None, yaml_value: int | None, json_key: str, default: int) -> int:
        for value in (api, yaml_value, models_json.get(json_key)):
            if value is not None and value > 0:
                return int(value)
        return default

    yaml_bounds = _yaml_worker_bounds(yaml)
    if request.initial_workers is not None:
        min_workers = max_workers = max(0, request.initial_workers)
    elif yaml_bounds is not None:
        min_workers, max_workers = yaml_bounds
    else:
        min_workers = max_workers = config.default_workers_per_model or 1
    return ModelSettings(
        batch_size=pick(request.batch_size, yaml.batchSize, "batchSize", 1),
        max_batch_delay=_batch_delay(request.max_batch_delay, yaml.maxBatchDelay, models_json.get("maxBatchDelay")),
        response_timeout=pick(request.response_timeout, yaml.responseTimeout, "responseTimeout", config.default_response_timeout),
        # 0 is a limit here, not "unset": the registration then fails, as in TorchServe.
        startup_timeout=next(
            (value for value in (request.startup_timeout, yaml.startupTimeout, models_json.get("startupTimeout")) if value is not None),
            config.default_startup_timeout,
        ),
        min_workers=min_workers,
        max_workers=max_workers,
        job_queue_size=yaml.jobQueueSize or config.job_queue_size,
        device_type="gpu" if gpu_count and yaml.deviceType != "cpu" else "cpu",
        device_ids=yaml.deviceIds,
        max_batches_in_flight=pick(request.max_batches_in_flight, yaml.maxBatchesInFlight, "maxBatchesInFlight", 2),
        overlap_stages=bool(yaml.overlapStages),
        autoscale_window_ms=pick(None, yaml.autoscaleWindowMs, "autoscaleWindowMs", config.autoscale_window_ms),
        autoscale_cooldown_ms=pick(None, yaml.autoscaleCooldownMs, "autoscaleCooldownMs", config.autoscale_cooldown_ms),
    )  # fmt: skip


def _batch_delay(api: int | None, yaml_value: int | None, json_value: Any) -> int:
    # An API delay of 0 is a real choice ("do not wait"); in the YAML and the models JSON, 0 means
    # "not set", as in TorchServe.
    if api is not None and api >= 0:
        return api
    for value in (yaml_value, json_value):
        if isinstance(value, int) and value > 0:
            return value
    return 100


def workers_source(request: RegisterRequest, yaml: ModelYamlConfig) -> str:
    """The setting a registration's worker count comes from, as messages name it."""
    if request.initial_workers is not None:
        return "initial_workers"
    if _yaml_worker_bounds(yaml) is not None:
        return "minWorkers in model YAML"
    return "default_workers_per_model"


def _yaml_worker_bounds(yaml: ModelYamlConfig) -> tuple[int, int] | None:
    # TorchServe reads a YAML minWorkers below 1 as 1, and uses the YAML bounds only when they
    # are consistent; otherwise both fall back, so min never exceeds max.
    if yaml.minWorkers is None or yaml.maxWorkers is None or yaml.maxWorkers < max(1, yaml.minWorkers):
        return None
    return max(1, yaml.minWorkers), yaml.maxWorkers


# ---------------------------------------------------------------- ranges
# The register and scale calls' parameters are checked here, whichever way they came (the API's
# query string or JSON body, a snapshot being restored, a startup model); the model YAML and the
# models= JSON are checked as they are read (server/config.py), against the same ranges.


def out_of_range(name: str, value: int, expected: str) -> BadRequest:
    return BadRequest(f"Invalid value for {name}: {value} ({expected})")


def check_range(name: str, value: int | None, limits: Range) -> None:
    """BadRequest naming ``name`` and ``limits`` unless ``value`` is None (not given) or in them."""
    if value is not None and value not in limits:
        raise out_of_range(name, value, limits.expected())


def check_workers(name: str, value: int | None, caps: WorkerCaps) -> None:
    """BadRequest unless ``value`` is None or a worker count one model may have on this server."""
    if value is not None and value not in caps.workers:
        raise out_of_range(name, value, caps.expected())


def check_register_request(request: RegisterRequest, caps: WorkerCaps) -> None:
    """BadRequest for the first register parameter outside its range."""
    check_range("batch_size", request.batch_size, BATCH_SIZE)
    check_range("max_batch_delay", request.max_batch_delay, MAX_BATCH_DELAY)  # 0: do not wait
    check_range("response_timeout", request.response_timeout, RESPONSE_TIMEOUT)
    check_range("startup_timeout", request.startup_timeout, STARTUP_TIMEOUT)
    check_range("max_batches_in_flight", request.max_batches_in_flight, BATCHES_IN_FLIGHT)
    check_workers("initial_workers", request.initial_workers, caps)  # 0: registered without workers


def check_worker_bounds(settings: ModelSettings, request: RegisterRequest, yaml: ModelYamlConfig, caps: WorkerCaps) -> None:
    """BadRequest if the resolved worker bounds exceed ``caps``, naming the setting they came from
    (``initial_workers`` is checked with the request)."""
    if request.initial_workers is not None or settings.max_workers in caps.workers:
        return
    if _yaml_worker_bounds(yaml) is not None:
        assert yaml.minWorkers is not None and yaml.maxWorkers is not None
        check_workers("minWorkers in model YAML", yaml.minWorkers, caps)
        check_workers("maxWorkers in model YAML", yaml.maxWorkers, caps)
    check_workers("default_workers_per_model", settings.max_workers, caps)
