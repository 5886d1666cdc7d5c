"""The supervisor of a model version's workers, with stand-in processes: states, restarts, backoff,
the batch loop's outcomes and scaling. No server and no worker process is started."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

from server.errors import ServerError, ServiceUnavailable, WorkerDied, WorkerError
from server.models.batching import Job, JobQueue, Reply
from server.models.settings import ModelSettings
from server.models.status import WorkerState, WorkerStatus
from server.workers import supervisor as supervision
from server.workers.messages import Load, Result
from server.workers.placement import Placement, worker_threads
from server.workers.supervisor import MAX_BACKOFF, Supervisor, WorkerSlot, backoff, no_worker_message

LOAD = Load(
    model_name="m", model_dir="/nowhere", handler="h.py", batch_size=4, gpu_id=None, manifest={},
    model_yaml_config={}, limit_max_image_pixels=True, decode_input_request=True, max_response_size=100,
    server_version="0.12.0",
)  # fmt: skip


class FakeExchange:
    def __init__(self, batch: list[Job]) -> None:
        self.batch = batch
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ran = False

    def run(self) -> None:
        self.ran = True
        if not self.started.done():
            self.started.set_result(None)


class FakeProcess:
    """A worker process stand-in: ``script`` decides how each start and each batch go."""

    pids = iter(range(1000, 100000))

    def __init__(self, script: Script, worker_id: str, load: Load, env: Mapping[str, str], threads: int) -> None:
        self.script = script
        self.worker_id = worker_id
        self.load = load
        self.threads = threads
        self.pid: int | None = None
        self.started_at = time.time()
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self.sent: list[FakeExchange] = []

    async def start(self, timeout: float) -> None:
        outcome = self.script.loads.pop(0) if self.script.loads else None
        if isinstance(outcome, WorkerError):
            raise outcome
        self.pid = next(self.pids)
        if self.script.gate is not None:  # a load that lasts until the test opens the gate
            self.script.loading += 1
            self.script.most_loading = max(self.script.most_loading, self.script.loading)
            try:
                await self.script.gate.wait()
            finally:
                self.script.loading -= 1

    def submit(self, batch: list[Job], on_piece: Any = None) -> FakeExchange:
        """Like a worker, it runs one batch at a time, in the order they were sent."""
        exchange = FakeExchange(batch)
        self.sent.append(exchange)
        if len(self.sent) == 1:
            exchange.run()
        return exchange

    async def result(self, exchange: FakeExchange) -> tuple[list[Reply], Result]:
        await exchange.started
        if not exchange.ran or self.returncode is not None:
            raise WorkerDied
        self.script.batches.append([job.request_id for job in exchange.batch])
        try:
            return await self.script.predict(self, exchange.batch)
        finally:
            self.sent.remove(exchange)
            if self.sent:
                self.sent[0].run()

    def kill(self, returncode: int = -signal.SIGKILL) -> None:
        if self.returncode is None:
            self.returncode = returncode
        self._exited.set()
        for exchange in self.sent:
            if not exchange.started.done():
                exchange.started.set_result(None)  # never ran

    async def stop(self, timeout: float = 5.0) -> None:
        self.kill(0)

    def exit_description(self) -> str:
        return f"exited with code {self.returncode}"

    async def wait_exit(self, timeout: float) -> int | None:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return None
        return self.returncode

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


async def echo(process: FakeProcess, batch: list[Job]) -> tuple[list[Reply], Result]:
    replies = [Reply(200, "", None, [], job.params[0][2]) for job in batch]
    return replies, Result(200, "", [], handler_ms=1.0, prediction_ms=0.5)


class Script:
    def __init__(self, loads: list[WorkerError | None] | None = None) -> None:
        self.loads = list(loads or [])
        self.predict: Callable[[FakeProcess, list[Job]], Awaitable[tuple[list[Reply], Result]]] = echo
        self.processes: list[FakeProcess] = []
        self.batches: list[list[str]] = []
        self.reports: list[tuple[int, Result | None]] = []
        self.loaded: list[str] = []
        self.gate: asyncio.Event | None = None  # set: loads wait for it
        self.loading = 0  # loads under way now, and the most at once
        self.most_loading = 0

    def spawn(self, worker_id: str, load: Load, env: Mapping[str, str], threads: int) -> Any:
        process = FakeProcess(self, worker_id, load, env, threads)
        self.processes.append(process)
        return process

    def supervisor(self, placement: Placement | None = None, **settings: Any) -> Supervisor:
        return Supervisor(
            "m", "1.0", ModelSettings(**{"max_batch_delay": 0, **settings}), JobQueue(10), LOAD, {}, placement or Placement(0),
            on_loaded=lambda slot: self.loaded.append(slot.id),
            on_batch=lambda size, seconds, result: self.reports.append((size, result)),
            spawn=self.spawn,
        )  # fmt: skip


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The failure counts the supervisor asked a backoff for; it waits no time at all."""
    asked: list[int] = []

    def record(failures: int) -> float:
        asked.append(failures)
        return 0.0

    monkeypatch.setattr(supervision, "backoff", record)
    return asked


def job(body: bytes = b"x", request_id: str = "r") -> Job:
    return Job(request_id, [], [("body", None, body)], asyncio.get_running_loop().create_future(), time.time())


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_backoff_grows_as_fibonacci_up_to_its_cap() -> None:
    assert [backoff(n) for n in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]
    assert backoff(100) == MAX_BACKOFF


def test_states_are_the_strings_they_always_were() -> None:
    assert [str(state) for state in WorkerState] == ["STARTING", "READY", "RESTARTING", "FAILED", "STOPPING", "STOPPED"]
    assert WorkerState.READY == "READY"


def test_a_worker_starts_serves_batches_and_stops() -> None:
    script = Script()

    async def main() -> None:
        workers = script.supervisor(batch_size=4)
        assert not workers.serving
        (slot,) = workers.add(1)
        assert slot.status == WorkerState.STARTING and workers.serving
        assert await slot.first_load is None
        assert slot.status == WorkerState.READY and script.loaded == [slot.id]
        jobs = [job(bytes([i]), f"r{i}") for i in range(3)]
        for queued in jobs:
            workers.queue.put(queued)
        replies = await asyncio.gather(*(queued.future for queued in jobs))
        assert [reply.body for reply in replies] == [b"\0", b"\1", b"\2"]
        assert script.reports[0][1] is not None and script.reports[0][1].handler_ms == 1.0
        status = slot.as_status()
        process = script.processes[0]
        assert status == WorkerStatus(
            slot.id, WorkerState.READY, process.pid, process.started_at, None, restarts=0, last_exit="", loaded_at=slot.loaded_at
        )
        assert process.started_at <= slot.loaded_at <= time.time()
        await workers.stop(ServerError("stopped", 503))
        assert slot.status == WorkerState.STOPPED and workers.slots == [] and process.returncode == 0

    asyncio.run(main())


def test_a_failed_load_is_reported_then_retried_with_growing_backoff(backoffs: list[int]) -> None:
    script = Script(loads=[WorkerError("no such module", 500), WorkerError("out of memory", 507), None])

    async def main() -> None:
        workers = script.supervisor()
        (slot,) = workers.add(1)
        failure = await slot.first_load
        assert isinstance(failure, WorkerError) and (failure.status_code, failure.message) == (500, "no such module")
        await until(lambda: slot.status == WorkerState.READY, "the third start")
        assert backoffs == [1, 2] and len(script.processes) == 3
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_a_worker_that_dies_fails_its_batch_and_is_restarted(backoffs: list[int]) -> None:
    script = Script()

    async def die(process: FakeProcess, batch: list[Job]) -> tuple[list[Reply], Result]:
        script.predict = echo
        process.kill()  # as the kernel's OOM killer would: SIGKILL from outside
        raise WorkerDied

    script.predict = die

    async def main() -> None:
        workers = script.supervisor()
        (slot,) = workers.add(1)
        await slot.first_load
        lost = job()
        workers.queue.put(lost)
        with pytest.raises(WorkerDied) as caught:
            await lost.future
        assert (caught.value.status_code, caught.value.message) == (507, "Worker died.")
        await until(lambda: len(script.processes) == 2 and slot.status == WorkerState.READY, "a restart")
        assert backoffs == [0]  # it had served: replaced at once
        assert script.reports == [(1, None)]
        served = job(b"again")
        workers.queue.put(served)
        assert (await served.future).body == b"again"
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_a_handler_error_fails_the_whole_batch_with_its_status_and_keeps_its_metrics() -> None:
    script = Script()
    recorded = [{"name": "Seen", "value": 2.0}]

    async def fail(process: FakeProcess, batch: list[Job]) -> tuple[list[Reply], Result]:
        raise WorkerError("I am a teapot", 418, recorded)

    script.predict = fail

    async def main() -> None:
        workers = script.supervisor(batch_size=2, max_batch_delay=1000)
        (slot,) = workers.add(1)
        await slot.first_load
        batch = [job(request_id="a"), job(request_id="b")]
        for queued in batch:
            workers.queue.put(queued)
        outcomes = await asyncio.gather(*(queued.future for queued in batch), return_exceptions=True)
        assert all(isinstance(e, WorkerError) and (e.status_code, e.message) == (418, "I am a teapot") for e in outcomes)
        assert script.batches == [["a", "b"]]
        ((size, result),) = script.reports
        assert size == 2 and result is not None and (result.code, result.metrics) == (418, recorded)
        assert slot.status == WorkerState.READY and len(script.processes) == 1
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_scale_sets_the_bounds_and_the_last_worker_leaving_fails_the_queue() -> None:
    script = Script()

    async def main() -> None:
        workers = script.supervisor(min_workers=1, max_workers=1)
        added = await workers.scale(3, 4, synchronous=True)
        assert len(added) == 3 and len(workers.slots) == 3
        assert (workers.settings.min_workers, workers.settings.max_workers) == (3, 4)
        assert await supervision.first_failure(added) is None
        assert await workers.scale(0, 1, synchronous=True) == []
        assert len(workers.slots) == 1 and all(slot.status == WorkerState.STOPPED for slot in added[1:])
        # The last worker holds one batch while another job waits in the queue.
        taken, release = asyncio.Event(), asyncio.Event()

        async def hold(process: FakeProcess, batch: list[Job]) -> tuple[list[Reply], Result]:
            taken.set()
            await release.wait()
            return await echo(process, batch)

        script.predict = hold
        in_flight, queued = job(b"in flight"), job(b"queued")
        workers.queue.put(in_flight)
        await taken.wait()
        workers.queue.put(queued)
        await workers.scale(0, 0, synchronous=False)
        await asyncio.sleep(0)  # the removal runs in the background
        assert not workers.serving
        release.set()
        # The batch in hand is answered; the queued job has nobody left to take it.
        assert (await in_flight.future).body == b"in flight"
        with pytest.raises(ServiceUnavailable) as caught:
            await asyncio.wait_for(queued.future, 5)
        assert caught.value.message == no_worker_message("m", None)
        await until(lambda: workers.slots == [], "the last worker to go")

    asyncio.run(main())


def test_a_worker_stopped_before_it_ever_ran_reports_so() -> None:
    script = Script()

    async def main() -> None:
        workers = script.supervisor()
        (slot,) = workers.add(1)
        await workers.stop(ServerError("stopped", 503))
        failure = await slot.first_load
        assert isinstance(failure, WorkerError) and slot.status == WorkerState.STOPPED
        assert script.processes == []

    asyncio.run(main())


def test_workers_are_placed_round_robin_over_the_gpus() -> None:
    script = Script()

    async def main() -> None:
        placement = Placement(2)
        pinned = script.supervisor(placement, device_type="gpu", device_ids=[1])
        anywhere = script.supervisor(placement, device_type="gpu")
        slots: list[WorkerSlot] = [*pinned.add(2), *anywhere.add(3)]
        assert [slot.gpu_id for slot in slots] == [1, 1, 0, 1, 0]
        assert len({slot.id for slot in slots}) == 5
        await supervision.first_failure(slots)
        assert [process.load.gpu_id for process in script.processes] == [1, 1, 0, 1, 0]
        await asyncio.gather(pinned.stop(ServerError("stopped")), anywhere.stop(ServerError("stopped")))

    asyncio.run(main())


def test_worker_threads_share_the_cores() -> None:
    assert worker_threads(8, 2, 1) == 4
    assert worker_threads(8, 1, 4) == 2  # the slots that exist count too
    assert worker_threads(8, 0, 0) == 8
    assert worker_threads(2, 4, 4) == 1


# -- starting: turns, and stops during a storm of starts ---------------------------------------


def test_workers_take_turns_to_start_and_spawn_only_when_their_turn_comes() -> None:
    script = Script()

    async def main() -> None:
        script.gate = asyncio.Event()
        workers = script.supervisor(Placement(0, max_starting=2))
        slots = workers.add(6)
        await until(lambda: script.loading == 2, "two loads")
        await asyncio.sleep(0.05)
        # The other four wait for a turn, with no process yet.
        assert len(script.processes) == 2 and script.loading == 2
        assert all(slot.status == WorkerState.STARTING for slot in slots)
        script.gate.set()
        assert await supervision.first_failure(slots) is None
        assert script.most_loading == 2 and len(script.processes) == 6
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_the_turns_are_shared_by_every_model_of_the_server() -> None:
    script = Script()

    async def main() -> None:
        script.gate = asyncio.Event()
        placement = Placement(0, max_starting=3)
        first, second = script.supervisor(placement), script.supervisor(placement)
        slots = [*first.add(4), *second.add(4)]
        await until(lambda: script.loading == 3, "three loads")
        await asyncio.sleep(0.05)
        assert len(script.processes) == 3
        script.gate.set()
        assert await supervision.first_failure(slots) is None
        assert script.most_loading == 3
        await asyncio.gather(first.stop(ServerError("stopped")), second.stop(ServerError("stopped")))

    asyncio.run(main())


def test_stop_starting_cancels_waiting_and_loading_starts_and_keeps_serving_workers() -> None:
    script = Script()

    async def main() -> None:
        workers = script.supervisor(Placement(0, max_starting=2))
        (ready,) = workers.add(1)
        assert await ready.first_load is None
        script.gate = asyncio.Event()
        storm = workers.add(10)
        await until(lambda: script.loading == 2, "two loads")
        loading = [process for process in script.processes if process.returncode is None][1:]
        assert workers.live == 11
        started = time.monotonic()
        await workers.stop_starting(ServiceUnavailable("The server is stopping"))
        assert time.monotonic() - started < 1
        # Both loading processes were killed; the eight waiting for a turn never spawned.
        assert len(loading) == 2 and all(process.returncode == -signal.SIGKILL for process in loading)
        assert len(script.processes) == 3
        outcomes = [slot.first_load.result() for slot in storm]
        assert all(isinstance(o, WorkerError) and (o.status_code, o.message) == (503, "the server is stopping") for o in outcomes)
        assert workers.slots == [ready] and workers.live == 1 and ready.status == WorkerState.READY
        # The serving worker still answers its queue.
        served = job(b"still here")
        workers.queue.put(served)
        assert (await served.future).body == b"still here"
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_after_stop_starting_a_worker_that_dies_is_not_restarted(backoffs: list[int]) -> None:
    script = Script()

    async def main() -> None:
        workers = script.supervisor()
        (slot,) = workers.add(1)
        assert await slot.first_load is None
        await workers.stop_starting(ServiceUnavailable("The server is stopping"))
        script.processes[0].kill()
        await until(lambda: slot.status == WorkerState.STOPPED, "the slot to stop")
        await asyncio.sleep(0.05)
        assert len(script.processes) == 1 and not workers.serving and workers.live == 0
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_a_scale_down_counts_the_leaving_workers_out_at_once() -> None:
    script = Script()

    async def main() -> None:
        workers = script.supervisor()
        assert await supervision.first_failure(workers.add(4)) is None
        await workers.scale(1, 1, synchronous=False)
        assert workers.live == 1  # before the removal has run
        await until(lambda: len(workers.slots) == 1, "the removal")
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())


def test_autoscaling_adds_a_worker_under_pressure_and_removes_it_when_idle() -> None:
    """Through the supervisor's own add and remove: every job answered, threads sized for the peak,
    and a version being drained scales no more."""
    script = Script()
    scaled: list[tuple[str, str]] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def held(process: FakeProcess, batch: list[Job]) -> tuple[list[Reply], Result]:
            await gate.wait()
            return await echo(process, batch)

        script.predict = held
        workers = Supervisor(
            "m", "1.0",
            ModelSettings(batch_size=1, max_batch_delay=0, min_workers=1, max_workers=2, autoscale_window_ms=50, autoscale_cooldown_ms=200),
            JobQueue(10), LOAD, {}, Placement(0, cpus=8),
            on_loaded=lambda slot: None, on_batch=lambda size, seconds, result: None, spawn=script.spawn,
            on_scaled=lambda direction, reason: scaled.append((direction, reason)),
        )  # fmt: skip
        assert await supervision.first_failure(workers.add(1)) is None
        jobs = [job(str(i).encode(), str(i)) for i in range(5)]
        for queued in jobs:
            workers.queue.put(queued)
        workers.notify()
        await until(lambda: sum(slot.status == WorkerState.READY for slot in workers.slots) == 2, "a second worker")
        assert scaled == [("up", "queue_length")]
        assert [process.threads for process in script.processes] == [4, 4]  # 8 CPUs for max_workers 2
        gate.set()
        replies = await asyncio.gather(*(queued.future for queued in jobs))
        assert [reply.body for reply in replies] == [str(i).encode() for i in range(5)]
        await until(lambda: len(workers.slots) == 1, "the idle worker to go")
        assert scaled == [("up", "queue_length"), ("down", "idle")]
        assert workers.autoscaler.status().scale_downs == 1
        await asyncio.sleep(0.4)
        assert workers.live == 1  # never below min_workers
        assert await workers.drain(1)
        assert workers._autoscaling is None
        await workers.stop(ServerError("stopped", 503))

    asyncio.run(main())
