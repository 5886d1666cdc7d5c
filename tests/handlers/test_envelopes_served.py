"""TorchServe's request envelopes on a served model, and KServe's requests to an existing handler.

The digits example (an ``ImageClassifier`` subclass written for TorchServe, nothing marserve-specific)
is served with ``service_envelope`` set as KServe's TorchServe runtime sets it, and answers the
requests of surface §4.6 on ``/predictions``. The v1 and v2 routes' own envelopes (``kserve``,
``oip``, chosen per request) are driven through the worker's Service with the same handler.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.workers.child.loader import load_handler
from server.workers.child.service import Service
from tests.conftest import Server, ServerFactory
from tests.handlers.conftest import make_context
from tests.server.test_envelopes import Req, run

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SAMPLES = sorted((DIGITS / "samples").glob("digit_*.png"))
ARCHIVER = Path(sys.executable).parent / "model-archiver"


def truth(sample: Path) -> str:
    return sample.stem.removeprefix("digit_")


def b64(sample: Path) -> str:
    return base64.b64encode(sample.read_bytes()).decode()


def pixels(sample: Path) -> list[float]:
    """The 1x8x8 tensor the handler's transforms make of a sample, flattened (as a v2 client sends it)."""
    image = Image.open(sample).convert("L").resize((8, 8), Image.BOX)
    values: list[float] = (np.asarray(image, dtype=np.float32) / 255.0).reshape(-1).tolist()
    return values


def archive(store: Path, name: str = "digits", *, fmt: str = "default") -> None:
    subprocess.run(
        [
            str(ARCHIVER), "--model-name", name, "--version", "1.0",
            "--model-file", str(DIGITS / "model.py"), "--serialized-file", str(DIGITS / "digits.pt"),
            "--handler", str(DIGITS / "digits_handler.py"), "--extra-files", str(DIGITS / "index_to_name.json"),
            "--export-path", str(store), "--archive-format", fmt,
        ],
        check=True,
    )  # fmt: skip


ServedFactory = Callable[[str], Server]


@pytest.fixture(scope="module")
def served(start_module_server: ServerFactory) -> ServedFactory:
    """``served(envelope)``: a server whose config sets ``service_envelope``, digits registered (once each)."""
    servers: dict[str, Server] = {}

    def get(envelope: str) -> Server:
        if envelope not in servers:
            if envelope == "env:kservev2":
                # As KServe's runtime sets it: TS_SERVICE_ENVELOPE with enable_envvars_config.
                server = start_module_server(
                    config="enable_envvars_config=true\n", env={"TS_SERVICE_ENVELOPE": "kservev2"}, name="envvar"
                )
            else:
                server = start_module_server(config=f"service_envelope={envelope}\n", name=envelope)
            archive(server.store)
            reply = server.register("digits.mar", batch_size=4, max_batch_delay=50)
            assert reply.status_code == 200, reply.text
            servers[envelope] = server
        return servers[envelope]

    return get


def post(server: Server, body: Any, path: str = "predictions") -> Any:
    content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    headers = {"content-type": "application/json"} if not isinstance(body, bytes) else {}
    return server.http.post(f"{server.inference}/{path}/digits", content=content, headers=headers)


def test_kserve_v1(served: ServedFactory) -> None:
    server = served("kserve")
    response = post(server, {"instances": [{"data": b64(SAMPLES[2])}]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    (prediction,) = response.json()["predictions"]
    assert next(iter(prediction)) == "2" and len(prediction) == 5
    # Several instances in one request, and several requests batched together (which TorchServe,
    # reading request 0 only, fails with 503): each request gets its own predictions.
    bodies = [{"instances": [{"data": b64(s)} for s in SAMPLES[i : i + 2]]} for i in range(0, 8, 2)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: post(server, body), bodies))
    for i, reply in enumerate(replies):
        assert reply.status_code == 200, reply.text
        assert [next(iter(p)) for p in reply.json()["predictions"]] == [truth(s) for s in SAMPLES[2 * i : 2 * i + 2]]


def test_kserve_v1_explanations(served: ServedFactory) -> None:
    response = post(served("kserve"), {"instances": [{"data": b64(SAMPLES[3])}]}, "explanations")
    assert response.status_code == 200, response.text
    (attributions,) = response.json()["explanations"]
    assert len(attributions) == 1 and len(attributions[0]) == 8 and all(len(row) == 8 for row in attributions[0])


@pytest.mark.parametrize("envelope", ["kservev2", "env:kservev2"])
def test_kserve_v2(served: ServedFactory, envelope: str) -> None:
    server = served(envelope)
    sample = SAMPLES[7]
    request = {"id": "my-id", "inputs": [{"name": "input-0", "shape": [1, 8, 8], "datatype": "FP32", "data": pixels(sample)}]}
    response = post(server, request)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert list(reply) == ["id", "model_name", "model_version", "outputs"]
    assert (reply["id"], reply["model_name"], reply["model_version"]) == ("my-id", "digits", "1.0")
    (output,) = reply["outputs"]
    # TorchServe's kservev2 names an output after its input and flattens it; a dict is BYTES.
    assert (output["name"], output["datatype"], output["shape"]) == ("input-0", "BYTES", [1])
    assert next(iter(output["data"][0])) == truth(sample)
    # Without an id, the request's own.
    del request["id"]
    response = post(server, request)
    assert response.json()["id"] == response.headers["x-request-id"]


def test_json(served: ServedFactory) -> None:
    server = served("json")
    response = post(server, {"instances": [{"b64": b64(SAMPLES[4])}, {"b64": b64(SAMPLES[5])}]})
    assert response.status_code == 200, response.text
    # json.dumps' text, as the envelope returns it: the handler set no content type.
    assert "content-type" not in response.headers
    assert response.text.startswith('{"predictions": [{"4": ')
    assert [next(iter(p)) for p in response.json()["predictions"]] == ["4", "5"]


def test_body(served: ServedFactory) -> None:
    server = served("body")
    response = server.http.put(f"{server.inference}/predictions/digits", content=SAMPLES[6].read_bytes())
    assert response.status_code == 200, response.text
    assert next(iter(response.json())) == "6"
    response = server.http.post(f"{server.inference}/predictions/digits", files={"data": ("d.png", SAMPLES[1].read_bytes())})
    assert next(iter(response.json())) == "1"


def test_the_manifest_names_the_envelope_unless_the_config_does(start_server: ServerFactory) -> None:
    server = start_server(name="manifest")
    for name, envelope in (("withenv", "kserve"), ("plain", None)):
        archive(server.store, name, fmt="no-archive")
        manifest_path = server.store / name / "MAR-INF" / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text())
        if envelope:
            manifest["model"]["envelope"] = envelope
        manifest_path.write_text(json.dumps(manifest))
        assert server.register(name).status_code == 200
    body = json.dumps({"instances": [{"data": b64(SAMPLES[8])}]})
    response = server.http.post(f"{server.inference}/predictions/withenv", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert next(iter(response.json()["predictions"][0])) == "8"
    # A model without one is served as ever.
    response = server.http.put(f"{server.inference}/predictions/plain", content=SAMPLES[8].read_bytes())
    assert next(iter(response.json())) == "8"
    # service_envelope wins over the manifest.
    other = start_server(config="service_envelope=body\n", name="configwins")
    shutil.copytree(server.store / "withenv", other.store / "withenv")
    assert other.register("withenv").status_code == 200
    response = other.http.put(f"{other.inference}/predictions/withenv", content=SAMPLES[8].read_bytes())
    assert next(iter(response.json())) == "8"


# -- the routes' envelopes, per request, with the same handler ----------------------------------------


@pytest.fixture
def digits_service(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Service:
    for name in ("digits_handler.py", "model.py", "digits.pt", "index_to_name.json"):
        shutil.copy(DIGITS / name, model_dir / name)
    monkeypatch.chdir(model_dir)
    monkeypatch.syspath_prepend(str(model_dir))
    context = make_context(model_dir, {"serializedFile": "digits.pt", "modelFile": "model.py", "modelVersion": "1.0"})
    initialize, entry = load_handler("digits_handler.py")
    initialize(context)
    return Service(entry, context, decode_input_request=True)


def test_plain_v1_and_v2_requests_batch_together_on_an_existing_handler(digits_service: Service) -> None:
    flat = pixels(SAMPLES[9])
    head = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}],
                       "outputs": [{"name": "input-0"}]}).encode()  # fmt: skip
    binary = Req(
        head + np.array(flat, "<f4").tobytes(), "application/octet-stream", envelope="oip",
        headers=[("inference-header-content-length", str(len(head)))],
    )  # fmt: skip
    result, parts = run(
        digits_service,
        Req(SAMPLES[0].read_bytes(), None),
        Req(json.dumps({"instances": [{"data": b64(SAMPLES[1])}, {"data": b64(SAMPLES[2])}]}).encode(), envelope="kserve"),
        Req(json.dumps({"id": "v2", "inputs": [{"name": "input-0", "shape": [1, 8, 8], "datatype": "FP32", "data": flat}]}).encode(),
            envelope="oip"),
        binary,
    )  # fmt: skip
    assert result.code == 200, result.message
    assert [r.status for r in result.responses] == [200, 200, 200, 200]
    assert next(iter(json.loads(parts[0]))) == "0"
    assert [next(iter(p)) for p in json.loads(parts[1])["predictions"]] == ["1", "2"]
    v2 = json.loads(parts[2])
    assert (v2["id"], v2["model_name"], v2["model_version"]) == ("v2", "m", "1.0")
    (output,) = v2["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("input-0", "BYTES", [1])
    assert next(iter(output["data"][0])) == "9"
    # The same tensor sent as binary gives the same answer (to the last bits, which CPU kernels vary
    # with the row's place in the batch).
    (same,) = json.loads(parts[3])["outputs"]
    assert {k: v for k, v in same.items() if k != "data"} == {k: v for k, v in output.items() if k != "data"}
    assert list(same["data"][0]) == list(output["data"][0])
    assert list(same["data"][0].values()) == pytest.approx(list(output["data"][0].values()), abs=1e-5)


def test_a_row_the_handler_rejects_is_its_v2_requests_error(digits_service: Service) -> None:
    bad = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["not an image"]}]}
    result, parts = run(digits_service, Req(SAMPLES[5].read_bytes(), None), Req(json.dumps(bad).encode(), envelope="oip"))
    assert [r.status for r in result.responses] == [200, 400]
    assert list(json.loads(parts[1])) == ["error"]
    assert next(iter(json.loads(parts[0]))) == "5"
