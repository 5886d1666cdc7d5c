"""Misbehaves on command: the first body in the batch other than "ok" picks how (raise, teapot, ...).

Every call appends ``<pid> <body>`` lines to ``$TMPDIR/inf_calls.log``, so tests can see which
requests a handler actually ran and in which process.
"""

import os
import tempfile
import time

from handlers.errors import PredictionException


def _log(data):
    with open(os.path.join(tempfile.gettempdir(), "inf_calls.log"), "a") as log:
        for row in data:
            body = row.get("body") or row.get("data") or b""
            log.write(f"{os.getpid()} {bytes(body).decode(errors='replace')}\n")


def handle(data, context):
    if data is None:
        return None
    _log(data)
    bodies = [bytes(row.get("body") or b"").decode() for row in data]
    command = next((body for body in bodies if body != "ok"), "ok")
    name, _, arg = command.partition(":")
    if name == "sleep":
        time.sleep(float(arg))
    elif name == "raise":
        raise ValueError("handler bug")
    elif name == "teapot":
        raise PredictionException("I am a teapot", 418)
    elif name == "oom":
        raise MemoryError()
    elif name == "cuda":
        raise RuntimeError("CUDA error: out of memory")
    elif name == "exit":
        os._exit(3)
    elif name == "count":
        return [os.getpid()] * (len(data) + 1)
    elif name == "notlist":
        return {"pid": os.getpid()}
    elif name == "unserializable":
        return [object() for _ in data]
    return [{"pid": os.getpid(), "body": bytes(row.get("body") or b"").decode()} for row in data]
