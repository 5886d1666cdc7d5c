"""Answers each batch after a pause, without importing torch, so that its workers start fast:
for the autoscaling tests. Model YAML ``handler: {sleep_s}`` sets the pause (default 0.2 s); each
answer is the request's payload and the worker's pid.
"""

import os
import time


def handle(data, context):
    if data is None:
        return None
    section = context.model_yaml_config.get("handler") or {}
    time.sleep(float(section.get("sleep_s", 0.2)))
    return [f"{bytes(row.get('data') or row.get('body') or b'').decode()} {os.getpid()}" for row in data]
