"""Jobs, the bounded per-model-version queue, and the batching window."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Reply:
    """One request's answer from its handler."""

    status: int
    phrase: str
    content_type: str | None
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(slots=True, eq=False)
class Job:
    """One inference request waiting for, or travelling in, a batch."""

    request_id: str
    headers: list[tuple[str, str]]
    # (parameter name, content type or None, raw bytes), in the order the handler sees them.
    params: list[tuple[str, str | None, bytes]]
    future: asyncio.Future[Reply]
    received: float
    dispatched: float = 0.0
    # The request envelope the worker applies to this request: "kserve" (KServe v1 routes), "oip"
    # (Open Inference Protocol routes), None (TorchServe's routes: the model's own setting).
    envelope: str | None = None
    # How a streamed answer is framed for the client: "sse", "ndjson", or None (raw chunks).
    stream_format: str | None = None
    # Set when the worker sends the first piece of a streamed answer; the future then holds it.
    stream: StreamReply | None = None

    def piece(self, status: int, phrase: str, content_type: str | None, headers: list[tuple[str, str]], body: bytes) -> bool:
        """One piece of this request's streamed answer; False if nobody reads it any more (the
        worker should be told to stop)."""
        stream = self.stream
        if stream is None:
            if self.future.done():
                return False  # the client left before the first piece
            stream = self.stream = StreamReply(status, phrase, content_type, headers, self.stream_format)
            self.future.set_result(stream)  # type: ignore[arg-type]  # a Reply whose body comes in pieces
        if stream.cancelled:
            return False
        stream.push(body, content_type)
        return True


class StreamReply:
    """A handler's answer sent in pieces: status and headers from the first piece, then each
    piece as the worker sends it, framed as the client asked (``format``). It is what the
    connection writes as it comes (``http.responses.Streamed``); pieces that arrive before the
    connection attaches are kept until it does."""

    __slots__ = (
        "status", "phrase", "content_type", "headers", "format", "first_at", "pieces", "cancelled", "on_cancel",
        "_sink", "_waiting", "_ended", "_error",
    )  # fmt: skip

    def __init__(
        self, status: int, phrase: str, content_type: str | None, headers: list[tuple[str, str]], format: str | None
    ) -> None:
        self.status = status
        self.phrase = phrase
        self.format = format
        self.content_type = _STREAM_TYPES.get(format or "", content_type)
        self.headers = headers
        self.first_at = time.perf_counter()
        self.pieces = 0
        self.cancelled = False
        #: Told once when nobody reads the rest (set by whoever feeds the stream).
        self.on_cancel: Callable[[], None] | None = None
        self._sink: Any = None
        self._waiting: list[bytes] = []
        self._ended = False
        self._error: str | None = None

    def push(self, body: bytes, content_type: str | None) -> None:
        if self._ended or self.cancelled or not body:
            return
        self.pieces += 1
        data = frame_piece(body, content_type, self.format)
        if self._sink is not None:
            self._sink.piece(data)
        else:
            self._waiting.append(data)

    def finish(self, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        if self._sink is not None:
            self._sink.end(error)

    def attach(self, sink: Any) -> None:
        self._sink = sink
        for data in self._waiting:
            sink.piece(data)
        self._waiting = []
        if self._ended:
            sink.end(self._error)

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self._waiting = []
        if self.on_cancel is not None:
            self.on_cancel()


_STREAM_TYPES = {"sse": "text/event-stream", "ndjson": "application/x-ndjson"}


def frame_piece(body: bytes, content_type: str | None, format: str | None) -> bytes:
    """A piece as the client asked for it: a server-sent event (``data:`` on each line), one line
    of newline-delimited JSON (JSON compacted, text as a JSON string, other bytes as base64), or
    the bytes as they are."""
    if format == "sse":
        return b"".join(b"data: " + line + b"\n" for line in body.split(b"\n")) + b"\n"
    if format == "ndjson":
        if content_type is not None and content_type.startswith("application/json"):
            try:
                return orjson.dumps(orjson.loads(body)) + b"\n"
            except orjson.JSONDecodeError:
                pass
        try:
            return orjson.dumps(body.decode("utf-8")) + b"\n"
        except UnicodeDecodeError:
            return orjson.dumps(base64.b64encode(body).decode("ascii")) + b"\n"
    return body


def stream_format(accept: bytes | None) -> str | None:
    """The framing a client's ``Accept`` header asks for: ``sse`` for ``text/event-stream``,
    ``ndjson`` for ``application/x-ndjson``, else None (raw chunks)."""
    if accept is None:
        return None
    if b"text/event-stream" in accept:
        return "sse"
    if b"application/x-ndjson" in accept:
        return "ndjson"
    return None


class QueueFull(Exception):
    pass


class JobQueue:
    """A FIFO of jobs with a hard capacity, shared by every worker of one model version.

    Unlike ``asyncio.Queue`` it can put jobs back at the front (a stopping worker returns
    what it took), and its ``get`` takes a timeout without wrapping itself in a new task.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def oldest_received(self) -> float | None:
        """When the job at the head of the queue was received (``perf_counter``); None if empty."""
        return self._jobs[0].received if self._jobs else None

    def put(self, job: Job) -> None:
        if len(self._jobs) >= self.capacity:
            # Jobs whose client has gone still hold places until taken; free those first.
            self._jobs = deque(queued for queued in self._jobs if not queued.future.done())
            if len(self._jobs) >= self.capacity:
                raise QueueFull
        self._jobs.append(job)
        self._wake()

    def put_back(self, jobs: Iterable[Job]) -> None:
        self._jobs.extendleft(reversed(list(jobs)))
        self._wake()

    def get_nowait(self) -> Job | None:
        """The next job still wanted (its client has not gone away), or None."""
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                return job
        return None

    async def get(self, timeout: float | None = None) -> Job | None:
        """The next job; None if ``timeout`` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (job := self.get_nowait()) is None:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._waiters.remove(waiter)
                    return None
                timer = loop.call_later(remaining, _resolve, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # A wake-up this waiter can no longer use passes to the next one.
                if self._jobs:
                    self._wake()
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._jobs:
            # One wake-up per put: after put_back of several jobs, the next waiter must not sleep on.
            self._wake()
        return job

    def drain(self) -> list[Job]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def collect_batch(queue: JobQueue, max_size: int, max_delay: float) -> list[Job]:
    """Wait for a first job, then gather up to ``max_size`` jobs within ``max_delay`` seconds of it.

    Jobs already queued join at once. ``max_delay <= 0`` means "take what is queued, do not
    wait" (TorchServe instead lets one more job in, capping such batches at two). If the
    caller is cancelled mid-window, the jobs gathered so far go back to the front of the queue.
    """
    first = await queue.get()
    assert first is not None
    batch = [first]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_delay
    try:
        while len(batch) < max_size:
            job = queue.get_nowait()
            if job is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                job = await queue.get(remaining)
                if job is None:
                    break
            batch.append(job)
    except asyncio.CancelledError:
        queue.put_back(batch)
        raise
    return batch
