"""A ``ModelInferRequest`` as the OIP REST request the worker reads, and the worker's OIP answer as a
``ModelInferResponse``.

The request becomes Triton's binary form of the REST protocol (the form ``/v2/.../infer`` takes
with ``Inference-Header-Content-Length``): a JSON object naming the inputs, each with
``parameters.binary_data_size``, followed by each input's bytes. Raw inputs
(``raw_input_contents``) are those bytes already; typed ones (``contents``) are packed into them
here: little-endian, a BOOL a byte, a BYTES element a 4-byte length and its bytes. FP16 and BF16
have no typed field, so they must come raw. The request asks for every output as binary data.

The answer's outputs always go back in ``raw_output_contents``, however the inputs came, as Triton
answers: it is the one form every datatype has (FP16 and BF16 have no typed field), the form
Triton's client reads (``InferResult.as_numpy`` ignores typed contents but for BYTES), and
KServe's client reads both. The worker checks what it alone can (datatypes against the model's
signature, shapes); the frontend checks the framing (counts and sizes), so that those mistakes
are INVALID_ARGUMENT with a message about gRPC fields.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from grpc import StatusCode

from ..models.batching import Reply
from .calls import Failure
from .protos import open_inference_grpc_pb2 as pb

_LENGTH = struct.Struct("<I")
#: datatype: (InferTensorContents field, array typecode, bytes an element). BOOL and BYTES are packed by hand.
_TYPED: dict[str, tuple[str, str, int]] = {
    "BOOL": ("bool_contents", "", 1),
    "INT8": ("int_contents", "b", 1),
    "INT16": ("int_contents", "h", 2),
    "INT32": ("int_contents", "i", 4),
    "INT64": ("int64_contents", "q", 8),
    "UINT8": ("uint_contents", "B", 1),
    "UINT16": ("uint_contents", "H", 2),
    "UINT32": ("uint_contents", "I", 4),
    "UINT64": ("uint64_contents", "Q", 8),
    "FP32": ("fp32_contents", "f", 4),
    "FP64": ("fp64_contents", "d", 8),
    "BYTES": ("bytes_contents", "", 0),
}
_RAW_ONLY = {"FP16": 2, "BF16": 2}
_SIZES = {**{name: size for name, (_, _, size) in _TYPED.items()}, **_RAW_ONLY}
_SWAP = sys.byteorder != "little"
assert all(array(code).itemsize == size for _, code, size in _TYPED.values() if code), "unexpected C type sizes"


def _invalid(message: str) -> Failure:
    return Failure(StatusCode.INVALID_ARGUMENT, message)


# -- the request ----------------------------------------------------------------------------------


def to_rest(request: Any) -> tuple[bytes, int]:
    """The REST body for ``request``, and the length of its JSON part."""
    raw_contents = request.raw_input_contents
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(request.inputs):
        raise _invalid(f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} inputs: one for each input")
    inputs = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if any(d < 0 for d in shape):
            raise _invalid(f"input {name!r}: shape {shape} has a negative dimension")
        if datatype not in _SIZES:
            raise _invalid(f"input {name!r} has datatype {datatype!r}; the datatypes are {', '.join(_SIZES)}")
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise _invalid(f"input {name!r} has contents as well as raw_input_contents: send one or the other")
            blob = raw_contents[index]
            size = _SIZES[datatype]
            if size and len(blob) != count * size:
                raise _invalid(
                    f"input {name!r}: shape {shape} of {datatype} takes {count * size} bytes; "
                    f"raw_input_contents[{index}] has {len(blob)}"
                )
        else:
            blob = _pack_contents(name, datatype, shape, count, tensor.contents)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        entry["parameters"] = {**parameters(tensor.parameters), "binary_data_size": len(blob)}
        inputs.append(entry)
        blobs.append(blob)
    head: dict[str, Any] = {}
    if request.id:
        head["id"] = request.id
    head["parameters"] = {**parameters(request.parameters), "binary_data_output": True}
    head["inputs"] = inputs
    if len(request.outputs):
        head["outputs"] = [
            {"name": output.name, "parameters": {**parameters(output.parameters), "binary_data": True}}
            for output in request.outputs
        ]
    text = orjson.dumps(head)
    return b"".join((text, *blobs)), len(text)


def _pack_contents(name: str, datatype: str, shape: list[int], count: int, contents: Any) -> bytes:
    if datatype in _RAW_ONLY:
        raise _invalid(f"input {name!r}: {datatype} tensors have no typed contents field; send them in raw_input_contents")
    field, code, _ = _TYPED[datatype]
    values = getattr(contents, field)
    if len(values) != count:
        raise _invalid(f"input {name!r}: shape {shape} holds {count} elements; contents.{field} has {len(values)}")
    try:
        return pack(datatype, values)
    except (OverflowError, TypeError, ValueError) as exc:
        raise _invalid(f"input {name!r}: contents.{field} does not fit {datatype}: {exc}") from None


def pack(datatype: str, values: Iterable[Any]) -> bytes:
    """Flat values as the binary tensor data of ``datatype``."""
    if datatype == "BYTES":
        parts = []
        for value in values:
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if datatype == "BOOL":
        return bytes(1 if value else 0 for value in values)
    if datatype == "FP16":
        floats = list(values)
        return struct.pack(f"<{len(floats)}e", *floats)
    if datatype == "BF16":
        # The upper halves of the float32s (truncated), as the binary form holds them.
        words = array("I", array("f", values).tobytes())
        return array("H", (word >> 16 for word in words)).tobytes()
    data = array(_TYPED[datatype][1], values)
    if _SWAP:
        data.byteswap()
    return data.tobytes()


def parameters(entries: Mapping[str, Any]) -> dict[str, Any]:
    """An ``InferParameter`` map as the JSON values the REST protocol uses."""
    values: dict[str, Any] = {}
    for key, parameter in entries.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[key] = getattr(parameter, kind)
    return values


def set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """JSON values into an ``InferParameter`` map (anything but a boolean, number or string: as JSON text)."""
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            parameter.int64_param = value
        elif isinstance(value, int) and 0 <= value < 2**64:
            parameter.uint64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            parameter.string_param = orjson.dumps(value).decode()


# -- the answer -----------------------------------------------------------------------------------


def from_rest(reply: Reply) -> Any:
    """The worker's OIP answer (JSON, or JSON followed by binary outputs) as a ModelInferResponse,
    every output in ``raw_output_contents``."""
    body = memoryview(reply.body)
    length = next((int(v) for k, v in reply.headers if k.lower() == "inference-header-content-length"), None)
    head_bytes, tail = (body, body[:0]) if length is None else (body[:length], body[length:])
    try:
        head = orjson.loads(head_bytes)
        outputs = head["outputs"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise Failure(StatusCode.INTERNAL, f"the worker's answer is not an OIP response: {exc}") from None
    response = pb.ModelInferResponse(
        model_name=str(head.get("model_name") or ""), model_version=str(head.get("model_version") or ""), id=str(head.get("id") or "")
    )
    set_parameters(response.parameters, head.get("parameters") or {})
    offset = 0
    for entry in outputs:
        datatype = entry["datatype"]
        tensor = response.outputs.add(name=entry["name"], datatype=datatype, shape=entry["shape"])
        extra = dict(entry.get("parameters") or {})
        size = extra.pop("binary_data_size", None)
        extra.pop("binary_data", None)
        set_parameters(tensor.parameters, extra)
        if size is not None:
            response.raw_output_contents.append(bytes(tail[offset : offset + size]))
            offset += size
        else:
            response.raw_output_contents.append(pack(datatype, _flatten(entry.get("data") or [])))
    return response


def _flatten(data: Any) -> list[Any]:
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat
