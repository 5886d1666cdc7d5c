"""The inference API against a real server: routes, how bodies reach handlers, and what comes back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Model, Server, ServerFactory, make_mar

NO_WORKER_TAIL = (
    "has no worker to serve inference request. Please use scale workers API to add workers. "
    "If this is a sequence inference, please check if it is closed, or expired; or exceeds maxSequenceJobQueueSize"
)


# One client for the module: httpx's top-level functions build a TLS context per call (~50 ms).
http = httpx.Client(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture(scope="module")
def api(start_module_server: ServerFactory) -> Server:
    models = [
        # Two versions of one model; the archive file is rebuilt in between, which is safe
        # because registration extracts it.
        Model("types", "inf_types_handler.py", version="1.0"),
        Model("types", "inf_types_handler.py", version="2.0"),
        Model("echo", "echo_handler.py"),
    ]
    return start_module_server(models=models, name="api")


@pytest.fixture(scope="module")
def raw_api(start_module_server: ServerFactory) -> Server:
    models = [Model("types", "inf_types_handler.py")]
    return start_module_server("decode_input_request=false\n", models, name="raw")


def seen(response: httpx.Response) -> dict[str, Any]:
    """The types handler's report of one request."""
    assert response.status_code == 200, response.text
    return response.json()


def params(response: httpx.Response) -> dict[str, Any]:
    return seen(response)["params"]


def multipart(*parts: tuple[str, dict[str, str], bytes], boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    """A hand-built multipart body, for parts httpx cannot express (content type without filename)."""
    chunks = []
    for name, headers, value in parts:
        head = f'Content-Disposition: form-data; name="{name}"\r\n'
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        chunks.append(f"--{boundary}\r\n{head}\r\n".encode() + value + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# -- how inputs reach the handler (§3.1) ---------------------------------------------------------


def test_put_raw_body_is_bytearray(api: Server) -> None:
    # `curl -T file` sends a PUT with no Content-Type.
    response = http.put(f"{api.inference}/predictions/types", content=b"\x00\x01raw\xff")
    raw = b"\x00\x01raw\xff"
    assert params(response) == {
        "body": {"type": "bytearray", "len": 6, "sha256": hashlib.sha256(raw).hexdigest(), "value": raw.decode("latin-1")}
    }


def test_post_binary_body_is_intact(api: Server) -> None:
    blob = os.urandom(300_000)
    response = http.post(
        f"{api.inference}/predictions/types", content=blob, headers={"Content-Type": "application/octet-stream"}
    )
    body = params(response)["body"]
    assert (body["type"], body["len"], body["sha256"]) == ("bytearray", len(blob), hashlib.sha256(blob).hexdigest())


def test_empty_body_is_an_empty_bytearray(api: Server) -> None:
    response = http.post(f"{api.inference}/predictions/types")
    assert params(response)["body"]["type"] == "bytearray"
    assert params(response)["body"]["len"] == 0


def test_json_body_is_parsed(api: Server) -> None:
    response = http.post(f"{api.inference}/predictions/types", json={"instances": [1, 2], "s": "é"})
    assert params(response) == {"body": {"type": "dict", "value": {"instances": [1, 2], "s": "é"}}}
    with_charset = http.post(
        f"{api.inference}/predictions/types",
        content=b"[1]",
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert params(with_charset) == {"body": {"type": "list", "value": [1]}}


def test_invalid_json_stays_bytes(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert params(response)["body"]["type"] == "bytearray"
    assert params(response)["body"]["value"] == "{nope"


def test_text_body_is_str_unless_not_utf8(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types", content="héllo".encode(), headers={"Content-Type": "text/plain"}
    )
    assert params(response) == {"body": {"type": "str", "value": "héllo"}}
    broken = http.post(f"{api.inference}/predictions/types", content=b"\xff\xfe", headers={"Content-Type": "text/csv"})
    assert params(broken)["body"]["type"] == "bytearray"


def test_multipart_binary_file_is_intact(api: Server) -> None:
    blob = os.urandom(100 * 1024)
    response = http.post(
        f"{api.inference}/predictions/types", files={"data": ("blob.bin", blob, "application/octet-stream")}
    )
    data = params(response)["data"]
    assert (data["type"], data["len"], data["sha256"]) == ("bytearray", len(blob), hashlib.sha256(blob).hexdigest())


def test_multipart_decoding_follows_each_part_content_type(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types",
        data={"field": "plain value"},
        files={
            "text": ("a.txt", "naïve".encode(), "text/plain"),
            "doc": ("a.json", b'{"a": 1}', "application/json"),
            "img": ("a.png", b"\x89PNG", "image/png"),
        },
    )
    got = params(response)
    # A plain form field has no content type, so it stays bytes, as in TorchServe.
    assert (got["field"]["type"], got["field"]["value"]) == ("bytearray", "plain value")
    assert got["text"] == {"type": "str", "value": "naïve"}
    assert got["doc"] == {"type": "dict", "value": {"a": 1}}
    assert got["img"]["type"] == "bytearray"
    assert got["img"]["value"] == "\x89PNG"


def test_multipart_part_content_type_counts_without_filename(api: Server) -> None:
    blob = bytes(range(256)) * 8 + b"\r\n--b0und"  # not UTF-8, and close to the boundary
    body, headers = multipart(
        ("txt", {"Content-Type": "text/plain; charset=utf-8"}, "ünï".encode()),
        ("bin", {}, blob),
        ("empty", {}, b""),
    )
    got = params(http.post(f"{api.inference}/predictions/types", content=body, headers=headers))
    assert got["txt"] == {"type": "str", "value": "ünï"}
    assert (got["bin"]["type"], got["bin"]["sha256"]) == ("bytearray", hashlib.sha256(blob).hexdigest())
    assert (got["empty"]["type"], got["empty"]["len"]) == ("bytearray", 0)


def test_multipart_big_form_field_is_accepted(api: Server) -> None:
    # Browsers and curl `-F name=<file` send file contents as a plain field.
    blob = os.urandom(2 * 1024 * 1024)
    body, headers = multipart(("data", {}, blob))
    got = params(http.post(f"{api.inference}/predictions/types", content=body, headers=headers, timeout=30))
    assert (got["data"]["len"], got["data"]["sha256"]) == (len(blob), hashlib.sha256(blob).hexdigest())


def test_multipart_duplicate_names_last_wins(api: Server) -> None:
    body, headers = multipart(("data", {}, b"first"), ("data", {}, b"second"))
    got = params(http.post(f"{api.inference}/predictions/types", content=body, headers=headers))
    assert list(got) == ["data"]
    assert got["data"]["value"] == "second"


def test_malformed_multipart_is_400(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types",
        content=b"--x\r\nno headers end",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 400
    assert response.json()["type"] == "BadRequestException"
    missing = http.post(
        f"{api.inference}/predictions/types", content=b"whatever", headers={"Content-Type": "multipart/form-data"}
    )
    assert missing.status_code == 400


def test_urlencoded_fields_are_separate_params(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types",
        content=b"a=1&b=x+y%21&c=%C3%A9&d=%FF&flag",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    got = params(response)
    assert {name: (v["type"], v["value"]) for name, v in got.items()} == {
        "a": ("bytearray", "1"),
        "b": ("bytearray", "x y!"),
        "c": ("bytearray", "Ã©"),  # the UTF-8 bytes of é, shown as latin-1
        "d": ("bytearray", "\xff"),  # percent-escapes decode to the exact byte
        "flag": ("bytearray", ""),
    }


def test_decode_input_request_false_keeps_bytes(raw_api: Server) -> None:
    url = f"{raw_api.inference}/predictions/types"
    body = params(http.post(url, content=b'{"a": 1}', headers={"Content-Type": "application/json"}))["body"]
    assert (body["type"], body["value"]) == ("bytearray", '{"a": 1}')
    assert params(http.post(url, content=b"hi", headers={"Content-Type": "text/plain"}))["body"]["type"] == "bytearray"
    files = {"t": ("a.txt", b"hi", "text/plain"), "j": ("a.json", b"{}", "application/json")}
    got = params(http.post(url, files=files))
    assert {name: v["type"] for name, v in got.items()} == {"t": "bytearray", "j": "bytearray"}


# -- request headers and ids ---------------------------------------------------------------------


def test_request_headers_reach_handler_case_insensitively(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types",
        content=b"x",
        headers={"X-Custom": "custom value", "Content-Type": "application/octet-stream"},
    )
    headers = seen(response)["headers"]
    assert headers["X-Custom"] == headers["x-custom"] == "custom value"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["explain"] == "False"
    assert headers["url_path"] == ""


def test_request_id_matches_handler_and_is_unique(api: Server) -> None:
    ids = set()
    for _ in range(3):
        response = http.post(f"{api.inference}/predictions/types", content=b"x")
        assert response.headers["x-request-id"] == seen(response)["request_id"]
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 3


def test_explanations_set_explain_header(api: Server) -> None:
    response = http.post(f"{api.inference}/explanations/types", content=b"x")
    assert seen(response)["headers"]["explain"] == "True"
    versioned = http.post(f"{api.inference}/explanations/types/2.0", content=b"x")
    assert seen(versioned)["headers"]["explain"] == "True"
    assert seen(versioned)["version"] == "2.0"


def test_extra_path_segments_become_url_path(api: Server) -> None:
    response = http.post(f"{api.inference}/predictions/types/1.0/a/b", content=b"x")
    assert seen(response)["headers"]["url_path"] == "a/b"


# -- what the handler sends back (§3.2, §4.3) ----------------------------------------------------


def test_dict_output_is_two_space_json(api: Server) -> None:
    response = http.post(f"{api.inference}/predictions/types", content=b"x")
    assert response.headers.get("connection") != "close"
    assert response.text == json.dumps(response.json(), indent=2)
    assert response.headers["cache-control"] == "no-cache; no-store, must-revalidate, private"


def test_bytes_output_is_raw_without_content_type(api: Server) -> None:
    blob = os.urandom(200_000)
    response = http.post(f"{api.inference}/predictions/echo", content=blob)
    assert response.status_code == 200
    assert response.content == blob
    assert "content-type" not in response.headers
    assert response.headers["x-request-id"]


def test_handler_sets_status_content_type_and_headers(api: Server) -> None:
    response = http.post(
        f"{api.inference}/predictions/types",
        content=b"x",
        headers={"X-Set-Status": "201 Made it", "X-Set-Content-Type": "text/csv", "X-Set-Header": "X-Model-Note=noted"},
    )
    assert response.status_code == 201
    assert response.reason_phrase == "Made it"
    assert response.headers["content-type"] == "text/csv"
    assert response.headers["x-model-note"] == "noted"
    assert response.headers["x-request-id"] == response.json()["request_id"]


def test_handler_error_status_keeps_body(api: Server) -> None:
    response = http.post(f"{api.inference}/predictions/types", content=b"x", headers={"X-Set-Status": "422 Nope"})
    assert response.status_code == 422
    assert response.headers.get("connection") != "close"  # kept alive, unlike TorchServe
    assert response.json()["request_id"] == response.headers["x-request-id"]


# -- routes (§4.1) -------------------------------------------------------------------------------


def test_versions_are_routed(api: Server) -> None:
    assert seen(http.post(f"{api.inference}/predictions/types/1.0", content=b"x"))["version"] == "1.0"
    assert seen(http.post(f"{api.inference}/predictions/types/2.0", content=b"x"))["version"] == "2.0"
    # The first registered version is the default.
    assert seen(http.post(f"{api.inference}/predictions/types", content=b"x"))["version"] == "1.0"


def test_any_method_predicts(api: Server) -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"):
        response = http.request(method, f"{api.inference}/predictions/types")
        assert response.status_code == 200, (method, response.text)


def test_trailing_slash_is_ignored(api: Server) -> None:
    assert seen(http.post(f"{api.inference}/predictions/types/", content=b"x"))["version"] == "1.0"
    assert seen(http.post(f"{api.inference}/predictions/types/2.0/", content=b"x"))["version"] == "2.0"
    assert http.get(f"{api.inference}/ping/").json() == {"status": "Healthy"}


def test_unknown_model_and_version_are_404(api: Server) -> None:
    response = http.post(f"{api.inference}/predictions/nope", content=b"x")
    assert response.status_code == 404
    assert response.headers.get("connection") != "close"
    assert response.text == json.dumps(
        {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"}, indent=2
    ) + "\n"
    response = http.post(f"{api.inference}/predictions/types/9.9", content=b"x")
    assert response.status_code == 404
    assert response.json() == {
        "code": 404,
        "type": "ModelVersionNotFoundException",
        "message": "Model version: 9.9 does not exist for model: types",
    }
    assert http.post(f"{api.inference}/explanations/nope").json()["type"] == "ModelNotFoundException"


def test_ping(api: Server) -> None:
    for method in ("GET", "POST"):
        response = http.request(method, f"{api.inference}/ping")
        assert response.status_code == 200
        assert response.json() == {"status": "Healthy"}


def test_options_root_is_openapi(api: Server) -> None:
    response = http.options(f"{api.inference}/")
    assert response.status_code == 200
    description = response.json()
    assert description["openapi"].startswith("3.")
    assert any(path.startswith("/predictions") for path in description["paths"])
    assert http.get(f"{api.inference}/api-description").json() == description
    assert http.get(f"{api.inference}/").status_code == 405


def test_options_on_a_model_describes_its_api(api: Server) -> None:
    response = http.options(f"{api.inference}/predictions/types")
    assert response.status_code == 200
    assert "/predictions/types" in response.json()["paths"]
    assert http.options(f"{api.inference}/predictions/nope").json()["type"] == "ModelNotFoundException"


@pytest.mark.parametrize("path", ["/nowhere", "/predictions", "/predictions/", "/models"])
def test_unknown_path_is_404(api: Server, path: str) -> None:
    response = http.post(f"{api.inference}{path}", content=b"x")
    assert response.status_code == 404
    assert response.json() == {
        "code": 404,
        "type": "ResourceNotFoundException",
        "message": "Requested resource is not found, please refer to API document.",
    }


def test_no_worker_is_503_with_torchserve_message(api: Server) -> None:
    make_mar(api.store, "idle", "inf_types_handler.py")
    assert api.register("idle.mar", initial_workers=0).status_code == 200
    response = http.post(f"{api.inference}/predictions/idle", content=b"x")
    assert response.status_code == 503
    assert response.json() == {
        "code": 503,
        "type": "ServiceUnavailableException",
        "message": f'Model "idle" {NO_WORKER_TAIL}',
    }
    versioned = http.post(f"{api.inference}/predictions/idle/1.0", content=b"x")
    assert versioned.json()["message"] == f'Model "idle" Version 1.0" {NO_WORKER_TAIL}'


def test_concurrent_clients_get_their_own_answers(api: Server) -> None:
    async def run() -> list[tuple[bytes, httpx.Response]]:
        async with httpx.AsyncClient(timeout=30) as client:
            bodies = [f"client-{i}-".encode() * (i + 1) for i in range(40)]
            url = f"{api.inference}/predictions/echo"
            responses = await asyncio.gather(*(client.post(url, content=b) for b in bodies))
            return list(zip(bodies, responses))

    for body, response in asyncio.run(run()):
        assert response.status_code == 200
        assert response.content == body


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_upload_and_form_file(api: Server, tmp_path: Path) -> None:
    # curl sends `Expect: 100-continue` for big uploads, which httpx never does.
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(2_000_000))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    url = f"{api.inference}/predictions/types"
    for args, name in ((["-T", str(blob)], "body"), (["-F", f"data=@{blob}"], "data")):
        command = ["curl", "-sS", "--fail-with-body", *args, url]
        out = subprocess.run(command, capture_output=True, check=True, timeout=30)
        got = json.loads(out.stdout)["params"]
        assert list(got) == [name]
        assert (got[name]["type"], got[name]["sha256"]) == ("bytearray", digest)
