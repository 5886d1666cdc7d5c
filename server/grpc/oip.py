"""The Open Inference Protocol's ``inference.GRPCInferenceService`` (KServe v2's gRPC), on the
inference port beside TorchServe's service, meaning what the REST routes mean (server/apis/oip.py):

- ``ServerLive``: true while the frontend serves; ``ServerReady``: ``server_ready``, every version
  that should have workers has one serving. Both open without a token, like the REST probes.
- ``ModelReady``: the version (or the model's default) has a worker with its model loaded.
- ``ServerMetadata``, ``ModelMetadata``: the REST metadata (the model's ``oip`` signature).
- ``ModelInfer``: queued like ``/v2/models/{m}/infer`` (``dataplane.queue_job``, the ``oip``
  envelope, the model's queue and batches), the request given to the worker in the REST binary form
  and its answer converted back (``tensors``).

Errors are the REST routes' statuses as gRPC codes, as KServe's model server gives them: NOT_FOUND
for an unknown model or version, INVALID_ARGUMENT for a request the worker (or the frontend) cannot
read, UNAVAILABLE when the model has no worker or its queue is full.
"""

from __future__ import annotations

from typing import Any

import grpc

from ..apis.dataplane import queue_job, server_ready
from ..apis.oip import ENVELOPE, EXTENSIONS, SERVER_NAME, signature
from ..http.auth import INFERENCE
from ..http.request import Request
from ..metrics.recording import Metrics
from ..models.batching import Reply, StreamReply
from ..models.registry import ModelRegistry
from ..version import marserve_version
from .calls import Call, Failure, Rpcs
from .protos import open_inference_grpc_pb2 as pb
from .status import code_for
from .tensors import from_rest, to_rest
from .torchserve import error_message

SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_BINARY = b"application/octet-stream"
# Metadata that the converted request sets itself.
_OWN_HEADERS = frozenset(("content-type", "content-length", "inference-header-content-length", "content-encoding"))


def service(rpcs: Rpcs, registry: ModelRegistry, metrics: Metrics) -> grpc.GenericRpcHandler:
    async def server_live(request: Any, call: Call) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ready(request: Any, call: Call) -> Any:
        return pb.ServerReadyResponse(ready=server_ready(registry))

    async def model_ready(request: Any, call: Call) -> Any:
        return pb.ModelReadyResponse(ready=registry.get(request.name, request.version or None).ready)

    async def server_metadata(request: Any, call: Call) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=marserve_version(), extensions=EXTENSIONS)

    async def model_metadata(request: Any, call: Call) -> Any:
        model = registry.get(request.name, request.version or None)
        inputs, outputs, platform = signature(model)
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[m.version for m in registry.versions(request.name)],
            platform=platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in outputs],
        )

    async def model_infer(request: Any, call: Call) -> Any:
        version = request.model_version or None
        model = registry.get(request.model_name, version)
        body, json_length = to_rest(request)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in call.metadata() if k not in _OWN_HEADERS]
        headers += [(b"content-type", _BINARY), (b"inference-header-content-length", b"%d" % json_length)]
        # The request as /v2/models/{m}/infer would have it, for the job to be made as that route makes it.
        rest = Request("POST", call.path, b"", headers, call.client(), call.request_id, call.received, True)
        try:
            future = queue_job(metrics, rest, model, version, [("body", _BINARY.decode(), body)], envelope=ENVELOPE, explain=False)
        finally:
            call.on_answered = rest.on_answered  # counted even when refused at the queue, as over REST
        reply: Reply | StreamReply = await future
        if isinstance(reply, StreamReply):  # the oip envelope answers in one piece; never expected
            reply.cancel()
            raise Failure(grpc.StatusCode.INTERNAL, "the model streamed its answer, which ModelInfer cannot carry")
        if reply.status >= 400:
            raise Failure(code_for(reply.status), error_message(reply), reply.status)
        return from_rest(reply)

    name = SERVICE
    return rpcs.service(name, {
        # Probes are open, like their REST routes: Kubernetes sends no token.
        "ServerLive": rpcs.unary(name, "ServerLive", None, server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": rpcs.unary(name, "ServerReady", None, ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": rpcs.unary(name, "ModelReady", INFERENCE, model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": rpcs.unary(
            name, "ServerMetadata", INFERENCE, server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
        ),
        "ModelMetadata": rpcs.unary(name, "ModelMetadata", INFERENCE, model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": rpcs.unary(name, "ModelInfer", INFERENCE, model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
    })  # fmt: skip
