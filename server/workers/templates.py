"""Worker templates, seen from the frontend: warm processes that fork workers (child/template.py).

A worker forked from a template skips the interpreter's start and ``import torch`` (seconds)
and shares the template's pages until it writes them. One template serves one environment: the
server's worker environment, the same for every model but for the model's directory on
PYTHONPATH and the thread counts, which a forked worker sets for itself. A model with packages
of its own (``install_py_dep_per_model``) or any other difference in its environment is spawned
as a fresh process instead, as is every worker when the template cannot start (one warning).

A template that dies takes its workers with it (they are its children) and is started again for
the next worker; their supervisors restart them as they restart any worker that died.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from .placement import process_environment

log = logging.getLogger("marserve.worker")

#: Variables a forked worker sets for itself: they may differ from the template's.
PER_WORKER = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH"})

#: Seconds a template may take to import torch and the worker's code.
START_TIMEOUT = 120.0


class ForkedWorker:
    """A worker forked by a template: what ``WorkerProcess`` needs of a ``subprocess.Popen``.
    Its exit status comes from the template, which is its parent and reaps it."""

    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self.exited = exited

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def poll(self) -> int | None:
        return self.returncode


class Template:
    """One template process and the workers it forked."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._replies: dict[int, asyncio.Future[int]] = {}
        self._children: dict[int, asyncio.Future[int]] = {}
        # Exits reported before their fork's reply was read (a worker that died at once).
        self._early_exits: dict[int, int] = {}
        self._ids = itertools.count()
        self.failure = ""

    @property
    def alive(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Start the process and wait until it has imported what workers need; RuntimeError if
        it cannot."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {key: value for key, value in self.env.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self.process = await loop.run_in_executor(None, self._spawn, env, theirs)
        except OSError as exc:
            ours.close()
            raise RuntimeError(f"cannot start the worker template: {exc}") from None
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        # Marked as seen: a start cancelled meanwhile (the server stopping) leaves nobody to read it.
        self._ready.add_done_callback(_seen)
        loop.add_reader(ours.fileno(), self._readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except (TimeoutError, RuntimeError) as exc:
            self.close()
            raise RuntimeError(str(exc) or f"the worker template did not start in {START_TIMEOUT:g} s") from None

    def _spawn(self, env: dict[str, str], theirs: socket.socket) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "server.workers.child.template", "--fd", str(theirs.fileno()), "--parent", str(os.getpid())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()

    async def fork(self, env: Mapping[str, str], cwd: str, channel: socket.socket, output: socket.socket) -> ForkedWorker:
        """A new worker running ``python -m server.workers.child`` on ``channel`` (the worker's end
        of its socket pair) with ``output`` as its stdout and stderr, both closed here once the
        worker has them; RuntimeError if the template cannot fork it, both then left open."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        reply: asyncio.Future[int] = loop.create_future()
        self._replies[request_id] = reply
        message = json.dumps({"id": request_id, "env": dict(env), "cwd": cwd}).encode()
        try:
            self._sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(channel.fileno(), output.fileno()))])
            pid = await reply
        except OSError as exc:
            raise RuntimeError(f"cannot reach the worker template: {exc}") from None
        finally:
            self._replies.pop(request_id, None)
        channel.close()  # the worker has its own copies now
        output.close()
        exited = self._children[pid] = loop.create_future()
        if pid in self._early_exits:
            exited.set_result(self._early_exits.pop(pid))
        return ForkedWorker(pid, exited)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost("the worker template exited")
                return
            self._handle(json.loads(data))

    def _handle(self, message: dict[str, Any]) -> None:
        if "exit" in message:
            pid, code = int(message["exit"]), int(message["code"])
            exited = self._children.pop(pid, None)
            if exited is None:
                self._early_exits[pid] = code
            elif not exited.done():
                exited.set_result(code)
        elif "ready" in message:
            log.info("worker template ready (pid %s, imports took %s s)", message["ready"], message.get("seconds"))
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif "failed" in message:
            self.failure = str(message["failed"])
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(RuntimeError(f"the worker template failed to start: {self.failure}"))
        elif "id" in message:
            reply = self._replies.get(int(message["id"]))
            if reply is not None and not reply.done():
                if "pid" in message:
                    reply.set_result(int(message["pid"]))
                else:
                    reply.set_exception(RuntimeError(str(message.get("error", "fork failed"))))

    def _lost(self, why: str) -> None:
        """The template is gone: so are its workers (PR_SET_PDEATHSIG), killed."""
        self.close()
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(RuntimeError(why))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(self.failure or why))
        for exited in self._children.values():
            if not exited.done():
                exited.set_result(-9)
        self._children.clear()

    def close(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:
                pass
            self._sock.close()
            self._sock = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _seen(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _fd_bytes(*fds: int) -> bytes:
    import array

    return array.array("i", fds).tobytes()


class WorkerTemplates:
    """The server's worker template: started at once (``warm``), restarted when it dies, and
    given up for plain spawning, with one warning, when it cannot start."""

    def __init__(self, base_env: Mapping[str, str]) -> None:
        #: The environment every model's workers get, less what each sets for itself.
        self.base_env = {key: value for key, value in process_environment(base_env, 1).items() if key not in PER_WORKER}
        self._base_path = base_env.get("PYTHONPATH", "")
        self._template: Template | None = None
        self._starting: asyncio.Task[Template | None] | None = None
        self._given_up = False

    def warm(self) -> None:
        """Start the template now, so that the first worker finds it ready."""
        if self._starting is None and not self._given_up:
            self._starting = asyncio.create_task(self._start())

    def eligible(self, env: Mapping[str, str], model_dir: str) -> bool:
        """Whether a worker with ``env`` (and ``model_dir`` first on its PYTHONPATH) can be forked
        from the template: its environment is the server's, but for what a worker sets itself."""
        if {key: value for key, value in env.items() if key not in PER_WORKER} != self.base_env:
            return False
        path = env.get("PYTHONPATH", "")
        return path in (model_dir, os.pathsep.join(p for p in (model_dir, self._base_path) if p))

    async def fork(
        self, env: Mapping[str, str], cwd: str, channel: socket.socket, output: socket.socket
    ) -> ForkedWorker | None:
        """A worker forked from the template, or None: spawn it (``channel`` and ``output`` are
        then left open)."""
        if self._given_up or not self.eligible(env, cwd):
            return None
        template = self._template if self._template is not None and self._template.alive else None
        if template is None:
            if self._starting is None or self._starting.done():
                if self._template is not None:
                    log.warning("the worker template exited; starting another")
                self._starting = asyncio.create_task(self._start())
            template = await asyncio.shield(self._starting)
            if template is None:
                return None
        try:
            return await template.fork(env, cwd, channel, output)
        except RuntimeError as exc:
            log.warning("the worker template could not fork a worker (%s); this one is spawned", exc)
            return None

    async def _start(self) -> Template | None:
        # The template imports from the server's PYTHONPATH, as a spawned worker would.
        template = Template({**self.base_env, "PYTHONPATH": self._base_path} if self._base_path else self.base_env)
        started = time.perf_counter()
        try:
            await template.start()
        except RuntimeError as exc:
            self._given_up = True
            log.warning("workers will be spawned, not forked: %s", exc)
            return None
        log.debug("worker template started in %.2f s", time.perf_counter() - started)
        self._template = template
        return template

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._template is not None:
            self._template.close()
            self._template = None
