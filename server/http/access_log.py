"""The access log: one line a request, buffered and written a batch at a time.

At thousands of requests a second, a ``logging`` record, its formatting and a write for every
request cost more than the rest of the request's bookkeeping. Lines are formatted here with a
timestamp prefix cached per second, collected in memory and written at most ``FLUSH_SECONDS``
later (or as soon as ``MAX_LINES`` are waiting), and whatever is left is written on close.
The lines look like the server log's: ``<time> INFO marserve.access: <message>``, or one JSON
object a line with ``log_format=json``. A request of another protocol than HTTP/1.1 names it after
the request id, with the protocol's own status: ``... 404 0.84ms <id> grpc NOT_FOUND`` (in JSON,
``protocol`` and ``code`` beside ``message``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Protocol

LOGGER_NAME = "marserve.access"

log = logging.getLogger("marserve")


class Sink(Protocol):
    """Where access-log lines go: a text file, a terminal, a rotating file."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class AccessLog:
    FLUSH_SECONDS = 0.5
    MAX_LINES = 512

    def __init__(self, stream: Sink, json_lines: bool = False, owns_stream: bool = False) -> None:
        self._stream = stream
        self._json = json_lines
        self._owns_stream = owns_stream
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._prefix = ""

    def record(
        self,
        client: tuple[str, int] | None,
        method: str,
        path: str,
        status: int,
        started: float,
        request_id: str,
        protocol: str | None = None,
        code: str | None = None,
    ) -> None:
        """One request: client, request line, status, latency since ``started`` and request id;
        ``protocol`` (not HTTP/1.1: ``grpc``) and its own status ``code`` follow if given."""
        ms = (time.perf_counter() - started) * 1000
        message = f'{client[0] if client else "-"} "{method} {path}" {status} {ms:.2f}ms {request_id}'
        if protocol is not None:
            message = f"{message} {protocol} {code}" if code else f"{message} {protocol}"
        now = time.time()
        if self._json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
            entry = {"time": stamp, "level": "INFO", "logger": LOGGER_NAME, "message": message}
            if protocol is not None:
                entry["protocol"] = protocol
                if code:
                    entry["code"] = code
            line = json.dumps(entry) + "\n"
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = f"{self._prefix},{int(now * 1000) % 1000:03d} INFO {LOGGER_NAME}: {message}\n"
        self._lines.append(line)
        if len(self._lines) >= self.MAX_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a full disk or a closed stream must not fail requests
            log.error("could not write the access log: %s", exc)

    def close(self) -> None:
        self.flush()
        if self._owns_stream:
            self._stream.close()


class NoAccessLog(AccessLog):
    """What requests record into when the log level is above INFO: nothing."""

    def __init__(self) -> None:
        pass

    def record(
        self,
        client: tuple[str, int] | None,
        method: str,
        path: str,
        status: int,
        started: float,
        request_id: str,
        protocol: str | None = None,
        code: str | None = None,
    ) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
