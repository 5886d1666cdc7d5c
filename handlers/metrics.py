"""``context.metrics``: TorchServe's handler-side metrics API (ts/metrics/metric_cache_*.py).

Handlers call the same methods with the same defaults and get the same validation as in
TorchServe. What differs is the transport: TorchServe prints each update as a ``[METRICS]...``
log line that the frontend scrapes from the worker's stdout; here each update becomes a plain
record that the worker drains (``MetricsCache.drain``) into the meta of its next reply frame.

Validation failures inside ``add_or_update`` (negative counter, wrong number of dimension
values) are logged and the update dropped, not raised: TorchServe does that, and handlers
written for it do not expect a metrics call to fail their batch.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


class MetricTypes(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Dimension:
    """One ``name:value`` pair of a metric."""

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"

    def __repr__(self) -> str:
        return f"Dimension({self.name!r}, {self.value!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"Name": self.name, "Value": self.value}


# TorchServe's errors (ts/metrics/metric_cache_errors.py), with the same bases so handlers'
# ``except KeyError`` / ``except ValueError`` keep working.
class GeneralMetricsCacheError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(f"Generic error: {message}")


class MetricsCacheIOError(IOError):
    def __init__(self, message: str) -> None:
        super().__init__(f"Error reading file: {message}")


class MetricsCacheTypeError(TypeError):
    pass


class MetricsCacheValueError(ValueError):
    pass


class MetricsCacheKeyError(KeyError):
    pass


#: Short unit names handlers pass -> the names that reach the frontend (ts/metrics/unit.py).
UNITS: dict[str | None, str] = {
    "ms": "Milliseconds",
    "s": "Seconds",
    "percent": "Percent",
    "count": "Count",
    "MB": "Megabytes",
    "GB": "Gigabytes",
    "kB": "Kilobytes",
    "B": "Bytes",
    "": "unit",
    None: "unit",
}

#: TorchServe's default ``model_metrics`` (ts/configs/metrics.yaml): pre-declared, so handlers
#: can ``get_metric("HandlerTime", MetricTypes.GAUGE)`` as they can there.
DEFAULT_MODEL_METRICS: dict[str, list[dict[str, Any]]] = {
    "gauge": [
        {"name": "HandlerTime", "unit": "ms", "dimensions": ["ModelName", "Level"]},
        {"name": "PredictionTime", "unit": "ms", "dimensions": ["ModelName", "Level"]},
    ]
}

#: Records kept between drains at most; a handler recording from a background thread while no
#: batch arrives must not grow the worker without bound. The oldest go first.
MAX_PENDING = 10_000

Record = dict[str, Any]


def _check_type(value: Any, expected: type, message: str) -> None:
    if not isinstance(value, expected):
        raise MetricsCacheTypeError(message)


class CachingMetric:
    """One declared metric: a name, a unit, a type and the names of its dimensions."""

    def __init__(
        self, metric_name: str, unit: str, dimension_names: list[str] | None = None,
        metric_type: MetricTypes = MetricTypes.COUNTER, sink: MetricsCache | None = None,
    ) -> None:  # fmt: skip
        self.metric_name = metric_name
        self.unit = UNITS.get(unit, unit)
        self.dimension_names = list(dimension_names or [])
        self.metric_type = metric_type
        # Where updates go; a metric built by hand outside a cache logs them as TorchServe does.
        self._sink = sink

    def add_or_update(self, value: float, dimension_values: list[Any] = [], request_id: str | None = "") -> None:  # noqa: B006 - TorchServe's signature
        """Record one value for the given dimension values (in ``dimension_names`` order)."""
        try:
            if dimension_values is None or len(dimension_values) != len(self.dimension_names):
                raise ValueError(
                    f"Dimension values: {dimension_values} should correspond to Dimension names: {self.dimension_names}"
                )
            number = float(value)
            if self.metric_type == MetricTypes.COUNTER and number < 0:
                raise ValueError("Counter metric update value cannot be negative")
        except (TypeError, ValueError) as exc:
            logger.error("[METRICS]Failed to update metric with name:%s with value: %r: %s", self.metric_name, value, exc)
            return
        record: Record = {
            "name": self.metric_name,
            "unit": self.unit,
            "type": self.metric_type.value,
            "value": number,
            "dimensions": [[str(n), str(v)] for n, v in zip(self.dimension_names, dimension_values)],
            "request_id": str(request_id) if request_id else "",
        }
        if self._sink is not None:
            self._sink._record(record)
        else:
            logger.info("[METRICS]%s", record)

    def update(self, value: float, request_id: str | None = "", dimensions: list[Dimension] = []) -> None:  # noqa: B006
        """Back-compat (TorchServe < 0.8): the given dimensions replace the declared names."""
        self.dimension_names = [dim.name for dim in dimensions]
        self.add_or_update(value, [dim.value for dim in dimensions], request_id)


class MetricsCache:
    """The object handlers see as ``context.metrics`` (TorchServe's MetricsCacheYamlImpl)."""

    def __init__(
        self, model_name: str | None = None, request_ids: Mapping[int, str] | str | None = None,
        model_metrics: Mapping[str, Iterable[Mapping[str, Any]]] | None = DEFAULT_MODEL_METRICS,
    ) -> None:  # fmt: skip
        self.model_name = model_name
        # TorchServe: a dict {batch index: request id} during a batch, one id string at load.
        self.request_ids = request_ids
        self.cache: dict[MetricTypes, dict[str, CachingMetric]] = {}
        self._pending: deque[Record] = deque(maxlen=MAX_PENDING)
        self._lock = threading.Lock()
        self._overflowed = False
        if model_metrics:
            self.initialize_cache(model_metrics)

    def initialize_cache(self, model_metrics: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Declare the metrics of a ``model_metrics`` YAML section ({type: [{name, unit, dimensions}]})."""
        for type_name, metrics in model_metrics.items():
            try:
                metric_type = MetricTypes(type_name)
            except ValueError:
                raise MetricsCacheKeyError(f"Invalid metric type: {type_name}") from None
            for spec in metrics or ():
                try:
                    self.add_metric_to_cache(spec["name"], spec["unit"], list(spec["dimensions"]), metric_type)
                except KeyError as exc:
                    raise MetricsCacheKeyError(f"Key not found in cache spec: {exc}") from None

    def set_request_ids(self, request_ids: Mapping[int, str] | str | None) -> None:
        self.request_ids = request_ids

    # -- declaring and looking up ----------------------------------------------------------------

    def add_metric_to_cache(
        self, metric_name: str, unit: str, dimension_names: list[str] = [],  # noqa: B006
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> CachingMetric:  # fmt: skip
        """Declare a metric, replacing one of the same type and name."""
        _check_type(metric_name, str, "`metric_name` must be a str")
        _check_type(unit, str, "`unit` must be a str")
        _check_type(metric_type, MetricTypes, "`metric_type` must be a MetricTypes enum")
        if dimension_names:
            _check_type(dimension_names, list, "`dimension_names` should be a list of dimension name strings")
        metric = CachingMetric(metric_name, unit, dimension_names, metric_type, sink=self)
        self.cache.setdefault(metric_type, {})[metric_name] = metric
        return metric

    def get_metric(self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER) -> CachingMetric:
        _check_type(metric_name, str, "`metric_name` must be a str")
        _check_type(metric_type, MetricTypes, "`metric_type` must be a MetricTypes enum")
        try:
            return self.cache[metric_type][metric_name]
        except KeyError:
            raise MetricsCacheKeyError(f"Metric of type '{metric_type}' and name '{metric_name}' doesn't exist") from None

    def cache_keys(self) -> list[str]:
        return [f"{t.value}:{name}" for t, metrics in self.cache.items() for name in metrics]

    # -- the shorthands handlers call -------------------------------------------------------------

    def add_metric(
        self, name: str, value: float, unit: str, idx: int | None = None,
        dimensions: list[Dimension] = [], metric_type: MetricTypes = MetricTypes.COUNTER,  # noqa: B006
    ) -> None:  # fmt: skip
        self._add(name, value, unit, idx, dimensions, metric_type)

    def add_counter(self, name: str, value: float, idx: int | None = None, dimensions: list[Dimension] = []) -> None:  # noqa: B006
        self._add(name, value, "count", idx, dimensions, MetricTypes.COUNTER)

    def add_time(
        self, name: str, value: float, idx: int | None = None, unit: str = "ms",
        dimensions: list[Dimension] = [], metric_type: MetricTypes = MetricTypes.GAUGE,  # noqa: B006
    ) -> None:  # fmt: skip
        if unit not in ("ms", "s"):
            raise MetricsCacheValueError("the unit for a timed metric should be one of ['ms', 's']")
        self._add(name, value, unit, idx, dimensions, metric_type)

    def add_size(
        self, name: str, value: float, idx: int | None = None, unit: str = "MB",
        dimensions: list[Dimension] = [], metric_type: MetricTypes = MetricTypes.GAUGE,  # noqa: B006
    ) -> None:  # fmt: skip
        if unit not in ("MB", "kB", "GB", "B"):
            raise ValueError("The unit for size based metric is one of ['MB','kB', 'GB', 'B']")
        self._add(name, value, unit, idx, dimensions, metric_type)

    def add_percent(
        self, name: str, value: float, idx: int | None = None,
        dimensions: list[Dimension] = [], metric_type: MetricTypes = MetricTypes.GAUGE,  # noqa: B006
    ) -> None:  # fmt: skip
        self._add(name, value, "percent", idx, dimensions, metric_type)

    def add_error(self, name: str, value: float, dimensions: list[Dimension] = []) -> None:  # noqa: B006
        # TorchServe: no request id, and Level:Error instead of ModelName/Level:Model.
        dims = self._with_defaults(None, dimensions)
        metric = self._get_or_add(name, "", dims, MetricTypes.COUNTER)
        metric.add_or_update(value, [dim.value for dim in dims])

    # -- internals --------------------------------------------------------------------------------

    def _add(
        self, name: str, value: float, unit: str, idx: int | None, dimensions: list[Dimension], metric_type: MetricTypes
    ) -> None:
        request_id = self._request_id(idx)
        dims = self._with_defaults(request_id, dimensions)
        metric = self._get_or_add(name, unit, dims, metric_type)
        metric.add_or_update(value, [dim.value for dim in dims], request_id)

    def _request_id(self, idx: int | None) -> str | None:
        """The id of request ``idx`` of the batch; with no (known) idx, all ids joined by ','."""
        ids = self.request_ids
        if isinstance(ids, Mapping):
            if idx is not None and idx in ids:
                return str(ids[idx])
            return ",".join(str(v) for v in ids.values())
        return ids

    def _with_defaults(self, request_id: str | None, dimensions: list[Dimension]) -> list[Dimension]:
        # A copy: TorchServe appends to the caller's list (its mutable default included), which
        # would leak one call's defaults into the next.
        dims = list(dimensions or [])
        names = {dim.name for dim in dims}
        if request_id is None:
            # TorchServe's rule: a metric with no request id is an error-level one.
            if "Level" not in names:
                dims.append(Dimension("Level", "Error"))
        else:
            if "ModelName" not in names:
                dims.append(Dimension("ModelName", self.model_name))
            if "Level" not in names:
                dims.append(Dimension("Level", "Model"))
        return dims

    def _get_or_add(self, name: str, unit: str, dims: list[Dimension], metric_type: MetricTypes) -> CachingMetric:
        # An existing metric keeps its unit and dimension names, as in TorchServe.
        try:
            return self.get_metric(name, metric_type)
        except MetricsCacheKeyError:
            return self.add_metric_to_cache(name, unit, [dim.name for dim in dims], metric_type)

    def _record(self, record: Record) -> None:
        with self._lock:
            if len(self._pending) == MAX_PENDING and not self._overflowed:
                self._overflowed = True
                logger.warning("[METRICS]more than %d metric updates between replies; dropping the oldest", MAX_PENDING)
            self._pending.append(record)  # the deque drops the oldest when full

    def drain(self) -> list[Record]:
        """Everything recorded since the last drain, oldest first, as JSON-able dicts."""
        with self._lock:
            records = list(self._pending)
            self._pending.clear()
            self._overflowed = False
        return records
