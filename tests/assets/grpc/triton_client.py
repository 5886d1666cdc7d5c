"""Triton's gRPC client (tritonclient.grpc) against a marserve server, in a process of its own.

tritonclient's messages and KServe's (imported by other test modules) define the same protobuf
symbols (package ``inference``) in protobuf's default pool, so the two cannot be imported into one
process: tests/server/test_grpc_triton.py runs this script and reads the JSON it prints.

    python triton_client.py HOST:PORT [AUTHORIZATION]
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main() -> None:
    url = sys.argv[1]
    headers = {"authorization": sys.argv[2]} if len(sys.argv) > 2 else None
    client = triton.InferenceServerClient(url=url)
    out: dict[str, Any] = {}
    out["live"] = client.is_server_live(headers=headers)
    out["ready"] = client.is_server_ready(headers=headers)
    out["model_ready"] = client.is_model_ready("double", headers=headers)
    out["idle_ready"] = client.is_model_ready("idle", headers=headers)
    metadata = client.get_server_metadata(headers=headers, as_json=True)
    out["server_metadata"] = metadata
    out["model_metadata"] = client.get_model_metadata("double", headers=headers, as_json=True)

    def infer(model: str, datatype: str, array: np.ndarray, **kwargs: Any) -> Any:
        tensor = triton.InferInput("INPUT0", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return client.infer(model, [tensor], headers=headers, **kwargs)

    result = infer("double", "FP32", np.array([1, 2, 3, 4], dtype=np.float32), request_id="r-1")
    response = result.get_response(as_json=True)
    out["fp32"] = {
        "data": result.as_numpy("OUTPUT0").tolist(),
        "dtype": str(result.as_numpy("OUTPUT0").dtype),
        "id": response.get("id"),
        "model_version": response.get("model_version"),
        "raw": len(result.get_response().raw_output_contents),
    }
    half = infer("half", "FP16", np.array([0.5, 1.5, -2.0], dtype=np.float16))
    out["fp16"] = {"data": half.as_numpy("OUTPUT0").tolist(), "dtype": str(half.as_numpy("OUTPUT0").dtype)}
    brain = infer("brain", "BF16", bf16([1.0, 2.5, -3.0]))
    out["bf16"] = {"data": brain.as_numpy("OUTPUT0").astype(np.float32).tolist()}
    out["typed"] = typed(url, headers)

    errors = {}
    for name, call in {
        "unknown_model": lambda: infer("nope", "FP32", np.ones(2, dtype=np.float32)),
        "wrong_dtype": lambda: infer("double", "INT32", np.ones(2, dtype=np.int32)),
        "wrong_shape": lambda: infer("double", "FP32", np.ones((2, 2), dtype=np.float32)),
        "no_worker": lambda: infer("idle", "FP32", np.ones(2, dtype=np.float32)),
        "too_large": lambda: infer("double", "FP32", np.ones(200_000, dtype=np.float32)),
        "unknown_metadata": lambda: client.get_model_metadata("nope", headers=headers),
    }.items():
        try:
            call()
            errors[name] = None
        except InferenceServerException as exc:
            errors[name] = {"status": exc.status(), "message": exc.message()}
    out["errors"] = errors
    client.close()
    print(json.dumps(out))


def bf16(values: list[float]) -> np.ndarray:
    """BF16 input as this tritonclient takes it: since r26.06 an ml_dtypes.bfloat16 array, before
    that float32 values that it truncates."""
    try:
        triton.InferInput("INPUT0", [len(values)], "BF16").set_data_from_numpy(np.array(values, dtype=np.float32))
    except InferenceServerException:
        import ml_dtypes

        return np.array(values, dtype=ml_dtypes.bfloat16)
    return np.array(values, dtype=np.float32)


def typed(url: str, headers: dict[str, str] | None) -> dict[str, Any]:
    """ModelInfer with the input in the typed ``contents`` field, through tritonclient's own generated
    stubs: its InferenceServerClient only ever sends raw_input_contents."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="double", id="typed-1")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([0.5, -1.0, 3.0])
    with grpc.insecure_channel(url) as channel:
        metadata = tuple(headers.items()) if headers else None
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=60)
    output = response.outputs[0]
    return {
        "id": response.id,
        "output": [output.name, output.datatype, list(output.shape)],
        "typed": len(output.contents.fp32_contents),
        "data": np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist(),
    }


if __name__ == "__main__":
    main()
