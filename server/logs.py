"""Logging set-up for the server process: text or JSON lines, to the terminal or the log directory."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from .http.access_log import AccessLog, NoAccessLog
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


def access_log_to(stream: TextIO, config: ServerConfig, owns_stream: bool = False) -> AccessLog:
    """The access log on ``stream``: one line a request, unless ``log_level`` is above INFO."""
    if logging.getLevelName(config.log_level) > logging.INFO:
        return NoAccessLog()
    return AccessLog(stream, config.log_format == "json", owns_stream)


def configure_logging(config: ServerConfig, foreground: bool) -> AccessLog:
    """Foreground: every log to stderr. Background: TorchServe's files in ``log_location``:
    ``ts_log.log`` (server), ``access_log.log`` (one line a request) and ``model_log.log``
    (workers' stdout and stderr, each line prefixed with its model and worker id).

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
        handler = logging.FileHandler(directory / name, encoding="utf-8")
        handler.setFormatter(formatter)
        return handler

    root.handlers[:] = [file_handler("ts_log.log")]
    model_log = logging.getLogger("marserve.model")
    model_log.handlers[:] = [file_handler("model_log.log")]
    model_log.propagate = False
    if logging.getLevelName(config.log_level) > logging.INFO:
        return NoAccessLog()
    stream = open(directory / "access_log.log", "a", encoding="utf-8")  # noqa: SIM115 - AccessLog closes it
    return access_log_to(stream, config, owns_stream=True)
