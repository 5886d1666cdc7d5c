"""Request envelopes: what a request becomes for the handler, and what the handler's answer becomes.

TorchServe wraps a model's entry point in the envelope ``service_envelope`` names (surface §3.7,
``ts/torch_handler/request_envelope/``): ``body``, ``json``, ``kserve`` (KServe v1) and ``kservev2``.
Its envelopes read a whole batch at once, and ``kserve`` and ``kservev2`` read request 0 only.
Here an envelope reads one request: the worker expands each request of a batch into the handler's
rows by its own envelope, calls the handler once for the batch, and gives each envelope back the
outputs of its request's rows. For a batch of one request that is exactly TorchServe's envelope;
larger batches, which TorchServe's ``kserve`` and ``kservev2`` fail, are answered request by request.
Each request may also name its own envelope: the KServe v1 routes ``kserve``, the Open Inference
Protocol routes ``oip``, so requests of every route to one model share its queue and its batches.

``kserve`` chosen by a route reads strictly: a body that is not ``{"instances": [...]}`` is that
request's 400 ``{"error": ...}`` (KServe's error body), where TorchServe's envelope fails the batch.
``oip`` reads as ``kservev2`` does and answers full OIP (``oip.py``).
"""

from __future__ import annotations

import json
from base64 import b64decode
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.context import Context, RequestHeaders

from ...oip_signature import Signature, read_signature
from . import oip
from .oip import OipError

#: A request the envelope refuses: it alone is answered ``{"error": ...}``, the handler never sees it.
EnvelopeError = OipError

#: What ``service_envelope`` (or a manifest's ``model.envelope``) may name.
CONFIGURABLE = ("body", "json", "kserve", "kservev2")


@dataclass
class Call:
    """One request, as its envelope sees it."""

    request_id: str
    headers: RequestHeaders
    context: Context

    @property
    def explain(self) -> bool:
        return bool(self.headers.get("explain") == "True")


@dataclass
class Formatted:
    """A response the envelope wrote itself: its body, content type and extra headers."""

    body: bytes
    content_type: str
    headers: list[tuple[str, str]]


class Envelope:
    """Reads one request into handler rows (``parse``) and writes its reply from their outputs (``format``)."""

    name = ""
    #: Takes the request's parameters as raw bytes rather than decoded (JSON parsed, text as str).
    raw = False
    #: Chosen by a protocol's route: a request it cannot read is that request's 400 ``{"error": ...}``,
    #: and a request the handler failed is answered so too. TorchServe's envelopes fail the batch (503).
    strict = False

    def parse(self, row: dict[str, Any], call: Call) -> tuple[Any, Any]:
        """``(handler rows, state for format)``; any exception but EnvelopeError is TorchServe's 503."""
        raise NotImplementedError

    def format(self, outputs: Any, state: Any, call: Call) -> Any:
        """The request's reply from its rows' outputs: a list holding the one handler-style output
        (TorchServe's envelopes), or a ``Formatted`` response."""
        raise NotImplementedError


def _payload(row: dict[str, Any]) -> Any:
    return row.get("data") or row.get("body")


class Body(Envelope):
    """``body``: the handler gets each request's payload itself; its outputs go back unchanged."""

    name = "body"

    def parse(self, row: dict[str, Any], call: Call) -> tuple[Any, Any]:
        return [_payload(row)], None

    def format(self, outputs: Any, state: Any, call: Call) -> Any:
        return outputs


class Json(Envelope):
    """``json``: the request's ``instances`` are the handler's rows (``{"b64": ...}`` values decoded);
    the reply is the text ``{"predictions": [their outputs]}``, written by ``json.dumps``."""

    name = "json"

    def parse(self, row: dict[str, Any], call: Call) -> tuple[Any, Any]:
        instances = (_payload(row) or row)["instances"]
        if isinstance(instances[0], dict):
            for i, instance in enumerate(instances):
                if list(instance.keys()) == ["b64"]:
                    instances[i] = b64decode(instance["b64"])
                    continue
                for key, value in instance.items():
                    if isinstance(value, dict) and list(value.keys()) == ["b64"]:
                        instance[key] = b64decode(value["b64"])
        return list(instances), len(instances)

    def format(self, outputs: Any, state: Any, call: Call) -> Any:
        return [json.dumps({"predictions": outputs[0:state]})]


class KServe(Envelope):
    """``kserve`` (KServe v1): the request's ``instances`` are the handler's rows (a body that is
    bytes is read as JSON); the reply is ``{"predictions": outputs}``, or ``{"explanations": ...}``."""

    name = "kserve"

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def parse(self, row: dict[str, Any], call: Call) -> tuple[Any, Any]:
        value = _payload(row)
        if self.strict:
            return _instances(value), None
        if isinstance(value, (bytes, bytearray)):
            value = json.loads(value.decode())
        return value.get("instances"), None

    def format(self, outputs: Any, state: Any, call: Call) -> Any:
        return [{"explanations" if call.explain else "predictions": outputs}]


def _instances(value: Any) -> list[Any]:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = json.loads(value.decode())
        except (ValueError, RecursionError) as exc:
            raise EnvelopeError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EnvelopeError('the request body must be a JSON object: {"instances": [...]}')
    instances = value.get("instances")
    if not isinstance(instances, list):
        raise EnvelopeError('the request has no instances: its body must be {"instances": [...]}')
    return instances


#: numpy's names for the datatypes TorchServe's kservev2 envelope writes (by dtype name, then kind).
_KSERVEV2_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "object": "BYTES", "U": "BYTES",
}  # fmt: skip


class KServeV2(Envelope):
    """``kservev2``: the request's ``inputs`` are the handler's rows, each ``data`` reshaped to its
    ``shape`` (BYTES: its first element); output ``i`` is named after input ``i``, flattened."""

    name = "kservev2"

    def parse(self, row: dict[str, Any], call: Call) -> tuple[Any, Any]:
        value = _payload(row)
        if isinstance(value, (bytes, bytearray)):
            value = json.loads(value.decode("utf8"))
        names = []
        for entry in value["inputs"]:
            if entry["datatype"] == "BYTES":
                entry["data"] = entry["data"][0]
            else:
                entry["data"] = np.array(entry["data"]).reshape(tuple(entry["shape"])).tolist()
            names.append(entry["name"])
        given = value.get("id")
        return value.get("inputs"), (names, given if given and given.strip() else None)

    def format(self, outputs: Any, state: Any, call: Call) -> Any:
        names, given = state
        model = (call.context.manifest or {})["model"]
        return [{
            "id": given if given is not None else call.request_id,
            "model_name": model.get("modelName"),
            "model_version": model.get("modelVersion"),
            "outputs": [_kservev2_output(item, names[i]) for i, item in enumerate(outputs)],
        }]  # fmt: skip


def _kservev2_output(item: Any, name: str) -> dict[str, Any]:
    array = np.array(item).flatten()
    dtype = array.dtype
    datatype = _KSERVEV2_DATATYPES.get(str(dtype)) or _KSERVEV2_DATATYPES[dtype.kind]
    return {"name": name, "datatype": datatype, "data": array.tolist(), "shape": list(array.shape)}


class Oip(Envelope):
    """``oip`` (the Open Inference Protocol's routes): read as ``kservev2`` reads, JSON or binary
    tensors; answered in full OIP, outputs named by the model's ``oip`` signature if it has one."""

    name = "oip"
    raw = True
    strict = True

    def __init__(self, signature: Signature | None) -> None:
        self.signature = signature

    def parse(self, row: dict[str, Any], call: Call) -> tuple[Any, Any]:
        body = row.get("body")
        if body is None:
            body = row.get("data")
        if body is None:
            body = next(iter(row.values()), None)
        if body is None:
            raise EnvelopeError("the inference request has no body: an inference request JSON object is required")
        request = oip.parse_request(body, oip.json_length(call.headers.get(oip.HEADER_LENGTH)))
        oip.check_inputs(request, self.signature)
        oip.check_requested(request, self.signature)
        return request.inputs, request

    def format(self, outputs: Any, state: Any, call: Call) -> Any:
        request: oip.InferRequest = state
        if not isinstance(outputs, list):
            try:
                outputs = list(outputs)
            except TypeError:
                raise EnvelopeError(
                    f"the handler answered {type(outputs).__name__}, not a list with one output per input", 500
                ) from None
        tensors = []
        for i, value in enumerate(outputs):
            name, declared = oip.output_spec(i, request, self.signature)
            tensors.append(oip.make_output(name, value, declared))
        context = call.context
        model = (context.manifest or {}).get("model") or {}
        version = model.get("modelVersion") or "1.0"
        body, content_type, headers = oip.encode_response(context.model_name, version, call.request_id, request, tensors)
        return Formatted(body, content_type, headers)


def configured(name: str) -> Envelope:
    """The envelope ``service_envelope`` names, as TorchServe applies it."""
    envelopes: dict[str, Envelope] = {"body": Body(), "json": Json(), "kserve": KServe(), "kservev2": KServeV2()}
    try:
        return envelopes[name]
    except KeyError:
        raise ValueError(f"unknown service envelope {name!r}: it must be one of {', '.join(CONFIGURABLE)}") from None


def per_request(model_yaml_config: dict[str, Any] | None) -> dict[str, Envelope]:
    """The envelopes a request may name, by name: the routes' (``kserve``, ``oip``) and TorchServe's others."""
    try:
        signature = read_signature(model_yaml_config)
    except ValueError as exc:
        # The metadata route reports it; inference goes on with the inputs' names.
        print(f"ignoring the model config's oip signature: {exc}", flush=True)
        signature = None
    return {"body": Body(), "json": Json(), "kservev2": KServeV2(), "kserve": KServe(strict=True), "oip": Oip(signature)}


def error_body(message: str) -> bytes:
    """KServe's (and the OIP's) error body."""
    return OipError(message).body()
