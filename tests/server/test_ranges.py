"""Every numeric setting has one range, and every source that sets it refuses a value outside it
with a message naming the setting and the range: the register call (query string or JSON body),
the model YAML, ``models=`` and the other config.properties keys, a snapshot being restored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import config as settings_module
from server.config import (
    BATCH_SIZE,
    MAX_BATCH_DELAY,
    RESPONSE_TIMEOUT,
    STARTUP_TIMEOUT,
    ConfigError,
    Range,
    WorkerCaps,
    load_config,
    parse_model_yaml,
)
from server.errors import BadRequest
from server.models.settings import RegisterRequest, check_register_request
from tests.conftest import Server, ServerFactory, make_mar, wait_for

REPO = Path(__file__).resolve().parents[2]
BIG = 10**30


@pytest.fixture(scope="module")
def shared(start_module_server: ServerFactory) -> Server:
    srv = start_module_server("max_workers=4\nmax_workers_per_model=2\n")
    make_mar(srv.store, "echo", "echo_handler.py")
    return srv


@pytest.fixture
def server(shared: Server) -> Iterator[Server]:
    yield shared
    for entry in shared.http.get(f"{shared.management}/models").json()["models"]:
        shared.http.delete(f"{shared.management}/models/{entry['modelName']}")


def error(reply: httpx.Response) -> tuple[int, str, str]:
    body = reply.json()
    return reply.status_code, body.get("type", ""), body.get("message", body.get("status", ""))


# -- the register call -----------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("batch_size", -1, BATCH_SIZE),
    ("batch_size", 0, BATCH_SIZE),
    ("batch_size", 1025, BATCH_SIZE),
    ("batch_size", BIG, BATCH_SIZE),
    ("max_batch_delay", -5, MAX_BATCH_DELAY),
    ("max_batch_delay", 10_001, MAX_BATCH_DELAY),
    ("max_batch_delay", 10**12, MAX_BATCH_DELAY),
    ("response_timeout", -1, RESPONSE_TIMEOUT),
    ("response_timeout", 0, RESPONSE_TIMEOUT),
    ("response_timeout", 3601, RESPONSE_TIMEOUT),
    ("startup_timeout", -1, STARTUP_TIMEOUT),
    ("startup_timeout", BIG, STARTUP_TIMEOUT),
    ("initial_workers", -1, Range(0, 2)),
]


@pytest.mark.parametrize(("key", "value", "limits"), OUT_OF_RANGE)
@pytest.mark.parametrize("way", ["query", "json"])
def test_register_refuses_values_outside_their_range(server: Server, key: str, value: int, limits: Range, way: str) -> None:
    params: dict[str, object] = {"initial_workers": 0, key: value}
    if way == "query":
        reply = server.register("echo.mar", **params)
    else:
        body = {"url": "echo.mar", **params}
        reply = server.http.post(f"{server.management}/models", json=body)
    expected = limits.expected()
    if key == "initial_workers":
        expected += "; max_workers_per_model is 2"
    assert error(reply) == (400, "BadRequestException", f"Invalid value for {key}: {value} ({expected})")
    assert server.http.get(f"{server.management}/models").json()["models"] == []


def test_the_ends_of_each_range_and_the_zeros_that_mean_something(server: Server) -> None:
    reply = server.register(
        "echo.mar", model_name="top", initial_workers=0, batch_size=1024, max_batch_delay=10_000,
        response_timeout=3600, startup_timeout=3600,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    [described] = server.http.get(f"{server.management}/models/top").json()
    top = (described["batchSize"], described["maxBatchDelay"], described["responseTimeout"], described["startupTimeout"])
    assert top == (1024, 10_000, 3600, 3600)
    # max_batch_delay=0: do not wait; initial_workers=0: registered without workers.
    reply = server.register("echo.mar", model_name="bottom", initial_workers=0, batch_size=1, max_batch_delay=0,
                            response_timeout=1, startup_timeout=1)  # fmt: skip
    assert reply.status_code == 200, reply.text
    [described] = server.http.get(f"{server.management}/models/bottom").json()
    assert (described["batchSize"], described["maxBatchDelay"], described["workers"]) == (1, 0, [])


@pytest.mark.parametrize("value", ["1_000", "\u0663", "0x10", "1e3", "1.0", "+", "9" * 1001])
def test_only_plain_integers_are_integers(server: Server, value: str) -> None:
    reply = server.register("echo.mar", initial_workers=0, batch_size=value)
    assert error(reply) == (400, "BadRequestException", f"Invalid value for batch_size: {value!r} (expected an integer)")


def test_scale_refuses_counts_outside_the_range(server: Server) -> None:
    assert server.register("echo.mar", initial_workers=0).status_code == 200
    reply = server.http.put(f"{server.management}/models/echo", params={"min_worker": BIG, "max_worker": BIG})
    assert error(reply) == (
        400, "BadRequestException",
        f"Invalid value for min_worker: {BIG} (expected an integer from 0 to 2; max_workers_per_model is 2)",
    )  # fmt: skip


# -- the model YAML and models= ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("batchSize: -1", "batchSize in model YAML: -1 (expected an integer from 1 to 1024, or 0 for not set)"),
        ("batchSize: 100000", "batchSize in model YAML: 100000 (expected an integer from 1 to 1024, or 0 for not set)"),
        ("maxBatchDelay: 1000000000000", "maxBatchDelay in model YAML: 1000000000000 (expected an integer from 0 to 10000)"),
        ("responseTimeout: 100000", "responseTimeout in model YAML: 100000 (expected an integer from 1 to 3600)"),
        ("startupTimeout: -1", "startupTimeout in model YAML: -1 (expected an integer from 0 to 3600)"),
        ("jobQueueSize: 1000001", "jobQueueSize in model YAML: 1000001 (expected an integer from 1 to 100000)"),
        ("maxWorkers: 5000", "maxWorkers in model YAML: 5000 (expected an integer from 0 to 4096)"),
        ("deviceIds: [0, 5000]", "deviceIds.1 in model YAML: 5000 (expected an integer from 0 to 1023)"),
    ],
)
def test_model_yaml_values_outside_their_range(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_model_yaml(yaml + "\n")
    assert str(exc.value) == f"invalid value for {message}"


def test_a_model_yaml_out_of_range_refuses_the_registration(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text("batchSize: 4096\n")
    make_mar(server.store, "bigbatch", "echo_handler.py", config_file=str(config))
    assert error(server.register("bigbatch.mar", initial_workers=0)) == (
        400, "InvalidModelException",
        "model-config.yaml: invalid value for batchSize in model YAML: 4096 "
        "(expected an integer from 1 to 1024, or 0 for not set)",
    )  # fmt: skip


def test_models_json_is_checked_like_a_model_yaml(tmp_path: Path) -> None:
    models = {"m": {"1.0": {"batchSize": 4096, "maxBatchDelay": 50}, "2.0": {"responseTimeout": "60"}}}
    (tmp_path / "config.properties").write_text(f"models={json.dumps(models)}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "config.properties", env={})
    message = str(exc.value)
    assert message.startswith("invalid value for models: ")
    assert "m 1.0 batchSize: 4096 (expected an integer from 1 to 1024, or 0 for not set)" in message
    assert "m 2.0 responseTimeout: '60' (expected an integer)" in message
    # TorchServe's other keys (marName, defaultVersion, ...) and 0 for "not set" still pass.
    fine = {"m": {"1.0": {"marName": "m.mar", "defaultVersion": True, "batchSize": 0, "maxBatchDelay": 0}}}
    (tmp_path / "config.properties").write_text(f"models={json.dumps(fine)}\n")
    assert load_config(tmp_path / "config.properties", env={}).models == fine


# -- config.properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("job_queue_size", "0", "from 1 to 100000"),
        ("job_queue_size", "100001", "from 1 to 100000"),
        ("default_workers_per_model", "-1", "from 0 to 4096"),
        ("default_response_timeout", "0", "from 1 to 3600"),
        ("default_response_timeout", "3601", "from 1 to 3600"),
        ("default_startup_timeout", "99999", "from 0 to 3600"),
        ("unregister_model_timeout", "0", "from 1 to 3600"),
        ("number_of_gpu", "-1", "from 0 to 1024"),
        ("max_request_size", "0", "from 1 to 2147483647"),
        ("max_response_size", "2147483648", "from 1 to 2147483647"),
        ("request_read_timeout", "86400", "from 1 to 3600"),
        ("max_download_size", "0", "from 1 to 1099511627776"),
        ("token_expiration_min", "0", "from 1 to 525600"),
        ("max_workers", "0", "from 1 to 4096"),
        ("max_workers_per_model", "5000", "from 1 to 4096"),
    ],
)
def test_config_keys_outside_their_range_stop_start_up(tmp_path: Path, key: str, value: str, expected: str) -> None:
    (tmp_path / "config.properties").write_text(f"{key}={value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "config.properties", env={})
    assert str(exc.value) == f"invalid value for {key}: {value!r} (expected an integer {expected})"


# -- snapshots -------------------------------------------------------------------------------------------


def test_restored_register_parameters_are_checked_too() -> None:
    caps = WorkerCaps(per_model=2, total=4)
    with pytest.raises(BadRequest) as exc:
        check_register_request(RegisterRequest(max_batch_delay=10**12), caps)
    assert exc.value.message == "Invalid value for max_batch_delay: 1000000000000 (expected an integer from 0 to 10000)"
    check_register_request(RegisterRequest(batch_size=1024, max_batch_delay=0, initial_workers=2), caps)


def test_a_snapshot_with_an_out_of_range_parameter_leaves_that_model_out(start_server: ServerFactory) -> None:
    srv = start_server(start=False)
    make_mar(srv.store, "echo", "echo_handler.py")
    saved = srv.root / "logs" / "config" / "snapshot.json"
    saved.parent.mkdir(parents=True)
    models = [
        {"name": "bad", "version": "1.0", "url": "echo.mar", "default": True, "params": {"batch_size": -1},
         "workers": {"min": 0, "max": 0}},
        {"name": "good", "version": "1.0", "url": "echo.mar", "default": True, "params": {"batch_size": 4},
         "workers": {"min": 0, "max": 0}},
    ]  # fmt: skip
    saved.write_text(json.dumps({"format": 1, "models": models}))
    srv.start()
    wait_for(lambda: "restored " in srv.log.read_text(), 30, "the restore")
    assert [m["modelName"] for m in srv.http.get(f"{srv.management}/models").json()["models"]] == ["good"]
    assert "Invalid value for batch_size: -1 (expected an integer from 1 to 1024)" in srv.log.read_text()


# -- one definition, documented --------------------------------------------------------------------------


def test_the_readme_documents_every_range() -> None:
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and " to " in line]
    ranges = {name: value for name, value in vars(settings_module).items() if isinstance(value, Range)}
    assert len(ranges) >= 15
    for name, limits in ranges.items():
        if name == "WORKERS":
            continue  # documented with max_workers_per_model as its top
        assert any(f"{limits.low:,} to {limits.high:,}" in row for row in rows), f"{name} ({limits}) is not in the README"
