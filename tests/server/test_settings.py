"""A model version's settings: the register call, then the model YAML, then config.properties'
``models=``, then the defaults. A pure function, tested without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.config import ServerConfig, parse_model_yaml
from server.models.settings import ModelSettings, RegisterRequest, resolve_settings


def settings(
    request: RegisterRequest | None = None,
    yaml: str = "",
    models: dict[str, Any] | None = None,
    gpu_count: int = 0,
    name: str = "m",
    version: str = "1.0",
    **config: str,
) -> ModelSettings:
    properties: dict[str, object] = dict(config)
    if models is not None:
        properties["models"] = json.dumps(models)
    return resolve_settings(
        request or RegisterRequest(),
        parse_model_yaml(yaml)[0],
        ServerConfig.from_properties(properties),
        name=name,
        version=version,
        gpu_count=gpu_count,
    )


def test_defaults() -> None:
    assert settings() == ModelSettings(
        batch_size=1, max_batch_delay=100, response_timeout=120, startup_timeout=120,
        min_workers=1, max_workers=1, job_queue_size=100, device_type="cpu", device_ids=None,
    )  # fmt: skip


def test_server_defaults_come_from_the_config() -> None:
    got = settings(
        default_response_timeout="7", default_startup_timeout="8", job_queue_size="9", default_workers_per_model="3"
    )
    assert (got.response_timeout, got.startup_timeout, got.job_queue_size) == (7, 8, 9)
    assert (got.min_workers, got.max_workers) == (3, 3)


@pytest.mark.parametrize(
    ("field", "api", "yaml_key", "json_key"),
    [
        ("batch_size", "batch_size", "batchSize", "batchSize"),
        ("response_timeout", "response_timeout", "responseTimeout", "responseTimeout"),
        ("startup_timeout", "startup_timeout", "startupTimeout", "startupTimeout"),
        ("max_batch_delay", "max_batch_delay", "maxBatchDelay", "maxBatchDelay"),
    ],
)
def test_the_register_call_then_the_yaml_then_the_models_json(field: str, api: str, yaml_key: str, json_key: str) -> None:
    models = {"m": {"1.0": {json_key: 3}}}
    assert getattr(settings(models=models), field) == 3
    assert getattr(settings(yaml=f"{yaml_key}: 4\n", models=models), field) == 4
    request = RegisterRequest()
    setattr(request, api, 5)
    assert getattr(settings(request, yaml=f"{yaml_key}: 4\n", models=models), field) == 5


def test_the_models_json_applies_to_its_own_name_and_version_only() -> None:
    models = {"m": {"1.0": {"batchSize": 8}}, "other": {"1.0": {"batchSize": 9}}}
    assert settings(models=models).batch_size == 8
    assert settings(models=models, version="2.0").batch_size == 1
    assert settings(models=models, name="third").batch_size == 1


def test_zero_means_not_set_except_for_the_register_calls_batch_delay() -> None:
    models = {"m": {"1.0": {"batchSize": 6, "maxBatchDelay": 0}}}
    # A batch size of 0 from the API or the YAML falls through to the next source.
    assert settings(RegisterRequest(batch_size=0), yaml="batchSize: 0\n", models=models).batch_size == 6
    # An API delay of 0 is "do not wait"; 0 in the YAML or the models JSON is "not set".
    assert settings(RegisterRequest(max_batch_delay=0), yaml="maxBatchDelay: 50\n").max_batch_delay == 0
    assert settings(yaml="maxBatchDelay: 0\n", models=models).max_batch_delay == 100
    assert settings(yaml="maxBatchDelay: 0\n", models={"m": {"1.0": {"maxBatchDelay": 7}}}).max_batch_delay == 7
    # A negative API delay is no choice at all.
    assert settings(RegisterRequest(max_batch_delay=-1), yaml="maxBatchDelay: 50\n").max_batch_delay == 50


def test_worker_bounds() -> None:
    def bounds(request: RegisterRequest | None = None, yaml: str = "", default_workers_per_model: str = "0") -> tuple[int, int]:
        got = settings(request, yaml, default_workers_per_model=default_workers_per_model)
        return got.min_workers, got.max_workers

    # initial_workers sets both bounds, whatever the YAML says; a negative count is none.
    assert bounds(RegisterRequest(initial_workers=3), "minWorkers: 1\nmaxWorkers: 5\n") == (3, 3)
    assert bounds(RegisterRequest(initial_workers=0)) == (0, 0)
    assert bounds(RegisterRequest(initial_workers=-2)) == (0, 0)
    # The YAML's bounds are used only together and consistent; its minWorkers 0 reads as 1.
    assert bounds(yaml="minWorkers: 2\nmaxWorkers: 4\n") == (2, 4)
    assert bounds(yaml="minWorkers: 0\nmaxWorkers: 3\n") == (1, 3)
    assert bounds(yaml="minWorkers: 0\nmaxWorkers: 0\n", default_workers_per_model="2") == (2, 2)
    assert bounds(yaml="minWorkers: 5\nmaxWorkers: 4\n", default_workers_per_model="2") == (2, 2)
    assert bounds(yaml="minWorkers: 2\n", default_workers_per_model="3") == (3, 3)


def test_queue_size_and_devices() -> None:
    assert settings(yaml="jobQueueSize: 7\n", job_queue_size="9").job_queue_size == 7
    assert settings(yaml="deviceIds: [1]\n").device_type == "cpu"  # no GPU on this host
    on_gpu = settings(yaml="deviceIds: [1, 0]\n", gpu_count=2)
    assert (on_gpu.device_type, on_gpu.device_ids) == ("gpu", [1, 0])
    assert settings(yaml="deviceType: cpu\n", gpu_count=2).device_type == "cpu"
    assert settings(yaml="deviceType: gpu\n").device_type == "cpu"


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        settings().min_workers = 3  # type: ignore[misc]
