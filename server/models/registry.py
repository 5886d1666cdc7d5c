"""The model registry: the one owner of which model versions exist and which is the default."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
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
from .rollout import Rollout, ShadowSetting, ShadowStats, check_label, version_key
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
    watched: bool = False  # registered by the model-store watcher (server/models/watching.py), not the API


@dataclass
class _Model:
    """One model name: its versions, in the order they were registered, and its default; its
    labels, traffic split and shadow (server/models/rollout.py), and the versions that left
    lately, for TF Serving's ``model_version_status`` (version -> UNLOADING or END)."""

    versions: dict[str, _Registered]
    default: str
    rollout: Rollout = field(default_factory=Rollout)
    shadow_stats: ShadowStats = field(default_factory=ShadowStats)
    retired: dict[str, str] = field(default_factory=dict)


#: Versions that left a model, kept for its status (TF Serving's END).
_RETIRED_KEPT = 16


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
        status, message, _ = await self._register(request, path, request.url or "", loaded_at_startup=loaded_at_startup)
        return status, message

    async def register_watched(self, request: RegisterRequest, path: Path, version: str | None) -> ModelVersion:
        """Register the archive at ``path``, found by the model-store watcher; ``request.url`` is
        what describe shows (its place in the store, or its s3:// URL), ``version`` the version its
        directory names (None: the archive's own). Returns the version registered."""
        _, _, model = await self._register(request, path, "", version=version, watched=True)
        return model

    async def _register(
        self,
        request: RegisterRequest,
        path: Path,
        fetch: str,
        *,
        loaded_at_startup: bool = False,
        version: str | None = None,
        watched: bool = False,
    ) -> tuple[int, str, ModelVersion]:
        """Register the archive at ``path``, first fetched from ``fetch`` if that is a URL to
        download; ``version`` overrides the archive's own."""
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
            self.config, fetch, path, workdir=self.workdir, default_name=request.model_name, environ=self.environ
        )
        archive = source.archive
        try:
            env = sources.model_environment(
                self.environ, self.config.blacklist_env_vars, archive.model_dir, source.python_path
            )
            model, workers_from = self._build(request, source, env, loaded_at_startup, version)
            await sources.install_dependencies(source, model.name, env)
        except BaseException:
            archive.cleanup()
            source.remove_download()
            raise
        try:
            status, message = await self._add(model, request, workers_from, watched)
            return status, message, model
        except BaseException:
            source.remove_download()  # a failed registration leaves no downloaded file behind
            raise

    def _build(
        self,
        request: RegisterRequest,
        source: sources.Source,
        env: dict[str, str],
        loaded_at_startup: bool,
        version: str | None = None,
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
        version = version or manifest.version
        settings = resolve_settings(request, yaml, self.config, name=name, version=version, gpu_count=self.gpu_count)
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
            name, version, request.url or "", archive, handler, settings, load, env, self._placement,
            self.observer, loaded_at_startup, room=self.room,
        )  # fmt: skip
        return model, workers_source(request, yaml)

    async def _add(
        self, model: ModelVersion, request: RegisterRequest, workers_from: str, watched: bool = False
    ) -> tuple[int, str]:
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
        entry.versions[version] = _Registered(model, request, watched)
        entry.retired.pop(version, None)
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
        named = entry.rollout.names(model.version)
        if named:
            raise Conflict(
                f"Model version {model.version} of model {name} is named by {', '.join(named)}: "
                "move or remove that first"
            )
        watched = entry.versions[model.version].watched
        drained = await self._unload(entry, model)
        if sources.is_download(model.url) and not watched:
            # As in TorchServe, an archive downloaded for a model goes with it (not at shutdown).
            sources.download_path(self.config, model.url).unlink(missing_ok=True)
        if not drained:
            raise RequestTimeout(f"Timed out while cleaning resources: {name}")
        return f'Model "{name}" unregistered'

    async def retire(self, model: ModelVersion, why: str) -> bool:
        """Unregister a version the model-store watcher registered, because ``why``: its labels,
        split and shadow let go of it (with a warning), the default moves to the newest version
        left, and its requests drain. False when they did not drain in time."""
        entry = self._models.get(model.name)
        if entry is None or entry.versions.get(model.version) is None or entry.versions[model.version].model is not model:
            return True
        for named in entry.rollout.drop(model.version):
            log.warning("model %s: %s named version %s, which is gone (%s); it no longer does", model.name, named, model.version, why)
        if entry.default == model.version and len(entry.versions) > 1:
            rest = [r.model for v, r in entry.versions.items() if v != model.version]
            # The newest that serves, else the newest.
            best = max(rest, key=lambda m: (m.ready, version_key(m.version)))
            entry.default = best.version
            log.info("model %s: default version is now %s (%s left)", model.name, best.version, model.version)
        log.info("model %s version %s unregistered (%s)", model.name, model.version, why)
        return await self._unload(entry, model)

    async def _unload(self, entry: _Model, model: ModelVersion) -> bool:
        """Take ``model`` out (it is not the default, or the model's last version), let its queued and
        in-flight requests finish, then stop its workers. False when they did not drain in time."""
        name = model.name
        del entry.versions[model.version]
        if not entry.versions:
            del self._models[name]
        entry.retired[model.version] = "UNLOADING"
        log.info("model %s version %s unregistered; its queue drains, then its workers stop", name, model.version)
        await self._changed()
        # New requests already get 404; the ones queued or in flight finish first.
        drained = await model.drain(self.config.unregister_model_timeout)
        await model.stop()
        entry.retired[model.version] = "END"
        while len(entry.retired) > _RETIRED_KEPT:
            del entry.retired[next(iter(entry.retired))]
        return drained

    async def _remove(self, model: ModelVersion) -> None:
        entry = self._models.get(model.name)
        registered = entry.versions.get(model.version) if entry is not None else None
        if entry is not None and registered is not None and registered.model is model:
            del entry.versions[model.version]
            entry.rollout.drop(model.version)
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

    # -- rollouts: labels, traffic split, shadow (server/models/rollout.py) ----------------------

    def route(self, name: str, version: str | None, label: str | None, route_key: bytes | None) -> tuple[ModelVersion, str]:
        """The version a request goes to, and how it was chosen: ``explicit`` (it names a version),
        ``label``, ``split`` (it names none and the model has a traffic split) or ``default``."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        if version is not None:
            registered = entry.versions.get(version)
            if registered is None:
                raise ModelVersionNotFound(name, version)
            return registered.model, "explicit"
        rollout = entry.rollout
        if label is not None:
            target = rollout.labels.get(label)
            if target is None:
                raise ModelVersionNotFound(name, label, f"Label {label} does not exist for model {name}")
            return entry.versions[target].model, "label"
        if rollout.split:
            return entry.versions[rollout.pick(route_key)].model, "split"
        return entry.versions[entry.default].model, "default"

    def shadow_of(self, model: ModelVersion) -> tuple[ModelVersion, ShadowSetting, ShadowStats] | None:
        """The shadow that mirrors requests served by ``model`` (never itself), if its model has one."""
        entry = self._models.get(model.name)
        shadow = entry.rollout.shadow if entry is not None else None
        if entry is None or shadow is None or shadow.version == model.version:
            return None
        return entry.versions[shadow.version].model, shadow, entry.shadow_stats

    def rollout(self, name: str) -> Rollout:
        """``name``'s labels, split and shadow (read them; change them through the methods below)."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry.rollout

    def shadow_stats(self, name: str) -> ShadowStats:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry.shadow_stats

    def labels_of(self, model: ModelVersion) -> list[str]:
        entry = self._models.get(model.name)
        return sorted(label for label, v in entry.rollout.labels.items() if v == model.version) if entry else []

    def is_watched(self, model: ModelVersion) -> bool:
        entry = self._models.get(model.name)
        registered = entry.versions.get(model.version) if entry is not None else None
        return registered is not None and registered.watched

    def version_states(self, name: str) -> list[tuple[str, str]]:
        """TF Serving's ``model_version_status`` states: AVAILABLE (serving), LOADING (no worker
        serves yet), and UNLOADING or END for versions that left lately; newest first."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        states = {v: "AVAILABLE" if r.model.ready else "LOADING" for v, r in entry.versions.items()}
        states |= {v: state for v, state in entry.retired.items() if v not in states}
        return sorted(states.items(), key=lambda item: version_key(item[0]), reverse=True)

    def _serving_version(self, entry: _Model, name: str, version: str, force: bool) -> None:
        registered = entry.versions.get(version)
        if registered is None:
            raise ModelVersionNotFound(name, version)
        if not force and not registered.model.ready and registered.model.settings.min_workers > 0:
            # As TF Serving: traffic goes only to a version that can answer it.
            raise Conflict(f"Model version {version} of model {name} has no worker ready yet; try again once it has")

    async def set_label(self, name: str, label: str, version: str, *, force: bool = False) -> str:
        """Point ``label`` at ``version`` (a ready one, unless ``force``: a snapshot being restored)."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        check_label(label)
        self._serving_version(entry, name, version, force)
        entry.rollout.labels[label] = version
        log.info("model %s: label %s now names version %s", name, label, version)
        await self._changed()
        return f"Label {label} of model {name} now names version {version}"

    async def delete_label(self, name: str, label: str) -> str:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        if entry.rollout.labels.pop(label, None) is None:
            raise ModelVersionNotFound(name, label, f"Label {label} does not exist for model {name}")
        log.info("model %s: label %s removed", name, label)
        await self._changed()
        return f"Label {label} of model {name} removed"

    async def set_traffic(self, name: str, weights: dict[str, int], *, force: bool = False) -> str:
        """Split the requests that name no version by ``weights`` ({} removes the split)."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        for version, weight in weights.items():
            if weight > 0 or version not in entry.versions:
                self._serving_version(entry, name, version, force)
        entry.rollout.set_split(weights)
        log.info("model %s: traffic split %s", name, weights or "removed")
        await self._changed()
        if not weights:
            return f"Traffic split of model {name} removed"
        return f"Traffic of model {name} split " + ", ".join(f"{v}: {w}" for v, w in weights.items())

    async def set_shadow(self, name: str, shadow: ShadowSetting | None) -> str:
        """Mirror ``shadow.percent`` of the requests the split or default serve to ``shadow.version``
        (None: stop); its figures start again from zero."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(name)
        if shadow is not None and shadow.version not in entry.versions:
            raise ModelVersionNotFound(name, shadow.version)
        entry.rollout.shadow = shadow
        entry.shadow_stats = ShadowStats()
        log.info("model %s: shadow %s", name, f"version {shadow.version}, {shadow.percent:g}%" if shadow else "removed")
        await self._changed()
        if shadow is None:
            return f"Shadow of model {name} removed"
        return f"Version {shadow.version} of model {name} now shadows {shadow.percent:g}% of its requests"

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
