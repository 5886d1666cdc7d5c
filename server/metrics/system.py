"""System metrics, read from /proc when /metrics is scraped: always current, no polling task.

TorchServe's names (``CPUUtilization``, ``MemoryUsed``, ``DiskAvailable``, ``GPUUtilization`` ...)
with its units and its ``Level="Host"`` label, plus ``marserve_worker_memory_bytes`` per worker.
GPU figures come from NVML when ``nvidia-ml-py`` is installed and a GPU is present.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .text import Family

WorkerPids = Callable[[], Iterable[tuple[str, str, str, int]]]  # (model, version, worker id, pid)


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class SystemMetrics(Collector):
    def __init__(self, hostname: str, workers: WorkerPids, disk_path: str = "/") -> None:
        self.hostname = hostname
        self.workers = workers
        self.disk_path = disk_path
        self._last_cpu = _cpu_times()

    def _gauge(self, name: str, unit: str, value: float) -> Family:
        family = Family(name, "gauge", unit)
        family.add((("Level", "Host"), ("Hostname", self.hostname)), value)
        return family

    def families(self) -> Iterator[Family]:
        """TorchServe's system metrics, read now."""
        now = _cpu_times()
        if now is not None and self._last_cpu is not None and now[0] > self._last_cpu[0]:
            total, idle = now[0] - self._last_cpu[0], now[1] - self._last_cpu[1]
            yield self._gauge("CPUUtilization", "Percent", round(100.0 * (total - idle) / total, 1))
        self._last_cpu = now
        memory = _meminfo()
        if "MemTotal" in memory:
            available = memory.get("MemAvailable", memory.get("MemFree", 0))
            used = memory["MemTotal"] - available
            yield self._gauge("MemoryUsed", "Megabytes", used / 2**20)
            yield self._gauge("MemoryAvailable", "Megabytes", available / 2**20)
            yield self._gauge("MemoryUtilization", "Percent", round(100.0 * used / memory["MemTotal"], 1))
        disk = shutil.disk_usage(self.disk_path)
        yield self._gauge("DiskUsage", "Gigabytes", disk.used / 2**30)
        yield self._gauge("DiskAvailable", "Gigabytes", disk.free / 2**30)
        yield self._gauge("DiskUtilization", "Percent", round(100.0 * disk.used / disk.total, 1))
        # Listed with no samples on a host without GPUs, as TorchServe lists them.
        gpu = {name: Family(name, "gauge", unit) for name, unit in _GPU_FAMILIES}
        for device, utilization, memory_used, used_share in self._gpus():
            labels = (("Level", "Host"), ("DeviceId", device), ("Hostname", self.hostname))
            gpu["GPUUtilization"].add(labels, utilization)
            gpu["GPUMemoryUsed"].add(labels, memory_used)
            gpu["GPUMemoryUtilization"].add(labels, used_share)
        yield from gpu.values()

    def collect(self) -> Iterator[Metric]:
        """marserve's own: each worker's resident memory."""
        rss = GaugeMetricFamily(
            "marserve_worker_memory_bytes", "Resident memory of each worker process.",
            labels=["model_name", "model_version", "worker_id"],
        )  # fmt: skip
        for name, version, worker_id, pid in self.workers():
            rss.add_metric([name, version, worker_id], rss_bytes(pid))
        yield rss

    def _gpus(self) -> Iterator[tuple[str, float, float, float]]:
        """(device id, utilization %, memory used MiB, memory used %) of each GPU NVML sees."""
        try:
            import pynvml  # nvidia-ml-py, optional
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                usage = pynvml.nvmlDeviceGetUtilizationRates(handle)
                yield str(index), float(usage.gpu), memory.used / 2**20, 100.0 * memory.used / memory.total
        except pynvml.NVMLError:
            return
        finally:
            pynvml.nvmlShutdown()


_GPU_FAMILIES = (("GPUUtilization", "Percent"), ("GPUMemoryUtilization", "Percent"), ("GPUMemoryUsed", "Megabytes"))
