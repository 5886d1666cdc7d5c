"""``ts.metrics.dimension``: ``Dimension(name, value)``."""

from handlers.metrics import Dimension

__all__ = ["Dimension"]
