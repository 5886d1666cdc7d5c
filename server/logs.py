"""Logging set-up for the server process: text or JSON lines, to the terminal or the log directory."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

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


def configure_logging(config: ServerConfig, foreground: bool) -> AccessLog:
    """Foreground: every log to stderr. Background: TorchServe's files in ``log_location``:
    ``ts_log.log`` (server), ``access_log.log`` (one line a request) and ``model_log.log``
    (workers' stdout and stderr, each line prefixed with its model and worker id).

    Returns the access log, which bypasses ``logging`` for speed (see access_log.py).
    """
    formatter: logging.Formatter = (
        JsonFormatter() if config.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )  # fmt: skip
    root = logging.getLogger()
    root.setLevel(config.log_level)
    json_lines = config.log_format == "json"
    access_on = logging.getLevelName(config.log_level) <= logging.INFO
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        root.handlers[:] = [handler]
        return AccessLog(sys.stderr, json_lines) if access_on else NoAccessLog()
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
    if not access_on:
        return NoAccessLog()
    stream = open(directory / "access_log.log", "a", encoding="utf-8")  # noqa: SIM115 - AccessLog closes it
    return AccessLog(stream, json_lines, owns_stream=True)
