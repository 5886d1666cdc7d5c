"""``ts.metrics.metrics_store``: ``MetricsStore(request_ids, model_name)``, TorchServe's deprecated cache.

Handler tests still build mock contexts with it, so it is the current cache under the old
constructor, with no metrics declared up front.
"""

from __future__ import annotations

from collections.abc import Mapping

from handlers.metrics import MetricsCache


class MetricsStore(MetricsCache):
    def __init__(self, request_ids: Mapping[int, str] | str | None, model_name: str | None) -> None:
        super().__init__(model_name=model_name, request_ids=request_ids, model_metrics=None)


__all__ = ["MetricsStore"]
