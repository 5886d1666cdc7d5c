"""``ts.metrics``: the handler-side metrics API (``context.metrics``), implemented by ``handlers.metrics``.

TorchServe's package also imports its system-metrics collector here; marserve's frontend collects
those itself, so importing ``ts.metrics`` pulls in nothing beyond the API handlers use.
"""
