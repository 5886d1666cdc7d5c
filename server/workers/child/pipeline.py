"""The worker's batch loops: one batch at a time, or its handler's steps as a pipeline.

With ``overlapStages`` the frontend's next batch (it sends it while this one runs; see the
supervisor's lanes) is read and preprocessed on a thread of its own while the main thread runs
this batch's inference and postprocess. Inference stays on the main thread, one batch at a time,
and answers go out in order. No CUDA streams of its own: a preprocess's host-to-device copy goes on
the device's default stream, ordered with inference, while its CPU work (decoding, resizing)
overlaps the device's.
"""

from __future__ import annotations

import queue
import threading

from .. import frames as protocol
from ..messages import Predict
from .channel import Channel
from .service import Batch, Service


def serve(channel: Channel, service: Service) -> int:
    """Answer PREDICT frames until the frontend closes the socket (0), or sends anything else (1)."""
    if service.pipelined:
        return _serve_pipelined(channel, service)
    while (frame := channel.recv()) is not None:
        kind, meta, blob = frame
        if kind != protocol.PREDICT:
            return 1
        result, parts = service.handle(Predict.from_meta(meta), blob)
        channel.send(protocol.encode(protocol.RESULT, result, parts))
    return 0


def _serve_pipelined(channel: Channel, service: Service) -> int:
    # One prepared batch waits at most; the frontend holds back a third until the first is answered.
    handoff: queue.Queue[Batch | int | BaseException] = queue.Queue(maxsize=1)

    def intake() -> None:
        try:
            while (frame := channel.recv()) is not None:
                kind, meta, blob = frame
                if kind != protocol.PREDICT:
                    handoff.put(1)
                    return
                handoff.put(service.prepare(Predict.from_meta(meta), blob))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread, which exits with it
            handoff.put(exc)
            return
        handoff.put(0)

    threading.Thread(target=intake, name="marserve-preprocess", daemon=True).start()
    while True:
        item = handoff.get()
        if isinstance(item, int):
            return item
        if isinstance(item, BaseException):
            raise item
        result, parts = service.complete(item)
        channel.send(protocol.encode(protocol.RESULT, result, parts))
        channel.finished([request.id for request in item.requests])
