"""The supervisor of one model version's workers: it starts them, restarts a dead one with
backoff, stops them, and runs each one's batch loop on the version's queue.

Each worker has a slot, which outlives the processes that fill it across restarts:

    STARTING ──loaded──> READY ──died──> RESTARTING ──(backoff)──> STARTING
        └──load failed──> FAILED ──(backoff)──> STARTING
    any state ──stopped──> STOPPED

A STARTING slot first waits for its turn: at most ``Placement.starting`` workers of the whole
server spawn and load at once, so that a storm of starts cannot starve the frontend. Its process
is spawned only once its turn has come, and a stop cancels it whether it waits or loads.

When ``max_workers`` > ``min_workers``, a task samples the queue and the workers every tick and
adds or removes a worker as the autoscaling policy (autoscaler.py) decides, through ``add`` and
``remove``: the paths the scale API takes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ..errors import ServerError, ServiceUnavailable, WorkerDied, WorkerError
from ..models.batching import Job, JobQueue, Reply, collect_batch
from ..models.settings import ModelSettings
from ..models.status import WorkerState, WorkerStatus
from .autoscaler import Autoscaler, Decision, Sample, enabled, tick
from .messages import Load, Piece, Result
from .placement import Placement, worker_threads
from .process import Exchange, WorkerProcess

log = logging.getLogger("marserve.model")

MAX_BACKOFF = 30.0  # s between two starts of one slot, at most

#: What starts a worker process: (worker id, its LOAD message, its environment, its thread count).
SpawnWorker = Callable[[str, Load, Mapping[str, str], int], WorkerProcess]


#: Seconds to wait for a dead worker's exit status, which decides its batch's answer (507 for an
#: outside SIGKILL): it follows the socket's EOF closely, through the template when forked.
EXIT_STATUS_WAIT = 2.0
#: Seconds a worker must have served for the restart backoff to be forgotten: a slot's first death
#: is replaced at once, and so is any after a worker that served this long.
STABLE_SECONDS = 10.0


def backoff(failures: int) -> float:
    """Seconds to wait before the next start after ``failures`` failures in a row: Fibonacci, capped."""
    a, b = 0.0, 1.0
    for _ in range(failures):
        a, b = b, a + b
    return min(a, MAX_BACKOFF)


def no_worker_message(name: str, version: str | None) -> str:
    target = f'Model "{name}" Version {version}"' if version else f'Model "{name}"'
    return (
        f"{target} has no worker to serve inference request. Please use scale workers API to add workers. "
        "If this is a sequence inference, please check if it is closed, or expired; "
        "or exceeds maxSequenceJobQueueSize"
    )


def _first_load() -> asyncio.Future[WorkerError | None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class WorkerSlot:
    """One worker position of a model: it outlives the processes that fill it across restarts."""

    id: str
    gpu_id: int | None
    status: WorkerState = WorkerState.STARTING
    process: WorkerProcess | None = None
    stopping: bool = False
    in_flight: int = 0  # batches sent to the worker and not answered: the one it runs, and the next
    task: asyncio.Task[None] | None = None
    serve_task: asyncio.Task[None] | None = None
    # Serving lanes waiting for a batch to take (cancelled on stop; a lane with a batch finishes it).
    idle_lanes: set[asyncio.Task[Any]] = field(default_factory=set)
    # Resolves with None once a first load succeeds, or with the error of a failed first load.
    first_load: asyncio.Future[WorkerError | None] = field(default_factory=_first_load)
    load_time_ms: float = 0.0
    restarts: int = 0
    last_exit: str = ""
    loaded_at: float = 0.0

    def as_status(self) -> WorkerStatus:
        process = self.process
        pid = process.pid if process is not None else None
        started_at = process.started_at if process is not None else 0.0
        state = WorkerState.STOPPING if self.stopping and self.status != WorkerState.STOPPED else self.status
        return WorkerStatus(
            self.id, state, pid, started_at, self.gpu_id, self.restarts, self.last_exit, self.loaded_at, self.in_flight
        )


class Supervisor:
    """The worker slots of one model version, and its settings: the batch parameters they serve
    with and the worker bounds, which only ``scale`` changes."""

    def __init__(
        self,
        name: str,
        version: str,
        settings: ModelSettings,
        queue: JobQueue,
        load: Load,
        env: Mapping[str, str],
        placement: Placement,
        *,
        on_loaded: Callable[[WorkerSlot], None],
        on_batch: Callable[[int, float, Result | None], None],
        spawn: SpawnWorker | None = None,
        on_scaled: Callable[[str, str], None] | None = None,
        room: Callable[[], int] | None = None,
    ) -> None:
        """``on_batch`` gets each batch's size, its seconds from dispatch to reply and the worker's
        Result (None when the worker died with it). ``on_scaled`` gets each worker autoscaling adds
        or removes: "up" or "down", and the reason; ``room`` says how many more workers the
        server's worker cap allows (default: no cap)."""
        self.name = name
        self.version = version
        self.settings = settings
        self.queue = queue
        self.slots: list[WorkerSlot] = []
        self._load = load
        self._env = env
        self._placement = placement
        self._on_loaded = on_loaded
        self._on_batch = on_batch
        # By default from the server's worker template (placement.templates) where it can be used.
        self._spawn: SpawnWorker = spawn or partial(WorkerProcess, templates=placement.templates)
        # One worker gathers a batch at a time, as in TorchServe; otherwise idle workers
        # would split a burst into batches of one.
        self._collect_lock = asyncio.Lock()
        # The event loop keeps only weak references to tasks: an unreferenced one can vanish mid-run.
        self._background: set[asyncio.Task[None]] = set()
        # Lanes waiting for a change that may let them take a batch (see notify).
        self._watchers: list[asyncio.Future[None]] = []
        # Set by stop_starting: no worker starts or restarts any more.
        self._no_starts = False
        self.autoscaler = Autoscaler()
        self._autoscaling: asyncio.Task[None] | None = None
        self._autoscale_off = False  # set by drain
        self._on_scaled = on_scaled or (lambda direction, reason: None)
        self._room = room or (lambda: 1 << 30)

    @property
    def serving(self) -> bool:
        """Whether any worker is meant to serve the queue (it may be restarting meanwhile)."""
        return any(not slot.stopping for slot in self.slots)

    @property
    def live(self) -> int:
        """The workers this version has or is starting, less those being stopped: what counts
        against the server's worker caps."""
        return sum(1 for slot in self.slots if not slot.stopping)

    def add(self, count: int) -> list[WorkerSlot]:
        """Start ``count`` more workers; each slot's ``first_load`` tells how its first load went."""
        added = []
        for _ in range(count):
            worker_id, gpu_id = self._placement.place(
                f"{self.name}:{self.version}", self.settings.device_type, self.settings.device_ids
            )
            slot = WorkerSlot(worker_id, gpu_id)
            slot.task = asyncio.create_task(self._supervise(slot), name=f"worker-{worker_id}")
            self.slots.append(slot)
            added.append(slot)
        self._update_autoscaling()
        return added

    async def scale(self, min_workers: int, max_workers: int, synchronous: bool) -> list[WorkerSlot]:
        """New worker bounds: workers are added up to ``min_workers`` or removed down to
        ``max_workers`` (waited for only if ``synchronous``); returns the slots added."""
        self.settings = replace(self.settings, min_workers=min_workers, max_workers=max_workers)
        # New bounds: autoscaling starts over (or stops, with max_workers == min_workers).
        self.autoscaler.reset()
        self._update_autoscaling()
        live = [slot for slot in self.slots if not slot.stopping]
        if len(live) < min_workers:
            return self.add(min_workers - len(live))
        if len(live) > max_workers:
            doomed = live[max_workers:]
            for slot in doomed:
                slot.stopping = True  # no longer counted as live, even before the removal runs
            removal = self.remove(doomed)
            if synchronous:
                await removal
            else:
                task = asyncio.create_task(removal)
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return []

    async def remove(self, slots: list[WorkerSlot], orphaned: ServerError | None = None) -> None:
        """Stop these workers after their batch in hand; queued jobs stay for the others.

        If no worker is left, nobody would ever take the queued jobs: they fail with ``orphaned``
        (by default the 503 a request to a model without workers gets).
        """
        for slot in slots:
            slot.stopping = True
            for lane in list(slot.idle_lanes):
                lane.cancel()  # waiting for a batch; lanes with one finish it
            if slot.status != WorkerState.READY and slot.task is not None:
                slot.task.cancel()
        self.notify()
        await asyncio.gather(*(s.task for s in slots if s.task), return_exceptions=True)
        for slot in slots:
            _stopped(slot)  # a task cancelled before its first step never ran its own finally
            if slot in self.slots:
                self.slots.remove(slot)
        if not self.serving:
            error = orphaned or ServiceUnavailable(no_worker_message(self.name, None))
            for job in self.queue.drain():
                _fail(job, error)

    async def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty and no batch is in flight; False on timeout. The version
        is going away (unregistered, or the server stops): autoscaling adds no more workers."""
        self._autoscale_off = True
        self._update_autoscaling()
        deadline = time.monotonic() + timeout
        while len(self.queue) or any(slot.in_flight for slot in self.slots):
            # A worker that is restarting will still serve the queue; only no worker at all can't.
            if time.monotonic() > deadline or not self.serving:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self, orphaned: ServerError) -> None:
        """Stop every worker; jobs still queued fail with ``orphaned``."""
        self._no_starts = True
        self._update_autoscaling()
        await self.remove(list(self.slots), orphaned)

    async def stop_starting(self, orphaned: ServerError) -> None:
        """The server is stopping: no worker starts or restarts from now on. Workers waiting for
        their turn to start or loading are cancelled (their processes killed); those that serve
        stay, to finish the queue. Jobs queued for a version left without workers fail with
        ``orphaned``."""
        self._no_starts = True
        self._update_autoscaling()
        pending = [slot for slot in self.slots if slot.status != WorkerState.READY]
        for slot in pending:
            # Whoever waits for their first load (a synchronous register or scale) learns why.
            if not slot.first_load.done():
                slot.first_load.set_result(WorkerError("the server is stopping", 503))
        if pending:
            await self.remove(pending, orphaned)

    # -- autoscaling -----------------------------------------------------------------------------

    def _update_autoscaling(self) -> None:
        """Run the autoscaling task exactly while the bounds leave room to scale and workers may start."""
        wanted = enabled(self.settings) and not self._no_starts and not self._autoscale_off
        task = self._autoscaling
        if wanted and (task is None or task.done()):
            self._autoscaling = asyncio.create_task(self._autoscale(), name=f"autoscale-{self.name}:{self.version}")
        elif not wanted and task is not None:
            task.cancel()
            self._autoscaling = None

    async def _autoscale(self) -> None:
        while True:
            await asyncio.sleep(tick(self.settings))
            try:
                self._autoscale_step()
            except Exception:  # noqa: BLE001 - a bug in the policy must not end autoscaling silently
                log.exception("model %s:%s: autoscaling failed", self.name, self.version)

    def _autoscale_step(self) -> None:
        live = [slot for slot in self.slots if not slot.stopping]
        ready = [slot for slot in live if slot.status == WorkerState.READY]
        idle = [slot for slot in ready if not slot.in_flight]
        received = self.queue.oldest_received()
        sample = Sample(
            queued=len(self.queue),
            oldest_wait=time.perf_counter() - received if received is not None else 0.0,
            live=len(live),
            ready=len(ready),
            starting=sum(1 for slot in live if slot.status == WorkerState.STARTING),
            busy=len(ready) - len(idle),
            idle=len(idle),
            room=self._room(),
        )
        decision = self.autoscaler.decide(sample, self.settings)
        if decision is None:
            return
        if decision.action == "held":
            log.warning("model %s:%s: autoscaling adds no worker: %s", self.name, self.version, decision.detail)
            return
        if decision.action == "up":
            (slot,) = self.add(1)
        else:
            # The idle worker added last; it holds no batch, and the queue is empty: nothing waits on it.
            slot = idle[-1]
            slot.stopping = True
            self._in_background(self.remove([slot]))
        self._log_scaled(decision, slot, sample.live)
        self._on_scaled(decision.action, decision.reason)

    def _log_scaled(self, decision: Decision, slot: WorkerSlot, live: int) -> None:
        verb, after = ("adding worker", live + 1) if decision.action == "up" else ("removing idle worker", live - 1)
        log.info(
            "model %s:%s: autoscaling %s %s (%d -> %d workers): %s: %s",
            self.name, self.version, verb, slot.id, live, after, decision.reason, decision.detail,
        )  # fmt: skip

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- one slot --------------------------------------------------------------------------------

    async def _supervise(self, slot: WorkerSlot) -> None:
        try:
            await self._keep_alive(slot)
        except Exception:
            # A bug, not a worker's fault: said once, with its traceback, rather than lost in a task.
            log.exception("worker %s of %s:%s: supervision failed", slot.id, self.name, self.version)
        finally:
            _stopped(slot)

    async def _keep_alive(self, slot: WorkerSlot) -> None:
        failures = 0
        while not slot.stopping and not self._no_starts:
            slot.status = WorkerState.STARTING
            try:
                # Cancelled while it waits, it has spawned nothing.
                async with self._placement.starting:
                    if slot.stopping or self._no_starts:
                        break
                    threads = worker_threads(self._placement.cpus, self.settings.max_workers, len(self.slots))
                    process = self._spawn(slot.id, replace(self._load, gpu_id=slot.gpu_id), self._env, threads)
                    slot.process = process
                    started = time.perf_counter()
                    log.info("worker %s of %s:%s starting", slot.id, self.name, self.version)
                    await self._start(process)
            except WorkerError as exc:
                log.error("worker %s of %s:%s failed to load: %s", slot.id, self.name, self.version, exc.message)
                slot.status = WorkerState.FAILED
                if not slot.first_load.done():
                    slot.first_load.set_result(exc)
                failures += 1
                await asyncio.sleep(backoff(failures))
                continue
            slot.load_time_ms = (time.perf_counter() - started) * 1000
            slot.loaded_at = time.time()
            slot.status = WorkerState.READY
            self.notify()
            log.info(
                "worker %s of %s:%s ready (pid %s, model loaded in %.2f s)",
                slot.id, self.name, self.version, process.pid, slot.load_time_ms / 1000,
            )  # fmt: skip
            if not slot.first_load.done():
                slot.first_load.set_result(None)
            self._on_loaded(slot)
            await self._run_until_exit(slot, process)
            if slot.stopping:
                await process.stop()
                break
            slot.status = WorkerState.RESTARTING
            # The serve loop can end on a broken socket while the process lives on; no orphan
            # may outlast its slot.
            process.kill()
            await process.wait_exit(10)
            # A death is replaced at once (from the template, in milliseconds); replacements that
            # keep dying soon after their start wait longer each time.
            if time.time() - slot.loaded_at >= STABLE_SECONDS:
                failures = 0
            delay = backoff(failures)
            failures += 1
            slot.restarts += 1
            slot.last_exit = process.exit_description()
            log.warning(
                "worker %s of %s:%s died: it %s; restarting in %g s",
                slot.id, self.name, self.version, slot.last_exit, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)

    async def _start(self, process: WorkerProcess) -> None:
        try:
            await process.start(self.settings.startup_timeout)
        except asyncio.CancelledError:
            process.kill()
            await asyncio.shield(process.wait_exit(5))
            raise

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

    # -- serving ---------------------------------------------------------------------------------

    def notify(self) -> None:
        """Something that decides which lane may take a batch has changed: a job was queued, a
        batch answered, a worker became ready or is stopping."""
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    async def _changed(self) -> None:
        watcher = asyncio.get_running_loop().create_future()
        self._watchers.append(watcher)
        await watcher

    def _may_take(self, slot: WorkerSlot) -> bool:
        """Whether a lane of ``slot`` may take a batch now. A free worker always may; a busy one
        may take the next batch (up to ``max_batches_in_flight``) only when the queue holds work
        and no other worker of this version is free to take it."""
        if slot.in_flight == 0:
            return True
        if slot.in_flight >= self.settings.max_batches_in_flight or not len(self.queue):
            return False
        return not any(
            other.in_flight == 0 and other.status == WorkerState.READY and not other.stopping
            for other in self.slots
            if other is not slot
        )

    async def _serve(self, slot: WorkerSlot, process: WorkerProcess) -> None:
        """Serve the queue on this worker, with a lane for each batch it may hold at once: while it
        runs one, the next waits in its socket, so it never waits for the frontend between the two."""
        lanes = [asyncio.create_task(self._lane(slot, process)) for _ in range(self.settings.max_batches_in_flight)]
        pending: set[asyncio.Task[bool]] = set(lanes)
        try:
            # Lanes end when the worker stops (each after its batch) or when it has died: then the
            # other has nothing left to serve either.
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(not lane.cancelled() and lane.exception() is None and lane.result() for lane in done):
                    break
        finally:
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def _lane(self, slot: WorkerSlot, process: WorkerProcess) -> bool:
        """Take batches for this worker until it stops (False) or dies (True)."""
        lane = asyncio.current_task()
        assert lane is not None
        while not slot.stopping:
            slot.idle_lanes.add(lane)
            try:
                while not self._may_take(slot):
                    await self._changed()
                    if slot.stopping:
                        return False
                async with self._collect_lock:
                    if not self._may_take(slot):
                        continue
                    settings = self.settings
                    batch = await collect_batch(self.queue, settings.batch_size, settings.max_batch_delay / 1000)
            finally:
                slot.idle_lanes.discard(lane)
            # Requests whose client went away are dropped before they cost any inference.
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            slot.in_flight += 1
            try:
                if not await self._run_batch(slot, process, batch):
                    return True
            finally:
                slot.in_flight -= 1
                self.notify()
        return False

    async def _run_batch(self, slot: WorkerSlot, process: WorkerProcess, batch: list[Job]) -> bool:
        """Send one batch and answer its jobs; False when the worker died meanwhile.

        A batch the worker never started (it was the next one when the worker died) goes back to
        the front of the queue, for another worker or this one restarted: it is not failed for a
        fault that is not its own.
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        dispatched = time.perf_counter()
        for job in batch:
            job.dispatched = dispatched
        timed_out = False
        timer: asyncio.TimerHandle | None = None

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            log.error(
                "worker %s of %s:%s gave no response in %d s; killing it",
                slot.id, self.name, self.version, settings.response_timeout,
            )  # fmt: skip
            process.kill()

        def on_piece(piece: Piece, body: bytes) -> None:
            nonlocal timer
            # For a streamed answer, response_timeout bounds the wait for each piece.
            if timer is not None:
                timer.cancel()
            timer = loop.call_later(settings.response_timeout, on_timeout)
            if not 0 <= piece.request < len(batch):
                return
            job = batch[piece.request]
            if not job.piece(piece.status, piece.phrase, piece.content_type, piece.headers, body):
                process.cancel([job.request_id])  # its client is gone: the worker stops streaming to it
            elif job.stream is not None and job.stream.on_cancel is None:
                request_id = job.request_id
                job.stream.on_cancel = lambda: process.cancel([request_id])

        exchange: Exchange | None = None
        result: Result | None = None
        try:
            exchange = process.submit(batch, on_piece)
            await exchange.started
            if exchange.ran:
                # response_timeout runs from when the worker takes the batch, not from when it was sent.
                timer = loop.call_later(settings.response_timeout, on_timeout)
            replies, result = await process.result(exchange)
        except WorkerDied:
            if exchange is None or not exchange.ran:
                self._put_back(batch)
                return False
            try:
                if not timed_out:
                    # The exit status tells an OOM kill from a crash; it follows the EOF closely.
                    try:
                        await process.wait_exit(EXIT_STATUS_WAIT)
                    except asyncio.CancelledError:
                        # The other lane saw the death first and ends this one: the status still
                        # decides this batch's answer (507 or 500), so it is awaited all the same.
                        await process.wait_exit(EXIT_STATUS_WAIT)
                        raise
            finally:
                # Also when the exit, seen meanwhile, cancels this lane: the batch is answered.
                _fail_all(batch, _death_error(process, timed_out))
            return False
        except WorkerError as exc:
            result = Result(exc.status_code, exc.message, [], metrics=exc.metrics or None)
            _fail_all(batch, exc)
        except asyncio.CancelledError:
            # Cancelled mid-batch: the process has exited (see _run_until_exit), or the server stops.
            if exchange is None or not exchange.ran:
                self._put_back(batch)
            else:
                _fail_all(batch, _death_error(process, timed_out))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave requests waiting for ever
            log.exception("worker %s of %s:%s: unexpected error serving a batch", slot.id, self.name, self.version)
            _fail_all(batch, WorkerError(f"{type(exc).__name__}: {exc}"))
            process.kill()  # a fresh worker: this one's state is unknown
            return False
        else:
            for job, reply in zip(batch, replies):
                if job.stream is not None:
                    _end_stream(job, reply)
                elif not job.future.done():
                    job.future.set_result(reply)
        finally:
            if timer is not None:
                timer.cancel()
            if result is not None or (exchange is not None and exchange.ran):
                self._on_batch(len(batch), time.perf_counter() - dispatched, result)
        return True

    def _put_back(self, batch: list[Job]) -> None:
        self.queue.put_back(job for job in batch if not job.future.done())
        self.notify()


async def first_failure(slots: list[WorkerSlot]) -> WorkerError | None:
    """The first failed first load among ``slots``, or None once they all loaded."""
    outcomes = await asyncio.gather(*(slot.first_load for slot in slots))
    return next((outcome for outcome in outcomes if outcome is not None), None)


def _stopped(slot: WorkerSlot) -> None:
    # Whoever waits for the first load must not wait forever on a slot stopped before it.
    if not slot.first_load.done():
        slot.first_load.set_result(WorkerError("the worker was stopped before it loaded the model"))
    slot.status = WorkerState.STOPPED
    slot.stopping = True  # a slot nobody supervises serves nothing (the server stopped its restarts)


def _death_error(process: WorkerProcess, timed_out: bool) -> WorkerDied:
    # TorchServe answers 507 when the worker exited with 137, i.e. was SIGKILLed from outside:
    # usually the kernel's OOM killer. Our own kill on a response timeout stays a 500.
    if not timed_out and process.returncode in (-signal.SIGKILL, 137):
        return WorkerDied(507)
    return WorkerDied()


def _end_stream(job: Job, reply: Reply) -> None:
    """A streamed answer's end, from its request's entry in the batch's Result: status 0, it has
    ended; a success status, this is its last piece; an error, it broke after its pieces."""
    stream = job.stream
    assert stream is not None
    if reply.status >= 400:
        stream.finish(f"{reply.status}: {reply.body[:200].decode(errors='replace')}")
        return
    if reply.status:
        stream.push(reply.body, reply.content_type)
    stream.finish()


def _fail(job: Job, error: ServerError) -> None:
    if job.stream is not None:
        job.stream.finish(error.message)  # after its pieces: the stream breaks off
    elif not job.future.done():
        job.future.set_exception(error)


def _fail_all(batch: list[Job], error: ServerError) -> None:
    for job in batch:
        _fail(job, error)
