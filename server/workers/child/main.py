"""Worker process entry point: ``python -m server.workers.child --fd N``.

The frontend hands the worker one end of a socket pair as file descriptor N. The worker
reads a LOAD frame, loads the handler, answers LOADED, then serves PREDICT frames in order
until the socket closes (``pipeline.py``). It also dies with its parent (PR_SET_PDEATHSIG), so a frontend
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

import handlers
from handlers.context import Context
from handlers.metrics import MetricsCache

from .. import frames as protocol
from ..messages import Load, Loaded
from . import pipeline
from .channel import Channel
from .loader import load_handler
from .service import Service

_PR_SET_PDEATHSIG = 1


def frontend_socket(prog: str, argv: list[str]) -> socket.socket:
    """The socket to the frontend (``--fd``), in a process that dies with the frontend (``--parent``)
    and leaves SIGINT to it: a worker's start, and the worker template's."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    # SIGTERM from the frontend means stop now; the default handler already does that, and
    # SIGINT (a Ctrl-C on the foreground server's terminal) is the frontend's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return socket.socket(fileno=args.fd)


def die_with_parent(parent_pid: int) -> None:
    """Exit with the parent, even one killed with SIGKILL (Linux), or now if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the socket's EOF still ends the worker once it is idle
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        sys.exit(1)


def _load(load: Load) -> Service:
    os.chdir(load.model_dir)
    # TorchServe's import names (ts.torch_handler...) resolve to marserve's handlers, in workers
    # only: a real torchserve installed beside marserve is never shadowed in site-packages.
    sys.path.insert(0, handlers.COMPAT_PATH)
    sys.path.insert(0, load.model_dir)
    initialize, entry = load_handler(load.handler)
    # TorchServe gives load-time metrics a made-up request id, so they get the model's default
    # dimensions; they reach the frontend with the first RESULT (LOADED carries none).
    metrics = MetricsCache(load.model_name, request_ids=str(uuid.uuid4()))
    context = Context(
        model_name=load.model_name,
        model_dir=load.model_dir,
        manifest=load.manifest,
        batch_size=load.batch_size,
        gpu=load.gpu_id,
        mms_version=load.server_version,
        limit_max_image_pixels=load.limit_max_image_pixels,
        model_yaml_config=load.model_yaml_config,
        metrics=metrics,
    )
    initialize(context)
    return Service(entry, context, load.decode_input_request, load.max_response_size, load.envelope, load.overlap_stages)


def _load_failure(exc: BaseException) -> Loaded:
    traceback.print_exc()
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "CUDA" in str(exc):
        return Loaded(507, f"System out of memory: {detail}")
    return Loaded(500, detail)


def main(argv: list[str]) -> int:
    sock = frontend_socket("python -m server.workers.child", argv)
    frame = protocol.recv_frame(sock)
    if frame is None or frame[0] != protocol.LOAD:
        return 1
    try:
        load = Load.from_meta(frame[1])
        service = _load(load)
    except BaseException as exc:  # noqa: BLE001 - any load failure is reported, then the worker exits
        protocol.send_frame(sock, protocol.encode(protocol.LOADED, _load_failure(exc)))
        return 1
    # The model log's record that this worker is up (TorchServe prints "Torch worker started.").
    print(f"worker pid {os.getpid()} loaded model {load.model_name} with handler {load.handler}", flush=True)
    protocol.send_frame(sock, protocol.encode(protocol.LOADED, Loaded(200, "loaded", os.getpid())))
    sys.stdout.flush()
    channel = Channel(sock, pipelined=service.pipelined)
    service.channel = channel
    return pipeline.serve(channel, service)
