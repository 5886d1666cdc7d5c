"""``ts.metrics.caching_metric``: ``CachingMetric``, what ``context.metrics.get_metric`` returns."""

from handlers.metrics import CachingMetric

__all__ = ["CachingMetric"]
