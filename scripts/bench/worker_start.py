"""How fast workers start and how much they weigh: marserve beside TorchServe 0.12, same archive.

For each server, in alternating rounds (marserve first, then TorchServe first, ...), on an echo
archive whose handler is a BaseHandler subclass with no model (as TorchServe users write one):

- start with ``--models echo=echo.mar`` → first successful prediction, in seconds;
- a second worker (``PUT /models/echo?min_worker=2&synchronous=true``) → READY, in seconds;
- a worker killed with SIGKILL → all workers READY again, a new pid in its place, in seconds;
- a worker's resident set (VmRSS), beside ``python -c "import torch"``'s.

marserve runs twice: as it ships (workers forked from the template) and with
``worker_template=false`` (each worker a fresh interpreter, which imports only what its handler needs).

Each figure is the median of its rounds. Run by ``scripts/benchmark-workers``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ports import free_port  # scripts/bench/ports.py

ROOT = Path(__file__).resolve().parent.parent.parent
MARSERVE_BIN = ROOT / ".venv" / "bin"
TORCHSERVE_BIN = ROOT / ".venv-torchserve" / "bin"

HANDLER = '''
from ts.torch_handler.base_handler import BaseHandler


class Echo(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        return [row.get("data") or row.get("body") for row in data]

    def inference(self, data, *args, **kwargs):
        return data

    def postprocess(self, data):
        return [bytes(x) for x in data]
'''



def until(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise SystemExit("timed out")


class Server:
    def __init__(self, name: str, work: Path, store: Path) -> None:
        self.name = name
        self.work = work / name.replace(", ", "-")
        self.work.mkdir()
        self.store = store
        ports = [free_port() for _ in range(5)]
        self.inference = f"http://127.0.0.1:{ports[0]}"
        self.management = f"http://127.0.0.1:{ports[1]}"
        self.config = self.work / "config.properties"
        self.config.write_text(
            f"inference_address={self.inference}\nmanagement_address={self.management}\n"
            f"metrics_address=http://127.0.0.1:{ports[2]}\ndisable_token_authorization=true\nenable_model_api=true\n"
            f"disable_system_metrics=true\ngrpc_inference_port={ports[3]}\ngrpc_management_port={ports[4]}\n"
            # One worker to start with on both (TorchServe would start one per core).
            "default_workers_per_model=1\n"
        )
        if name == "marserve, spawned":
            with self.config.open("a") as config:
                config.write("worker_template=false\n")
        self.env = {**os.environ, "TMPDIR": str(self.work), "LOG_LOCATION": str(self.work / "logs")}
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self.name == "torchserve":
            self.env["PATH"] = f"{TORCHSERVE_BIN}:{os.environ['PATH']}"
            return [str(TORCHSERVE_BIN / "torchserve"), "--start", "--foreground", "--disable-token-auth", "--ncs",
                    "--model-store", str(self.store), "--ts-config", str(self.config), "--models", "echo=echo.mar"]  # fmt: skip
        return [str(MARSERVE_BIN / "serve"), "--start", "--foreground", "--ncs", "--model-store", str(self.store),
                "--ts-config", str(self.config), "--models", "echo=echo.mar"]  # fmt: skip

    def workers(self) -> list[dict[str, object]]:
        workers: list[dict[str, object]] = httpx.get(f"{self.management}/models/echo", timeout=10).json()[0]["workers"]
        return workers

    def predicts(self) -> bool:
        return httpx.post(f"{self.inference}/predictions/echo", content=b"hi", timeout=10).status_code == 200

    def round(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        started = time.perf_counter()
        with open(self.work / "server.log", "ab") as log:
            self.process = subprocess.Popen(self.command(), env=self.env, cwd=self.work, stdout=log, stderr=subprocess.STDOUT)
        try:
            until(self.predicts)
            figures["start → first prediction, s"] = time.perf_counter() - started
            [first] = self.workers()
            figures["worker RSS, MB"] = rss_mb(int(str(first["pid"])))
            started = time.perf_counter()
            reply = httpx.put(f"{self.management}/models/echo", params={"min_worker": 2, "synchronous": "true"}, timeout=120)
            assert reply.status_code == 200, reply.text
            until(lambda: sum(w["status"] == "READY" for w in self.workers()) == 2)
            figures["second worker → READY, s"] = time.perf_counter() - started
            pid = int(str(self.workers()[0]["pid"]))
            started = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            until(lambda: (w := self.workers()) and all(x["status"] == "READY" for x in w)
                  and pid not in [x["pid"] for x in w] and len(w) == 2 and self.predicts())  # fmt: skip
            figures["killed worker → serving again, s"] = time.perf_counter() - started
        finally:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.name == "torchserve":
                subprocess.run([str(TORCHSERVE_BIN / "torchserve"), "--stop"], env=self.env, capture_output=True)
        return figures


def rss_mb(pid: int) -> float:
    """A process's resident set now (describe's memoryUsage needs TorchServe's system metrics)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def import_torch_rss_mb() -> float:
    out = subprocess.run(
        [str(MARSERVE_BIN / "python"), "-c", "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="marserve-workers-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        (work / "echo_handler.py").write_text(HANDLER)
        subprocess.run(
            [str(MARSERVE_BIN / "model-archiver"), "--model-name", "echo", "--version", "1.0", "--handler",
             str(work / "echo_handler.py"), "--export-path", str(store)], check=True,
        )  # fmt: skip
        names = ["marserve", "torchserve", "marserve, spawned"]
        results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for number in range(args.rounds):
            order = names if number % 2 == 0 else names[::-1]
            for name in order:
                (work / f"round{number}").mkdir(exist_ok=True)
                figures = Server(name, work / f"round{number}", store).round()
                results[name].append(figures)
                print(f"round {number + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), file=sys.stderr)
        torch_rss = import_torch_rss_mb()
    keys = list(results["marserve"][0])
    print(f"\n{args.rounds} rounds, alternating; medians. `python -c \"import torch\"`: {torch_rss:.0f} MB max RSS.\n")
    print("| | TorchServe 0.12 | marserve | marserve, worker_template=false |")
    print("|---|---|---|---|")
    for key in keys:
        row = [statistics.median(r[key] for r in results[name]) for name in ("torchserve", "marserve", "marserve, spawned")]
        print(f"| {key} | " + " | ".join(f"{value:.2f}" for value in row) + " |")


if __name__ == "__main__":
    main()
