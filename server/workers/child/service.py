"""One batch through a handler: decode the inputs, call the entry point, encode the outputs.

The input decoding and the output and error contract are TorchServe's (surface §3.1, §3.2).
Requests with an envelope (the model's ``service_envelope``, or their own: KServe v1, OIP) take
another path, ``_handle_enveloped``; see ``envelopes.py``. Requests without one never touch it.
"""

from __future__ import annotations

import copy
import io
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from handlers.context import Context, RequestHeaders, RequestProcessor
from handlers.errors import PredictionException

from ...errors import WorkerError
from ...http.responses import Response as HttpResponse
from ...http.responses import torchserve_error
from ..frames import Buffer, split
from ..messages import Metric, Piece, Predict, Request, Response, Result
from .loader import Entry

if TYPE_CHECKING:
    from .envelopes import Call, Envelope


class StreamChannel(Protocol):
    """What streaming needs of the worker's channel (``channel.Channel``)."""

    def send_piece(self, piece: Piece, body: Buffer) -> None: ...

    def gone(self, request_id: str) -> bool: ...


# How a streamed request's Result entry says its stream ended: nothing more to send.
_ENDED = object()


@dataclass
class _Broken:
    """A stream whose iterator raised: its request's entry is an error after its pieces."""

    message: str


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


def staged_handler(entry: Entry) -> Any:
    """The handler whose steps may run as a pipeline: one whose entry point is ``BaseHandler``'s own
    ``handle`` (preprocess, inference, postprocess); None for a function or a ``handle`` of its own."""
    base = sys.modules.get("handlers.base_handler")  # imported by any handler that has the steps
    handler = getattr(entry, "__self__", None)
    if base is None or not isinstance(handler, base.BaseHandler):
        return None
    if type(handler).handle is not base.BaseHandler.handle:
        return None
    return handler


def _say_overlap(entry: Entry, handler: Any) -> None:
    """The model log's word on ``overlapStages``: on, or why not."""
    name = type(getattr(entry, "__self__", None) or entry).__name__
    if handler is None:
        print(f"overlapStages: {name} does not use BaseHandler's handle; its batches run whole, one at a time")
    elif not handler.overlaps_safely():
        print(
            f"overlapStages: {name} does not declare its steps thread-safe (stages_thread_safe = True); "
            "overlapping them as the model's configuration asks"
        )
    else:
        print(f"overlapStages: {name}'s preprocess of a batch overlaps the previous batch's inference")


@dataclass
class Batch:
    """One batch on its way through the worker: read by ``Service.prepare``, then run and answered
    by ``Service.complete``. With overlapped stages the two run on different threads, so everything
    that is the batch's own lives here, its context included."""

    requests: list[Request]
    context: Context
    data: Any = None  # the handler's input; with overlapped stages, its preprocessed StartedBatch
    plans: list[_Plan] | None = None  # with envelopes: each request's plan
    n_rows: int = 0  # with envelopes: the rows the handler gets
    calls: bool = True  # whether the handler runs (not when envelopes refused every request)
    error: WorkerError | None = None  # failed while being read or preprocessed
    prepare_ms: float = 0.0  # the handler's time in ``prepare`` (an overlapped preprocess)
    streamed: set[int] = field(default_factory=set)  # requests that have sent a piece


class Service:
    """A loaded handler and the context it keeps between batches."""

    def __init__(
        self, entry: Entry, context: Context, decode_input_request: bool, max_response_size: int | None = None,
        envelope: str | None = None, overlap_stages: bool = False,
    ) -> None:  # fmt: skip
        self.entry = entry
        self.context = context
        self.decode = decode_input_request
        self.max_response_size = max_response_size
        #: Where streamed pieces go, and how cancellations are read (set by the worker's main).
        self.channel: StreamChannel | None = None
        #: The model's envelope (``service_envelope``), for requests that do not name their own.
        self.envelope: Envelope | None = None
        #: The envelopes requests may name; made (and numpy imported) by the first such request.
        self._envelopes: dict[str, Envelope] | None = None
        if envelope is not None:
            from .envelopes import configured

            self.envelope = configured(envelope)
        #: The handler whose steps run as a pipeline (``overlapStages``); None: batches run whole.
        self.stages: Any = staged_handler(entry) if overlap_stages else None
        if overlap_stages:
            _say_overlap(entry, self.stages)

    @property
    def pipelined(self) -> bool:
        return self.stages is not None

    def handle(self, predict: Predict, blob: memoryview) -> tuple[Result, list[Buffer]]:
        """One batch: its Result and the response bodies, in order."""
        return self.complete(self.prepare(predict, blob))

    def prepare(self, predict: Predict, blob: memoryview) -> Batch:
        """Read a batch's inputs for the handler and, with overlapped stages, preprocess them."""
        started = time.perf_counter()
        requests = predict.requests
        batch = Batch(requests, self._batch_context())
        try:
            if self.envelope is not None or any(request.envelope is not None for request in requests):
                self._expand(batch, blob)
            else:
                self._read(batch, blob)
            if batch.calls and self.stages is not None:
                batch.data = self._guarded(self.stages.start_batch, batch.data, batch.context)
        except WorkerError as exc:
            batch.error = exc
        batch.prepare_ms = (time.perf_counter() - started) * 1000
        return batch

    def complete(self, batch: Batch) -> tuple[Result, list[Buffer]]:
        """Run a prepared batch's handler (the rest of its steps) and answer its requests."""
        started = time.perf_counter()
        metrics = batch.context.metrics
        try:
            if batch.error is not None:
                raise batch.error
            if batch.plans is not None:
                parts, responses, prediction_ms = self._complete_enveloped(batch, batch.plans)
            else:
                outputs = self._call(batch)
                self._check(outputs, len(batch.requests))
                # TorchServe's PredictionTime: the entry-point call only, and only when it succeeded.
                # A plain number: the frontend records it, so the worker builds no metric for it.
                prediction_ms = batch.prepare_ms + (time.perf_counter() - started) * 1000
                if any(hasattr(output, "__next__") for output in outputs):
                    outputs = self._stream(batch, outputs)
                parts, responses = self._encode(batch, outputs)
        except WorkerError as exc:
            # Failed batches carry their metrics too: counters recorded before the failure count.
            error_type = exc.type_name if exc.type_name != WorkerError.type_name else None
            return Result(exc.status_code, exc.message, [], metrics=_drain(metrics), error_type=error_type), []
        handler_ms = batch.prepare_ms + (time.perf_counter() - started) * 1000
        return Result(200, "", responses, handler_ms, prediction_ms, _drain(metrics)), parts

    def _batch_context(self) -> Context:
        """The context a batch's handler sees: the worker's own, or with overlapped stages a copy
        per batch, since two batches are in the handler at once (metrics still go to one store)."""
        if self.stages is None:
            return self.context
        context = copy.copy(self.context)
        if context.metrics is not None:
            context.metrics = copy.copy(context.metrics)  # its own request ids, the same records
        return context

    def _read(self, batch: Batch, blob: memoryview) -> None:
        """A batch without envelopes: each request's parameters, decoded, as one row."""
        requests = batch.requests
        values = iter(split(blob, [size for request in requests for _, _, size in request.params]))
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
        batch.data = data
        context = batch.context
        context.request_ids = {i: request.id for i, request in enumerate(requests)}
        context.request_processor = processors
        context.piece_sink = lambda idx, value: self._piece(batch, idx, value)
        context.client_gone = lambda idx: self._gone(requests[idx].id)
        if context.metrics is not None:
            context.metrics.request_ids = context.request_ids  # so idx=None tags a metric with every id

    # -- streamed responses ---------------------------------------------------------------------

    def _piece(self, batch: Batch, idx: int, value: Any) -> None:
        """Send one piece of request ``idx``'s response now, with its status and headers so far."""
        if self.channel is None:
            raise RuntimeError("streamed responses need the worker's channel")
        if self._gone(batch.requests[idx].id):
            return  # nobody reads it
        body, content_type = encode_output(value)
        processor = batch.context.request_processor[idx]
        headers = []
        for key, header in processor.get_response_headers().items():
            if str(key).lower() == "content-type":
                content_type = str(header)
            else:
                headers.append((str(key), str(header)))
        status, phrase = processor.get_response_status_code(), processor.get_response_status_phrase() or ""
        self.channel.send_piece(Piece(idx, status, phrase, content_type, headers), body)
        batch.streamed.add(idx)

    def _gone(self, request_id: str) -> bool:
        return self.channel is not None and self.channel.gone(request_id)

    def _stream(self, batch: Batch, outputs: list[Any]) -> list[Any]:
        """Send the items of the outputs that are iterators as pieces, taking one from each in
        turn, so that every stream of the batch moves; the outputs with each iterator replaced by
        how its stream ended."""
        final = list(outputs)
        active = {idx: output for idx, output in enumerate(outputs) if hasattr(output, "__next__")}
        while active:
            for idx, iterator in list(active.items()):
                if self._gone(batch.requests[idx].id):
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()  # a generator's finally blocks run: it stops generating
                    del active[idx]
                    final[idx] = _ENDED
                    continue
                try:
                    item = next(iterator)
                except StopIteration:
                    del active[idx]
                    # A stream with no piece at all is an empty response.
                    final[idx] = _ENDED if idx in batch.streamed else b""
                    continue
                except Exception as exc:  # noqa: BLE001 - one broken stream fails only its request
                    traceback.print_exc()
                    del active[idx]
                    final[idx] = _Broken(f"the handler failed mid-stream: {type(exc).__name__}: {exc}")
                    continue
                self._piece(batch, idx, item)
        return final

    def _call(self, batch: Batch) -> Any:
        """The handler's outputs for the batch: its entry point, or its steps after preprocess."""
        if self.stages is not None:
            return self._guarded(self.stages.finish_batch, batch.data)
        return self._guarded(self.entry, batch.data, batch.context)

    @staticmethod
    def _guarded(step: Callable[..., Any], *args: Any) -> Any:
        """A call into the handler, its failures as the WorkerError that fails the batch."""
        try:
            return step(*args)
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

    def _encode(self, batch: Batch, outputs: list[Any]) -> tuple[list[Buffer], list[Response]]:
        parts: list[Buffer] = []
        responses: list[Response] = []
        processors = batch.context.request_processor
        for idx, output in enumerate(outputs):
            if output is _ENDED:
                responses.append(Response(0, "", None, [], 0))
                continue
            if isinstance(output, _Broken):
                broken = torchserve_error(WorkerError(output.message))
                parts.append(broken.body)
                responses.append(Response(broken.status, "", broken.content_type, [], len(broken.body)))
                continue
            body, implied_type = encode_output(output)
            self._respond(parts, responses, body, implied_type, processors[idx], batch.requests[idx].id)
        return parts, responses

    def _respond(
        self, parts: list[Buffer], responses: list[Response], body: Buffer, content_type: str | None,
        processor: RequestProcessor, request_id: str, own: list[tuple[str, str]] | None = None,
    ) -> None:  # fmt: skip
        """Add one request's response: the handler's status and headers for it, and its content
        type unless ``own`` is given (the headers of a response an envelope wrote, its type fixed)."""
        headers = []
        for key, value in processor.get_response_headers().items():
            if str(key).lower() == "content-type":
                if own is None:
                    content_type = str(value)
            else:
                headers.append((str(key), str(value)))
        if own:
            headers.extend(own)
        status, phrase = processor.get_response_status_code(), processor.get_response_status_phrase() or ""
        if self.max_response_size is not None and len(body) > self.max_response_size:
            # Never shipped: this one request gets the error in its place (TorchServe kills the
            # worker and answers "Worker died."); the rest of the batch and the worker carry on.
            print(
                f"response to request {request_id} is {len(body)} bytes, "
                f"over max_response_size ({self.max_response_size}); not sent",
                file=sys.stderr,
            )
            error = torchserve_error(
                WorkerError(f"Response of {len(body)} bytes exceeds max_response_size ({self.max_response_size})")
            )
            body, status, phrase, content_type, headers = error.body, error.status, "", error.content_type, []
        parts.append(body)
        responses.append(Response(status, phrase, content_type, headers, len(body)))

    # -- envelopes --------------------------------------------------------------------------------

    def _complete_enveloped(self, batch: Batch, plans: list[_Plan]) -> tuple[list[Buffer], list[Response], float | None]:
        """A batch with envelopes: the handler runs once on all requests' rows (``_expand``), and
        each request is answered from its own rows' outputs. Its parts, responses and PredictionTime.

        The handler's context has one entry per row (``request_ids``, ``request_processor``), so a
        handler that answers row ``i`` (``set_response_status(..., idx=i)``) answers its request. A
        batch of one request is handed to its envelope whole: exactly TorchServe's envelope.
        """
        prediction_ms: float | None = None
        results: Any = []
        if batch.calls:
            called = time.perf_counter()
            results = self._call(batch)
            if len(plans) > 1:
                self._check(results, batch.n_rows)
            prediction_ms = (time.perf_counter() - called) * 1000 + (batch.prepare_ms if self.stages else 0.0)
        parts: list[Buffer] = []
        responses: list[Response] = []
        for plan in plans:
            self._reply(plan, results, len(plans) == 1, parts, responses)
        return parts, responses, prediction_ms

    def _named(self, name: str) -> Envelope | None:
        if self._envelopes is None:
            from .envelopes import per_request

            self._envelopes = per_request(self.context.model_yaml_config)
        return self._envelopes.get(name)

    def _expand(self, batch: Batch, blob: memoryview) -> None:
        """A batch with envelopes: each request's plan (its envelope, what it read, its rows), the
        handler's data, and the number of rows in it."""
        from .envelopes import Call, EnvelopeError

        requests, context = batch.requests, batch.context
        # Streaming is for requests without an envelope: an envelope answers a request as a whole.
        context.piece_sink = None
        context.client_gone = lambda idx: False
        single = len(requests) == 1
        values = iter(split(blob, [size for request in requests for _, _, size in request.params]))
        plans: list[_Plan] = []
        rows: list[Any] = []
        data: Any = rows
        for request in requests:
            envelope = self.envelope if request.envelope is None else self._named(request.envelope)
            raw = envelope is not None and envelope.raw
            headers = RequestHeaders(request.headers)
            row = {}
            for name, content_type, _ in request.params:
                value = next(values)
                row[name] = value if raw else decode_value(value, content_type, self.decode)
                headers[name] = {"content-type": content_type}
            plan = _Plan(Call(request.id, headers, context), envelope)
            plans.append(plan)
            if envelope is None and request.envelope is not None:
                print(f"request {request.id} names an unknown envelope {request.envelope!r}", file=sys.stderr)
                plan.refusal = torchserve_error(WorkerError(f"Unknown request envelope {request.envelope}"))
                continue
            parsed: Any = [row]
            if envelope is not None:
                try:
                    parsed, plan.state = envelope.parse(row, plan.call)
                except EnvelopeError as exc:
                    plan.refusal = _kserve_error(exc.status, exc.message)
                    continue
                except Exception:  # noqa: BLE001 - TorchServe's envelopes fail like the handler they wrap
                    traceback.print_exc()
                    if single:
                        raise WorkerError("Prediction failed", 503) from None
                    plan.refusal = torchserve_error(WorkerError("Prediction failed", 503))
                    continue
                if not single and not isinstance(parsed, list):
                    print(f"envelope {envelope.name} read request {request.id} as {type(parsed).__name__}, not rows",
                          file=sys.stderr)  # fmt: skip
                    plan.refusal = torchserve_error(WorkerError("Prediction failed", 503))
                    continue
            if single:
                # TorchServe's envelope hands the handler whatever it read, list or not.
                data = parsed
                count = len(parsed) if isinstance(parsed, list) and parsed else 1
            else:
                plan.start = len(rows)
                rows.extend(parsed)
                count = len(parsed)
            first = len(plans) - 1 if single else plan.start
            plan.rows = range(first, first + count)
            plan.processors = [RequestProcessor(headers) for _ in plan.rows]
        batch.plans, batch.data, batch.n_rows = plans, data, len(rows)
        batch.calls = any(plan.refusal is None for plan in plans) and (single or bool(rows))
        if batch.calls:
            context.request_ids = {i: plan.call.request_id for plan in plans for i in plan.rows}
            context.request_processor = [processor for plan in plans for processor in plan.processors]
            if context.metrics is not None:
                context.metrics.request_ids = context.request_ids

    def _reply(self, plan: _Plan, results: Any, single: bool, parts: list[Buffer], responses: list[Response]) -> None:
        """Answer one request of an enveloped batch from the handler's ``results``."""
        from .envelopes import EnvelopeError, Formatted

        if plan.refusal is not None:
            refusal = plan.refusal
            parts.append(refusal.body)
            responses.append(Response(refusal.status, "", refusal.content_type, [], len(refusal.body)))
            return
        envelope = plan.envelope
        outputs = results if single else results[plan.start : plan.start + len(plan.rows)]
        processor = _merged(plan.processors)
        if envelope is None:
            if single:
                self._check(outputs, 1)
            body, implied_type = encode_output(outputs[0])
            self._respond(parts, responses, body, implied_type, processor, plan.call.request_id)
            return
        if envelope.strict:
            failure = _failure(plan.processors, outputs)
            if failure is not None:
                # The handler failed one of this request's rows: the protocol's error, not a half answer.
                refusal = _kserve_error(*failure)
                parts.append(refusal.body)
                responses.append(Response(refusal.status, "", refusal.content_type, [], len(refusal.body)))
                return
            try:
                formatted = envelope.format(outputs, plan.state, plan.call)
            except EnvelopeError as exc:
                refusal = _kserve_error(exc.status, exc.message)
                parts.append(refusal.body)
                responses.append(Response(exc.status, "", refusal.content_type, [], len(refusal.body)))
                return
            if isinstance(formatted, Formatted):
                self._respond(
                    parts, responses, formatted.body, formatted.content_type, processor, plan.call.request_id, formatted.headers
                )
                return
            entries = formatted
        else:
            entries = outputs
            # TorchServe formats only a truthy answer; anything else goes to the output checks as it is.
            if outputs or not single:
                try:
                    entries = envelope.format(outputs, plan.state, plan.call)
                except Exception:  # noqa: BLE001 - as the handler's own failure
                    traceback.print_exc()
                    if single:
                        raise WorkerError("Prediction failed", 503) from None
                    refusal = torchserve_error(WorkerError("Prediction failed", 503))
                    parts.append(refusal.body)
                    responses.append(Response(refusal.status, "", refusal.content_type, [], len(refusal.body)))
                    return
        self._check(entries, 1)
        body, implied_type = encode_output(entries[0])
        self._respond(parts, responses, body, implied_type, processor, plan.call.request_id)


@dataclass
class _Plan:
    """One request of an enveloped batch."""

    call: Call
    envelope: Envelope | None
    state: Any = None  # what the envelope read, for its format
    start: int = 0  # where its rows start in the handler's data
    rows: range = range(0)  # its indexes in the handler's context
    processors: list[RequestProcessor] = field(default_factory=list)  # one per row
    refusal: HttpResponse | None = None  # its answer, when it never reaches the handler


def _merged(processors: list[RequestProcessor]) -> RequestProcessor:
    """A request's status and headers from its rows': the first failure, else the first row's; all headers."""
    if len(processors) == 1:
        return processors[0]
    merged = RequestProcessor({})
    failed = next((p for p in processors if p.get_response_status_code() != 200), None)
    chosen = failed or (processors[0] if processors else None)
    if chosen is not None:
        merged.report_status(chosen.get_response_status_code(), chosen.get_response_status_phrase())
    for processor in processors:
        for key, value in processor.get_response_headers().items():
            merged.add_response_property(key, value)
    return merged


def _failure(processors: list[RequestProcessor], outputs: Any) -> tuple[int, str] | None:
    """The status and message of the first of a request's rows the handler failed (status >= 400)."""
    for i, processor in enumerate(processors):
        status = processor.get_response_status_code()
        if status < 400:
            continue
        message = processor.get_response_status_phrase()
        if not message:
            # marserve's handlers answer a failed row {"code", "type", "message"}; others may say it in text.
            output = outputs[i] if isinstance(outputs, list) and i < len(outputs) else None
            if isinstance(output, dict) and isinstance(output.get("message"), str):
                message = output["message"]
            elif isinstance(output, str):
                message = output
        return status, message or f"the handler answered {status}"
    return None


def _kserve_error(status: int, message: str) -> HttpResponse:
    """KServe's (and the Open Inference Protocol's) error: ``{"error": "..."}``."""
    return HttpResponse(status, orjson.dumps({"error": " ".join(message.split())}), "application/json")


def _drain(metrics: Any) -> list[Metric] | None:
    """The records the handler made since the last Result; None when it made none (most batches)."""
    drain = getattr(metrics, "drain", None)
    records: list[Metric] | None = drain() if callable(drain) else None
    return records or None
