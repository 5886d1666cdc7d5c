"""Scale-out on one machine: N marserve servers behind haproxy (loopback only), as replicas behind
a Kubernetes Service, measured.

    .venv/bin/python scripts/bench/scale_out.py [--servers 1 2 3] [--duration 10] [--plot docs/scale_out.png]

Each server is a real ``serve --start --foreground`` process with the digits example model (one
worker, batch size 8) on free ports; haproxy balances by least connections and health-checks each
server's ``/v2/health/ready``, as a readiness probe would. wrk (Debian's package) drives
``/predictions/digits`` with a PNG through haproxy at concurrency 32 for each N, and the plot shows
requests per second against N. tests/deploy/test_scale_out.py uses the same pieces to check that
every request is answered through a rolling restart.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ports import free_port  # scripts/bench/ports.py

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent



def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


class Backend:
    """One marserve server (a replica): its own directory, TMPDIR, free ports and log."""

    def __init__(self, root: Path, store: Path, models: str, config: str = "") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        self.store = store
        self.models = models
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "config.properties"
        self.config.write_text(
            f"inference_address={self.url}\nmanagement_address=http://127.0.0.1:{free_port()}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\nenable_grpc=false\nlog_location={root / 'logs'}\n{config}"
        )
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        """Start, and return once the server is ready (its models loaded)."""
        command = [
            str(BIN / "serve"), "--start", "--foreground", "--ncs", "--model-store", str(self.store),
            "--ts-config", str(self.config), "--models", self.models,
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(self.root / "tmp")}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        _wait(self.ready, timeout, f"{self.url} to be ready")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> int:
        """SIGTERM, as Kubernetes stops a pod: the server drains and exits; its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Balancer:
    """haproxy on a loopback port in front of ``backends``, checking each one's readiness."""

    def __init__(self, root: Path, backends: list[Backend]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"    server s{i} 127.0.0.1:{b.port} check" for i, b in enumerate(backends))
        self.config = root / "haproxy.cfg"
        # A refused connection (a server that stopped accepting) or a connection closed without an
        # answer (an idle keep-alive one the server closed as it stopped) is retried on another
        # server: the drain's other half, as a Service's endpoints and the client's retries are.
        self.config.write_text(
            f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend serve
    bind 127.0.0.1:{self.port}
    default_backend marserve
backend marserve
    balance leastconn
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 300ms fall 1 rise 2
{servers}
"""
        )
        self.log = root / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([haproxy, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)

        def answers() -> bool:
            try:
                return httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(answers, 30, "haproxy to answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists()


def build_digits(store: Path) -> str:
    """The digits example archived into ``store``; the ``--models`` entry that loads it."""
    from archiver import ArchiveSpec, build_archive

    digits = ROOT / "examples" / "digits"
    build_archive(
        ArchiveSpec(
            model_name="digits", version="1.0", handler=str(digits / "digits_handler.py"),
            model_file=str(digits / "model.py"), serialized_file=str(digits / "digits.pt"),
            extra_files=str(digits / "index_to_name.json"), export_path=str(store), force=True,
            config_file=str(_digits_yaml(store)),
        )  # fmt: skip
    )
    return "digits=digits.mar"


def _digits_yaml(store: Path) -> Path:
    path = store.parent / "digits.yaml"
    path.write_text("batchSize: 8\nmaxBatchDelay: 5\nminWorkers: 1\nmaxWorkers: 1\n")
    return path


def measure(url: str, body: Path, seconds: int, concurrency: int) -> float:
    """Requests per second that wrk gets through ``url`` (non-2xx answers fail the run)."""
    script = ROOT / "scripts" / "bench" / "post_file.lua"
    env = {**os.environ, "BODY_FILE": str(body)}
    command = ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "--timeout=30s", "-s", str(script), url]
    subprocess.run([*command[:3], "-d2s", *command[4:]], env=env, capture_output=True, check=True)  # warm-up
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match is not None, out
    return float(match.group(1))


def benchmark(counts: list[int], seconds: int, concurrency: int) -> dict[int, float]:
    results: dict[int, float] = {}
    body = ROOT / "examples" / "digits" / "samples" / "digit_3.png"
    with tempfile.TemporaryDirectory(prefix="marserve-scale-") as scratch:
        root = Path(scratch)
        store = root / "model-store"
        store.mkdir()
        models = build_digits(store)
        for n in counts:
            backends = [Backend(root / f"n{n}-s{i}", store, models) for i in range(n)]
            balancer = Balancer(root, backends)
            try:
                for backend in backends:
                    backend.start()
                balancer.start()
                _wait(lambda b=balancer, count=n: _all_up(b, count), 30, "haproxy to see every server up")
                results[n] = measure(f"{balancer.url}/predictions/digits", body, seconds, concurrency)
                print(f"{n} server(s): {results[n]:.0f} requests/s", flush=True)
            finally:
                balancer.stop()
                for backend in backends:
                    backend.stop()
    return results


def _all_up(balancer: Balancer, count: int) -> bool:
    # Every server has answered a request through haproxy (least connections spreads them).
    seen = set()
    for _ in range(4 * count):
        response = httpx.get(f"{balancer.url}/v2/health/ready", timeout=2)
        seen.add(response.headers.get("x-request-id", "")[:8])  # a random prefix per server run
    return len(seen) >= count


def plot(results: dict[int, float], path: Path, cores: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(results)
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=100)
    axes.plot(counts, [results[n] for n in counts], marker="o", label="marserve behind haproxy")
    axes.plot(counts, [results[counts[0]] * n / counts[0] for n in counts], linestyle="--", color="grey", label="linear")
    axes.axvline(cores, color="red", linestyle=":", label=f"{cores} cores")
    axes.set_xticks(counts)
    axes.set_xlabel("servers (one worker each)")
    axes.set_ylabel("requests/s")
    axes.set_title("digits, /predictions PNG, wrk c32, one machine")
    axes.set_ylim(bottom=0)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if not haproxy_available() or shutil.which("wrk") is None:
        sys.exit("scale_out: needs haproxy and wrk (apt-get install -y haproxy wrk)")
    sys.path.insert(0, str(ROOT))
    results = benchmark(args.servers, args.duration, args.concurrency)
    cores = len(os.sched_getaffinity(0))
    if args.plot is not None:
        plot(results, args.plot, cores)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
