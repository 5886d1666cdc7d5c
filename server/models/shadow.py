"""Shadow traffic: a copy of a request queued on the shadow version, measured and dropped.

The client waits only for the primary's answer: the copy is its own job with its own future, and
what it comes to is recorded by a task of its own once both have answered. Its latency, its errors
(a refusal at the queue counts) and, when both answers are JSON, whether they differ are added to
the model's ``ShadowStats`` and to the metrics (``marserve_shadow_requests_total{outcome}``,
``marserve_shadow_duration_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson

from ..errors import ServerError
from .batching import Job, Reply, StreamReply
from .rollout import ShadowStats
from .version import ModelVersion

log = logging.getLogger("marserve.shadow")

#: (model name, shadow version, outcome, seconds or None): the metrics' ``shadowed``.
Record = Callable[[str, str, str, float | None], None]

# The tasks that wait for both answers; the loop keeps only weak references to tasks.
_pending: set[asyncio.Task[None]] = set()


def mirror(primary: Job, shadow: ModelVersion, stats: ShadowStats, record: Record) -> None:
    """Queue a copy of ``primary`` on ``shadow``; never raises, never delays the primary."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Reply] = loop.create_future()
    copy = Job(primary.request_id, list(primary.headers), primary.params, future, time.perf_counter(), envelope=primary.envelope)
    stats.mirrored += 1
    try:
        shadow.submit(copy, versioned=True)
    except ServerError:
        stats.refused += 1
        stats.errors += 1
        record(shadow.name, shadow.version, "error", None)
        return
    task = loop.create_task(_measure(primary, copy, shadow, stats, record))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _measure(primary: Job, copy: Job, shadow: ModelVersion, stats: ShadowStats, record: Record) -> None:
    shadow_reply = await _answer(copy.future)
    shadow_seconds = time.perf_counter() - copy.received
    primary_reply = await _answer(primary.future)
    primary_seconds = time.perf_counter() - primary.received
    if isinstance(shadow_reply, StreamReply):
        # A streamed answer nobody reads: tell the worker to stop sending it.
        shadow_reply.cancel()
    if shadow_reply is None or shadow_reply.status >= 400:
        stats.errors += 1
        record(shadow.name, shadow.version, "error", None)
        return
    stats.answered += 1
    stats.shadow_seconds += shadow_seconds
    stats.primary_seconds += primary_seconds
    outcome = _compare(primary_reply, shadow_reply)
    if outcome != "answered":
        stats.compared += 1
        stats.differ += outcome == "differ"
    record(shadow.name, shadow.version, outcome, shadow_seconds)


async def _answer(future: asyncio.Future[Reply]) -> Reply | None:
    """The reply, or None when the request failed or was given up."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if future.cancelled():
            return None
        raise
    except Exception:  # noqa: BLE001 - the primary's failure is its client's business; the shadow's is counted
        return None


def _compare(primary: Reply | None, shadow: Reply) -> str:
    """``match`` or ``differ`` when both answered JSON successfully, else ``answered``."""
    if primary is None or isinstance(primary, StreamReply) or isinstance(shadow, StreamReply) or primary.status >= 400:
        return "answered"
    try:
        same = orjson.loads(primary.body) == orjson.loads(shadow.body)
    except orjson.JSONDecodeError:
        return "answered"
    return "match" if same else "differ"
