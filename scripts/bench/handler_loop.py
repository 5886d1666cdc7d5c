"""The handler's own loop, with no server: ``handle(data, context)`` on the same batch, back to back.

Run by benchmark_server.py in a subprocess, so that it gets what a served worker gets: one
process, the same torch thread count (OMP_NUM_THREADS, set by the caller before torch is
imported), and the handler loaded the way server/workers/child/main.py loads it. Prints one JSON line.

    python scripts/bench/handler_loop.py --archive store/m.mar --body photo.jpg --batch-size 8 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def machine_busy_seconds() -> float:
    """CPU time all processes have used, on all cores (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up batches")
    args = parser.parse_args()
    body = Path(args.body).read_bytes()

    import handlers
    from archiver import open_archive
    from handlers.context import Context, RequestHeaders, RequestProcessor
    from server.workers.child.loader import load_handler

    archive = open_archive(Path(args.archive).resolve())
    try:
        manifest = archive.manifest.model_dump(by_alias=True, exclude_none=True)
        model_dir = str(archive.model_dir)
        # As server/workers/child/main.py _load: cwd, the ts shim and the model dir on sys.path.
        os.chdir(model_dir)
        sys.path.insert(0, handlers.COMPAT_PATH)
        sys.path.insert(0, model_dir)
        initialize, entry = load_handler(archive.manifest.model.handler)
        context = Context(
            model_name=archive.manifest.model.model_name,
            model_dir=model_dir,
            manifest=manifest,
            batch_size=args.batch_size,
            gpu=None,
            mms_version="0.12.0",
            limit_max_image_pixels=True,
            model_yaml_config={},
        )
        initialize(context)
        import torch

        size = args.batch_size
        # What the worker hands the handler for a raw octet-stream body, and the context it sets up.
        data = [{"body": bytearray(body)} for _ in range(size)]
        context.request_ids = {i: f"loop-{i}" for i in range(size)}
        context.request_processor = [
            RequestProcessor(RequestHeaders({"body": {"content-type": "application/octet-stream"}}))
            for _ in range(size)
        ]

        def one_batch() -> float:
            started = time.perf_counter()
            outputs = entry(data, context)
            elapsed = time.perf_counter() - started
            if not isinstance(outputs, list) or len(outputs) != size:
                raise SystemExit(f"handler returned {outputs!r:.200}")
            return elapsed

        deadline = time.perf_counter() + args.warmup
        while time.perf_counter() < deadline:
            one_batch()
        times: list[float] = []
        busy_before = machine_busy_seconds()
        cpu_before = os.times()
        started = time.perf_counter()
        deadline = started + args.seconds
        while time.perf_counter() < deadline:
            times.append(one_batch())
        wall = time.perf_counter() - started
        cpu_after = os.times()
        cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        other = machine_busy_seconds() - busy_before - cpu

        # A short breakdown by step, where the entry point is a BaseHandler-style object.
        steps: dict[str, float] = {}
        handler = getattr(entry, "__self__", None)
        if handler is not None and all(hasattr(handler, s) for s in ("preprocess", "inference", "postprocess")):
            samples: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": []}
            for _ in range(min(10, len(times))):
                t0 = time.perf_counter()
                x = handler.preprocess(data)
                t1 = time.perf_counter()
                y = handler.inference(x)
                t2 = time.perf_counter()
                handler.postprocess(y)
                t3 = time.perf_counter()
                samples["preprocess"].append(t1 - t0)
                samples["inference"].append(t2 - t1)
                samples["postprocess"].append(t3 - t2)
            steps = {k: statistics.median(v) * 1000 for k, v in samples.items() if v}
        print(
            json.dumps(
                {
                    "images_per_s": len(times) * size / wall,
                    "batches": len(times),
                    "batch_ms_p50": statistics.median(times) * 1000,
                    "torch_threads": torch.get_num_threads(),
                    "cpu_ms_per_image": cpu * 1000 / max(1, len(times) * size),
                    "steps_ms_p50": steps,
                    "other_load": max(0.0, other) * 100 / (wall * (os.cpu_count() or 1)),
                }
            )
        )
    finally:
        archive.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
