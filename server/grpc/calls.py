"""Every gRPC call goes through the one request policy (server/http/policy.py), as HTTP requests do.

``Rpcs`` turns a service's coroutines (unary) and async generators (streaming) into grpc's method
handlers that, around the service's own work:

- give the call a request id (the policy's ``RequestIds``), returned as ``x-request-id`` in its
  trailing metadata and given to the handler like an HTTP request's;
- check the token its method needs in the ``authorization`` metadata (``Bearer <key>``), with the
  policy's ``check_head``, so the keys and rules are REST's; a refusal is UNAUTHENTICATED;
- end it with a status: a ``Failure`` a service raises, a ``ServerError`` mapped by the service's
  ``errors``, CANCELLED when the client leaves, INTERNAL for a bug;
- then count it (``Requests2XX``..., by the HTTP status its code stands for, and
  ``marserve_grpc_requests_total{service, method, code}``) and write its access-log line, which
  names the protocol and the gRPC code: ``... "POST /inference.GRPCInferenceService/ModelInfer"
  404 0.84ms <id> grpc NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from grpc import StatusCode
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import ServerError
from ..http.policy import RequestPolicy
from .status import code_for, http_status

log = logging.getLogger("marserve.grpc")

PROTOCOL = "grpc"


class Failure(Exception):
    """Ends a call with ``code`` and ``message``; ``status`` is the HTTP status it is counted as
    (by default the one the code stands for)."""

    def __init__(self, code: StatusCode, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = http_status(code) if status is None else status


def failure(error: ServerError) -> Failure:
    """A marserve error as a gRPC status, by TorchServe's table of HTTP statuses."""
    return Failure(code_for(error.status_code), error.message, error.status_code)


class Call:
    """One RPC as the services see it: its request id, when it came, its metadata."""

    __slots__ = ("context", "path", "request_id", "received", "on_answered")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], path: str, request_id: str) -> None:
        self.context = context
        self.path = path
        self.request_id = request_id
        self.received = time.perf_counter()
        #: Called with the HTTP status the call ends with: a route's own bookkeeping (a prediction's
        #: latency metrics), as ``Request.on_answered`` is for HTTP.
        self.on_answered: Callable[[int], None] | None = None

    def metadata(self) -> list[tuple[str, str]]:
        """The client's text metadata (binary ``-bin`` keys left out), names lower-case."""
        return [(key, value) for key, value in self.context.invocation_metadata() or () if isinstance(value, str)]

    def client(self) -> tuple[str, int] | None:
        """The peer's address from grpc's ``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678``."""
        peer = self.context.peer() or ""
        kind, _, address = peer.partition(":")
        if kind not in ("ipv4", "ipv6"):
            return None
        host, _, port = address.rpartition(":")
        return (host.strip("[]"), int(port)) if port.isdigit() else None


Unary = Callable[[Any, Call], Awaitable[Any]]
Streaming = Callable[[Any, Call], AsyncIterator[Any]]
ErrorMapper = Callable[[ServerError], Failure]


class Rpcs:
    """Builds the method handlers of marserve's services, each behind the request policy."""

    def __init__(self, policy: RequestPolicy, counter: CallCounter) -> None:
        self.policy = policy
        self.counter = counter

    def service(self, name: str, methods: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(name, methods)

    def unary(
        self, service: str, method: str, key: str | None, behaviour: Unary, request_type: Any, response_type: Any,
        errors: ErrorMapper = failure,
    ) -> grpc.RpcMethodHandler:  # fmt: skip
        path = f"/{service}/{method}"

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = self._begin(context, path)
            try:
                self._authorize(key, context)
                response = await behaviour(request, call)
            except asyncio.CancelledError:
                self._end(call, _CANCELLED)
                raise
            except BaseException as exc:  # noqa: BLE001 - every call ends with a status
                ended = self._ending(exc, errors, path)
            else:
                self._end(call, None)
                return response
            self._end(call, ended)
            await context.abort(ended.code, ended.message, context.trailing_metadata())

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
        )

    def server_stream(
        self, service: str, method: str, key: str | None, behaviour: Streaming, request_type: Any, response_type: Any,
        errors: ErrorMapper = failure,
    ) -> grpc.RpcMethodHandler:  # fmt: skip
        return grpc.unary_stream_rpc_method_handler(
            self._streaming(service, method, key, behaviour, errors),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    def stream_stream(
        self, service: str, method: str, key: str | None, behaviour: Streaming, request_type: Any, response_type: Any,
        errors: ErrorMapper = failure,
    ) -> grpc.RpcMethodHandler:  # fmt: skip
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(service, method, key, behaviour, errors),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    def _streaming(
        self, service: str, method: str, key: str | None, behaviour: Streaming, errors: ErrorMapper
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        path = f"/{service}/{method}"

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = self._begin(context, path)
            try:
                self._authorize(key, context)
                responses = behaviour(request, call)
                try:
                    async for response in responses:
                        yield response
                finally:
                    # Closed here, whatever happens: its own clean-up (a stream's cancel) runs at once.
                    close = getattr(responses, "aclose", None)
                    if close is not None:
                        await close()
            except asyncio.CancelledError:
                self._end(call, _CANCELLED)
                raise
            except GeneratorExit:
                self._end(call, _CANCELLED)
                raise
            except BaseException as exc:  # noqa: BLE001 - every call ends with a status
                ended = self._ending(exc, errors, path)
            else:
                self._end(call, None)
                return
            self._end(call, ended)
            await context.abort(ended.code, ended.message, context.trailing_metadata())

        return handle

    # -- the policy's steps ----------------------------------------------------------------------

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any], path: str) -> Call:
        call = Call(context, path, self.policy.request_id())
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        return call

    def _authorize(self, key: str | None, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if key is None or self.policy.auth is None:
            return
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in context.invocation_metadata() or ()
            if name == "authorization" and isinstance(value, str)
        ]
        refusal = self.policy.check_head(key, headers)
        if refusal is not None:
            raise Failure(code_for(refusal.status_code), refusal.message, refusal.status_code)

    def _ending(self, exc: BaseException, errors: ErrorMapper, path: str) -> Failure:
        if isinstance(exc, Failure):
            return exc
        if isinstance(exc, ServerError):
            return errors(exc)
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # a service aborted the call itself
        if not isinstance(exc, Exception):
            raise exc  # SystemExit, KeyboardInterrupt
        log.error("unexpected error serving %s", path, exc_info=exc)
        return Failure(StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _end(self, call: Call, ended: Failure | None) -> None:
        code = StatusCode.OK if ended is None else ended.code
        status = 200 if ended is None else ended.status
        self.counter.count(call.path, code)
        self.policy.answered(call.client(), "POST", call.path, status, call.received, call.request_id, PROTOCOL, code.name)
        if call.on_answered is not None:
            on_answered, call.on_answered = call.on_answered, None
            on_answered(status)


_CANCELLED = Failure(StatusCode.CANCELLED, "the client cancelled the call", 499)


class CallCounter(Collector):
    """``marserve_grpc_requests_total{service, method, code}``: gRPC calls by method and status code
    (they count in ``Requests2XX``/``4XX``/``5XX`` as well, by the HTTP status each code stands for)."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, StatusCode], int] = defaultdict(int)

    def count(self, path: str, code: StatusCode) -> None:
        self.counts[(path, code)] += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "marserve_grpc_requests", "gRPC calls by service, method and status code.", labels=["service", "method", "code"]
        )
        for (path, code), count in list(self.counts.items()):
            service, _, method = path[1:].rpartition("/")
            family.add_metric([service, method, code.name], count)
        yield family
