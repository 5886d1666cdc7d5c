"""Takes about two seconds to load, so tests can act while a registration is still starting workers."""

import time


def handle(data, context):
    if data is None:
        time.sleep(2.0)
        return None
    return [row.get("data") or row.get("body") for row in data]
