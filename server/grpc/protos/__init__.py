"""The gRPC interfaces marserve serves: TorchServe's ``inference.proto`` and ``management.proto``
(0.12.0) and the Open Inference Protocol's ``open_inference_grpc.proto``, vendored with their
licences, and the Python modules ``protoc`` made from them (``*_pb2.py`` and their ``.pyi``
stubs), committed so that a plain ``pip install`` needs no compiler. ``generate.py`` makes them
again (``python -m server.grpc.protos.generate``, with grpcio-tools installed).

The modules build their messages in a descriptor pool of their own (``_pool.POOL``), not in
protobuf's default one: a process that also imports another copy of the same interfaces (Triton's
or KServe's client, which define ``inference.GRPCInferenceService`` too, or stubs a test generates)
would otherwise fail to import one of them.
"""
