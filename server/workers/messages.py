"""The messages between the frontend and a worker: one dataclass per frame kind, shared by both ends.

A message is a frame's ``meta`` (see ``frames``): orjson writes the dataclass as it is, and the
receiving end rebuilds it with ``from_meta``. Request and response bodies are never in a message:
they travel in the frame's blob, and the entries give the size of each part, in order.

JSON has no tuples: the pairs and triples below arrive as lists, which unpack the same.
The dataclasses have no ``__slots__``: orjson writes one from its ``__dict__`` several times faster.

This module must stay importable without torch: the worker imports it before its handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: One metric a handler recorded (name, unit, type, value, dimensions, request_id).
Metric = dict[str, Any]
#: One request parameter: its name, its content type (None: not given), its size in the blob.
Param = tuple[str, str | None, int]


@dataclass
class Load:
    """frontend -> worker, once: what to load. The worker reads nothing else."""

    model_name: str
    model_dir: str
    handler: str
    batch_size: int
    gpu_id: int | None
    manifest: dict[str, Any]
    model_yaml_config: dict[str, Any]
    limit_max_image_pixels: bool
    decode_input_request: bool
    # The worker answers a larger handler response with an error instead of sending it.
    max_response_size: int
    # What handlers see as context.system_properties["server_version"].
    server_version: str
    # The model's request envelope (body, json, kserve, kservev2): service_envelope, else the
    # manifest's model.envelope; None: none. Requests that name their own (Request.envelope) use theirs.
    envelope: str | None = None
    # overlapStages: the next batch's preprocess runs while this one's inference does (child/pipeline.py).
    overlap_stages: bool = False

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Load:
        return cls(**meta)


@dataclass
class Loaded:
    """worker -> frontend: the load's outcome; ``code`` 200 or the failure's status."""

    code: int
    message: str
    pid: int | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Loaded:
        return cls(**meta)


@dataclass
class Request:
    id: str
    headers: list[tuple[str, str]]
    params: list[Param]  # in the order the handler sees them
    # The envelope this request is read and answered in: None, the model's (Load.envelope);
    # "kserve" (KServe v1 routes), "oip" (Open Inference Protocol routes). See child/envelopes.py.
    envelope: str | None = None


@dataclass
class Predict:
    """frontend -> worker: one batch; the blob holds every request's parameters, in order."""

    requests: list[Request]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Predict:
        return cls([Request(r["id"], r["headers"], r["params"], r.get("envelope")) for r in meta["requests"]])


@dataclass
class Response:
    status: int
    phrase: str
    content_type: str | None
    headers: list[tuple[str, str]]
    size: int


@dataclass
class Result:
    """worker -> frontend: one batch's outcome. ``code`` 200: one response per request, their
    bodies in the blob; else the whole batch failed with this status and message."""

    code: int
    message: str
    responses: list[Response]
    handler_ms: float | None = None  # the handler's whole turn, decoding and encoding included
    prediction_ms: float | None = None  # the entry point's call, when it succeeded
    metrics: list[Metric] | None = None  # what the handler recorded since the last Result
    error_type: str | None = None  # a failed batch's error type, when the handler named one

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Result:
        responses = [
            Response(r["status"], r["phrase"], r["content_type"], r["headers"], r["size"]) for r in meta["responses"]
        ]
        return cls(
            meta["code"], meta["message"], responses, meta["handler_ms"], meta["prediction_ms"], meta["metrics"],
            meta["error_type"],
        )  # fmt: skip


@dataclass
class Piece:
    """worker -> frontend, any number of times before a batch's Result: one piece of request
    ``request``'s (its index in the batch) streamed response, in the blob. The first piece's status,
    content type and headers are the response's; a later piece's content type says how its own
    bytes were made (JSON or not), for the frontend to reframe them (server-sent events, ndjson).

    A streamed request's entry in the Result then ends its stream: status 0 for "ended, nothing
    more", a status below 400 for its last piece, 400 and above for an error after the pieces.
    """

    request: int
    status: int
    phrase: str
    content_type: str | None
    headers: list[tuple[str, str]]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Piece:
        return cls(meta["request"], meta["status"], meta["phrase"], meta["content_type"], meta["headers"])


@dataclass
class Cancel:
    """frontend -> worker, while a batch runs: the clients of these requests have gone."""

    ids: list[str]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Cancel:
        return cls(meta["ids"])
