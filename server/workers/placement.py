"""Where workers run: the GPUs counted without importing torch (the frontend must stay light),
which GPU and id each new worker gets, and how many threads it may use."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def detect_gpu_count(environ: Mapping[str, str]) -> int:
    """Visible NVIDIA GPUs: CUDA_VISIBLE_DEVICES if set, else the driver's /proc entries, else nvidia-smi."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [item.strip() for item in visible.split(",") if item.strip()]
        # CUDA stops enumerating at the first invalid id, "-1" being the usual way to hide all.
        count = 0
        for item in ids:
            if item.startswith("-"):
                break
            count += 1
        return count
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for entry in proc.iterdir() if entry.is_dir())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class Placement:
    """Hands out worker ids and GPUs across all of one server's models."""

    def __init__(self, gpu_count: int) -> None:
        self.gpu_count = gpu_count
        self._worker_ids = itertools.count(9000)
        # One round-robin over all GPUs for every model, and one per model over its deviceIds.
        self._any_gpu = itertools.count()
        self._device_ids: dict[str, itertools.count[int]] = {}

    def place(self, model: str, device_type: str, device_ids: Sequence[int] | None) -> tuple[str, int | None]:
        """A new worker's id, and its GPU (None: the CPU); ``model`` keys the deviceIds round-robin."""
        worker_id = str(next(self._worker_ids))
        if device_type != "gpu" or not self.gpu_count:
            return worker_id, None
        # deviceIds that name a GPU this host lacks are dropped whole, rather than half-used.
        if device_ids and all(0 <= i < self.gpu_count for i in device_ids):
            counter = self._device_ids.setdefault(model, itertools.count())
            return worker_id, device_ids[next(counter) % len(device_ids)]
        return worker_id, next(self._any_gpu) % self.gpu_count


def worker_threads(cpu_count: int, max_workers: int, workers: int) -> int:
    """The threads one worker gets so that a model's workers share the cores rather than each take all."""
    return max(1, cpu_count // max(1, max_workers, workers))
