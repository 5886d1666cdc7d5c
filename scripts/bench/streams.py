"""Streamed answers under load: time to first byte and pieces per second.

Starts ``serve`` on a scratch directory with the streaming test handler (tests/assets/
stream_handler.py: a generator, no model), then in alternating rounds: ``--streams`` concurrent
clients each read streams of ``--pieces`` pieces, one after another, for ``--seconds``; and the
same number of clients send plain requests to the same handler. The model's batch size is the
number of clients, so every stream of a round is in one batch, as a generative model's would be. Reports the median time to first
byte against a plain request's latency, and pieces per second. Clients are raw asyncio sockets,
so that the load generator costs little beside the server.

    .venv/bin/python scripts/bench/streams.py [--streams 32] [--pieces 100] [--seconds 10] [--rounds 3]
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
from pathlib import Path

from ports import free_port  # scripts/bench/ports.py

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"



async def one(port: int, body: bytes) -> tuple[float, float, int]:
    """(time to first byte, time to the end, body bytes) of one request on a new connection."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /predictions/words HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    first = 0.0
    data = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        if not first:
            first = time.perf_counter() - started
        data += chunk
        if data.endswith(b"0\r\n\r\n") or (b"content-length:" in data and _complete(data)):
            break
    writer.close()
    return first, time.perf_counter() - started, len(data)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


async def load(port: int, clients: int, seconds: float, body: bytes) -> list[tuple[float, float, int]]:
    results: list[tuple[float, float, int]] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            results.append(await one(port, body))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--pieces", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="marserve-streams-"))
    store = work / "store"
    store.mkdir()
    subprocess.run(
        [str(BIN / "model-archiver"), "--model-name", "words", "--version", "1.0", "--handler",
         str(ROOT / "tests" / "assets" / "stream_handler.py"), "--export-path", str(store)],
        check=True,
    )  # fmt: skip
    ports = [free_port() for _ in range(3)]
    config = work / "config.properties"
    config.write_text(
        "".join(f"{api}_address=http://127.0.0.1:{port}\n" for api, port in zip(("inference", "management", "metrics"), ports))
        + f"log_location={work / 'logs'}\nlog_level=WARNING\n"
    )
    env = {**os.environ, "TMPDIR": str(work)}
    command = [str(BIN / "serve"), "--model-store", str(store), "--ts-config", str(config)]
    subprocess.run([*command, "--start", "--ncs"], check=True, env=env, cwd=work, stdout=subprocess.DEVNULL)
    try:
        import urllib.request

        # One batch holds every client's stream: a stream's first piece then waits for no other stream.
        register = (
            f"http://127.0.0.1:{ports[1]}/models?url=words.mar&batch_size={args.streams}&max_batch_delay=5&initial_workers=1"
        )
        urllib.request.urlopen(urllib.request.Request(register, method="POST"), timeout=120).read()
        streamed_body = b"words %d" % args.pieces
        rows = []
        for round_number in range(args.rounds):
            order = ["stream", "plain"] if round_number % 2 == 0 else ["plain", "stream"]
            measured = {}
            for kind in order:
                body = streamed_body if kind == "stream" else b"plain"
                results = asyncio.run(load(ports[0], args.streams, args.seconds, body))
                measured[kind] = results
            streams, plains = measured["stream"], measured["plain"]
            rows.append(
                (
                    statistics.median(r[0] for r in streams) * 1000,
                    statistics.median(r[1] for r in plains) * 1000,
                    len(streams) * args.pieces / args.seconds,
                    statistics.median(r[1] for r in streams) * 1000,
                )
            )
    finally:
        subprocess.run([*command, "--stop"], env=env, cwd=work, stdout=subprocess.DEVNULL)
    print(
        f"\n{os.cpu_count()} cores, {args.streams} concurrent clients, streams of {args.pieces} pieces, "
        f"{args.rounds} rounds of {args.seconds:g} s each kind, alternating\n"
    )
    print("| round | stream: time to first byte, median ms | plain request latency, median ms | pieces/s | whole stream, median ms |")
    print("|---:|---:|---:|---:|---:|")
    for i, (ttfb, plain, pieces, whole) in enumerate(rows, 1):
        print(f"| {i} | {ttfb:.2f} | {plain:.2f} | {pieces:.0f} | {whole:.1f} |")
    ttfb = statistics.median(r[0] for r in rows)
    plain = statistics.median(r[1] for r in rows)
    print(f"\nmedian of rounds: time to first byte {ttfb:.2f} ms, plain latency {plain:.2f} ms, difference {ttfb - plain:+.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
