"""One worker OS process, seen from the frontend: spawn, load, predict, stop.

The frontend talks to each worker over a private socket pair with plain request/reply
frames (``frames``, carrying ``messages``), through ``WorkerChannel``: there is no thread per
call and no correlation map, because a worker has at most one batch in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from ..errors import WorkerDied, WorkerError
from ..models.batching import Job, Reply
from . import frames as protocol
from .messages import Load, Loaded, Predict, Request, Result

log = logging.getLogger("marserve.worker")


class WorkerChannel(asyncio.Protocol):
    """The frontend's end of a worker's socket: one frame out, then its answer, one whole frame in.

    A plain protocol rather than asyncio streams: the reply is taken from the socket's data in one
    piece, and the waiting call wakes once, when the whole frame is there.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._size: int | None = None
        self._waiter: asyncio.Future[bytearray] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._size is None:
            self._size = protocol.frame_size(buffer)
        if self._size is None or len(buffer) < self._size:
            return
        waiter = self._waiter
        if len(buffer) > self._size or waiter is None or waiter.done():
            # A worker answers each frame with exactly one: anything else means it is broken.
            log.error("worker sent %d bytes nobody asked for; dropping its connection", len(buffer))
            self.close()
            return
        self._buffer = bytearray()
        self._size = None
        waiter.set_result(buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the worker's socket closed"))

    async def exchange(self, buffers: list[protocol.Buffer]) -> tuple[int, dict[str, Any], memoryview]:
        """Send one frame and wait for the answer; ConnectionError if the worker goes away first."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the worker's socket is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.writelines(buffers)
        return protocol.decode(await self._waiter)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class WorkerProcess:
    """A worker process and its socket. Not restartable: supervision creates a new one."""

    def __init__(self, worker_id: str, load: Load, env: Mapping[str, str], threads: int) -> None:
        self.worker_id = worker_id
        self.load = load
        self.env = env
        self.threads = threads
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = time.time()
        self._channel: WorkerChannel | None = None
        self._log_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout: float) -> None:
        """Spawn the process and load the model; raises WorkerError on any failure."""
        ours, theirs = socket.socketpair()
        env = dict(self.env)
        # Set before torch is imported, so N workers share the cores instead of each taking all.
        # A user's own counts stand (as in TorchServe, whose workers inherit them): small models
        # often serve faster on one thread, since waking a second one costs more than it saves.
        threads = str(self.threads)
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
        env["PYTHONUNBUFFERED"] = "1"
        # OpenMP's threads otherwise spin for a while after every parallel region: between batches
        # that burns a core the frontend and the other workers need (for a small model, half the
        # worker's CPU). Asleep, they cost a wake-up per region instead. A user's setting stands.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.workers.child", "--fd", str(theirs.fileno()), "--parent", str(os.getpid()),
                pass_fds=[theirs.fileno()],
                cwd=self.load.model_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self._log_task = asyncio.create_task(self._forward_output())
        _, self._channel = await asyncio.get_running_loop().create_unix_connection(WorkerChannel, sock=ours)
        try:
            kind, meta, _ = await asyncio.wait_for(self._channel.exchange(protocol.encode(protocol.LOAD, self.load)), timeout)
        except TimeoutError:
            self.kill()
            raise WorkerError(f"model load timed out after {timeout:g} s") from None
        except ConnectionError:
            self.kill()
            raise WorkerError("worker exited while loading the model") from None
        loaded = Loaded.from_meta(meta) if kind == protocol.LOADED else Loaded(500, "load failed")
        if loaded.code != 200:
            self.kill()
            raise WorkerError(loaded.message, loaded.code)

    async def predict(self, batch: list[Job]) -> tuple[list[Reply], Result]:
        """Run one batch: its replies, and the worker's Result (timings, the handler's metrics).

        Raises WorkerDied if the process goes away, WorkerError on a handler error.
        """
        assert self._channel is not None
        requests = []
        blobs: list[bytes] = []
        for job in batch:
            requests.append(Request(job.request_id, job.headers, [(n, t, len(v)) for n, t, v in job.params]))
            blobs.extend(value for _, _, value in job.params)
        try:
            kind, meta, blob = await self._channel.exchange(protocol.encode(protocol.PREDICT, Predict(requests), blobs))
        except ConnectionError:
            raise WorkerDied from None
        if kind != protocol.RESULT:
            log.error("worker %s answered a batch with frame kind %r", self.worker_id, kind)
            raise WorkerDied
        result = Result.from_meta(meta)
        if result.code != 200:
            raise WorkerError(result.message, result.code, result.metrics or ())
        bodies = protocol.split(blob, [r.size for r in result.responses])
        replies = [
            Reply(r.status, r.phrase, r.content_type, [(k, v) for k, v in r.headers], bytes(body))
            for r, body in zip(result.responses, bodies)
        ]
        return replies, result

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._channel is not None:
            self._channel.close()

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (the worker exits on EOF), then kill it if it lingers."""
        if self._channel is not None:
            self._channel.close()
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.kill()
            await self.process.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the process has ended, or None if it still runs after ``timeout`` s."""
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout)
        except TimeoutError:
            return None

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        return code

    async def _forward_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        model_log = logging.getLogger(f"marserve.model.{self.load.model_name}")
        while line := await self.process.stdout.readline():
            model_log.info("[%s] %s", self.worker_id, line.decode(errors="replace").rstrip())

