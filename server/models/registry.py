"""The model registry: the one owner of which model versions exist and which is the default."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from archiver import ArchiveError, ExtractLimits, ModelArchive, check_model_name, open_archive

from ..config import ConfigError, ServerConfig, parse_model_yaml
from .dependencies import install_requirements, requirements_path
from .download import DownloadFailed, archive_file_name, download
from ..errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InternalServerError,
    InvalidModel,
    ModelNotFound,
    ModelVersionNotFound,
    NotFound,
    RequestTimeout,
)
from .version import ModelSettings, ModelVersion, Observer, WorkerSlot
from ..workers.process import LoadSpec, WorkerLoadError

log = logging.getLogger("marserve.registry")

SERVER_VERSION = "0.12.0"  # what handlers see as context.system_properties["server_version"]


@dataclass
class RegisterRequest:
    """The register API's parameters (query string or JSON body); None means "not given"."""

    url: str | None = None
    model_name: str | None = None
    handler: str | None = None
    runtime: str | None = None
    batch_size: int | None = None
    max_batch_delay: int | None = None
    initial_workers: int | None = None
    synchronous: bool = True
    response_timeout: int | None = None
    startup_timeout: int | None = None


class ArchiveNotFound(NotFound):
    """A register URL that names no usable archive; TorchServe reports these as ModelNotFoundException."""

    type_name = "ModelNotFoundException"


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
    ) -> None:
        """``on_change`` is awaited after every change of which versions exist, their workers or
        default: the snapshot writer."""
        self.config = config
        self.environ = dict(environ)
        self.gpu_count = gpu_count
        self.workdir = workdir
        self.observer = observer or Observer()
        self._models: dict[str, dict[str, ModelVersion]] = {}
        self._defaults: dict[str, str] = {}
        # What each version was registered with, initial_workers updated by scale calls.
        self._requests: dict[ModelVersion, RegisterRequest] = {}
        self.on_change = on_change
        self._worker_ids = itertools.count(9000)
        self._gpu_counter = itertools.count()
        self._device_counters: dict[str, itertools.count[int]] = {}
        self._lock = asyncio.Lock()
        # The event loop keeps only weak references to tasks: an unreferenced one can vanish mid-run.
        self._background: set[asyncio.Task[None]] = set()

    # -- lookup --------------------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(name)
        if version is None:
            return versions[self._defaults[name]]
        if version not in versions:
            raise ModelVersionNotFound(name, version)
        return versions[version]

    def versions(self, name: str) -> list[ModelVersion]:
        if name not in self._models:
            raise ModelNotFound(name)
        return list(self._models[name].values())

    def names(self) -> list[str]:
        return sorted(self._models)

    def all_models(self) -> list[ModelVersion]:
        return [model for versions in self._models.values() for model in versions.values()]

    def default_version(self, name: str) -> str:
        return self._defaults[name]

    def registered_with(self, model: ModelVersion) -> RegisterRequest:
        """The register parameters given for ``model``; ``initial_workers`` is the last scale's minimum."""
        return self._requests[model]

    def local_url(self, model: ModelVersion) -> str:
        """The url that registers ``model`` again from what is here: a downloaded archive's file
        in the model store (it is kept until unregister, and fetching it again would collide)."""
        return archive_file_name(model.url) if _is_download(model.url) else model.url

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change(self)

    # -- register ------------------------------------------------------------------------------

    def resolve_url(self, url: str | None) -> Path:
        """The archive an URL names; for an http(s) URL, the model-store file to download it to.

        Only the model store is reachable unless allowed_urls says more. Every check here runs
        before any network or file access.
        """
        if url is None:
            raise BadRequest("Parameter url is required.")
        if url == "":
            raise ArchiveNotFound("empty url")
        if ".." in url:
            raise ArchiveNotFound(f"Relative path is not allowed in url: {url}")
        if "\0" in url:
            raise ArchiveNotFound(f"Model not found at: {url}")
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
            if not self.config.url_allowed(url):
                raise ArchiveNotFound(f"Given URL {url} does not match any allowed URL(s)")
            if url.lower().startswith("file://"):
                path = Path(url[len("file://") :])
                if not path.exists():
                    raise ArchiveNotFound(f"Model not found at: {url}")
                return path
            if not _is_download(url):
                raise DownloadFailed(url, "only http:// and https:// URLs can be downloaded")
        store = self.config.model_store
        if store is None:
            raise ArchiveNotFound("Model store has not been configured.")
        if _is_download(url):
            return self._download_path(url)
        # One entry of the store, never the store itself ("."), a sub-directory path or an absolute path.
        if url == "." or "/" in url or "\\" in url:
            raise ArchiveNotFound(f"Model not found at: {url}")
        path = Path(store) / url
        if not path.exists():
            raise ArchiveNotFound(f"Model not found at: {url}")
        return path

    def _download_path(self, url: str) -> Path:
        """Where an http(s) URL's archive goes: the model store, under the URL's file name."""
        assert self.config.model_store is not None
        return Path(self.config.model_store) / archive_file_name(url)

    async def register(self, request: RegisterRequest, loaded_at_startup: bool = False) -> tuple[int, str]:
        """Register a model version; returns TorchServe's (status, message)."""
        path = self.resolve_url(request.url)
        if request.runtime is not None and request.runtime not in ("python", "python3"):
            raise BadRequest(f"Invalid RuntimeType value: {request.runtime}")
        if request.model_name is not None:
            check_name(request.model_name)
        url = request.url or ""
        downloaded = _is_download(url)
        if downloaded:
            await download(url, path, allowed=self.config.url_allowed, max_size=self.config.max_download_size)
        try:
            return await self._register(request, path, loaded_at_startup)
        except BaseException:
            if downloaded:  # a failed registration leaves no downloaded file behind
                path.unlink(missing_ok=True)
            raise

    async def _register(self, request: RegisterRequest, path: Path, loaded_at_startup: bool) -> tuple[int, str]:
        limits = ExtractLimits()
        try:
            archive = await asyncio.to_thread(
                open_archive, path, workdir_root=self.workdir, limits=limits, default_name=request.model_name
            )
        except ArchiveError as exc:
            raise InvalidModel(str(exc)) from None
        try:
            archive, python_path = self._dependency_dir(archive)
            model = self._build_model(request, archive, loaded_at_startup, python_path)
            await self._install_dependencies(model, python_path)
        except BaseException:
            archive.cleanup()
            raise
        async with self._lock:
            if model.version in self._models.get(model.name, {}):
                archive.cleanup()
                raise Conflict(f"Model version {model.version} is already registered for model {model.name}")
            self._models.setdefault(model.name, {})[model.version] = model
            self._defaults.setdefault(model.name, model.version)
            self._requests[model] = request
        name, version, workers = model.name, model.version, model.settings.min_workers
        # Workers are added before the first await, so an unregister meanwhile stops them too.
        slots = self._add_workers(model, workers) if workers > 0 else []
        await self._changed()
        if workers <= 0:
            return 200, (
                f'Model "{name}" Version: {version} registered with 0 initial workers. '
                "Use scale workers API to add workers for the model."
            )
        if not request.synchronous:
            return 202, "Processing worker updates..."
        failure = await _first_failure(slots)
        if failure is not None:
            await self._remove(model)
            raise InternalServerError(
                f"Failed to start workers for model {name} version: {version}: {failure.message}", failure.code
            )
        return 200, f'Model "{name}" Version: {version} registered with {workers} initial workers'

    def _dependency_dir(self, archive: ModelArchive) -> tuple[ModelArchive, Path | None]:
        """Where the archive's requirements get installed, or None when they are not.

        The directory lies in the archive's private working copy, so it goes with the archive; a
        directory archive used in place gets a private directory of its own, never one in the store.
        """
        if not self.config.install_py_dep_per_model or not archive.manifest.model.requirements_file:
            return archive, None
        workdir = archive.workdir
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="marserve-model-", dir=self.workdir))
            archive = replace(archive, workdir=workdir)
        return archive, Path(tempfile.mkdtemp(prefix=".python-deps-", dir=workdir))

    async def _install_dependencies(self, model: ModelVersion, python_path: Path | None) -> None:
        requirements_file = model.archive.manifest.model.requirements_file
        if not requirements_file:
            return
        if python_path is None:
            log.warning(
                "model %s: its requirements file %s was not installed; set install_py_dep_per_model=true "
                "to pip-install an archive's requirements for its model",
                model.name, requirements_file,
            )  # fmt: skip
            return
        requirements = requirements_path(model.archive.model_dir, requirements_file)
        env = self._worker_env(model.archive.model_dir, python_path)
        await install_requirements(model.name, requirements, python_path, env=env)

    def _build_model(
        self, request: RegisterRequest, archive: Any, loaded_at_startup: bool, python_path: Path | None = None
    ) -> ModelVersion:
        manifest = archive.manifest
        name = request.model_name or manifest.model.model_name
        check_name(name)
        handler = request.handler or manifest.model.handler or self.config.default_service_handler
        if not handler:
            raise InvalidModel(f"Model {name} has no handler: set one in the archive or with handler=")
        yaml_config, yaml_dict = self._model_yaml(archive)
        settings = self._settings(request, name, manifest.version, yaml_config)
        manifest_dict = manifest.model_dump(by_alias=True, exclude_none=True)

        def load_spec(slot: WorkerSlot) -> LoadSpec:
            return LoadSpec(
                model_name=name,
                model_dir=str(archive.model_dir),
                handler=handler,
                batch_size=settings.batch_size,
                gpu_id=slot.gpu_id,
                manifest=manifest_dict,
                model_yaml_config=yaml_dict,
                limit_max_image_pixels=self.config.limit_max_image_pixels,
                decode_input_request=self.config.decode_input_request,
                max_response_size=self.config.max_response_size,
                threads=max(1, (os.cpu_count() or 1) // max(1, settings.max_workers, len(model.slots))),
                env=self._worker_env(archive.model_dir, python_path),
            )

        model = ModelVersion(
            name, manifest.version, request.url or "", archive, handler, settings, load_spec, self.observer,
            loaded_at_startup,
        )  # fmt: skip
        return model

    def _model_yaml(self, archive: Any) -> tuple[Any, dict[str, Any]]:
        config_file = archive.manifest.model.config_file
        text = ""
        if config_file:
            path = archive.model_dir / config_file
            if not path.is_file():
                raise InvalidModel(f"model config file not found in the archive: {config_file}")
            text = path.read_text()
        try:
            return parse_model_yaml(text)
        except ConfigError as exc:
            raise InvalidModel(f"{config_file}: {exc}") from None

    def _settings(self, request: RegisterRequest, name: str, version: str, yaml: Any) -> ModelSettings:
        # The `models` JSON of config.properties sits between the YAML and the defaults.
        models_json = (self.config.models or {}).get(name, {}).get(version, {})

        def pick(api: int | None, yaml_value: int | None, json_key: str, default: int) -> int:
            for value in (api, yaml_value, models_json.get(json_key)):
                if value is not None and value > 0:
                    return int(value)
            return default

        config = self.config
        # TorchServe reads a YAML minWorkers below 1 as 1, and uses the YAML bounds only when they
        # are consistent; otherwise both fall back, so min never exceeds max.
        yaml_min = None if yaml.minWorkers is None else max(1, yaml.minWorkers)
        if request.initial_workers is not None:
            min_workers = max_workers = max(0, request.initial_workers)
        elif yaml_min is not None and yaml.maxWorkers is not None and yaml.maxWorkers >= yaml_min:
            min_workers, max_workers = yaml_min, yaml.maxWorkers
        else:
            min_workers = max_workers = config.default_workers_per_model or 1
        return ModelSettings(
            batch_size=pick(request.batch_size, yaml.batchSize, "batchSize", 1),
            max_batch_delay=_batch_delay(request.max_batch_delay, yaml.maxBatchDelay, models_json.get("maxBatchDelay")),
            response_timeout=pick(request.response_timeout, yaml.responseTimeout, "responseTimeout", config.default_response_timeout),
            startup_timeout=pick(request.startup_timeout, yaml.startupTimeout, "startupTimeout", config.default_startup_timeout),
            min_workers=min_workers,
            max_workers=max_workers,
            job_queue_size=yaml.jobQueueSize or config.job_queue_size,
            device_type="gpu" if self.gpu_count and yaml.deviceType != "cpu" else "cpu",
            device_ids=yaml.deviceIds,
        )  # fmt: skip

    def _worker_env(self, model_dir: Path, python_path: Path | None = None) -> dict[str, str]:
        env = dict(self.environ)
        pattern = self.config.blacklist_env_vars
        if pattern:
            env = {k: v for k, v in env.items() if not re.fullmatch(pattern, k)}
        # The model's own packages come before the server's: that is what installing them is for.
        paths = (str(model_dir), str(python_path or ""), env.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    # -- workers -------------------------------------------------------------------------------

    def _next_gpu(self, model: ModelVersion) -> int | None:
        if model.settings.device_type != "gpu" or not self.gpu_count:
            return None
        ids = model.settings.device_ids
        if ids and all(0 <= i < self.gpu_count for i in ids):
            counter = self._device_counters.setdefault(f"{model.name}:{model.version}", itertools.count())
            return ids[next(counter) % len(ids)]
        return next(self._gpu_counter) % self.gpu_count

    def _add_workers(self, model: ModelVersion, count: int) -> list[WorkerSlot]:
        return [model.add_slot(str(next(self._worker_ids)), self._next_gpu(model)) for _ in range(count)]

    async def scale(
        self, name: str, version: str | None, min_worker: int, max_worker: int, synchronous: bool
    ) -> tuple[int, str]:
        if max_worker < min_worker:
            raise BadRequest("max_worker cannot be less than min_worker.")
        if min_worker < 0:
            raise BadRequest("min_worker cannot be negative.")
        model = self.get(name, version)
        model.settings.min_workers, model.settings.max_workers = min_worker, max_worker
        self._requests[model] = replace(self._requests[model], initial_workers=min_worker)
        live = [slot for slot in model.slots if not slot.stopping]
        added: list[WorkerSlot] = []
        if len(live) < min_worker:
            added = self._add_workers(model, min_worker - len(live))
        elif len(live) > max_worker:
            removal = model.remove_slots(live[max_worker:])
            if synchronous:
                await removal
            else:
                task = asyncio.create_task(removal)
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        await self._changed()
        if not synchronous:
            return 202, "Processing worker updates..."
        failure = await _first_failure(added)
        if failure is not None:
            raise InternalServerError(
                f"Failed to start workers for model {name} version: {model.version}: {failure.message}", failure.code
            )
        suffix = f", version: {version}" if version else ""
        return 200, f"Workers scaled to {min_worker} for model: {name}{suffix}"

    # -- unregister and defaults ---------------------------------------------------------------

    async def unregister(self, name: str, version: str | None) -> str:
        model = self.get(name, version)
        versions = self._models[name]
        if model.version == self._defaults[name] and len(versions) > 1:
            raise Forbidden(f"Cannot remove default version for model {name}")
        del versions[model.version]
        if not versions:
            del self._models[name]
            del self._defaults[name]
        self._requests.pop(model, None)
        await self._changed()
        # New requests already get 404; the ones queued or in flight finish first.
        drained = await model.drain(self.config.unregister_model_timeout)
        await model.stop()
        if _is_download(model.url):
            # As in TorchServe, an archive downloaded for a model goes with it (not at shutdown).
            self._download_path(model.url).unlink(missing_ok=True)
        if not drained:
            raise RequestTimeout(f"Timed out while cleaning resources: {name}")
        return f'Model "{name}" unregistered'

    async def _remove(self, model: ModelVersion) -> None:
        versions = self._models.get(model.name, {})
        if versions.get(model.version) is model:
            del versions[model.version]
            if not versions:
                self._models.pop(model.name, None)
                self._defaults.pop(model.name, None)
            elif self._defaults.get(model.name) == model.version:
                self._defaults[model.name] = next(iter(versions))
            self._requests.pop(model, None)
            await self._changed()
        await model.stop()

    async def set_default(self, name: str, version: str) -> str:
        if name not in self._models:
            raise ModelNotFound(name)
        if version not in self._models[name]:
            # TorchServe words this one case differently (no colons).
            raise ModelVersionNotFound(name, version, f"Model version {version} does not exist for model {name}")
        self._defaults[name] = version
        await self._changed()
        return f'Default version successfully updated for model "{name}" to "{version}"'

    async def shutdown(self, drain_timeout: float) -> None:
        models = self.all_models()
        await asyncio.gather(*(m.drain(drain_timeout) for m in models))
        await asyncio.gather(*(m.stop() for m in models))
        self._models.clear()
        self._defaults.clear()
        self._requests.clear()


def _batch_delay(api: int | None, yaml_value: int | None, json_value: Any) -> int:
    # An API delay of 0 is a real choice ("do not wait"); in the YAML and the models JSON, 0 means
    # "not set", as in TorchServe.
    if api is not None and api >= 0:
        return api
    for value in (yaml_value, json_value):
        if isinstance(value, int) and value > 0:
            return value
    return 100


def _is_download(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def check_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ArchiveError as exc:
        raise BadRequest(str(exc)) from None


async def _first_failure(slots: list[WorkerSlot]) -> WorkerLoadError | None:
    """The first failed first load among ``slots``, or None once they all loaded."""
    outcomes = await asyncio.gather(*(slot.first_load for slot in slots))
    return next((outcome for outcome in outcomes if outcome is not None), None)
