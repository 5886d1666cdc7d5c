"""Answers each request with its worker's pid and its body's first line, after a pause it asks for.

A body's first line starts with the seconds to sleep (``"0.05 client-3-17"``); whatever follows
the first line is padding. A batch sleeps once, for the longest. Each first line is appended to
``$TMPDIR/fault_started.log`` before the pause, so tests know which requests reached a worker.
"""

import os
import tempfile
import time


def _seconds(line):
    try:
        return float(line.split(" ", 1)[0])
    except ValueError:
        return 0.0


def handle(data, context):
    if data is None:
        return None
    lines = [bytes(row.get("body") or b"")[:200].decode(errors="replace").split("\n", 1)[0] for row in data]
    with open(os.path.join(tempfile.gettempdir(), "fault_started.log"), "a") as log:
        log.write("".join(f"{line}\n" for line in lines))
    time.sleep(max(_seconds(line) for line in lines))
    return [{"pid": os.getpid(), "body": line} for line in lines]
