"""gRPC: TorchServe's inference and management services and the Open Inference Protocol's
GRPCInferenceService, on their own ports beside the HTTP listeners, through the same request policy.

    server.py       the servers: ports, TLS, health checking, reflection, start and stop
    calls.py        each call through the policy: token, request id, status, counters, access log
    torchserve.py   InferenceAPIsService and ManagementAPIsService, as TorchServe 0.12 serves them
    oip.py          inference.GRPCInferenceService, as the OIP REST routes mean it
    tensors.py      ModelInferRequest to the worker's OIP REST form, and its answer back
    pieces.py       a streamed answer as an async iterator (StreamPredictions)
    status.py       gRPC codes from HTTP statuses (TorchServe's table) and back
    protos/         the vendored .proto files and the modules protoc made from them
"""
