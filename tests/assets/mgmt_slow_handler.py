"""Echoes each payload after about a second, so tests can act while requests are in flight.

A payload that is an absolute path names a marker file, created when the request reaches the
handler: the test then knows the request is in flight instead of guessing with a sleep.
"""

import time
from pathlib import Path


def handle(data, context):
    if data is None:
        return None
    payloads = [bytes(row.get("data") or row.get("body")) for row in data]
    for payload in payloads:
        if payload.startswith(b"/"):
            Path(payload.decode()).touch()
    time.sleep(1.0)
    return payloads
