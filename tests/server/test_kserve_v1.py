"""KServe's v1 protocol on the inference port: with httpx for the wire shapes and errors, and with
KServe's own REST client (kserve.InferenceRESTClient)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kserve import InferenceRESTClient, RESTConfig

from tests.conftest import Model, Server, ServerFactory, make_mar

http = httpx.Client(timeout=60)

INSTANCES = {"instances": [{"data": "a"}, {"data": "b"}]}


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture(scope="module")
def v1(start_module_server: ServerFactory) -> Server:
    # The server's own envelope is another protocol's: the v1 routes must not care.
    models = [Model("echo", "echo_handler.py"), Model("idle", "echo_handler.py", initial_workers=0)]
    return start_module_server("service_envelope=kservev2\n", models, name="kserve-v1")


def url(server: Server, path: str) -> str:
    return f"{server.inference}{path}"


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    return str(body["error"])


def test_list_models(v1: Server) -> None:
    response = http.get(url(v1, "/v1/models"))
    assert (response.status_code, response.json()) == (200, {"models": ["echo", "idle"]})


def test_model_status(v1: Server) -> None:
    response = http.get(url(v1, "/v1/models/echo"))
    # KServe's name and ready, and TF Serving's model_version_status beside them.
    status = {"error_code": "OK", "error_message": ""}
    echo = {"name": "echo", "ready": True, "model_version_status": [{"version": "1.0", "state": "AVAILABLE", "status": status}]}
    assert (response.status_code, response.json()) == (200, echo)
    response = http.get(url(v1, "/v1/models/idle"))
    idle = {"name": "idle", "ready": False, "model_version_status": [{"version": "1.0", "state": "LOADING", "status": status}]}
    assert (response.status_code, response.json()) == (503, idle)
    assert error(http.get(url(v1, "/v1/models/nope")), 404) == "Model not found: nope"


def test_wrong_verbs_methods_and_paths(v1: Server) -> None:
    error(http.get(url(v1, "/v1/models/echo:predict")), 405)
    error(http.post(url(v1, "/v1/models/echo"), json=INSTANCES), 405)
    error(http.post(url(v1, "/v1/models/echo:train"), json=INSTANCES), 404)
    error(http.get(url(v1, "/v1/elsewhere")), 404)
    # The colon may come percent-encoded.
    assert error(http.post(url(v1, "/v1/models/nope%3Apredict"), json=INSTANCES), 404) == "Model not found: nope"


def test_no_worker_is_503_in_the_dialect(v1: Server) -> None:
    message = error(http.post(url(v1, "/v1/models/idle:predict"), json=INSTANCES), 503)
    assert message.startswith('Model "idle" has no worker to serve inference request.')


def test_requests_are_counted_as_predictions_are(v1: Server) -> None:
    http.post(url(v1, "/v1/models/idle:predict"), json=INSTANCES)
    scrape = http.get(f"{v1.metrics}/metrics", params={"name[]": "ts_inference_requests_total"}).text
    assert 'ts_inference_requests_total{model_name="idle",model_version="default",' in scrape


def test_predict(v1: Server) -> None:
    response = http.post(url(v1, "/v1/models/echo:predict"), json=INSTANCES)
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": ["a", "b"]}


def test_explain(v1: Server) -> None:
    response = http.post(url(v1, "/v1/models/echo:explain"), json=INSTANCES)
    assert response.status_code == 200, response.text
    assert response.json() == {"explanations": ["a", "b"]}


# -- KServe's client -----------------------------------------------------------------------------


async def _with_client(action: Any) -> Any:
    client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60))
    try:
        return await action(client)
    finally:
        await client.close()


def test_kserve_model_ready(v1: Server) -> None:
    async def check(client: InferenceRESTClient) -> None:
        assert await client.is_model_ready(v1.inference, "echo") is True
        assert await client.is_model_ready(v1.inference, "idle") is False

    asyncio.run(_with_client(check))


def test_kserve_infer_and_explain(v1: Server) -> None:
    async def run(client: InferenceRESTClient) -> tuple[Any, Any]:
        predicted = await client.infer(v1.inference, INSTANCES, model_name="echo")
        explained = await client.explain(v1.inference, "echo", INSTANCES)
        return predicted, explained

    predicted, explained = asyncio.run(_with_client(run))
    assert predicted == {"predictions": ["a", "b"]}
    assert explained == {"explanations": ["a", "b"]}


def test_kserve_errors_name_the_problem(v1: Server) -> None:
    async def infer(client: InferenceRESTClient) -> Any:
        return await client.infer(v1.inference, INSTANCES, model_name="nope")

    with pytest.raises(httpx.HTTPStatusError) as raised:
        asyncio.run(_with_client(infer))
    assert raised.value.response.status_code == 404
    assert "Model not found: nope" in str(raised.value)


def test_v1_routes_need_the_inference_key(start_server: ServerFactory) -> None:
    srv = start_server("disable_token_authorization=false\n", name="v1-auth")
    keys = json.loads((srv.root / "key_file.json").read_text())
    make_mar(srv.store, "echo", "echo_handler.py")
    with httpx.Client(timeout=30) as client:
        registered = client.post(
            f"{srv.management}/models", params={"url": "echo.mar"},
            headers={"Authorization": f"Bearer {keys['management']['key']}"},
        )  # fmt: skip
        assert registered.status_code == 200, registered.text
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/echo"), ("POST", "/v1/models/echo:predict")):
            refused = client.request(method, url(srv, path))
            assert error(refused, 401).startswith("Token Authentication failed"), path
        allowed = client.get(url(srv, "/v1/models/echo"), headers={"Authorization": f"Bearer {keys['inference']['key']}"})
        assert allowed.json()["ready"] is True
