"""Triton's gRPC client (tritonclient.grpc) against a real server: health, metadata, inference
with raw tensors (FP32, FP16, BF16) and typed ones (through tritonclient's generated stubs), and
the status codes of bad requests. The client runs in a
process of its own (tests/assets/grpc/triton_client.py says why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Model, ServerFactory
from tests.server.test_grpc import grpc_config, tensor_models

CLIENT = Path(__file__).parents[1] / "assets" / "grpc" / "triton_client.py"


@pytest.fixture(scope="module")
def answers(start_module_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config, inference, _ = grpc_config(max_request_size=100000)
    models = [*tensor_models(tmp_path_factory.mktemp("triton-files")), Model("idle", "echo_handler.py", initial_workers=0)]
    start_module_server(config, models, name="grpc-triton")
    done = subprocess.run([sys.executable, str(CLIENT), f"127.0.0.1:{inference}"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_health_and_metadata(answers: dict[str, Any]) -> None:
    assert (answers["live"], answers["ready"], answers["model_ready"], answers["idle_ready"]) == (True, True, True, False)
    assert answers["server_metadata"]["name"] == "marserve"
    assert answers["server_metadata"]["extensions"] == ["binary_tensor_data"]
    metadata = answers["model_metadata"]
    assert metadata["name"] == "double" and metadata["versions"] == ["1.0"] and metadata["platform"] == "pytorch_torchserve"
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1"]}]


def test_infer_raw_tensors(answers: dict[str, Any]) -> None:
    assert answers["fp32"] == {"data": [2.0, 4.0, 6.0, 8.0], "dtype": "float32", "id": "r-1", "model_version": "1.0", "raw": 1}
    assert answers["fp16"] == {"data": [1.0, 3.0, -4.0], "dtype": "float16"}
    assert answers["bf16"] == {"data": [2.0, 5.0, -6.0]}


def test_infer_typed_tensors(answers: dict[str, Any]) -> None:
    # Typed in, raw out, as Triton answers: the output in raw_output_contents, none in its contents field.
    assert answers["typed"] == {"id": "typed-1", "output": ["OUTPUT0", "FP32", [3]], "typed": 0, "data": [1.0, -2.0, 6.0]}


def test_bad_requests_get_their_status_codes(answers: dict[str, Any]) -> None:
    errors = answers["errors"]
    assert errors["unknown_model"] == {"status": "StatusCode.NOT_FOUND", "message": "Model not found: nope"}
    assert errors["wrong_dtype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "must be FP32, not INT32" in errors["wrong_dtype"]["message"]
    assert errors["wrong_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "the model takes [-1]" in errors["wrong_shape"]["message"]
    assert errors["no_worker"]["status"] == "StatusCode.UNAVAILABLE"
    assert errors["too_large"]["status"] == "StatusCode.RESOURCE_EXHAUSTED"
    assert errors["unknown_metadata"]["status"] == "StatusCode.NOT_FOUND"
