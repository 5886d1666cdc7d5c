"""The model registry: the one owner of which model versions exist and which is the default."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from archiver import ArchiveError, check_model_name

from ..config import ServerConfig, WorkerCaps, worker_caps
from ..errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidModel,
    ModelNotFound,
    ModelVersionNotFound,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    WorkerError,
)
from ..workers.messages import Load
from ..workers.placement import Placement
from ..workers.supervisor import first_failure
from . import sources
from .settings import (
    RegisterRequest,
    check_register_request,
    check_worker_bounds,
    check_workers,
    resolve_settings,
    workers_source,
)
from .status import VersionStatus
from .version import ModelVersion, Observer

log = logging.getLogger("marserve.registry")

__all__ = ["SERVER_VERSION", "ModelRegistry", "RegisterRequest", "check_name"]

SERVER_VERSION = "0.12.0"  # what handlers see as context.system_properties["server_version"]


@dataclass(eq=False)
class _Registered:
    model: ModelVersion
    request: RegisterRequest  # as given, but initial_workers is the last scale's minimum


@dataclass
class _Model:
    """One model name: its versions, in the order they were registered, and its default."""

    versions: dict[str, _Registered]
    default: str


class ModelRegistry:
    def __init__(
        self,
        config: ServerConfig,
        *,
        environ: Mapping[str, str],
        gpu_count: int = 0,
        workdir: Path | None = None,
        observer: Observer | None = None,
        on_change: Callable[[ModelRegistry], Awaitable[None]] | None = None,
        caps: WorkerCaps | None = None,
        placement: Placement | None = None,
    ) -> None:
        """``on_change`` is awaited after every change of which versions exist, their workers or
        default: the snapshot writer. ``caps`` (default: what ``config`` and this machine allow)
        bound the workers; ``placement`` (default: one for ``gpu_count`` GPUs) places and paces
        their starts."""
        self.config = config
        self.environ = dict(environ)
        self.gpu_count = gpu_count
        self.workdir = workdir
        self.observer = observer or Observer()
        self.on_change = on_change
        self.caps = caps or worker_caps(config, gpu_count=gpu_count)
        self._models: dict[str, _Model] = {}
        self._placement = placement or Placement(gpu_count)
        self._stopping = False
        # True from the end of start-up (the startup models registered; serve() sets it) until a stop
        # begins. Outside it the server is not ready, models or not: a Kubernetes probe must not see
        # a pod ready in the moment before its model_snapshot is registered, nor while it drains.
        self.serving = False

    # -- lookup --------------------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        if version is None:
            return entry.versions[entry.default].model
        registered = entry.versions.get(version)
        if registered is None:
            raise ModelVersionNotFound(name, version)
        return registered.model

    def versions(self, name: str) -> list[ModelVersion]:
        if name not in self._models:
            raise ModelNotFound(name)
        return [registered.model for registered in self._models[name].versions.values()]

    def names(self) -> list[str]:
        return sorted(self._models)

    def all_models(self) -> list[ModelVersion]:
        return [registered.model for entry in self._models.values() for registered in entry.versions.values()]

    def default_version(self, name: str) -> str:
        return self._models[name].default

    def status(self, name: str | None = None, version: str | None = None) -> list[VersionStatus]:
        """Every version of every model, by name (``name`` None), every version of ``name``
        (``version`` "all"), or else the one version ``get`` would return."""
        if name is None:
            return [status for n in self.names() for status in self.status(n, "all")]
        if version == "all":
            entry = self._models.get(name)
            if entry is None:
                raise ModelNotFound(name)
            return [r.model.status(v == entry.default) for v, r in entry.versions.items()]
        model = self.get(name, version)
        return [model.status(model.version == self._models[name].default)]

    def registered_with(self, model: ModelVersion) -> RegisterRequest:
        """The register parameters given for ``model``; ``initial_workers`` is the last scale's minimum."""
        return self._models[model.name].versions[model.version].request

    def local_url(self, model: ModelVersion) -> str:
        """The url that registers ``model`` again from what is here (see sources.local_url)."""
        return sources.local_url(model.url)

    def resolve_url(self, url: str | None) -> Path:
        return sources.resolve_url(self.config, url)

    async def _changed(self) -> None:
        # Once the server stops, the snapshot keeps the state it had: the final save is serve()'s.
        if self.on_change is not None and not self._stopping:
            await self.on_change(self)

    def workers_in_use(self) -> int:
        """Workers of every model version, serving or starting: what ``max_workers`` caps."""
        return sum(model.supervisor.live for model in self.all_models())

    def room(self) -> int:
        """How many more workers ``max_workers`` allows: what autoscaling may add."""
        return self.caps.total - self.workers_in_use()

    def _check_total(self, name: str, value: int, adding: int) -> None:
        # No await between this check and the start of the workers it admits.
        in_use, total = self.workers_in_use(), self.caps.total
        if in_use + adding > total:
            raise BadRequest(
                f"Invalid value for {name}: {value} (the server runs {in_use} workers and max_workers is "
                f"{total}: {max(0, total - in_use)} more fit)"
            )

    def _check_running(self) -> None:
        if self._stopping:
            raise ServiceUnavailable("The server is stopping")

    # -- register ------------------------------------------------------------------------------

    async def register(self, request: RegisterRequest, loaded_at_startup: bool = False) -> tuple[int, str]:
        """Register a model version; returns TorchServe's (status, message)."""
        path = sources.resolve_url(self.config, request.url)
        if request.runtime is not None and request.runtime not in ("python", "python3"):
            raise BadRequest(f"Invalid RuntimeType value: {request.runtime}")
        if request.model_name is not None:
            check_name(request.model_name)
        check_register_request(request, self.caps)
        self._check_running()
        if request.initial_workers:
            # Early, before the archive is opened; _add checks again as it starts them.
            self._check_total("initial_workers", request.initial_workers, request.initial_workers)
        source = await sources.open_source(
            self.config, request.url or "", path, workdir=self.workdir, default_name=request.model_name
        )
        archive = source.archive
        try:
            env = sources.model_environment(
                self.environ, self.config.blacklist_env_vars, archive.model_dir, source.python_path
            )
            model, workers_from = self._build(request, source, env, loaded_at_startup)
            await sources.install_dependencies(source, model.name, env)
        except BaseException:
            archive.cleanup()
            source.remove_download()
            raise
        try:
            return await self._add(model, request, workers_from)
        except BaseException:
            source.remove_download()  # a failed registration leaves no downloaded file behind
            raise

    def _build(
        self, request: RegisterRequest, source: sources.Source, env: dict[str, str], loaded_at_startup: bool
    ) -> tuple[ModelVersion, str]:
        """The model version to add, and the setting its worker count comes from."""
        archive = source.archive
        manifest = archive.manifest
        name = request.model_name or manifest.model.model_name
        check_name(name)
        handler = request.handler or manifest.model.handler or self.config.default_service_handler
        if not handler:
            raise InvalidModel(f"Model {name} has no handler: set one in the archive or with handler=")
        yaml, yaml_dict = sources.read_model_yaml(archive)
        settings = resolve_settings(
            request, yaml, self.config, name=name, version=manifest.version, gpu_count=self.gpu_count
        )
        check_worker_bounds(settings, request, yaml, self.caps)
        load = Load(
            model_name=name,
            model_dir=str(archive.model_dir),
            handler=handler,
            batch_size=settings.batch_size,
            gpu_id=None,
            manifest=manifest.model_dump(by_alias=True, exclude_none=True),
            model_yaml_config=yaml_dict,
            limit_max_image_pixels=self.config.limit_max_image_pixels,
            decode_input_request=self.config.decode_input_request,
            max_response_size=self.config.max_response_size,
            server_version=SERVER_VERSION,
            # TorchServe's service_envelope; else (marserve) the one the archive's manifest names.
            envelope=self.config.service_envelope or sources.manifest_envelope(archive),
            overlap_stages=settings.overlap_stages,
        )
        model = ModelVersion(
            name, manifest.version, request.url or "", archive, handler, settings, load, env, self._placement,
            self.observer, loaded_at_startup, room=self.room,
        )  # fmt: skip
        return model, workers_source(request, yaml)

    async def _add(self, model: ModelVersion, request: RegisterRequest, workers_from: str) -> tuple[int, str]:
        name, version, workers = model.name, model.version, model.settings.min_workers
        entry = self._models.get(name)
        try:
            self._check_running()
            if entry is not None and version in entry.versions:
                raise Conflict(f"Model version {version} is already registered for model {name}")
            self._check_total(workers_from, workers, workers)
        except ServerError:
            model.archive.cleanup()
            raise
        if entry is None:
            entry = self._models[name] = _Model({}, version)
        entry.versions[version] = _Registered(model, request)
        log.info(
            "model %s version %s registered from %s (handler %s, batch_size %d, max_batch_delay %d ms, %d workers)",
            name, version, model.url, model.handler, model.settings.batch_size, model.settings.max_batch_delay, workers,
        )  # fmt: skip
        # Workers are added before the first await, so an unregister meanwhile stops them too.
        slots = model.start_workers(workers) if workers > 0 else []
        await self._changed()
        if workers <= 0:
            return 200, (
                f'Model "{name}" Version: {version} registered with 0 initial workers. '
                "Use scale workers API to add workers for the model."
            )
        if not request.synchronous:
            return 202, "Processing worker updates..."
        failure = await first_failure(slots)
        if failure is not None:
            log.error("model %s version %s unregistered again: its workers failed to start: %s", name, version, failure.message)
            await self._remove(model)
            raise WorkerError(
                f"Failed to start workers for model {name} version: {version}: {failure.message}",
                failure.status_code,
            )
        return 200, f'Model "{name}" Version: {version} registered with {workers} initial workers'

    # -- workers -------------------------------------------------------------------------------

    async def scale(
        self, name: str, version: str | None, min_worker: int, max_worker: int, synchronous: bool
    ) -> tuple[int, str]:
        if max_worker < min_worker:
            raise BadRequest("max_worker cannot be less than min_worker.")
        if min_worker < 0:
            raise BadRequest("min_worker cannot be negative.")
        check_workers("min_worker", min_worker, self.caps)
        check_workers("max_worker", max_worker, self.caps)
        model = self.get(name, version)
        self._check_running()
        live = model.supervisor.live
        if min_worker > live:
            self._check_total("min_worker", min_worker, min_worker - live)
        registered = self._models[name].versions[model.version]
        registered.request = replace(registered.request, initial_workers=min_worker)
        log.info("model %s version %s scaled: min_worker %d, max_worker %d (%d live)", name, model.version, min_worker, max_worker, live)
        added = await model.scale(min_worker, max_worker, synchronous)
        await self._changed()
        if not synchronous:
            return 202, "Processing worker updates..."
        failure = await first_failure(added)
        if failure is not None:
            raise WorkerError(
                f"Failed to start workers for model {name} version: {model.version}: {failure.message}",
                failure.status_code,
            )
        suffix = f", version: {version}" if version else ""
        return 200, f"Workers scaled to {min_worker} for model: {name}{suffix}"

    # -- unregister and defaults ---------------------------------------------------------------

    async def unregister(self, name: str, version: str | None) -> str:
        model = self.get(name, version)
        entry = self._models[name]
        if model.version == entry.default and len(entry.versions) > 1:
            raise Forbidden(f"Cannot remove default version for model {name}")
        del entry.versions[model.version]
        if not entry.versions:
            del self._models[name]
        log.info("model %s version %s unregistered; its queue drains, then its workers stop", name, model.version)
        await self._changed()
        # New requests already get 404; the ones queued or in flight finish first.
        drained = await model.drain(self.config.unregister_model_timeout)
        await model.stop()
        if sources.is_download(model.url):
            # As in TorchServe, an archive downloaded for a model goes with it (not at shutdown).
            sources.download_path(self.config, model.url).unlink(missing_ok=True)
        if not drained:
            raise RequestTimeout(f"Timed out while cleaning resources: {name}")
        return f'Model "{name}" unregistered'

    async def _remove(self, model: ModelVersion) -> None:
        entry = self._models.get(model.name)
        registered = entry.versions.get(model.version) if entry is not None else None
        if entry is not None and registered is not None and registered.model is model:
            del entry.versions[model.version]
            if not entry.versions:
                del self._models[model.name]
            elif entry.default == model.version:
                entry.default = next(iter(entry.versions))
            await self._changed()
        await model.stop()

    async def set_default(self, name: str, version: str) -> str:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        if version not in entry.versions:
            # TorchServe words this one case differently (no colons).
            raise ModelVersionNotFound(name, version, f"Model version {version} does not exist for model {name}")
        entry.default = version
        log.info("model %s: default version is now %s", name, version)
        await self._changed()
        return f'Default version successfully updated for model "{name}" to "{version}"'

    async def begin_shutdown(self) -> None:
        """The server is stopping: no worker starts from now on. Starts waiting for their turn or
        loading are cancelled and their processes killed, so a synchronous register or scale
        waiting on them is answered (503) at once; workers that serve stay, to finish their queues.
        Registering and scaling are refused (503), and ``on_change`` is no longer called."""
        self._stopping = True
        self.serving = False
        stopping = ServiceUnavailable("The server is stopping")
        await asyncio.gather(*(m.supervisor.stop_starting(stopping) for m in self.all_models()))

    async def shutdown(self, drain_timeout: float) -> None:
        await self.begin_shutdown()
        models = self.all_models()
        await asyncio.gather(*(m.drain(drain_timeout) for m in models))
        await asyncio.gather(*(m.stop() for m in models))
        self._models.clear()


def check_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ArchiveError as exc:
        raise BadRequest(str(exc)) from None
