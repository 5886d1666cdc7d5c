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

from .apps import create_inference_app, create_management_app, create_metrics_app
from .config import Address, ServerConfig
from .connections import HttpProtocol
from .gpu import detect_gpu_count
from .metrics import Metrics, NoMetrics
from .model import Observer
from .system_metrics import SystemMetrics
from .registry import ModelRegistry, RegisterRequest

log = logging.getLogger("marserve")

# How long in-flight requests get to finish once a stop is asked for.
GRACEFUL_SHUTDOWN_SECONDS = 30


class _Listener(uvicorn.Server):
    # Signals are handled once for all three listeners, by serve(); uvicorn must not take them.
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _listener(app: object, address: Address, config: ServerConfig) -> _Listener:
    return _Listener(
        uvicorn.Config(
            app,  # type: ignore[arg-type]
            host=address.host,
            port=address.port,
            # uvicorn's httptools protocol, with caps on request heads and a read timeout.
            http=functools.partial(HttpProtocol, read_timeout=config.request_read_timeout),  # type: ignore[arg-type]
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
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); then drain requests and stop the workers."""
    stop = stop or asyncio.Event()
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
        batch_done=lambda model, size, seconds, report: metrics.batch(
            model.name, model.version, size, seconds, report.get("handler_ms"), report.get("metrics", ())
        ),
        worker_loaded=lambda model, slot: metrics.worker_loaded(
            model.name, model.version, slot.id, slot.load_time_ms / 1000
        ),
    )
    registry = ModelRegistry(config, environ=environ, gpu_count=gpus, workdir=workdir, observer=observer)
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
    listeners = [
        _listener(create_inference_app(registry, metrics), config.inference_address, config),
        _listener(create_management_app(registry, metrics), config.management_address, config),
    ]
    if config.enable_metrics_api:
        app = create_metrics_app(metrics, config.max_request_size)
        listeners.append(_listener(app, config.metrics_address, config))
    tasks: list[asyncio.Task[None]] = []
    try:
        _load_tls(listeners)
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
        await _load_startup_models(registry, config)
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        for listener in listeners:
            listener.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await registry.shutdown(drain_timeout=GRACEFUL_SHUTDOWN_SECONDS)
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("marserve has stopped")


def _addresses(config: ServerConfig) -> list[object]:
    return [config.inference_address, config.management_address, config.metrics_address]


async def _load_startup_models(registry: ModelRegistry, config: ServerConfig) -> None:
    """``--models`` / ``load_models``: registered like the API would; failures are logged, not fatal."""
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
        request = RegisterRequest(url=url, model_name=name or None, synchronous=False)
        try:
            status, message = await registry.register(request, loaded_at_startup=True)
            log.info("startup model %s: %s", entry, message)
        except Exception as exc:  # noqa: BLE001 - TorchServe only logs startup failures
            log.error("startup model %s failed: %s", entry, getattr(exc, "message", exc))
