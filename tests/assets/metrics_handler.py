"""Records TorchServe-style custom metrics through context.metrics, then echoes.

A BaseHandler, so that its handle() records HandlerTime as TorchServe's does; no model to load.
"""

from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler


class MetricsHandler(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        self.context.metrics.add_counter("ImagesSeen", len(data), None, [Dimension("Color", "red")])
        self.context.metrics.add_time("DecodeTime", 12.5, None, "ms")
        return [row.get("body") for row in data]

    def inference(self, data, *args, **kwargs):
        return data

    def postprocess(self, data):
        return data
