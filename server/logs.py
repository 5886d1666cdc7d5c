"""Logging set-up for the server process: text or JSON lines, to the terminal or the log directory."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path

from .http.access_log import AccessLog, NoAccessLog, Sink
from .config import ServerConfig


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_formatter(config: ServerConfig) -> logging.Formatter:
    """The server log's lines: text, or one JSON object a line (``log_format``)."""
    if config.log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def access_log_to(stream: Sink, config: ServerConfig, owns_stream: bool = False) -> AccessLog:
    """The access log on ``stream``: one line a request, unless ``log_level`` is above INFO."""
    if logging.getLevelName(config.log_level) > logging.INFO:
        return NoAccessLog()
    return AccessLog(stream, config.log_format == "json", owns_stream)


class RotatingFile:
    """A text file rotated as ``logging.handlers.RotatingFileHandler`` rotates its file: before a
    write would take it past ``max_bytes``, ``name`` becomes ``name.1`` (``name.1`` becomes
    ``name.2``, ...) and only ``backups`` old files are kept. The access log writes through it."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._size = self._file.tell()

    def write(self, text: str) -> int:
        size = len(text.encode("utf-8", "surrogateescape"))
        if self._size + size <= self.max_bytes:
            self._file.write(text)
            self._size += size
            return len(text)
        # A batch of lines that does not fit: line by line, rotating where the file is full.
        for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
            line += "\n"
            line_size = len(line.encode("utf-8", "surrogateescape"))
            if self._size and self._size + line_size > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += line_size
        return len(text)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._size = 0


def configure_logging(config: ServerConfig, foreground: bool) -> AccessLog:
    """Foreground: every log to stderr. Background: TorchServe's files in ``log_location``:
    ``ts_log.log`` (server), ``access_log.log`` (one line a request) and ``model_log.log``
    (workers' stdout and stderr, each line prefixed with its model and worker id), each rotated
    at ``log_max_bytes`` with ``log_backup_count`` old files kept.

    Returns the access log, which bypasses ``logging`` for speed (see access_log.py).
    """
    formatter = log_formatter(config)
    root = logging.getLogger()
    root.setLevel(config.log_level)
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        root.handlers[:] = [handler]
        return access_log_to(sys.stderr, config)
    directory = Path(config.log_location)
    directory.mkdir(parents=True, exist_ok=True)

    def file_handler(name: str) -> logging.Handler:
        handler = logging.handlers.RotatingFileHandler(
            directory / name, maxBytes=config.log_max_bytes, backupCount=config.log_backup_count, encoding="utf-8"
        )
        handler.setFormatter(formatter)
        return handler

    root.handlers[:] = [file_handler("ts_log.log")]
    model_log = logging.getLogger("marserve.model")
    model_log.handlers[:] = [file_handler("model_log.log")]
    model_log.propagate = False
    if logging.getLevelName(config.log_level) > logging.INFO:
        return NoAccessLog()
    stream = RotatingFile(directory / "access_log.log", config.log_max_bytes, config.log_backup_count)
    return access_log_to(stream, config, owns_stream=True)
