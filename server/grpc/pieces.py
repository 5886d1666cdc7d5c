"""A streamed answer's pieces as an async iterator: the ``PieceSink`` a gRPC call attaches to a
``StreamReply`` (server/models/batching.py), as the HTTP connection attaches its writer."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from grpc import StatusCode

from .calls import Failure


class Pieces:
    """Collects pieces as the worker sends them; the call takes them as the client reads.

    At most ``limit`` bytes may wait for a slow reader (``max_response_size``, as over HTTP): past
    that the stream is cut and its producer told, as if the client had left. A stream that broke
    (its worker died, its handler failed, a gap longer than ``response_timeout``) ends the call
    with INTERNAL after the pieces that came.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ended = False
        self.overflowed = False
        self._error: str | None = None
        self._waiting: deque[bytes] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()

    # -- the sink (called by the StreamReply) ------------------------------------------------------

    def piece(self, data: bytes) -> None:
        if self.ended or self.overflowed:
            return
        self._waiting.append(data)
        self._bytes += len(data)
        if self._bytes > self.limit:
            self.overflowed = True
        self._wake.set()

    def end(self, error: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self._error = error
        self._wake.set()

    # -- the reader --------------------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            while self._waiting and not self.overflowed:
                data = self._waiting.popleft()
                self._bytes -= len(data)
                yield data
            if self.overflowed:
                raise Failure(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"streamed answer cut: more than {self.limit} bytes waited for the client to read them",
                )
            if self.ended:
                if self._error is not None:
                    raise Failure(StatusCode.INTERNAL, f"the streamed answer broke: {self._error}")
                return
            self._wake.clear()
            await self._wake.wait()
