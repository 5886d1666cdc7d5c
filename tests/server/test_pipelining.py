"""Pipelined workers: a worker holds its next batch while it runs one (``maxBatchesInFlight``), and
with ``overlapStages`` preprocesses it meanwhile.

The speed checks use a handler whose steps sleep 20 ms each (releasing the GIL), so that what they
measure is the pipeline's shape, not this machine's speed: serially a request takes 40 ms of
sleeping, with the stages overlapped 20 ms. The fault checks hold a next batch in the worker and
then break the one that runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, ServerFactory, make_mar, wait_for

STEPS = "handler:\n  preprocess_s: 0.02\n  inference_s: 0.02\n"


def install(server: Server, name: str, yaml: str = "", **params: object) -> None:
    config = server.root / f"{name}.yaml"
    config.write_text(yaml)
    make_mar(server.store, name, "stage_handler.py", config_file=str(config))
    response = server.register(f"{name}.mar", **params)
    assert response.status_code == 200, response.text


def workers(server: Server, name: str) -> list[dict[str, Any]]:
    response = server.http.get(f"{server.management}/models/{name}")
    assert response.status_code == 200, response.text
    workers: list[dict[str, Any]] = response.json()[0]["workers"]
    return workers


def in_flight(server: Server, name: str) -> int:
    return sum(worker["batchesInFlight"] for worker in workers(server, name))


def send_all(server: Server, name: str, bodies: list[bytes], timeout: float = 30) -> Callable[[], list[Any]]:
    """Send each body from its own thread, in order, each once the one before has reached the
    server's queue or its worker; the returned function waits for the answers (or exceptions)."""
    answers: list[Any] = [None] * len(bodies)

    def post(i: int, body: bytes) -> None:
        try:
            answers[i] = httpx.post(f"{server.inference}/predictions/{name}", content=body, timeout=timeout)
        except httpx.HTTPError as exc:
            answers[i] = exc

    threads = []
    for i, body in enumerate(bodies):
        thread = threading.Thread(target=post, args=(i, body))
        thread.start()
        threads.append(thread)
        time.sleep(0.1)

    def join() -> list[Any]:
        for thread in threads:
            thread.join(timeout + 5)
        return answers

    return join


def running(server: Server, body: str) -> bool:
    return (server.tmp / f"running-{body}").exists()


# -- speed ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def steps(start_module_server: ServerFactory) -> Server:
    # A serve process: the clients measuring it must not share its interpreter.
    server = start_module_server(name="steps", subprocess=True)
    install(server, "overlapped", STEPS + "overlapStages: true\n")
    install(server, "depth2", STEPS)
    install(server, "depth1", STEPS + "maxBatchesInFlight: 1\n")
    return server


def rate(server: Server, name: str, requests: int = 48, concurrency: int = 8) -> float:
    """Requests per second that ``concurrency`` clients get, each sending one request after another."""

    async def run() -> float:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{server.inference}/predictions/{name}"

            async def client_loop(n: int) -> None:
                for _ in range(n):
                    response = await client.post(url, content=b"x")
                    assert response.status_code == 200, response.text

            await client_loop(2)  # warm: connections open, the worker's first batch done
            started = time.perf_counter()
            await asyncio.gather(*(client_loop(requests // concurrency) for _ in range(concurrency)))
            return requests / (time.perf_counter() - started)

    return asyncio.run(run())


def ratios(server: Server, model: str, baseline: str, rounds: int = 3) -> list[float]:
    """``model``'s rate over ``baseline``'s, in alternating rounds (this machine's speed drifts)."""
    return [rate(server, model) / rate(server, baseline) for _ in range(rounds)]


def test_overlapped_stages_serve_at_least_1_7_times_the_serial_rate(steps: Server) -> None:
    measured = ratios(steps, "overlapped", "depth1")
    assert statistics.median(measured) >= 1.7, measured


def test_depth_2_without_overlap_is_no_slower_than_depth_1(steps: Server) -> None:
    measured = ratios(steps, "depth2", "depth1")
    # The same 40 ms of work per request: a small margin for the noise of the rest.
    assert statistics.median(measured) >= 0.95, measured


def test_overlapped_batches_keep_their_own_context(steps: Server) -> None:
    """Two batches are in the handler at once: each sees its own request ids, headers and rejections."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{steps.inference}/predictions/overlapped"
            bodies = [b"reject" if i % 5 == 0 else f"body-{i}".encode() for i in range(60)]
            return await asyncio.gather(*(client.post(url, content=body) for body in bodies))

    for i, response in enumerate(asyncio.run(run())):
        if i % 5 == 0:
            assert response.status_code == 422, response.text
            assert response.json()["message"] == "rejected in preprocess"
            continue
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["body"] == response.headers["x-body"] == f"body-{i}"
        assert answer["id"] == answer["preprocess_id"] == response.headers["x-request-id"]


def test_describe_shows_the_pipeline(steps: Server) -> None:
    response = steps.http.get(f"{steps.management}/models/overlapped")
    [description] = response.json()
    assert description["maxBatchesInFlight"] == 2
    assert description["overlapStages"] is True
    assert [worker["batchesInFlight"] for worker in description["workers"]] == [0]
    [description] = steps.http.get(f"{steps.management}/models/depth1").json()
    assert (description["maxBatchesInFlight"], description["overlapStages"]) == (1, False)


def test_the_model_log_says_whether_stages_overlap(steps: Server) -> None:
    text = steps.log.read_text()
    assert "overlapStages: StageHandler's preprocess of a batch overlaps the previous batch's inference" in text


# -- faults with a next batch held --------------------------------------------------------------------


@pytest.fixture
def held(start_server: ServerFactory, tmp_path: Path) -> Server:
    return start_server(root=tmp_path)


@pytest.mark.parametrize("overlap", [False, True])
def test_kill_9_fails_the_running_batch_and_serves_the_held_one(held: Server, overlap: bool) -> None:
    install(held, "m", f"overlapStages: {str(overlap).lower()}\n")
    join = send_all(held, "m", [b"sleep:2", b"next", b"queued"])
    wait_for(lambda: running(held, "sleep:2") and in_flight(held, "m") == 2, what="a batch running and one held")
    [worker] = workers(held, "m")
    os.kill(worker["pid"], signal.SIGKILL)
    first, second, third = join()
    assert first.status_code == 507, first.text  # SIGKILLed from outside: TorchServe's OOM answer
    assert first.json()["message"] == "Worker died."
    # The held batch had not started: it is not failed for the running one's fault.
    assert (second.status_code, second.json()["body"]) == (200, "next")
    assert (third.status_code, third.json()["body"]) == (200, "queued")
    assert workers(held, "m")[0]["restarts"] == 1


def test_a_timeout_fails_the_running_batch_and_serves_the_held_one(held: Server) -> None:
    install(held, "m", response_timeout=2)
    join = send_all(held, "m", [b"sleep:30", b"next"])
    first, second = join()
    assert first.status_code == 500, first.text
    assert first.json()["message"] == "Worker died."
    assert (second.status_code, second.json()["body"]) == (200, "next")


def test_a_held_batch_s_timeout_runs_from_its_start(held: Server) -> None:
    """Each batch takes 1.5 s of a 2 s response_timeout; the second waits 1.5 s in the worker first."""
    install(held, "m", response_timeout=2)
    answers = send_all(held, "m", [b"sleep:1.5", b"sleep:1.49"])()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert workers(held, "m")[0]["restarts"] == 0


def test_clients_that_leave_while_held_cost_at_most_that_batch(held: Server) -> None:
    install(held, "m")
    join = send_all(held, "m", [b"sleep:2", b"after"])
    wait_for(lambda: running(held, "sleep:2") and in_flight(held, "m") == 2, what="a batch running and one held")
    # The worker holds "after"; these wait in the queue and leave; then the worker dies.
    for body in (b"gone-1", b"gone-2"):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{held.inference}/predictions/m", content=body, timeout=0.3)
    os.kill(workers(held, "m")[0]["pid"], signal.SIGKILL)
    first, second = join()
    assert first.status_code == 507
    assert (second.status_code, second.json()["body"]) == (200, "after")
    late = held.predict("m", b"late", timeout=30)
    assert (late.status_code, late.json()["body"]) == (200, "late")
    ran = (held.tmp / "ran.log").read_text().split()
    assert ran == ["sleep:2", "after", "late"]  # the departed never ran


def test_scale_down_lets_the_running_and_the_held_batch_finish(held: Server) -> None:
    install(held, "m")
    join = send_all(held, "m", [b"sleep:1", b"next"])
    wait_for(lambda: running(held, "sleep:1") and in_flight(held, "m") == 2, what="a batch running and one held")
    response = held.http.put(f"{held.management}/models/m", params={"min_worker": 0, "max_worker": 0})
    assert response.status_code in (200, 202), response.text
    first, second = join()
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["body"] == "next"
    wait_for(lambda: workers(held, "m") == [], what="the worker to stop")
