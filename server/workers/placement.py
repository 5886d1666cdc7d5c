"""Where workers run: the GPUs counted without importing torch (the frontend must stay light),
which GPU and id each new worker gets, how many threads it may use, how many workers the machine
takes (the default worker caps) and how many may start at once."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .templates import WorkerTemplates

#: What one worker is taken to need when the default caps are derived from memory: a torch worker's
#: resident set is about 150-300 MB before its model's weights.
WORKER_MEMORY = 256 << 20
#: Workers per CPU core, and per GPU, in the default caps.
WORKERS_PER_CPU = 4
WORKERS_PER_GPU = 4


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


def machine_cpus() -> int:
    """The CPUs this process may use: its affinity, lowered by a cgroup v2 CPU quota if there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, lowered by a cgroup limit (v2 or v1);
    None if it cannot be judged."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                limits.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))  # v1 says "no limit" with a huge number, which min() ignores
    return min(limits) if limits else None


def default_max_workers(cpus: int, gpus: int, memory: int | None, ceiling: int) -> int:
    """The default cap on the server's workers: a few per CPU and per GPU, no more than fit in
    memory at ``WORKER_MEMORY`` each, at least 1 and at most ``ceiling``."""
    workers = WORKERS_PER_CPU * cpus + WORKERS_PER_GPU * gpus
    if memory is not None:
        workers = min(workers, memory // WORKER_MEMORY)
    return max(1, min(workers, ceiling))


def start_limit(cpus: int) -> int:
    """How many workers may start (spawn and load their model) at once, server-wide: imports and
    model loads are CPU-heavy, and a storm of them would starve the frontend."""
    return max(2, min(8, cpus // 2))


class Placement:
    """Hands out worker ids and GPUs across all of one server's models, and the turns to start."""

    def __init__(
        self, gpu_count: int, max_starting: int | None = None, cpus: int | None = None, templates: WorkerTemplates | None = None
    ) -> None:
        self.gpu_count = gpu_count
        #: Where workers are forked from (None: each is spawned as a fresh interpreter).
        self.templates = templates
        #: The CPUs workers share (default: ``machine_cpus``), which ``worker_threads`` divides.
        self.cpus = cpus or machine_cpus()
        #: Held by a worker while it starts; ``max_starting`` (default: ``start_limit``) at once.
        self.starting = asyncio.Semaphore(max_starting or start_limit(self.cpus))
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


def process_environment(env: Mapping[str, str], threads: int) -> dict[str, str]:
    """A worker process's environment: ``env`` with its thread counts and what workers need."""
    env = dict(env)
    # Set before torch is imported, so N workers share the cores instead of each taking all.
    # A user's own counts stand (as in TorchServe, whose workers inherit them): small models
    # often serve faster on one thread, since waking a second one costs more than it saves.
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env["PYTHONUNBUFFERED"] = "1"
    # OpenMP's threads otherwise spin for a while after every parallel region: between batches
    # that burns a core the frontend and the other workers need (for a small model, half the
    # worker's CPU). Asleep, they cost a wake-up per region instead. A user's setting stands.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def worker_threads(cpu_count: int, max_workers: int, workers: int) -> int:
    """The threads one worker gets so that a model's workers share the cores rather than each take all.

    Computed for each worker as it starts, from the model's ``max_workers`` (or the workers it has,
    if more): an autoscaled model's workers are sized for its peak, so that at ``max_workers`` they
    do not oversubscribe the cores; a scale call that changes ``max_workers`` changes it for the
    workers that start after it."""
    return max(1, cpu_count // max(1, max_workers, workers))
