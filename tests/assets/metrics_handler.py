"""Records TorchServe-style custom metrics through context.metrics, then echoes."""

from ts.metrics.dimension import Dimension


def handle(data, context):
    if data is None:
        return None
    context.metrics.add_counter("ImagesSeen", len(data), None, [Dimension("Color", "red")])
    context.metrics.add_time("DecodeTime", 12.5, None, "ms")
    return [row.get("body") for row in data]
