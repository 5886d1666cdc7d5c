"""Autoscaling on a real server: a burst on a model whose maxWorkers > minWorkers adds workers up to
maxWorkers, every request of it is answered, and the idle workers go again after the cool-down,
within the server's worker caps. The handler sleeps (and imports no torch, so workers start fast).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import Server, ServerFactory, make_mar, wait_for


def install(server: Server, name: str, yaml: str, **params: object) -> None:
    config = server.root / f"{name}.yaml"
    config.write_text(yaml)
    make_mar(server.store, name, "sleep_handler.py", config_file=str(config))
    response = server.register(f"{name}.mar", **params)
    assert response.status_code == 200, response.text


def describe(server: Server, name: str) -> dict[str, Any]:
    response = server.http.get(f"{server.management}/models/{name}")
    assert response.status_code == 200, response.text
    description: dict[str, Any] = response.json()[0]
    return description


def live(server: Server, name: str) -> int:
    """Workers of ``name`` not being stopped."""
    return sum(1 for worker in describe(server, name)["workers"] if worker["state"] not in ("STOPPING", "STOPPED"))


def ready(server: Server, name: str) -> int:
    return sum(1 for worker in describe(server, name)["workers"] if worker["state"] == "READY")


class Burst:
    """``count`` requests to ``name`` at once, from threads; meanwhile the most live workers seen."""

    def __init__(self, server: Server, name: str, count: int) -> None:
        self.server = server
        self.name = name
        self.most = 0
        self._done = threading.Event()
        self._pool = ThreadPoolExecutor(count)
        self._futures = [self._pool.submit(self._post, i) for i in range(count)]
        self._watcher = threading.Thread(target=self._watch)
        self._watcher.start()

    def _post(self, i: int) -> httpx.Response:
        return httpx.post(f"{self.server.inference}/predictions/{self.name}", content=str(i).encode(), timeout=60)

    def _watch(self) -> None:
        while not self._done.is_set():
            self.most = max(self.most, live(self.server, self.name))
            time.sleep(0.05)

    def replies(self) -> list[httpx.Response]:
        replies = [future.result() for future in self._futures]
        self._done.set()
        self._watcher.join()
        self._pool.shutdown()
        return replies


def scale_events(server: Server, name: str) -> dict[tuple[str, str], float]:
    """``marserve_worker_scale_events_total`` of model ``name``, by (direction, reason)."""
    text = server.http.get(f"{server.metrics}/metrics", params={"name[]": "marserve_worker_scale_events"}).text
    events = {}
    for labels, value in re.findall(r"^marserve_worker_scale_events_total\{(.*)\} (\S+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label["model_name"] == name:
            events[(label["direction"], label["reason"])] = float(value)
    return events


def eventually(condition: Callable[[], object], timeout: float, what: str) -> None:
    wait_for(condition, timeout=timeout, what=what)


YAML = (
    "minWorkers: 1\nmaxWorkers: 3\nbatchSize: 1\nmaxBatchDelay: 10\n"
    "autoscaleWindowMs: 200\nautoscaleCooldownMs: 1500\nhandler:\n  sleep_s: 0.25\n"
)


def test_a_burst_scales_up_to_max_workers_and_back_to_min_workers(start_server: ServerFactory) -> None:
    server = start_server()
    install(server, "bursty", YAML)
    assert live(server, "bursty") == 1
    before = describe(server, "bursty")["autoscaling"]
    assert (before["enabled"], before["windowMs"], before["cooldownMs"], before["lastDecision"]) == (True, 200, 1500, None)

    started = time.monotonic()
    burst = Burst(server, "bursty", 40)  # 10 s of work for one worker
    eventually(lambda: ready(server, "bursty") == 3, 15, "three READY workers")
    scaled_up_in = time.monotonic() - started
    replies = burst.replies()
    assert [reply.status_code for reply in replies] == [200] * 40, [r.text for r in replies if r.status_code != 200]
    assert burst.most == 3  # never above maxWorkers
    pids = {reply.text.split()[1] for reply in replies}
    assert len(pids) == 3  # the workers added served the burst
    assert scaled_up_in < 10, scaled_up_in

    # Idle again: one worker goes each cool-down, down to minWorkers and no further.
    eventually(lambda: live(server, "bursty") == 1, 15, "back to one worker")
    time.sleep(2)
    assert live(server, "bursty") == 1
    after = describe(server, "bursty")["autoscaling"]
    assert (after["scaleUps"], after["scaleDowns"]) == (2, 2)
    last = after["lastDecision"]
    assert (last["action"], last["reason"]) == ("down", "idle")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", last["time"])
    events = scale_events(server, "bursty")
    assert sum(v for (d, _), v in events.items() if d == "up") == 2
    assert events[("down", "idle")] == 2
    assert set(reason for d, reason in events if d == "up") <= {"queue_time", "queue_length"}
    log = server.log.read_text()
    assert len(re.findall(r"model bursty:1\.0: autoscaling adding worker \d+ \(\d -> \d workers\): queue_", log)) == 2
    assert len(re.findall(r"autoscaling removing idle worker \d+ \(\d -> \d workers\): idle: ", log)) == 2
    # The model still serves, on its one worker.
    assert server.predict("bursty").status_code == 200


def test_the_server_cap_holds_scale_up_until_room_appears(start_server: ServerFactory) -> None:
    # Settings from config.properties this time, and the bounds from the scale API.
    server = start_server("max_workers=2\nautoscale_window_ms=200\nautoscale_cooldown_ms=60000\n")
    install(server, "capped", "batchSize: 1\nmaxBatchDelay: 10\nhandler:\n  sleep_s: 0.25\n", initial_workers=1)
    install(server, "other", "", initial_workers=1)
    scale = server.http.put(f"{server.management}/models/capped", params={"min_worker": 1, "max_worker": 2})
    assert scale.status_code == 202, scale.text
    assert describe(server, "capped")["autoscaling"]["enabled"] is True

    burst = Burst(server, "capped", 40)
    # The server runs its max_workers (2): the decision to add one is held, and says why.
    eventually(lambda: (describe(server, "capped")["autoscaling"]["lastDecision"] or {}).get("action") == "held", 10, "held")
    held = describe(server, "capped")["autoscaling"]["lastDecision"]
    assert held["reason"] == "server_cap" and "max_workers" in held["detail"]
    assert live(server, "capped") == 1
    # Room again: the held worker is added while the burst lasts.
    assert server.http.delete(f"{server.management}/models/other").status_code == 200
    eventually(lambda: ready(server, "capped") == 2, 10, "a second worker")
    replies = burst.replies()
    assert [reply.status_code for reply in replies] == [200] * 40
    assert burst.most == 2
    assert describe(server, "capped")["autoscaling"]["scaleUps"] == 1
    # min_worker == max_worker: autoscaling is off, the scale call alone sets the count.
    assert server.http.put(f"{server.management}/models/capped", params={"min_worker": 1}).status_code == 202
    eventually(lambda: live(server, "capped") == 1, 10, "scaled down by the API")
    assert describe(server, "capped")["autoscaling"]["enabled"] is False
