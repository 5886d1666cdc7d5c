"""``context.metrics``: TorchServe's handler-side metrics API, and its records in the worker's reply."""

from __future__ import annotations

import json
import logging
import subprocess
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from handlers.context import Context
from handlers.metrics import (
    CachingMetric,
    Dimension,
    MetricsCache,
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricsCacheValueError,
    MetricTypes,
)
from server.workers.child.service import Service
from server.workers.messages import Predict
from server.workers.messages import Request as PredictRequest

ROOT = Path(__file__).resolve().parents[2]
TS_PYTHON = ROOT / ".venv-torchserve" / "bin" / "python"
MODEL_DIMS = [["ModelName", "m"], ["Level", "Model"]]


def batch_cache() -> MetricsCache:
    """A cache as a worker holds it during a batch of two requests."""
    return MetricsCache("m", request_ids={0: "id-0", 1: "id-1"})


def only(cache: MetricsCache) -> dict[str, Any]:
    records = cache.drain()
    assert len(records) == 1, records
    return records[0]


def test_shorthands_types_units_and_default_dimensions() -> None:
    cache = batch_cache()
    cache.add_counter("Hits", 2)
    cache.add_time("Lat", 1.5)
    cache.add_time("LatS", 3, unit="s")
    cache.add_size("Mem", 10)
    cache.add_size("Tiny", 10, unit="kB")
    cache.add_percent("Util", 50)
    cache.add_metric("Generic", 7, "MB")
    cache.add_metric("Custom", 1, "widgets", metric_type=MetricTypes.HISTOGRAM)
    got = {r["name"]: (r["unit"], r["type"], r["value"]) for r in cache.drain()}
    assert got == {
        "Hits": ("Count", "counter", 2.0),
        "Lat": ("Milliseconds", "gauge", 1.5),
        "LatS": ("Seconds", "gauge", 3.0),
        "Mem": ("Megabytes", "gauge", 10.0),
        "Tiny": ("Kilobytes", "gauge", 10.0),
        "Util": ("Percent", "gauge", 50.0),
        "Generic": ("Megabytes", "counter", 7.0),
        "Custom": ("widgets", "histogram", 1.0),
    }
    cache.add_counter("Hits", 1, dimensions=[Dimension("Route", "a")])  # declared without Route: dropped
    cache.add_counter("Routed", 1, dimensions=[Dimension("Route", "a")])
    record = only(cache)
    assert record["dimensions"] == [["Route", "a"], *MODEL_DIMS]  # defaults appended, in order
    assert record["request_id"] == "id-0,id-1"


def test_units_and_unit_checks() -> None:
    cache = batch_cache()
    for short, long in [("", "unit"), ("GB", "Gigabytes"), ("B", "Bytes"), ("percent", "Percent"), ("count", "Count")]:
        cache.add_metric(f"U{short}", 1, short)
        assert only(cache)["unit"] == long
    with pytest.raises(MetricsCacheValueError):
        cache.add_time("T", 1, unit="us")
    with pytest.raises(ValueError):
        cache.add_size("S", 1, unit="TB")
    assert CachingMetric("x", None).unit == "unit"  # type: ignore[arg-type]


def test_given_defaults_are_kept_and_error_metrics() -> None:
    cache = batch_cache()
    dims = [Dimension("Level", "Custom")]
    cache.add_counter("C", 1, dimensions=dims)
    assert only(cache)["dimensions"] == [["Level", "Custom"], ["ModelName", "m"]]
    assert [d.name for d in dims] == ["Level"]  # the caller's list is left alone
    cache.add_error("Oops", 1)
    assert only(cache) == {
        "name": "Oops", "unit": "unit", "type": "counter", "value": 1.0,
        "dimensions": [["Level", "Error"]], "request_id": "",
    }  # fmt: skip


def test_idx_selects_a_request_id() -> None:
    cache = batch_cache()
    cache.add_counter("C", 1, idx=1)
    assert only(cache)["request_id"] == "id-1"
    cache.add_counter("C", 1, idx=7)  # unknown index: the whole batch, as in TorchServe
    assert only(cache)["request_id"] == "id-0,id-1"
    cache.request_ids = "load-uuid"  # at load time TorchServe has one made-up id
    cache.add_time("Init", 5)
    record = only(cache)
    assert record["request_id"] == "load-uuid" and record["dimensions"] == MODEL_DIMS
    cache.request_ids = None  # no request id: TorchServe makes it an error-level metric
    cache.add_counter("Orphan", 1)
    assert only(cache)["dimensions"] == [["Level", "Error"]]


def test_counters_reject_negatives_and_bad_values(caplog: pytest.LogCaptureFixture) -> None:
    cache = batch_cache()
    with caplog.at_level(logging.ERROR, logger="handlers.metrics"):
        cache.add_counter("C", -1)
        cache.add_counter("C", "many")  # type: ignore[arg-type]
    assert cache.drain() == []
    assert "cannot be negative" in caplog.text
    cache.add_time("G", -1)  # gauges may go down
    assert only(cache)["value"] == -1.0


def test_get_metric_and_add_to_cache() -> None:
    cache = batch_cache()
    with pytest.raises(MetricsCacheKeyError):
        cache.get_metric("Missing")
    with pytest.raises(KeyError):  # handlers catch it as a KeyError
        cache.get_metric("Missing", MetricTypes.GAUGE)
    assert cache.get_metric("HandlerTime", MetricTypes.GAUGE).dimension_names == ["ModelName", "Level"]
    metric = cache.add_metric_to_cache("Loss", "percent", ["Split", "ModelName", "Level"], MetricTypes.GAUGE)
    assert cache.get_metric("Loss", MetricTypes.GAUGE) is metric
    with pytest.raises(MetricsCacheKeyError):
        cache.get_metric("Loss")  # declared as a gauge, looked up as a counter
    metric.add_or_update(0.25, ["val", "m", "Model"], request_id="r1")
    assert only(cache) == {
        "name": "Loss", "unit": "Percent", "type": "gauge", "value": 0.25,
        "dimensions": [["Split", "val"], *MODEL_DIMS], "request_id": "r1",
    }  # fmt: skip
    metric.add_or_update(1, ["val"])  # wrong number of values: logged, dropped
    assert cache.drain() == []
    counter = cache.add_metric_to_cache("Seen", "count")
    counter.add_or_update(-3)
    assert cache.drain() == []
    with pytest.raises(MetricsCacheTypeError):
        cache.add_metric_to_cache("X", "ms", metric_type="gauge")  # type: ignore[arg-type]
    replaced = cache.add_metric_to_cache("Loss", "ms", [], MetricTypes.GAUGE)  # same name and type: replaced
    assert cache.get_metric("Loss", MetricTypes.GAUGE) is replaced


def test_update_backcompat_replaces_dimension_names() -> None:
    cache = batch_cache()
    metric = cache.add_metric_to_cache("Old", "ms", ["A"], MetricTypes.GAUGE)
    metric.update(3, request_id="r", dimensions=[Dimension("B", "x"), Dimension("C", 2)])
    assert only(cache)["dimensions"] == [["B", "x"], ["C", "2"]]
    assert metric.dimension_names == ["B", "C"]


def test_drain_takes_each_record_once() -> None:
    cache = batch_cache()
    assert cache.drain() == []
    cache.add_counter("C", 1)
    cache.add_counter("C", 2)
    records = cache.drain()
    assert [r["value"] for r in records] == [1.0, 2.0]
    assert cache.drain() == []
    json.dumps(records)  # plain JSON for the reply frame


def test_ts_import_names() -> None:
    from ts.metrics.caching_metric import CachingMetric as TsCachingMetric
    from ts.metrics.dimension import Dimension as TsDimension
    from ts.metrics.metric_cache_errors import MetricsCacheKeyError as TsKeyError
    from ts.metrics.metric_type_enum import MetricTypes as TsTypes
    from ts.metrics.metrics_store import MetricsStore
    from ts.metrics.unit import Units

    assert (TsCachingMetric, TsDimension, TsKeyError, TsTypes) == (
        CachingMetric, Dimension, MetricsCacheKeyError, MetricTypes,
    )  # fmt: skip
    assert Units().units["ms"] == "Milliseconds"
    store = MetricsStore({0: "r"}, "m")  # how TorchServe handlers' tests mock a context's metrics
    store.add_time("T", 1)
    assert only(store)["dimensions"] == MODEL_DIMS


def test_yaml_impl(tmp_path: Path) -> None:
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    config = tmp_path / "metrics.yaml"
    config.write_text("model_metrics:\n  histogram:\n    - {name: Sizes, unit: B, dimensions: [ModelName, Level]}\n")
    cache = MetricsCacheYamlImpl(str(config))
    assert cache.cache_keys() == []
    cache.initialize_cache()
    assert cache.cache_keys() == ["histogram:Sizes"]


SCENARIO = """
cache.add_counter("Hits", 2)
cache.add_counter("Hits", 3, idx=1)
cache.add_counter("Hits", -1)
cache.add_time("Lat", 1.5, None, "ms")
cache.add_time("HandlerTime", 4.25)
cache.add_size("Mem", 10, unit="kB", dimensions=[Dimension("Pool", "a")])
cache.add_percent("Util", 50, idx=0)
cache.add_metric("Gen", 7, "widgets", metric_type=MetricTypes.HISTOGRAM)
cache.add_error("Oops", 1)
cache.add_counter("Lvl", 1, dimensions=[Dimension("Level", "Custom")])
m = cache.add_metric_to_cache("Loss", "percent", ["Split", "ModelName", "Level"], MetricTypes.GAUGE)
m.add_or_update(0.25, ["val", "m", "Model"], request_id="r1")
m.add_or_update(1, ["val"])
m.update(3, request_id="r2", dimensions=[Dimension("B", "x")])
"""

TS_RUNNER = """
import logging, sys
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes
import ts, os
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("ts.metrics.caching_metric").addHandler(Keep())
logging.getLogger("ts.metrics.caching_metric").setLevel(logging.INFO)
cache = MetricsCacheYamlImpl(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
cache.initialize_cache()
cache.model_name = "m"
cache.set_request_ids({0: "id-0", 1: "id-1"})
exec(sys.stdin.read())
print("\\n".join(line for line in lines if line.startswith("[METRICS]") and "Failed" not in line))
"""


def _parse_ts_line(line: str) -> dict[str, Any]:
    """``[METRICS]Name.Unit:value|#dims|#type:T|#hostname:h,epoch[,ids]`` as one of our records."""
    head, dims, kind, host = line[len("[METRICS]") :].split("|#")
    name_unit, value = head.rsplit(":", 1)
    name, unit = name_unit.split(".", 1)
    request_id = host.split(",", 2)[2] if host.count(",") >= 2 else ""
    return {
        "name": name, "unit": unit, "type": kind.split(":")[1].lower(), "value": float(value),
        "dimensions": [d.split(":", 1) for d in dims.split(",")] if dims else [], "request_id": request_id,
    }  # fmt: skip


@pytest.mark.skipif(not TS_PYTHON.exists(), reason="needs .venv-torchserve (scripts/torchserve-venv)")
def test_same_records_as_torchserve() -> None:
    """The same calls give what TorchServe's own cache logs, line for line."""
    ts = subprocess.run(
        [str(TS_PYTHON), "-c", TS_RUNNER], input=SCENARIO, capture_output=True, text=True, check=True, cwd="/"
    )
    expected = [_parse_ts_line(line) for line in ts.stdout.splitlines() if line]
    cache = batch_cache()
    exec(textwrap.dedent(SCENARIO), {"cache": cache, "Dimension": Dimension, "MetricTypes": MetricTypes})
    assert cache.drain() == expected
    assert len(expected) == 11


# -- in the worker: the reply frame carries the records ---------------------------------------------


def _handler(data: list[dict[str, Any]], context: Any) -> list[Any]:
    context.metrics.add_counter("Seen", len(data), dimensions=[Dimension("Kind", "test")])
    if any(row.get("body") == "fail" for row in data):
        raise RuntimeError("boom")
    return [row["body"] for row in data]


def _service() -> Service:
    context = Context("m", "/tmp", None, 8, None, "0.12.0", metrics=MetricsCache("m", request_ids="load"))
    return Service(_handler, context, decode_input_request=True)


def _frame(*bodies: bytes) -> tuple[Predict, memoryview]:
    requests = [
        PredictRequest(f"id-{i}", [("Content-Type", "text/plain")], [("body", "text/plain", len(b))])
        for i, b in enumerate(bodies)
    ]
    return Predict(requests), memoryview(b"".join(bodies))


def test_reply_meta_carries_the_handlers_metrics() -> None:
    service = _service()
    result, parts = service.handle(*_frame(b"a", b"b"))
    assert result.code == 200 and [bytes(p) for p in parts] == [b"a", b"b"]
    assert result.metrics == [
        {
            "name": "Seen", "unit": "Count", "type": "counter", "value": 2.0,
            "dimensions": [["Kind", "test"], *MODEL_DIMS], "request_id": "id-0,id-1",
        }
    ]  # fmt: skip
    # PredictionTime travels as a plain number; the frontend records it.
    assert result.prediction_ms is not None and result.handler_ms is not None
    assert 0 <= result.prediction_ms <= result.handler_ms
    json.dumps(asdict(result))
    # A failed batch still reports what was recorded before the failure, and no PredictionTime.
    result, parts = service.handle(*_frame(b"fail"))
    assert result.code == 503 and parts == [] and result.prediction_ms is None
    assert result.metrics is not None
    assert [(m["name"], m["value"], m["request_id"]) for m in result.metrics] == [("Seen", 1.0, "id-0")]
