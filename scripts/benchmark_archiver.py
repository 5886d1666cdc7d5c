"""Archive a large random weights file with both archivers and report time and peak RSS."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TOOLS = {"marserve model-archiver": BIN / "model-archiver", "torch-model-archiver 0.12": BIN / "torch-model-archiver"}


def run_measured(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}: {proc.stderr.read().decode().strip()}")  # type: ignore[union-attr]
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-archiver-", dir=args.dir))
    try:
        weights = work / "weights.pt"
        # Written by a child: a forked child's peak RSS starts from its parent's, so the
        # parent must never hold big buffers itself.
        subprocess.run(["head", "-c", str(args.size_mb << 20), "/dev/urandom"], stdout=weights.open("wb"), check=True)
        handler = work / "handler.py"
        handler.write_text("def handle(data, context):\n    return data\n")
        print(f"input: {weights.stat().st_size / 2**30:.2f} GiB of random bytes, {os.cpu_count()} cores\n")
        print("| archiver | format | seconds | peak RSS (MiB) | output (MiB) |")
        print("|---|---|---:|---:|---:|")
        for archive_format in ("default", "zip-store"):
            for label, exe in TOOLS.items():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                seconds, rss = run_measured([
                    str(exe), "--model-name", "big", "--version", "1.0", "--handler", str(handler),
                    "--serialized-file", str(weights), "--export-path", str(out),
                    "--archive-format", archive_format,
                ])  # fmt: skip
                size = (out / "big.mar").stat().st_size / 2**20
                print(f"| {label} | {archive_format} | {seconds:.1f} | {rss:.0f} | {size:.0f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
