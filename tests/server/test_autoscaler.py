"""The autoscaling policy on its own (server/workers/autoscaler.py), on a clock the tests move."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from server.config import ConfigError, ServerConfig, parse_model_yaml
from server.models.settings import ModelSettings, RegisterRequest, resolve_settings
from server.workers.autoscaler import Autoscaler, Decision, Sample, tick

SETTINGS = ModelSettings(
    batch_size=4, max_batch_delay=100, min_workers=1, max_workers=3, autoscale_window_ms=1000, autoscale_cooldown_ms=5000
)
#: Two READY workers, both holding batches, and a backlog whose head waited 300 ms: pressure.
PRESSED = Sample(queued=3, oldest_wait=0.3, live=2, ready=2, starting=0, busy=2, idle=0, room=10)
#: Two READY workers, one idle, nothing queued.
QUIET = Sample(queued=0, oldest_wait=0.0, live=2, ready=2, starting=0, busy=0, idle=2, room=10)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


STEP = 0.125  # s between samples: exact in binary, so that windows end where the tests say


def run(scaler: Autoscaler, clock: Clock, sample: Sample, seconds: float, settings: ModelSettings = SETTINGS) -> list[Decision]:
    """Feed ``sample`` every STEP for ``seconds``; the decisions made. The first sample of a
    stretch starts it: a window of 1 s ends with the ninth sample."""
    decisions = []
    for _ in range(round(seconds / STEP)):
        clock.now += STEP
        decision = scaler.decide(sample, settings)
        if decision is not None:
            decisions.append(decision)
    return decisions


def scaler() -> tuple[Autoscaler, Clock]:
    clock = Clock()
    return Autoscaler(clock, wall=lambda: 1_700_000_000.0), clock


def test_queue_time_held_for_a_window_adds_one_worker() -> None:
    auto, clock = scaler()
    assert run(auto, clock, PRESSED, 1.0) == []  # pressure, but not yet for a whole window
    [decision] = run(auto, clock, PRESSED, 0.25)
    assert (decision.action, decision.reason) == ("up", "queue_time")
    assert decision.detail == (
        "queued requests waited over max_batch_delay (100 ms; the oldest now 300 ms), for 1 s (3 queued, 2 workers)"
    )
    status = auto.status()
    assert (status.action, status.reason, status.at, status.scale_ups, status.scale_downs) == (
        "up", "queue_time", 1_700_000_000.0, 1, 0,
    )  # fmt: skip
    # The window starts over after a decision (with the sample after it): one worker a window at most.
    assert run(auto, clock, PRESSED, 0.875) == []
    assert [d.action for d in run(auto, clock, PRESSED, 0.25)] == ["up"]


def test_queue_length_counts_even_under_a_long_batch_delay() -> None:
    auto, clock = scaler()
    slow = replace(SETTINGS, max_batch_delay=5000)
    backlog = replace(PRESSED, queued=8, oldest_wait=0.05)  # a full batch for each of 2 workers
    [decision] = run(auto, clock, backlog, 1.25, slow)
    assert (decision.action, decision.reason) == ("up", "queue_length")
    assert run(auto, clock, replace(backlog, queued=7), 3, slow) == []  # less than a batch each, head young


def test_a_break_in_the_pressure_restarts_the_window() -> None:
    auto, clock = scaler()
    assert run(auto, clock, PRESSED, 1.0) == []
    assert run(auto, clock, replace(PRESSED, queued=0, oldest_wait=0.0), STEP) == []
    assert run(auto, clock, PRESSED, 1.0) == []
    assert len(run(auto, clock, PRESSED, 0.25)) == 1


def test_a_wait_within_the_batch_delay_is_no_pressure() -> None:
    auto, clock = scaler()
    assert run(auto, clock, replace(PRESSED, oldest_wait=0.09), 5) == []
    # max_batch_delay 0: waits under MIN_QUEUE_WAIT are the event loop's own latency.
    assert run(auto, clock, replace(PRESSED, oldest_wait=0.005), 5, replace(SETTINGS, max_batch_delay=0)) == []


def test_no_scale_up_while_a_worker_starts_nor_beyond_max_workers() -> None:
    auto, clock = scaler()
    assert run(auto, clock, replace(PRESSED, starting=1), 3) == []
    assert run(auto, clock, replace(PRESSED, live=3, ready=3, busy=3), 3) == []
    assert run(auto, clock, replace(PRESSED, ready=0, busy=0), 3) == []  # none READY: failing, not busy
    # Once the started worker is READY, pressure must last a whole window again.
    assert run(auto, clock, PRESSED, 1.0) == []
    assert len(run(auto, clock, PRESSED, 0.25)) == 1


def test_the_server_cap_holds_the_scale_up_once_then_lets_it_through() -> None:
    auto, clock = scaler()
    full = replace(PRESSED, room=0)
    [held] = run(auto, clock, full, 3)  # reported once, not at every tick
    assert (held.action, held.reason) == ("held", "server_cap")
    assert auto.status().scale_ups == 0 and auto.status().action == "held"
    [up] = run(auto, clock, PRESSED, STEP)  # room again: at once, the pressure has lasted
    assert up.action == "up"


def test_idle_workers_go_one_per_cooldown_down_to_min_workers() -> None:
    auto, clock = scaler()
    assert run(auto, clock, QUIET, 5.0) == []  # the cool-down runs from the scaler's start too
    [down] = run(auto, clock, QUIET, 0.25)
    assert (down.action, down.reason) == ("down", "idle")
    assert auto.status().scale_downs == 1
    one = replace(QUIET, live=1, ready=1, idle=1)
    assert run(auto, clock, one, 20) == []  # never below min_workers
    # min_workers 0 still keeps one: without a worker, requests are refused, not queued.
    assert run(auto, clock, one, 20, replace(SETTINGS, min_workers=0)) == []


def test_no_scale_down_while_the_workers_are_busy_or_something_waits() -> None:
    auto, clock = scaler()
    # Two workers, 1.5 busy on average: one alone would be overloaded.
    for i in range(100):
        clock.now += STEP
        busy = 2 if i % 2 else 1
        assert auto.decide(replace(QUIET, busy=busy, idle=2 - busy), SETTINGS) is None
    assert run(auto, clock, replace(QUIET, busy=2, idle=0), 10) == []  # none idle to remove
    assert run(auto, clock, replace(QUIET, queued=1), 10) == []  # a request waits (not yet pressure)


def test_pressure_resets_the_cooldown_and_reset_starts_over() -> None:
    auto, clock = scaler()
    assert run(auto, clock, QUIET, 4.5) == []
    assert run(auto, clock, PRESSED, 0.25) == []
    assert run(auto, clock, QUIET, 4.5) == []  # the quiet stretch started again
    auto.reset()  # new bounds from the scale API
    assert run(auto, clock, QUIET, 5.0) == []
    assert len(run(auto, clock, QUIET, 0.25)) == 1


def test_tick_spans_a_window_several_times() -> None:
    assert tick(SETTINGS) == 0.2
    assert tick(replace(SETTINGS, autoscale_window_ms=50)) == 0.02
    assert tick(replace(SETTINGS, autoscale_window_ms=600_000)) == 1.0


# -- settings ---------------------------------------------------------------------------------------


def resolved(yaml: str = "", **properties: str) -> ModelSettings:
    return resolve_settings(
        RegisterRequest(), parse_model_yaml(yaml)[0], ServerConfig.from_properties(properties),
        name="m", version="1.0", gpu_count=0,
    )  # fmt: skip


def test_settings_come_from_the_model_yaml_then_config_properties() -> None:
    assert (resolved().autoscale_window_ms, resolved().autoscale_cooldown_ms) == (1000, 30_000)
    server_wide = resolved(autoscale_window_ms="300", autoscale_cooldown_ms="2000")
    assert (server_wide.autoscale_window_ms, server_wide.autoscale_cooldown_ms) == (300, 2000)
    own = resolved("autoscaleWindowMs: 250\nautoscaleCooldownMs: 700\n", autoscale_window_ms="300")
    assert (own.autoscale_window_ms, own.autoscale_cooldown_ms) == (250, 700)
    per_model = json.dumps({"m": {"1.0": {"autoscaleCooldownMs": 900}}})
    assert resolved(models=per_model).autoscale_cooldown_ms == 900


@pytest.mark.parametrize(
    ("key", "value"), [("autoscale_window_ms", "49"), ("autoscale_window_ms", "600001"), ("autoscale_cooldown_ms", "99")]
)
def test_config_properties_ranges(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid value for {key}: '?{value}'? \\(expected an integer from"):
        ServerConfig.from_properties({key: value})


@pytest.mark.parametrize("text", ["autoscaleWindowMs: 10", "autoscaleCooldownMs: 0", "autoscaleWindowMs: '500'"])
def test_model_yaml_ranges(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_model_yaml(text)
