"""Echoes each request's payload back; the simplest function entry point."""


def handle(data, context):
    if data is None:  # TorchServe calls a function entry point once at load time with no data
        return None
    return [row.get("data") or row.get("body") for row in data]
