"""The Open Inference Protocol's REST API (v2) against a real server: with httpx for the exact
wire shapes and errors, and with clients we did not write: Triton's (tritonclient.http) and
KServe's (kserve.InferenceRESTClient)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferInput, InferRequest, InferenceRESTClient, RESTConfig
from tritonclient.utils import InferenceServerException

from server.apis import oip
from server.version import marserve_version
from tests.conftest import Model, Server, ServerFactory, make_mar

# Doubles its one input tensor, however the envelope hands it over: a row with the tensor under
# "data" (TorchServe's kservev2 shape), raw little-endian FP32 bytes, or the tensor by its name.
DOUBLE_HANDLER = """
import numpy as np


def _tensor(row):
    value = row
    if isinstance(row, dict):
        value = row.get("data")
        if value is None:
            value = row.get("body")
        if value is None:
            value = next(iter(row.values()))
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(bytes(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def handle(data, context):
    if data is None:
        return None
    return [(_tensor(row) * 2).flatten().tolist() for row in data]
"""

SIGNATURE = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1]}],
}

http = httpx.Client(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture(scope="module")
def v2(start_module_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> Server:
    files = tmp_path_factory.mktemp("oip-files")
    handler = files / "double_handler.py"
    handler.write_text(DOUBLE_HANDLER)
    config = files / "double.yaml"
    config.write_text(json.dumps({"oip": SIGNATURE}))  # JSON is YAML
    models = [
        Model("double", str(handler), archive={"config_file": str(config)}),
        Model("echo", "echo_handler.py", version="1.0"),
        Model("echo", "echo_handler.py", version="2.0"),
        Model("idle", "echo_handler.py", initial_workers=0),
    ]
    return start_module_server("max_request_size=100000\n", models, name="oip")


def url(server: Server, path: str) -> str:
    return f"{server.inference}{path}"


def host(server: Server) -> str:
    return server.inference.removeprefix("http://")


def error(response: httpx.Response, status: int) -> str:
    """The message of an OIP error: ``{"error": "..."}`` as JSON with the status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str)
    return body["error"]


# -- server metadata and health ------------------------------------------------------------------


def test_server_metadata(v2: Server) -> None:
    response = http.get(url(v2, "/v2"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"name": "marserve", "version": marserve_version(), "extensions": ["binary_tensor_data"]}
    # A trailing slash is the same path, as everywhere on marserve.
    assert http.get(url(v2, "/v2/")).json() == response.json()


def test_live_and_ready(v2: Server) -> None:
    assert http.get(url(v2, "/v2/health/live")).json() == {"live": True}
    response = http.get(url(v2, "/v2/health/ready"))
    # "idle" has no workers by choice: it does not hold the server back.
    assert (response.status_code, response.json()) == (200, {"ready": True})


def test_model_ready(v2: Server) -> None:
    for path in ("/v2/models/echo/ready", "/v2/models/echo/versions/2.0/ready"):
        response = http.get(url(v2, path))
        assert (response.status_code, response.json()) == (200, {"name": "echo", "ready": True}), path
    response = http.get(url(v2, "/v2/models/idle/ready"))
    assert (response.status_code, response.json()) == (503, {"name": "idle", "ready": False})


# -- model metadata ------------------------------------------------------------------------------


def test_model_metadata_from_the_signature(v2: Server) -> None:
    response = http.get(url(v2, "/v2/models/double"))
    assert response.status_code == 200
    assert response.json() == {"name": "double", "versions": ["1.0"], "platform": "pytorch_torchserve", **SIGNATURE}


def test_model_metadata_without_a_signature_lists_no_tensors(v2: Server) -> None:
    expected = {"name": "echo", "versions": ["1.0", "2.0"], "platform": "pytorch_torchserve", "inputs": [], "outputs": []}
    assert http.get(url(v2, "/v2/models/echo")).json() == expected
    assert http.get(url(v2, "/v2/models/echo/versions/2.0")).json() == expected


def test_unknown_model_and_version_are_404(v2: Server) -> None:
    assert error(http.get(url(v2, "/v2/models/nope")), 404) == "Model not found: nope"
    assert error(http.get(url(v2, "/v2/models/nope/ready")), 404) == "Model not found: nope"
    missing = "Model version: 9.9 does not exist for model: echo"
    assert error(http.get(url(v2, "/v2/models/echo/versions/9.9")), 404) == missing
    assert error(http.post(url(v2, "/v2/models/echo/versions/9.9/infer"), content=b"{}"), 404) == missing
    assert error(http.post(url(v2, "/v2/models/nope/infer"), content=b"{}"), 404) == "Model not found: nope"
    # The model is looked up before the body is looked at.
    assert error(http.post(url(v2, "/v2/models/nope/infer")), 404) == "Model not found: nope"


def test_unknown_paths_and_methods_answer_in_the_dialect(v2: Server) -> None:
    error(http.get(url(v2, "/v2/nothing/here")), 404)
    error(http.get(url(v2, "/v2/models/echo/infer")), 405)
    error(http.post(url(v2, "/v2/models/echo")), 405)
    error(http.delete(url(v2, "/v2")), 405)


# -- what the frontend refuses before the worker sees it ----------------------------------------


def test_binary_header_must_lie_within_the_body(v2: Server) -> None:
    infer = url(v2, "/v2/models/echo/infer")
    body = b'{"inputs": []}'
    message = error(http.post(infer, content=body, headers={"Inference-Header-Content-Length": "100"}), 400)
    assert message == f"Inference-Header-Content-Length 100 must be between 1 and the body's length ({len(body)} bytes)"
    error(http.post(infer, content=body, headers={"Inference-Header-Content-Length": "0"}), 400)
    message = error(http.post(infer, content=body, headers={"Inference-Header-Content-Length": "-3"}), 400)
    assert message == "Inference-Header-Content-Length must be a number of bytes, not '-3'"


def test_an_empty_or_compressed_body_is_refused(v2: Server) -> None:
    infer = url(v2, "/v2/models/echo/infer")
    assert "no body" in error(http.post(infer), 400)
    message = error(http.post(infer, content=b"\x1f\x8b", headers={"Content-Encoding": "gzip"}), 415)
    assert message == "Content-Encoding gzip is not supported: send the inference request uncompressed"


def test_a_body_over_max_request_size_is_413_in_the_dialect(v2: Server) -> None:
    message = error(http.post(url(v2, "/v2/models/echo/infer"), content=b"x" * 100_001), 413)
    assert "max_request_size (100000)" in message


def test_a_model_without_workers_is_503_in_the_dialect(v2: Server) -> None:
    message = error(http.post(url(v2, "/v2/models/idle/infer"), content=b'{"inputs": []}'), 503)
    assert message.startswith('Model "idle" has no worker to serve inference request.')


# -- inference -----------------------------------------------------------------------------------

REQUEST = {
    "id": "42",
    "inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1.0, 2.0, 3.5, -4.0]}],
}


def test_infer_json(v2: Server) -> None:
    for path, version in (("/v2/models/double/infer", "1.0"), ("/v2/models/double/versions/1.0/infer", "1.0")):
        response = http.post(url(v2, path), json=REQUEST)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("double", version, "42")
        [output] = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("OUTPUT0", "FP32", [4])
        assert output["data"] == [2.0, 4.0, 7.0, -8.0]


def test_malformed_request_is_400_from_the_worker(v2: Server) -> None:
    error(http.post(url(v2, "/v2/models/double/infer"), content=b"{not json"), 400)


def test_explain_reaches_the_handler(v2: Server) -> None:
    response = http.post(url(v2, "/v2/models/double/explain"), json=REQUEST)
    assert response.status_code == 200, response.text


# -- Triton's client -----------------------------------------------------------------------------


@pytest.fixture
def triton_client(v2: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=host(v2), network_timeout=60.0)
    yield client
    client.close()


def test_triton_health_and_metadata(v2: Server, triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("double")
    assert triton_client.is_model_ready("echo", "2.0")
    assert not triton_client.is_model_ready("idle")
    assert not triton_client.is_model_ready("nope")
    assert triton_client.get_server_metadata() == {
        "name": "marserve", "version": marserve_version(), "extensions": ["binary_tensor_data"],
    }  # fmt: skip
    metadata = triton_client.get_model_metadata("double")
    assert metadata == {"name": "double", "versions": ["1.0"], "platform": "pytorch_torchserve", **SIGNATURE}
    assert triton_client.get_model_metadata("double", "1.0") == metadata
    with pytest.raises(InferenceServerException) as raised:
        triton_client.get_model_metadata("nope")
    assert (raised.value.status(), raised.value.message()) == ("404", "Model not found: nope")


def _triton_infer(client: triton.InferenceServerClient, binary: bool) -> triton.InferResult:
    values = np.array([1.0, 2.0, 3.5, -4.0], dtype=np.float32)
    tensor = triton.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(values, binary_data=binary)
    wanted = triton.InferRequestedOutput("OUTPUT0", binary_data=binary)
    return client.infer("double", [tensor], outputs=[wanted], request_id="7")


def test_triton_infer_json(triton_client: triton.InferenceServerClient) -> None:
    result = _triton_infer(triton_client, binary=False)
    assert result.as_numpy("OUTPUT0").tolist() == [2.0, 4.0, 7.0, -8.0]
    response = result.get_response()
    assert (response["model_name"], response["id"]) == ("double", "7")
    assert "parameters" not in response["outputs"][0] or "binary_data_size" not in response["outputs"][0]["parameters"]


def test_triton_infer_binary(triton_client: triton.InferenceServerClient) -> None:
    result = _triton_infer(triton_client, binary=True)
    output = result.as_numpy("OUTPUT0")
    assert output.dtype == np.float32
    assert output.tolist() == [2.0, 4.0, 7.0, -8.0]
    [described] = result.get_response()["outputs"]
    assert described["parameters"]["binary_data_size"] == 16
    assert "data" not in described


def test_triton_infer_errors_come_back_as_exceptions(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        triton_client.infer("nope", [tensor])
    assert (raised.value.status(), raised.value.message()) == ("404", "Model not found: nope")


# -- KServe's client -----------------------------------------------------------------------------


def _kserve(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _with_client(action: Any) -> Any:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        return await action(client)
    finally:
        await client.close()


def test_kserve_health(v2: Server) -> None:
    base = v2.inference

    async def check(client: InferenceRESTClient) -> None:
        assert await client.is_server_live(base) is True
        assert await client.is_server_ready(base) is True
        assert await client.is_model_ready(base, "double") is True
        assert await client.is_model_ready(base, "idle") is False

    _kserve(_with_client(check))


def _kserve_request(binary: bool) -> InferRequest:
    values = np.array([1.0, 2.0, 3.5, -4.0], dtype=np.float32)
    tensor = InferInput(name="INPUT0", shape=[4], datatype="FP32")
    tensor.set_data_from_numpy(values, binary_data=binary)
    return InferRequest(model_name="double", infer_inputs=[tensor], request_id="k1")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_infer(v2: Server, binary: bool) -> None:
    async def infer(client: InferenceRESTClient) -> Any:
        return await client.infer(v2.inference, _kserve_request(binary), model_name="double")

    response = _kserve(_with_client(infer))
    assert (response.model_name, response.id) == ("double", "k1")
    [output] = response.outputs
    assert output.name == "OUTPUT0"
    assert output.as_numpy().tolist() == [2.0, 4.0, 7.0, -8.0]


def test_kserve_infer_error_names_the_problem(v2: Server) -> None:
    async def infer(client: InferenceRESTClient) -> Any:
        return await client.infer(v2.inference, _kserve_request(False), model_name="nope")

    with pytest.raises(httpx.HTTPStatusError) as raised:
        _kserve(_with_client(infer))
    assert raised.value.response.status_code == 404
    assert "Model not found: nope" in str(raised.value)


# -- tokens --------------------------------------------------------------------------------------


def test_probes_are_open_and_the_rest_needs_the_inference_key(start_server: ServerFactory) -> None:
    srv = start_server("disable_token_authorization=false\n", name="oip-auth")
    keys = json.loads((srv.root / "key_file.json").read_text())
    key = keys["inference"]["key"]
    make_mar(srv.store, "echo", "echo_handler.py")
    with httpx.Client(timeout=30) as client:
        registered = client.post(
            f"{srv.management}/models", params={"url": "echo.mar"},
            headers={"Authorization": f"Bearer {keys['management']['key']}"},
        )  # fmt: skip
        assert registered.status_code == 200, registered.text
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert client.get(url(srv, path)).status_code == 200, path
        for method, path in (
            ("GET", "/v2"), ("GET", "/v2/models/echo"), ("GET", "/v2/models/echo/ready"),
            ("POST", "/v2/models/echo/infer"), ("GET", "/v2/unknown"),
        ):  # fmt: skip
            refused = client.request(method, url(srv, path))
            assert refused.headers["www-authenticate"] == "Bearer"
            assert error(refused, 401).startswith("Token Authentication failed"), path
        allowed = client.get(url(srv, "/v2/models/echo/ready"), headers={"Authorization": f"Bearer {key}"})
        assert allowed.json() == {"name": "echo", "ready": True}
    triton_client = triton.InferenceServerClient(url=host(srv))
    try:
        assert triton_client.is_server_ready()
        assert not triton_client.is_model_ready("echo")
        assert triton_client.is_model_ready("echo", headers={"Authorization": f"Bearer {key}"})
    finally:
        triton_client.close()


# -- the signature, parsed -----------------------------------------------------------------------


@dataclasses.dataclass
class _Version:
    model_yaml_config: dict[str, Any]
    name: str = "m"
    version: str = "1.0"


def test_signature_platform_can_be_named() -> None:
    spec = {"oip": {**SIGNATURE, "platform": "pytorch_torchscript"}}
    inputs, outputs, platform = oip.signature(_Version(spec))  # type: ignore[arg-type]
    assert (inputs, outputs, platform) == (SIGNATURE["inputs"], SIGNATURE["outputs"], "pytorch_torchscript")
    assert oip.signature(_Version({})) == ([], [], "pytorch_torchserve")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ([1], "its model config's oip must be a mapping"),
        ({"inputs": {"name": "x"}}, "oip.inputs must be a list"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, "oip.inputs[0].datatype must be one of"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, -2]}]}, "oip.outputs[0].shape must be a list of integers"),
        ({"outputs": [{"datatype": "FP32", "shape": [1]}]}, "oip.outputs[0].name must be"),
        ({"platform": 3}, "oip.platform must be"),
    ],
)
def test_a_bad_signature_is_named(spec: Any, complaint: str) -> None:
    with pytest.raises(Exception) as raised:
        oip.signature(_Version({"oip": spec}))  # type: ignore[arg-type]
    assert complaint in str(raised.value)
    assert str(raised.value).startswith("model m version 1.0: ")
