"""Snapshots: the registered models survive a restart.

A snapshot is the registry's API-level state and nothing else: for each model version its name,
version and URL, the register parameters the client gave explicitly, the worker counts the API
set (``initial_workers`` or a scale call) and whether it is the default version. It never copies
``config.properties``, so a restore replays each registration through the normal path and today's
config, model YAML and defaults fill in whatever the API did not set.

The file is ``<log_location>/config/snapshot.json`` (TorchServe keeps its snapshots in
``$LOG_LOCATION/config`` too), rewritten atomically after every change. A hand-written
``model_snapshot=`` in ``config.properties`` (TorchServe's format, used by KServe images) is
restored instead of the file.

Rollouts (server/models/rollout.py) are saved too: each model's labels, traffic split and shadow,
restored once its versions are back. Versions the model-store watcher registered are not saved:
the store is where they come from, and the watcher's first scan brings them back at start, before
the rollouts are restored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)  # fmt: skip

from archiver import one_line

from ..config import ServerConfig
from ..errors import ServerError
from .registry import ModelRegistry, RegisterRequest
from .rollout import ShadowSetting, parse_shadow, parse_weights
from .settings import check_workers

log = logging.getLogger("marserve.snapshot")

FORMAT = 1
# RegisterRequest fields that are not settings to replay: the entry names its own url and name,
# workers are kept apart (a scale call changes them), and how a call waited is no setting.
_NOT_PARAMS = frozenset({"url", "model_name", "initial_workers", "synchronous"})
_PARAMS = frozenset(f.name for f in fields(RegisterRequest)) - _NOT_PARAMS
_REQUEST = TypeAdapter(RegisterRequest)


class SnapshotError(Exception):
    """A snapshot that cannot be restored; the message is one line and says the ways out."""


# ---------------------------------------------------------------- what is saved


class Workers(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    min: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Workers:
        if self.max < self.min:
            raise ValueError("max is less than min")
        return self


class SavedModel(BaseModel):
    """One registered model version, as the management API left it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str
    version: str
    url: str
    default: bool = False
    loaded_at_startup: bool = False
    params: dict[str, Any] = {}  # explicit register parameters, RegisterRequest's names
    workers: Workers | None = None  # None: never set through the API

    @model_validator(mode="after")
    def _known_params(self) -> SavedModel:
        unknown = sorted(set(self.params) - _PARAMS)
        if unknown:
            raise ValueError(f"unknown register parameter {unknown[0]!r}")
        try:
            self.request()  # a wrong type shows when the file is read, not half-way through a restore
        except ValidationError as exc:
            raise ValueError(f"params.{_first_error(exc)}") from None
        return self

    def request(self) -> RegisterRequest:
        """The register call that brings this version back; its workers load in the background."""
        given = {
            **self.params,
            "url": self.url,
            "model_name": self.name,
            "initial_workers": self.workers.min if self.workers else None,
            "synchronous": False,
        }
        # Strict checking of a plain dataclass needs JSON input; a str batch_size is an error.
        return _REQUEST.validate_json(json.dumps(given), strict=True)

    def label(self) -> str:
        return f"{self.name} {self.version}"


class SavedRollout(BaseModel):
    """One model's labels, traffic split and shadow."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    labels: dict[str, str] = {}
    traffic: dict[str, int] = {}
    shadow: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _valid(self) -> SavedRollout:
        try:
            parse_weights(self.traffic)
            self.shadow_setting()
        except ServerError as exc:
            raise ValueError(exc.message) from None
        return self

    def shadow_setting(self) -> ShadowSetting | None:
        return parse_shadow(self.shadow) if self.shadow else None


class _SnapshotFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: int
    created: str | None = None
    models: list[SavedModel]
    rollouts: dict[str, SavedRollout] = {}


@dataclass(frozen=True)
class SavedState:
    """What a start restores, and where it came from (for the logs)."""

    models: list[SavedModel]
    source: str
    rollouts: Mapping[str, SavedRollout] | None = None

    def has(self, name: str | None, url: str) -> bool:
        """Whether a ``--models`` entry (``name=url`` or ``url``) is a model this state restores."""
        if name:
            return any(m.name == name for m in self.models)
        return any(m.url == url for m in self.models)


@dataclass(frozen=True)
class SnapshotPlan:
    """A start's snapshot settings: what to restore (None: nothing) and where to save (None: --ncs)."""

    restore: SavedState | None
    save_to: Path | None


def snapshot_path(config: ServerConfig) -> Path:
    return Path(config.log_location) / "config" / "snapshot.json"


def plan_snapshots(config: ServerConfig, *, enabled: bool) -> SnapshotPlan:
    """Decide what this start restores and saves. Raises SnapshotError for a state it cannot read.

    ``enabled`` False is ``--ncs``: the saved file is neither read nor written. An explicit
    ``model_snapshot`` is configuration, so it is restored either way.
    """
    path = snapshot_path(config).resolve()
    save_to = path if enabled else None
    if config.model_snapshot is not None:
        return SnapshotPlan(from_model_snapshot(config.model_snapshot), save_to)
    return SnapshotPlan(read_snapshot(path) if enabled else None, save_to)


def read_snapshot(path: Path) -> SavedState | None:
    """The state saved at ``path``; None when there is no file."""
    ways_out = "fix or remove the file, or start with --ncs to ignore it"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"cannot read the snapshot {path}: {one_line(exc)}; {ways_out}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"the snapshot {path} is not valid JSON ({exc}); {ways_out}") from None
    if not isinstance(data, dict) or "format" not in data:
        raise SnapshotError(f"{path} is not a marserve snapshot (no format); {ways_out}")
    if data["format"] != FORMAT:
        raise SnapshotError(
            f"the snapshot {path} has format {data['format']!r}, this marserve reads format {FORMAT}; {ways_out}"
        )
    try:
        saved = _SnapshotFile.model_validate(data)
    except ValidationError as exc:
        raise SnapshotError(f"the snapshot {path} is invalid: {_first_error(exc)}; {ways_out}") from None
    return SavedState(saved.models, str(path), saved.rollouts)


class _TorchServeEntry(BaseModel):
    # TorchServe's per-version record in model_snapshot; keys it adds later are ignored.
    model_config = ConfigDict(frozen=True, extra="ignore")

    marName: StrictStr
    defaultVersion: StrictBool = False
    minWorkers: StrictInt | None = None
    maxWorkers: StrictInt | None = None
    batchSize: StrictInt | None = None
    maxBatchDelay: StrictInt | None = None
    responseTimeout: StrictInt | None = None
    startupTimeout: StrictInt | None = None


def from_model_snapshot(value: Mapping[str, Any]) -> SavedState:
    """TorchServe's ``model_snapshot`` JSON: ``{"models": {name: {version: {marName, ...}}}}``.

    Its values are what TorchServe ran with, so they are replayed as explicit parameters, as
    TorchServe does.
    """
    where = "model_snapshot in config.properties"
    models = value.get("models")
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise SnapshotError(f"invalid {where}: expected \"models\": {{name: {{version: {{...}}}}}}")
    saved = []
    for name, versions in models.items():
        for version, raw in versions.items():
            try:
                entry = _TorchServeEntry.model_validate(raw)
                workers = None
                if entry.minWorkers is not None:
                    workers = Workers(min=entry.minWorkers, max=max(entry.minWorkers, entry.maxWorkers or 0))
                params = {
                    "batch_size": entry.batchSize,
                    "max_batch_delay": entry.maxBatchDelay,
                    "response_timeout": entry.responseTimeout,
                    "startup_timeout": entry.startupTimeout,
                }
                saved.append(
                    SavedModel(
                        name=name, version=version, url=entry.marName, default=entry.defaultVersion,
                        params={k: v for k, v in params.items() if v is not None}, workers=workers,
                    )  # fmt: skip
                )
            except ValidationError as exc:
                raise SnapshotError(f"invalid {where}: model {name} version {version}: {_first_error(exc)}") from None
    return SavedState(saved, where)


# ---------------------------------------------------------------- saving


def capture(registry: ModelRegistry) -> dict[str, Any]:
    """The registry's state as the snapshot file's JSON object."""
    models = []
    for model in registry.all_models():
        if registry.is_watched(model):
            continue  # the model store brings it back
        request = registry.registered_with(model)
        entry: dict[str, Any] = {
            "name": model.name,
            "version": model.version,
            "url": registry.local_url(model),
            "default": registry.default_version(model.name) == model.version,
            "loaded_at_startup": model.loaded_at_startup,
            "params": {
                name: getattr(request, name)
                for name in sorted(_PARAMS)
                if getattr(request, name) is not None
            },
        }
        if request.initial_workers is not None:
            entry["workers"] = {"min": model.settings.min_workers, "max": model.settings.max_workers}
        models.append(entry)
    created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    saved: dict[str, Any] = {"format": FORMAT, "created": created, "models": models}
    rollouts = {name: registry.rollout(name).as_json() for name in registry.names() if not registry.rollout(name).empty()}
    if rollouts:
        saved["rollouts"] = rollouts
    return saved


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600): readers see the old file or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory is.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class SnapshotWriter:
    """Saves the registry's state to one file, one write at a time, off the event loop.

    It saves nothing until ``start``: until the restore is over, the registry holds only part of
    the state, and saving it would drop the rest.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._started = False
        self._lock = asyncio.Lock()
        self._asked = 0  # save() calls so far
        self._saved = 0  # the last call whose state is on disk
        self._writes: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def start(self, registry: ModelRegistry) -> None:
        """Save from now on, beginning with the state as it is."""
        self._started = True
        await self.save(registry)

    async def save(self, registry: ModelRegistry) -> None:
        """Write the current state. Failures are logged: a change the API made stands regardless."""
        if not self._started:
            return
        self._asked += 1
        # A caller cancelled mid-write must not let the next write start beside this one: two
        # renames racing could leave the older state in place.
        task = asyncio.create_task(self._write(registry, self._asked))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        await asyncio.shield(task)

    async def _write(self, registry: ModelRegistry, asked: int) -> None:
        async with self._lock:
            # A write that began after this call already holds this call's change.
            if self._saved >= asked:
                return
            covered = self._asked
            try:
                data = (json.dumps(capture(registry), indent=2) + "\n").encode()
                await asyncio.to_thread(write_atomically, self.path, data)
            except Exception as exc:  # noqa: BLE001 - the API call that got here has succeeded
                log.error("could not save the snapshot %s: %s", self.path, one_line(exc))
            self._saved = covered


# ---------------------------------------------------------------- restoring


async def restore(registry: ModelRegistry, state: SavedState) -> None:
    """Register every saved version through the normal path, then its workers and default version.

    A version that cannot come back is logged and left out; the others are restored.
    """
    restored: list[str] = []
    for saved in state.models:
        try:
            if saved.workers is not None and saved.workers.max != saved.workers.min:
                # Checked before registering: a maximum over today's cap, refused by the scale
                # after it, would leave the model half restored.
                check_workers("max_worker", saved.workers.max, registry.caps)
            await registry.register(saved.request(), loaded_at_startup=saved.loaded_at_startup)
            if saved.version not in [m.version for m in registry.versions(saved.name)]:
                # The archive was replaced: serve what it holds now, as a start without a snapshot would.
                log.warning(
                    "model %s: %s no longer holds version %s; registered the version it holds now",
                    saved.name, saved.url, saved.version,
                )  # fmt: skip
                continue
            if saved.workers is not None and saved.workers.max != saved.workers.min:
                await registry.scale(saved.name, saved.version, saved.workers.min, saved.workers.max, False)
        except Exception as exc:  # noqa: BLE001 - one model must not keep the others down
            message = exc.message if isinstance(exc, ServerError) else one_line(exc)
            log.error(
                "could not restore model %s from %s: %s. It is left out of the snapshots saved from now on; "
                "its saved entry was %s",
                saved.label(), state.source, message, json.dumps(saved.model_dump()),
            )  # fmt: skip
            continue
        restored.append(saved.label())
    for saved in state.models:
        if saved.default and saved.label() in restored:
            try:
                await registry.set_default(saved.name, saved.version)
            except ServerError as exc:  # unregistered through the API meanwhile
                log.error("could not make %s the default version again: %s", saved.label(), exc.message)
    summary = ", ".join(restored) if restored else "no models"
    log.info(
        "restored %s from %s (%d of %d saved); start with --ncs to skip",
        summary, state.source, len(restored), len(state.models),
    )  # fmt: skip


async def restore_rollouts(registry: ModelRegistry, state: SavedState) -> None:
    """Put back each model's labels, traffic split and shadow, once its versions are registered (the
    watcher's too); what names a version that did not come back is logged and left out."""
    for name, saved in (state.rollouts or {}).items():
        try:
            present = {model.version for model in registry.versions(name)}
        except ServerError:
            log.error("could not restore the labels, traffic split and shadow of model %s: it did not come back", name)
            continue
        for label, version in saved.labels.items():
            if version in present:
                await registry.set_label(name, label, version, force=True)
            else:
                log.error("model %s: label %s is left out: version %s did not come back", name, label, version)
        if saved.traffic:
            missing = sorted(set(saved.traffic) - present)
            if missing:
                log.error("model %s: its traffic split %s is left out: version %s did not come back", name, saved.traffic, missing[0])
            else:
                await registry.set_traffic(name, dict(saved.traffic), force=True)
        shadow = saved.shadow_setting()
        if shadow is not None:
            if shadow.version in present:
                await registry.set_shadow(name, shadow)
            else:
                log.error("model %s: its shadow is left out: version %s did not come back", name, shadow.version)


def log_plan(plan: SnapshotPlan) -> None:
    """Say at start where the models come from and are saved to (restore() logs what it restored)."""
    if plan.save_to is None:
        log.info("snapshots are off (--ncs): models registered now are not restored at the next start")
    elif plan.restore is None:
        log.info("no snapshot at %s: starting with no saved models; it will be written there", plan.save_to)
    elif plan.restore.source != str(plan.save_to):
        log.info(
            "restoring model_snapshot from config.properties, not %s (remove model_snapshot to restore that file)",
            plan.save_to,
        )


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


