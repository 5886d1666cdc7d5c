"""Drive marserve and TorchServe 0.12 with wrk on the same archives and report both, side by side."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
MARSERVE_BIN = ROOT / ".venv" / "bin"
TORCHSERVE_BIN = ROOT / ".venv-torchserve" / "bin"
DIGIT = ROOT / "examples" / "digits" / "samples" / "digit_3.png"


@dataclass
class Scenario:
    label: str
    model: str
    body: Path
    concurrency: int
    batch_size: int
    max_batch_delay: int


@dataclass
class Result:
    rps: float
    p50: float
    p90: float
    p99: float
    errors: int
    cpu_ms_per_request: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_archives(store: Path) -> None:
    archiver = str(MARSERVE_BIN / "model-archiver")
    common = ["--version", "1.0", "--export-path", str(store), "-f"]
    subprocess.run([archiver, "--model-name", "echo", "--handler", str(BENCH / "echo_handler.py"), *common], check=True)
    digits = ROOT / "examples" / "digits"
    subprocess.run(
        [
            archiver, "--model-name", "digits", "--handler", str(digits / "digits_handler.py"),
            "--model-file", str(digits / "model.py"), "--serialized-file", str(digits / "digits.pt"),
            "--extra-files", str(digits / "index_to_name.json"), *common,
        ],
        check=True,
    )  # fmt: skip


class Server:
    """One server under test; subclasses know how to start and stop their kind."""

    name = ""

    def __init__(self, work: Path, store: Path) -> None:
        self.work = work
        self.store = store
        self.ports = [free_port(), free_port(), free_port()]
        self.inference = f"http://127.0.0.1:{self.ports[0]}"
        self.management = f"http://127.0.0.1:{self.ports[1]}"
        self.config = work / f"{self.name}.properties"
        self.config.write_text(
            f"inference_address={self.inference}\nmanagement_address={self.management}\n"
            f"metrics_address=http://127.0.0.1:{self.ports[2]}\ndisable_token_authorization=true\n"
            f"enable_model_api=true\nmetrics_mode=prometheus\n"
        )
        self.env = {**os.environ, "TMPDIR": str(work), "LOG_LOCATION": str(work / f"{self.name}-logs")}
        self.startup_seconds = 0.0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def frontend_pid(self) -> int:
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The frontend and every process below it (its workers)."""
        root = self.frontend_pid()
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def register(self, model: str, batch_size: int, max_batch_delay: int) -> None:
        params = {
            "url": f"{model}.mar", "batch_size": batch_size, "max_batch_delay": max_batch_delay,
            "initial_workers": 1, "synchronous": "true",
        }  # fmt: skip
        reply = httpx.post(f"{self.management}/models", params=params, timeout=300)
        if reply.status_code != 200:
            raise SystemExit(f"{self.name}: registering {model} failed: {reply.text}")

    def unregister(self, model: str) -> None:
        httpx.delete(f"{self.management}/models/{model}", timeout=300)


class Marserve(Server):
    name = "marserve"

    def start(self) -> None:
        started = time.perf_counter()
        subprocess.run(
            [str(MARSERVE_BIN / "serve"), "--start", "--model-store", str(self.store), "--ts-config", str(self.config)],
            env=self.env, check=True, stdout=subprocess.DEVNULL, cwd=self.work,
        )  # fmt: skip
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> None:
        subprocess.run([str(MARSERVE_BIN / "serve"), "--stop"], env=self.env, stdout=subprocess.DEVNULL, cwd=self.work)

    def frontend_pid(self) -> int:
        return int((self.work / ".marserve.pid").read_text())


class TorchServe(Server):
    name = "torchserve"

    def start(self) -> None:
        env = {**self.env, "PATH": f"{TORCHSERVE_BIN}:{os.environ['PATH']}"}
        started = time.perf_counter()
        subprocess.run(
            [
                str(TORCHSERVE_BIN / "torchserve"), "--start", "--ncs", "--model-store", str(self.store),
                "--ts-config", str(self.config), "--disable-token-auth", "--enable-model-api",
            ],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.work,
        )  # fmt: skip
        while True:
            try:
                if httpx.get(f"{self.inference}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> None:
        env = {**self.env, "PATH": f"{TORCHSERVE_BIN}:{os.environ['PATH']}"}
        subprocess.run([str(TORCHSERVE_BIN / "torchserve"), "--stop"], env=env, stdout=subprocess.DEVNULL, cwd=self.work)

    def frontend_pid(self) -> int:
        return int((self.work / ".model_server.pid").read_text())


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(server: Server, scenario: Scenario, seconds: int) -> Result:
    url = f"{server.inference}/predictions/{scenario.model}"
    env = {**os.environ, "BODY_FILE": str(scenario.body)}
    script = str(BENCH / "post_file.lua")
    # Warm-up: first batches pay for lazy initialisation in both servers.
    subprocess.run(["wrk", "-t1", f"-c{scenario.concurrency}", "-d2s", "-s", script, url], env=env, capture_output=True)
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{scenario.concurrency}", f"-d{seconds}s", "--latency", "-s", script, url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cpu = cpu_seconds(pids) - cpu_before
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out))
    return Result(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50=_ms(latency["50"]),
        p90=_ms(latency["90"]),
        p99=_ms(latency["99"]),
        errors=errors,
        cpu_ms_per_request=cpu * 1000 / max(requests, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per scenario")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument("--only", help="run only the scenarios whose label contains this text")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="marserve-bench-"))
    store = work / "model-store"
    store.mkdir()
    build_archives(store)
    echo_body = work / "hello.txt"
    echo_body.write_bytes(b"hello")
    scenarios = [
        Scenario("echo, concurrency 1", "echo", echo_body, 1, 1, 0),
        Scenario("echo, concurrency 32", "echo", echo_body, 32, 1, 0),
        Scenario("digits, c32, batch_size 1", "digits", DIGIT, 32, 1, 0),
        Scenario("digits, c32, batch_size 8", "digits", DIGIT, 32, 8, 10),
    ]
    scenarios = [s for s in scenarios if not args.only or args.only in s.label]
    kinds = [Marserve] if args.skip_torchserve else [Marserve, TorchServe]
    results: dict[str, dict[str, Result]] = {}
    facts: dict[str, tuple[float, float]] = {}
    for kind in kinds:
        server = kind(work, store)
        server.start()
        try:
            rss = 0.0
            for scenario in scenarios:
                server.register(scenario.model, scenario.batch_size, scenario.max_batch_delay)
                if scenario.model == "echo":
                    rss = rss_mib(server.frontend_pid())
                results.setdefault(scenario.label, {})[server.name] = run_wrk(server, scenario, args.duration)
                server.unregister(scenario.model)
            facts[server.name] = (server.startup_seconds, rss)
        finally:
            server.stop()
    print(f"\n{os.cpu_count()} cores, {args.duration} s per scenario, wrk -t1, one worker per model\n")
    print("| scenario | server | req/s | p50 ms | p90 ms | p99 ms | errors | server CPU ms/req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, by_server in results.items():
        for name, r in by_server.items():
            print(
                f"| {label} | {name} | {r.rps:.0f} | {r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | {r.errors} "
                f"| {r.cpu_ms_per_request:.3f} |"
            )
    if "torchserve" in facts:
        print("\n| scenario | throughput ratio | p50 ratio (TorchServe / marserve) |")
        print("|---|---:|---:|")
        for label, by_server in results.items():
            ours, theirs = by_server["marserve"], by_server["torchserve"]
            print(f"| {label} | {ours.rps / theirs.rps:.2f}x | {theirs.p50 / ours.p50:.2f}x |")
    print("\n| server | start-up (s, until all ports listen) | frontend RSS with one model (MiB) |")
    print("|---|---:|---:|")
    for name, (startup, rss) in facts.items():
        print(f"| {name} | {startup:.2f} | {rss:.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
