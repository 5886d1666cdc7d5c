"""Request envelopes in the worker: TorchServe's four, exactly, and per-request ones in mixed batches.

The worker's ``Service`` is driven with typed PREDICT messages, through the frame codec, as the
worker gets them. TorchServe's own envelopes (from ``.venv-torchserve``) are run on the same
requests, and the handler must see the same data and the client get the same answer.
"""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from handlers.context import Context
from server.workers import frames
from server.workers.child.service import Service
from server.workers.messages import Load, Predict, Request, Result

ROOT = Path(__file__).resolve().parents[2]
TS_PYTHON = ROOT / ".venv-torchserve" / "bin" / "python"
MANIFEST = {"model": {"modelName": "m", "modelVersion": "2.0", "handler": "h.py"}}

# The handlers both sides run: each answers every row it gets, in a way that shows what it got.
HANDLERS = textwrap.dedent(
    """
    import base64

    def jsonable(value):
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode()}
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        return value

    def echo(data, context):
        if isinstance(data, list):
            return [{"got": jsonable(row)} for row in data]
        return [{"got": jsonable(data)}]

    def data_of(data, context):
        return [row["data"] for row in data]

    def empty(data, context):
        return []

    def extra(data, context):
        return [1] * (len(data) + 1)

    def scalar(data, context):
        return [7 for _ in data]

    HANDLERS = {"echo": echo, "data": data_of, "empty": empty, "extra": extra, "scalar": scalar}
    """
)
_namespace: dict[str, Any] = {}
exec(HANDLERS, _namespace)
jsonable = _namespace["jsonable"]

# Runs TorchServe's envelope on one request as its worker would: rows decoded, one processor.
TS_RUNNER = HANDLERS + textwrap.dedent(
    """
    import importlib, json, sys
    from ts.context import Context, RequestProcessor

    CLASSES = {"body": "BodyEnvelope", "json": "JSONEnvelope", "kserve": "KServeEnvelope", "kservev2": "KServev2Envelope"}

    def decode(raw, content_type):
        value = bytearray(base64.b64decode(raw))
        mime = (content_type or "").split(";")[0].strip().lower()
        try:
            if mime == "application/json":
                return json.loads(value)
            if mime.startswith("text"):
                return value.decode("utf-8")
        except ValueError:
            pass
        return value

    answers = []
    for case in json.load(sys.stdin):
        context = Context("m", "/tmp", case["manifest"], 8, None, "0.12.0")
        context.request_ids = {0: "req-0"}
        context.request_processor = [RequestProcessor({"explain": "True" if case["explain"] else "False"})]
        seen = []
        handler = HANDLERS[case["handler"]]

        def entry(data, ctx):
            seen.append(jsonable(data))
            return handler(data, ctx)

        module = importlib.import_module("ts.torch_handler.request_envelope." + case["envelope"])
        envelope = getattr(module, CLASSES[case["envelope"]])(entry)
        rows = [{"body": decode(case["body"], case["content_type"])}]
        try:
            out = envelope.handle(rows, context)
        except Exception:
            answers.append({"seen": seen, "failed": "Prediction failed"})
            continue
        if not isinstance(out, list):
            answers.append({"seen": seen, "failed": "Invalid model predict output"})
        elif len(out) != 1:
            answers.append({"seen": seen, "failed": "number of batch response mismatched"})
        elif isinstance(out[0], str):
            answers.append({"seen": seen, "text": out[0]})
        else:
            answers.append({"seen": seen, "json": json.loads(json.dumps(out[0], indent=2))})
    print(json.dumps(answers))
    """
)


# -- driving the worker's Service -------------------------------------------------------------------


@dataclass
class Req:
    body: bytes
    content_type: str | None = "application/json"
    envelope: str | None = None
    explain: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    id: str = ""


@dataclass
class Recorder:
    """A handler that keeps what each call got (data, request_ids, processor count)."""

    answer: Any = None
    calls: list[tuple[Any, dict[int, str], int]] = field(default_factory=list)

    def __call__(self, data: Any, context: Any) -> Any:
        self.calls.append((data, dict(context.request_ids), len(context.request_processor)))
        return (self.answer or _namespace["echo"])(data, context)


def make_service(
    handler: Any, envelope: str | None = None, *, yaml: dict[str, Any] | None = None, manifest: Any = MANIFEST
) -> Service:
    context = Context("m", "/tmp", manifest, 8, None, "0.12.0", model_yaml_config=yaml)
    return Service(handler, context, decode_input_request=True, envelope=envelope)


def run(service: Service, *reqs: Req) -> tuple[Result, list[bytes]]:
    """One batch through the frame codec both ways, as the worker gets and answers it."""
    requests = [
        Request(
            r.id or f"req-{i}",
            [*r.headers, ("explain", "True" if r.explain else "False")],
            [("body", r.content_type, len(r.body))],
            r.envelope,
        )
        for i, r in enumerate(reqs)
    ]
    frame = b"".join(bytes(b) for b in frames.encode(frames.PREDICT, Predict(requests), [r.body for r in reqs]))
    kind, meta, blob = frames.decode(frame)
    assert kind == frames.PREDICT
    result, parts = service.handle(Predict.from_meta(meta), blob)
    reply = b"".join(bytes(b) for b in frames.encode(frames.RESULT, result, parts))
    _, result_meta, result_blob = frames.decode(reply)
    back = Result.from_meta(result_meta)
    assert orjson.loads(orjson.dumps(back)) == orjson.loads(orjson.dumps(result))  # JSON has no tuples
    return back, [bytes(part) for part in frames.split(result_blob, [r.size for r in back.responses])]


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def answer(result: Result, parts: list[bytes], i: int) -> tuple[int, str | None, Any]:
    response = result.responses[i]
    body: Any = parts[i]
    if response.content_type == "application/json":
        body = json.loads(body)
    return response.status, response.content_type, body


# -- TorchServe's envelopes, exactly (a batch of one) -----------------------------------------------

PNG_B64 = base64.b64encode(b"\x89PNG fake").decode()
V2 = {
    "id": "v2-id",
    "inputs": [
        {"name": "input-0", "shape": [1, 2, 2], "datatype": "FP32", "data": [0.5, 1.5, 2.5, 3.5]},
        {"name": "ints", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello", "world"]},
    ],
}
CASES: list[dict[str, Any]] = [
    # body
    {"envelope": "body", "body": b"raw bytes", "content_type": None},
    {"envelope": "body", "body": js({"a": 1}), "content_type": "application/json"},
    {"envelope": "body", "body": b"some text", "content_type": "text/plain"},
    {"envelope": "body", "body": b"x", "content_type": None, "handler": "empty"},
    {"envelope": "body", "body": b"x", "content_type": None, "handler": "extra"},
    # json
    {"envelope": "json", "body": js({"instances": [1, 2, 3]})},
    {"envelope": "json", "body": js({"instances": [{"b64": PNG_B64}, {"b64": PNG_B64}]})},
    {"envelope": "json", "body": js({"instances": [{"img": {"b64": PNG_B64}, "k": 1}]})},
    {"envelope": "json", "body": js({"instances": [[0.1, 0.2], [1e-7, 3.0]]})},
    {"envelope": "json", "body": js({"instances": []})},
    {"envelope": "json", "body": b"not json", "content_type": None},
    {"envelope": "json", "body": js({"instances": [1, 2]}), "handler": "empty"},
    # kserve (v1)
    {"envelope": "kserve", "body": js({"instances": [{"data": PNG_B64}]})},
    {"envelope": "kserve", "body": js({"instances": [[1, 2], [3, 4]]}), "explain": True},
    {"envelope": "kserve", "body": js({"instances": [1, 2]}), "content_type": None},
    {"envelope": "kserve", "body": js({"no": "instances"})},
    {"envelope": "kserve", "body": js([1, 2])},
    {"envelope": "kserve", "body": js({"instances": [1, 2]}), "handler": "empty"},
    {"envelope": "kserve", "body": js({"instances": [1, 2, 3]}), "handler": "scalar"},
    # kservev2
    {"envelope": "kservev2", "body": js(V2), "handler": "data"},
    {"envelope": "kservev2", "body": js(V2), "content_type": None, "handler": "data"},
    {"envelope": "kservev2", "body": js({**V2, "id": "  "}), "handler": "scalar"},
    {"envelope": "kservev2", "body": js({k: v for k, v in V2.items() if k != "id"}), "handler": "scalar"},
    {"envelope": "kservev2", "body": js(V2), "explain": True, "handler": "scalar"},
    {"envelope": "kservev2", "body": js(V2), "handler": "echo"},
    {"envelope": "kservev2", "body": js(V2), "handler": "extra"},
    {"envelope": "kservev2", "body": js({"id": 5, **{k: v for k, v in V2.items() if k != "id"}}), "handler": "scalar"},
    {"envelope": "kservev2", "body": js({"inputs": [{"name": "a", "shape": [3], "datatype": "FP32", "data": [1, 2]}]})},
    {"envelope": "kservev2", "body": js({"inputs": []}), "handler": "scalar"},
]


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['envelope']}-{case.get('handler', 'echo')}-{case['body'][:24]!r}"


def _handler_name(case: dict[str, Any]) -> str:
    return str(case.get("handler", "echo"))


@pytest.fixture(scope="module")
def torchserve_answers() -> list[dict[str, Any]]:
    if not TS_PYTHON.exists():
        pytest.skip("needs .venv-torchserve (scripts/torchserve-venv)")
    cases = [
        {
            "envelope": c["envelope"], "body": base64.b64encode(c["body"]).decode(),
            "content_type": c.get("content_type", "application/json"), "explain": c.get("explain", False),
            "handler": _handler_name(c), "manifest": MANIFEST,
        }
        for c in CASES
    ]  # fmt: skip
    ts = subprocess.run(
        [str(TS_PYTHON), "-c", TS_RUNNER], input=json.dumps(cases), capture_output=True, text=True, check=True, cwd="/"
    )
    answers: list[dict[str, Any]] = json.loads(ts.stdout)
    return answers


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_a_batch_of_one_is_torchserves_envelope_exactly(index: int, torchserve_answers: list[dict[str, Any]]) -> None:
    case = CASES[index]
    expected = torchserve_answers[index]
    handler = Recorder(_namespace["HANDLERS"][_handler_name(case)])
    service = make_service(handler, case["envelope"])
    result, parts = run(service, Req(case["body"], case.get("content_type", "application/json"), explain=case.get("explain", False)))
    assert [jsonable(data) for data, _, _ in handler.calls] == expected["seen"]
    if "failed" in expected:
        assert (result.code, result.message) == (503, expected["failed"])
        return
    assert result.code == 200, result.message
    if "text" in expected:
        # json's reply is json.dumps' text, byte for byte, with no content type (as TorchServe sends it).
        assert parts[0] == expected["text"].encode()
        assert result.responses[0].content_type is None
    else:
        assert json.loads(parts[0]) == expected["json"]
        assert result.responses[0].content_type == "application/json"


def test_torchserve_cases_cover_every_outcome(torchserve_answers: list[dict[str, Any]]) -> None:
    kinds = {next(k for k in ("failed", "text", "json") if k in a) for a in torchserve_answers}
    assert kinds == {"failed", "text", "json"}
    failures = {a["failed"] for a in torchserve_answers if "failed" in a}
    assert failures == {"Prediction failed", "number of batch response mismatched"}


def test_kservev2_reply_is_torchserves() -> None:
    """The §4.6 shape, spelled out: outputs named after the inputs, flattened, datatype from numpy."""
    service = make_service(Recorder(_namespace["data_of"]), "kservev2")
    result, parts = run(service, Req(js(V2)))
    assert json.loads(parts[0]) == {
        "id": "v2-id",
        "model_name": "m",
        "model_version": "2.0",
        "outputs": [
            {"name": "input-0", "datatype": "FP64", "data": [0.5, 1.5, 2.5, 3.5], "shape": [4]},
            {"name": "ints", "datatype": "INT64", "data": [1, 2, 3, 4], "shape": [4]},
            {"name": "text", "datatype": "BYTES", "data": ["hello"], "shape": [1]},
        ],
    }
    # The handler got the inputs, reshaped; BYTES as their first element.
    (data, ids, processors), = service.entry.calls  # type: ignore[attr-defined]
    assert [row["data"] for row in data] == [[[[0.5, 1.5], [2.5, 3.5]]], [[1, 2], [3, 4]], "hello"]
    assert ids == {0: "req-0", 1: "req-0", 2: "req-0"} and processors == 3


# -- batches of several requests --------------------------------------------------------------------


def test_batches_that_torchserve_fails_are_answered_request_by_request() -> None:
    """TorchServe's kserve and kservev2 read request 0 only, so a batch of two fails there (503)."""
    handler = Recorder(_namespace["scalar"])
    service = make_service(handler, "kserve")
    result, parts = run(service, Req(js({"instances": [1, 2]})), Req(js({"instances": [3]})), Req(js({"instances": [4, 5, 6]})))
    assert result.code == 200
    assert [json.loads(p) for p in parts] == [{"predictions": [7, 7]}, {"predictions": [7]}, {"predictions": [7, 7, 7]}]
    (data, ids, _), = handler.calls
    assert data == [1, 2, 3, 4, 5, 6]  # one call for the whole batch
    assert ids == {0: "req-0", 1: "req-0", 2: "req-1", 3: "req-2", 4: "req-2", 5: "req-2"}

    service = make_service(Recorder(_namespace["data_of"]), "kservev2")
    one = {"id": "a", "inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    two = {"inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [0.5]}, {"name": "z", "shape": [1], "datatype": "BOOL", "data": [True]}]}
    result, parts = run(service, Req(js(one)), Req(js(two)))
    first, second = (json.loads(p) for p in parts)
    assert first["id"] == "a" and [o["name"] for o in first["outputs"]] == ["x"]
    assert second["id"] == "req-1" and [(o["name"], o["datatype"]) for o in second["outputs"]] == [("y", "FP64"), ("z", "BOOL")]


def test_json_envelope_slices_a_batch_as_torchserve_does() -> None:
    service = make_service(Recorder(lambda data, ctx: [f"out{i}" for i in range(len(data))]), "json")
    result, parts = run(service, Req(js({"instances": [1, 2]})), Req(js({"instances": [3]})))
    assert parts == [js({"predictions": ["out0", "out1"]}), js({"predictions": ["out2"]})]


def test_a_request_its_torchserve_envelope_cannot_read_fails_alone_in_a_batch() -> None:
    handler = Recorder(_namespace["scalar"])
    service = make_service(handler, "kserve")
    # Alone, it fails the batch, as in TorchServe; with others, only itself.
    assert run(service, Req(b"[1", None))[0].code == 503
    result, parts = run(service, Req(js({"instances": [1]})), Req(b"[1", None), Req(js({"instances": [2]})))
    assert [r.status for r in result.responses] == [200, 503, 200]
    # What the frontend answers for a batch that failed with 503 "Prediction failed".
    assert json.loads(parts[1]) == {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
    assert handler.calls[-1][0] == [1, 2]


def test_mixed_batch_plain_v1_and_v2_share_one_handler_call() -> None:
    handler = Recorder()
    service = make_service(handler)
    v2 = {"id": "abc", "inputs": [{"name": "a", "shape": [2], "datatype": "INT32", "data": [1, 2]},
                                  {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["s"]}]}  # fmt: skip
    result, parts = run(
        service,
        Req(b"plain", "text/plain"),
        Req(js({"instances": [[1], [2]]}), envelope="kserve"),
        Req(js(v2), envelope="oip"),
        Req(b"plain too", None),
    )
    assert result.code == 200
    (data, ids, processors), = handler.calls
    assert data == [
        {"body": "plain"},
        [1], [2],
        {"name": "a", "shape": [2], "datatype": "INT32", "data": [1, 2]},
        {"name": "b", "shape": [1], "datatype": "BYTES", "data": "s"},
        {"body": bytearray(b"plain too")},
    ]  # fmt: skip
    assert ids == {0: "req-0", 1: "req-1", 2: "req-1", 3: "req-2", 4: "req-2", 5: "req-3"} and processors == 6
    assert answer(result, parts, 0) == (200, "application/json", {"got": {"body": "plain"}})
    assert answer(result, parts, 1) == (200, "application/json", {"predictions": [{"got": [1]}, {"got": [2]}]})
    status, content_type, body = answer(result, parts, 2)
    assert (status, content_type) == (200, "application/json")
    assert body == {
        "model_name": "m", "model_version": "2.0", "id": "abc",
        "outputs": [
            {"name": "a", "shape": [1], "datatype": "BYTES",
             "data": [{"got": {"name": "a", "shape": [2], "datatype": "INT32", "data": [1, 2]}}]},
            {"name": "b", "shape": [1], "datatype": "BYTES",
             "data": [{"got": {"name": "b", "shape": [1], "datatype": "BYTES", "data": "s"}}]},
        ],
    }  # fmt: skip
    assert answer(result, parts, 3) == (200, "application/json", {"got": {"body": {"__bytes__": base64.b64encode(b"plain too").decode()}}})


def test_a_bad_v2_request_fails_alone_and_never_reaches_the_handler() -> None:
    handler = Recorder()
    service = make_service(handler)
    result, parts = run(service, Req(b"a", "text/plain"), Req(b"{not json", envelope="oip"), Req(b"b", "text/plain"))
    assert [r.status for r in result.responses] == [200, 400, 200]
    assert result.responses[1].content_type == "application/json"
    error = json.loads(parts[1])
    assert list(error) == ["error"] and "not valid JSON" in error["error"] and "\n" not in error["error"]
    assert handler.calls[0][0] == [{"body": "a"}, {"body": "b"}]
    # A batch of nothing but refusals does not call the handler at all.
    result, _ = run(service, Req(js({"inputs": []}), envelope="oip"), Req(js({"x": 1}), envelope="kserve"))
    assert [r.status for r in result.responses] == [400, 400]
    assert len(handler.calls) == 1 and result.prediction_ms is None


def test_v1_route_errors_are_kserves() -> None:
    handler = Recorder(_namespace["scalar"])
    service = make_service(handler)
    cases = [(b"{oops", "not valid JSON"), (js([1]), "must be a JSON object"), (js({"inputs": [1]}), "no instances")]
    for body, words in cases:
        result, parts = run(service, Req(body, envelope="kserve"))
        assert result.responses[0].status == 400
        assert words in json.loads(parts[0])["error"]
    assert handler.calls == []


def test_handler_failing_a_row_fails_its_protocol_request_with_the_protocols_error() -> None:
    def reject_second_row(data: list[Any], context: Any) -> list[Any]:
        context.set_response_status(400, "row 1 is not an image", 1)
        return ["ok", {"code": 400, "type": "BadRequestException", "message": "row 1 is not an image"}, "ok", "ok"]

    service = make_service(reject_second_row)
    v2 = {"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1]}]}
    result, parts = run(service, Req(js({"instances": [1, 2]}), envelope="kserve"), Req(js(v2), envelope="oip"), Req(b"x"))
    assert answer(result, parts, 0) == (400, "application/json", {"error": "row 1 is not an image"})
    assert answer(result, parts, 1)[0] == 200
    assert answer(result, parts, 2)[0] == 200


def test_wrong_output_count_fails_a_mixed_batch_as_it_fails_any() -> None:
    service = make_service(Recorder(_namespace["extra"]))
    result, _ = run(service, Req(b"a"), Req(js({"instances": [1]}), envelope="kserve"))
    assert (result.code, result.message) == (503, "number of batch response mismatched")


def test_explanations_through_envelopes() -> None:
    service = make_service(Recorder(_namespace["scalar"]))
    result, parts = run(service, Req(js({"instances": [1]}), envelope="kserve", explain=True))
    assert json.loads(parts[0]) == {"explanations": [7]}
    service = make_service(Recorder(_namespace["scalar"]), "kserve")
    result, parts = run(service, Req(js({"instances": [1]}), explain=True), Req(js({"instances": [1]})))
    assert [json.loads(p) for p in parts] == [{"explanations": [7]}, {"predictions": [7]}]


def test_handler_headers_and_status_reach_enveloped_requests() -> None:
    def handler(data: list[Any], context: Any) -> list[Any]:
        for i in range(len(data)):
            context.set_response_header(i, "x-row", str(i))
        context.set_response_status(201, "Created", 0)
        return [1] * len(data)

    service = make_service(handler, "kserve")
    result, parts = run(service, Req(js({"instances": [1, 2]})), Req(js({"instances": [3]})))
    first, second = result.responses
    assert (first.status, first.phrase, first.headers) == (201, "Created", [["x-row", "1"]])
    assert (second.status, second.headers) == (200, [["x-row", "2"]])


def test_unknown_request_envelope_is_a_500_for_that_request() -> None:
    service = make_service(Recorder())
    result, parts = run(service, Req(b"a"), Req(b"b", envelope="xml"))
    assert [r.status for r in result.responses] == [200, 500]


def test_unknown_service_envelope_fails_the_load() -> None:
    with pytest.raises(ValueError, match="unknown service envelope 'xml'"):
        make_service(Recorder(), "xml")


def test_requests_without_envelopes_take_the_plain_path() -> None:
    handler = Recorder()
    service = make_service(handler)
    result, parts = run(service, Req(b"a", "text/plain"), Req(b"b", "text/plain"))
    assert service._envelopes is None  # nothing of the envelopes was even made
    assert handler.calls[0][1:] == ({0: "req-0", 1: "req-1"}, 2)


# -- the messages -----------------------------------------------------------------------------------


def test_messages_carry_the_envelope_fields() -> None:
    request = Request("r", [["a", "b"]], [["body", None, 1]], "oip")  # type: ignore[list-item]
    meta = orjson.loads(orjson.dumps(Predict([request])))
    assert meta["requests"][0]["envelope"] == "oip"
    assert Predict.from_meta(meta).requests[0] == request
    # A frontend that sends no envelope key means none.
    del meta["requests"][0]["envelope"]
    assert Predict.from_meta(meta).requests[0].envelope is None
    load = Load("m", "/d", "h.py", 1, None, {}, {}, True, True, 1 << 20, "0.12.0", envelope="kservev2")
    assert Load.from_meta(orjson.loads(orjson.dumps(load))) == load
    assert Load("m", "/d", "h.py", 1, None, {}, {}, True, True, 1, "0.12.0").envelope is None
