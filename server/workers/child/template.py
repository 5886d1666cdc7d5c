"""The worker template: ``python -m server.workers.child.template --fd N --parent P``.

One process that has already imported Python, torch and the worker's code, and forks workers on
request, the way a forkserver does: a worker then starts in milliseconds instead of paying the
interpreter and ``import torch`` again. It runs no torch operation and starts no thread of its own
before forking, so the children get no half-initialised CUDA context or OpenMP pool; each child
sets its environment, directory and thread count after the fork. (The one thread ``import torch``
leaves behind is OpenBLAS's pool, from numpy, which OpenBLAS itself stops around a fork.)

It speaks over a SOCK_SEQPACKET socket to the frontend (``server/workers/templates.py``), one JSON
message a packet:

- frontend → template: ``{"id": n, "env": {...}, "cwd": "..."}`` with two descriptors attached
  (the worker's end of its socket pair, the worker's end of its output socket);
- template → frontend: ``{"ready": pid}`` once the imports are done (or ``{"failed": why}``),
  ``{"id": n, "pid": p}`` (or ``{"id": n, "error": why}``) for each fork, and ``{"exit": p,
  "code": c}`` when a worker ends (``c`` as subprocess gives it: negative for a signal).

The workers are its children: it reaps them and reports how they ended. It dies with the
frontend, and its workers die with it (PR_SET_PDEATHSIG); the frontend starts another.
"""

from __future__ import annotations

import array
import gc
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from .main import frontend_socket
from .main import main as run_worker

_MAX_MESSAGE = 1 << 20


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next request and its descriptors; None when the frontend has gone."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), list(fds)


def _become_worker(request: dict[str, Any], fds: list[int], sock: socket.socket, wakeup: tuple[int, int]) -> int:
    """In the forked child: shed the template's state, take the worker's, and run the worker."""
    channel_fd, output_fd = fds
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in wakeup:
        os.close(fd)
    sock.close()
    os.setsid()  # its own process group: the frontend kills the worker and what it started at once
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    env: dict[str, str] = request["env"]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    # libgomp and MKL read their thread counts when torch is imported, which the template did:
    # this worker's share of the cores is set now, before any torch operation.
    import torch

    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return run_worker(["--fd", str(channel_fd), "--parent", str(os.getppid())])


def _fork(request: dict[str, Any], fds: list[int], sock: socket.socket, wakeup: tuple[int, int]) -> None:
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        _send(sock, {"id": request.get("id"), "error": f"expected 2 descriptors, got {len(fds)}"})
        return
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        _send(sock, {"id": request.get("id"), "error": f"fork failed: {exc}"})
        return
    if pid == 0:
        code = 1
        try:
            code = _become_worker(request, fds, sock, wakeup)
        except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the template's loop
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    _send(sock, {"id": request.get("id"), "pid": pid})


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(sock: socket.socket) -> int:
    """Fork a worker for each request until the frontend closes the socket."""
    wakeup = os.pipe()
    for fd in wakeup:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop (set_wakeup_fd)
    while True:
        readable, _, _ = select.select([sock.fileno(), wakeup[0]], [], [])
        if wakeup[0] in readable:
            while True:
                try:
                    if not os.read(wakeup[0], 512):
                        break
                except BlockingIOError:
                    break
            _reap(sock)
        if sock.fileno() in readable:
            received = _receive(sock)
            if received is None:
                return 0
            _fork(*received, sock, wakeup)


def main(argv: list[str]) -> int:
    sock = frontend_socket("python -m server.workers.child.template", argv)
    started = time.perf_counter()
    try:
        # What every worker needs, imported once here (the worker's own code came with .main).
        # Nothing that starts threads or touches a device: torchvision and the vision handlers
        # load in the workers that use them.
        import torch  # noqa: F401

        import handlers.base_handler  # noqa: F401
    except BaseException as exc:  # noqa: BLE001 - reported to the frontend, which spawns workers instead
        _send(sock, {"failed": f"{type(exc).__name__}: {exc}"})
        return 1
    # Objects that exist now are never collected: a fork's children then share their pages
    # instead of copying each one the collector touches.
    gc.freeze()
    _send(sock, {"ready": os.getpid(), "seconds": round(time.perf_counter() - started, 3)})
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
