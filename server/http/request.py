"""A request as routes see it: the head the connection parsed, and the body once it is all here."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl


class Request:
    """One HTTP request. Header names are lower-cased bytes, values the bytes as sent.

    ``body`` is empty until the request's last byte has arrived; a route that reads no body
    (``Route.reads_body``) is answered before then.
    """

    __slots__ = (
        "method", "path", "query_string", "headers", "client", "request_id", "received", "keep_alive",
        "path_params", "body", "on_answered", "_query",
    )  # fmt: skip

    def __init__(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        request_id: str,
        received: float,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.client = client
        self.request_id = request_id
        self.received = received  # perf_counter() when its head was complete
        self.keep_alive = keep_alive
        self.path_params: dict[str, str] = {}
        self.body = b""
        #: Called with the status once the request is answered, or 499 if its client left first:
        #: a route's own bookkeeping (a prediction's latency metrics, say), without a callback of its own.
        self.on_answered: Callable[[int], None] | None = None
        self._query: list[tuple[str, str]] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def content_type(self) -> str | None:
        value = self.header(b"content-type")
        return None if value is None else value.decode("latin-1")

    @property
    def query(self) -> dict[str, str]:
        """Query parameters; of a repeated name, the last value."""
        return dict(self._pairs())

    def query_list(self, name: str) -> list[str]:
        """Every value of a query parameter, in order."""
        return [value for key, value in self._pairs() if key == name]

    def _pairs(self) -> list[tuple[str, str]]:
        if self._query is None:
            self._query = parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True)
        return self._query
