"""The Open Inference Protocol (KServe v2) in the worker: reading an inference request, writing its response.

The wire format is the OIP REST specification's (kserve/open-inference-protocol,
``specification/protocol/inference_rest.md``) with Triton's binary tensor data extension
(triton-inference-server/server, ``docs/protocol/extension_binary_data.md``): the request's
``Inference-Header-Content-Length`` header gives the length of its JSON object; what follows are
the binary inputs, each taking the ``parameters.binary_data_size`` bytes its input names, in the
order of ``inputs``. Binary tensors are little-endian, row-major and unpadded; a BOOL is one byte;
a BYTES element is a 4-byte little-endian length followed by that many bytes.

What the handler receives for a request is what TorchServe's ``kservev2`` envelope gives it (surface
§3.7): the request's ``inputs`` objects, in order, each with its ``data`` replaced by the tensor as
nested Python lists in its ``shape`` (``numpy.reshape(...).tolist()``), or, for BYTES, by its first
element. Binary inputs become the same Python values, so a handler cannot tell how a tensor came.

Anything wrong with a request is an ``OipError``: that request alone is answered ``{"error": ...}``
with its status (400), and the handler never sees it.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ...oip_signature import Signature

#: The request header that says where the JSON object ends and binary tensor data begins.
HEADER_LENGTH = "inference-header-content-length"
#: The response header that says the same of a response holding binary outputs (Triton's spelling).
RESPONSE_HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
BINARY = "application/octet-stream"


class OipError(Exception):
    """A request the protocol refuses: it alone is answered ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())  # one line, whatever went into it
        self.status = status

    def body(self) -> bytes:
        return orjson.dumps({"error": self.message})


@dataclass(frozen=True)
class Datatype:
    name: str
    #: Little-endian numpy dtype of an element; None for BYTES (variable size).
    dtype: np.dtype[Any] | None
    #: Bytes an element takes in binary form; 0 for BYTES.
    size: int


def _numeric(name: str, code: str) -> Datatype:
    dtype = np.dtype(code)
    return Datatype(name, dtype, dtype.itemsize)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _numeric("BOOL", "?"),
        _numeric("UINT8", "u1"), _numeric("UINT16", "<u2"), _numeric("UINT32", "<u4"), _numeric("UINT64", "<u8"),
        _numeric("INT8", "i1"), _numeric("INT16", "<i2"), _numeric("INT32", "<i4"), _numeric("INT64", "<i8"),
        _numeric("FP16", "<f2"), _numeric("FP32", "<f4"), _numeric("FP64", "<f8"),
        # bfloat16: numpy has no such type; binary elements are the upper halves of float32s.
        Datatype("BF16", np.dtype("<u2"), 2),
        Datatype("BYTES", None, 0),
    )
}  # fmt: skip
BYTES = DATATYPES["BYTES"]
BF16 = DATATYPES["BF16"]

_NUMERIC_KINDS = frozenset("biuf")  # what JSON numbers and booleans become in numpy
_LENGTH = struct.Struct("<I")


# -- the model's signature ------------------------------------------------------------------------


# -- requests -------------------------------------------------------------------------------------


@dataclass
class InferRequest:
    """One inference request, read and checked."""

    id: str | None
    parameters: dict[str, Any]
    #: The request's input objects as sent, each with ``data`` as kservev2 hands it to the handler.
    inputs: list[dict[str, Any]]
    #: The requested outputs (``{"name", "parameters"}``), or None: all of them.
    outputs: list[dict[str, Any]] | None

    @property
    def input_names(self) -> list[str]:
        return [entry["name"] for entry in self.inputs]


def json_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value; None without one."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise OipError(f"Inference-Header-Content-Length must be a number of bytes, not {value!r}")
    return int(text)


def parse_request(body: bytes | bytearray | memoryview, header_length: int | None = None) -> InferRequest:
    """Read an inference request: JSON, or (``header_length`` given) JSON followed by binary tensors."""
    view = memoryview(body)
    if header_length is None:
        head, binary = view, view[:0]
    else:
        if not 0 < header_length <= len(view):
            raise OipError(
                f"Inference-Header-Content-Length {header_length} must be between 1 and the body's length "
                f"({len(view)} bytes)"
            )
        head, binary = view[:header_length], view[header_length:]
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise OipError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise OipError("the inference request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError("the request's id must be a string")
    parameters = _parameters(request.get("parameters"), "the request's parameters")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OipError("the inference request has no inputs: it needs a non-empty inputs list")
    offset = 0
    for i, entry in enumerate(inputs):
        offset = _read_input(entry, i, binary, offset)
    if offset != len(binary):
        raise OipError(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size "
            f"({offset} bytes in all)"
        )
    return InferRequest(request_id, parameters, inputs, _requested_outputs(request.get("outputs")))


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OipError(f"{what} must be a JSON object")
    return value


def _read_input(entry: Any, index: int, binary: memoryview, offset: int) -> int:
    """Check input ``index`` and put its handler value in ``data``; returns where binary data goes on."""
    if not isinstance(entry, dict):
        raise OipError(f"inputs[{index}] must be a JSON object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str):
        raise OipError(f"inputs[{index}] has no name")
    named = entry.get("datatype")
    datatype = DATATYPES.get(named) if isinstance(named, str) else None
    if datatype is None:
        raise OipError(
            f"input {name!r} has datatype {named!r}; the datatypes are {', '.join(DATATYPES)}"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise OipError(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    size = _parameters(entry.get("parameters"), f"input {name!r}'s parameters").get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise OipError(f"input {name!r} has neither data nor parameters.binary_data_size")
        entry["data"] = _from_json(name, datatype, shape, count, entry["data"])
        return offset
    if "data" in entry:
        raise OipError(f"input {name!r} has both data and parameters.binary_data_size")
    if type(size) is not int or size < 0:
        raise OipError(f"input {name!r}: binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
        raise OipError(
            f"input {name!r} needs {size} bytes of binary data at offset {offset}; the body has "
            f"{len(binary)} after the JSON (is Inference-Header-Content-Length right?)"
        )
    entry["data"] = _from_binary(name, datatype, shape, count, binary[offset : offset + size])
    return offset + size


def _from_json(name: str, datatype: Datatype, shape: list[int], count: int, data: Any) -> Any:
    if not isinstance(data, list):
        raise OipError(f"input {name!r}: data must be a JSON array")
    if datatype is BYTES:
        found = _count_elements(data)
        if found != count:
            raise OipError(f"input {name!r}: shape {shape} holds {count} elements; data has {found}")
        if not data:
            raise OipError(f"input {name!r}: a BYTES input needs at least one element")
        return data[0]  # kservev2 hands BYTES inputs over as their first element
    try:
        array = np.array(data)
    except (ValueError, OverflowError):
        raise OipError(f"input {name!r}: data is not a rectangular array of numbers") from None
    if array.dtype.kind not in _NUMERIC_KINDS and array.size:
        raise OipError(f"input {name!r}: data must hold numbers (or booleans) for datatype {datatype.name}")
    if array.size != count:
        raise OipError(f"input {name!r}: shape {shape} holds {count} elements; data has {array.size}")
    return array.reshape(shape).tolist()


def _count_elements(data: list[Any]) -> int:
    """Elements of a possibly nested JSON array (the leaves)."""
    count = 0
    stack: list[Any] = [data]
    while stack:
        for item in stack.pop():
            if isinstance(item, list):
                stack.append(item)
            else:
                count += 1
    return count


def _from_binary(name: str, datatype: Datatype, shape: list[int], count: int, chunk: memoryview) -> Any:
    if datatype is BYTES:
        elements = _split_bytes(name, chunk)
        if len(elements) != count:
            raise OipError(f"input {name!r}: shape {shape} holds {count} elements; its binary data has {len(elements)}")
        if not elements:
            raise OipError(f"input {name!r}: a BYTES input needs at least one element")
        return _bytes_value(elements[0])
    expected = count * datatype.size
    if len(chunk) != expected:
        raise OipError(
            f"input {name!r}: binary_data_size is {len(chunk)} bytes; shape {shape} of {datatype.name} takes {expected}"
        )
    assert datatype.dtype is not None
    array = np.frombuffer(chunk, dtype=datatype.dtype).reshape(shape)
    if datatype is BF16:
        array = _bf16_to_float32(array)
    return array.tolist()


def _split_bytes(name: str, chunk: memoryview) -> list[memoryview]:
    elements = []
    offset, end = 0, len(chunk)
    while offset < end:
        if offset + 4 > end:
            raise OipError(f"input {name!r}: its BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise OipError(f"input {name!r}: a BYTES element of {length} bytes runs past its binary data")
        elements.append(chunk[offset : offset + length])
        offset += length
    return elements


def _bytes_value(element: memoryview) -> str | bytes:
    """A binary BYTES element as JSON would have given it: text, unless it is not UTF-8."""
    raw = bytes(element)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _bf16_to_float32(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (array.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The bfloat16 bits of float32 values, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _requested_outputs(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise OipError("the request's outputs must be a list of {name, parameters} objects")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise OipError(f"outputs[{i}] must be a JSON object with a name")
        _parameters(entry.get("parameters"), f"output {entry['name']!r}'s parameters")
    return value


def check_inputs(request: InferRequest, signature: Signature | None) -> None:
    """Inputs the model declares must come with its datatype and a shape its own fits (-1: any size)."""
    if signature is None:
        return
    for entry in request.inputs:
        spec = signature.input(entry["name"])
        if spec is None:
            continue
        if entry["datatype"] != spec.datatype:
            raise OipError(f"input {spec.name!r} must be {spec.datatype}, not {entry['datatype']}")
        shape = entry["shape"]
        if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
            raise OipError(f"input {spec.name!r} has shape {shape}; the model takes {list(spec.shape)}")


def output_spec(index: int, request: InferRequest, signature: Signature | None) -> tuple[str, str | None]:
    """The name and declared datatype of the handler's ``index``-th output for this request: the
    signature's, else (as TorchServe's kservev2 envelope names them) the input of the same index's."""
    if signature is not None and index < len(signature.outputs):
        spec = signature.outputs[index]
        return spec.name, spec.datatype
    if index < len(request.inputs):
        return request.inputs[index]["name"], None
    return f"output-{index}", None


def check_requested(request: InferRequest, signature: Signature | None) -> None:
    """Before inference: every requested output must be one the model will name."""
    if request.outputs is None:
        return
    known = [output_spec(i, request, signature)[0] for i in range(max(len(request.inputs), _declared(signature)))]
    for entry in request.outputs:
        if entry["name"] not in known:
            raise OipError(f"unknown output {entry['name']!r}; the model's outputs are {', '.join(known)}")


def _declared(signature: Signature | None) -> int:
    return len(signature.outputs) if signature is not None else 0


# -- responses ------------------------------------------------------------------------------------


def to_array(value: Any) -> np.ndarray[Any, Any]:
    """A handler's output as a numpy array (anything numpy cannot make rectangular: one object)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    if isinstance(value, np.ndarray):
        return value
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        array = np.empty((), dtype=object)
        array[()] = value
    return array


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return "BOOL"
    if kind in "iu" and size in (1, 2, 4, 8):
        return f"{'UINT' if kind == 'u' else 'INT'}{size * 8}"
    if kind == "f" and size in (2, 4, 8):
        return f"FP{size * 8}"
    if kind in "USO":
        return "BYTES"
    raise OipError(f"the model answered a tensor of {array.dtype}, which no OIP datatype holds", 500)


@dataclass
class Output:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray[Any, Any]


def make_output(name: str, value: Any, declared: str | None) -> Output:
    """One output tensor: the handler's value, as the datatype the model declares if it does."""
    array = to_array(value)
    datatype = declared or datatype_of(array)
    if datatype == "BYTES":
        if array.dtype.kind not in "USO":
            array = array.astype(object)
    else:
        target = np.float32 if datatype == "BF16" else DATATYPES[datatype].dtype
        if array.dtype != target:
            try:
                array = array.astype(target)
            except (ValueError, TypeError, OverflowError):
                raise OipError(f"output {name!r} cannot be given as {datatype}: the model answered {array.dtype}", 500) from None
    # A scalar is a one-element tensor, as TorchServe's kservev2 envelope answers it.
    shape = list(array.shape) or [1]
    return Output(name, datatype, shape, array)


def _json_data(output: Output) -> list[Any]:
    flat = output.array.reshape(-1)
    if output.datatype == "BF16":
        flat = _bf16_to_float32(_float32_to_bf16(flat))
    data: list[Any] = flat.tolist()
    if output.datatype == "BYTES":
        for i, element in enumerate(data):
            if isinstance(element, (bytes, bytearray)):
                try:
                    data[i] = element.decode("utf-8")
                except UnicodeDecodeError:
                    raise OipError(
                        f"output {output.name!r} holds bytes that are not UTF-8 text: request it as binary data "
                        '(its parameters "binary_data": true)', 500
                    ) from None
    return data


def _binary_data(output: Output) -> bytes:
    flat = output.array.reshape(-1)
    if output.datatype == "BYTES":
        parts = []
        for element in flat.tolist():
            if isinstance(element, str):
                raw = element.encode("utf-8")
            elif isinstance(element, (bytes, bytearray)):
                raw = bytes(element)
            else:
                raw = orjson.dumps(element, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if output.datatype == "BF16":
        return _float32_to_bf16(flat).astype("<u2").tobytes()
    dtype = DATATYPES[output.datatype].dtype
    return np.ascontiguousarray(flat, dtype=dtype).tobytes()


def _wants_binary(requested: dict[str, Any] | None, default: bool) -> bool:
    """Triton's rule: an output's ``binary_data`` overrides the request's ``binary_data_output``
    (an output's own ``binary_data_output`` is taken as ``binary_data``)."""
    parameters = (requested or {}).get("parameters") or {}
    for key in ("binary_data", "binary_data_output"):
        if key in parameters:
            return parameters[key] is True
    return default


def encode_response(
    model_name: str, model_version: str | None, request_id: str, request: InferRequest, outputs: Sequence[Output]
) -> tuple[bytes, str, list[tuple[str, str]]]:
    """The response body, its content type and extra headers: JSON, or JSON followed by the binary
    outputs (with ``Inference-Header-Content-Length``) when any output is asked for as binary."""
    by_name = {output.name: output for output in outputs}
    if request.outputs is None:
        chosen: list[tuple[Output, dict[str, Any] | None]] = [(output, None) for output in outputs]
    else:
        chosen = []
        for entry in request.outputs:
            output = by_name.get(entry["name"])
            if output is None:
                raise OipError(f"unknown output {entry['name']!r}; the model's outputs are {', '.join(by_name)}")
            chosen.append((output, entry))
    binary_default = request.parameters.get("binary_data_output") is True
    described = []
    blobs: list[bytes] = []
    for output, requested in chosen:
        item: dict[str, Any] = {"name": output.name, "shape": output.shape, "datatype": output.datatype}
        if _wants_binary(requested, binary_default):
            blob = _binary_data(output)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = _json_data(output)
        described.append(item)
    reply: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        reply["model_version"] = model_version
    reply["id"] = request.id if request.id is not None else request_id
    reply["outputs"] = described
    try:
        head = orjson.dumps(reply, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as exc:
        raise OipError(f"the model's output cannot be written as JSON: {exc}", 500) from None
    if not blobs:
        return head, JSON, []
    return b"".join((head, *blobs)), BINARY, [(RESPONSE_HEADER_LENGTH, str(len(head)))]
