"""``marserve-torchserve`` (``torchserve`` in the image): TorchServe's command line, and a start shaped
as KServe's ``kserve-torchserve`` runtime makes it, serving KServe's v1, v2 and gRPC v2 protocols
from KServe's own ``config.properties``; readiness follows the models, and SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest

from server.config import ServerConfig
from server.torchserve_cli import is_container_main, is_kserve, kserve_overrides
from tests.conftest import ASSETS, BIN, free_port, make_mar, wait_for

SIGNATURE = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1]}],
}
http = httpx.Client(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


class KServePod:
    """What KServe's storage initializer leaves in /mnt/models, and the runtime's command line."""

    def __init__(self, root: Path, handler: Path, *, min_workers: int = 1, extra_config: str = "") -> None:
        self.root = root
        models = root / "mnt" / "models"
        self.store = models / "model-store"
        self.store.mkdir(parents=True)
        (models / "config").mkdir()
        signature = root / "double.yaml"
        signature.write_text(json.dumps({"oip": SIGNATURE}))  # JSON is YAML
        make_mar(self.store, "double", str(handler), config_file=str(signature))
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        snapshot = {
            "name": "startup.cfg", "modelCount": 1,
            "models": {"double": {"1.0": {
                "defaultVersion": True, "marName": "double.mar", "minWorkers": min_workers, "maxWorkers": 5,
                "batchSize": 4, "maxBatchDelay": 10, "responseTimeout": 120,
            }}},
        }  # fmt: skip
        # KServe's sample config.properties for TorchServe (inference and management shared on
        # 8085, behind KServe's wrapper), but for the ports other servers on this machine might
        # hold: the management and gRPC management ports are free ones here.
        self.management_port = free_port()
        self.config = models / "config" / "config.properties"
        self.config.write_text(
            "inference_address=http://0.0.0.0:8085\n"
            f"management_address=http://0.0.0.0:{self.management_port}\n"
            "metrics_address=http://0.0.0.0:8082\n"
            "grpc_inference_port=7070\n"
            f"grpc_management_port={free_port()}\n"
            "enable_metrics_api=true\nmetrics_format=prometheus\nnumber_of_netty_threads=4\n"
            "job_queue_size=10\nenable_envvars_config=true\ninstall_py_dep_per_model=true\n"
            f"model_store={self.store}\nlog_location={root / 'logs'}\n"
            f"model_snapshot={json.dumps(snapshot)}\n{extra_config}"
        )
        tmp = root / "tmp"
        tmp.mkdir()
        # What KServe's runtime sets for the v2 protocol.
        self.env = {**os.environ, "TMPDIR": str(tmp), "TS_SERVICE_ENVELOPE": "kservev2", "PROTOCOL_VERSION": "v2"}
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(BIN / "marserve-torchserve"), "--start", f"--model-store={self.store}", f"--ts-config={self.config}",
            # Not pid 1 here, so foreground on request; the ports are free ones, not 8080-8082.
            "--foreground", f"--kserve-http-port={self.http_port}", f"--kserve-grpc-port={self.grpc_port}",
            f"--kserve-metrics-port={self.metrics_port}",
        ]  # fmt: skip

    def start(self) -> KServePod:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._live, 60, "the frontend to answer")
        return self

    def _live(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}:\n{self.log.read_text()}")
        try:
            return http.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def ready(self) -> bool:
        return http.get(f"{self.url}/v2/health/ready").status_code == 200

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServePod]:
    root = tmp_path_factory.mktemp("kserve-pod")
    started = KServePod(root, ASSETS / "double_handler.py").start()
    try:
        wait_for(started.ready, 60, "the model to be ready")
        yield started
    finally:
        assert started.stop() == 0, started.log.read_text()


def test_kserve_start_serves_v1(pod: KServePod) -> None:
    assert http.get(f"{pod.url}/v1/models").json() == {"models": ["double"]}
    status = http.get(f"{pod.url}/v1/models/double").json()
    assert (status["name"], status["ready"]) == ("double", True)
    response = http.post(f"{pod.url}/v1/models/double:predict", json={"instances": [{"data": [1, 2]}, {"data": [3]}]})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [[2.0, 4.0], [6.0]]}


def test_kserve_start_serves_v2(pod: KServePod) -> None:
    request = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3], "data": [0.5, 1, 2]}]}
    response = http.post(f"{pod.url}/v2/models/double/infer", json=request)
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert (output["name"], output["shape"], output["data"]) == ("OUTPUT0", [3], [1.0, 2.0, 4.0])


def test_kserve_start_serves_grpc_v2_on_the_h2c_port(pod: KServePod) -> None:
    async def call() -> Any:
        async with InferenceGRPCClient(f"127.0.0.1:{pod.grpc_port}", retries=2) as client:  # type: ignore[attr-defined]
            assert await client.is_server_ready() and await client.is_model_ready("double")
            tensor = InferInput(name="INPUT0", shape=[2], datatype="FP32", data=[1.5, -1.0])
            return await client.infer(InferRequest(model_name="double", infer_inputs=[tensor]))

    response = asyncio.run(call())
    assert response.outputs[0].as_numpy().tolist() == [3.0, -2.0]


def test_kserve_model_snapshot_settings_apply(pod: KServePod) -> None:
    # The management API moved to loopback on its configured port; model_snapshot's values are
    # the model's settings, as TorchServe applies them.
    [described] = http.get(f"http://127.0.0.1:{pod.management_port}/models/double").json()
    assert (described["batchSize"], described["maxBatchDelay"], described["minWorkers"], described["maxWorkers"]) == (
        4, 10, 1, 5,
    )  # fmt: skip
    assert [w["status"] for w in described["workers"]] == ["READY"]


def test_kserve_metrics_port_and_nothing_else_beyond_loopback(pod: KServePod) -> None:
    metrics = http.get(f"http://127.0.0.1:{pod.metrics_port}/metrics")
    assert metrics.status_code == 200 and "marserve_queue_duration_seconds" in metrics.text
    # TorchServe's port behind KServe's wrapper is not marserve's: nothing listens on 0.0.0.0:8085
    # for this pod (the management API went to loopback), and no token is asked for.
    listening = Path("/proc/net/tcp").read_text()
    management_hex = f"0100007F:{pod.management_port:04X}"
    assert management_hex in listening
    assert f"00000000:{pod.management_port:04X}" not in listening
    assert not (pod.root / "key_file.json").exists()


def test_readiness_waits_for_the_models_and_sigterm_drains(tmp_path: Path) -> None:
    # A model that takes two seconds to load and one and a half to answer (it echoes).
    handler = tmp_path / "slow_handler.py"
    handler.write_text((ASSETS / "mgmt_slow_load_handler.py").read_text().replace(
        "return [row.get", "time.sleep(1.5)\n    return [row.get"
    ))  # fmt: skip
    pod = KServePod(tmp_path, handler).start()
    try:
        # Live at once, ready only once the model is.
        assert http.get(f"{pod.url}/v2/health/ready").status_code == 503
        wait_for(pod.ready, 60, "the model to be ready")
        answers: list[httpx.Response] = []
        in_flight = threading.Thread(
            target=lambda: answers.append(http.post(f"{pod.url}/v1/models/double:predict", json={"instances": [{"data": [1]}]}))
        )
        in_flight.start()
        time.sleep(0.5)  # the request has reached the worker
        assert pod.process is not None
        signalled = time.monotonic()
        pod.process.send_signal(signal.SIGTERM)
        # It stops accepting at once...
        wait_for(lambda: _refused(pod.url), 10, "the port to close")
        in_flight.join(30)
        # ...and what was in flight is answered, then the server exits 0, well within KServe's
        # and Kubernetes' default grace of 30 s.
        assert [a.status_code for a in answers] == [200]
        assert answers[0].json() == {"predictions": [[1]]}  # the slow model echoes
        assert pod.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 15
    finally:
        pod.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/v2/health/live", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


# -- the pieces, without a server --------------------------------------------------------------


def test_kserve_is_recognised_by_its_runtimes_variables() -> None:
    assert is_kserve({"PROTOCOL_VERSION": "v1"})
    assert is_kserve({"TS_SERVICE_ENVELOPE": "kservev2"}) and is_kserve({"TS_SERVICE_ENVELOPE": "KServe"})
    assert not is_kserve({"TS_SERVICE_ENVELOPE": "json"}) and not is_kserve({})


def test_container_main_process() -> None:
    assert is_container_main(1, 0) and is_container_main(7, 1)
    assert not is_container_main(4242, 4000)


def test_kserve_overrides_move_the_ports() -> None:
    # KServe's sample: inference and management share 8085; management goes to loopback on 8085.
    config = ServerConfig.from_properties(
        {"inference_address": "http://0.0.0.0:8085", "management_address": "http://0.0.0.0:8085", "grpc_management_port": "7071"}
    )
    assert kserve_overrides(config, 8080, 8081, 8082) == {
        "inference_address": "http://0.0.0.0:8080",
        "management_address": "http://127.0.0.1:8085",
        "metrics_address": "http://0.0.0.0:8082",
        "grpc_inference_address": "0.0.0.0",
        "grpc_inference_port": "8081",
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": "7071",
        "disable_token_authorization": "true",
    }
    # Defaults: management's 8081 is KServe's gRPC port, so it moves; explicit tokens stay.
    moved = kserve_overrides(ServerConfig.from_properties({"disable_token_authorization": "false"}), 8080, 8081, 8082)
    assert moved["management_address"] == "http://127.0.0.1:8085" and "disable_token_authorization" not in moved


def test_torchserve_flags_that_marserve_ignores_are_named(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "marserve-torchserve"), "--start", "--workflow-store", "wf", "--model-store", str(tmp_path / "none")],
        capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "torchserve: warning: --workflow-store is ignored by marserve",
        f"torchserve: error: --model-store directory not found: {tmp_path / 'none'}",
    ]
