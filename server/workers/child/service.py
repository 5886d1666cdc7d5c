"""One batch through a handler: decode the inputs, call the entry point, encode the outputs.

The input decoding and the output and error contract are TorchServe's (surface §3.1, §3.2).
"""

from __future__ import annotations

import io
import json
import sys
import time
import traceback
from typing import Any

import orjson

from handlers.context import Context, RequestHeaders, RequestProcessor
from handlers.errors import PredictionException

from ...errors import WorkerError
from ...http.responses import torchserve_error
from ..frames import Buffer, split
from ..messages import Metric, Predict, Response, Result
from .loader import Entry

#: The old name of the error that fails a whole batch (tests/property/test_output_json.py).
def decode_value(raw: memoryview, content_type: str | None, decode: bool) -> Any:
    """TorchServe's per-parameter decoding: JSON parsed, text as str, anything else a bytearray."""
    value = bytearray(raw)
    if not decode or not content_type:
        return value
    mime = content_type.split(";", 1)[0].strip().lower()
    try:
        if mime == "application/json":
            return json.loads(value)
        if mime.startswith("text"):
            return value.decode("utf-8")
    except (ValueError, RecursionError):
        # Malformed JSON, bad UTF-8, or JSON nested deeper than the decoder's recursion limit: kept
        # as bytes, so that no request can crash the worker that serves everyone's batches.
        pass
    return value


def encode_output(value: Any) -> tuple[Buffer, str | None]:
    """An output's bytes, plus the content type implied by how they were made (None: raw)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value, None
    if isinstance(value, str):
        return value.encode("utf-8"), None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue(), None
    return to_json(value), "application/json"


#: Types the standard library's encoder refuses and orjson would quietly serialize: left to the
#: former, so that what a handler may return is what it may return in TorchServe.
_JSON_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def to_json(value: Any) -> bytes:
    """TorchServe's two-space JSON of a handler output.

    orjson writes it about 30 times faster than ``json.dumps(indent=2)``, which is a real share of a
    small model's batch (50 us an output). It writes floats in its own shortest form
    (``1.2e-7``, ``0.000012``), which parse to the same numbers, and text as UTF-8. What it would
    change, rather than only spell differently, goes to the standard library: NaN and infinities
    (orjson writes ``null``), non-string keys, integers past 64 bits, subclasses and lone surrogates.
    """
    try:
        encoded = orjson.dumps(value, option=orjson.OPT_INDENT_2 | _JSON_PASSTHROUGH)
        if b"null" not in encoded:
            return encoded
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, indent=2).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        print(f"handler output is not serializable: {exc}", file=sys.stderr)
        raise WorkerError("Unsupported model output data type.", 503) from None


class Service:
    """A loaded handler and the context it keeps between batches."""

    def __init__(
        self, entry: Entry, context: Context, decode_input_request: bool, max_response_size: int | None = None
    ) -> None:
        self.entry = entry
        self.context = context
        self.decode = decode_input_request
        self.max_response_size = max_response_size

    def handle(self, predict: Predict, blob: memoryview) -> tuple[Result, list[Buffer]]:
        """One batch: its Result and the response bodies, in order."""
        requests = predict.requests
        sizes = [size for request in requests for _, _, size in request.params]
        values = iter(split(blob, sizes))
        data: list[dict[str, Any]] = []
        processors: list[RequestProcessor] = []
        for request in requests:
            headers = RequestHeaders(request.headers)
            row = {}
            for name, content_type, _ in request.params:
                row[name] = decode_value(next(values), content_type, self.decode)
                # TorchServe also exposes each parameter's content type as a "header".
                headers[name] = {"content-type": content_type}
            data.append(row)
            processors.append(RequestProcessor(headers))
        context = self.context
        context.request_ids = {i: request.id for i, request in enumerate(requests)}
        context.request_processor = processors
        metrics = context.metrics
        if metrics is not None:
            metrics.request_ids = context.request_ids  # so idx=None tags a metric with every id
        started = time.perf_counter()
        try:
            outputs = self._call(data)
            self._check(outputs, len(requests))
            # TorchServe's PredictionTime: the entry-point call only, and only when it succeeded.
            # A plain number: the frontend records it, so the worker builds no metric for it.
            prediction_ms = (time.perf_counter() - started) * 1000
            parts, responses = self._encode(outputs)
        except WorkerError as exc:
            # Failed batches carry their metrics too: counters recorded before the failure count.
            error_type = exc.type_name if exc.type_name != WorkerError.type_name else None
            return Result(exc.status_code, exc.message, [], metrics=_drain(metrics), error_type=error_type), []
        handler_ms = (time.perf_counter() - started) * 1000
        return Result(200, "", responses, handler_ms, prediction_ms, _drain(metrics)), parts

    def _call(self, data: list[dict[str, Any]]) -> Any:
        try:
            return self.entry(data, self.context)
        except PredictionException as exc:
            raise WorkerError(exc.message, exc.error_code, type_name=exc.type_name) from None
        except MemoryError:
            raise WorkerError("Out of resources", 507) from None
        except Exception as exc:  # noqa: BLE001 - any handler failure fails its batch, never the worker
            traceback.print_exc()
            if "CUDA" in str(exc):
                raise WorkerError("Out of resources", 507) from None
            raise WorkerError("Prediction failed", 503) from None

    @staticmethod
    def _check(outputs: Any, expected: int) -> None:
        if not isinstance(outputs, list):
            print(f"handler returned {type(outputs).__name__}, expected a list", file=sys.stderr)
            raise WorkerError("Invalid model predict output", 503)
        if len(outputs) != expected:
            print(f"handler returned {len(outputs)} outputs for {expected} requests", file=sys.stderr)
            raise WorkerError("number of batch response mismatched", 503)

    def _encode(self, outputs: list[Any]) -> tuple[list[Buffer], list[Response]]:
        parts: list[Buffer] = []
        responses: list[Response] = []
        for idx, output in enumerate(outputs):
            body, implied_type = encode_output(output)
            processor = self.context.request_processor[idx]
            content_type = implied_type
            headers = []
            for key, value in processor.get_response_headers().items():
                if str(key).lower() == "content-type":
                    content_type = str(value)
                else:
                    headers.append((str(key), str(value)))
            status, phrase = processor.get_response_status_code(), processor.get_response_status_phrase() or ""
            if self.max_response_size is not None and len(body) > self.max_response_size:
                # Never shipped: this one request gets the error in its place (TorchServe kills the
                # worker and answers "Worker died."); the rest of the batch and the worker carry on.
                print(
                    f"response to request {(self.context.request_ids or {}).get(idx)} is {len(body)} bytes, "
                    f"over max_response_size ({self.max_response_size}); not sent",
                    file=sys.stderr,
                )
                error = torchserve_error(
                    WorkerError(f"Response of {len(body)} bytes exceeds max_response_size ({self.max_response_size})")
                )
                body, status, phrase, content_type, headers = error.body, error.status, "", error.content_type, []
            parts.append(body)
            responses.append(Response(status, phrase, content_type, headers, len(body)))
        return parts, responses


def _drain(metrics: Any) -> list[Metric] | None:
    """The records the handler made since the last Result; None when it made none (most batches)."""
    drain = getattr(metrics, "drain", None)
    records: list[Metric] | None = drain() if callable(drain) else None
    return records or None
