"""TorchServe's gRPC services, as TorchServe 0.12 serves them (its ``InferenceImpl`` and
``ManagementImpl``), over marserve's registry and queues.

``org.pytorch.serve.grpc.inference.InferenceAPIsService`` (the inference port):

- ``Ping``: ``{"status": "Healthy"}`` in ``health``; open without a token, like ``/ping``.
- ``Predictions``: the request's ``input`` map becomes the handler's input, one parameter a key,
  as bytes (TorchServe's gRPC sends no content types); the job is queued and batched with HTTP's
  ``/predictions`` and answered with the handler's output in ``prediction``. An answer the handler
  streams is joined into one.
- ``StreamPredictions``: the same, each piece of a streamed answer as one ``PredictionResponse``
  (``send_intermediate_predict_response`` or a generator); a plain answer is one response.
- ``StreamPredictions2``: each request of the client's stream in turn, each with a ``sequence_id``
  (TorchServe's ``Parameter sequenceId is required.`` otherwise), its responses carrying it and its
  failures reported in the response's ``status`` without ending the stream. marserve has no
  sequence batching: each request is an ordinary one, with ``ts_request_sequence_id`` among its
  headers.

``org.pytorch.serve.grpc.management.ManagementAPIsService`` (the management port): register,
scale, list, describe, set-default, unregister, answering what the REST API answers: ``msg`` holds
the list's and the description's JSON, and the status message of the others (TorchServe's gRPC
sends the message alone, not REST's ``{"status": ...}``). Unset proto3 fields are "not given".

Status codes are TorchServe's: a prediction refused before it is queued (no ``model_name``, an
unknown model or version, no worker, a full queue) is INTERNAL, as TorchServe answers it; what the
worker answers maps by its HTTP status (``status.code_for``); the management API's errors map the
same way (NOT_FOUND, INVALID_ARGUMENT, ...), the model API switched off is PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
from google.protobuf import empty_pb2
from grpc import StatusCode

from ..apis.management import describe_versions, list_page
from ..config import ServerConfig
from ..errors import ServerError
from ..http.auth import INFERENCE, MANAGEMENT
from ..http.responses import json_body
from ..metrics.recording import Metrics
from ..models.batching import Job, Reply, StreamReply
from ..models.registry import ModelRegistry, RegisterRequest
from .calls import Call, Failure, Rpcs
from .pieces import Pieces
from .protos import inference_pb2, management_pb2
from .status import code_for

INFERENCE_SERVICE: str = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name
MANAGEMENT_SERVICE: str = management_pb2.DESCRIPTOR.services_by_name["ManagementAPIsService"].full_name
#: TorchServe's ``ts_header_key_sequence_id`` default: the header that names a request's sequence.
SEQUENCE_HEADER = "ts_request_sequence_id"
_HEALTHY = json_body({"status": "Healthy"}).decode().rstrip("\n")
_PredictionsRequest = inference_pb2.PredictionsRequest
_PredictionResponse = inference_pb2.PredictionResponse


def inference_service(rpcs: Rpcs, registry: ModelRegistry, metrics: Metrics, stream_buffer: int) -> grpc.GenericRpcHandler:
    """``InferenceAPIsService``; ``stream_buffer`` bytes of a streamed answer may wait for the client."""

    def queue(request: Any, call: Call, request_id: str, extra: list[tuple[str, str]]) -> tuple[asyncio.Future[Reply], Callable[[int], None]]:
        """Queue a prediction as ``/predictions`` queues one; its future, and what records it once answered."""
        name = request.model_name
        if not name:
            raise Failure(StatusCode.INTERNAL, "Parameter model_name is required.")
        version = request.model_version or None
        try:
            model = registry.get(name, version)
        except ServerError as error:
            raise Failure(StatusCode.INTERNAL, error.message) from None  # TorchServe's status for these
        headers = call.metadata()
        headers += extra
        headers.append(("explain", "False"))
        headers.append(("url_path", ""))
        params: list[tuple[str, str | None, bytes]] = [(key, None, value) for key, value in request.input.items()]
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        job = Job(request_id, headers, params, future, call.received if request_id == call.request_id else time.perf_counter())

        def record(status: int) -> None:
            queued = job.dispatched - job.received if job.dispatched else 0.0
            metrics.inference(name, version, model.version, time.perf_counter() - job.received, queued, status)
            if job.stream is not None:
                metrics.stream(name, model.version, job.stream.first_at - job.received, job.stream.pieces)

        try:
            model.submit(job, versioned=bool(version))
        except ServerError as error:
            record(error.status_code)  # counted, as TorchServe counts a request refused at its queue
            raise Failure(StatusCode.INTERNAL, error.message) from None
        return future, record

    async def answer(future: asyncio.Future[Reply]) -> Reply | StreamReply:
        try:
            reply: Reply | StreamReply = await future
        except ServerError as error:
            raise Failure(code_for(error.status_code), error.message, error.status_code) from None
        if isinstance(reply, Reply) and reply.status >= 400:
            raise Failure(code_for(reply.status), error_message(reply), reply.status)
        return reply

    async def pieces(reply: Reply | StreamReply, call: Call) -> AsyncIterator[bytes]:
        """The answer's pieces as they come: a plain answer is one."""
        if isinstance(reply, Reply):
            yield reply.body
            return
        sink = Pieces(stream_buffer)
        reply.attach(sink)

        def ended(_: object) -> None:
            if not sink.ended:
                reply.cancel()

        # A client that cancels while this call waits to send it a piece ends the call in grpc's
        # code, not here: this generator is then closed only when it is collected, which a
        # reference cycle can put off until the next garbage collection. grpc's own word that the
        # call is over stops the stream at once.
        call.context.add_done_callback(ended)
        try:
            async for piece in sink:
                yield piece
        finally:
            if not sink.ended:
                reply.cancel()  # the client left, or reads too slowly: the worker stops streaming to it

    async def ping(request: Any, call: Call) -> Any:
        return inference_pb2.TorchServeHealthResponse(health=_HEALTHY)

    async def predictions(request: Any, call: Call) -> Any:
        future, call.on_answered = queue(request, call, call.request_id, [])
        reply = await answer(future)
        if isinstance(reply, Reply):
            return _PredictionResponse(prediction=reply.body)
        parts = []
        size = 0
        async for piece in pieces(reply, call):
            size += len(piece)
            if size > stream_buffer:
                raise Failure(StatusCode.RESOURCE_EXHAUSTED, f"the streamed answer exceeds max_response_size ({stream_buffer})")
            parts.append(piece)
        return _PredictionResponse(prediction=b"".join(parts))

    async def stream_predictions(request: Any, call: Call) -> AsyncIterator[Any]:
        future, call.on_answered = queue(request, call, call.request_id, [])
        async for piece in pieces(await answer(future), call):
            yield _PredictionResponse(prediction=piece)

    async def stream_predictions2(requests: AsyncIterator[Any], call: Call) -> AsyncIterator[Any]:
        first = True
        async for request in requests:
            sequence = request.sequence_id if request.HasField("sequence_id") else ""
            if not sequence.strip():
                yield _failed(sequence, Failure(StatusCode.INTERNAL, "Parameter sequenceId is required."))
                continue
            # The call's own id for its first request, a new one for each after it.
            request_id = call.request_id if first else rpcs.policy.request_id()
            first = False
            record: Callable[[int], None] | None = None
            status = 499  # until it is answered: the client may leave first
            try:
                future, record = queue(request, call, request_id, [(SEQUENCE_HEADER, sequence)])
                async for piece in pieces(await answer(future), call):
                    yield _PredictionResponse(prediction=piece, sequence_id=sequence)
                status = 200
            except Failure as failed:
                status = failed.status
                yield _failed(sequence, failed)
            finally:
                if record is not None:
                    record(status)

    name = INFERENCE_SERVICE
    Request, Response = _PredictionsRequest, _PredictionResponse
    return rpcs.service(name, {
        "Ping": rpcs.unary(name, "Ping", None, ping, empty_pb2.Empty, inference_pb2.TorchServeHealthResponse),
        "Predictions": rpcs.unary(name, "Predictions", INFERENCE, predictions, Request, Response),
        "StreamPredictions": rpcs.server_stream(name, "StreamPredictions", INFERENCE, stream_predictions, Request, Response),
        "StreamPredictions2": rpcs.stream_stream(name, "StreamPredictions2", INFERENCE, stream_predictions2, Request, Response),
    })  # fmt: skip


def _failed(sequence: str, failed: Failure) -> Any:
    """A request of a bidirectional stream that failed: said in its response, the stream goes on."""
    response = _PredictionResponse(sequence_id=sequence)
    response.status.code = failed.code.value[0]
    response.status.message = failed.message
    return response


def error_message(reply: Reply) -> str:
    """What a worker's error answer says: the ``message`` (or ``error``) of its JSON, else its text."""
    try:
        body = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "error"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return reply.body[:1000].decode("utf-8", "replace") or reply.phrase or f"status {reply.status}"


def management_service(rpcs: Rpcs, registry: ModelRegistry, config: ServerConfig) -> grpc.GenericRpcHandler:
    """``ManagementAPIsService``: the management API's operations, TorchServe's gRPC messages."""

    def model_api() -> None:
        if not config.enable_model_api:
            raise Failure(StatusCode.PERMISSION_DENIED, "Model API disabled")  # TorchServe's answer

    def ok(status: int, message: str) -> Any:
        if not 200 <= status < 300:
            raise Failure(code_for(status), message, status)
        return management_pb2.ManagementResponse(msg=message)

    def as_json(payload: Any) -> Any:
        # The REST body, without its trailing newline (TorchServe's gRPC sends Gson's text alone).
        return management_pb2.ManagementResponse(msg=json_body(payload).decode().rstrip("\n"))

    async def register_model(request: Any, call: Call) -> Any:
        model_api()
        status, message = await registry.register(
            RegisterRequest(
                url=request.url or None,
                model_name=request.model_name or None,
                handler=request.handler or None,
                runtime=request.runtime or None,
                batch_size=request.batch_size or None,
                max_batch_delay=request.max_batch_delay or None,
                initial_workers=request.initial_workers or None,
                # proto3's false when unset: asynchronous, as TorchServe's gRPC registers by default.
                synchronous=request.synchronous,
                response_timeout=request.response_timeout or None,
                startup_timeout=request.startup_timeout or None,
            )
        )
        return ok(status, message)

    async def unregister_model(request: Any, call: Call) -> Any:
        model_api()
        if not request.model_name:
            raise Failure(StatusCode.INVALID_ARGUMENT, "Parameter model_name is required.")
        return ok(200, await registry.unregister(request.model_name, request.model_version or None))

    async def scale_worker(request: Any, call: Call) -> Any:
        # TorchServe's reading of unset (0) values: one worker, and as many at most as at least.
        min_worker = request.min_worker if request.min_worker > 0 else 1
        max_worker = request.max_worker if request.max_worker > 0 else min_worker
        status, message = await registry.scale(
            request.model_name, request.model_version or None, min_worker, max_worker, request.synchronous
        )
        return ok(status, message)

    async def list_models(request: Any, call: Call) -> Any:
        # Unset (0) is the proto's documented default of 100, as is anything past 100.
        limit = request.limit if 0 < request.limit <= 100 else 100
        return as_json(list_page(registry, max(0, request.next_page_token), limit))

    async def describe_model(request: Any, call: Call) -> Any:
        # ``customized`` asks TorchServe's worker for its describe_handle(); marserve's REST
        # describe does not either, so it is ignored.
        return as_json(describe_versions(registry, request.model_name, request.model_version or None))

    async def set_default(request: Any, call: Call) -> Any:
        return ok(200, await registry.set_default(request.model_name, request.model_version))

    name = MANAGEMENT_SERVICE
    Response = management_pb2.ManagementResponse
    return rpcs.service(name, {
        "RegisterModel": rpcs.unary(name, "RegisterModel", MANAGEMENT, register_model, management_pb2.RegisterModelRequest, Response),
        "UnregisterModel": rpcs.unary(name, "UnregisterModel", MANAGEMENT, unregister_model, management_pb2.UnregisterModelRequest, Response),
        "ScaleWorker": rpcs.unary(name, "ScaleWorker", MANAGEMENT, scale_worker, management_pb2.ScaleWorkerRequest, Response),
        "ListModels": rpcs.unary(name, "ListModels", MANAGEMENT, list_models, management_pb2.ListModelsRequest, Response),
        "DescribeModel": rpcs.unary(name, "DescribeModel", MANAGEMENT, describe_model, management_pb2.DescribeModelRequest, Response),
        "SetDefault": rpcs.unary(name, "SetDefault", MANAGEMENT, set_default, management_pb2.SetDefaultRequest, Response),
    })  # fmt: skip
