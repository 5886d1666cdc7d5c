"""Doubles its one input tensor, whatever the envelope hands over: KServe v1 instances arrive as
{"data": ...}, OIP v2 tensors as lists. For the gRPC and KServe runtime tests."""

import numpy as np


def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        value = row.get("data") if isinstance(row, dict) else row
        out.append((np.asarray(value, dtype=np.float32) * 2).flatten().tolist())
    return out
