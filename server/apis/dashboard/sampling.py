"""Rates and percentiles over the last minute, from the cumulative histograms metrics already keep.

Nothing here runs per request or on a timer. Each poll of the dashboard reads the counts of
``marserve_request_duration_seconds``, ``marserve_batch_size`` and ``marserve_inference_responses_total``
per model version (copies of a few short lists) and keeps the reading in a ring, at most one a second for the last minute: the
difference between the newest reading and the oldest in the ring is the last minute's traffic.
Every 5 s of polling also adds a point to a 5-minute history for the latency chart. When nobody
polls, nothing is read and nothing is kept up to date; the next poll starts again from there.

Percentiles are estimated from the bucket counts the way Prometheus' ``histogram_quantile`` does:
linear interpolation inside the bucket that holds the rank, 0 as the first bucket's lower bound,
and the highest finite bound for a rank in the ``+Inf`` bucket.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Key = tuple[str, str]  # (model name, version)
Counts = tuple[int, ...]  # observations per bucket, not cumulative

WINDOW_SECONDS = 60.0  # what rates and percentiles cover
SPACING_SECONDS = 0.9  # readings kept in the ring: at most about one a second
STEP_SECONDS = 5.0  # one history point per this much polling
GAP_SECONDS = 30.0  # polls further apart than this leave a gap in the history rather than a point
SPAN_SECONDS = 300.0  # how much history is kept


@dataclass(frozen=True, slots=True)
class Reading:
    """The cumulative counters at one moment."""

    at: float  # monotonic seconds
    wall: float  # epoch seconds
    latency: Mapping[Key, Counts]  # marserve_request_duration_seconds per model version
    batches: Mapping[Key, Counts]  # marserve_batch_size per model version
    responses: Mapping[int, int]  # responses on all ports by status class (2, 4, 5)
    refused: Mapping[str, int]  # marserve_http_refused_total by reason
    # marserve_inference_responses_total per model version: 2xx, 4xx, 5xx
    answers: Mapping[Key, Counts] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Figures:
    """One model version's traffic between two readings."""

    per_second: float
    p50: float | None  # seconds; None without requests
    p90: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class Point:
    """A history point: each model version's traffic over the ``STEP_SECONDS`` before ``wall``."""

    wall: float
    figures: Mapping[Key, Figures]


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile (0 < q < 1) of observations counted per bucket (upper ``bounds``, the
    last ``inf``), or None if there are none."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    lower = 0.0
    for bound, count in zip(bounds, counts):
        if count > 0 and cumulative + count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - cumulative) / count
        cumulative += count
        if not math.isinf(bound):
            lower = float(bound)
    return lower


def difference(new: Counts, old: Counts | None) -> list[int]:
    """Observations between two readings of one series (all of them if it is new since)."""
    if old is None:
        return list(new)
    return [max(0, a - b) for a, b in zip(new, old)]


def figures(bounds: Sequence[float], new: Counts, old: Counts | None, seconds: float) -> Figures:
    counts = difference(new, old)
    return Figures(
        per_second=sum(counts) / seconds if seconds > 0 else 0.0,
        p50=quantile(0.5, bounds, counts),
        p90=quantile(0.9, bounds, counts),
        p99=quantile(0.99, bounds, counts),
    )


class Sampler:
    """The ring of readings and the history, advanced only by ``poll``."""

    def __init__(self, read: Callable[[], Reading], latency_bounds: Sequence[float]) -> None:
        self._read = read
        self._bounds = tuple(latency_bounds)
        self._ring: deque[Reading] = deque()
        self._history: deque[Point] = deque()
        self._history_base: Reading | None = None

    def poll(self) -> tuple[Reading, Reading | None]:
        """Read the counters now: the reading, and the one to difference it with for the last
        minute (None on the first poll, or the first after a minute of nobody looking)."""
        current = self._read()
        ring = self._ring
        while ring and current.at - ring[0].at > WINDOW_SECONDS:
            ring.popleft()
        base = ring[0] if ring else None
        if not ring or current.at - ring[-1].at >= SPACING_SECONDS:
            ring.append(current)
        self._advance_history(current)
        return current, base

    def _advance_history(self, current: Reading) -> None:
        base = self._history_base
        if base is None or current.at - base.at > GAP_SECONDS:
            self._history_base = current  # nobody looked for a while: a gap, not a point
        elif current.at - base.at >= STEP_SECONDS:
            seconds = current.at - base.at
            self._history.append(
                Point(
                    current.wall,
                    {key: figures(self._bounds, counts, base.latency.get(key), seconds) for key, counts in current.latency.items()},
                )
            )
            self._history_base = current
        while self._history and current.wall - self._history[0].wall > SPAN_SECONDS:
            self._history.popleft()

    def history(self) -> Iterable[Point]:
        return tuple(self._history)
