"""Echoes each body; a body ``exit N`` makes the worker say why and exit with code N."""

import os
import sys


def handle(data, context):
    if data is None:
        return None
    bodies = [bytes(row.get("body") or b"") for row in data]
    for body in bodies:
        if body.startswith(b"exit "):
            code = int(body.split()[1])
            print(f"giving up: asked to exit with code {code}", file=sys.stderr, flush=True)
            os._exit(code)
    return bodies
