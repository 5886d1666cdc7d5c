"""Metrics: TorchServe's names on /metrics, Prometheus histograms beside them, handler metrics.

TorchServe's families (``Requests2XX``/``4XX``/``5XX``, ``ts_inference_requests_total``,
``ts_inference_latency_microseconds``, ``ts_queue_latency_microseconds``, the ``QueueTime``,
``WorkerThreadTime`` and ``WorkerLoadTime`` gauges, handlers' metrics, system metrics) are written
as TorchServe writes them (``text``). marserve's own ``marserve_*`` families live in one
``CollectorRegistry`` per server (never prometheus-client's global one).

The recording calls are on the request path, so they only add to dicts and histograms; the
Prometheus objects for TorchServe's names are built when /metrics is scraped.
"""

from __future__ import annotations

import itertools
import math
import re
import socket
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..models.status import WorkerState
from ..workers.messages import Result
from . import text
from .text import DEFAULT_BUCKETS, Family, java_double

# Latency buckets in seconds, from a fast echo (sub-millisecond) to a slow batch (a minute).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, math.inf)
MODEL_LABELS = ("model_name", "model_version")
_PROMETHEUS_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_PREDICTION_LABELS = ("ModelName", "Level", "Hostname")


class Metrics:
    """The server's metrics, recorded by the request path and read by the metrics API."""

    def __init__(self, hostname: str | None = None) -> None:
        self.hostname = hostname or socket.gethostname()
        self.registry = CollectorRegistry()
        self._ts = _TorchServeMetrics(self.hostname)
        self._custom = _HandlerMetrics(self.hostname)
        self._torchserve: list[Callable[[], Iterable[Family]]] = [self._ts.families, self._custom.families]

        def histogram(name: str, doc: str, buckets: Iterable[float] = LATENCY_BUCKETS) -> _Histogram:
            family = _Histogram(name, doc, tuple(buckets))
            self.registry.register(family)
            return family

        self.request_seconds = histogram(
            "marserve_request_duration_seconds", "Inference request latency, from receipt to response."
        )
        self.queue_seconds = histogram(
            "marserve_queue_duration_seconds", "Time inference requests wait in the queue before dispatch."
        )
        self.handler_seconds = histogram(
            "marserve_handler_duration_seconds", "Time the handler takes for one batch (PredictionTime)."
        )
        self.batch_size = histogram("marserve_batch_size", "Requests per batch sent to a worker.", BATCH_BUCKETS)
        self.load_seconds = histogram(
            "marserve_model_load_duration_seconds", "Time from a worker's start to its model being loaded."
        )
        self.first_byte_seconds = histogram(
            "marserve_time_to_first_byte_seconds", "Streamed answers: time from receipt to the first piece."
        )
        self._pieces = _ModelCounter("marserve_stream_pieces", "Pieces of streamed answers sent to clients.")
        self.registry.register(self._pieces)
        self._workers = _WorkerStates()
        self.registry.register(self._workers)
        self._scale_events = _ScaleEvents()
        self.registry.register(self._scale_events)
        self._refused = _Refusals()
        self.registry.register(self._refused)
        self._responses = _ModelResponses()
        self.registry.register(self._responses)
        # Rollouts (server/models/rollout.py): how each request's version was chosen, and what the
        # shadow's copies came to.
        self._routed = _LabelledCounter(
            "marserve_routed_requests", "Inference requests by the way their model version was chosen.", (*MODEL_LABELS, "route")
        )
        self.registry.register(self._routed)
        self._shadowed = _LabelledCounter(
            "marserve_shadow_requests", "Shadow copies of requests by outcome (match, differ, answered, error).", (*MODEL_LABELS, "outcome")
        )
        self.registry.register(self._shadowed)
        self.shadow_seconds = histogram(
            "marserve_shadow_duration_seconds", "Shadow copies: time from the copy being queued to its answer."
        )
        # Per model version: its histogram series and its PredictionTime gauge's label values.
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def _model(self, name: str, version: str) -> tuple[Any, ...]:
        children = self._children.get((name, version))
        if children is None:
            children = tuple(
                h.series((name, version))
                for h in (self.request_seconds, self.queue_seconds, self.handler_seconds, self.batch_size)
            ) + ((name, "Model", self.hostname), self._responses.series((name, version)))
            self._children[(name, version)] = children
        return children

    # -- recording (request path) ------------------------------------------------------------------

    def response(self, status: int) -> None:
        """One HTTP response on any port (TorchServe's Requests2XX/4XX/5XX)."""
        self._ts.status[_status_class(status)] += 1

    def refused(self, reason: str) -> None:
        """A connection or message refused before it was a request (``marserve_http_refused_total``)."""
        self._refused.counts[reason] += 1

    def inference(
        self, name: str, url_version: str | None, version: str, seconds: float, queue_seconds: float, status: int | None = None
    ) -> None:
        """One inference request that reached its model's queue, answered after ``seconds`` with
        HTTP ``status`` (None: a caller that does not say, counted in no status class)."""
        key = (name, url_version or "default")
        ts = self._ts
        ts.requests[key] += 1
        ts.latency_us[key] += seconds * 1e6
        ts.queue_us[key] += queue_seconds * 1e6
        request, queue, _, _, _, responses = self._model(name, version)
        request.observe(seconds)
        if status is not None:
            responses[_CLASS_INDEX[_status_class(status)]] += 1
        if queue_seconds:
            queue.observe(queue_seconds)
            ts.gauges["QueueTime"][()] = queue_seconds * 1000

    def stream(self, name: str, version: str, first_byte: float, pieces: int) -> None:
        """One streamed answer, ended: its time to the first piece, and how many pieces it had."""
        self.first_byte_seconds.series((name, version)).observe(first_byte)
        self._pieces.counts[(name, version)] += pieces

    def batch(self, name: str, version: str, size: int, round_trip: float, result: Result | None) -> None:
        """One batch sent to a worker; ``result`` is its reply (None: the worker died with it)."""
        _, _, handler, batch_size, prediction_labels, _ = self._model(name, version)
        batch_size.observe(size)
        if result is None:
            return
        handler_ms = result.handler_ms
        if handler_ms is not None:
            handler.observe(handler_ms / 1000)
            self._ts.gauges["WorkerThreadTime"][()] = max(0.0, round_trip * 1000 - handler_ms)
        prediction_ms = result.prediction_ms
        if prediction_ms is not None:
            # What a handler's own gauge would record, without building and parsing its record.
            self._custom.set("PredictionTime", "gauge", "Milliseconds", _PREDICTION_LABELS, prediction_labels, round(prediction_ms, 2))
        for metric in result.metrics or ():
            self._custom.record(metric)

    def routed(self, name: str, version: str, route: str) -> None:
        """One request sent to ``version`` by ``route``: explicit, label, split, default or shadow."""
        self._routed.counts[(name, version, route)] += 1

    def shadowed(self, name: str, version: str, outcome: str, seconds: float | None) -> None:
        """One shadow copy ended with ``outcome``; ``seconds`` its latency when it was answered."""
        self._shadowed.counts[(name, version, outcome)] += 1
        if seconds is not None:
            self.shadow_seconds.series((name, version)).observe(seconds)

    def worker_loaded(self, name: str, version: str, worker_id: str, seconds: float) -> None:
        self.load_seconds.series((name, version)).observe(seconds)
        worker = f"W-{worker_id}-{name}_{version}"
        self._ts.gauges["WorkerLoadTime"][(("WorkerName", worker),)] = seconds * 1000

    def scaled(self, name: str, version: str, direction: str, reason: str) -> None:
        """A worker autoscaling added ("up") or removed ("down"), and why."""
        self._scale_events.counts[(name, version, direction, reason)] += 1

    def watch_workers(self, source: Callable[[], Iterable[tuple[str, str, WorkerState]]]) -> None:
        """``source`` lists (model, version, state) for every worker; read at scrape time."""
        self._workers.source = source

    def add_torchserve_families(self, source: Callable[[], Iterable[Family]]) -> None:
        """More families in TorchServe's text (the system metrics), read at scrape time."""
        self._torchserve.append(source)

    # -- reading ---------------------------------------------------------------------------------

    def responses_by_class(self) -> dict[int, int]:
        """Responses on all ports so far by status class (2, 4, 5: ``Requests2XX`` ...), a copy."""
        return dict(self._ts.status)

    def refusals(self) -> dict[str, int]:
        """``marserve_http_refused_total`` so far, by reason, a copy."""
        return dict(self._refused.counts)

    def responses_by_model(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """``marserve_inference_responses_total`` so far per model version: 2xx, 4xx, 5xx, copies."""
        return {key: (a, b, c) for key, (a, b, c) in list(self._responses.counts.items())}

    def render(self, names: list[str]) -> tuple[bytes, str]:
        """The metrics text; with ``names`` (the API's ``name[]=``), only those metric families."""
        wanted = set(names)
        families = [f for source in self._torchserve for f in source() if not wanted or f.name in wanted]
        own: Any = self.registry
        if wanted:
            own = _Only(m for m in self.registry.collect() if m.name in wanted)
        return text.render(families).encode() + generate_latest(own), CONTENT_TYPE_LATEST


class _Only:
    """Already collected metrics, in the shape generate_latest reads."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> list[Metric]:
        return self._metrics


def _status_class(status: int) -> int:
    if 200 <= status < 300:
        return 2
    if 400 <= status < 500:
        return 4
    return 5  # TorchServe counts everything that is neither 2xx nor 4xx as 5XX


class _TorchServeMetrics:
    """TorchServe's frontend metrics, kept as plain numbers and written out when scraped."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.status = {2: 0, 4: 0, 5: 0}
        self.requests: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.latency_us: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.queue_us: defaultdict[tuple[str, str], float] = defaultdict(float)
        # name -> {extra labels (before Level and Hostname, as TorchServe orders them): value}
        self.gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = {
            "QueueTime": {},
            "WorkerThreadTime": {},
            "WorkerLoadTime": {},
        }

    def families(self) -> Iterator[Family]:
        host = (("Level", "Host"), ("Hostname", self.hostname))
        for cls in (2, 4, 5):
            family = Family(f"Requests{cls}XX", "counter", "Count")
            family.add(host, float(self.status[cls]))
            yield family
        per_model = [
            ("ts_inference_requests_total", "Count", self.requests),
            ("ts_inference_latency_microseconds", "Microseconds", self.latency_us),
            ("ts_queue_latency_microseconds", "Microseconds", self.queue_us),
        ]
        for name, unit, values in per_model:
            family = Family(name, "counter", unit)
            for (model, version), value in list(values.items()):
                family.add((("model_name", model), ("model_version", version), ("hostname", self.hostname)), value)
            yield family
        for name, series in self.gauges.items():
            family = Family(name, "gauge", "Milliseconds")
            for extra, value in list(series.items()):
                family.add((*extra, *host), value)
            yield family


class _WorkerStates(Collector):
    """``marserve_workers{model_name, model_version, state}``: counted when scraped, never stale."""

    STATES = (WorkerState.READY, WorkerState.STARTING, WorkerState.RESTARTING, WorkerState.FAILED, WorkerState.STOPPING)

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str, WorkerState]]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        counts: defaultdict[tuple[str, str], dict[WorkerState, int]] = defaultdict(lambda: dict.fromkeys(self.STATES, 0))
        for name, version, state in self.source():
            if state in self.STATES:
                counts[(name, version)][state] += 1
        family = GaugeMetricFamily("marserve_workers", "Worker processes by state.", labels=[*MODEL_LABELS, "state"])
        for (name, version), states in counts.items():
            for state, count in states.items():
                family.add_metric([name, version, state], count)
        yield family


class _ScaleEvents(Collector):
    """``marserve_worker_scale_events_total{model_name, model_version, direction, reason}``:
    workers autoscaling added (``up``) or removed (``down``), by the signal that decided it."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "marserve_worker_scale_events",
            "Workers autoscaling added or removed, by direction and reason.",
            labels=[*MODEL_LABELS, "direction", "reason"],
        )
        for labels, count in list(self.counts.items()):
            family.add_metric(list(labels), count)
        yield family


class _ModelCounter(Collector):
    """A counter per model version, kept as plain numbers."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.counts: defaultdict[tuple[str, str], int] = defaultdict(int)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=list(MODEL_LABELS))
        for (name, version), count in list(self.counts.items()):
            family.add_metric([name, version], count)
        yield family


class _LabelledCounter(Collector):
    """A counter family with fixed label names, kept as plain numbers per label values."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.counts: defaultdict[tuple[str, ...], int] = defaultdict(int)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for values, count in list(self.counts.items()):
            family.add_metric(list(values), count)
        yield family


#: Where a status class (``_status_class``) counts in a model version's ``_ModelResponses`` list.
_CLASS_INDEX = {2: 0, 4: 1, 5: 2}


class _ModelResponses(Collector):
    """``marserve_inference_responses_total{model_name, model_version, code}``: inference answers per
    model version by status class. One list of three numbers per version, which ``Metrics._model``
    hands the request path, so that counting one is an index and an add."""

    CODES = ("2xx", "4xx", "5xx")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = {}

    def series(self, labels: tuple[str, str]) -> list[int]:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0, 0, 0]
        return counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "marserve_inference_responses", "Inference answers per model version by status class.", labels=[*MODEL_LABELS, "code"]
        )
        for (name, version), counts in list(self.counts.items()):
            for code, count in zip(self.CODES, counts):
                family.add_metric([name, version, code], count)
        yield family


class _Refusals(Collector):
    """``marserve_http_refused_total{reason}``: what the front door refused before it was a request."""

    def __init__(self) -> None:
        self.counts: defaultdict[str, int] = defaultdict(int)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "marserve_http_refused", "Connections and messages refused before they were requests.", labels=["reason"]
        )
        for reason, count in list(self.counts.items()):
            family.add_metric([reason], count)
        yield family


class _HandlerMetrics:
    """Metrics handlers record through ``context.metrics``, with their dimensions as labels.

    Counters keep adding; gauges keep the last value; histograms count observations in
    simpleclient's default buckets, as TorchServe's Prometheus mode does.
    """

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        # name -> (type, unit, label names, {label values: value or [sum, count]})
        self.series: dict[str, tuple[str, str, tuple[str, ...], dict[tuple[str, ...], Any]]] = {}
        # Sanitised names, by the raw name and dimension names a handler sent (the same every batch).
        self._names: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}

    def record(self, metric: dict[str, Any]) -> None:
        try:
            dimensions = metric.get("dimensions", ())
            raw = (str(metric["name"]), tuple(str(k) for k, _ in dimensions))
            names = self._names.get(raw)
            if names is None:
                names = (_PROMETHEUS_NAME.sub("_", raw[0]), tuple(_PROMETHEUS_NAME.sub("_", k) for k in raw[1]) + ("Hostname",))
                self._names[raw] = names
            name, labels = names
            kind = metric.get("type", "counter")
            values = tuple(str(v) for _, v in dimensions) + (self.hostname,)
            value = float(metric["value"])
        except (KeyError, TypeError, ValueError):
            return  # a malformed report from a handler must not break the request path
        self.set(name, kind, str(metric.get("unit", "")), labels, values, value)

    def set(self, name: str, kind: str, unit: str, labels: tuple[str, ...], values: tuple[str, ...], value: float) -> None:
        """Record one point of a metric whose name and labels are already Prometheus-safe."""
        entry = self.series.get(name)
        if entry is None or entry[0] != kind or entry[2] != labels:
            # A metric re-declared with other dimensions replaces the old series, as in TorchServe's cache.
            entry = (kind, unit, labels, {})
            self.series[name] = entry
        points = entry[3]
        if kind == "counter":
            points[values] = points.get(values, 0.0) + value
        elif kind == "histogram":
            buckets = points.get(values)
            if buckets is None:
                buckets = points[values] = [0.0, 0] + [0] * len(DEFAULT_BUCKETS)  # sum, count, buckets
            buckets[0] += value
            buckets[1] += 1
            buckets[2 + bisect_left(DEFAULT_BUCKETS, value)] += 1
        else:
            points[values] = value

    def families(self) -> Iterator[Family]:
        for name, (kind, unit, labels, points) in list(self.series.items()):
            family = Family(name, kind if kind in ("counter", "gauge", "histogram") else "gauge", unit)
            for values, value in list(points.items()):
                sample_labels = tuple(zip(labels, values))
                if kind != "histogram":
                    family.add(sample_labels, value)
                    continue
                total, count, *counts = value
                for bound, cumulative in zip(DEFAULT_BUCKETS, itertools.accumulate(counts)):
                    family.add((*sample_labels, ("le", java_double(bound))), float(cumulative), "_bucket")
                family.add(sample_labels, float(count), "_count")
                family.add(sample_labels, total, "_sum")
            yield family


class _Histogram(Collector):
    """A histogram family labelled by model and version, kept as plain bucket counts.

    The request path observes four histograms per request; prometheus-client's ``Histogram``
    takes a lock and walks its buckets for each observation, this one bisects and adds (the
    frontend records from one thread). Cumulative counts are built when /metrics is scraped.
    """

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = buckets if buckets[-1] == math.inf else (*buckets, math.inf)
        self._series: dict[tuple[str, str], _Series] = {}

    def series(self, labels: tuple[str, str]) -> _Series:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(self.bounds)
        return series

    def snapshot(self) -> dict[tuple[str, str], tuple[tuple[int, ...], float]]:
        """Each series' observations so far, per bucket of ``bounds`` (not cumulative), and their
        sum: copies, for readers that difference two snapshots (the dashboard)."""
        return {labels: (tuple(series.counts), series.sum) for labels, series in list(self._series.items())}

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=MODEL_LABELS)
        for labels, series in list(self._series.items()):
            cumulative = itertools.accumulate(series.counts)
            buckets = [(floatToGoString(bound), count) for bound, count in zip(self.bounds, cumulative)]  # type: ignore[no-untyped-call]
            family.add_metric(list(labels), buckets, series.sum)
        yield family


class _Series:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value: Prometheus buckets are "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class NoMetrics(Metrics):
    """What the request path records into when the metrics API is off: nothing."""

    def response(self, status: int) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def stream(self, name: str, version: str, first_byte: float, pieces: int) -> None:
        pass

    def inference(
        self, name: str, url_version: str | None, version: str, seconds: float, queue_seconds: float, status: int | None = None
    ) -> None:
        pass

    def batch(self, name: str, version: str, size: int, round_trip: float, result: Result | None) -> None:
        pass

    def worker_loaded(self, name: str, version: str, worker_id: str, seconds: float) -> None:
        pass

    def routed(self, name: str, version: str, route: str) -> None:
        pass

    def shadowed(self, name: str, version: str, outcome: str, seconds: float | None) -> None:
        pass

    def scaled(self, name: str, version: str, direction: str, reason: str) -> None:
        pass
