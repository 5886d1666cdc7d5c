"""A registered model version: its settings, its job queue and its supervised workers."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from archiver import ModelArchive

from .batching import Job, JobQueue, QueueFull, collect_batch
from ..errors import InternalServerError, ServerError, ServiceUnavailable, worker_died
from ..workers.process import BatchFailed, LoadSpec, WorkerDied, WorkerLoadError, WorkerProcess

log = logging.getLogger("marserve.model")

_MAX_BACKOFF = 30.0


@dataclass
class ModelSettings:
    batch_size: int = 1
    max_batch_delay: int = 100  # ms
    response_timeout: int = 120  # s
    startup_timeout: int = 120  # s
    min_workers: int = 0
    max_workers: int = 0
    job_queue_size: int = 100
    device_type: str = "cpu"
    device_ids: list[int] | None = None


@dataclass(eq=False)
class WorkerSlot:
    """One worker position of a model: it outlives the processes that fill it across restarts."""

    id: str
    gpu_id: int | None
    status: str = "STARTING"
    process: WorkerProcess | None = None
    stopping: bool = False
    busy: bool = False
    task: asyncio.Task[None] | None = None
    serve_task: asyncio.Task[None] | None = None
    # Resolves with None once a first load succeeds, or with the error of a failed first load.
    first_load: asyncio.Future[WorkerLoadError | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    load_time_ms: float = 0.0


@dataclass
class Observer:
    """Hooks the metrics module sets; the default does nothing."""

    # (model, batch size, seconds from dispatch to reply, the reply's meta: handler_ms, metrics)
    batch_done: Callable[["ModelVersion", int, float, dict[str, Any]], None] = lambda *a: None
    worker_loaded: Callable[["ModelVersion", WorkerSlot], None] = lambda *a: None


class ModelVersion:
    def __init__(
        self,
        name: str,
        version: str,
        url: str,
        archive: ModelArchive,
        handler: str,
        settings: ModelSettings,
        load_spec: Callable[[WorkerSlot], LoadSpec],
        observer: Observer | None = None,
        loaded_at_startup: bool = False,
    ) -> None:
        self.name = name
        self.version = version
        self.url = url
        self.archive = archive
        self.handler = handler
        self.settings = settings
        self.queue = JobQueue(settings.job_queue_size)
        self.slots: list[WorkerSlot] = []
        self.loaded_at_startup = loaded_at_startup
        self.observer = observer or Observer()
        self._load_spec = load_spec
        # One worker gathers a batch at a time, as in TorchServe; otherwise idle workers
        # would split a burst into batches of one.
        self._collect_lock = asyncio.Lock()

    # -- requests ------------------------------------------------------------------------------

    def submit(self, job: Job, versioned: bool = False) -> None:
        """Queue ``job``; 503 at once when no worker serves this version or its queue is full."""
        try:
            if not any(not slot.stopping for slot in self.slots):
                raise QueueFull
            self.queue.put(job)
        except QueueFull:
            # The message is built only on refusal: it is not free, and this is the request path.
            raise ServiceUnavailable(no_worker_message(self.name, self.version if versioned else None)) from None

    # -- workers -------------------------------------------------------------------------------

    def add_slot(self, slot_id: str, gpu_id: int | None) -> WorkerSlot:
        slot = WorkerSlot(slot_id, gpu_id)
        slot.task = asyncio.create_task(self._supervise(slot), name=f"worker-{slot_id}")
        self.slots.append(slot)
        return slot

    async def remove_slots(self, slots: list[WorkerSlot], orphaned: ServerError | None = None) -> None:
        """Stop these workers after their batch in hand; queued jobs stay for the others.

        If no worker is left, nobody would ever take the queued jobs: they fail with ``orphaned``
        (by default the 503 a request to a model without workers gets).
        """
        for slot in slots:
            slot.stopping = True
            if not slot.busy and slot.serve_task is not None:
                slot.serve_task.cancel()
            if slot.status != "READY" and slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.task for s in slots if s.task), return_exceptions=True)
        for slot in slots:
            if slot in self.slots:
                self.slots.remove(slot)
        if all(slot.stopping for slot in self.slots):
            error = orphaned or ServiceUnavailable(no_worker_message(self.name, None))
            for job in self.queue.drain():
                _fail(job, error)

    async def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty and no batch is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.queue) or any(slot.busy for slot in self.slots):
            # A worker that is restarting will still serve the queue; only no worker at all can't.
            if time.monotonic() > deadline or all(s.stopping for s in self.slots):
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        await self.remove_slots(list(self.slots), InternalServerError(f"Model {self.name} was unregistered", 503))
        self.archive.cleanup()

    async def _supervise(self, slot: WorkerSlot) -> None:
        try:
            await self._keep_alive(slot)
        finally:
            # Whoever waits for the first load must not wait forever on a slot stopped before it.
            if not slot.first_load.done():
                slot.first_load.set_result(WorkerLoadError(500, "the worker was stopped before it loaded the model"))
            slot.status = "STOPPED"

    async def _keep_alive(self, slot: WorkerSlot) -> None:
        failures = 0
        while not slot.stopping:
            process = WorkerProcess(slot.id, self._load_spec(slot))
            slot.process = process
            slot.status = "STARTING"
            started = time.perf_counter()
            try:
                await process.start(self.settings.startup_timeout)
            except WorkerLoadError as exc:
                log.error("worker %s of %s:%s failed to load: %s", slot.id, self.name, self.version, exc.message)
                slot.status = "FAILED"
                if not slot.first_load.done():
                    slot.first_load.set_result(exc)
                failures += 1
                await asyncio.sleep(_backoff(failures))
                continue
            except asyncio.CancelledError:
                process.kill()
                await asyncio.shield(process.wait_exit(5))
                raise
            slot.load_time_ms = (time.perf_counter() - started) * 1000
            slot.status = "READY"
            failures = 0
            if not slot.first_load.done():
                slot.first_load.set_result(None)
            self.observer.worker_loaded(self, slot)
            await self._run_until_exit(slot, process)
            if slot.stopping:
                await process.stop()
                break
            log.warning("worker %s of %s:%s died; restarting", slot.id, self.name, self.version)
            slot.status = "RESTARTING"
            # The serve loop can end on a broken socket while the process lives on; no orphan
            # may outlast its slot.
            process.kill()
            await process.wait_exit(10)
            failures += 1
            await asyncio.sleep(_backoff(failures))

    async def _run_until_exit(self, slot: WorkerSlot, process: WorkerProcess) -> None:
        slot.serve_task = asyncio.create_task(self._serve(slot, process))
        exited = asyncio.create_task(process.wait())
        await asyncio.wait({slot.serve_task, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            slot.serve_task.cancel()
        else:
            exited.cancel()
        await asyncio.gather(slot.serve_task, return_exceptions=True)
        slot.serve_task = None

    async def _serve(self, slot: WorkerSlot, process: WorkerProcess) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        while not slot.stopping:
            async with self._collect_lock:
                batch = await collect_batch(self.queue, settings.batch_size, settings.max_batch_delay / 1000)
            # Requests whose client went away are dropped before they cost any inference.
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            slot.busy = True
            dispatched = time.perf_counter()
            for job in batch:
                job.dispatched = dispatched
            timed_out = False

            def on_timeout() -> None:
                nonlocal timed_out
                timed_out = True
                log.error(
                    "worker %s of %s:%s gave no response in %d s; killing it",
                    slot.id, self.name, self.version, settings.response_timeout,
                )  # fmt: skip
                process.kill()

            timer = loop.call_later(settings.response_timeout, on_timeout)
            report: dict[str, Any] = {}
            try:
                replies, report = await process.predict(batch)
            except BatchFailed as exc:
                report = exc.meta
                _fail_all(batch, InternalServerError(exc.message, exc.code))
            except WorkerDied:
                if not timed_out:
                    # The exit status tells an OOM kill from a crash; it follows the EOF closely.
                    await process.wait_exit(0.5)
                _fail_all(batch, _death_error(process, timed_out))
                return
            except asyncio.CancelledError:
                # Cancelled mid-batch: the process has exited (see _run_until_exit).
                _fail_all(batch, _death_error(process, timed_out))
                raise
            else:
                for job, reply in zip(batch, replies):
                    if not job.future.done():
                        job.future.set_result(reply)
            finally:
                timer.cancel()
                slot.busy = False
                self.observer.batch_done(self, len(batch), time.perf_counter() - dispatched, report)


def _backoff(failures: int) -> float:
    a, b = 0.0, 1.0
    for _ in range(failures):
        a, b = b, a + b
    return min(a, _MAX_BACKOFF)


def _death_error(process: WorkerProcess, timed_out: bool) -> ServerError:
    # TorchServe answers 507 when the worker exited with 137, i.e. was SIGKILLed from outside:
    # usually the kernel's OOM killer. Our own kill on a response timeout stays a 500.
    if not timed_out and process.returncode in (-signal.SIGKILL, 137):
        return InternalServerError("Worker died.", 507)
    return worker_died()


def _fail(job: Job, error: ServerError) -> None:
    if not job.future.done():
        job.future.set_exception(error)


def _fail_all(batch: list[Job], error: ServerError) -> None:
    for job in batch:
        _fail(job, error)


def no_worker_message(name: str, version: str | None) -> str:
    target = f'Model "{name}" Version {version}"' if version else f'Model "{name}"'
    return (
        f"{target} has no worker to serve inference request. Please use scale workers API to add workers. "
        "If this is a sequence inference, please check if it is closed, or expired; "
        "or exceeds maxSequenceJobQueueSize"
    )
