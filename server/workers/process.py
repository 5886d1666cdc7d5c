"""One worker OS process, seen from the frontend: spawn, load, predict, stop.

The frontend talks to each worker over a private socket pair with plain request/reply
frames (``frames``, carrying ``messages``), through ``WorkerChannel``: there is no thread per
call and no correlation map, because a worker has at most one batch in flight.

The process is spawned in a thread (``subprocess.Popen``, which uses vfork), not on the event
loop: a fork on the loop stops it for tens of milliseconds per worker, and a burst of starts would
stall every port. Its exit is watched through a pidfd on the loop, with no thread per worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import WorkerDied, WorkerError
from ..models.batching import Job, Reply
from . import frames as protocol
from .messages import Cancel, Load, Loaded, Piece, Predict, Request, Result
from .placement import process_environment
from .templates import ForkedWorker, WorkerTemplates

log = logging.getLogger("marserve.worker")


class Exchange:
    """One frame sent to the worker, and its answer to come. The worker answers in order, so the
    oldest exchange is the one it is running: it has ``started``, and streamed pieces are its."""

    __slots__ = ("reply", "started", "ran", "on_piece")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_piece: Callable[[Piece, bytes], None] | None) -> None:
        self.reply: asyncio.Future[bytearray] = loop.create_future()
        #: Resolved when the worker takes the batch (``ran``), or when it went away first (not ``ran``).
        self.started: asyncio.Future[None] = loop.create_future()
        self.ran = False
        self.on_piece = on_piece

    def run(self) -> None:
        self.ran = True
        if not self.started.done():
            self.started.set_result(None)


class WorkerChannel(asyncio.Protocol):
    """The frontend's end of a worker's socket: frames out, each answered by one whole frame in,
    in order (streamed pieces, if any, before it). Up to two may be outstanding: the batch the
    worker runs and the next one, which waits in the socket until the worker takes it.

    A plain protocol rather than asyncio streams: the reply is taken from the socket's data in one
    piece, and the waiting call wakes once, when the whole frame is there.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._size: int | None = None
        self._pending: deque[Exchange] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._size is None:
            self._size = protocol.frame_size(buffer)
        while self._size is not None and len(buffer) >= self._size:
            size = self._size
            pending = self._pending
            if not pending:
                # A worker answers each frame with exactly one: anything else means it is broken.
                log.error("worker sent %d bytes nobody asked for; dropping its connection", len(buffer))
                self.close()
                return
            head = pending[0]
            if buffer[0] == protocol.PIECE:
                # A streamed piece of the running batch: copied out, and handed on at once.
                kind, meta, blob = protocol.decode(bytes(buffer[:size]))
                del buffer[:size]
                self._size = protocol.frame_size(buffer)
                if head.on_piece is None:
                    log.error("worker sent a streamed piece nobody asked for; dropping its connection")
                    self.close()
                    return
                head.on_piece(Piece.from_meta(meta), bytes(blob))
                continue
            if len(buffer) == size:
                # The common case, one whole answer: handed over as it is, without a copy.
                frame, self._buffer, buffer = buffer, bytearray(), bytearray()
            else:
                frame = buffer[:size]
                del buffer[:size]
            self._size = protocol.frame_size(buffer)
            pending.popleft()
            if not head.reply.done():
                head.reply.set_result(frame)
            if pending:
                pending[0].run()  # the worker has taken the next batch now

    def connection_lost(self, exc: Exception | None) -> None:
        while self._pending:
            exchange = self._pending.popleft()
            if not exchange.started.done():
                exchange.started.set_result(None)  # never ran
            if not exchange.reply.done():
                exchange.reply.set_exception(ConnectionError("the worker's socket closed"))

    def submit(self, buffers: list[protocol.Buffer], on_piece: Callable[[Piece, bytes], None] | None = None) -> Exchange:
        """Send one frame; its answer will be ``reply`` (ConnectionError if the worker goes away
        first), and each streamed piece that comes before it goes to ``on_piece``."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the worker's socket is closed")
        exchange = Exchange(asyncio.get_running_loop(), on_piece)
        self._pending.append(exchange)
        if len(self._pending) == 1:
            exchange.run()
        self.transport.writelines(buffers)
        return exchange

    async def exchange(
        self, buffers: list[protocol.Buffer], on_piece: Callable[[Piece, bytes], None] | None = None
    ) -> tuple[int, dict[str, Any], memoryview]:
        """Send one frame and wait for its answer."""
        return protocol.decode(await self.submit(buffers, on_piece).reply)

    def send(self, buffers: list[protocol.Buffer]) -> None:
        """A frame that has no answer (a cancellation)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(buffers)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class WorkerProcess:
    """A worker process and its socket. Not restartable: supervision creates a new one."""

    def __init__(
        self, worker_id: str, load: Load, env: Mapping[str, str], threads: int, templates: WorkerTemplates | None = None
    ) -> None:
        """``templates``: fork the worker from the server's warm template when its environment
        allows (None: always spawn a fresh interpreter)."""
        self.worker_id = worker_id
        self.load = load
        self.env = env
        self.threads = threads
        self.templates = templates
        self.process: subprocess.Popen[bytes] | ForkedWorker | None = None
        self.started_at = time.time()
        self._exited: asyncio.Future[int] | None = None
        self._channel: WorkerChannel | None = None
        self.last_output = ""  # the last non-empty line the worker wrote
        self._log_task: asyncio.Task[None] | None = None

    def exit_description(self) -> str:
        """How the process ended, for the server log: its exit code or signal, and its last line
        of output, which usually says why (an import error, a traceback's last line)."""
        code = self.returncode
        if code is None:
            how = "is still running"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"{how}; its last output: {self.last_output}" if self.last_output else how

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout: float) -> None:
        """Spawn the process and load the model within ``timeout`` seconds of now (startup_timeout,
        a hard limit); raises WorkerError on any failure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ours, theirs = socket.socketpair()
        # The worker's output comes over a socket, not a pipe: uvloop's connect_read_pipe closes
        # a pipe's descriptor twice (the file object, then libuv; MagicStack/uvloop#763), and a
        # thread given the same number in between loses it. A socket, uvloop detaches instead.
        output, their_output = socket.socketpair()
        env = process_environment(self.env, self.threads)
        try:
            forked = await self._fork(env, theirs, their_output)
            if forked is not None:
                self.process = forked
                self._exited = forked.exited
            else:
                spawn = loop.run_in_executor(None, self._spawn, env, theirs, their_output)
                try:
                    # Shielded: a start cancelled meanwhile must still learn the pid, to kill it.
                    self.process = await asyncio.shield(spawn)
                except asyncio.CancelledError:
                    spawn.add_done_callback(_kill_spawned)
                    raise
                except OSError as exc:
                    raise WorkerError(f"cannot start the worker process: {exc}") from None
                self._exited = _watch_exit(self.process, loop)
        except BaseException:
            ours.close()
            output.close()
            raise
        self.started_at = time.time()
        self._log_task = asyncio.create_task(self._forward_output(output))
        try:
            _, self._channel = await loop.create_unix_connection(WorkerChannel, sock=ours)
        except OSError as exc:
            ours.close()
            self.kill()
            raise WorkerError(f"cannot connect to the worker process: {exc}") from None
        try:
            remaining = max(0.0, deadline - loop.time())
            kind, meta, _ = await asyncio.wait_for(self._channel.exchange(protocol.encode(protocol.LOAD, self.load)), remaining)
        except TimeoutError:
            self.kill()
            raise WorkerError(f"model load timed out after {timeout:g} s") from None
        except ConnectionError:
            # Its exit status and last output say why (a crash, an import error before the load).
            await self.wait_exit(2)
            if self._log_task is not None:
                await asyncio.wait({self._log_task}, timeout=1)
            self.kill()
            raise WorkerError(f"worker exited while loading the model: it {self.exit_description()}") from None
        loaded = Loaded.from_meta(meta) if kind == protocol.LOADED else Loaded(500, "load failed")
        if loaded.code != 200:
            self.kill()
            raise WorkerError(loaded.message, loaded.code)

    async def _fork(self, env: dict[str, str], channel: socket.socket, output: socket.socket) -> ForkedWorker | None:
        """The worker forked from the template, or None: spawn it (``channel`` and ``output`` are
        then still open)."""
        if self.templates is None:
            return None
        fork = asyncio.ensure_future(self.templates.fork(env, self.load.model_dir, channel, output))
        try:
            # Shielded: a start cancelled meanwhile must still learn the pid, to kill it.
            return await asyncio.shield(fork)
        except asyncio.CancelledError:
            fork.add_done_callback(_kill_forked)
            raise

    def _spawn(self, env: dict[str, str], channel: socket.socket, output: socket.socket) -> subprocess.Popen[bytes]:
        # In a thread of the default executor. The worker's ends of its sockets are closed here,
        # once the child has them, whatever happens to the start meanwhile.
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "server.workers.child", "--fd", str(channel.fileno()), "--parent", str(os.getpid())],
                pass_fds=[channel.fileno()],
                cwd=self.load.model_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output.fileno(),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            channel.close()
            output.close()

    def submit(self, batch: list[Job], on_piece: Callable[[Piece, bytes], None] | None = None) -> Exchange:
        """Send one batch to the worker, which runs it when it has answered those sent before;
        streamed pieces go to ``on_piece`` as they come. WorkerDied if the socket is gone."""
        assert self._channel is not None
        requests = []
        blobs: list[bytes] = []
        for job in batch:
            requests.append(Request(job.request_id, job.headers, [(n, t, len(v)) for n, t, v in job.params], job.envelope))
            blobs.extend(value for _, _, value in job.params)
        try:
            return self._channel.submit(protocol.encode(protocol.PREDICT, Predict(requests), blobs), on_piece)
        except ConnectionError:
            raise WorkerDied from None

    async def result(self, exchange: Exchange) -> tuple[list[Reply], Result]:
        """A submitted batch's replies, and the worker's Result (timings, the handler's metrics).

        Raises WorkerDied if the process goes away, WorkerError on a handler error.
        """
        try:
            kind, meta, blob = protocol.decode(await exchange.reply)
        except ConnectionError:
            raise WorkerDied from None
        if kind != protocol.RESULT:
            log.error("worker %s answered a batch with frame kind %r", self.worker_id, kind)
            raise WorkerDied
        result = Result.from_meta(meta)
        if result.code != 200:
            raise WorkerError(result.message, result.code, result.metrics or (), result.error_type)
        bodies = protocol.split(blob, [r.size for r in result.responses])
        replies = [
            Reply(r.status, r.phrase, r.content_type, [(k, v) for k, v in r.headers], bytes(body))
            for r, body in zip(result.responses, bodies)
        ]
        return replies, result

    async def predict(
        self, batch: list[Job], on_piece: Callable[[Piece, bytes], None] | None = None
    ) -> tuple[list[Reply], Result]:
        """Run one batch (``submit`` and ``result``)."""
        return await self.result(self.submit(batch, on_piece))

    def cancel(self, request_ids: list[str]) -> None:
        """Tell the worker these requests' clients have gone: it stops streaming to them."""
        if self._channel is not None:
            self._channel.send(protocol.encode(protocol.CANCEL, Cancel(request_ids)))

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            _kill_group(self.process.pid)
        if self._channel is not None:
            self._channel.close()

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (the worker exits on EOF), then kill it if it lingers."""
        if self._channel is not None:
            self._channel.close()
        if self.process is None:
            return
        if await self.wait_exit(timeout) is None:
            self.kill()
            await self.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the process has ended, or None if it still runs after ``timeout`` s."""
        if self._exited is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except TimeoutError:
            return None

    async def wait(self) -> int:
        assert self._exited is not None
        code = await asyncio.shield(self._exited)
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        return code

    async def _forward_output(self, output: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            transport, _ = await loop.create_unix_connection(lambda: asyncio.StreamReaderProtocol(reader), sock=output)
        except BaseException:
            output.close()
            raise
        model_log = logging.getLogger(f"marserve.model.{self.load.model_name}")
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the reader's limit: dropped, and reading goes on
                    model_log.info("[%s] (an overlong line of output was dropped)", self.worker_id)
                    continue
                if not line:
                    break
                text = line.decode(errors="replace").rstrip()
                model_log.info("[%s] %s", self.worker_id, text)
                if text:
                    self.last_output = text
        finally:
            transport.close()


# Exit watchers that poll (no pidfd), kept from being collected while they run.
_pollers: set[asyncio.Task[None]] = set()


def _watch_exit(process: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
    """A future of the exit status of ``process``, which it reaps. A pidfd on the loop tells when
    it has exited; without pidfds (Linux before 5.3), it is polled."""
    exited: asyncio.Future[int] = loop.create_future()

    def reaped() -> bool:
        code = process.poll()
        if code is None:
            return False
        if not exited.done():
            exited.set_result(code)
        return True

    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        task = loop.create_task(_poll_exit(reaped))
        _pollers.add(task)
        task.add_done_callback(_pollers.discard)
        return exited

    def readable() -> None:
        if reaped():
            loop.remove_reader(fd)
            os.close(fd)

    loop.add_reader(fd, readable)
    return exited


async def _poll_exit(reaped: Any) -> None:
    while not reaped():
        await asyncio.sleep(0.1)


def _kill_group(pid: int) -> None:
    """Kill a worker and what it started (its own process group), or the worker alone if it has
    not made its group yet (a forked one, in its first instants)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_forked(fork: asyncio.Future[ForkedWorker | None]) -> None:
    """A worker whose start was cancelled while the template forked it: killed."""
    if fork.cancelled() or fork.exception() is not None:
        return
    forked = fork.result()
    if forked is not None:
        _kill_group(forked.pid)


def _kill_spawned(spawn: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """A process whose start was cancelled while it was spawned: killed, and reaped."""
    if spawn.cancelled() or spawn.exception() is not None:
        return
    process = spawn.result()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _watch_exit(process, asyncio.get_running_loop())
