"""The descriptor pool of marserve's gRPC messages, with the files they import and the standard
services the servers also offer (health checking, reflection), so that reflection can describe
every service from this one pool."""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pool, empty_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

POOL = descriptor_pool.DescriptorPool()
# In dependency order: status.proto imports any.proto.
for _module in (any_pb2, empty_pb2, status_pb2, health_pb2, reflection_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
