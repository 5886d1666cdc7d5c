"""A handler's per-batch state, kept per thread, and the handoff between its two halves when the
worker overlaps stages (``overlapStages``; see server/workers/child/pipeline.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from handlers.errors import RequestError


class BatchState(threading.local):
    """A handler's state for the batch that the current thread runs.

    With overlapped stages (``overlapStages``) the worker runs the next batch's preprocess on
    another thread while this batch's inference and postprocess run; each thread sees its own
    batch's context and rejections. Outside a batch, ``context`` is the one set last by anyone.
    """

    context: Any = None
    rejected: dict[int, RequestError]
    in_batch = False

    def __init__(self) -> None:
        self.rejected = {}


@dataclass
class StartedBatch:
    """A batch whose preprocess has run (``BaseHandler.start_batch``), for ``finish_batch``."""

    data: list[Any]
    context: Any
    preprocessed: Any = None
    rejected: dict[int, RequestError] = field(default_factory=dict)
    whole: bool = False  # describe, or the profiler: ``finish_batch`` runs all of ``handle``
    preprocess_ms: float = 0.0
