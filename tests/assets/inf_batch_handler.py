"""Answers each request with its own body, its request id and the size of the batch it came in.

A body ``sleep:<seconds>`` makes its batch take that long. Every batch is recorded as a line
``<size> <body>|<body>|...`` in ``$TMPDIR/inf_batches.log``, so tests can see what ran.
"""

import os
import tempfile
import time


def handle(data, context):
    if data is None:
        return None
    bodies = [bytes(row.get("body") or b"").decode() for row in data]
    with open(os.path.join(tempfile.gettempdir(), "inf_batches.log"), "a") as log:
        log.write(f"{len(data)} {'|'.join(bodies)}\n")
    for body in bodies:
        if body.startswith("sleep:"):
            time.sleep(float(body.partition(":")[2]))
    return [
        {"batch": len(data), "body": body, "request_id": context.get_request_id(i)} for i, body in enumerate(bodies)
    ]
