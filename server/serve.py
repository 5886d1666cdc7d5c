"""Running the server: three uvicorn listeners, the registry and an ordered, bounded shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import signal
import ssl
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import uvicorn

from .http.access_log import AccessLog, NoAccessLog
from .apps import create_inference_app, create_management_app, create_metrics_app, serve_both
from .http.auth import KEY_FILE_NAME, TokenAuth, exposed_addresses, tokens_required
from .config import Address, ServerConfig
from .connections import HttpProtocol
from .workers.placement import detect_gpu_count
from .metrics.recording import Metrics, NoMetrics
from .models.version import Observer
from .predictions import PredictionService
from .metrics.system import SystemMetrics
from .models.registry import ModelRegistry, RegisterRequest
from .models.snapshot import SavedState, SnapshotPlan, SnapshotWriter, log_plan, restore

log = logging.getLogger("marserve")

# How long in-flight requests get to finish once a stop is asked for.
GRACEFUL_SHUTDOWN_SECONDS = 30


class _Listener(uvicorn.Server):
    # Signals are handled once for all three listeners, by serve(); uvicorn must not take them.
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _listener(
    app: object, address: Address, config: ServerConfig, predictions: PredictionService | None = None
) -> _Listener:
    protocol = functools.partial(HttpProtocol, read_timeout=config.request_read_timeout, predictions=predictions)
    return _Listener(
        uvicorn.Config(
            app,  # type: ignore[arg-type]
            host=address.host,
            port=address.port,
            # uvicorn's httptools protocol, with caps on request heads and a read timeout; on the
            # inference port it answers predictions itself.
            http=protocol,  # type: ignore[arg-type]
            log_config=None,
            # uvicorn's access logger is shared by all listeners; marserve writes its own.
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            server_header=False,
            # Forwarded-for headers are trusted from nobody: marserve is not deployed behind a
            # proxy by default, and the check costs time on every request.
            proxy_headers=False,
            # Only https addresses use TLS; ServerConfig made sure they have both files.
            ssl_certfile=str(config.certificate_file) if address.ssl else None,
            ssl_keyfile=str(config.private_key_file) if address.ssl else None,
        )
    )


def _load_tls(listeners: list[_Listener]) -> None:
    """Read the certificate and key now, so a bad file stops start-up with a message."""
    for listener in listeners:
        if listener.config.ssl_certfile:
            try:
                listener.config.load()
            except (OSError, ssl.SSLError) as exc:
                log.error(
                    "cannot use certificate_file %s with private_key_file %s: %s",
                    listener.config.ssl_certfile, listener.config.ssl_keyfile, exc,
                )  # fmt: skip
                raise SystemExit(1) from None


async def serve(
    config: ServerConfig,
    *,
    environ: Mapping[str, str],
    on_ready: Callable[[list[str]], None] | None = None,
    stop: asyncio.Event | None = None,
    access_log: AccessLog | None = None,
    snapshots: SnapshotPlan | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); then drain requests and stop the workers.

    ``snapshots`` says what to restore at start and where to save the models' state (None: neither).
    """
    access_log = access_log or NoAccessLog()
    stop = stop or asyncio.Event()
    snapshots = snapshots or SnapshotPlan(restore=None, save_to=None)
    writer = SnapshotWriter(snapshots.save_to) if snapshots.save_to is not None else None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    gpus = detect_gpu_count(environ)
    if config.number_of_gpu is not None:
        gpus = min(gpus, config.number_of_gpu)
    workdir = Path(tempfile.mkdtemp(prefix="marserve-"))
    metrics = Metrics() if config.enable_metrics_api else NoMetrics()
    observer = Observer(
        batch_done=lambda model, size, seconds, report: metrics.batch(model.name, model.version, size, seconds, report),
        worker_loaded=lambda model, slot: metrics.worker_loaded(
            model.name, model.version, slot.id, slot.load_time_ms / 1000
        ),
    )
    registry = ModelRegistry(
        config, environ=environ, gpu_count=gpus, workdir=workdir, observer=observer,
        on_change=writer.save if writer is not None else None,
    )  # fmt: skip
    metrics.watch_workers(
        lambda: [(m.name, m.version, slot.status) for m in registry.all_models() for slot in m.slots]
    )
    if not config.disable_system_metrics:
        metrics.registry.register(
            SystemMetrics(
                metrics.hostname,
                lambda: [
                    (m.name, m.version, slot.id, slot.process.pid)
                    for m in registry.all_models()
                    for slot in m.slots
                    if slot.status == "READY" and slot.process is not None and slot.process.pid
                ],
            )
        )
    auth = _token_auth(config, Path.cwd() / KEY_FILE_NAME)
    inference_app = create_inference_app(registry, metrics, access_log, auth)
    management_app = create_management_app(registry, metrics, access_log, auth)
    predictions = PredictionService(registry, metrics, access_log, auth, config.max_request_size)
    if config.management_address == config.inference_address:
        both = serve_both(inference_app, management_app)
        listeners = [_listener(both, config.inference_address, config, predictions)]
    else:
        listeners = [
            _listener(inference_app, config.inference_address, config, predictions),
            _listener(management_app, config.management_address, config),
        ]
    if config.enable_metrics_api:
        app = create_metrics_app(metrics, access_log, config.max_request_size)
        listeners.append(_listener(app, config.metrics_address, config))
    tasks: list[asyncio.Task[None]] = []
    try:
        _load_tls(listeners)
        if auth is not None:
            # Before the listeners start: no port answers before the file exists.
            try:
                auth.publish()
            except OSError as exc:
                log.error("cannot write the token key file %s: %s", auth.key_file, exc)
                raise SystemExit(1) from None
        tasks = [asyncio.create_task(listener.serve()) for listener in listeners]
        while not all(listener.started for listener in listeners):
            if any(task.done() for task in tasks):
                # A listener that ends before starting could not bind: uvicorn logged why.
                raise SystemExit(1)
            await asyncio.sleep(0.01)
        urls = [f"{a.scheme}://{a.host}:{a.port}" for a in _addresses(config)]
        log.info("marserve listening: inference %s, management %s, metrics %s", *urls)
        if on_ready is not None:
            on_ready(urls)
        log_plan(snapshots)
        await _load_startup_models(registry, config, snapshots.restore)
        if writer is not None:
            await writer.start(registry)
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        for listener in listeners:
            listener.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        access_log.close()
        if auth is not None:
            auth.withdraw()
        if writer is not None:
            # The last word on worker counts, before the workers go; a no-op if the restore never ended.
            await writer.save(registry)
        await registry.shutdown(drain_timeout=GRACEFUL_SHUTDOWN_SECONDS)
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("marserve has stopped")


def _token_auth(config: ServerConfig, key_file: Path) -> TokenAuth | None:
    """Token authorization as the config decides, with a warning for every API open beyond loopback."""
    auth = TokenAuth(key_file, config.token_expiration_min) if tokens_required(config) else None
    exposed = ", ".join(f"{api} {address}" for api, address in exposed_addresses(config).items())
    if exposed and auth is None:
        log.error(
            "SECURITY: listening beyond loopback (%s) with token authorization disabled: anyone who can "
            "reach these ports can use them without a key", exposed,
        )  # fmt: skip
    elif exposed:
        log.warning(
            "listening beyond loopback (%s): token authorization is on for the inference and management "
            "APIs; keys in %s", exposed, key_file,
        )  # fmt: skip
    elif auth is not None:
        log.info("token authorization is on (inference and management); keys in %s", key_file)
    return auth


def _addresses(config: ServerConfig) -> list[object]:
    return [config.inference_address, config.management_address, config.metrics_address]


async def _load_startup_models(registry: ModelRegistry, config: ServerConfig, saved: SavedState | None) -> None:
    """The saved state, then ``--models`` / ``load_models`` that it does not hold: registered like the
    API would; failures are logged, not fatal."""
    if saved is not None:
        await restore(registry, saved)
    entries = list(config.load_models)
    if [e.lower() for e in entries] == ["all"]:
        store = Path(config.model_store) if config.model_store else None
        entries = sorted(
            p.name
            for p in (store.iterdir() if store else [])
            if not p.name.startswith(".") and (p.is_dir() or p.name.endswith((".mar", ".model", ".tar.gz")))
        )
    for entry in entries:
        name, _, url = entry.rpartition("=")
        if saved is not None and saved.has(name or None, url):
            log.info("startup model %s skipped because %s has it", entry, saved.source)
            continue
        request = RegisterRequest(url=url, model_name=name or None, synchronous=False)
        try:
            status, message = await registry.register(request, loaded_at_startup=True)
            log.info("startup model %s: %s", entry, message)
        except Exception as exc:  # noqa: BLE001 - TorchServe only logs startup failures
            log.error("startup model %s failed: %s", entry, getattr(exc, "message", exc))
