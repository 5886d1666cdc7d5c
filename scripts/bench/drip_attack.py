"""A slow-drip attack on a running marserve, and what well-behaved clients see meanwhile.

Starts ``serve`` (background, default settings but for its ports) on a scratch directory, measures
``/ping`` latency and the frontend's RSS, then opens ``--connections`` connections to the inference
port that each send one byte of a request head every ``--interval`` seconds, for ``--seconds``;
measures again during the attack and after it ends. Prints one table.

    .venv/bin/python scripts/bench/drip_attack.py [--connections 15000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ports import free_port  # scripts/bench/ports.py

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / ".venv" / "bin" / "serve"



def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ping_latencies(port: int, count: int) -> tuple[list[float], int]:
    """Latencies of ``count`` pings, each on a new connection (ms), and how many failed."""
    latencies, failures = [], 0
    for _ in range(count):
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while b"Healthy" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            ok = answer.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        if ok:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            failures += 1
        time.sleep(0.01)
    return latencies, failures


def summary(label: str, pid: int, port: int) -> str:
    latencies, failures = ping_latencies(port, 100)
    p50 = statistics.median(latencies) if latencies else float("nan")
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    return f"| {label} | {p50:.2f} | {p99:.2f} | {failures} | {rss_mib(pid):.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=15000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="marserve-drip-"))
    (work / "store").mkdir()
    ports = [free_port() for _ in range(3)]
    config = work / "config.properties"
    config.write_text(
        "".join(f"{api}_address=http://127.0.0.1:{port}\n" for api, port in zip(("inference", "management", "metrics"), ports))
        + f"log_location={work / 'logs'}\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(work)}
    command = [str(SERVE), "--model-store", str(work / "store"), "--ts-config", str(config)]
    subprocess.run([*command, "--start"], check=True, env=env, cwd=work, stdout=subprocess.DEVNULL)
    pid = int((work / ".marserve.pid").read_text())
    rows = ["| when | /ping p50 ms | /ping p99 ms | failed pings of 100 | frontend RSS MiB |", "|---|---:|---:|---:|---:|"]
    try:
        rows.append(summary("before", pid, ports[0]))
        stop = threading.Event()
        drips: list[socket.socket] = []

        def attack() -> None:
            while not stop.is_set():
                for sock in list(drips):
                    try:
                        sock.send(b"G")
                    except OSError:
                        drips.remove(sock)
                        sock.close()
                # Replace what the server closed, so that the pressure stays.
                while len(drips) < args.connections and not stop.is_set():
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.connect_ex(("127.0.0.1", ports[0]))
                    drips.append(sock)
                stop.wait(args.interval)

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        time.sleep(min(10.0, args.seconds / 2))
        rows.append(summary(f"during ({args.connections} drip connections)", pid, ports[0]))
        time.sleep(max(0.0, args.seconds - 10.0))
        rows.append(summary("at the end of the attack", pid, ports[0]))
        stop.set()
        attacker.join()
        for sock in drips:
            sock.close()
        time.sleep(15)
        rows.append(summary("15 s after", pid, ports[0]))
    finally:
        subprocess.run([*command, "--stop"], env=env, cwd=work, stdout=subprocess.DEVNULL)
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
