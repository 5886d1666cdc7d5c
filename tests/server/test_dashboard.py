"""The dashboard's status endpoint and page over HTTP, and the sampling behind its rates and percentiles.

The page in a real browser is tests/server/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.apis.dashboard import Dashboard, page
from server.apis.dashboard.sampling import (
    GAP_SECONDS,
    SPAN_SECONDS,
    STEP_SECONDS,
    WINDOW_SECONDS,
    Reading,
    Sampler,
    quantile,
)
from server.metrics.recording import LATENCY_BUCKETS, Metrics
from server.version import TORCHSERVE_VERSION, marserve_version
from tests.conftest import Model, Server, ServerFactory, wait_for

ROOT = Path(__file__).resolve().parents[2]

# -- percentiles and the ring of readings (no server) --------------------------------------------------


def test_quantiles_are_interpolated_inside_their_bucket_as_prometheus_does() -> None:
    bounds = (0.001, 0.01, 0.1, math.inf)
    assert quantile(0.5, bounds, (0, 0, 0, 0)) is None
    # All ten in (0.001, 0.01]: the median is halfway through that bucket.
    assert quantile(0.5, bounds, (0, 10, 0, 0)) == pytest.approx(0.0055)
    # The first bucket starts at 0.
    assert quantile(0.5, bounds, (4, 0, 0, 0)) == pytest.approx(0.0005)
    # 90 fast, 10 slow: p50 among the fast ones, p99 among the slow.
    counts = (90, 0, 10, 0)
    assert quantile(0.5, bounds, counts) == pytest.approx(0.001 * 50 / 90)
    assert quantile(0.99, bounds, counts) == pytest.approx(0.01 + 0.09 * 9 / 10)
    # A rank in +Inf: the highest finite bound (histogram_quantile's answer).
    assert quantile(0.99, bounds, (1, 0, 0, 99)) == 0.1
    assert quantile(0.5, bounds, (0, 0, 0, 5)) == 0.1


class Clock:
    """Readings at a time the test sets: one series whose count the test sets too."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.requests = 0
        self.reads = 0

    def read(self) -> Reading:
        self.reads += 1
        counts = (0, 0, 0, 0, 0, self.requests, *([0] * (len(LATENCY_BUCKETS) - 6)))  # all in (10, 25] ms
        return Reading(self.now, self.now + 1e9, {("m", "1"): counts}, {}, {2: self.requests}, {})


def test_rates_cover_the_last_minute_of_polling_and_nothing_is_read_between_polls() -> None:
    clock = Clock()
    sampler = Sampler(clock.read, LATENCY_BUCKETS)
    current, base = sampler.poll()
    assert base is None  # one reading: no rate yet
    for _ in range(120):  # two minutes of polls a second, 10 requests a second
        clock.now += 1
        clock.requests += 10
        current, base = sampler.poll()
    assert base is not None
    assert current.at - base.at == pytest.approx(WINDOW_SECONDS)
    assert (current.latency[("m", "1")][5] - base.latency[("m", "1")][5]) / (current.at - base.at) == pytest.approx(10)
    assert clock.reads == 121  # one reading per poll, none in between
    # Polled faster than once a second (several viewers), the ring keeps about one reading a second.
    for _ in range(100):
        clock.now += 0.1
        sampler.poll()
    assert len(sampler._ring) <= WINDOW_SECONDS + 1  # noqa: SLF001
    # Nobody looked for two minutes: the next poll has no base, the one after a short window.
    clock.now += 120
    assert sampler.poll()[1] is None
    clock.now += 1
    current, base = sampler.poll()
    assert base is not None and current.at - base.at == pytest.approx(1)


def test_history_has_a_point_per_step_gaps_where_nobody_looked_and_five_minutes_at_most() -> None:
    clock = Clock()
    sampler = Sampler(clock.read, LATENCY_BUCKETS)
    for _ in range(61):
        sampler.poll()
        clock.now += 1
        clock.requests += 4
    points = list(sampler.history())
    assert len(points) == 12  # 60 s at a point per 5 s
    assert all(p.figures[("m", "1")].per_second == pytest.approx(4) for p in points)
    assert all(0.010 < (p.figures[("m", "1")].p50 or 0) <= 0.025 for p in points)
    assert [b.wall - a.wall for a, b in zip(points, points[1:])] == [STEP_SECONDS] * 11
    # A pause longer than the gap: no point spans it.
    clock.now += GAP_SECONDS + 10
    sampler.poll()
    assert len(list(sampler.history())) == 12
    for _ in range(int(SPAN_SECONDS) + 60):
        clock.now += 1
        sampler.poll()
    points = list(sampler.history())
    assert points[-1].wall - points[0].wall <= SPAN_SECONDS
    assert len(points) <= SPAN_SECONDS / STEP_SECONDS + 1


class Registry:
    """What the dashboard reads of a registry: nothing registered."""

    def status(self) -> list[Any]:
        return []


def test_the_first_poll_has_no_rates_and_polls_difference_the_counters() -> None:
    metrics = Metrics("host")
    dashboard = Dashboard(Registry(), metrics, lambda: {"inference": 2, "metrics": 1})  # type: ignore[arg-type]
    first = asyncio.run(dashboard.status())
    assert first["window_seconds"] is None
    assert first["server"]["responses"]["2xx"] == {"total": 0, "per_second": None}
    assert first["server"]["connections"] == {"inference": 2, "metrics": 1}
    for status in (200, 200, 404, 503):
        metrics.response(status)
    metrics.refused("head_timeout")
    time.sleep(0.05)
    second = asyncio.run(dashboard.status())
    window = second["window_seconds"]
    assert 0.04 < window < 5
    server = second["server"]
    assert server["responses"]["2xx"]["total"] == 2
    assert server["responses"]["2xx"]["per_second"] == pytest.approx(2 / window)
    assert server["responses"]["4xx"]["total"] == server["responses"]["5xx"]["total"] == 1
    assert server["refused"]["head_timeout"]["total"] == 1
    assert server["refused"]["connection_cap"] == {"total": 0, "per_second": 0.0}
    assert server["hostname"] == "host"


# -- the endpoint on a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    models = [
        Model("echo", "echo_handler.py", batch_size=4, max_batch_delay=20),
        Model("batch", "inf_batch_handler.py"),
        Model("idle", "echo_handler.py", initial_workers=0),
        Model("victim", "inf_fail_handler.py"),
    ]
    return start_module_server(models=models, name="dashboard")


def status(server: Server) -> dict[str, Any]:
    response = server.http.get(f"{server.metrics}/dashboard/status")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()  # type: ignore[no-any-return]


def model(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["models"] if m["name"] == name)


def test_status_shape(srv: Server) -> None:
    body = status(srv)
    assert set(body) == {"time", "window_seconds", "history_step_seconds", "history_span_seconds", "server", "models"}
    assert abs(body["time"] - time.time()) < 5
    server = body["server"]
    assert server["version"] == marserve_version() and server["torchserve_version"] == TORCHSERVE_VERSION
    assert 0 < server["uptime_seconds"] < 600 and server["system_metrics"] is True
    assert server["memory"]["total_bytes"] > server["memory"]["used_bytes"] > 0
    assert server["frontend"]["pid"] == os.getpid() and server["frontend"]["rss_bytes"] > 0
    assert isinstance(server["gpus"], list)
    assert set(server["connections"]) == {"inference", "management", "metrics"}
    assert server["connections"]["metrics"] >= 1  # this very request's
    assert set(server["responses"]) == {"2xx", "4xx", "5xx"}
    assert {"connection_cap", "evicted", "head_timeout", "invalid"} <= set(server["refused"])
    assert [(m["name"], m["version"], m["default"]) for m in body["models"]] == [
        ("batch", "1.0", True), ("echo", "1.0", True), ("idle", "1.0", True), ("victim", "1.0", True),
    ]  # fmt: skip
    echo = model(body, "echo")
    assert echo["settings"]["batch_size"] == 4 and echo["settings"]["max_batch_delay_ms"] == 20
    assert echo["queue"] == {"length": 0, "capacity": 100}
    assert echo["url"] == "echo.mar" and echo["handler"].endswith("echo_handler.py")
    (worker,) = echo["workers"]
    assert worker["state"] == "READY" and worker["pid"] in srv.worker_pids()
    assert worker["rss_bytes"] > 1 << 20 and worker["restarts"] == 0 and worker["last_exit"] is None
    assert worker["in_flight"] == 0  # nothing sent to it
    assert worker["started_at"] <= worker["loaded_at"] == echo["loaded_at"] <= body["time"]
    assert [b["label"] for b in echo["batch_sizes"]][:4] == ["1", "2", "3–4", "5–8"]
    assert echo["batch_sizes"][-1] == {**echo["batch_sizes"][-1], "le": None, "label": ">256"}
    idle = model(body, "idle")
    assert idle["workers"] == [] and idle["loaded_at"] is None and idle["requests"]["total"] == 0


def test_values_move_with_traffic(srv: Server) -> None:
    before = status(srv)
    for i in range(12):
        assert srv.predict("echo", str(i).encode()).status_code == 200
    for _ in range(3):
        assert srv.predict("batch", b"sleep:0.02").status_code == 200
    assert srv.predict("nope").status_code == 404  # no model: counted on the server, by no model
    # Errors by class, per model version: the handler's own 4xx, a handler that raises, no worker.
    assert srv.predict("victim", b"ok").status_code == 200
    assert srv.predict("victim", b"teapot").status_code == 418
    assert srv.predict("victim", b"raise").status_code >= 500
    assert srv.predict("idle").status_code == 503
    time.sleep(0.2)
    after = status(srv)
    window = after["window_seconds"]
    assert window is not None and 0.2 < window <= 61
    echo, batch = model(after, "echo"), model(after, "batch")
    assert echo["requests"]["total"] - model(before, "echo")["requests"]["total"] == 12
    assert batch["requests"]["total"] - model(before, "batch")["requests"]["total"] == 3
    assert echo["requests"]["per_second"] >= 12 / window * 0.99
    # A request refused at the queue counts, as TorchServe counts it (and as a 5xx below).
    assert model(after, "idle")["requests"]["total"] - model(before, "idle")["requests"]["total"] == 1
    latency = batch["latency_ms"]
    # Each took 20 ms or more; the estimates lie in the buckets above 10 ms.
    assert 10 < latency["p50"] <= latency["p90"] <= latency["p99"] <= 1000
    assert sum(b["total"] for b in echo["batch_sizes"]) - sum(b["total"] for b in model(before, "echo")["batch_sizes"]) >= 3
    assert sum(b["count"] for b in echo["batch_sizes"]) >= 3  # batches in the window
    victim, idle = model(after, "victim")["responses"], model(after, "idle")["responses"]
    victim_before, idle_before = model(before, "victim")["responses"], model(before, "idle")["responses"]
    for cls in ("2xx", "4xx", "5xx"):
        assert victim[cls]["total"] - victim_before[cls]["total"] == 1, (cls, victim)
    assert victim["4xx"]["per_second"] >= 1 / window * 0.99
    assert idle["5xx"]["total"] - idle_before["5xx"]["total"] == 1 and idle["2xx"]["total"] == 0
    assert echo["responses"]["2xx"]["total"] - model(before, "echo")["responses"]["2xx"]["total"] == 12
    assert echo["responses"]["4xx"]["total"] == echo["responses"]["5xx"]["total"] == 0
    # The same counts are a metric of their own: /metrics shows what the dashboard shows.
    scraped = srv.http.get(f"{srv.metrics}/metrics").text
    line = f'marserve_inference_responses_total{{code="4xx",model_name="victim",model_version="1.0"}} {float(victim["4xx"]["total"])}'
    assert line in scraped.splitlines(), scraped
    responses, earlier = after["server"]["responses"], before["server"]["responses"]
    assert responses["2xx"]["total"] - earlier["2xx"]["total"] >= 16
    assert responses["4xx"]["total"] - earlier["4xx"]["total"] >= 2
    assert responses["2xx"]["per_second"] > 0


def test_a_busy_worker_shows_its_batch_in_flight(srv: Server) -> None:
    # A client of its own: the server fixture's is not shared between threads.
    slow = threading.Thread(target=httpx.post, args=(f"{srv.inference}/predictions/batch",), kwargs={"content": b"sleep:1.5", "timeout": 30})
    slow.start()
    try:
        wait_for(lambda: model(status(srv), "batch")["workers"][0]["in_flight"] >= 1, 5, "the batch in flight")
    finally:
        slow.join(10)
    wait_for(lambda: model(status(srv), "batch")["workers"][0]["in_flight"] == 0, 5, "the batch answered")


def test_refusals_and_open_connections(srv: Server) -> None:
    port = int(srv.inference.rsplit(":", 1)[1])
    before = status(srv)["server"]
    with socket.create_connection(("127.0.0.1", port)) as garbage:
        garbage.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        garbage.recv(4096)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        during = wait_for(
            lambda: (s := status(srv)["server"])["connections"]["inference"] >= before["connections"]["inference"] + 3 and s,
            5, "three more open connections",
        )  # fmt: skip
    finally:
        for sock in held:
            sock.close()
    assert during["refused"]["invalid"]["total"] == before["refused"]["invalid"]["total"] + 1  # type: ignore[index]
    wait_for(lambda: status(srv)["server"]["connections"]["inference"] <= before["connections"]["inference"], 5, "them to close")


def test_a_killed_worker_shows_restarting_then_ready(srv: Server) -> None:
    seen = set()

    def ready_after(restarts: int) -> Any:
        def ready() -> dict[str, Any] | None:
            (now,) = model(status(srv), "victim")["workers"]
            seen.add(now["state"])
            return now if now["state"] == "READY" and now["restarts"] == restarts else None

        return wait_for(ready, 60, "the worker to be replaced")

    # A worker that had served is replaced at once (from the worker template, in milliseconds);
    # one that dies again soon after waits its backoff, RESTARTING, which the status shows.
    (worker,) = model(status(srv), "victim")["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    again = ready_after(1)
    assert again["pid"] != worker["pid"] and again["loaded_at"] > worker["loaded_at"]
    assert "SIGKILL" in again["last_exit"]
    seen.clear()
    os.kill(again["pid"], signal.SIGKILL)
    third = ready_after(2)
    assert "RESTARTING" in seen, seen
    assert third["pid"] != again["pid"] and "SIGKILL" in third["last_exit"]


def test_the_page_renders_the_state_on_the_server(srv: Server) -> None:
    response = srv.http.get(f"{srv.metrics}/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    text = response.text
    nonce = re.search(r"script-src 'nonce-([^']+)'", response.headers["content-security-policy"])
    assert nonce and f'<script nonce="{nonce.group(1)}">' in text
    for name in ("echo", "batch", "idle", "victim"):
        assert f'data-model="{name}" data-version="1.0"' in text
    assert '<span class="state READY">READY</span>' in text
    assert "No workers (scaled to 0)." in text
    assert 'data-refresh="1"' in text and "{{" not in text
    # Relative URLs only: it works behind a proxy, under any prefix.
    assert not re.search(r'(href|src)="/', text) and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert srv.http.get(f"{srv.metrics}/dashboard/?refresh=0.5").text.count('data-refresh="0.5"') == 1
    assert 'data-refresh="1"' in srv.http.get(f"{srv.metrics}/dashboard?refresh=nan").text
    assert 'data-refresh="60"' in srv.http.get(f"{srv.metrics}/dashboard?refresh=9999").text
    head = srv.http.head(f"{srv.metrics}/dashboard")
    assert head.status_code == 200 and head.content == b""
    assert srv.http.post(f"{srv.metrics}/dashboard/status").status_code == 405


def test_the_dashboard_needs_no_token(start_server: ServerFactory) -> None:
    server = start_server("disable_token_authorization=false\n", name="dashboard-tokens")
    assert server.http.get(f"{server.management}/models").status_code == 401
    assert server.http.get(f"{server.metrics}/dashboard").status_code == 200
    assert status(server)["models"] == []


def test_what_the_page_shows_is_escaped() -> None:
    hostile = "<img src=x onerror=alert(1)>"
    snapshot = {
        "time": 2e9, "window_seconds": None, "history_step_seconds": 5.0, "history_span_seconds": 300.0,
        "server": {
            "version": "0.1.0", "torchserve_version": "0.12.0", "hostname": hostile, "started_at": 2e9 - 5,
            "uptime_seconds": 5.0, "system_metrics": False, "cpu_percent": None, "memory": None, "gpus": [],
            "frontend": {"pid": 1, "rss_bytes": 1, "cpu_percent": None}, "connections": {"inference": 0},
            "responses": {"2xx": {"total": 0, "per_second": None}}, "refused": {},
        },
        "models": [{
            "name": "m", "version": "1", "default": True, "url": hostile, "handler": hostile, "runtime": "python",
            "loaded_at_startup": False, "loaded_at": None,
            "settings": {"batch_size": 1, "max_batch_delay_ms": 100, "min_workers": 1, "max_workers": 1,
                         "response_timeout_seconds": 120, "device_type": "cpu"},
            "queue": {"length": 0, "capacity": 100},
            "workers": [{"id": "9000", "state": "FAILED", "pid": None, "rss_bytes": None, "gpu": None, "restarts": 3, "in_flight": 0,
                         "last_exit": f'exited with code 1; its last output: "{hostile}', "started_at": None, "loaded_at": None}],
            "requests": {"total": 0, "per_second": None}, "latency_ms": None, "batch_sizes": [],
            "responses": {cls: {"total": 0, "per_second": None} for cls in ("2xx", "4xx", "5xx")},
            "history": [],
        }],
    }  # fmt: skip
    html = page.render(snapshot, refresh=1, nonce="n")
    assert hostile not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert '<span class="state FAILED">FAILED</span>' in html


def test_the_page_ships_with_the_package(tmp_path: Path) -> None:
    """A wheel built from the checkout holds the page, its styles and its script (pyproject's package data)."""
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("server", "archiver", "handlers"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path), "."],
        cwd=source, check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("marserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("dashboard.html", "dashboard.css", "dashboard.js"):
        assert f"server/apis/dashboard/{asset}" in names
