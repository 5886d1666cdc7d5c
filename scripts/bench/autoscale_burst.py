"""A burst against marserve with autoscaling on, beside the same model with ``minWorkers`` fixed.

One marserve serves two models made from the same archive and handler, which sleeps ``--sleep-ms``
per batch (a stand-in for a model that waits on a GPU or on I/O, so that the figures show the
scaling rather than this machine's cores): ``fixed`` (minWorkers = maxWorkers = 1) and
``autoscaled`` (minWorkers 1, maxWorkers ``--max-workers``). In each round, for each model in
turn (alternating which goes first), ``--requests`` requests are sent at once; every burst starts
from one worker (the autoscaled model's extra workers are waited out first). Reported per model:
the median round's p50, p99 and slowest latency, the burst's duration, errors, and the most
workers seen. Run by ``scripts/benchmark_server.py --autoscale-burst`` or on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ports import free_port  # scripts/bench/ports.py

ROOT = Path(__file__).resolve().parent.parent.parent
MARSERVE_BIN = ROOT / ".venv" / "bin"

HANDLER = """
import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(float((context.model_yaml_config.get("handler") or {}).get("sleep_s", 0.2)))
    return [b"done" for _ in data]
"""


@dataclass
class Burst:
    p50: float  # ms
    p99: float
    slowest: float
    seconds: float  # from the first request sent to the last answer
    errors: int
    most_workers: int


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def live_workers(management: str, model: str) -> int:
    workers = httpx.get(f"{management}/models/{model}", timeout=10).json()[0]["workers"]
    return sum(1 for worker in workers if worker["state"] not in ("STOPPING", "STOPPED"))


async def burst(inference: str, management: str, model: str, requests: int) -> Burst:
    latencies: list[float] = []
    errors = 0
    most = 0
    done = asyncio.Event()

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            reply = await client.post(f"{inference}/predictions/{model}", content=b"x")
            if reply.status_code != 200:
                errors += 1
        except httpx.HTTPError:
            errors += 1
        latencies.append((time.perf_counter() - started) * 1000)

    async def watch(client: httpx.AsyncClient) -> None:
        nonlocal most
        while not done.is_set():
            workers = (await client.get(f"{management}/models/{model}")).json()[0]["workers"]
            most = max(most, sum(1 for w in workers if w["state"] not in ("STOPPING", "STOPPED")))
            await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=requests + 1, max_keepalive_connections=requests + 1)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        watcher = asyncio.create_task(watch(client))
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(requests)))
        seconds = time.perf_counter() - started
        done.set()
        await watcher
    return Burst(percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies), seconds, errors, most)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64, help="requests sent at once in each burst")
    parser.add_argument("--sleep-ms", type=int, default=200, help="the handler's sleep per batch")
    parser.add_argument("--max-workers", type=int, default=4, help="the autoscaled model's maxWorkers")
    parser.add_argument("--window-ms", type=int, default=500, help="autoscaleWindowMs")
    parser.add_argument("--cooldown-ms", type=int, default=2000, help="autoscaleCooldownMs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="marserve-autoscale-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    store = work / "model-store"
    store.mkdir()
    (work / "sleep_handler.py").write_text(HANDLER)
    common = f"batchSize: 1\nmaxBatchDelay: 5\nhandler:\n  sleep_s: {args.sleep_ms / 1000}\n"
    yamls = {
        "fixed": "minWorkers: 1\nmaxWorkers: 1\n" + common,
        "autoscaled": (
            f"minWorkers: 1\nmaxWorkers: {args.max_workers}\nautoscaleWindowMs: {args.window_ms}\n"
            f"autoscaleCooldownMs: {args.cooldown_ms}\n" + common
        ),
    }
    for model, yaml in yamls.items():
        (work / f"{model}.yaml").write_text(yaml)
        subprocess.run(
            [
                str(MARSERVE_BIN / "model-archiver"), "--model-name", model, "--version", "1.0",
                "--handler", str(work / "sleep_handler.py"), "--config-file", str(work / f"{model}.yaml"),
                "--export-path", str(store), "-f",
            ],
            check=True,
        )  # fmt: skip
    ports = [free_port() for _ in range(3)]
    inference, management = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    config = work / "config.properties"
    config.write_text(
        f"inference_address={inference}\nmanagement_address={management}\nmetrics_address=http://127.0.0.1:{ports[2]}\n"
        f"disable_token_authorization=true\nenable_grpc=false\nmax_workers={args.max_workers + 1}\n"
    )
    env = {**os.environ, "TMPDIR": str(work), "LOG_LOCATION": str(work / "logs")}
    serve = [str(MARSERVE_BIN / "serve"), "--ncs", "--model-store", str(store), "--ts-config", str(config)]
    subprocess.run([*serve, "--start"], env=env, check=True, stdout=subprocess.DEVNULL, cwd=work)
    results: dict[str, list[Burst]] = {model: [] for model in yamls}
    try:
        for model in yamls:
            reply = httpx.post(f"{management}/models", params={"url": f"{model}.mar", "synchronous": "true"}, timeout=120)
            if reply.status_code != 200:
                raise SystemExit(f"registering {model} failed: {reply.text}")
        for round_number in range(args.rounds):
            order = list(yamls) if round_number % 2 == 0 else list(yamls)[::-1]
            for model in order:
                # Every burst starts from minWorkers: the last one's extra workers go after the cool-down.
                deadline = time.monotonic() + args.cooldown_ms / 1000 * (args.max_workers + 2) + 30
                while live_workers(management, model) > 1:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{model} did not come back to one worker")
                    time.sleep(0.2)
                results[model].append(asyncio.run(burst(inference, management, model, args.requests)))
    finally:
        subprocess.run([*serve, "--stop"], env=env, stdout=subprocess.DEVNULL, cwd=work)
    print(
        f"\n{os.cpu_count()} cores; {args.rounds} rounds of {args.requests} requests at once; the handler sleeps "
        f"{args.sleep_ms} ms a request (batch size 1); autoscaled: minWorkers 1, maxWorkers {args.max_workers}, "
        f"window {args.window_ms} ms, cool-down {args.cooldown_ms} ms\n"
    )
    print("| model | p50 ms | p99 ms | slowest ms | burst s | errors | most workers | p99 of each round |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for model, bursts in results.items():
        median = sorted(bursts, key=lambda b: b.p99)[len(bursts) // 2]
        each = ", ".join(f"{b.p99:.0f}" for b in bursts)
        print(
            f"| {model} | {median.p50:.0f} | {median.p99:.0f} | {median.slowest:.0f} | {median.seconds:.2f} "
            f"| {sum(b.errors for b in bursts)} | {max(b.most_workers for b in bursts)} | {each} |"
        )
    fixed = statistics.median(b.p99 for b in results["fixed"])
    scaled = statistics.median(b.p99 for b in results["autoscaled"])
    print(f"\np99 with autoscaling / p99 with minWorkers fixed: {scaled / fixed:.2f}")


if __name__ == "__main__":
    sys.exit(main())
