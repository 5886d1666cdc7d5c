"""What the APIs and metrics may read of the registered models: frozen copies, never live state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .settings import ModelSettings


class WorkerState(StrEnum):
    # str values: code that still compares a slot's status with "READY" keeps working.
    STARTING = "STARTING"
    READY = "READY"
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"
    STOPPING = "STOPPING"  # asked to stop: finishing its batch in hand, or being stopped
    STOPPED = "STOPPED"


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    id: str
    state: WorkerState
    pid: int | None  # None until its process exists
    started_at: float  # epoch seconds of the current process's start (0.0 if none)
    gpu_id: int | None
    restarts: int = 0  # processes that died in this slot and were replaced
    last_exit: str = ""  # how the last one that died ended (exit code or signal, its last output)
    loaded_at: float = 0.0  # epoch seconds the current process's model was loaded (0.0: not yet)
    in_flight: int = 0  # batches sent and not answered: the one it runs, and the one that waits


@dataclass(frozen=True, slots=True)
class AutoscaleStatus:
    """A model version's last autoscaling decision (server/workers/autoscaler.py), and how many
    workers autoscaling has added and removed."""

    action: str | None = None  # "up", "down" or "held"; None: no decision yet
    reason: str = ""  # "queue_time", "queue_length", "idle" or "server_cap"
    detail: str = ""
    at: float = 0.0  # epoch seconds of the decision
    scale_ups: int = 0
    scale_downs: int = 0


@dataclass(frozen=True, slots=True)
class VersionStatus:
    name: str
    version: str
    url: str
    runtime: str  # the manifest's runtime
    handler: str
    settings: ModelSettings
    loaded_at_startup: bool
    is_default: bool
    queue_length: int
    queue_capacity: int
    workers: tuple[WorkerStatus, ...]
    autoscaling: AutoscaleStatus = AutoscaleStatus()
