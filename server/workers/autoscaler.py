"""Autoscaling one model version's workers between ``minWorkers`` and ``maxWorkers``: the policy.

The supervisor samples its queue and workers every tick (``tick``) and hands each ``Sample`` to
``Autoscaler.decide``; a decision to add or remove a worker it carries out itself, through the
paths the scale API uses. The policy holds no reference to workers, and its clocks are injected,
so that it can be tested on its own.

A sample is *pressured* when requests queue faster than the workers take them:

- **queue time**: the oldest queued request has waited longer than ``max_batch_delay`` (at least
  ``MIN_QUEUE_WAIT``). A worker that is free to take a batch takes the queue's head at once and
  waits at most ``max_batch_delay`` for the rest of its batch, so a head older than that means
  that every worker holds all the batches it may (``maxBatchesInFlight``);
- **queue length**: the queue holds a full batch (``batch_size`` requests) or more for every
  READY worker, beyond the batches they hold. This one also sees a backlog under a long
  ``max_batch_delay``, where the head is taken well within the delay.

The rules:

- **Up**, one worker: every sample for ``autoscale_window_ms`` was pressured, while no worker was
  starting (a worker being added is capacity on its way: the window restarts once it is READY) and
  fewer than ``max_workers`` live. When the server's ``max_workers`` leaves no room, the decision
  is "held" (reported once for each stretch of pressure) and the worker is added as soon as
  room appears.
- **Down**, one worker: for ``autoscale_cooldown_ms`` no sample was pressured and the workers were
  busy (a batch in hand) on average no more than ``DOWN_UTILIZATION`` of one worker fewer could
  carry; ``autoscale_cooldown_ms`` has also passed since the last change, the queue is empty and
  a READY worker is idle. Never below ``max(min_workers, 1)``: with no worker left, requests are
  refused rather than queued, so nothing would ever scale it up again.

Each decision restarts both windows, so workers come one at a time, a window apart at least, and
go one at a time, a cool-down apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..models.settings import ModelSettings
from ..models.status import AutoscaleStatus

#: Seconds a queued request's wait must pass at least to count as pressure, whatever
#: ``max_batch_delay`` (0 included): below it, a wait is the event loop's own latency.
MIN_QUEUE_WAIT = 0.010
#: A worker is removed only if one fewer would have been at most this busy on average.
DOWN_UTILIZATION = 0.5


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at a model version's queue and workers."""

    queued: int  # requests in the queue
    oldest_wait: float  # seconds since the oldest queued request was received (0.0: none queued)
    live: int  # workers not being stopped
    ready: int  # of them, READY
    starting: int  # of them, STARTING (waiting for their turn or loading)
    busy: int  # READY workers with a batch in hand
    idle: int  # READY workers with none
    room: int  # workers the server's max_workers still allows


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "up", "down" or "held" (up was due, the server's max_workers left no room)
    reason: str  # "queue_time", "queue_length", "idle" or "server_cap": a metric label
    detail: str  # the same in words, for the log and describe


def tick(settings: ModelSettings) -> float:
    """Seconds between two samples: a fifth of the window, so a window spans several."""
    return min(1.0, max(0.02, settings.autoscale_window_ms / 5000))


def enabled(settings: ModelSettings) -> bool:
    return settings.max_workers > settings.min_workers


class Autoscaler:
    """The autoscaling state of one model version: how long pressure or quiet has lasted, and the
    last decision."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        """``clock`` measures the windows (seconds, monotonic); ``wall`` dates decisions (epoch)."""
        self._clock = clock
        self._wall = wall
        self._status = AutoscaleStatus()
        self.reset()

    def reset(self) -> None:
        """Start over, as after a change: the scale API changed the bounds, or a decision was made."""
        self._changed_at = self._clock()
        self._pressed_since: float | None = None
        self._held = False  # a "held" decision was reported for the current stretch of pressure
        self._quiet_since: float | None = None
        self._busy_sum = 0.0
        self._quiet_samples = 0

    def status(self) -> AutoscaleStatus:
        return self._status

    def decide(self, sample: Sample, settings: ModelSettings) -> Decision | None:
        """What to do after ``sample``: None (nothing), or a decision, which the caller carries out."""
        now = self._clock()
        pressure = _pressure(sample, settings)
        if pressure is not None:
            self._quiet_since = None
            if sample.starting or not sample.ready:
                # Capacity is on its way (or the workers are failing, which more would not cure).
                self._pressed_since = None
                return None
            if self._pressed_since is None:
                self._pressed_since = now
                self._held = False
            window = settings.autoscale_window_ms / 1000
            if now - self._pressed_since < window or sample.live >= settings.max_workers:
                return None
            reason, detail = pressure
            detail = f"{detail}, for {window:g} s ({sample.queued} queued, {sample.live} workers)"
            if sample.room < 1:
                if self._held:
                    return None
                self._held = True
                return self._record(Decision("held", "server_cap", f"{detail}; the server's max_workers is reached"))
            return self._record(Decision("up", reason, detail))
        self._pressed_since = None
        if self._quiet_since is None:
            self._quiet_since = now
            self._busy_sum, self._quiet_samples = 0.0, 0
        self._busy_sum += sample.busy
        self._quiet_samples += 1
        cooldown = settings.autoscale_cooldown_ms / 1000
        if (
            sample.live <= max(1, settings.min_workers)
            or sample.queued
            or not sample.idle
            or now - self._quiet_since < cooldown
            or now - self._changed_at < cooldown
        ):
            return None
        busy = self._busy_sum / self._quiet_samples
        if busy > (sample.live - 1) * DOWN_UTILIZATION:
            return None
        detail = f"{busy:.2f} of {sample.live} workers busy on average over the last {cooldown:g} s, nothing queued"
        return self._record(Decision("down", "idle", detail))

    def _record(self, decision: Decision) -> Decision:
        status = self._status
        self._status = AutoscaleStatus(
            action=decision.action,
            reason=decision.reason,
            detail=decision.detail,
            at=self._wall(),
            scale_ups=status.scale_ups + (decision.action == "up"),
            scale_downs=status.scale_downs + (decision.action == "down"),
        )
        if decision.action != "held":
            self.reset()
        return decision


def _pressure(sample: Sample, settings: ModelSettings) -> tuple[str, str] | None:
    """The signal that finds ``sample`` pressured, and its figures in words; None if neither does."""
    if not sample.queued:
        return None
    if sample.ready and sample.queued >= sample.ready * settings.batch_size:
        return "queue_length", f"a full batch (batch_size {settings.batch_size}) or more queued for each READY worker"
    limit = max(settings.max_batch_delay / 1000, MIN_QUEUE_WAIT)
    if sample.oldest_wait > limit:
        return "queue_time", (
            f"queued requests waited over max_batch_delay ({limit * 1000:.0f} ms; the oldest now "
            f"{sample.oldest_wait * 1000:.0f} ms)"
        )
    return None
