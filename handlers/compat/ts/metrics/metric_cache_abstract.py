"""``ts.metrics.metric_cache_abstract``: the cache's base class, for ``isinstance`` checks."""

from handlers.metrics import MetricsCache as MetricCacheAbstract

__all__ = ["MetricCacheAbstract"]
