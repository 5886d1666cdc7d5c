"""gRPC against a real in-process server, with clients we did not write: stubs that grpcio-tools
generates here from TorchServe 0.12's own .proto files (vendored unchanged in server/grpc/protos/), KServe's
InferenceGRPCClient, grpcio's health and reflection clients. Triton's gRPC client runs in a process
of its own (test_grpc_triton.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from kserve import InferenceGRPCClient, InferInput, InferRequest

from tests.conftest import ASSETS, Model, Server, ServerFactory, free_port, make_mar, wait_for

#: TorchServe's inference.proto and management.proto as marserve vendors them, unchanged.
PROTOS = Path(__file__).parents[2] / "server" / "grpc" / "protos"
TS_INFERENCE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
TS_MANAGEMENT = "org.pytorch.serve.grpc.management.ManagementAPIsService"
OIP = "inference.GRPCInferenceService"



def signature(datatype: str) -> dict[str, Any]:
    return {
        "inputs": [{"name": "INPUT0", "datatype": datatype, "shape": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": datatype, "shape": [-1]}],
    }


def grpc_config(**extra: object) -> tuple[str, int, int]:
    """config.properties lines with free gRPC ports, and the ports."""
    inference, management = free_port(), free_port()
    lines = f"grpc_inference_port={inference}\ngrpc_management_port={management}\n"
    lines += "".join(f"{key}={value}\n" for key, value in extra.items())
    return lines, inference, management


def tensor_models(files: Path) -> list[Model]:
    handler = ASSETS / "double_handler.py"
    models = []
    for name, datatype in (("double", "FP32"), ("half", "FP16"), ("brain", "BF16")):
        config = files / f"{name}.yaml"
        config.write_text(json.dumps({"oip": signature(datatype)}))
        models.append(Model(name, str(handler), archive={"config_file": str(config)}))
    return models


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> Server:
    files = tmp_path_factory.mktemp("grpc-files")
    # max_workers: room for these models' workers and those test_management_rpcs_... adds.
    config, inference, management = grpc_config(max_request_size=100000, max_workers=16)
    models = [
        Model("echo", "echo_handler.py"),
        Model("stream", "stream_handler.py"),
        Model("tsstream", "ts_stream_handler.py"),
        Model("fail", "inf_fail_handler.py"),
        Model("batch", "inf_batch_handler.py", batch_size=4, max_batch_delay=1000),
        Model("idle", "echo_handler.py", initial_workers=0),
        *tensor_models(files),
    ]
    server = start_module_server(config, models, name="grpc")
    server.grpc = SimpleNamespace(inference=f"127.0.0.1:{inference}", management=f"127.0.0.1:{management}")  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Client stubs generated from TorchServe's inference.proto and management.proto."""
    import google.rpc.status_pb2
    import grpc_tools

    out = tmp_path_factory.mktemp("torchserve-stubs")
    includes = [Path(grpc_tools.__file__).parent / "_proto", Path(google.rpc.status_pb2.__file__).parents[2]]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", *(f"-I{d}" for d in includes),
         f"--python_out={out}", f"--grpc_python_out={out}", "inference.proto", "management.proto"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        import inference_pb2  # type: ignore[import-not-found]
        import inference_pb2_grpc  # type: ignore[import-not-found]
        import management_pb2  # type: ignore[import-not-found]
        import management_pb2_grpc  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(out))
    return SimpleNamespace(i=inference_pb2, igrpc=inference_pb2_grpc, m=management_pb2, mgrpc=management_pb2_grpc)


@pytest.fixture(scope="module")
def channels(srv: Server) -> Iterator[SimpleNamespace]:
    inference = grpc.insecure_channel(srv.grpc.inference)  # type: ignore[attr-defined]
    management = grpc.insecure_channel(srv.grpc.management)  # type: ignore[attr-defined]
    yield SimpleNamespace(inference=inference, management=management)
    inference.close()
    management.close()


@pytest.fixture(scope="module")
def stub(ts: SimpleNamespace, channels: SimpleNamespace) -> Any:
    return ts.igrpc.InferenceAPIsServiceStub(channels.inference)


@pytest.fixture(scope="module")
def mgmt(ts: SimpleNamespace, channels: SimpleNamespace) -> Any:
    return ts.mgrpc.ManagementAPIsServiceStub(channels.management)


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# -- TorchServe's inference service -------------------------------------------------------------


def test_ping(ts: SimpleNamespace, stub: Any) -> None:
    from google.protobuf import empty_pb2

    reply = stub.Ping(empty_pb2.Empty(), timeout=10)
    assert json.loads(reply.health) == {"status": "Healthy"}


def test_predictions_reach_the_handler_as_a_rest_prediction_does(ts: SimpleNamespace, stub: Any) -> None:
    reply, call = stub.Predictions.with_call(ts.i.PredictionsRequest(model_name="echo", input={"data": b"hello"}), timeout=30)
    assert reply.prediction == b"hello"
    request_id = dict(call.trailing_metadata())["x-request-id"]
    assert len(request_id) == 36
    # A version by name, as /predictions/echo/1.0.
    assert stub.Predictions(ts.i.PredictionsRequest(model_name="echo", model_version="1.0", input={"data": b"v"})).prediction == b"v"


def test_predictions_share_the_models_queue_and_batches_with_http(srv: Server, ts: SimpleNamespace, stub: Any) -> None:
    answers: dict[str, Any] = {}

    def over_grpc(body: str) -> None:
        answers[body] = json.loads(stub.Predictions(ts.i.PredictionsRequest(model_name="batch", input={"body": body.encode()}), timeout=30).prediction)

    def over_http(body: str) -> None:
        answers[body] = srv.http.post(f"{srv.inference}/predictions/batch", content=body.encode()).json()

    threads = [threading.Thread(target=f, args=(b,)) for f, b in ((over_grpc, "g1"), (over_http, "h1"), (over_grpc, "g2"), (over_http, "h2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == ["g1", "g2", "h1", "h2"]
    assert {a["body"] for a in answers.values()} == {"g1", "g2", "h1", "h2"}
    # One batch of four: gRPC and HTTP requests queued together (batch_size 4, a second to gather).
    assert [a["batch"] for a in answers.values()] == [4, 4, 4, 4]


def test_stream_predictions_sends_each_piece(ts: SimpleNamespace, stub: Any) -> None:
    words = [r.prediction for r in stub.StreamPredictions(ts.i.PredictionsRequest(model_name="stream", input={"body": b"words 4"}), timeout=30)]
    assert words == [b"w0 ", b"w1 ", b"w2 ", b"w3 "]
    # TorchServe's send_intermediate_predict_response, then the final output.
    pieces = [r.prediction for r in stub.StreamPredictions(ts.i.PredictionsRequest(model_name="tsstream", input={"body": b"3"}), timeout=30)]
    assert pieces == [b"piece 0;", b"piece 1;", b"piece 2;", b"final."]
    # A handler that answers in one piece: one response.
    assert [r.prediction for r in stub.StreamPredictions(ts.i.PredictionsRequest(model_name="echo", input={"data": b"x"}))] == [b"x"]


def test_predictions_joins_a_streamed_answer(ts: SimpleNamespace, stub: Any) -> None:
    assert stub.Predictions(ts.i.PredictionsRequest(model_name="stream", input={"body": b"words 3"}), timeout=30).prediction == b"w0 w1 w2 "


def test_a_client_that_leaves_mid_stream_stops_its_stream(srv: Server, ts: SimpleNamespace, stub: Any) -> None:
    progress = srv.tmp / "stream_progress.log"
    start = len(progress.read_text().splitlines()) if progress.exists() else 0
    stream = stub.StreamPredictions(ts.i.PredictionsRequest(model_name="stream", input={"body": b"words 200 every 0.05"}), timeout=60)
    first = [next(stream).prediction, next(stream).prediction]
    assert first == [b"w0 ", b"w1 "]
    stream.cancel()

    def stopped() -> list[str]:
        lines = progress.read_text().splitlines()[start:]
        return lines if any(line.endswith(" closed") for line in lines) else []

    # The worker stops the generator: the handler sees context.cancelled() at its next word, or,
    # when the cancel comes between two words, the worker closes it before asking for the next.
    lines = wait_for(stopped, 30, "the stream to stop")
    assert isinstance(lines, list)
    assert sum(" word " in line for line in lines) < 100


def test_stream_predictions2_answers_each_request_of_the_stream(ts: SimpleNamespace, stub: Any) -> None:
    requests = [
        ts.i.PredictionsRequest(model_name="echo", input={"data": b"one"}, sequence_id="seq-1"),
        ts.i.PredictionsRequest(model_name="echo", input={"data": b"two"}),  # no sequence id
        ts.i.PredictionsRequest(model_name="nope", input={"data": b"x"}, sequence_id="seq-1"),
        ts.i.PredictionsRequest(model_name="stream", input={"body": b"words 2"}, sequence_id="seq-1"),
    ]
    responses = list(stub.StreamPredictions2(iter(requests), timeout=30))
    assert [(r.prediction, r.sequence_id) for r in responses if not r.HasField("status")] == [
        (b"one", "seq-1"), (b"w0 ", "seq-1"), (b"w1 ", "seq-1"),
    ]  # fmt: skip
    failures = [(r.status.code, r.status.message) for r in responses if r.HasField("status")]
    assert failures == [
        (grpc.StatusCode.INTERNAL.value[0], "Parameter sequenceId is required."),
        (grpc.StatusCode.INTERNAL.value[0], "Model not found: nope"),
    ]


def test_prediction_errors_have_torchserves_codes(ts: SimpleNamespace, stub: Any) -> None:
    def predict(**fields: Any) -> Any:
        return lambda: stub.Predictions(ts.i.PredictionsRequest(**fields), timeout=30)

    # Refused before the queue: INTERNAL, as TorchServe answers them.
    assert code_of(predict(model_name="nope", input={"data": b"x"})) == (grpc.StatusCode.INTERNAL, "Model not found: nope")
    assert code_of(predict(model_name="echo", model_version="9", input={"data": b"x"})) == (
        grpc.StatusCode.INTERNAL, "Model version: 9 does not exist for model: echo",
    )  # fmt: skip
    assert code_of(predict(input={"data": b"x"})) == (grpc.StatusCode.INTERNAL, "Parameter model_name is required.")
    code, message = code_of(predict(model_name="idle", input={"data": b"x"}))
    assert code == grpc.StatusCode.INTERNAL and "idle" in message
    # What the worker answers: by its HTTP status (TorchServe's GRPCUtils table).
    assert code_of(predict(model_name="fail", input={"body": b"teapot"})) == (grpc.StatusCode.FAILED_PRECONDITION, "I am a teapot")
    code, message = code_of(predict(model_name="fail", input={"body": b"raise"}))
    assert code == grpc.StatusCode.UNAVAILABLE and "Prediction failed" in message
    # An inbound message over max_request_size (100000 here).
    code, _ = code_of(predict(model_name="echo", input={"data": b"x" * 200_000}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- TorchServe's management service -------------------------------------------------------------


def test_management_rpcs_answer_what_rest_answers(srv: Server, ts: SimpleNamespace, mgmt: Any) -> None:
    make_mar(srv.store, "later", "echo_handler.py", version="1.0")
    make_mar(srv.store, "later2", "echo_handler.py", version="2.0")
    m = ts.m
    reply = mgmt.RegisterModel(m.RegisterModelRequest(url="later.mar", synchronous=True, initial_workers=1), timeout=60)
    assert reply.msg == 'Model "later" Version: 1.0 registered with 1 initial workers'
    reply = mgmt.RegisterModel(m.RegisterModelRequest(url="later2.mar", model_name="later", synchronous=True), timeout=60)
    assert "Version: 2.0 registered" in reply.msg
    rest = srv.http.get(f"{srv.management}/models").text.rstrip("\n")
    assert mgmt.ListModels(m.ListModelsRequest()).msg == rest
    assert json.loads(mgmt.ListModels(m.ListModelsRequest(limit=2)).msg)["nextPageToken"] == "2"
    described = json.loads(mgmt.DescribeModel(m.DescribeModelRequest(model_name="later", model_version="all")).msg)
    assert [d["modelVersion"] for d in described] == ["1.0", "2.0"]
    # The same, but for the workers' resident sets, read again for each answer.
    assert without_memory(described) == without_memory(srv.http.get(f"{srv.management}/models/later/all").json())
    assert mgmt.SetDefault(m.SetDefaultRequest(model_name="later", model_version="2.0")).msg == (
        'Default version successfully updated for model "later" to "2.0"'
    )
    reply = mgmt.ScaleWorker(m.ScaleWorkerRequest(model_name="later", model_version="1.0", min_worker=2, synchronous=True), timeout=60)
    assert reply.msg.startswith("Workers scaled to 2 for model: later")
    assert len(srv.http.get(f"{srv.management}/models/later/1.0").json()[0]["workers"]) == 2
    assert mgmt.UnregisterModel(m.UnregisterModelRequest(model_name="later", model_version="1.0"), timeout=60).msg == 'Model "later" unregistered'
    mgmt.UnregisterModel(m.UnregisterModelRequest(model_name="later"), timeout=60)
    assert srv.http.get(f"{srv.management}/models/later").status_code == 404


def test_management_errors_have_torchserves_codes(ts: SimpleNamespace, mgmt: Any) -> None:
    m = ts.m
    assert code_of(lambda: mgmt.DescribeModel(m.DescribeModelRequest(model_name="nope"))) == (grpc.StatusCode.NOT_FOUND, "Model not found: nope")
    assert code_of(lambda: mgmt.ScaleWorker(m.ScaleWorkerRequest(model_name="nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: mgmt.SetDefault(m.SetDefaultRequest(model_name="echo", model_version="9")))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: mgmt.UnregisterModel(m.UnregisterModelRequest(model_name="nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: mgmt.RegisterModel(m.RegisterModelRequest()))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: mgmt.RegisterModel(m.RegisterModelRequest(url="missing.mar")))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: mgmt.RegisterModel(m.RegisterModelRequest(url="echo.mar", batch_size=-1)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Already registered: REST's 409.
    assert code_of(lambda: mgmt.RegisterModel(m.RegisterModelRequest(url="echo.mar", synchronous=True)))[0] == grpc.StatusCode.ABORTED


# -- the Open Inference Protocol, with KServe's gRPC client -------------------------------------


def kserve(srv: Server, coroutine: Any) -> Any:
    async def run() -> Any:
        async with InferenceGRPCClient(srv.grpc.inference, retries=2) as client:  # type: ignore[attr-defined]
            return await coroutine(client)

    return asyncio.run(run())


def test_oip_probes_and_readiness(srv: Server) -> None:
    async def probes(client: InferenceGRPCClient) -> tuple[bool, bool, bool, bool]:
        return (
            await client.is_server_live(), await client.is_server_ready(),
            await client.is_model_ready("double"), await client.is_model_ready("idle"),
        )  # fmt: skip

    # idle was registered with no workers: not ready, and not holding the server back.
    assert kserve(srv, probes) == (True, True, True, False)


@pytest.mark.parametrize("typed", [True, False], ids=["typed contents", "raw contents"])
def test_oip_infer_with_kserves_client(srv: Server, typed: bool) -> None:
    async def infer(client: InferenceGRPCClient) -> Any:
        tensor = InferInput(name="INPUT0", shape=[4], datatype="FP32")
        if typed:
            tensor = InferInput(name="INPUT0", shape=[4], datatype="FP32", data=[1.0, 2.0, 3.0, 4.0])
        else:
            tensor.set_data_from_numpy(np.array([1, 2, 3, 4], dtype=np.float32), binary_data=True)
        return await client.infer(InferRequest(model_name="double", infer_inputs=[tensor], request_id="abc"))

    response = kserve(srv, infer)
    assert response.id == "abc" and response.model_name == "double"
    output = response.outputs[0]
    assert (output.name, output.datatype, output.shape) == ("OUTPUT0", "FP32", [4])
    assert output.as_numpy().tolist() == [2.0, 4.0, 6.0, 8.0]


def test_oip_errors_have_kserves_codes(srv: Server) -> None:
    def infer(model: str, tensor: InferInput) -> Any:
        async def call(client: InferenceGRPCClient) -> Any:
            return await client.infer(InferRequest(model_name=model, infer_inputs=[tensor]))

        return lambda: kserve(srv, call)

    fp32 = InferInput(name="INPUT0", shape=[2], datatype="FP32", data=[1.0, 2.0])
    assert code_of(infer("nope", fp32)) == (grpc.StatusCode.NOT_FOUND, "Model not found: nope")
    code, message = code_of(infer("double", InferInput(name="INPUT0", shape=[2], datatype="INT32", data=[1, 2])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be FP32, not INT32" in message
    code, message = code_of(infer("double", InferInput(name="INPUT0", shape=[3], datatype="FP32", data=[1.0, 2.0])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "holds 3 elements" in message
    code, message = code_of(infer("idle", fp32))
    assert code == grpc.StatusCode.UNAVAILABLE and "idle" in message


def test_fp16_and_bf16_must_come_raw(channels: SimpleNamespace) -> None:
    # KServe's and Triton's clients never send them typed; the bare message shows the refusal.
    from server.grpc.protos import open_inference_grpc_pb2 as pb

    infer = channels.inference.unary_unary(
        f"/{OIP}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )  # fmt: skip
    for model, datatype in (("half", "FP16"), ("brain", "BF16")):
        tensor = pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=datatype, shape=[2])
        tensor.contents.fp32_contents.extend([1.0, 2.0])
        code, message = code_of(lambda: infer(pb.ModelInferRequest(model_name=model, inputs=[tensor]), timeout=10))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "send them in raw_input_contents" in message
    # Raw contents and typed contents together, and raw contents that do not fit the shape.
    tensor = pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    both = pb.ModelInferRequest(model_name="double", inputs=[tensor], raw_input_contents=[b"\0" * 8])
    assert code_of(lambda: infer(both, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    short = pb.ModelInferRequest(model_name="double", inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[2])])
    short.raw_input_contents.append(b"\0" * 7)
    code, message = code_of(lambda: infer(short, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "takes 8 bytes; raw_input_contents[0] has 7" in message


# -- the policy: access log, counters ------------------------------------------------------------


def test_access_log_and_metrics_count_grpc_calls(srv: Server, ts: SimpleNamespace, stub: Any) -> None:
    _, call = stub.Predictions.with_call(ts.i.PredictionsRequest(model_name="echo", input={"data": b"logged"}), timeout=30)
    request_id = dict(call.trailing_metadata())["x-request-id"]
    code_of(lambda: stub.Predictions(ts.i.PredictionsRequest(model_name="nope")))
    line = f'"POST /{TS_INFERENCE}/Predictions" 200 '
    wait_for(lambda: request_id in srv.log.read_text(), 10, "the access-log line")
    logged = next(entry for entry in srv.log.read_text().splitlines() if request_id in entry)
    assert line in logged and logged.endswith(f"{request_id} grpc OK")
    wait_for(lambda: f'"POST /{TS_INFERENCE}/Predictions" 500 ' in srv.log.read_text(), 10, "the failed call's line")
    assert "grpc INTERNAL" in srv.log.read_text()
    metrics = httpx.get(f"{srv.metrics}/metrics").text
    assert f'marserve_grpc_requests_total{{code="OK",method="Predictions",service="{TS_INFERENCE}"}}' in metrics
    assert f'marserve_grpc_requests_total{{code="INTERNAL",method="Predictions",service="{TS_INFERENCE}"}}' in metrics
    # gRPC predictions count as predictions, per model.
    assert 'ts_inference_requests_total{model_name="echo",model_version="default"' in metrics


# -- health checking and reflection --------------------------------------------------------------


def test_health_checking_and_reflection(channels: SimpleNamespace) -> None:
    health = health_pb2_grpc.HealthStub(channels.inference)
    for service in ("", TS_INFERENCE, OIP):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))[0] == grpc.StatusCode.NOT_FOUND
    inference = ProtoReflectionDescriptorDatabase(channels.inference)
    assert {TS_INFERENCE, OIP, "grpc.health.v1.Health"} <= set(inference.get_services())
    assert inference.FindFileContainingSymbol(f"{TS_INFERENCE}").name == "inference.proto"
    management = ProtoReflectionDescriptorDatabase(channels.management)
    assert TS_MANAGEMENT in management.get_services()
    assert TS_INFERENCE not in management.get_services()


def test_reflection_describes_and_calls_as_grpcurl_does(channels: SimpleNamespace) -> None:
    # grpcurl's path: every service and message resolved from reflection alone (the files each
    # imports included), then a call made with the message classes built from them.
    from google.protobuf import descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channels.inference))
    ts_inference, oip = pool.FindServiceByName(TS_INFERENCE), pool.FindServiceByName(OIP)
    assert [m.name for m in ts_inference.methods] == ["Ping", "Predictions", "StreamPredictions", "StreamPredictions2"]
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= {m.name for m in oip.methods}
    assert "raw_input_contents" in oip.methods_by_name["ModelInfer"].input_type.fields_by_name
    assert ts_inference.methods_by_name["Ping"].input_type.full_name == "google.protobuf.Empty"
    predictions = ts_inference.methods_by_name["Predictions"]
    request_class, response_class = GetMessageClass(predictions.input_type), GetMessageClass(predictions.output_type)
    call = channels.inference.unary_unary(
        f"/{TS_INFERENCE}/Predictions", request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString
    )
    assert call(request_class(model_name="echo", input={"data": b"reflected"}), timeout=30).prediction == b"reflected"
    management = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channels.management))
    methods = {m.name for m in management.FindServiceByName(TS_MANAGEMENT).methods}
    assert {"RegisterModel", "UnregisterModel", "ScaleWorker", "ListModels", "DescribeModel", "SetDefault"} <= methods


# -- tokens, TLS, configuration ------------------------------------------------------------------


def test_tokens_in_the_authorization_metadata(start_server: ServerFactory, ts: SimpleNamespace) -> None:
    from google.protobuf import empty_pb2

    config, inference, management = grpc_config(disable_token_authorization="false")
    srv = start_server(config, name="grpc-tokens")
    make_mar(srv.store, "echo", "echo_handler.py")
    keys = json.loads((srv.root / "key_file.json").read_text())
    bearer = {kind: (("authorization", f"Bearer {keys[kind]['key']}"),) for kind in ("inference", "management")}
    with grpc.insecure_channel(f"127.0.0.1:{inference}") as ic, grpc.insecure_channel(f"127.0.0.1:{management}") as mc:
        stub = ts.igrpc.InferenceAPIsServiceStub(ic)
        mgmt = ts.mgrpc.ManagementAPIsServiceStub(mc)
        register = ts.m.RegisterModelRequest(url="echo.mar", synchronous=True)
        assert code_of(lambda: mgmt.RegisterModel(register, timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
        mgmt.RegisterModel(register, metadata=bearer["management"], timeout=60)
        request = ts.i.PredictionsRequest(model_name="echo", input={"data": b"k"})
        code, message = code_of(lambda: stub.Predictions(request, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Token Authentication failed" in message
        assert code_of(lambda: stub.Predictions(request, metadata=bearer["management"]))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Predictions(request, metadata=bearer["inference"], timeout=30).prediction == b"k"
        # Probes need no key, as /ping and /v2/health/* do.
        assert json.loads(stub.Ping(empty_pb2.Empty()).health) == {"status": "Healthy"}
        assert health_pb2_grpc.HealthStub(ic).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        listing = ts.m.ListModelsRequest()
        assert code_of(lambda: mgmt.ListModels(listing, metadata=bearer["inference"]))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert "echo" in mgmt.ListModels(listing, metadata=bearer["management"]).msg

    async def oip(client: InferenceGRPCClient) -> tuple[bool, bool]:
        live = await client.is_server_live()
        try:
            await client.is_model_ready("echo")
            refused = False
        except grpc.RpcError as exc:
            refused = exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return live, refused

    srv.grpc = SimpleNamespace(inference=f"127.0.0.1:{inference}")  # type: ignore[attr-defined]
    assert kserve(srv, oip) == (True, True)


def test_grpc_over_tls(start_server: ServerFactory, ts: SimpleNamespace, tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key_file), "-out", str(cert_file), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    config, inference, _ = grpc_config(enable_grpc_ssl="true", certificate_file=cert_file, private_key_file=key_file)
    start_server(config, [Model("echo", "echo_handler.py")], name="grpc-tls")
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
    request = ts.i.PredictionsRequest(model_name="echo", input={"data": b"secret"})
    with grpc.secure_channel(f"127.0.0.1:{inference}", credentials) as channel:
        assert ts.igrpc.InferenceAPIsServiceStub(channel).Predictions(request, timeout=30).prediction == b"secret"
    # Plain text to a TLS port fails (and does not hang).
    with grpc.insecure_channel(f"127.0.0.1:{inference}") as channel:
        assert code_of(lambda: ts.igrpc.InferenceAPIsServiceStub(channel).Predictions(request, timeout=10))[0] == grpc.StatusCode.UNAVAILABLE


def test_enable_grpc_false_opens_no_port(start_server: ServerFactory) -> None:
    config, inference, management = grpc_config(enable_grpc="false")
    srv = start_server(config, name="grpc-off")
    assert srv.http.get(f"{srv.inference}/ping").status_code == 200
    for port in (inference, management):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_grpc_port_stops_the_start(start_server: ServerFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = start_server(f"grpc_inference_port={port}\ngrpc_management_port={free_port()}\n", name="grpc-taken", start=False)
        with pytest.raises(RuntimeError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(grpc_inference_port\): address already in use"):
            srv.start()


def hold(port: int) -> socket.socket | None:
    """Listen on ``port`` so that nothing else can; None if something already does."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_serve_starts_when_the_default_grpc_ports_are_taken(tmp_path: Path) -> None:
    # No gRPC key set: 7070 and 7071 are defaults that give way (held here, or by something else
    # on the machine already, which serves the test as well).
    server = Server(tmp_path)
    server.config.write_text(server.config.read_text().replace("enable_grpc=false\n", ""))
    assert "grpc" not in server.config.read_text()
    held = [hold(7070), hold(7071)]
    try:
        started = subprocess.run([*server.command("--start")], env=server.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        try:
            assert started.returncode == 0, started.stderr
            assert "gRPC not listening (see the log)" in started.stdout
            assert server.http.get(f"{server.inference}/ping").status_code == 200
        finally:
            subprocess.run([*server.command("--stop")], env=server.env, cwd=tmp_path, capture_output=True, timeout=120)
            server.http.close()
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
    log = (tmp_path / "logs" / "ts_log.log").read_text()
    for key, port in (("grpc_inference_port", 7070), ("grpc_management_port", 7071)):
        assert f"cannot listen on 127.0.0.1:{port} ({key}): address already in use; serving without gRPC" in log
    assert "gRPC listening" not in log


def test_max_connection_age_closes_connections(start_server: ServerFactory, ts: SimpleNamespace) -> None:
    from google.protobuf import empty_pb2

    config, inference, _ = grpc_config(grpc_inference_max_connection_age_ms=300, grpc_inference_max_connection_age_grace_ms=1000)
    start_server(config, name="grpc-age")
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(f"127.0.0.1:{inference}") as channel:
        channel.subscribe(states.append)
        stub = ts.igrpc.InferenceAPIsServiceStub(channel)
        stub.Ping(empty_pb2.Empty(), timeout=10)
        # The server ends the connection (GOAWAY) once it is 300 ms old (grpc adds up to 10%
        # jitter): the channel goes from ready to idle, and the next call opens a new connection.
        # (States reach the callback from grpc's own thread, some time after they change.)

        def closed() -> bool:
            ready = grpc.ChannelConnectivity.READY
            return ready in states and grpc.ChannelConnectivity.IDLE in states[states.index(ready) :]

        wait_for(closed, 10, "the server to close the connection")
        assert json.loads(stub.Ping(empty_pb2.Empty(), timeout=10).health) == {"status": "Healthy"}
        channel.unsubscribe(states.append)


def test_generated_modules_match_their_protos(tmp_path: Path) -> None:
    # The committed *_pb2.py and .pyi are what python -m server.grpc.protos.generate makes.
    from server.grpc.protos import generate

    for made in generate.generate(tmp_path):
        assert made.read_bytes() == (generate.HERE / made.name).read_bytes(), f"{made.name} is stale: run python -m server.grpc.protos.generate"


def test_grpc_keys_are_real_keys() -> None:
    from server.config import ConfigError, ServerConfig, key_warnings

    config = ServerConfig.from_properties({
        "grpc_inference_address": "0.0.0.0", "grpc_management_port": "9071",
        "grpc_inference_max_connection_age_ms": "60000", "grpc_management_max_connection_age_grace_ms": "0",
        "enable_grpc_ssl": "false", "enable_grpc": "true",
    })  # fmt: skip
    assert key_warnings(config) == []
    assert (config.grpc_inference_address, config.grpc_inference_port, config.grpc_management_port) == ("0.0.0.0", 7070, 9071)
    with pytest.raises(ConfigError, match="grpc_inference_port: '70000' \\(expected an integer from 0 to 65535\\)"):
        ServerConfig.from_properties({"grpc_inference_port": "70000"})
    with pytest.raises(ConfigError, match="enable_grpc_ssl is true, which needs certificate_file and private_key_file"):
        ServerConfig.from_properties({"enable_grpc_ssl": "true"})
    with pytest.raises(ConfigError, match="grpc_management_address"):
        ServerConfig.from_properties({"grpc_management_address": "http://0.0.0.0:7071"})
    # Only with no gRPC key set do the default ports give way when taken.
    assert ServerConfig().grpc_defaulted
    assert not ServerConfig.from_properties({"grpc_inference_port": "7070"}).grpc_defaulted
    assert not ServerConfig.from_properties({"enable_grpc": "true"}).grpc_defaulted


def test_serve_start_says_where_grpc_listens(tmp_path: Path) -> None:
    config, inference, management = grpc_config()
    server = Server(tmp_path, config=config)
    started = subprocess.run([*server.command("--start")], env=server.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert f"gRPC inference 127.0.0.1:{inference}, management 127.0.0.1:{management}" in started.stdout
    finally:
        stopped = subprocess.run([*server.command("--stop")], env=server.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", inference)) != 0:
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the gRPC port still listens after serve --stop")


def without_memory(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**d, "workers": [{k: v for k, v in w.items() if k != "memoryUsage"} for w in d["workers"]]} for d in described]
