"""The Open Inference Protocol in the worker: requests read (JSON and Triton's binary tensors),
checked, handed to the handler as TorchServe's kservev2 envelope would, and answered in full OIP.

Driven through the worker's ``Service`` with ``oip`` requests, as the v2 routes send them.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import torch

from server.workers.child.oip import OipError, parse_request
from tests.server.test_envelopes import Recorder, Req, make_service, run

MANIFEST = {"model": {"modelName": "m", "modelVersion": "3.1"}}

# Every datatype, with values each holds exactly (so JSON, binary and back compare equal).
VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True],
    "UINT8": [0, 1, 200, 255],
    "UINT16": [0, 1, 60000, 65535],
    "UINT32": [0, 1, 4_000_000_000, 7],
    "UINT64": [0, 1, 2**62 + 5, 9],  # past 2**63 JSON gives floats, as numpy (and kservev2) read it
    "INT8": [-128, -1, 0, 127],
    "INT16": [-32768, -2, 3, 32767],
    "INT32": [-(2**31), -3, 4, 2**31 - 1],
    "INT64": [-(2**63), -4, 5, 2**63 - 1],
    "FP16": [0.5, -1.25, 2048.0, 0.0],
    "FP32": [0.5, -1.25, 2.0**30, 1.5],
    "FP64": [0.1, -1e-300, 1e300, 2.5],
    "BF16": [0.5, -2.0, 1.5, 2.0**40],
}
NUMPY = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
SHAPE = [2, 2]


def bf16_bytes(values: list[float]) -> bytes:
    return (np.array(values, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()


def to_bytes(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BF16":
        return bf16_bytes(values)
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return np.array(values, dtype=NUMPY[datatype]).tobytes()


def from_bytes(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BF16":
        values: list[Any] = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").tolist()
        return values
    if datatype == "BYTES":
        out, offset = [], 0
        while offset < len(raw):
            (n,) = struct.unpack_from("<I", raw, offset)
            out.append(raw[offset + 4 : offset + 4 + n])
            offset += 4 + n
        return out
    values = np.frombuffer(raw, NUMPY[datatype]).tolist()
    return values


def binary_request(header: dict[str, Any], blobs: list[bytes], *, title_case: bool = False) -> Req:
    head = json.dumps(header).encode()
    name = "Inference-Header-Content-Length" if title_case else "inference-header-content-length"
    return Req(head + b"".join(blobs), "application/octet-stream", envelope="oip", headers=[(name, str(len(head)))])


def split_reply(result: Any, parts: list[bytes], i: int = 0) -> tuple[dict[str, Any], bytes]:
    """(JSON header, binary rest) of a binary reply; the whole JSON for a JSON one."""
    response = result.responses[i]
    lengths = dict(response.headers)
    if "Inference-Header-Content-Length" not in lengths:
        assert response.content_type == "application/json"
        return json.loads(parts[i]), b""
    assert response.content_type == "application/octet-stream"
    n = int(lengths["Inference-Header-Content-Length"])
    return json.loads(parts[i][:n]), parts[i][n:]


def outputs_of(reply: dict[str, Any], rest: bytes) -> dict[str, list[Any]]:
    """Each output's flat values, from JSON data or its binary_data_size bytes of ``rest``."""
    values, offset = {}, 0
    for output in reply["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values[output["name"]] = output["data"]
        else:
            values[output["name"]] = from_bytes(output["datatype"], rest[offset : offset + size])
            offset += size
    assert offset == len(rest)
    return values


def echo_data(data: list[dict[str, Any]], context: Any) -> list[Any]:
    return [row["data"] for row in data]


def signature_for(datatypes: list[str]) -> dict[str, Any]:
    def shape(d: str) -> list[int]:
        return [-1] if d == "BYTES" else [-1, 2]

    return {"oip": {
        "inputs": [{"name": f"in-{d}", "datatype": d, "shape": shape(d)} for d in datatypes],
        "outputs": [{"name": f"out-{d}", "datatype": d, "shape": shape(d)} for d in datatypes],
    }}  # fmt: skip


def echo_any(data: list[dict[str, Any]], context: Any) -> list[Any]:
    return [row.get("data", "plain") for row in data]


# -- every datatype, round trips --------------------------------------------------------------------


def test_every_datatype_round_trips_as_json() -> None:
    datatypes = [*VALUES, "BYTES"]
    handler = Recorder(echo_data)
    service = make_service(handler, yaml=signature_for(datatypes), manifest=MANIFEST)
    inputs = [{"name": f"in-{d}", "shape": SHAPE, "datatype": d, "data": VALUES[d]} for d in VALUES]
    inputs.append({"name": "in-BYTES", "shape": [3], "datatype": "BYTES", "data": ["héllo", "b", "c"]})
    result, parts = run(service, Req(json.dumps({"id": "j", "inputs": inputs}).encode(), envelope="oip"))
    assert result.responses[0].status == 200, parts[0]
    reply, rest = split_reply(result, parts)
    assert (reply["model_name"], reply["model_version"], reply["id"]) == ("m", "3.1", "j")
    got = outputs_of(reply, rest)
    for d in VALUES:
        assert got[f"out-{d}"] == VALUES[d], d
    assert got["out-BYTES"] == ["héllo"]  # kservev2 hands a BYTES input over as its first element
    assert [(o["name"], o["datatype"], o["shape"]) for o in reply["outputs"]][:2] == [
        ("out-BOOL", "BOOL", [2, 2]), ("out-UINT8", "UINT8", [2, 2])
    ]
    # The handler got each tensor as nested lists in its shape, as TorchServe's kservev2 envelope gives it.
    (data, _, _), = handler.calls
    assert data[0]["data"] == [[True, False], [True, True]]
    assert data[-1]["data"] == "héllo"


def test_every_datatype_round_trips_as_binary() -> None:
    datatypes = [*VALUES, "BYTES"]
    service = make_service(Recorder(echo_data), yaml=signature_for(datatypes), manifest=MANIFEST)
    words = [b"\x00\xffraw", b"", "ünï".encode()]
    blobs = [to_bytes(d, VALUES[d]) for d in VALUES] + [to_bytes("BYTES", words)]
    inputs = [
        {"name": f"in-{d}", "shape": SHAPE if d != "BYTES" else [3], "datatype": d,
         "parameters": {"binary_data_size": len(blob)}}
        for d, blob in zip(datatypes, blobs)
    ]  # fmt: skip
    request = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    result, parts = run(service, binary_request(request, blobs))
    assert result.responses[0].status == 200, parts[0]
    reply, rest = split_reply(result, parts)
    assert reply["id"] == "req-0"  # no id given: the request's own
    got = outputs_of(reply, rest)
    for d in VALUES:
        assert got[f"out-{d}"] == VALUES[d], d
        output = next(o for o in reply["outputs"] if o["name"] == f"out-{d}")
        assert output["parameters"] == {"binary_data_size": len(to_bytes(d, VALUES[d]))} and "data" not in output
    # Not UTF-8: the handler gets bytes, and they come back as they were.
    assert got["out-BYTES"] == [b"\x00\xffraw"]


def test_binary_uint64_keeps_every_bit() -> None:
    handler = Recorder(echo_data)
    blob = np.array([2**64 - 1, 2**63 + 5], "<u8").tobytes()
    request = {"inputs": [{"name": "u", "shape": [2], "datatype": "UINT64", "parameters": {"binary_data_size": 16}}],
               "outputs": [{"name": "u", "parameters": {"binary_data": True}}]}  # fmt: skip
    result, parts = run(make_service(handler), binary_request(request, [blob]))
    assert handler.calls[0][0][0]["data"] == [2**64 - 1, 2**63 + 5]
    reply, rest = split_reply(result, parts)
    assert reply["outputs"][0]["datatype"] == "UINT64" and rest == blob


def test_handlers_cannot_tell_binary_from_json() -> None:
    handler = Recorder(echo_data)
    service = make_service(handler)
    datatypes = list(VALUES)
    as_json = [{"name": d, "shape": SHAPE, "datatype": d, "data": VALUES[d]} for d in datatypes if d != "BF16"]
    as_json.append({"name": "s", "shape": [1], "datatype": "BYTES", "data": ["text"]})
    blobs = [to_bytes(d, VALUES[d]) for d in datatypes if d != "BF16"] + [to_bytes("BYTES", [b"text"])]
    as_binary = [
        {k: v for k, v in entry.items() if k != "data"} | {"parameters": {"binary_data_size": len(blob)}}
        for entry, blob in zip(as_json, blobs)
    ]
    run(service, Req(json.dumps({"inputs": as_json}).encode(), envelope="oip"))
    run(service, binary_request({"inputs": as_binary}, blobs, title_case=True))
    (from_json, _, _), (from_binary, _, _) = handler.calls
    for a, b in zip(from_json, from_binary):
        assert a["data"] == b["data"], a["name"]
        assert _types(a["data"]) == _types(b["data"]), a["name"]


def _types(value: Any) -> Any:
    return [_types(v) for v in value] if isinstance(value, list) else type(value).__name__


def test_outputs_without_a_signature_are_named_after_the_inputs_and_typed_by_value() -> None:
    def handler(data: list[Any], context: Any) -> list[Any]:
        return [torch.tensor([[1.5, 2.5]]), np.array([1, 2], dtype=np.int16), 3, {"7": 0.9}][: len(data)]

    service = make_service(handler, manifest=MANIFEST)
    inputs = [{"name": f"x{i}", "shape": [1], "datatype": "INT8", "data": [i]} for i in range(4)]
    result, parts = run(service, Req(json.dumps({"inputs": inputs}).encode(), envelope="oip"))
    reply = json.loads(parts[0])
    assert reply["outputs"] == [
        {"name": "x0", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.5]},
        {"name": "x1", "shape": [2], "datatype": "INT16", "data": [1, 2]},
        {"name": "x2", "shape": [1], "datatype": "INT64", "data": [3]},
        {"name": "x3", "shape": [1], "datatype": "BYTES", "data": [{"7": 0.9}]},
    ]
    assert list(reply) == ["model_name", "model_version", "id", "outputs"]


# -- binary outputs ---------------------------------------------------------------------------------


def test_which_outputs_are_binary_follows_triton() -> None:
    def handler(data: list[Any], context: Any) -> list[Any]:
        return [[1.0, 2.0], [3, 4]]

    yaml = {"oip": {"outputs": [{"name": "a", "datatype": "FP32", "shape": [2]}, {"name": "b", "datatype": "INT32", "shape": [2]}]}}
    service = make_service(handler, yaml=yaml, manifest=MANIFEST)
    inputs = [{"name": "i", "shape": [1], "datatype": "INT8", "data": [0]}, {"name": "j", "shape": [1], "datatype": "INT8", "data": [0]}]

    def ask(**request: Any) -> tuple[dict[str, Any], bytes]:
        result, parts = run(service, Req(json.dumps({"inputs": inputs, **request}).encode(), envelope="oip"))
        assert result.responses[0].status == 200, parts[0]
        return split_reply(result, parts)

    reply, rest = ask()
    assert rest == b"" and [o["data"] for o in reply["outputs"]] == [[1.0, 2.0], [3, 4]]
    # binary_data on one output; the other stays JSON; requested order is the reply's.
    reply, rest = ask(outputs=[{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}])
    assert [o["name"] for o in reply["outputs"]] == ["b", "a"]
    assert reply["outputs"][0] == {"name": "b", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}}
    assert rest == np.array([3, 4], "<i4").tobytes() and reply["outputs"][1]["data"] == [1.0, 2.0]
    # binary_data_output for all, overridden by an output's binary_data false.
    reply, rest = ask(parameters={"binary_data_output": True}, outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}])
    assert rest == np.array([1, 2], "<f4").tobytes() and reply["outputs"][1]["data"] == [3, 4]
    # binary_data_output on an output counts as binary_data.
    reply, rest = ask(outputs=[{"name": "a", "parameters": {"binary_data_output": True}}])
    assert [o["name"] for o in reply["outputs"]] == ["a"] and rest == np.array([1, 2], "<f4").tobytes()


def test_non_utf8_bytes_need_binary_output() -> None:
    service = make_service(lambda data, ctx: [[b"\xff\xfe"]])
    request = {"inputs": [{"name": "i", "shape": [1], "datatype": "INT8", "data": [0]}]}
    result, parts = run(service, Req(json.dumps(request).encode(), envelope="oip"))
    assert result.responses[0].status == 500 and "binary" in json.loads(parts[0])["error"]
    request["parameters"] = {"binary_data_output": True}
    result, parts = run(service, Req(json.dumps(request).encode(), envelope="oip"))
    reply, rest = split_reply(result, parts)
    assert reply["outputs"][0]["datatype"] == "BYTES" and rest == struct.pack("<I", 2) + b"\xff\xfe"


# -- refusals ---------------------------------------------------------------------------------------

GOOD = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}
JSON_REFUSALS = [
    (b"{", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "no inputs"),
    (json.dumps({"inputs": []}).encode(), "no inputs"),
    (json.dumps({"inputs": [1]}).encode(), "inputs[0] must be a JSON object"),
    (json.dumps({"inputs": [{**GOOD, "datatype": "FP8"}]}).encode(), "datatype 'FP8'"),
    (json.dumps({"inputs": [{**GOOD, "datatype": ["FP32"]}]}).encode(), "datatype ['FP32']"),
    (json.dumps({"inputs": [{**GOOD, "shape": [3]}]}).encode(), "holds 3 elements; data has 2"),
    (json.dumps({"inputs": [{**GOOD, "shape": [-1]}]}).encode(), "shape must be a list of non-negative integers"),
    (json.dumps({"inputs": [{**GOOD, "data": [[1, 2], [3]]}]}).encode(), "not a rectangular array"),
    (json.dumps({"inputs": [{**GOOD, "data": ["a", "b"]}]}).encode(), "must hold numbers"),
    (json.dumps({"inputs": [{**GOOD, "data": 5}]}).encode(), "data must be a JSON array"),
    (json.dumps({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}).encode(), "neither data nor"),
    (json.dumps({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}).encode(), "holds 2 elements"),
    (json.dumps({"id": 7, "inputs": [GOOD]}).encode(), "id must be a string"),
    (json.dumps({"parameters": [], "inputs": [GOOD]}).encode(), "parameters must be a JSON object"),
    (json.dumps({"inputs": [GOOD], "outputs": [{"name": "nope"}]}).encode(), "unknown output 'nope'"),
    (json.dumps({"inputs": [GOOD], "outputs": "x"}).encode(), "outputs must be a list"),
    (json.dumps({"inputs": [{**GOOD, "parameters": {"binary_data_size": 8}}]}).encode(), "both data and"),
]


@pytest.mark.parametrize(("body", "words"), JSON_REFUSALS, ids=[w for _, w in JSON_REFUSALS])
def test_a_request_the_protocol_refuses_is_a_400_for_it_alone(body: bytes, words: str) -> None:
    handler = Recorder(echo_any)
    service = make_service(handler)
    result, parts = run(service, Req(b"plain", "text/plain"), Req(body, envelope="oip"))
    assert [r.status for r in result.responses] == [200, 400]
    assert result.responses[1].content_type == "application/json"
    error = json.loads(parts[1])
    assert list(error) == ["error"] and words in error["error"] and "\n" not in error["error"]
    assert len(handler.calls[0][0]) == 1  # the handler saw the plain request only


def _binary(size: int, data: bytes, shape: list[int] = [2], datatype: str = "FP32") -> Req:  # noqa: B006
    return binary_request({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}]}, [data])


BINARY_REFUSALS = [
    (_binary(4, b"\0" * 4), "binary_data_size is 4 bytes; shape [2] of FP32 takes 8"),
    (_binary(16, b"\0" * 8), "needs 16 bytes of binary data"),
    (_binary(8, b"\0" * 12), "4 bytes of binary data follow"),
    (_binary(-1, b""), "binary_data_size must be a non-negative integer"),
    (_binary(3, b"\x05\0\0", [1], "BYTES"), "ends inside an element's 4-byte length"),
    (_binary(6, b"\x05\0\0\0ab", [1], "BYTES"), "runs past its binary data"),
    (_binary(10, struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", [1], "BYTES"), "holds 1 elements; its binary data has 2"),
    (_binary(0, b"", [0], "BYTES"), "needs at least one element"),
    (Req(b'{"inputs": []}', envelope="oip", headers=[("inference-header-content-length", "abc")]), "must be a number"),
    (Req(b'{"inputs": []}', envelope="oip", headers=[("inference-header-content-length", "99")]), "between 1 and the body's length"),
    (Req(json.dumps({"inputs": [{**GOOD, "data": None, "parameters": {"binary_data_size": 8}}]}).encode(), envelope="oip"), "both"),
    (Req(json.dumps({"inputs": [{k: v for k, v in GOOD.items() if k != "data"} | {"parameters": {"binary_data_size": 8}}]}).encode(),
         envelope="oip"), "needs 8 bytes of binary data"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "words"), BINARY_REFUSALS, ids=[w for _, w in BINARY_REFUSALS])
def test_binary_requests_that_do_not_add_up_are_refused(request_: Req, words: str) -> None:
    handler = Recorder(echo_data)
    result, parts = run(make_service(handler), request_)
    assert result.responses[0].status == 400
    assert words in json.loads(parts[0])["error"]
    assert handler.calls == []


def test_a_declared_signature_checks_inputs_and_requested_outputs() -> None:
    yaml = {"oip": {"inputs": [{"name": "img", "datatype": "FP32", "shape": [-1, 2]}],
                    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]}}  # fmt: skip
    handler = Recorder(lambda data, ctx: [[0.25] * 2 for _ in data])
    service = make_service(handler, yaml=yaml)

    def status(inputs: list[dict[str, Any]], **more: Any) -> tuple[int, Any]:
        result, parts = run(service, Req(json.dumps({"inputs": inputs, **more}).encode(), envelope="oip"))
        return result.responses[0].status, json.loads(parts[0])

    ok = {"name": "img", "shape": [3, 2], "datatype": "FP32", "data": [0] * 6}
    code, reply = status([ok])
    assert code == 200 and reply["outputs"] == [{"name": "probs", "shape": [2], "datatype": "FP32", "data": [0.25, 0.25]}]
    assert status([{**ok, "datatype": "FP64"}]) == (400, {"error": "input 'img' must be FP32, not FP64"})
    assert status([{**ok, "shape": [2, 3]}]) == (400, {"error": "input 'img' has shape [2, 3]; the model takes [-1, 2]"})
    assert status([{**ok, "shape": [6]}])[0] == 400
    assert status([ok], outputs=[{"name": "img"}])[0] == 400  # outputs are the signature's, not the inputs'
    assert status([ok], outputs=[{"name": "probs"}])[0] == 200
    assert len(handler.calls) == 2


def test_a_malformed_signature_is_ignored_by_inference() -> None:
    service = make_service(Recorder(echo_data), yaml={"oip": {"outputs": "nope"}})
    result, parts = run(service, Req(json.dumps({"inputs": [GOOD]}).encode(), envelope="oip"))
    assert result.responses[0].status == 200 and json.loads(parts[0])["outputs"][0]["name"] == "x"


def test_parse_request_directly() -> None:
    request = parse_request(json.dumps({"id": "a", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "UINT8", "data": [[1, 2]]}]}).encode())
    assert request.id == "a" and request.inputs[0]["data"] == [[1, 2]] and request.outputs is None
    with pytest.raises(OipError) as refused:
        parse_request(b"{}", 5)
    assert refused.value.status == 400


def test_bf16_outputs_round_to_nearest_even() -> None:
    halfway = [1 + 2**-8, 1 + 3 * 2**-8, -(2.0**-130), float("inf")]
    yaml = {"oip": {"outputs": [{"name": "b", "datatype": "BF16", "shape": [4]}]}}
    service = make_service(lambda data, ctx: [np.array(halfway, dtype=np.float32)], yaml=yaml)
    request = {"inputs": [{"name": "i", "shape": [1], "datatype": "INT8", "data": [0]}]}
    result, parts = run(service, Req(json.dumps(request).encode(), envelope="oip"))
    expected = [1.0, 1 + 2**-6, -(2.0**-130), float("inf")]
    (output,) = json.loads(parts[0])["outputs"]
    assert output["datatype"] == "BF16" and output["data"][:3] == expected[:3]
    request["parameters"] = {"binary_data_output": True}
    result, parts = run(service, Req(json.dumps(request).encode(), envelope="oip"))
    reply, rest = split_reply(result, parts)
    assert from_bytes("BF16", rest) == expected
