"""A registered model version: its archive, its settings, its job queue and its workers' supervisor."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from archiver import ModelArchive

from ..errors import ServerError, ServiceUnavailable
from ..workers.messages import Load, Result
from ..workers.placement import Placement
from ..workers.supervisor import Supervisor, WorkerSlot, no_worker_message
from .batching import Job, JobQueue, QueueFull
from .settings import ModelSettings
from .status import VersionStatus, WorkerState


def _ignore(*_: object) -> None:
    pass


@dataclass
class Observer:
    """Hooks the metrics module sets; the default does nothing."""

    # (model, batch size, seconds from dispatch to reply, the worker's Result or None if it died)
    batch_done: Callable[[ModelVersion, int, float, Result | None], None] = _ignore
    worker_loaded: Callable[[ModelVersion, WorkerSlot], None] = _ignore
    # (model, "up" or "down", reason): a worker autoscaling added or removed
    scaled: Callable[[ModelVersion, str, str], None] = _ignore


class ModelVersion:
    def __init__(
        self,
        name: str,
        version: str,
        url: str,
        archive: ModelArchive,
        handler: str,
        settings: ModelSettings,
        load: Load,
        env: Mapping[str, str],
        placement: Placement,
        observer: Observer | None = None,
        loaded_at_startup: bool = False,
        room: Callable[[], int] | None = None,
    ) -> None:
        """``load`` is what each worker is sent (its gpu_id set per worker), ``env`` its environment;
        ``room``, how many more workers the server's cap allows (autoscaling asks)."""
        self.name = name
        self.version = version
        self.url = url
        self.archive = archive
        self.handler = handler
        self.loaded_at_startup = loaded_at_startup
        self.queue = JobQueue(settings.job_queue_size)
        #: The archive's model YAML as the handler gets it (``context.model_yaml_config``), read-only.
        self.model_yaml_config: Mapping[str, Any] = MappingProxyType(load.model_yaml_config)
        hooks = observer or Observer()
        self.supervisor = Supervisor(
            name, version, settings, self.queue, load, env, placement,
            on_loaded=lambda slot: hooks.worker_loaded(self, slot),
            on_batch=lambda size, seconds, result: hooks.batch_done(self, size, seconds, result),
            on_scaled=lambda direction, reason: hooks.scaled(self, direction, reason), room=room,
        )  # fmt: skip

    @property
    def settings(self) -> ModelSettings:
        return self.supervisor.settings

    @property
    def slots(self) -> list[WorkerSlot]:
        return self.supervisor.slots

    @property
    def ready(self) -> bool:
        """Whether it can serve now: at least one worker has its model loaded and is not being stopped."""
        return any(slot.status == WorkerState.READY and not slot.stopping for slot in self.supervisor.slots)

    def submit(self, job: Job, versioned: bool = False) -> None:
        """Queue ``job``; 503 at once when no worker serves this version or its queue is full."""
        try:
            if not self.supervisor.serving:
                raise QueueFull
            self.queue.put(job)
            self.supervisor.notify()
        except QueueFull:
            # The message is built only on refusal: it is not free, and this is the request path.
            raise ServiceUnavailable(no_worker_message(self.name, self.version if versioned else None)) from None

    def start_workers(self, count: int) -> list[WorkerSlot]:
        return self.supervisor.add(count)

    async def scale(self, min_workers: int, max_workers: int, synchronous: bool) -> list[WorkerSlot]:
        """New worker bounds; returns the workers added (see Supervisor.scale)."""
        return await self.supervisor.scale(min_workers, max_workers, synchronous)

    async def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty and no batch is in flight; False on timeout."""
        return await self.supervisor.drain(timeout)

    async def stop(self) -> None:
        await self.supervisor.stop(ServerError(f"Model {self.name} was unregistered", 503))
        self.archive.cleanup()

    def status(self, is_default: bool) -> VersionStatus:
        return VersionStatus(
            name=self.name,
            version=self.version,
            url=self.url,
            runtime=self.archive.manifest.runtime,
            handler=self.handler,
            settings=self.settings,
            loaded_at_startup=self.loaded_at_startup,
            is_default=is_default,
            queue_length=len(self.queue),
            queue_capacity=self.queue.capacity,
            workers=tuple(slot.as_status() for slot in self.slots),
            autoscaling=self.supervisor.autoscaler.status(),
        )
