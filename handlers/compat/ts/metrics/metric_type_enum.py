"""``ts.metrics.metric_type_enum``: ``MetricTypes`` (counter, gauge, histogram)."""

from handlers.metrics import MetricTypes

__all__ = ["MetricTypes"]
