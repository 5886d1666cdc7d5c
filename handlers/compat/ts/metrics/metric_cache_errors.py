"""``ts.metrics.metric_cache_errors``: the errors the metrics cache raises."""

import yaml

from handlers.metrics import (
    GeneralMetricsCacheError,
    MetricsCacheIOError,
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricsCacheValueError,
)


class MetricsCachePyYamlError(yaml.YAMLError):
    """Raised for a metrics YAML that does not parse (only ``MetricsCacheYamlImpl`` reads one)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Error parsing file: {message}")


__all__ = [
    "GeneralMetricsCacheError",
    "MetricsCacheIOError",
    "MetricsCacheKeyError",
    "MetricsCachePyYamlError",
    "MetricsCacheTypeError",
    "MetricsCacheValueError",
]
