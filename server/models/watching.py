"""Watching the model store: new versions are registered, removed ones drained and unregistered.

Opt-in (``model_store_poll_seconds``; TorchServe's behaviour, no watching, is the default). Every
N seconds the store, and each ``s3://`` prefix of ``model_store_watch_urls``, is scanned for:

- ``<model>/<version>/<archive>``: a version directory (its name starts with a digit: ``1``,
  ``2.0``, ``3.1-rc1``) holding one archive (``.mar``, ``.tar.gz``, ``.tgz``, ``.model``), or
  itself an unpacked archive (``MAR-INF/``). The directories name the model and the version,
  whatever the archive's manifest says; the model's version policy (server/models/policy.py)
  says which of them are served.
- ``<archive>`` at the top of the store (or an unpacked archive directory there): a version named
  by its own manifest. It is registered, then the policy applies to it as to the others.

**Half-written archives.** Names starting with ``.`` or ending in ``.part``, ``.tmp``, ``.partial``
are never looked at, so copying to such a name and renaming it (what model-archiver and marserve's
own downloads do) is always safe. Otherwise an archive is loaded once two scans in a row have seen
the same size and modification time, or its modification time is at least one poll interval old
(an archive already there at start loads at once). S3 objects appear whole, so they load when seen.

**New versions** are registered with the register parameters the model's default version was
given (its YAML fills in the rest, as for any registration), synchronously: a version whose workers
fail to start is logged, left out and retried only once its archive changes. Once a new version's
workers are ready, and it is the newest served version, it becomes the default; then the versions
the policy no longer serves are unregistered: requests already queued on them finish first (zero
downtime). A version that a label, the traffic split or the shadow names is kept (server/models/
rollout.py); one whose archive left the store is unregistered regardless, and whatever named it
lets go of it, with a warning. The watcher only ever unregisters versions it registered; a version
unregistered through the API stays out until its archive changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from archiver import one_line

from ..config import ServerConfig
from ..errors import Conflict, ServerError
from . import s3
from .policy import parse_policies, policy_for
from .registry import ModelRegistry, RegisterRequest, check_name
from .rollout import version_key
from .version import ModelVersion

log = logging.getLogger("marserve.watch")

ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz", ".model")
TEMPORARY_SUFFIXES = (".part", ".tmp", ".partial")
_VERSION = re.compile(r"[0-9][A-Za-z0-9_.+-]{0,63}")

Signature = tuple[object, ...]


@dataclass(frozen=True)
class Candidate:
    """An archive the scan found."""

    key: str  # where it is: its path in the store, or its s3:// URL; also the url describe shows
    name: str | None  # from the layout; None: the archive's manifest names it
    version: str | None
    signature: Signature  # what changes when the archive does
    settled: bool  # complete, whatever the previous scan saw
    path: Path | None  # the archive here; None: an S3 object, fetched to load it


@dataclass(frozen=True)
class _Loaded:
    model: ModelVersion
    signature: Signature


@dataclass(frozen=True)
class _LeftOut:
    signature: Signature
    why: str  # "failed", "api" (registered or unregistered through the API), "policy"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.endswith(TEMPORARY_SUFFIXES)


def _is_archive(name: str) -> bool:
    return not _hidden(name) and name.endswith(ARCHIVE_SUFFIXES)


class StoreWatcher:
    """Scans the model store every ``model_store_poll_seconds`` and keeps ``registry`` in step."""

    def __init__(self, registry: ModelRegistry, config: ServerConfig, *, cache_dir: Path, environ: Mapping[str, str]) -> None:
        """``cache_dir`` holds S3 archives while they are registered; ``environ`` has the S3 credentials."""
        self.registry = registry
        self.poll = config.model_store_poll_seconds
        self.store = Path(config.model_store) if config.model_store is not None else None
        self.urls = list(config.model_store_watch_urls)
        self.policies = parse_policies(config.model_store_version_policy)
        self.cache_dir = cache_dir
        self.environ = dict(environ)
        self._previous: dict[str, Signature] = {}  # key -> signature, at the last scan
        self._loaded: dict[str, _Loaded] = {}
        self._left_out: dict[str, _LeftOut] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[bool]] = set()
        self._promote: set[str] = set()  # loaded keys to make the default once ready
        self._present: set[str] | None = set()  # keys the last scan saw; None: a listing failed
        self._wanted: dict[str, set[str]] = {}  # model -> versions its policy serves
        self._found: dict[str, set[str]] = {}  # model -> versions the layout holds (not failed)
        self._warned: set[str] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._s3: Any = None

    # -- running -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The first scan, waiting for the versions it loads; then a scan every poll interval."""
        where = ", ".join([*([str(self.store)] if self.store else []), *self.urls]) or "nothing (no model_store)"
        log.info("watching %s every %d s for model versions", where, self.poll)
        await self.scan()
        await asyncio.gather(*list(self._loading.values()), return_exceptions=True)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.scan()
            except Exception as exc:  # noqa: BLE001 - the next scan tries again
                log.error("model store scan failed: %s", one_line(exc))

    async def stop(self) -> None:
        """Stop scanning and loading; versions being unregistered finish draining."""
        tasks = [*([self._task] if self._task else []), *self._loading.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(self._retiring), return_exceptions=True)

    # -- one scan ------------------------------------------------------------------------------

    async def scan(self) -> None:
        candidates, complete = await self._candidates()
        found = {c.key: c for c in candidates}
        self._forget_unregistered()
        self._wanted = self._policies(candidates)
        for candidate in candidates:
            if self._ready_to_load(candidate):
                self._loading[candidate.key] = asyncio.create_task(self._load(candidate))
        # A listing that failed says nothing about what was removed: nothing is unloaded for it.
        self._present = set(found) if complete else None
        self._previous = {key: c.signature for key, c in found.items()}
        await self._apply()

    async def _candidates(self) -> tuple[list[Candidate], bool]:
        candidates: list[Candidate] = []
        complete = True
        if self.store is not None:
            try:
                candidates += await asyncio.to_thread(scan_directory, self.store, self.poll, time.time())
            except OSError as exc:
                log.error("cannot scan the model store %s: %s", self.store, one_line(exc))
                complete = False
        for url in self.urls:
            try:
                if self._s3 is None:
                    self._s3 = await asyncio.to_thread(s3.client, self.environ)
                objects = await asyncio.to_thread(s3.list_objects, self._s3, url)
            except ServerError as exc:
                log.error("cannot list %s: %s", url, exc.message)
                complete = False
                continue
            candidates += s3_candidates(url, objects, self._warn)
        return candidates, complete

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _forget_unregistered(self) -> None:
        # A version unregistered through the API stays out until its archive changes.
        for key, loaded in list(self._loaded.items()):
            model = loaded.model
            try:
                current = self.registry.get(model.name, model.version)
            except ServerError:
                current = None
            if current is not model:
                del self._loaded[key]
                self._left_out[key] = _LeftOut(loaded.signature, "api")
                log.info("model %s version %s was unregistered through the API; %s stays out until it changes", model.name, model.version, key)

    def _policies(self, candidates: list[Candidate]) -> dict[str, set[str]]:
        """Per model, the versions its policy serves, among those found that did not fail."""
        versions: dict[str, set[str]] = {}
        for c in candidates:
            left = self._left_out.get(c.key)
            if c.name is not None and c.version is not None and not (left and left.signature == c.signature and left.why != "policy"):
                versions.setdefault(c.name, set()).add(c.version)
        self._found = versions
        return {name: self._wanted_of(name) for name in {*versions, *(m.model.name for m in self._loaded.values())}}

    def _wanted_of(self, name: str) -> set[str]:
        found = self._found.get(name, set()) | {m.model.version for m in self._loaded.values() if m.model.name == name}
        return policy_for(self.policies, name).wanted(found, version_key)

    def _ready_to_load(self, c: Candidate) -> bool:
        if c.key in self._loading:
            return False
        loaded = self._loaded.get(c.key)
        if loaded is not None:
            if loaded.signature != c.signature:
                self._warn(f"changed:{c.key}:{c.signature}", f"{c.key} changed in place; version {loaded.model.version} keeps "
                           "serving what it loaded (add a new version, or remove and add it again, to serve the change)")
            return False
        left = self._left_out.get(c.key)
        if left is not None:
            if left.signature == c.signature and (c.version is None or left.why != "policy"):
                return False
            del self._left_out[c.key]
        if c.name is not None and c.version is not None:
            if c.version not in self._wanted.get(c.name, set()):
                return False
            if self._registered_elsewhere(c.name, c.version):
                self._left_out[c.key] = _LeftOut(c.signature, "api")
                log.info("model %s version %s is registered through the API: %s is left to it", c.name, c.version, c.key)
                return False
        return c.settled or self._previous.get(c.key) == c.signature

    def _registered_elsewhere(self, name: str, version: str) -> bool:
        try:
            model = self.registry.get(name, version)
        except ServerError:
            return False
        return not self.registry.is_watched(model)

    async def _load(self, c: Candidate) -> None:
        fetched: Path | None = None
        try:
            path = c.path
            if path is None:
                fetched = self.cache_dir / hashlib.sha256(c.key.encode()).hexdigest()[:16]
                fetched.mkdir(parents=True, exist_ok=True)
                path = fetched / c.key.rsplit("/", 1)[-1]
                await s3.download(c.key, path, environ=self.environ, max_size=self.registry.config.max_download_size)
            log.info("model store: loading %s", c.key)
            model = await self.registry.register_watched(self._request(c), path, c.version)
        except Conflict as exc:
            self._left_out[c.key] = _LeftOut(c.signature, "api")
            log.info("model store: %s is left out: %s", c.key, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a broken version must not stop the watcher
            message = exc.message if isinstance(exc, ServerError) else one_line(exc)
            self._left_out[c.key] = _LeftOut(c.signature, "failed")
            log.error("model store: %s is left out, and retried once it changes: %s", c.key, message)
            return
        finally:
            self._loading.pop(c.key, None)
            if fetched is not None:
                # The archive is extracted into the version's working copy; the download is not needed.
                shutil.rmtree(fetched, ignore_errors=True)
        self._loaded[c.key] = _Loaded(model, c.signature)
        self._promote.add(c.key)
        log.info("model store: %s is model %s version %s", c.key, model.name, model.version)
        # Its version was unknown until now (an archive at the top of the store): the policy looks again.
        self._wanted[model.name] = self._wanted_of(model.name)
        await self._apply()

    def _request(self, c: Candidate) -> RegisterRequest:
        """The register parameters the model's default version was given, for its new version."""
        base = RegisterRequest()
        if c.name is not None:
            try:
                base = self.registry.registered_with(self.registry.get(c.name))
            except ServerError:
                pass
        return replace(base, url=c.key, model_name=c.name, synchronous=True)

    # -- promoting and retiring ------------------------------------------------------------------

    async def _apply(self) -> None:
        """Make ready new versions the default, then unregister those the store no longer serves."""
        async with self._lock:
            for key in sorted(self._promote):
                loaded = self._loaded.get(key)
                if loaded is None:
                    self._promote.discard(key)
                    continue
                model = loaded.model
                if not (model.ready or model.settings.min_workers == 0):
                    continue
                self._promote.discard(key)
                served = [m.model for m in self._loaded.values() if m.model.name == model.name and (m.model.ready or m.model is model)]
                if max(served, key=lambda m: version_key(m.version)) is model:
                    try:
                        if self.registry.default_version(model.name) != model.version:
                            await self.registry.set_default(model.name, model.version)
                    except (ServerError, KeyError):
                        continue
            for key, loaded in list(self._loaded.items()):
                why = self._why_retire(key, loaded.model)
                if why is None:
                    continue
                del self._loaded[key]
                if why != "its archive left the store":
                    self._left_out[key] = _LeftOut(loaded.signature, "policy")
                task = asyncio.create_task(self.registry.retire(loaded.model, why))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    def _why_retire(self, key: str, model: ModelVersion) -> str | None:
        if self._present is not None and key not in self._present:
            return "its archive left the store"
        wanted = self._wanted.get(model.name)
        if wanted is None or model.version in wanted:
            return None
        loaded = {m.model.version for m in self._loaded.values() if m.model.name == model.name}
        if not wanted <= loaded:
            return None  # until every version the policy serves is loaded (or has failed)
        try:
            if self.registry.default_version(model.name) == model.version:
                return None  # until a newer version is ready and takes over
            named = self.registry.rollout(model.name).names(model.version)
        except (ServerError, KeyError):
            return None
        if named:
            self._warn(f"pinned:{key}", f"model {model.name} version {model.version} is kept: {', '.join(named)} names it")
            return None
        policy = policy_for(self.policies, model.name)
        return f"the version policy ({policy.describe()}) no longer serves it"


# ---------------------------------------------------------------- finding archives


def scan_directory(store: Path, poll: int, now: float) -> list[Candidate]:
    """The archives of the store's layout (blocking: call it in a thread)."""
    candidates = []
    for entry in sorted(store.iterdir()):
        if _hidden(entry.name):
            continue
        # An archive at the top: a file, or an unpacked archive directory.
        if (entry.is_file() and _is_archive(entry.name)) or (entry.is_dir() and (entry / "MAR-INF").is_dir()):
            candidates.append(_local(store, entry, None, None, poll, now))
        elif entry.is_dir():
            try:
                name = check_name(entry.name)
            except ServerError:
                continue
            for version_dir in sorted(entry.iterdir()):
                if not version_dir.is_dir() or not _VERSION.fullmatch(version_dir.name):
                    continue
                archive = _version_archive(version_dir)
                if archive is not None:
                    candidates.append(_local(store, archive, name, version_dir.name, poll, now))
    return candidates


def _version_archive(directory: Path) -> Path | None:
    if (directory / "MAR-INF").is_dir():
        return directory
    archives = [f for f in directory.iterdir() if f.is_file() and _is_archive(f.name)]
    if len(archives) == 1:
        return archives[0]
    if archives:
        log.warning("%s holds %d archives; a version directory holds one", directory, len(archives))
    return None


def _local(store: Path, path: Path, name: str | None, version: str | None, poll: int, now: float) -> Candidate:
    if path.is_dir():
        files = [f.stat() for f in path.rglob("*") if f.is_file()]
        newest = max((s.st_mtime_ns for s in files), default=path.stat().st_mtime_ns)
        signature: Signature = (len(files), sum(s.st_size for s in files), newest)
    else:
        stat = path.stat()
        newest = stat.st_mtime_ns
        signature = (path.name, stat.st_size, newest)
    settled = now - newest / 1e9 >= poll
    return Candidate(str(path.relative_to(store)), name, version, signature, settled, path)


def s3_candidates(prefix_url: str, objects: list[s3.S3Object], warn: Any) -> list[Candidate]:
    """The archives of the layout under an ``s3://`` prefix (unpacked archives are not looked for)."""
    candidates = []
    per_version: dict[tuple[str, str], list[s3.S3Object]] = {}
    for obj in objects:
        parts = obj.key.split("/")
        if any(_hidden(part) for part in parts) or not _is_archive(parts[-1]):
            continue
        if len(parts) == 1:
            signature: Signature = (obj.size, obj.etag)
            candidates.append(Candidate(s3.object_url(prefix_url, obj.key), None, None, signature, True, None))
        elif len(parts) == 3 and _VERSION.fullmatch(parts[1]):
            per_version.setdefault((parts[0], parts[1]), []).append(obj)
    for (name, version), found in sorted(per_version.items()):
        url = s3.object_url(prefix_url, f"{name}/{version}/")
        if len(found) > 1:
            warn(url, f"{url} holds {len(found)} archives; a version directory holds one")
            continue
        try:
            check_name(name)
        except ServerError:
            continue
        obj = found[0]
        candidates.append(Candidate(s3.object_url(prefix_url, obj.key), name, version, (obj.size, obj.etag), True, None))
    return candidates
