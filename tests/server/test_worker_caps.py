"""The server's caps on workers: per model version and in all, their defaults from the machine,
and every way of asking for workers checked against them (register, model YAML, scale, config,
snapshot restore)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.config import WORKER_CAP, ConfigError, ServerConfig, WorkerCaps, load_config, worker_caps
from server.workers.placement import WORKER_MEMORY, default_max_workers, machine_cpus, machine_memory, start_limit
from tests.conftest import Server, ServerFactory, make_mar, wait_for

GiB = 1 << 30


# -- the defaults --------------------------------------------------------------------------------


def test_the_default_cap_is_a_few_workers_per_cpu_and_gpu_and_no_more_than_memory_holds() -> None:
    assert default_max_workers(2, 0, 24 * GiB, 4096) == 8
    assert default_max_workers(2, 2, 24 * GiB, 4096) == 16
    assert default_max_workers(64, 8, 512 * GiB, 4096) == 288
    # Memory for 6 workers of WORKER_MEMORY each, on a host that has cores for 32.
    assert default_max_workers(8, 0, 6 * WORKER_MEMORY, 4096) == 6
    assert default_max_workers(8, 0, None, 4096) == 32  # memory that cannot be judged does not count
    assert default_max_workers(1, 0, 1, 4096) == 1  # at least one
    assert default_max_workers(4096, 0, None, 4096) == 4096  # at most the ceiling


def test_the_machine_is_read_where_it_can_be() -> None:
    assert machine_cpus() >= 1
    memory = machine_memory()
    assert memory is None or memory > 0
    assert start_limit(1) == 2 and start_limit(2) == 2 and start_limit(8) == 4 and start_limit(64) == 8


def test_caps_come_from_the_config_or_the_machine() -> None:
    derived = worker_caps(ServerConfig(), gpu_count=1, cpus=2, memory=24 * GiB)
    assert derived == WorkerCaps(per_model=12, total=12)
    assert worker_caps(ServerConfig(max_workers_per_model=5), gpu_count=0, cpus=2, memory=None) == WorkerCaps(5, 8)
    # A per-model cap above the total is the total.
    assert worker_caps(ServerConfig(max_workers=3, max_workers_per_model=5), gpu_count=0) == WorkerCaps(3, 3)
    assert worker_caps(ServerConfig(max_workers=100), gpu_count=0, cpus=1, memory=1) == WorkerCaps(100, 100)


@pytest.mark.parametrize("line", ["max_workers=0", "max_workers=4097", "max_workers_per_model=0", "max_workers=lots"])
def test_the_caps_have_a_range(tmp_path: Path, line: str) -> None:
    (tmp_path / "config.properties").write_text(line + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "config.properties", env={})
    key, value = line.split("=")
    expected = "expected an integer" if value == "lots" else WORKER_CAP.expected()
    assert str(exc.value) == f"invalid value for {key}: {value!r} ({expected})"


def test_default_workers_per_model_above_the_cap_stops_start_up() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={}, overrides={"default_workers_per_model": 5, "max_workers_per_model": 4})
    assert str(exc.value) == (
        "invalid value for default_workers_per_model: 5 (expected an integer from 0 to 4; max_workers_per_model is 4)"
    )
    assert load_config(None, env={}, overrides={"default_workers_per_model": 4, "max_workers_per_model": 4})
    with pytest.raises(ConfigError, match="max_workers_per_model is 3"):
        load_config(None, env={}, overrides={"default_workers_per_model": 4, "max_workers": 3})


def test_default_workers_per_model_is_checked_against_the_caps_derived_from_the_machine() -> None:
    derived = worker_caps(load_config(None, env={"CUDA_VISIBLE_DEVICES": ""}), gpu_count=0).per_model
    with pytest.raises(ConfigError, match=f"max_workers_per_model is {derived}"):
        load_config(None, env={"CUDA_VISIBLE_DEVICES": ""}, overrides={"default_workers_per_model": derived + 1})


# -- the API, against a server capped at 3 per model and 4 in all ---------------------------------

CAPPED = "max_workers=4\nmax_workers_per_model=3\n"


@pytest.fixture(scope="module")
def capped(start_module_server: ServerFactory) -> Server:
    srv = start_module_server(CAPPED)
    make_mar(srv.store, "echo", "echo_handler.py")
    return srv


@pytest.fixture
def server(capped: Server) -> Iterator[Server]:
    yield capped
    for entry in capped.http.get(f"{capped.management}/models").json()["models"]:
        for version in capped.http.get(f"{capped.management}/models/{entry['modelName']}/all").json():
            capped.http.delete(f"{capped.management}/models/{entry['modelName']}/{version['modelVersion']}")


def error(reply: httpx.Response) -> tuple[int, str]:
    return reply.status_code, reply.json()["message"]


def scale(srv: Server, name: str, **params: object) -> httpx.Response:
    return srv.http.put(f"{srv.management}/models/{name}", params={"synchronous": "true", **params})


def workers(srv: Server, name: str) -> int:
    return len(srv.http.get(f"{srv.management}/models/{name}").json()[0]["workers"])


def test_initial_workers_beyond_the_per_model_cap_is_refused(server: Server) -> None:
    assert error(server.register("echo.mar", initial_workers=10000)) == (
        400, "Invalid value for initial_workers: 10000 (expected an integer from 0 to 3; max_workers_per_model is 3)",
    )  # fmt: skip
    assert error(server.register("echo.mar", initial_workers=4))[0] == 400
    assert server.http.get(f"{server.management}/models").json()["models"] == []
    assert server.worker_pids() == []
    assert server.register("echo.mar", initial_workers=3).status_code == 200


def test_the_total_counts_every_model_version(server: Server) -> None:
    assert server.register("echo.mar", model_name="a", initial_workers=3).status_code == 200
    assert error(server.register("echo.mar", model_name="b", initial_workers=2)) == (
        400, "Invalid value for initial_workers: 2 (the server runs 3 workers and max_workers is 4: 1 more fit)",
    )  # fmt: skip
    assert server.register("echo.mar", model_name="b", initial_workers=1).status_code == 200
    # Scaling up counts the same way; scaling within what is there does not.
    assert error(scale(server, "b", min_worker=2)) == (
        400, "Invalid value for min_worker: 2 (the server runs 4 workers and max_workers is 4: 0 more fit)",
    )  # fmt: skip
    assert scale(server, "b", min_worker=1, max_worker=3).status_code == 200
    # Workers given back make room at once, even those still leaving.
    assert server.http.put(f"{server.management}/models/a", params={"min_worker": 1}).status_code == 202
    scaled = scale(server, "b", min_worker=3)
    assert scaled.status_code == 200, scaled.text
    assert (workers(server, "a"), workers(server, "b")) == (1, 3)
    assert len(server.worker_pids()) == 4


def test_scale_beyond_the_per_model_cap_is_refused(server: Server) -> None:
    assert server.register("echo.mar", initial_workers=0).status_code == 200
    assert error(scale(server, "echo", min_worker=4)) == (
        400, "Invalid value for min_worker: 4 (expected an integer from 0 to 3; max_workers_per_model is 3)",
    )  # fmt: skip
    assert error(scale(server, "echo", min_worker=1, max_worker=100)) == (
        400, "Invalid value for max_worker: 100 (expected an integer from 0 to 3; max_workers_per_model is 3)",
    )  # fmt: skip
    # TorchServe's own checks come first, as before.
    assert error(scale(server, "echo", min_worker=-1)) == (400, "min_worker cannot be negative.")
    assert workers(server, "echo") == 0


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("minWorkers: 1\nmaxWorkers: 8\n", "Invalid value for maxWorkers in model YAML: 8"),
        ("minWorkers: 4\nmaxWorkers: 4\n", "Invalid value for minWorkers in model YAML: 4"),
    ],
)
def test_model_yaml_worker_bounds_beyond_the_cap_are_refused(server: Server, tmp_path: Path, yaml: str, message: str) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text(yaml)
    make_mar(server.store, "yamlcap", "echo_handler.py", config_file=str(config))
    reply = server.register("yamlcap.mar", synchronous=False)
    assert error(reply) == (400, f"{message} (expected an integer from 0 to 3; max_workers_per_model is 3)")
    # The register call's own count stands instead of the YAML's.
    assert server.register("yamlcap.mar", initial_workers=1).status_code == 200


def test_a_snapshot_beyond_the_caps_is_not_restored(start_server: ServerFactory) -> None:
    srv = start_server(CAPPED, start=False)
    make_mar(srv.store, "echo", "echo_handler.py")
    saved = srv.root / "logs" / "config" / "snapshot.json"
    saved.parent.mkdir(parents=True)
    models = [
        {"name": "big", "version": "1.0", "url": "echo.mar", "default": True, "workers": {"min": 5, "max": 5}},
        {"name": "fits", "version": "1.0", "url": "echo.mar", "default": True, "workers": {"min": 2, "max": 2}},
    ]
    saved.write_text(json.dumps({"format": 1, "models": models}))
    srv.start()
    wait_for(lambda: "restored " in srv.log.read_text(), 30, "the restore")  # the ports listen before it ends
    listed = srv.http.get(f"{srv.management}/models").json()["models"]
    assert [m["modelName"] for m in listed] == ["fits"]
    log = srv.log.read_text()
    assert "could not restore model big 1.0" in log
    assert "Invalid value for initial_workers: 5 (expected an integer from 0 to 3; max_workers_per_model is 3)" in log
