"""``MAR-INF/MANIFEST.json``: the model archive's manifest, as TorchServe 0.12 writes it."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ArchiveError

MANIFEST_PATH = "MAR-INF/MANIFEST.json"
ARCHIVER_VERSION = "0.12.0"
RUNTIMES = ("python", "python3", "LSP")
Runtime = Literal["python", "python3", "LSP"]

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]*")


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid TorchServe model name, else raise ArchiveError."""
    # fullmatch, not TorchServe's re.match with "$", which lets a trailing newline through.
    if not _MODEL_NAME.fullmatch(name):
        raise ArchiveError(
            f"invalid model name {name!r}: it must match ^[A-Za-z0-9][A-Za-z0-9_\\-.]*$"
        )
    return name


class _Section(BaseModel):
    # Unknown keys are ignored so that legacy and future manifests still load.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ModelSection(_Section):
    """The manifest's ``model`` object. Field order is TorchServe's key order."""

    model_name: str = Field(alias="modelName")
    serialized_file: str | None = Field(default=None, alias="serializedFile")
    handler: str | None = None
    model_file: str | None = Field(default=None, alias="modelFile")
    model_version: str | None = Field(default=None, alias="modelVersion")
    extensions: Any = None
    requirements_file: str | None = Field(default=None, alias="requirementsFile")
    config_file: str | None = Field(default=None, alias="configFile")
    # Not written by torch-model-archiver 0.12; read so that its paths, when a manifest has them,
    # are confined like the others (archiver.paths). A comma-separated string or a list.
    extra_files: str | list[str] | None = Field(default=None, alias="extraFiles")


class Manifest(_Section):
    """The whole manifest. ``created_on`` and ``archiver_version`` are absent in legacy archives."""

    created_on: str | None = Field(default=None, alias="createdOn")
    runtime: Runtime = "python"
    model: ModelSection
    archiver_version: str | None = Field(default=None, alias="archiverVersion")

    @property
    def version(self) -> str:
        """The model version, with TorchServe's fallback for manifests that lack one."""
        return self.model.model_version or "1.0"

    def to_json(self) -> str:
        """Serialise exactly as torch-model-archiver 0.12 does (key order, 2-space indent)."""
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True), indent=2)


def new_manifest(
    *,
    model_name: str,
    handler: str,
    version: str,
    runtime: Runtime = "python",
    serialized_file: str | None = None,
    model_file: str | None = None,
    requirements_file: str | None = None,
    config_file: str | None = None,
) -> Manifest:
    """A manifest for a fresh archive, stamped like TorchServe's (local time, d/m/Y)."""
    return Manifest(
        createdOn=datetime.now().strftime("%d/%m/%Y %H:%M:%S"),
        runtime=runtime,
        model=ModelSection(
            modelName=check_model_name(model_name),
            serializedFile=serialized_file,
            handler=handler,
            modelFile=model_file,
            # TorchServe drops an empty version rather than writing "".
            modelVersion=version or None,
            requirementsFile=requirements_file,
            configFile=config_file,
        ),
        archiverVersion=ARCHIVER_VERSION,
    )


def parse_manifest(raw: bytes | str) -> Manifest:
    """Parse and validate manifest JSON; every problem becomes a one-line ArchiveError."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
        raise ArchiveError(f"{MANIFEST_PATH} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{MANIFEST_PATH} must hold a JSON object")
    if not isinstance(data.get("model"), dict):
        raise ArchiveError(f"{MANIFEST_PATH}: missing model entry")
    if not data["model"].get("modelName"):
        raise ArchiveError(f"{MANIFEST_PATH}: model name is not defined")
    if data.get("runtime", "python") not in RUNTIMES:
        raise ArchiveError(
            f"{MANIFEST_PATH}: runtime {data.get('runtime')!r} is not one of {', '.join(RUNTIMES)}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ArchiveError(f"{MANIFEST_PATH}: {where}: {first['msg']}") from None
    check_model_name(manifest.model.model_name)
    return manifest
