"""The metrics API and the logs, checked by value: counts move by exactly what was sent."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import InProcessServer, Model, Server, ServerFactory, make_mar


def scrape(server: Server, *names: str) -> str:
    params = [("name[]", name) for name in names]
    response = server.http.get(f"{server.metrics}/metrics", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels``; 0 if it is absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    models = [
        Model("echo", "echo_handler.py", batch_size=4, max_batch_delay=5),
        Model("idle", "echo_handler.py", initial_workers=0),
        Model("custom", "metrics_handler.py"),
    ]
    return start_module_server(models=models, name="metrics")


def test_request_counters_and_histograms_count_every_request(srv: Server) -> None:
    before = scrape(srv)
    for i in range(7):
        assert srv.predict("echo", str(i).encode()).status_code == 200
    assert srv.http.post(f"{srv.inference}/predictions/echo/1.0", content=b"v").status_code == 200
    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ts_inference_requests_total", model_name="echo", model_version="default") == 7
    assert delta("ts_inference_requests_total", model_name="echo", model_version="1.0") == 1
    assert delta("marserve_request_duration_seconds_count", model_name="echo", model_version="1.0") == 8
    assert delta("marserve_batch_size_sum", model_name="echo", model_version="1.0") == 8
    assert delta("ts_inference_latency_microseconds", model_name="echo", model_version="default") > 0
    assert delta("Requests2XX", Level="Host") >= 8
    assert value(after, "marserve_workers", model_name="echo", state="READY") == 1
    assert value(after, "marserve_model_load_duration_seconds_count", model_name="echo") == 1
    assert value(after, "WorkerLoadTime", WorkerName=f"W-{_worker_id(srv, 'echo')}-echo_1.0") > 0
    # Queue time and handler time: every request was queued, every batch timed.
    assert delta("marserve_queue_duration_seconds_count", model_name="echo", model_version="1.0") == 8
    assert delta("ts_queue_latency_microseconds", model_name="echo", model_version="default") > 0
    assert delta("marserve_handler_duration_seconds_count", model_name="echo", model_version="1.0") >= 2
    for gauge in ("QueueTime", "WorkerThreadTime"):
        assert re.search(rf"^{gauge}\{{.*\}} \S+$", after, re.M), gauge


def test_404_and_503_move_their_status_class(srv: Server) -> None:
    before = scrape(srv, "Requests4XX", "Requests5XX", "ts_inference_requests_total")
    assert srv.predict("nope").status_code == 404
    assert srv.http.get(f"{srv.management}/models/nope").status_code == 404
    assert srv.predict("idle").status_code == 503
    after = scrape(srv, "Requests4XX", "Requests5XX", "ts_inference_requests_total")
    assert value(after, "Requests4XX") - value(before, "Requests4XX") == 2
    assert value(after, "Requests5XX") - value(before, "Requests5XX") == 1
    # A request refused at the queue still counts as an inference request, as in TorchServe.
    refused = value(after, "ts_inference_requests_total", model_name="idle")
    assert refused - value(before, "ts_inference_requests_total", model_name="idle") == 1


def test_name_filter_returns_only_the_named_families(srv: Server) -> None:
    text = scrape(srv, "Requests2XX", "marserve_workers")
    families = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    assert families == {"Requests2XX", "marserve_workers"}


def test_handler_custom_metrics_arrive_with_their_dimensions(srv: Server) -> None:
    before = scrape(srv, "ImagesSeen")
    for _ in range(3):
        assert srv.predict("custom", b"img").status_code == 200
    after = scrape(srv, "ImagesSeen", "DecodeTime", "HandlerTime", "PredictionTime")
    labels = {"Color": "red", "ModelName": "custom", "Level": "Model"}
    assert value(after, "ImagesSeen", **labels) - value(before, "ImagesSeen", **labels) == 3
    assert value(after, "DecodeTime", ModelName="custom", Level="Model") == 12.5
    assert value(after, "PredictionTime", ModelName="custom") > 0
    assert value(after, "HandlerTime", ModelName="custom") > 0


def test_access_log_has_a_line_per_request(srv: Server) -> None:
    ids = [srv.predict("echo", b"logged").headers["x-request-id"] for _ in range(3)]
    missing = srv.http.get(f"{srv.management}/models/nope")
    ids.append(missing.headers["x-request-id"])
    deadline = time.monotonic() + 5
    while True:
        log = srv.log.read_text()
        if all(request_id in log for request_id in ids):
            break
        assert time.monotonic() < deadline, f"access log lines missing for {ids}"
        time.sleep(0.05)
    line = next(line for line in log.splitlines() if ids[0] in line)
    assert '"POST /predictions/echo" 200' in line and "127.0.0.1" in line and "ms" in line
    assert '"GET /models/nope" 404' in next(line for line in log.splitlines() if ids[3] in line)


def test_background_start_writes_torchserve_log_files(tmp_path: Path) -> None:
    import subprocess

    server = Server(tmp_path)
    make_mar(server.store, "echo", "echo_handler.py")
    started = subprocess.run(server.command("--start"), env=server.env, cwd=server.root, capture_output=True)
    assert started.returncode == 0, started.stderr
    try:
        assert server.register("echo.mar").status_code == 200
        request_id = server.predict("echo", b"hi").headers["x-request-id"]
    finally:
        subprocess.run(server.command("--stop"), env=server.env, cwd=server.root, capture_output=True)
    logs = tmp_path / "logs"
    assert request_id in (logs / "access_log.log").read_text()
    assert "marserve listening" in (logs / "ts_log.log").read_text()
    assert re.search(r"marserve\.model\.echo: \[\d+\]", (logs / "model_log.log").read_text())


def _worker_id(server: Server, model: str) -> str:
    return server.http.get(f"{server.management}/models/{model}").json()[0]["workers"][0]["id"]


def test_system_metrics_are_current(srv: Server) -> None:
    scrape(srv)  # the first scrape starts the CPU interval
    time.sleep(0.2)  # long enough for the host's CPU time to move
    text = scrape(srv)
    assert re.search(r"^CPUUtilization\{", text, re.M), "CPUUtilization is missing"
    for name in ("MemoryUsed", "MemoryAvailable", "MemoryUtilization", "DiskUsage", "DiskAvailable", "DiskUtilization"):
        assert value(text, name, Level="Host") > 0, name
    assert 0 <= value(text, "CPUUtilization", Level="Host") <= 100
    worker_rss = value(text, "marserve_worker_memory_bytes", model_name="echo")
    described = srv.http.get(f"{srv.management}/models/echo").json()[0]["workers"][0]["memoryUsage"]
    # Two readings of a live process a moment apart: the same order of magnitude.
    assert worker_rss > 5e6 and 0.5 < worker_rss / described < 2


def test_system_metrics_can_be_turned_off(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path, config="disable_system_metrics=true\n").start()
    try:
        text = scrape(server)
        assert "MemoryUsed" not in text and "CPUUtilization" not in text
        assert "Requests2XX" in text
    finally:
        server.stop()


def test_metrics_api_off_means_no_port_and_no_recording(tmp_path: Path) -> None:
    import httpx

    server = InProcessServer(tmp_path, config="enable_metrics_api=false\n").start()
    try:
        make_mar(server.store, "echo", "echo_handler.py")
        assert server.register("echo.mar").status_code == 200
        assert server.predict("echo", b"x").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.metrics}/metrics")
    finally:
        server.stop()


def test_json_log_format(tmp_path: Path) -> None:
    import json

    # A serve process: the log is what configure_logging() makes of log_format.
    server = Server(tmp_path, config="log_format=json\n").start()
    try:
        request_id = server.http.get(f"{server.management}/models").headers["x-request-id"]
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert any(e["logger"] == "marserve.access" and request_id in e["message"] for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_histogram_buckets_are_cumulative_and_inclusive_of_their_bound() -> None:
    from server.metrics.recording import Metrics

    metrics = Metrics(hostname="h")
    for seconds in (0.0005, 0.0006, 0.001, 120.0):
        metrics.inference("m", None, "1.0", seconds, 0.0)
    text = metrics.render(["marserve_request_duration_seconds"])[0].decode()
    labels = {"model_name": "m", "model_version": "1.0"}
    bucket = "marserve_request_duration_seconds_bucket"
    assert value(text, bucket, le="0.0005", **labels) == 1  # a value equal to a bound is in its bucket
    assert value(text, bucket, le="0.001", **labels) == 3
    assert value(text, bucket, le="60.0", **labels) == 3
    assert value(text, bucket, le="+Inf", **labels) == 4
    assert value(text, "marserve_request_duration_seconds_count", **labels) == 4
    assert value(text, "marserve_request_duration_seconds_sum", **labels) == pytest.approx(120.0021)


def test_log_level_above_info_silences_info_lines_and_the_access_log(tmp_path: Path) -> None:
    # A serve process: the log is what configure_logging() makes of log_level.
    server = Server(tmp_path, config="log_level=WARNING\n").start()
    try:
        request_id = server.http.get(f"{server.management}/models").headers["x-request-id"]
    finally:
        server.stop()
    log = server.log.read_text()
    assert request_id not in log
    assert "marserve listening" not in log


def test_torchserve_families_are_written_as_torchserve_writes_them(srv: Server) -> None:
    # The patterns of TorchServe's own test_metrics.py (test_metrics_prometheus_mode), with this
    # suite's models; each must match exactly once.
    assert srv.predict("custom", b"img").status_code == 200
    assert srv.http.post(f"{srv.inference}/predictions/custom", content=b"img").status_code == 200
    text = scrape(srv)
    host = r'Hostname=".+",'
    patterns = [
        r"TYPE Requests2XX counter",
        rf'Requests2XX\{{Level="Host",{host}\}} \d+\.\d+',
        r"TYPE ts_inference_requests_total counter",
        r'ts_inference_requests_total\{model_name="custom",model_version="default",hostname=".+",\} \d+\.\d+',
        r"TYPE ts_inference_latency_microseconds counter",
        r'ts_inference_latency_microseconds\{model_name="custom",model_version="default",hostname=".+",\} \d+\.\d+',
        r"TYPE ts_queue_latency_microseconds counter",
        r'ts_queue_latency_microseconds\{model_name="custom",model_version="default",hostname=".+",\} \d+\.\d+',
        r"TYPE QueueTime gauge",
        rf'QueueTime\{{Level="Host",{host}\}} \d+\.\d+',
        r"TYPE WorkerThreadTime gauge",
        rf'WorkerThreadTime\{{Level="Host",{host}\}} \d+\.\d+',
        r"TYPE WorkerLoadTime gauge",
        r"TYPE CPUUtilization gauge",
        rf'CPUUtilization\{{Level="Host",{host}\}} \d+\.\d+',
        r"TYPE MemoryUsed gauge",
        rf'MemoryUsed\{{Level="Host",{host}\}} \d+\.\d+',
        r"TYPE MemoryAvailable gauge",
        r"TYPE MemoryUtilization gauge",
        r"TYPE DiskUsage gauge",
        rf'DiskUsage\{{Level="Host",{host}\}} \d+\.\d+',
        r"TYPE DiskUtilization gauge",
        r"TYPE DiskAvailable gauge",
        r"TYPE HandlerTime gauge",
        rf'HandlerTime\{{ModelName="custom",Level="Model",{host}\}} \d+\.\d+',
        r"TYPE PredictionTime gauge",
        rf'PredictionTime\{{ModelName="custom",Level="Model",{host}\}} \d+\.\d+',
        r"TYPE ImagesSeen counter",
        rf'ImagesSeen\{{Color="red",ModelName="custom",Level="Model",{host}\}} \d+\.\d+',
        # Listed, as TorchServe lists them, on a host without GPUs too.
        r"# HELP GPUUtilization Torchserve prometheus gauge metric with unit: Percent",
        r"TYPE GPUMemoryUtilization gauge",
        r"TYPE GPUMemoryUsed gauge",
    ]
    for pattern in patterns:
        assert len(re.findall(pattern, text)) == 1, pattern
    # WorkerLoadTime names its worker first, as TorchServe does.
    assert re.search(r'^WorkerLoadTime\{WorkerName="W-\d+-\w+_1\.0",Level="Host",Hostname=".+",\} \d+\.\d+$', text, re.M)
    # marserve's own families stay Prometheus-native: histograms in seconds, no trailing comma.
    assert re.search(r'^marserve_request_duration_seconds_bucket\{le="\+Inf",model_name="custom",model_version="1\.0"\} \d+\.\d+$', text, re.M)
    assert re.search(r'^marserve_workers\{model_name="echo",model_version="1\.0",state="READY"\} 1\.0$', text, re.M)


@pytest.mark.parametrize(
    ("value", "java"),
    [(12.0, "12.0"), (0.25, "0.25"), (1234567.0, "1234567.0"), (12345678.0, "1.2345678E7"), (1e-05, "1.0E-5"),
     (0.0, "0.0"), (float("inf"), "+Inf"), (-2.5e20, "-2.5E20")],
)  # fmt: skip
def test_values_are_written_as_java_writes_doubles(value: float, java: str) -> None:
    from server.metrics.text import java_double

    assert java_double(value) == java
