"""The one request policy: what every request on every port goes through, whatever its protocol.

- a request id, returned as ``x-request-id`` and given to the handler;
- ``max_request_size``, on the declared length before the body is read and on the body as it
  arrives;
- the token its route needs (``auth``);
- the server's own headers on every response (TorchServe's no-cache headers, CORS if configured);
- when it is answered: the status-class counters and the access-log line.

The HTTP connection calls it for every request; other protocols (gRPC) call the same methods.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from typing import Protocol

from ..errors import PayloadTooLarge, ServerError, Unauthorized
from .access_log import AccessLog
from .auth import REFUSED, TokenAuth
from .responses import NO_CACHE, header_lines


log = logging.getLogger("marserve.http")

# Refusals are logged as a summary at most this often.
REFUSAL_LOG_SECONDS = 60


class Counters(Protocol):
    """What the policy counts: answered statuses, and what it refused before it was a request."""

    def response(self, status: int) -> None: ...

    def refused(self, reason: str) -> None: ...


class RequestIds:
    """UUID-shaped request ids: a random prefix per server run and a counter.

    Unique within a run and unlikely to repeat across runs, for a fraction of ``uuid4``'s cost
    (no system call, no UUID object). They name requests in logs; nothing relies on them being
    unguessable.
    """

    def __init__(self) -> None:
        prefix = secrets.token_hex(10)
        variant = "89ab"[int(prefix[15], 16) % 4]
        self._prefix = f"{prefix[:8]}-{prefix[8:12]}-4{prefix[12:15]}-{variant}{prefix[16:19]}-"
        self._count = itertools.count(secrets.randbits(40))

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFF:012x}"


class RequestPolicy:
    def __init__(
        self,
        *,
        auth: TokenAuth | None,
        max_request_size: int,
        metrics: Counters,
        access_log: AccessLog,
        cors: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.auth = auth
        self.limit = max_request_size
        self.metrics = metrics
        self.access_log = access_log
        self.request_id = RequestIds()
        #: The server's own headers on every response, as pairs and as head lines.
        self.headers: tuple[tuple[str, str], ...] = (*NO_CACHE, *cors)
        self.header_lines = header_lines(self.headers)
        self._date = (0, b"")
        self._refusals: Counter[str] = Counter()
        self._refusal_log: asyncio.TimerHandle | None = None

    # -- before the handler ----------------------------------------------------------------------

    def check_head(self, key: str | None, headers: Iterable[tuple[bytes, bytes]]) -> ServerError | None:
        """Why a request is refused on its head alone (413 for a declared body over the limit,
        then 401 without the ``key`` its route needs), or None."""
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return PayloadTooLarge(f"Request body of {int(length)} bytes exceeds max_request_size ({self.limit})")
        if key is not None and self.auth is not None and not self.auth.allows_request(key, headers):
            return Unauthorized(REFUSED)
        return None

    def body_too_large(self) -> PayloadTooLarge:
        """For a body (chunked, or longer than declared) that grew past the limit."""
        return PayloadTooLarge(f"Request body exceeds max_request_size ({self.limit})")

    # -- the response ----------------------------------------------------------------------------

    def date_line(self) -> bytes:
        """The ``date`` header, rendered once a second."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode())
        return self._date[1]

    def refused(self, reason: str) -> None:
        """A connection or message refused before it became a request (``reason``: head_timeout,
        invalid, connection_cap, ...): counted, and logged in a summary at most once a minute,
        since under attack there may be thousands a second."""
        self.metrics.refused(reason)
        self._refusals[reason] += 1
        if self._refusal_log is None:
            self._log_refusals()

    def _log_refusals(self) -> None:
        if not self._refusals:
            self._refusal_log = None
            return
        counts = ", ".join(f"{reason} {count}" for reason, count in self._refusals.most_common())
        log.warning("refused connections or messages in the last %d s: %s", REFUSAL_LOG_SECONDS, counts)
        self._refusals.clear()
        self._refusal_log = asyncio.get_running_loop().call_later(REFUSAL_LOG_SECONDS, self._log_refusals)

    def answered(
        self,
        client: tuple[str, int] | None,
        method: str,
        path: str,
        status: int,
        received: float,
        request_id: str,
        protocol: str | None = None,
        code: str | None = None,
    ) -> None:
        """Count the status and write the access-log line (499: the client left first). Another
        protocol than HTTP/1.1 names itself (``grpc``) and its own status ``code`` (``NOT_FOUND``),
        with ``status`` the HTTP status that stands for it."""
        self.metrics.response(status)
        self.access_log.record(client, method, path, status, received, request_id, protocol, code)


def cors_headers(origin: str | None, methods: str | None, headers: str | None) -> tuple[tuple[str, str], ...]:
    """TorchServe's CORS headers for what ``cors_allowed_*`` configure (no preflight handling)."""
    configured = (
        ("access-control-allow-origin", origin),
        ("access-control-allow-methods", methods),
        ("access-control-allow-headers", headers),
    )
    return tuple((name, value) for name, value in configured if value)
