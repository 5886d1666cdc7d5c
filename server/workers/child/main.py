"""Worker process entry point: ``python -m server.workers.child --fd N``.

The frontend hands the worker one end of a socket pair as file descriptor N. The worker
reads a LOAD frame, loads the handler, answers LOADED, then serves PREDICT frames one at a
time until the socket closes. It also dies with its parent (PR_SET_PDEATHSIG), so a frontend
killed with SIGKILL leaves no orphans behind.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import traceback
import uuid
from typing import Any

import handlers
from handlers.context import Context
from handlers.metrics import DEFAULT_MODEL_METRICS, MetricsCache

from .. import frames as protocol
from .loader import load_handler
from .service import Service

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the socket's EOF still ends the worker once it is idle
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        sys.exit(1)


def _load(meta: dict[str, Any]) -> Service:
    model_dir = meta["model_dir"]
    os.chdir(model_dir)
    # TorchServe's import names (ts.torch_handler...) resolve to marserve's handlers, in workers
    # only: a real torchserve installed beside marserve is never shadowed in site-packages.
    sys.path.insert(0, handlers.COMPAT_PATH)
    sys.path.insert(0, model_dir)
    initialize, entry = load_handler(meta["handler"])
    # TorchServe gives load-time metrics a made-up request id, so they get the model's default
    # dimensions; they reach the frontend with the first RESULT (LOADED carries none).
    # A LOAD meta may declare the metrics_config's model_metrics; else TorchServe's defaults.
    declared = meta.get("model_metrics") or DEFAULT_MODEL_METRICS
    metrics = MetricsCache(meta["model_name"], request_ids=str(uuid.uuid4()), model_metrics=declared)
    context = Context(
        model_name=meta["model_name"],
        model_dir=model_dir,
        manifest=meta.get("manifest"),
        batch_size=meta["batch_size"],
        gpu=meta.get("gpu_id"),
        mms_version=meta.get("server_version", "0.12.0"),
        limit_max_image_pixels=meta.get("limit_max_image_pixels", True),
        model_yaml_config=meta.get("model_yaml_config") or {},
        metrics=metrics,
    )
    initialize(context)
    return Service(entry, context, meta.get("decode_input_request", True), meta.get("max_response_size"))


def _load_failure(exc: BaseException) -> dict[str, Any]:
    traceback.print_exc()
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "CUDA" in str(exc):
        return {"code": 507, "message": f"System out of memory: {detail}"}
    return {"code": 500, "message": detail}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.workers.child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    # SIGTERM from the frontend means stop now; the default handler already does that, and
    # SIGINT (a Ctrl-C on the foreground server's terminal) is the frontend's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    frame = protocol.recv_frame(sock)
    if frame is None or frame[0] != protocol.LOAD:
        return 1
    try:
        service = _load(frame[1])
    except BaseException as exc:  # noqa: BLE001 - any load failure is reported, then the worker exits
        protocol.send_frame(sock, protocol.encode(protocol.LOADED, _load_failure(exc)))
        return 1
    # The model log's record that this worker is up (TorchServe prints "Torch worker started.").
    print(f"worker pid {os.getpid()} loaded model {frame[1]['model_name']} with handler {frame[1]['handler']}", flush=True)
    protocol.send_frame(sock, protocol.encode(protocol.LOADED, {"code": 200, "message": "loaded", "pid": os.getpid()}))
    sys.stdout.flush()
    while (frame := protocol.recv_frame(sock)) is not None:
        kind, meta, blob = frame
        if kind != protocol.PREDICT:
            return 1
        reply, parts = service.predict(meta, blob)
        protocol.send_frame(sock, protocol.encode(protocol.RESULT, reply, parts))
    return 0
