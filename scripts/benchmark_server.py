"""Drive marserve, TorchServe 0.12 and LitServe with wrk on the same archives and report them side by side.

Both servers run at once, idle in turn: each scenario is measured in ``--rounds`` rounds that take
the servers in alternating order (marserve first, then TorchServe first, ...), because a shared
VM's speed drifts by 20% or more within minutes. A server's row is its median round, and a ratio
is the median of the rounds' ratios, each taken from two runs a few seconds apart.

Scenarios marked ``grpc`` send TorchServe's gRPC ``Predictions`` (the same body, as the handler's
``data``) to both servers' gRPC inference ports with h2load (nghttp2's HTTP/2 load generator: a
prepared length-prefixed request, ``content-type: application/grpc``, ``te: trailers``), one
stream per connection. h2load cannot see a call's gRPC status (in the trailers of an HTTP/2 200):
one call through grpcio checks each server first, and marserve's errors also count the calls its
``marserve_grpc_requests_total`` saw fail. h2load reports no latency percentiles: those rows show the mean as p50 and
the slowest request as p99. Every row shows the load generator's own CPU per request, so that one
can tell it was not the bottleneck.

Scenarios marked ``loop`` also time the handler's own loop with no server (scripts/bench/handler_loop.py:
preprocess, inference and postprocess on the same inputs and batch size, in one process with the
worker's torch thread count), just before and just after the scenario's rounds, and report served
throughput as a fraction of it.

Every server runs one worker per model, at its own default torch threads, unless a scenario says
``workers``: with one worker a core, the peers run at their best layout, ``OMP_NUM_THREADS=1`` (a
TorchServe of its own, started with it; LitServe also with its ZeroMQ ``fast_queue``; marserve
gives each worker cores / workers threads by itself). A scenario may also measure marserve variants beside the default one (MARSERVE_VARIANTS:
``maxBatchesInFlight 1``, a register parameter; ``overlapStages``, a model YAML archived with each
model in a model store of its own), each a marserve of its own.

LitServe (``.venv-litserve``, made by scripts/litserve-venv) has no management API: for each
scenario marked ``litserve`` a LitServe process starts with that model, batch size, delay and
workers (scripts/bench/litserve_app.py: the same archive's handler, called once a batch by
LitServe's batching, the raw body on ``POST /predictions/<model>``) and stops after its rounds.
A ratio is printed for each pair of servers in a scenario whose first is a marserve.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.ports import free_port  # scripts/bench/ports.py

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
MARSERVE_BIN = ROOT / ".venv" / "bin"
TORCHSERVE_BIN = ROOT / ".venv-torchserve" / "bin"
LITSERVE_BIN = ROOT / ".venv-litserve" / "bin"
DIGIT = ROOT / "examples" / "digits" / "samples" / "digit_3.png"
RESNET18 = ROOT / "examples" / "resnet18"
PHOTO = RESNET18 / "photo.jpg"  # written by examples/resnet18/make_archive.py
#: Served throughput must reach this fraction of the handler's own loop (the issue's requirement).
LOOP_TARGET = 0.90
#: Other processes' CPU (% of all cores) above which a served / loop ratio is flagged as unreliable.
NOISY_LOAD = 10.0
#: Binary OIP requests must reach this fraction of /predictions' throughput with a PNG (same model).
V2_TARGET = 0.90
V2_BASE = "v2 digits, c32, batch_size 8: /predictions PNG"
V2_BINARY = "v2 digits, c32, batch_size 8: /v2 infer, binary FP32 1x8x8"
#: marserve variants a scenario may measure beside the default one (maxBatchesInFlight 2,
#: overlapStages off): register parameters, and a model YAML archived with each model.
MARSERVE_VARIANTS: dict[str, tuple[dict[str, int], str]] = {
    "maxBatchesInFlight 1": ({"max_batches_in_flight": 1}, ""),
    "overlapStages": ({}, "overlapStages: true\n"),
}


@dataclass
class Scenario:
    label: str
    model: str
    body: Path
    concurrency: int
    batch_size: int
    max_batch_delay: int
    #: Also time the handler's own loop on the same body and batch size, and report served / loop.
    loop: bool = False
    #: Report the steady completion rate over whole batches (post_file_steady.lua) rather than wrk's
    #: requests/s, which also counts the start (the warm-up's leftover queue, the pipeline filling)
    #: and loses the batch cut off at the end: 5-15% when a batch takes hundreds of milliseconds.
    steady: bool = False
    #: Where the body goes (``{model}`` filled in); anything but /predictions is posted by post_oip.lua
    #: with ``content_type`` and, for a binary OIP request, ``header_length`` (the JSON's length).
    path: str = "/predictions/{model}"
    content_type: str = "application/json"
    header_length: int | None = None
    #: Measured on marserve only (TorchServe has no such route without its kservev2 envelope).
    marserve_only: bool = False
    #: Sent as TorchServe's gRPC Predictions (h2load) instead of over HTTP (wrk).
    grpc: bool = False
    #: Worker processes per model, on every server. More than one: the peers run with
    #: OMP_NUM_THREADS=1 (their best layout, one worker a core); one: each server's default threads.
    workers: int = 1
    #: marserve variants measured beside the default marserve (keys of MARSERVE_VARIANTS).
    variants: tuple[str, ...] = ()
    #: LitServe serves it too (scripts/bench/litserve_app.py, the same archive and handler).
    litserve: bool = False


@dataclass
class Result:
    rps: float
    wrk_rps: float
    p50: float
    p90: float
    p99: float
    errors: int
    cpu_ms_per_request: float
    #: CPU used by processes outside this measurement (other users of a shared machine), in % of all cores.
    other_load: float
    #: CPU the load generator (wrk, h2load) used per request: it must stay well below the server's.
    loadgen_cpu_ms_per_request: float = 0.0
    #: h2load gives no percentiles: p50 holds the mean and p99 the slowest request, p90 none.
    mean_latency: bool = False



@dataclass
class LoopResult:
    images_per_s: float
    batches: int
    batch_ms_p50: float
    cpu_ms_per_image: float
    torch_threads: int
    steps_ms_p50: dict[str, float]
    other_load: float


def build_archives(store: Path, models: set[str], config_file: Path | None = None) -> None:
    archiver = str(MARSERVE_BIN / "model-archiver")
    common = ["--version", "1.0", "--export-path", str(store), "-f"]
    if config_file is not None:
        common += ["--config-file", str(config_file)]
    if "echo" in models:
        echo = [archiver, "--model-name", "echo", "--handler", str(BENCH / "echo_handler.py"), *common]
        subprocess.run(echo, check=True)
    if "digits" in models:
        digits = ROOT / "examples" / "digits"
        subprocess.run(
            [
                archiver, "--model-name", "digits", "--handler", str(digits / "digits_handler.py"),
                "--model-file", str(digits / "model.py"), "--serialized-file", str(digits / "digits.pt"),
                "--extra-files", str(digits / "index_to_name.json"), *common,
            ],
            check=True,
        )  # fmt: skip
    if "resnet18" in models:
        # Random seeded weights, built-in image_classifier handler; also writes PHOTO.
        make = [str(MARSERVE_BIN / "python"), str(RESNET18 / "make_archive.py"), "--export-path", str(store)]
        if config_file is not None:
            make += ["--config-file", str(config_file)]
        subprocess.run(make, check=True, stdout=subprocess.DEVNULL)


def litserve_installed() -> bool:
    python = LITSERVE_BIN / "python"
    return python.exists() and subprocess.run([str(python), "-c", "import litserve"], capture_output=True).returncode == 0


def worker_threads(workers: int = 1) -> int:
    """A worker's torch threads on a CPU, as server/registry.py computes them: cores / workers."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_loop(store: Path, scenario: Scenario, seconds: int) -> LoopResult:
    """The handler's own loop in a fresh process, with the environment a served worker gets."""
    threads = str(worker_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    # As server/workers/placement.py: idle OpenMP threads sleep. Spinning ones (OpenMP's default)
    # took twice the CPU an image here, and half the loop's rate, while other processes were busy.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = subprocess.run(
        [
            str(MARSERVE_BIN / "python"), str(BENCH / "handler_loop.py"),
            "--archive", str(store / f"{scenario.model}.mar"), "--body", str(scenario.body),
            "--batch-size", str(scenario.batch_size), "--seconds", str(seconds),
        ],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"handler loop for {scenario.model} failed:\n{out.stderr}")
    return LoopResult(**json.loads(out.stdout.strip().splitlines()[-1]))


class Server:
    """One server under test; subclasses know how to start and stop their kind."""

    name = ""

    def __init__(self, work: Path, store: Path) -> None:
        self.work = work
        self.store = store
        self.ports = [free_port(), free_port(), free_port()]
        # gRPC inference and management: both servers bind them (TorchServe always does, and exits
        # at once when another TorchServe on the machine holds its defaults, 7070 and 7071).
        self.grpc_ports = [free_port(), free_port()]
        self.inference = f"http://127.0.0.1:{self.ports[0]}"
        self.management = f"http://127.0.0.1:{self.ports[1]}"
        self.config = work / f"{self.slug}.properties"
        self.config.write_text(
            f"inference_address={self.inference}\nmanagement_address={self.management}\n"
            f"metrics_address=http://127.0.0.1:{self.ports[2]}\ndisable_token_authorization=true\n"
            f"enable_model_api=true\nmetrics_mode=prometheus\n"
            # TorchServe would otherwise run a metrics collector process every minute, while the
            # other server is measured too.
            f"disable_system_metrics=true\n"
            f"grpc_inference_port={self.grpc_ports[0]}\ngrpc_management_port={self.grpc_ports[1]}\n{self.extra_config()}"
        )
        # A temporary directory each: marserve keeps its pid file there.
        self.tmp = work / f"{self.slug}-tmp"
        self.tmp.mkdir(exist_ok=True)
        self.env = {**os.environ, "TMPDIR": str(self.tmp), "LOG_LOCATION": str(work / f"{self.slug}-logs")}
        self.startup_seconds = 0.0

    @property
    def slug(self) -> str:
        """The name as a file name: where its configuration, temporary files and logs go."""
        return re.sub(r"[^\w.@-]+", "-", self.name).strip("-")

    def extra_config(self) -> str:
        return ""

    def register_params(self) -> dict[str, int]:
        """Register parameters of this server's own, beyond the scenario's."""
        return {}

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

    def register(self, scenario: Scenario) -> None:
        params = {
            "url": f"{scenario.model}.mar", "batch_size": scenario.batch_size, "max_batch_delay": scenario.max_batch_delay,
            "initial_workers": scenario.workers, "synchronous": "true", **self.register_params(),
        }  # fmt: skip
        reply = httpx.post(f"{self.management}/models", params=params, timeout=300)
        if reply.status_code != 200:
            raise SystemExit(f"{self.name}: registering {scenario.model} failed: {reply.text}")

    def unregister(self, model: str) -> None:
        httpx.delete(f"{self.management}/models/{model}", timeout=300)


class Marserve(Server):
    name = "marserve"

    def start(self) -> None:
        started = time.perf_counter()
        subprocess.run(
            [str(MARSERVE_BIN / "serve"), "--start", "--ncs", "--model-store", str(self.store), "--ts-config", str(self.config)],
            env=self.env, check=True, stdout=subprocess.DEVNULL, cwd=self.work,
        )  # fmt: skip
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> None:
        subprocess.run([str(MARSERVE_BIN / "serve"), "--stop"], env=self.env, stdout=subprocess.DEVNULL, cwd=self.work)

    def frontend_pid(self) -> int:
        return int((self.tmp / ".marserve.pid").read_text())


class Baseline(Marserve):
    """marserve as it was at another commit (``--baseline``), run from a copy of that commit's
    tree with this checkout's virtual environment: before / after a change, side by side."""

    def __init__(self, work: Path, store: Path, ref: str) -> None:
        self.name = f"marserve@{ref}"
        source = work / "baseline-source"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        super().__init__(work, store)
        # Ahead of the editable install: the frontend and its workers import the old tree.
        self.env["PYTHONPATH"] = str(source)


class MarserveVariant(Marserve):
    """marserve with a setting of its own (MARSERVE_VARIANTS) for every model it serves: register
    parameters, and a model YAML archived with each model in a model store of its own."""

    def __init__(self, work: Path, store: Path, variant: str) -> None:
        self.name = f"marserve ({variant})"
        self.params, self.yaml = MARSERVE_VARIANTS[variant]
        if self.yaml:
            store = work / f"model-store-{self.slug}"
            store.mkdir()
        super().__init__(work, store)

    def build_archives(self, models: set[str]) -> None:
        """The models' archives, with this variant's model YAML, where it has one."""
        if self.yaml:
            config = self.work / f"{self.slug}.yaml"
            config.write_text(self.yaml)
            build_archives(self.store, models, config)

    def register_params(self) -> dict[str, int]:
        return dict(self.params)

    def register(self, scenario: Scenario) -> None:
        """Registers, then checks by describing the model that the variant's settings took hold."""
        super().register(scenario)
        described = httpx.get(f"{self.management}/models/{scenario.model}", timeout=30).json()[0]
        expected = {
            "maxBatchesInFlight": self.params.get("max_batches_in_flight", 2),
            "overlapStages": "overlapStages: true" in self.yaml,
        }
        found = {key: described.get(key) for key in expected}
        if found != expected:
            raise SystemExit(f"{self.name}: {scenario.model} is described with {found}, not {expected}")


#: The environment of a peer at its best layout (Scenario.workers > 1): one torch thread a worker.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class TorchServe(Server):
    name = "torchserve"

    def __init__(self, work: Path, store: Path, one_thread: bool = False) -> None:
        if one_thread:
            self.name = "torchserve (OMP_NUM_THREADS=1)"
        super().__init__(work, store)
        if one_thread:
            self.env.update(ONE_THREAD)

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
        # torchserve writes it in tempfile.gettempdir(): this server's TMPDIR.
        return int((self.tmp / ".model_server.pid").read_text())


class LitServe(Server):
    """LitServe (.venv-litserve) serving one model a process: it has no management API, so
    ``register`` starts scripts/bench/litserve_app.py with the scenario's model, batching and
    workers, and ``unregister`` stops it. ``startup_seconds`` is the first such start, until its
    route answers: LitServe opens its port only once the model has loaded in every worker. At its
    best layout it also gets its ZeroMQ transport (``fast_queue``), 14-18% more echo requests/s
    here than its default queues."""

    name = "litserve"

    def __init__(self, work: Path, store: Path, one_thread: bool = False) -> None:
        if one_thread:
            self.name = "litserve (OMP_NUM_THREADS=1, fast_queue)"
        super().__init__(work, store)
        if one_thread:
            self.env.update(ONE_THREAD)
        self.fast_queue = one_thread
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.unregister("")

    def register(self, scenario: Scenario) -> None:
        log = self.work / f"{self.slug}-{scenario.model}.log"
        started = time.perf_counter()
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    str(LITSERVE_BIN / "python"), str(BENCH / "litserve_app.py"),
                    "--archive", str(self.store / f"{scenario.model}.mar"), "--port", str(self.ports[0]),
                    "--batch-size", str(scenario.batch_size), "--max-batch-delay", str(scenario.max_batch_delay),
                    "--workers", str(scenario.workers), *(["--fast-queue"] if self.fast_queue else []),
                ],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True,
            )  # fmt: skip
        deadline = started + 300
        while True:
            try:
                if httpx.get(f"{self.inference}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.perf_counter() > deadline:
                self.unregister(scenario.model)
                raise SystemExit(f"{self.name}: serving {scenario.model} failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.startup_seconds = self.startup_seconds or time.perf_counter() - started

    def unregister(self, model: str) -> None:
        if self.process is None:
            return
        # LitServe shuts down on SIGINT, but its API servers and inference workers sometimes
        # outlive it: then its process group (its own session, started above) goes.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def frontend_pid(self) -> int:
        assert self.process is not None, "LitServe runs only while a model is registered"
        return self.process.pid


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all processes have used, on all cores (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    url = server.inference + scenario.path.format(model=scenario.model)
    env = {**os.environ, "BODY_FILE": str(scenario.body)}
    script = str(BENCH / ("post_file_steady.lua" if scenario.steady else "post_file.lua"))
    if not scenario.path.startswith("/predictions/"):
        script = str(BENCH / "post_oip.lua")
        env["CONTENT_TYPE"] = scenario.content_type
        env["INFERENCE_HEADER_CONTENT_LENGTH"] = "" if scenario.header_length is None else str(scenario.header_length)
    # wrk's default 2 s timeout would count slow batches (c32 of resnet18 on 2 cores) as errors.
    timeout = "--timeout=60s"
    # Warm-up: first batches pay for lazy initialisation in both servers.
    warmup = ["wrk", "-t1", f"-c{scenario.concurrency}", "-d3s", timeout, "-s", script, url]
    subprocess.run(warmup, env=env, capture_output=True)
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    busy_before, wrk_before, started = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    run = subprocess.run(
        ["wrk", "-t1", f"-c{scenario.concurrency}", f"-d{seconds}s", timeout, "--latency", "-s", script, url],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"{server.name}, {scenario.label}: wrk failed:\n{run.stdout}{run.stderr}")
    out = run.stdout
    cpu = cpu_seconds(pids) - cpu_before
    wall = time.perf_counter() - started
    other = machine_busy_seconds() - busy_before - cpu - (children_cpu_seconds() - wrk_before)
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out))
    wrk_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    steady = re.search(r"^Steady: ([\d.]+) requests/sec", out, re.M)
    return Result(
        rps=float(steady.group(1)) if steady else wrk_rps,
        wrk_rps=wrk_rps,
        p50=_ms(latency["50"]),
        p90=_ms(latency["90"]),
        p99=_ms(latency["99"]),
        errors=errors,
        cpu_ms_per_request=cpu * 1000 / max(requests, 1),
        other_load=max(0.0, other) * 100 / (wall * (os.cpu_count() or 1)),
        loadgen_cpu_ms_per_request=(children_cpu_seconds() - wrk_before) * 1000 / max(requests, 1),
    )


GRPC_PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


def grpc_body(work: Path, model: str, body: Path) -> Path:
    """A gRPC Predictions request for ``model`` with ``body`` as its ``data`` input, length-prefixed
    as gRPC frames a message (a zero compression flag, a 4-byte big-endian length), for h2load."""
    from server.grpc.protos import inference_pb2

    message = inference_pb2.PredictionsRequest(model_name=model, input={"data": body.read_bytes()}).SerializeToString()
    framed = work / f"{model}-{body.name}.grpc"
    framed.write_bytes(struct.pack(">BI", 0, len(message)) + message)
    return framed


def check_grpc(server: Server, scenario: Scenario) -> None:
    """One Predictions call through grpcio before the load: h2load sees HTTP/2 statuses, not gRPC's."""
    import grpc

    from server.grpc.protos import inference_pb2

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_ports[0]}") as channel:
        call = channel.unary_unary(
            GRPC_PREDICTIONS, request_serializer=inference_pb2.PredictionsRequest.SerializeToString,
            response_deserializer=inference_pb2.PredictionResponse.FromString,
        )  # fmt: skip
        try:
            call(inference_pb2.PredictionsRequest(model_name=scenario.model, input={"data": scenario.body.read_bytes()}), timeout=120)
        except grpc.RpcError as exc:
            raise SystemExit(f"{server.name}, {scenario.label}: gRPC Predictions failed: {exc.code()} {exc.details()}") from None


def grpc_failed_calls(server: Server) -> int:
    """Predictions calls that failed, by marserve's own counter (``marserve_grpc_requests_total``;
    0 where there is none: TorchServe, an older marserve). h2load cannot tell: a failed call is
    still an HTTP/2 200, its status in the trailers. CANCELLED is left out: those are the calls
    h2load still had in flight when its time was up."""
    text = httpx.get(f"http://127.0.0.1:{server.ports[2]}/metrics", timeout=30).text
    pattern = r'marserve_grpc_requests_total\{code="(\w+)",method="Predictions",[^}]*\} ([\d.e+]+)'
    return sum(int(float(count)) for code, count in re.findall(pattern, text) if code not in ("OK", "CANCELLED"))


def run_h2load(server: Server, scenario: Scenario, seconds: int, body: Path) -> Result:
    url = f"http://127.0.0.1:{server.grpc_ports[0]}{GRPC_PREDICTIONS}"
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    common = ["h2load", "-t1", f"-c{scenario.concurrency}", "-m1", "-d", str(body), *headers]
    subprocess.run([*common, "-D3", url], capture_output=True)  # warm-up
    failed_before = grpc_failed_calls(server)
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    busy_before, load_before, started = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    run = subprocess.run([*common, f"-D{seconds}", url], capture_output=True, text=True)
    out = run.stdout
    if run.returncode != 0 or "requests:" not in out:
        raise SystemExit(f"{server.name}, {scenario.label}: h2load failed:\n{out}{run.stderr}")
    cpu = cpu_seconds(pids) - cpu_before
    wall = time.perf_counter() - started
    load = children_cpu_seconds() - load_before
    other = machine_busy_seconds() - busy_before - cpu - load
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    assert done is not None, out
    requests, _, failed, errored, timeouts = (int(g) for g in done.groups())
    non_200 = sum(int(n) for n in re.findall(r"(\d+) [345]xx", out))
    not_ok = grpc_failed_calls(server) - failed_before
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    assert timing is not None, out
    return Result(
        rps=rps,
        wrk_rps=rps,
        p50=_ms(timing.group(3)),
        p90=float("nan"),
        p99=_ms(timing.group(2)),
        errors=failed + errored + timeouts + non_200 + not_ok,
        cpu_ms_per_request=cpu * 1000 / max(requests, 1),
        other_load=max(0.0, other) * 100 / (wall * (os.cpu_count() or 1)),
        loadgen_cpu_ms_per_request=load * 1000 / max(requests, 1),
        mean_latency=True,
    )


def median_round(rounds: list[Result]) -> Result:
    """The round with the median throughput (the higher of the middle two for an even count)."""
    return sorted(rounds, key=lambda r: r.rps)[len(rounds) // 2]


def digit_tensor() -> list[float]:
    """DIGIT as the digits handler sees it: 8x8 gray pixels in [0, 1], row major."""
    from PIL import Image

    with Image.open(DIGIT) as image:
        small = image.convert("L").resize((8, 8), Image.Resampling.BOX)
        return [pixel / 255 for pixel in small.tobytes()]


def oip_bodies(work: Path) -> tuple[Path, Path, int]:
    """DIGIT as an Open Inference Protocol request for a 1x8x8 FP32 tensor: as JSON, and as JSON
    followed by the tensor's 256 bytes (binary tensor data); returns both files and the binary
    one's JSON length."""
    pixels = digit_tensor()
    tensor = {"name": "input-0", "shape": [1, 8, 8], "datatype": "FP32"}
    as_json = work / "digit_3.oip.json"
    as_json.write_text(json.dumps({"inputs": [{**tensor, "data": pixels}]}))
    raw = struct.pack(f"<{len(pixels)}f", *pixels)
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    as_binary = work / "digit_3.oip.bin"
    as_binary.write_bytes(head + raw)
    return as_json, as_binary, len(head)


def _rate(rps: float) -> str:
    return f"{rps:.1f}" if rps < 100 else f"{rps:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per scenario, server and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario, alternating which server goes first")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument("--skip-litserve", action="store_true")
    parser.add_argument(
        "--baseline", metavar="GIT_REF",
        help="compare with marserve at this commit instead of TorchServe (before/after a change)",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", metavar="TEXT",
        help="run only the scenarios whose label contains this text (repeat it for several)",
    )  # fmt: skip
    parser.add_argument(
        "--skip", action="append", metavar="TEXT",
        help="leave out the scenarios whose label contains this text (repeatable), e.g. gRPC",
    )  # fmt: skip
    parser.add_argument(
        "--autoscale-burst", action="store_true",
        help="run only the autoscaling scenario (scripts/bench/autoscale_burst.py): the p99 of a burst "
        "with autoscaling on, against minWorkers fixed, in --rounds rounds",
    )  # fmt: skip
    args = parser.parse_args()
    if args.autoscale_burst:
        # A burst must start from minWorkers, which wrk's warm-up and back-to-back rounds would not leave.
        subprocess.run([sys.executable, str(BENCH / "autoscale_burst.py"), "--rounds", str(args.rounds)], check=True)
        return
    work = Path(tempfile.mkdtemp(prefix="marserve-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    store = work / "model-store"
    store.mkdir()
    echo_body = work / "hello.txt"
    echo_body.write_bytes(b"hello")
    oip_json, oip_binary, oip_header = oip_bodies(work)
    v2 = "/v2/models/{model}/infer"
    # The peers' best layout: one worker a core, one torch thread each.
    cores = os.cpu_count() or 1
    best = f"{cores} workers x 1 thread"
    scenarios = [
        Scenario("echo, concurrency 1", "echo", echo_body, 1, 1, 0, litserve=True),
        Scenario("echo, concurrency 32", "echo", echo_body, 32, 1, 0, variants=("maxBatchesInFlight 1",), litserve=True),
        Scenario(f"echo, concurrency 32, {best}", "echo", echo_body, 32, 1, 0, workers=cores, litserve=True),
        Scenario("digits, c32, batch_size 1", "digits", DIGIT, 32, 1, 0, litserve=True),
        Scenario("digits, c32, batch_size 8", "digits", DIGIT, 32, 8, 10, loop=True, litserve=True),
        Scenario(f"digits, c32, batch_size 8, {best}", "digits", DIGIT, 32, 8, 10, workers=cores, litserve=True),
        Scenario("resnet18, c32, batch_size 8", "resnet18", PHOTO, 32, 8, 50, loop=True, steady=True,
                 variants=("overlapStages",), litserve=True),
        Scenario(f"resnet18, c32, batch_size 8, {best}", "resnet18", PHOTO, 32, 8, 50, steady=True, workers=cores,
                 litserve=True),
        # The Open Inference Protocol against /predictions, same model and batching: binary v2 should
        # reach V2_TARGET of the PNG's throughput.
        Scenario(V2_BASE, "digits", DIGIT, 32, 8, 10),
        Scenario(V2_BINARY, "digits", oip_binary, 32, 8, 10, path=v2, content_type="application/octet-stream",
                 header_length=oip_header, marserve_only=True),
        Scenario("v2 digits, c32, batch_size 8: /v2 infer, JSON FP32 1x8x8", "digits", oip_json, 32, 8, 10, path=v2,
                 marserve_only=True),
        # TorchServe's gRPC Predictions, the same bodies, both servers' gRPC ports (h2load).
        Scenario("gRPC echo, concurrency 32: Predictions", "echo", echo_body, 32, 1, 0, grpc=True),
        Scenario("gRPC digits, c32, batch_size 8: Predictions", "digits", DIGIT, 32, 8, 10, grpc=True),
    ]  # fmt: skip
    scenarios = [s for s in scenarios if not args.only or any(text in s.label for text in args.only)]
    scenarios = [s for s in scenarios if not any(text in s.label for text in args.skip or [])]
    build_archives(store, {s.model for s in scenarios})
    litserve = not args.skip_litserve and not args.baseline and litserve_installed()
    if not args.skip_litserve and not args.baseline and not litserve:
        print("LitServe is not installed (scripts/litserve-venv makes .venv-litserve): its rows are left out")
    # Each server once, made on first use; a scenario's servers in the order they take turns.
    pool: dict[str, Server] = {}

    def make(key: str, factory: Callable[..., Server], *extra: object) -> Server:
        if key not in pool:
            pool[key] = factory(work, store, *extra)
        return pool[key]

    def contenders(scenario: Scenario) -> list[Server]:
        chosen = [make("marserve", Marserve), *(make(v, MarserveVariant, v) for v in scenario.variants)]
        if scenario.marserve_only:
            return chosen
        one_thread = scenario.workers > 1
        if args.baseline:
            chosen.append(make("baseline", Baseline, args.baseline))
        elif not args.skip_torchserve:
            chosen.append(make(f"torchserve {one_thread}", TorchServe, one_thread))
        if litserve and scenario.litserve and not scenario.grpc:
            chosen.append(make(f"litserve {one_thread}", LitServe, one_thread))
        return chosen

    plan = {scenario.label: contenders(scenario) for scenario in scenarios}
    servers = list(pool.values())
    for server in servers:
        if isinstance(server, MarserveVariant):
            server.build_archives({s.model for s in scenarios if server in plan[s.label]})
    results: dict[str, dict[str, list[Result]]] = {}
    rss: dict[str, float] = {}
    # The handler's own loop runs just before and just after each scenario's rounds (the servers
    # idle meanwhile); served figures are compared with the mean of its two.
    loops: dict[str, list[LoopResult]] = {}
    try:
        for server in servers:
            server.start()
        for scenario in scenarios:
            measured = plan[scenario.label]
            for server in measured:
                server.register(scenario)
                if scenario.model == "echo" and not isinstance(server, LitServe):
                    rss[server.name] = rss_mib(server.frontend_pid())
            if scenario.loop:
                loops[scenario.label] = [run_loop(store, scenario, args.duration)]
            by_server = results.setdefault(scenario.label, {})
            framed = grpc_body(work, scenario.model, scenario.body) if scenario.grpc else None
            for server in measured if framed is not None else []:
                check_grpc(server, scenario)
            for round_number in range(args.rounds):
                for server in measured if round_number % 2 == 0 else measured[::-1]:
                    if framed is not None:
                        result = run_h2load(server, scenario, args.duration, framed)
                    else:
                        result = run_wrk(server, scenario, args.duration)
                    by_server.setdefault(server.name, []).append(result)
            if scenario.loop:
                loops[scenario.label].append(run_loop(store, scenario, args.duration))
            for server in measured:
                server.unregister(scenario.model)
    finally:
        for server in servers:
            server.stop()
    medians = {label: {name: median_round(rounds) for name, rounds in by_server.items()} for label, by_server in results.items()}
    print(
        f"\n{os.cpu_count()} cores, {args.rounds} rounds of {args.duration} s per scenario and server, "
        "wrk -t1 (gRPC rows: h2load -t1), one worker per model unless the scenario says otherwise\n"
    )
    print(
        "| scenario | server | req/s (median round) | req/s of each round | p50 ms | p90 ms | p99 ms | errors "
        "| server CPU ms/req | load generator CPU ms/req | other load |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, by_server in results.items():
        for name, rounds in by_server.items():
            r = medians[label][name]
            each = ", ".join(_rate(x.rps) for x in rounds)
            busy = max(x.other_load for x in rounds)
            p90 = "" if r.mean_latency else f"{r.p90:.2f}"
            p50 = f"{r.p50:.2f} (mean)" if r.mean_latency else f"{r.p50:.2f}"
            p99 = f"{r.p99:.2f} (max)" if r.mean_latency else f"{r.p99:.2f}"
            print(
                f"| {label} | {name} | {_rate(r.rps)} | {each} | {p50} | {p90} | {p99} "
                f"| {sum(x.errors for x in rounds)} | {r.cpu_ms_per_request:.3f} | {r.loadgen_cpu_ms_per_request:.3f} | {busy:.0f}% |"
            )
        if label in loops:
            runs = loops[label]
            rate = statistics.mean(lp.images_per_s for lp in runs)
            batch = statistics.mean(lp.batch_ms_p50 for lp in runs)
            cpu = statistics.mean(lp.cpu_ms_per_image for lp in runs)
            other = max(lp.other_load for lp in runs)
            each = " / ".join(f"{lp.images_per_s:.1f}" for lp in runs)
            print(
                f"| {label} | handler loop (no server) | {rate:.1f} | {each} | {batch:.2f} (batch) | | | "
                f"| {cpu:.3f} | | {other:.0f}% |"
            )
    steady = [s.label for s in scenarios if s.steady and s.label in results]
    if steady:
        print(
            f"\nreq/s of {', '.join(steady)}: the steady rate over whole batches (post_file_steady.lua); "
            + "wrk's own: " + ", ".join(f"{n} {r.wrk_rps:.1f}" for s in steady for n, r in medians[s].items())
        )
    if loops:
        print(
            f"\n| scenario | server | served req/s | handler loop img/s (before / after) | served / loop "
            f"| target {LOOP_TARGET:.0%} |"
        )
        print("|---|---|---:|---:|---:|---|")
        for label, runs in loops.items():
            loop = statistics.mean(lp.images_per_s for lp in runs)
            each = " / ".join(f"{lp.images_per_s:.1f}" for lp in runs)
            for name, served in medians[label].items():
                ratio = served.rps / loop
                verdict = "met" if ratio >= LOOP_TARGET else "NOT met"
                busy = max(*(x.other_load for x in results[label][name]), *(lp.other_load for lp in runs))
                if busy > NOISY_LOAD:
                    verdict += f" (other load {busy:.0f}%: not comparable, rerun)"
                print(f"| {label} | {name} | {served.rps:.1f} | {loop:.1f} ({each}) | {ratio:.2f} | {verdict} |")
        print("\n| handler loop | torch threads | batch ms p50 | preprocess ms | inference ms | postprocess ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, runs in loops.items():
            cells = []
            for step in ("preprocess", "inference", "postprocess"):
                times = [lp.steps_ms_p50[step] for lp in runs if step in lp.steps_ms_p50]
                cells.append(f"{statistics.median(times):.2f}" if times else "")
            batch = statistics.median(lp.batch_ms_p50 for lp in runs)
            print(f"| {label} | {runs[0].torch_threads} | {batch:.2f} | {' | '.join(cells)} |")
    # Each pair of a scenario's servers whose first is a marserve, in the order they took turns.
    pairs = [
        (label, a, b)
        for label, by_server in results.items()
        for i, a in enumerate(by_server)
        if a.startswith("marserve")
        for b in list(by_server)[i + 1 :]
    ]
    if pairs:
        print("\n| scenario | A / B | throughput ratio A / B (median of rounds) | each round | p50 ratio (B / A) |")
        print("|---|---|---:|---|---:|")
        for label, a, b in pairs:
            ours, theirs = results[label][a], results[label][b]
            ratios = [x.rps / y.rps for x, y in zip(ours, theirs)]
            p50s = [y.p50 / x.p50 for x, y in zip(ours, theirs)]
            each = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"| {label} | {a} / {b} | {statistics.median(ratios):.2f}x | {each} | {statistics.median(p50s):.2f}x |")
    if V2_BASE in medians and V2_BINARY in medians:
        base, binary = medians[V2_BASE]["marserve"], medians[V2_BINARY]["marserve"]
        ratio = binary.rps / base.rps
        verdict = "met" if ratio >= V2_TARGET else "NOT met"
        failed = sum(x.errors for label in (V2_BASE, V2_BINARY) for x in results[label]["marserve"])
        if failed:
            verdict += f" ({failed} errors: not comparable)"
        print(f"\n| marserve | /predictions PNG req/s | binary /v2 infer req/s | ratio | target {V2_TARGET:.0%} |")
        print("|---|---:|---:|---:|---|")
        print(f"| digits, c32, batch_size 8 | {_rate(base.rps)} | {_rate(binary.rps)} | {ratio:.2f} | {verdict} |")
    print("\n| server | start-up (s, until all ports listen) | frontend RSS with one model (MiB) |")
    print("|---|---:|---:|")
    for server in servers:
        held = rss.get(server.name)
        if isinstance(server, LitServe):
            started = f"{server.startup_seconds:.2f} (the model loaded)" if server.startup_seconds else "n/a"
            print(f"| {server.name} | {started} | n/a (one process tree a model) |")
            continue
        print(f"| {server.name} | {server.startup_seconds:.2f} | {f'{held:.0f}' if held else 'n/a (no echo scenario)'} |")
    print(
        "\nother load: CPU used meanwhile by anything outside the measurement, in % of all cores, the "
        "hypervisor's steal time included (on a shared VM, most of it); a row measured while it is high "
        "is not comparable."
    )


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
