"""Where a model's archive comes from, and getting it ready to serve.

A register URL names an archive in the model store, or an ``http(s)://``, ``s3://`` or ``file://``
URL that ``allowed_urls`` lets through (``s3://``: server/models/s3.py). The archive is opened into a private working copy and, when
``install_py_dep_per_model`` is on, its requirements are pip-installed into that copy. Opening it
refuses a manifest that names a path outside the archive (``archiver.paths``) with a 400, before
any file the manifest names is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from archiver import MANIFEST_PATH, ArchiveError, ExtractLimits, ModelArchive, open_archive

from ..config import ConfigError, ModelYamlConfig, ServerConfig, parse_model_yaml
from ..errors import ArchiveNotFound, BadRequest, DownloadFailed, InvalidModel
from . import s3
from .dependencies import install_requirements, requirements_path
from .download import archive_file_name, download

log = logging.getLogger("marserve.registry")


def is_download(url: str) -> bool:
    """Whether registering ``url`` fetches it into the model store (http(s) or s3)."""
    return url.lower().startswith(("http://", "https://", "s3://"))


def local_url(url: str) -> str:
    """The url that registers the same archive again from what is here: a downloaded archive's file
    in the model store (it is kept until unregister, and fetching it again would collide)."""
    return archive_file_name(url) if is_download(url) else url


def download_path(config: ServerConfig, url: str) -> Path:
    """Where an http(s) or s3 URL's archive goes: the model store, under the URL's file name."""
    assert config.model_store is not None
    return Path(config.model_store) / archive_file_name(url)


def resolve_url(config: ServerConfig, url: str | None) -> Path:
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
        if s3.is_s3(url):
            s3.split_url(url)  # refuses a URL with credentials in it before any message repeats it
        if not config.url_allowed(url):
            raise ArchiveNotFound(f"Given URL {url} does not match any allowed URL(s)")
        if url.lower().startswith("file://"):
            path = Path(url[len("file://") :])
            if not path.exists():
                raise ArchiveNotFound(f"Model not found at: {url}")
            return path
        if not is_download(url):
            raise DownloadFailed(url, "only http://, https:// and s3:// URLs can be downloaded")
    store = config.model_store
    if store is None:
        raise ArchiveNotFound("Model store has not been configured.")
    if is_download(url):
        return download_path(config, url)
    # One entry of the store, never the store itself ("."), a sub-directory path or an absolute path.
    if url == "." or "/" in url or "\\" in url:
        raise ArchiveNotFound(f"Model not found at: {url}")
    path = Path(store) / url
    if not path.exists():
        raise ArchiveNotFound(f"Model not found at: {url}")
    return path


@dataclass(frozen=True)
class Source:
    """An opened archive and where it came from."""

    url: str
    path: Path  # the archive resolve_url named (for a download: the file in the model store)
    archive: ModelArchive
    python_path: Path | None  # where its requirements get installed; None: they are not

    def remove_download(self) -> None:
        if is_download(self.url):
            self.path.unlink(missing_ok=True)


async def open_source(
    config: ServerConfig,
    url: str,
    path: Path,
    *,
    workdir: Path | None,
    default_name: str | None,
    environ: Mapping[str, str] | None = None,
) -> Source:
    """Download ``url`` to ``path`` if it is http(s) or s3 (credentials and endpoint from
    ``environ``), then open the archive at ``path``.

    A failure once the file is downloaded removes it.
    """
    if s3.is_s3(url):
        await s3.download(url, path, environ=environ or {}, max_size=config.max_download_size)
    elif is_download(url):
        await download(url, path, allowed=config.url_allowed, max_size=config.max_download_size)
    archive: ModelArchive | None = None
    try:
        archive = await asyncio.to_thread(_open, path, workdir, default_name)
        archive, python_path = _dependency_dir(archive, config, workdir)
    except BaseException:
        if archive is not None:
            archive.cleanup()
        if is_download(url):
            path.unlink(missing_ok=True)
        raise
    return Source(url, path, archive, python_path)


def _open(path: Path, workdir: Path | None, default_name: str | None) -> ModelArchive:
    try:
        return open_archive(path, workdir_root=workdir, limits=ExtractLimits(), default_name=default_name)
    except ArchiveError as exc:
        raise InvalidModel(str(exc)) from None


def _dependency_dir(archive: ModelArchive, config: ServerConfig, workdir: Path | None) -> tuple[ModelArchive, Path | None]:
    """Where the archive's requirements get installed, or None when they are not.

    The directory lies in the archive's private working copy, so it goes with the archive; a
    directory archive used in place gets a private directory of its own, never one in the store.
    """
    if not config.install_py_dep_per_model or not archive.manifest.model.requirements_file:
        return archive, None
    own = archive.workdir
    if own is None:
        own = Path(tempfile.mkdtemp(prefix="marserve-model-", dir=workdir))
        archive = replace(archive, workdir=own)
    return archive, Path(tempfile.mkdtemp(prefix=".python-deps-", dir=own))


def read_model_yaml(archive: ModelArchive) -> tuple[ModelYamlConfig, dict[Any, Any]]:
    """The archive's model YAML: the frontend's typed view, and the whole dict for the handler."""
    config_file = archive.manifest.model.config_file
    text = ""
    if config_file:
        # open_archive has confined it already; resolving it here again reads only what was checked.
        try:
            path = archive.path("configFile", config_file)
        except ArchiveError as exc:
            raise InvalidModel(str(exc)) from None
        if not path.is_file():
            raise InvalidModel(f"model config file not found in the archive: {config_file}")
        text = path.read_text()
    try:
        return parse_model_yaml(text)
    except ConfigError as exc:
        raise InvalidModel(f"{config_file}: {exc}") from None


#: The envelopes a manifest's ``model.envelope`` may name (TorchServe's, surface §3.7).
ENVELOPES = ("body", "json", "kserve", "kservev2")


def manifest_envelope(archive: ModelArchive) -> str | None:
    """The archive manifest's ``model.envelope``, for a model ``service_envelope`` does not cover.

    The typed manifest drops keys it does not know, so this reads the file itself (open_archive has
    confined it to the archive). A value that names no envelope is ignored, with a warning.
    """
    path = archive.model_dir / MANIFEST_PATH
    try:
        model = json.loads(path.read_bytes()).get("model")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    value = model.get("envelope") if isinstance(model, dict) else None
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.lower() not in ENVELOPES:
        log.warning("%s: ignoring model.envelope %r (it must be one of %s)", MANIFEST_PATH, value, ", ".join(ENVELOPES))
        return None
    return value.lower()


def worker_environment(environ: Mapping[str, str], blacklist: str) -> dict[str, str]:
    """What every model's workers inherit: the server's environment, less the variables
    ``blacklist`` matches."""
    if not blacklist:
        return dict(environ)
    return {k: v for k, v in environ.items() if not re.fullmatch(blacklist, k)}


def model_environment(
    environ: Mapping[str, str], blacklist: str, model_dir: Path, python_path: Path | None
) -> dict[str, str]:
    """The environment of the model's workers and of its pip install: the server's, less the
    variables ``blacklist`` matches, with the model's own code and packages first on PYTHONPATH."""
    env = worker_environment(environ, blacklist)
    # The model's own packages come before the server's: that is what installing them is for.
    paths = (str(model_dir), str(python_path or ""), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


async def install_dependencies(source: Source, model_name: str, env: Mapping[str, str]) -> None:
    """pip-install the archive's requirements file for this model alone, if it has one and
    ``install_py_dep_per_model`` gave it a directory."""
    archive = source.archive
    requirements_file = archive.manifest.model.requirements_file
    if not requirements_file:
        return
    if source.python_path is None:
        log.warning(
            "model %s: its requirements file %s was not installed; set install_py_dep_per_model=true "
            "to pip-install an archive's requirements for its model",
            model_name, requirements_file,
        )  # fmt: skip
        return
    requirements = requirements_path(archive.model_dir, requirements_file)
    await install_requirements(model_name, requirements, source.python_path, env=env)
