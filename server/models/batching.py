"""Jobs, the bounded per-model-version queue, and the batching window."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any



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
    extra: dict[str, Any] = field(default_factory=dict)
    # The request envelope the worker applies to this request: "kserve" (KServe v1 routes), "oip"
    # (Open Inference Protocol routes), None (TorchServe's routes: the model's own setting).
    envelope: str | None = None


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
