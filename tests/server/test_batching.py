"""Batching: JobQueue and collect_batch on a real event loop, then batches as a handler sees them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest

from server.models.batching import Job, JobQueue, QueueFull, collect_batch
from tests.conftest import Model, Server, ServerFactory


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop (the suite has no asyncio plugin)."""

    def wrapper() -> None:
        asyncio.run(test())

    wrapper.__name__ = test.__name__
    return wrapper


def job(name: str) -> Job:
    return Job(name, [], [], asyncio.get_running_loop().create_future(), time.perf_counter())


def ids(jobs: list[Job]) -> list[str]:
    return [j.request_id for j in jobs]


def put_later(queue: JobQueue, delay: float, *jobs: Job) -> None:
    loop = asyncio.get_running_loop()
    for j in jobs:
        loop.call_later(delay, queue.put, j)


# -- JobQueue ------------------------------------------------------------------------------------


@run
async def test_queue_is_fifo_and_bounded() -> None:
    queue = JobQueue(2)
    a, b, c = job("a"), job("b"), job("c")
    queue.put(a)
    queue.put(b)
    with pytest.raises(QueueFull):
        queue.put(c)
    # The 503 a full queue turns into is checked end to end (job_queue_size) below.
    assert len(queue) == 2
    assert await queue.get() is a
    assert queue.get_nowait() is b
    assert queue.get_nowait() is None


@run
async def test_put_back_goes_to_the_front_in_order() -> None:
    queue = JobQueue(10)
    a, b, c = job("a"), job("b"), job("c")
    queue.put(c)
    queue.put_back([a, b])
    assert ids(queue.drain()) == ["a", "b", "c"]


@run
async def test_get_times_out_with_none() -> None:
    queue = JobQueue(1)
    started = time.perf_counter()
    assert await queue.get(0.05) is None
    assert 0.045 <= time.perf_counter() - started < 0.5
    assert await queue.get(0) is None


@run
async def test_get_wakes_on_put() -> None:
    queue = JobQueue(1)
    a = job("a")
    put_later(queue, 0.02, a)
    started = time.perf_counter()
    assert await queue.get(5) is a
    assert time.perf_counter() - started < 0.5


@run
async def test_every_waiter_wakes_after_put_back_of_several() -> None:
    queue = JobQueue(10)
    getters = [asyncio.ensure_future(queue.get(2)) for _ in range(3)]
    await asyncio.sleep(0)
    queue.put_back([job("a"), job("b"), job("c")])
    got = await asyncio.wait_for(asyncio.gather(*getters), 1)
    assert sorted(ids(got)) == ["a", "b", "c"]


@run
async def test_cancelled_getter_passes_its_wakeup_on() -> None:
    queue = JobQueue(10)
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    a = job("a")
    queue.put(a)  # wakes `first`...
    first.cancel()  # ...which is cancelled before it can take the job
    assert await asyncio.wait_for(second, 1) is a
    assert first.cancelled()


@run
async def test_jobs_of_departed_clients_are_skipped_and_free_their_place() -> None:
    queue = JobQueue(2)
    gone, kept = job("gone"), job("kept")
    queue.put(gone)
    queue.put(kept)
    gone.future.cancel()  # the client disconnected while queued
    late = job("late")
    queue.put(late)  # fits: the departed job's place is reclaimed
    assert ids([await queue.get(), await queue.get()]) == ["kept", "late"]  # type: ignore[list-item]
    assert queue.get_nowait() is None


@run
async def test_drain_empties_the_queue() -> None:
    queue = JobQueue(5)
    for name in "abc":
        queue.put(job(name))
    assert ids(queue.drain()) == ["a", "b", "c"]
    assert len(queue) == 0


# -- collect_batch -------------------------------------------------------------------------------


@run
async def test_queued_jobs_join_at_once_up_to_max_size() -> None:
    queue = JobQueue(20)
    for i in range(10):
        queue.put(job(str(i)))
    started = time.perf_counter()
    batches = [await collect_batch(queue, 4, 5.0) for _ in range(2)]
    # A full batch does not wait out the window.
    assert time.perf_counter() - started < 0.5
    assert [ids(b) for b in batches] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    last = await collect_batch(queue, 4, 0.05)
    assert ids(last) == ["8", "9"]


@run
async def test_window_collects_late_jobs_until_full() -> None:
    queue = JobQueue(20)
    queue.put(job("0"))
    put_later(queue, 0.02, job("1"))
    put_later(queue, 0.04, job("2"))
    put_later(queue, 0.5, job("late"))
    started = time.perf_counter()
    batch = await collect_batch(queue, 3, 0.3)
    assert ids(batch) == ["0", "1", "2"]
    assert time.perf_counter() - started < 0.25  # returned once full, not at the window's end


@run
async def test_window_runs_from_the_first_job() -> None:
    queue = JobQueue(20)
    # The wait for a first job is not part of the window, which then lasts until 0.15 s.
    put_later(queue, 0.05, job("first"))
    put_later(queue, 0.12, job("second"))
    put_later(queue, 0.3, job("outside"))
    started = time.perf_counter()
    batch = await collect_batch(queue, 8, 0.1)
    elapsed = time.perf_counter() - started
    assert ids(batch) == ["first", "second"]
    assert 0.14 <= elapsed < 0.28
    assert ids([await queue.get(1)]) == ["outside"]  # type: ignore[list-item]


@run
async def test_zero_delay_takes_what_is_queued_without_waiting() -> None:
    queue = JobQueue(20)
    for name in "abc":
        queue.put(job(name))
    put_later(queue, 0.2, job("later"))
    started = time.perf_counter()
    assert ids(await collect_batch(queue, 8, 0)) == ["a", "b", "c"]
    queue.put(job("alone"))
    assert ids(await collect_batch(queue, 8, 0)) == ["alone"]
    assert time.perf_counter() - started < 0.1


@run
async def test_batches_never_exceed_max_size_under_a_stream() -> None:
    queue = JobQueue(100)
    for i in range(50):
        put_later(queue, i * 0.001, job(str(i)))
    seen: list[str] = []
    while len(seen) < 50:
        batch = await collect_batch(queue, 8, 0.01)
        assert 1 <= len(batch) <= 8
        seen.extend(ids(batch))
    assert seen == [str(i) for i in range(50)]


@run
async def test_cancelled_collection_returns_jobs_to_the_front() -> None:
    queue = JobQueue(20)
    queue.put(job("a"))
    queue.put(job("b"))
    collecting = asyncio.ensure_future(collect_batch(queue, 8, 5.0))
    await asyncio.sleep(0.02)
    queue.put(job("c"))
    await asyncio.sleep(0.02)
    collecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await collecting
    assert ids(queue.drain()) == ["a", "b", "c"]


@run
async def test_collection_skips_departed_clients() -> None:
    queue = JobQueue(20)
    jobs = [job(str(i)) for i in range(5)]
    for j in jobs:
        queue.put(j)
    jobs[0].future.cancel()
    jobs[2].future.cancel()
    assert ids(await collect_batch(queue, 3, 0)) == ["1", "3", "4"]


# -- batches as the handler sees them --------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    models = [
        Model("b4", "inf_batch_handler.py", batch_size=4, max_batch_delay=200),
        Model("nodelay", "inf_batch_handler.py", batch_size=8, max_batch_delay=0),
        Model("b8", "inf_batch_handler.py", batch_size=8, max_batch_delay=50, initial_workers=2),
        Model("single", "inf_batch_handler.py", batch_size=1, max_batch_delay=0),
        Model("single1", "inf_batch_handler.py", batch_size=1, max_batch_delay=0, max_batches_in_flight=1),
        Model("types", "inf_types_handler.py", batch_size=4, max_batch_delay=200),
    ]
    return start_module_server(models=models, name="batching")


def handled(server: Server) -> list[tuple[int, list[str]]]:
    """(batch size, bodies) of every batch the batch handlers ran, oldest first."""
    log = server.tmp / "inf_batches.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(size), bodies.split("|")) for size, _, bodies in (line.partition(" ") for line in lines)]


async def post_all(server: Server, model: str, bodies: list[bytes], timeout: float = 30) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=200)) as client:
        url = f"{server.inference}/predictions/{model}"
        return await asyncio.gather(*(client.post(url, content=body) for body in bodies))


def test_concurrent_requests_share_one_batch(srv: Server) -> None:
    responses = asyncio.run(post_all(srv, "b4", [f"four-{i}".encode() for i in range(4)]))
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["batch"] for r in responses] == [4, 4, 4, 4]
    assert sorted(r.json()["body"] for r in responses) == [f"four-{i}" for i in range(4)]


def test_lone_request_waits_for_the_window(srv: Server) -> None:
    with httpx.Client() as client:
        client.get(f"{srv.inference}/ping")  # connect first: only the batching window should count
        started = time.perf_counter()
        response = client.post(f"{srv.inference}/predictions/b4", content=b"lonely")
    assert response.json()["batch"] == 1
    assert time.perf_counter() - started >= 0.2


def test_zero_delay_answers_at_once(srv: Server) -> None:
    with httpx.Client() as client:
        url = f"{srv.inference}/predictions/nodelay"
        assert client.post(url, content=b"warm").status_code == 200
        timings = []
        for i in range(3):
            started = time.perf_counter()
            response = client.post(url, content=f"quick-{i}".encode())
            timings.append(time.perf_counter() - started)
            assert response.json() == {"batch": 1, "body": f"quick-{i}", "request_id": response.headers["x-request-id"]}
    assert min(timings) < 0.05, timings


def test_many_clients_get_their_own_answers(srv: Server) -> None:
    bodies = [f"client-{i:02d}-{'x' * i}".encode() for i in range(50)]
    responses = asyncio.run(post_all(srv, "b8", bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == 200
        answer = response.json()
        assert answer["body"] == body.decode()
        assert answer["request_id"] == response.headers["x-request-id"]
        assert 1 <= answer["batch"] <= 8
    batches = [(size, got) for size, got in handled(srv) if got[0].startswith("client-")]
    assert sum(size for size, _ in batches) == 50
    assert max(size for size, _ in batches) <= 8
    assert max(size for size, _ in batches) > 1  # they were batched at all


def test_each_request_in_a_batch_keeps_its_headers_status_and_id(srv: Server) -> None:
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{srv.inference}/predictions/types",
                        content=f"row-{i}".encode(),
                        headers={
                            "X-Custom": f"custom-{i}",
                            "X-Set-Status": f"{200 + i} Row {i}",
                            "X-Set-Header": f"X-Row=r{i}",
                        },
                    )
                    for i in range(4)
                )
            )

    for i, response in enumerate(asyncio.run(send())):
        assert response.status_code == 200 + i
        assert response.reason_phrase == f"Row {i}"
        answer = response.json()
        assert answer["batch"] == 4
        assert answer["params"]["body"]["value"] == f"row-{i}"
        assert answer["headers"]["X-Custom"] == f"custom-{i}"
        assert answer["request_id"] == response.headers["x-request-id"]
        assert response.headers["x-row"] == f"r{i}"


@pytest.mark.parametrize("model", ["single", "single1"])
def test_departed_client_is_not_run(srv: Server, model: str) -> None:
    """A request whose client left while it waited in the queue never reaches the handler. At depth
    2 (``single``), the first one is already the worker's next batch: it runs, and costs only that."""
    result: dict[str, httpx.Response] = {}
    url = f"{srv.inference}/predictions/{model}"
    seen = len(handled(srv))  # the batch log is the module's: only what this test runs counts
    slow = threading.Thread(target=lambda: result.setdefault("slow", httpx.post(url, content=b"sleep:1", timeout=10)))
    slow.start()
    deadline = time.monotonic() + 10
    while not any("sleep:1" in bodies for _, bodies in handled(srv)[seen:]):
        assert time.monotonic() < deadline, "the slow request never reached the handler"
        time.sleep(0.01)
    # The worker is busy, so these wait (the first, at depth 2, in the worker); their clients give up.
    for body in (b"departed-held", b"departed-queued"):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, content=body, timeout=0.3)
    after = httpx.post(url, content=b"after", timeout=10)
    slow.join(10)
    assert result["slow"].status_code == 200
    assert after.status_code == 200
    ran = [body for _, bodies in handled(srv)[seen:] for body in bodies]
    assert "after" in ran
    assert "departed-queued" not in ran
    assert ("departed-held" in ran) == (model == "single")


@pytest.fixture(scope="module")
def tiny_queue(start_module_server: ServerFactory) -> Server:
    models = [Model("slow", "inf_batch_handler.py", batch_size=1, max_batch_delay=0)]
    return start_module_server("job_queue_size=2\n", models, name="tiny")


def test_full_queue_is_503_at_once(tiny_queue: Server) -> None:
    url = f"{tiny_queue.inference}/predictions/slow"
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(httpx.post(url, content=b"sleep:1", timeout=10)))]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not handled(tiny_queue):
        assert time.monotonic() < deadline, "the first request never reached the handler"
        time.sleep(0.01)
    # One becomes the worker's next batch (depth 2), two fill the queue.
    for i in range(3):
        body = f"queued-{i}".encode()
        thread = threading.Thread(target=lambda body=body: results.append(httpx.post(url, content=body, timeout=10)))
        thread.start()
        threads.append(thread)

    def pending() -> int:
        described = httpx.get(f"{tiny_queue.management}/models/slow").json()
        return described[0]["jobQueueStatus"]["pendingRequests"]

    while pending() < 2:
        assert time.monotonic() < deadline, "the queue never filled"
        time.sleep(0.01)
    started = time.perf_counter()
    response = httpx.post(url, content=b"one too many", timeout=10)
    assert time.perf_counter() - started < 0.5
    assert response.status_code == 503
    assert response.json() == {
        "code": 503,
        "type": "ServiceUnavailableException",
        "message": 'Model "slow" has no worker to serve inference request. Please use scale workers API to add '
        "workers. If this is a sequence inference, please check if it is closed, or expired; or exceeds "
        "maxSequenceJobQueueSize",
    }
    for thread in threads:
        thread.join(10)
    assert [r.status_code for r in results] == [200, 200, 200, 200]
    assert "one too many" not in [body for _, bodies in handled(tiny_queue) for body in bodies]
