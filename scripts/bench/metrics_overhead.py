"""What recording metrics costs: the echo model at concurrency 32, metrics on and off, alternated.

Reports requests/s and server CPU per request (frontend plus worker, from /proc) for each run;
CPU per request is the steadier figure on a shared machine. Run by scripts/benchmark-metrics.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_server import BENCH, MARSERVE_BIN, cpu_seconds, free_port  # noqa: E402


def run(work: Path, store: Path, metrics_on: bool, seconds: int) -> tuple[float, float]:
    ports = [free_port(), free_port(), free_port()]
    config = work / "metrics.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\nenable_metrics_api={'true' if metrics_on else 'false'}\n"
    )
    env = {**os.environ, "TMPDIR": str(work)}
    serve = [str(MARSERVE_BIN / "serve"), "--model-store", str(store), "--ts-config", str(config)]
    # --ncs: each run registers echo itself; the previous run's snapshot must not restore it.
    subprocess.run([*serve, "--start", "--ncs"], env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
    try:
        params = {"url": "echo.mar", "batch_size": 1, "max_batch_delay": 0, "initial_workers": 1}
        httpx.post(f"http://127.0.0.1:{ports[1]}/models", params=params, timeout=60).raise_for_status()
        url = f"http://127.0.0.1:{ports[0]}/predictions/echo"
        lua = str(BENCH / "post_file.lua")
        wrk_env = {**os.environ, "BODY_FILE": str(work / "hello.txt")}
        subprocess.run(["wrk", "-t1", "-c32", "-d2s", "-s", lua, url], env=wrk_env, capture_output=True)
        frontend = int((work / ".marserve.pid").read_text())
        pids = [frontend, *[int(p) for p in subprocess.run(["pgrep", "-P", str(frontend)], capture_output=True, text=True).stdout.split()]]
        before = cpu_seconds(pids)
        out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", lua, url], env=wrk_env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        cpu = cpu_seconds(pids) - before
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        return rps, cpu * 1000 / requests
    finally:
        subprocess.run([*serve, "--stop"], env=env, cwd=work, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="marserve-metrics-"))
    store = work / "store"
    store.mkdir()
    (work / "hello.txt").write_bytes(b"hello")
    subprocess.run([str(MARSERVE_BIN / "model-archiver"), "--model-name", "echo", "--version", "1.0",
                    "--handler", str(BENCH / "echo_handler.py"), "--export-path", str(store)], check=True)  # fmt: skip
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for metrics_on in (True, False):
            results[metrics_on].append(run(work, store, metrics_on, args.duration))
    print("| metrics | req/s (median) | server CPU ms/req (median) | runs (req/s) |")
    print("|---|---:|---:|---|")
    for metrics_on, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {'on' if metrics_on else 'off'} | {rps:.0f} | {cpu:.3f} | {', '.join(f'{r:.0f}' for r, _ in runs)} |")
    # Each round's on and off runs are back to back, so they share the machine's load of the
    # moment; the median of the per-round ratios is steadier than the ratio of the medians.
    ratios = [on[1] / off[1] for on, off in zip(results[True], results[False])]
    print(f"\nmetrics cost {100 * (statistics.median(ratios) - 1):+.1f}% server CPU per request "
          f"(median of the rounds' on/off ratios: {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    recording, baseline = recording_cost()
    print(f"recording one request's metrics in the frontend: {recording:.1f} µs (switched off: {baseline:.1f} µs)")


def recording_cost(requests: int = 100_000) -> tuple[float, float]:
    """CPU µs per request of the frontend's metric calls for one echo request, on and off.

    The end-to-end comparison above is at the mercy of a shared machine's noise; this is the
    work itself, measured in one process.
    """
    from server.metrics.recording import Metrics, NoMetrics
    from server.workers.messages import Result

    def per_request(metrics: Metrics) -> float:
        report = Result(200, "", [], handler_ms=0.05, prediction_ms=0.04)
        started = time.process_time()
        for _ in range(requests):
            metrics.response(200)
            metrics.inference("echo", None, "1.0", 0.0012, 0.0003)
            metrics.batch("echo", "1.0", 1, 0.001, report)
        return (time.process_time() - started) / requests * 1e6

    return min(per_request(Metrics("h")) for _ in range(3)), min(per_request(NoMetrics("h")) for _ in range(3))


if __name__ == "__main__":
    main()
