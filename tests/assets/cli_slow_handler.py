"""Answers after a pause, so that a stop can arrive while a request is in flight."""

import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(1.0)
    return [b"done" for _ in data]
