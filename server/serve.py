"""Running the server: the listeners, the registry and an ordered, bounded shutdown."""

from __future__ import annotations

import asyncio
import logging
import resource
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .apis import dashboard, inference, kserve_v1, management, oip
from .apis import metrics as metrics_api
from .config import ServerConfig, key_warnings
from .http.access_log import AccessLog, NoAccessLog
from .http.auth import INFERENCE, MANAGEMENT, TokenAuth, exposed_addresses, tokens_required
from .http.connection import Door
from .http.listener import Listener, ListenError, tls_context
from .http.policy import RequestPolicy, cors_headers
from .http.routing import Router
from .metrics.recording import Metrics, NoMetrics
from .metrics.system import SystemMetrics
from .models.registry import ModelRegistry, RegisterRequest
from .models.status import WorkerState
from .models.snapshot import SavedState, SnapshotPlan, SnapshotWriter, log_plan, restore, restore_rollouts
from .models.watching import StoreWatcher
from .models.workdirs import make_workdir
from .models.version import Observer
from .models.sources import worker_environment
from .workers.placement import Placement, detect_gpu_count
from .workers.templates import WorkerTemplates

if TYPE_CHECKING:
    from .grpc.server import GrpcServers

log = logging.getLogger("marserve")


class StartupError(Exception):
    """The server cannot start (a port taken, a certificate unusable); the message is one line."""

# How long in-flight requests get to finish once a stop is asked for.
GRACEFUL_SHUTDOWN_SECONDS = 30


def _listeners(
    config: ServerConfig, registry: ModelRegistry, metrics: Metrics, auth: TokenAuth | None, policy: RequestPolicy
) -> list[Listener]:
    """One listener per address; the inference and management APIs share one when their
    addresses are the same, as in TorchServe."""

    count = 3 if config.enable_metrics_api else 2
    if config.management_address == config.inference_address:
        count -= 1
    # Each worker holds three of the frontend's files (its socket, its output socket, a pidfd).
    max_connections = connection_cap(config.max_connections, count, reserved=3 * registry.caps.total + 256)

    def listener(api: str, router: Router) -> Listener:
        address = getattr(config, f"{api}_address")
        tls = None
        if address.ssl:
            # ServerConfig made sure both files are set for an https address.
            assert config.certificate_file is not None and config.private_key_file is not None
            tls = tls_context(config.certificate_file, config.private_key_file)
        door = Door(
            router, policy, config.request_read_timeout, config.request_head_timeout, config.min_request_body_rate,
            max_connections, stream_buffer=config.max_response_size,
        )  # fmt: skip
        return Listener(api, address, door, tls)

    # TorchServe's inference API, KServe's v1 protocol and the Open Inference Protocol (v2) share the port.
    inference_routes = [
        *inference.routes(registry, metrics),
        *kserve_v1.routes(registry, metrics),
        *oip.routes(registry, metrics),
    ]
    management_routes = management.routes(registry, auth, config)
    if config.management_address == config.inference_address:
        listeners = [listener("inference", Router(inference_routes, management_routes, default_key=INFERENCE))]
    else:
        listeners = [
            listener("inference", Router(inference_routes, default_key=INFERENCE)),
            listener("management", Router(management_routes, default_key=MANAGEMENT)),
        ]
    if config.enable_metrics_api:
        # The dashboard counts every listener's open connections (this one's too) when polled.
        dashboard_routes = dashboard.routes(
            registry, metrics, lambda: {each.api: len(each.door.connections) for each in listeners},
            system_metrics=not config.disable_system_metrics,
        )  # fmt: skip
        metrics_routes = [*metrics_api.routes(metrics, config.metrics_mode), *dashboard_routes]
        listeners.append(listener("metrics", Router(metrics_routes, default_key=None)))
    return listeners


async def serve(
    config: ServerConfig,
    *,
    environ: Mapping[str, str],
    stop: asyncio.Event,
    key_file: Path,
    temp_dir: Path,
    on_ready: Callable[[list[str]], None] | None = None,
    access_log: AccessLog | None = None,
    snapshots: SnapshotPlan | None = None,
) -> None:
    """Serve until ``stop`` is set; then drain requests and stop the workers.

    ``environ`` is what workers inherit; ``key_file`` is where token keys are published when
    tokens are on; the server's private working directory is made in ``temp_dir``. ``snapshots``
    says what to restore at start and where to save the models' state (None: neither).
    """
    for warning in key_warnings(config):
        log.warning("%s", warning)
    access_log = access_log or NoAccessLog()
    snapshots = snapshots or SnapshotPlan(restore=None, save_to=None)
    writer = SnapshotWriter(snapshots.save_to) if snapshots.save_to is not None else None
    gpus = detect_gpu_count(environ)
    if config.number_of_gpu is not None:
        gpus = min(gpus, config.number_of_gpu)
    workdir = make_workdir(temp_dir)  # named after this process; removes those of dead servers first
    metrics = Metrics() if config.enable_metrics_api else NoMetrics()
    observer = Observer(
        batch_done=lambda model, size, seconds, report: metrics.batch(model.name, model.version, size, seconds, report),
        worker_loaded=lambda model, slot: metrics.worker_loaded(
            model.name, model.version, slot.id, slot.load_time_ms / 1000
        ),
        scaled=lambda model, direction, reason: metrics.scaled(model.name, model.version, direction, reason),
    )
    # Workers fork from a warm template (worker_template=true), started now so that the startup
    # models' workers find it ready.
    templates = WorkerTemplates(worker_environment(environ, config.blacklist_env_vars)) if config.worker_template else None
    if templates is not None:
        templates.warm()
    registry = ModelRegistry(
        config, environ=environ, gpu_count=gpus, workdir=workdir, observer=observer,
        on_change=writer.save if writer is not None else None, placement=Placement(gpus, templates=templates),
    )  # fmt: skip
    metrics.watch_workers(lambda: [(m.name, m.version, w.state) for m in registry.status() for w in m.workers])
    if not config.disable_system_metrics:
        system = SystemMetrics(
            metrics.hostname,
            lambda: [
                (m.name, m.version, w.id, w.pid)
                for m in registry.status()
                for w in m.workers
                if w.state == WorkerState.READY and w.pid
            ],
        )
        metrics.registry.register(system)
        metrics.add_torchserve_families(system.families)
    auth = _token_auth(config, key_file)
    policy = RequestPolicy(
        auth=auth,
        max_request_size=config.max_request_size,
        metrics=metrics,
        access_log=access_log,
        cors=cors_headers(config.cors_allowed_origin, config.cors_allowed_methods, config.cors_allowed_headers),
    )
    listeners: list[Listener] = []
    grpc_servers: GrpcServers | None = None
    watcher: StoreWatcher | None = None
    try:
        try:
            listeners = _listeners(config, registry, metrics, auth, policy)
            if auth is not None:
                # Before the listeners start: no port answers before the file exists.
                try:
                    auth.publish()
                except OSError as exc:
                    raise ListenError(f"cannot write the token key file {auth.key_file}: {exc}") from None
            for listener in listeners:
                await listener.start()
            if config.enable_grpc:
                from .grpc.server import GrpcServers  # grpc is imported only when it is on

                grpc_servers = GrpcServers(config, registry, metrics, auth, policy)
                await grpc_servers.start()
        except ListenError as exc:
            log.error("%s", exc)
            raise StartupError(str(exc)) from None
        urls = [a.url for a in (config.inference_address, config.management_address, config.metrics_address)]
        log.info("marserve listening: inference %s, management %s, metrics %s", *urls)
        if on_ready is not None:
            # Then where gRPC listens: inference and management, "-" where it does not.
            on_ready([*urls, *(grpc_servers.bound.values() if grpc_servers is not None else ("-", "-"))])
        log_plan(snapshots)
        await _load_startup_models(registry, config, snapshots.restore)
        if config.model_store_poll_seconds:
            # Its first scan registers what the store holds; the snapshot's labels, traffic split
            # and shadow may name those versions, so they come back after it.
            watcher = StoreWatcher(registry, config, cache_dir=workdir / "watched", environ=environ)
            await watcher.start()
        if snapshots.restore is not None:
            await restore_rollouts(registry, snapshots.restore)
        registry.serving = True  # ready from now on, once the models registered above are
        if writer is not None:
            await writer.start(registry)
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        if watcher is not None:
            # No scan or load from now on; versions it was unregistering finish draining.
            await watcher.stop()
        # First: a register or scale waiting on workers to start is answered now, not after the
        # listeners' grace; workers that serve stay, so that requests in flight finish.
        await registry.begin_shutdown()
        await asyncio.gather(
            *(listener.stop(GRACEFUL_SHUTDOWN_SECONDS) for listener in listeners),
            *([grpc_servers.stop(GRACEFUL_SHUTDOWN_SECONDS)] if grpc_servers is not None else []),
        )
        access_log.close()
        if auth is not None:
            auth.withdraw()
        if writer is not None:
            # The last word on worker counts, before the workers go; a no-op if the restore never ended.
            await writer.save(registry)
        await registry.shutdown(drain_timeout=GRACEFUL_SHUTDOWN_SECONDS)
        if templates is not None:
            await templates.close()  # after the workers: they are its children, and die with it
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("marserve has stopped")


def connection_cap(configured: int, listeners: int, reserved: int) -> int:
    """``max_connections`` per listener, lowered so that all listeners together stay within the
    process's file descriptors (the soft limit, raised to the hard one first), less ``reserved``
    for workers, logs and archives."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    room = max(1, (soft - reserved) // listeners)
    if room < configured:
        log.warning(
            "max_connections lowered from %d to %d per listener: the process may open %d files",
            configured, room, soft,
        )  # fmt: skip
    return min(configured, room)


def _token_auth(config: ServerConfig, key_file: Path) -> TokenAuth | None:
    """Token authorization as the config decides, with a warning for every API open beyond loopback."""
    grpc_exposed: dict[str, str] = {}
    if config.enable_grpc:
        from .grpc.server import exposed as grpc_exposed_addresses

        grpc_exposed = grpc_exposed_addresses(config)
    # gRPC ports beyond loopback count as the HTTP ones do.
    required = tokens_required(config) or (config.disable_token_authorization is None and bool(grpc_exposed))
    auth = TokenAuth(key_file, config.token_expiration_min) if required else None
    exposed = ", ".join(
        [*(f"{api} {address}" for api, address in exposed_addresses(config).items()),
         *(f"{api} {address}" for api, address in grpc_exposed.items())]
    )  # fmt: skip
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
