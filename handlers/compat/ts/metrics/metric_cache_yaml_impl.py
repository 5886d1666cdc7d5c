"""``ts.metrics.metric_cache_yaml_impl``: a metrics cache declared from a metrics YAML file.

Workers build ``context.metrics`` themselves; this is for handlers' own tests and tools that
construct the cache from a YAML file as TorchServe's worker does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from handlers.metrics import GeneralMetricsCacheError, MetricsCache, MetricsCacheIOError, MetricsCacheKeyError

from .metric_cache_errors import MetricsCachePyYamlError, MetricsCacheTypeError, MetricsCacheValueError


class MetricsCacheYamlImpl(MetricsCache):
    def __init__(self, config_file_path: str) -> None:
        # As in TorchServe: the file is parsed now, its metrics declared by initialize_cache().
        super().__init__(model_metrics=None)
        if not config_file_path:
            raise MetricsCacheTypeError("Config file not initialized")
        self.config_file_path = config_file_path
        try:
            with open(config_file_path, encoding="utf-8") as f:
                self._parsed_file: Any = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise MetricsCachePyYamlError(f"Error parsing file {config_file_path}: {exc}") from exc
        except OSError as exc:
            raise MetricsCacheIOError(f"Error reading file {config_file_path}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - TorchServe wraps anything else the same way
            raise GeneralMetricsCacheError(f"General error found in file {config_file_path}: {exc}") from exc

    def initialize_cache(self, model_metrics: Mapping[str, Iterable[Mapping[str, Any]]] | None = None) -> None:
        if model_metrics is None:
            try:
                model_metrics = self._parsed_file["model_metrics"]
            except (KeyError, TypeError) as exc:
                raise MetricsCacheKeyError(f"'model_metrics' key not found in yaml file: {exc}") from None
            if not model_metrics:
                raise MetricsCacheValueError("Missing `model_metrics` specification")
        super().initialize_cache(model_metrics)


__all__ = ["MetricsCacheYamlImpl"]
