"""The gRPC servers beside the HTTP listeners: grpc.aio on the frontend's own event loop (uvloop;
grpc.aio runs on it, with one poller thread of grpc's own).

- The inference port (``grpc_inference_address``:``grpc_inference_port``, 127.0.0.1:7070) serves
  TorchServe's ``InferenceAPIsService`` and the Open Inference Protocol's ``GRPCInferenceService``
  (KServe's ``grpc-v2`` expects one port for it); the management port (127.0.0.1:7071)
  ``ManagementAPIsService``. The same address for both: one server serves all three.
- Both also serve the standard health service (``grpc.health.v1.Health``: SERVING for ``""`` and
  each service while the server runs, NOT_SERVING once it stops) and reflection, so that
  ``grpcurl`` can list and describe them. Neither needs a token.
- ``max_request_size`` caps an inbound message (RESOURCE_EXHAUSTED past it, as in TorchServe);
  ``grpc_*_max_connection_age_ms`` and ``..._grace_ms`` bound a connection's life; with
  ``enable_grpc_ssl`` both ports take TLS with ``certificate_file`` and ``private_key_file``.
- A port that cannot be bound stops the start, as an HTTP port does, unless no gRPC key was set:
  then the server starts without that gRPC port and logs why (marserve did not listen on 7070 and
  7071 before; a host where something else holds them must not stop starting).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..config import ServerConfig
from ..http.auth import TokenAuth, is_loopback
from ..http.listener import ListenError, tls_context
from ..http.policy import RequestPolicy
from ..metrics.recording import Metrics, NoMetrics
from ..models.registry import ModelRegistry
from . import oip, torchserve
from .calls import CallCounter, Rpcs
from .protos._pool import POOL

log = logging.getLogger("marserve.grpc")

#: What the ready line and the start message say of a gRPC port that is not listening.
OFF = "-"


@dataclass(frozen=True)
class Endpoint:
    """Where one gRPC API listens, and how long its connections may live."""

    api: str  # inference, management
    host: str
    port: int
    max_age_ms: int | None
    grace_ms: int | None

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def endpoints(config: ServerConfig) -> list[Endpoint]:
    return [
        Endpoint(
            api, getattr(config, f"grpc_{api}_address"), getattr(config, f"grpc_{api}_port"),
            getattr(config, f"grpc_{api}_max_connection_age_ms"), getattr(config, f"grpc_{api}_max_connection_age_grace_ms"),
        )  # fmt: skip
        for api in ("inference", "management")
    ]


def exposed(config: ServerConfig) -> dict[str, str]:
    """The gRPC ports bound beyond loopback, by API (``gRPC inference``: ``0.0.0.0:7070``)."""
    if not config.enable_grpc:
        return {}
    return {f"gRPC {e.api}": e.target for e in endpoints(config) if not is_loopback(e.host)}


class GrpcServers:
    """The gRPC ports of one marserve server: started after the HTTP listeners, stopped with them."""

    def __init__(
        self, config: ServerConfig, registry: ModelRegistry, metrics: Metrics, auth: TokenAuth | None, policy: RequestPolicy
    ) -> None:
        self.config = config
        counter = CallCounter()
        if not isinstance(metrics, NoMetrics):
            metrics.registry.register(counter)
        rpcs = Rpcs(policy, counter)
        self._services: dict[str, list[tuple[str, grpc.GenericRpcHandler]]] = {
            "inference": [
                (torchserve.INFERENCE_SERVICE, torchserve.inference_service(rpcs, registry, metrics, config.max_response_size)),
                (oip.SERVICE, oip.service(rpcs, registry, metrics)),
            ],
            "management": [(torchserve.MANAGEMENT_SERVICE, torchserve.management_service(rpcs, registry, config))],
        }
        self._servers: list[tuple[Any, _Health]] = []
        #: Where each API listens ("host:port"), or OFF.
        self.bound = {"inference": OFF, "management": OFF}

    async def start(self) -> None:
        """Bind and start; ListenError if a port cannot be bound (see the module's note on defaults)."""
        config = self.config
        if not config.enable_grpc:
            log.info("gRPC is off (enable_grpc=false)")
            return
        credentials = _credentials(config) if config.enable_grpc_ssl else None
        inference, management = endpoints(config)
        groups = [[inference, management]] if inference.target == management.target else [[inference], [management]]
        for group in groups:
            await self._start(group, credentials)
        described = ", ".join(
            f"{api} {address} ({', '.join(name for name, _ in self._services[api])})"
            for api, address in self.bound.items()
            if address != OFF
        )
        if described:
            log.info("gRPC listening%s: %s", " with TLS" if credentials else "", described)

    async def _start(self, group: list[Endpoint], credentials: Any) -> None:
        first = group[0]
        options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 0),  # grpc's default would let a second server share the port
            ("grpc.max_receive_message_length", self.config.max_request_size),
            ("grpc.max_send_message_length", -1),
        ]
        if first.max_age_ms is not None:
            options.append(("grpc.max_connection_age_ms", first.max_age_ms))
        if first.grace_ms is not None:
            options.append(("grpc.max_connection_age_grace_ms", first.grace_ms))
        server = grpc.aio.server(options=options)
        services = [service for endpoint in group for service in self._services[endpoint.api]]
        server.add_generic_rpc_handlers(tuple(handler for _, handler in services))
        health = _Health()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        names = [name for name, _ in services]
        for name in names:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server, pool=POOL
        )
        port = self._bind(server, first, credentials)
        if port is None:
            return
        await server.start()
        self._servers.append((server, health))
        for endpoint in group:
            self.bound[endpoint.api] = Endpoint(endpoint.api, endpoint.host, port, None, None).target

    def _bind(self, server: Any, endpoint: Endpoint, credentials: Any) -> int | None:
        """The port bound; None if it could not be and gRPC runs on its defaults (a warning)."""
        reason = _bind_error(endpoint.host, endpoint.port)
        port = 0
        if reason is None:
            try:
                if credentials is None:
                    port = server.add_insecure_port(endpoint.target)
                else:
                    port = server.add_secure_port(endpoint.target, credentials)
            except RuntimeError:
                reason = "grpc could not bind it"
            if not port and reason is None:
                reason = "grpc could not bind it"
        if reason is None:
            return int(port)
        key = f"grpc_{endpoint.api}_port"
        message = f"cannot listen on {endpoint.target} ({key}): {reason}"
        if not self.config.grpc_defaulted:
            raise ListenError(message)
        log.warning("%s; serving without gRPC %s (set %s, or enable_grpc=false)", message, endpoint.api, key)
        return None

    async def stop(self, grace: float) -> None:
        """Stop accepting calls; let those in flight finish for up to ``grace`` seconds."""
        for _, health in self._servers:
            await health.close()
        await asyncio.gather(*(server.stop(grace) for server, _ in self._servers))
        self._servers = []


class _Health(health_aio.HealthServicer):  # type: ignore[misc]  # grpc_health has no type information
    """The standard health service; at a stop, its ``Watch`` streams end (after NOT_SERVING) rather
    than holding the stop for its whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._watching: set[asyncio.Task[Any]] = set()

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 - the RPC's name
        task = asyncio.current_task()
        assert task is not None
        self._watching.add(task)
        try:
            await super().Watch(request, context)
        finally:
            self._watching.discard(task)

    async def close(self) -> None:
        await self.enter_graceful_shutdown()
        await asyncio.sleep(0)  # let watchers send NOT_SERVING
        for task in list(self._watching):
            task.cancel()


def _credentials(config: ServerConfig) -> Any:
    """TLS for both ports from certificate_file and private_key_file (checked as https addresses are)."""
    assert config.certificate_file is not None and config.private_key_file is not None  # ServerConfig checked
    tls_context(config.certificate_file, config.private_key_file)  # ListenError, naming the files, if unusable
    try:
        certificate = config.certificate_file.read_bytes()
        key = config.private_key_file.read_bytes()
    except OSError as exc:
        raise ListenError(f"cannot read certificate_file or private_key_file for gRPC: {exc}") from None
    return grpc.ssl_server_credentials([(key, certificate)])


def _bind_error(host: str, port: int) -> str | None:
    """Why ``host``:``port`` cannot be listened on (asked of the system first, since grpc only
    says that it failed), or None."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address already in use"
            return (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    return None
