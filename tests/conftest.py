"""Fixtures shared by the suite: free ports, archives built from test handlers, and real servers.

Two kinds of server, with one test-facing interface (``Server``'s):

- ``InProcessServer``: ``server.serve.serve()`` on its own event loop in a thread of the test
  process, configured from a config.properties the way ``serve`` reads it. Most tests use it,
  through the ``start_server`` / ``start_module_server`` factories (and ``server`` /
  ``shared_server``): no interpreter to start, so it is up in a fraction of the time.
- ``Server``: a real ``serve --start --foreground`` process, for what only a process shows: the
  CLI, signals, ``serve --stop``, a SIGKILLed frontend, the frontend's own memory, process-wide
  state (its environment).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import httpx
import pytest
import uvloop

from archiver import MANIFEST_PATH, ArchiveSpec, build_archive
from scripts.bench.ports import free_port

ASSETS = Path(__file__).parent / "assets"
BIN = Path(sys.executable).parent

# Set in the environment of every test server, and so of its workers: how worker_pids() tells
# the workers of one in-process server from another's (all are children of this process).
SERVER_MARKER = "MARSERVE_TEST_SERVER"
_server_ids = itertools.count(1)



def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy and return its value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    # A killed child may linger as a zombie until the server reaps it, and it
    # may be reaped between any two looks, so one read of /proc decides.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def make_mar(store: Path, name: str, handler: str, *, version: str = "1.0", **spec: object) -> Path:
    """Archive ``tests/assets/<handler>`` (or a built-in handler name) into ``store``."""
    handler_path = ASSETS / handler
    return build_archive(
        ArchiveSpec(
            model_name=name,
            version=version,
            handler=str(handler_path) if handler_path.exists() else handler,
            export_path=str(store),
            force=True,
            **spec,  # type: ignore[arg-type]
        )
    )


def zip_archive(path: Path, *members: tuple[str, bytes], manifest: str, symlinks: dict[str, str] = {}) -> Path:  # noqa: B006
    """A zip archive written by hand, so it can hold what model-archiver never writes: hostile
    names, contents and symlink entries (``{name: target}``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST_PATH, manifest)
        for name, data in members:
            archive.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


class Server:
    """A real ``serve`` process on free loopback ports, with its own TMPDIR, model store and logs.

    Also the interface every test server has: ``InProcessServer`` shares the layout, the config
    file, ``command()`` (to run the CLI on the same configuration), ``register`` and ``predict``.
    """

    def __init__(self, root: Path, config: str = "", args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.store = root / "model-store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.tmp = root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.ports = [free_port(), free_port(), free_port()]
        self.inference = f"http://127.0.0.1:{self.ports[0]}"
        self.management = f"http://127.0.0.1:{self.ports[1]}"
        self.metrics = f"http://127.0.0.1:{self.ports[2]}"
        self.config = root / "config.properties"
        # gRPC stays off unless the test configures it: its default ports (7070, 7071) are fixed,
        # and test servers running side by side, or another marserve on the machine, would race
        # for them (tests/server/test_grpc.py gives its servers free ports).
        grpc = "" if "grpc" in config else "enable_grpc=false\n"
        self.config.write_text(
            f"inference_address={self.inference}\nmanagement_address={self.management}\n"
            f"metrics_address={self.metrics}\nlog_location={root / 'logs'}\n{grpc}{config}"
        )
        self.args = args
        self.id = f"{os.getpid()}-{next(_server_ids)}"
        self.env = {**os.environ, "TMPDIR": str(self.tmp), SERVER_MARKER: self.id}
        # Everything the server logs, and its access log.
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        # What the serve command runs under (e.g. ["prlimit", "--nofile=1024:1024", "--"]).
        self.launcher: list[str] = []
        # One client for the test's calls: a new one per call costs more than the server's work.
        self.http = httpx.Client(timeout=120)

    def command(self, *args: str) -> list[str]:
        return [str(BIN / "serve"), *args, "--model-store", str(self.store), "--ts-config", str(self.config)]

    def start(self, timeout: float = 30.0) -> Server:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, *self.command("--start", "--foreground"), *self.args],
                env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.inference}/ping", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def register(self, url: str, **params: object) -> httpx.Response:
        query = {"url": url, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}}
        return self.http.post(f"{self.management}/models", params=query)

    def predict(self, model: str, body: bytes = b"x", **kwargs: object) -> httpx.Response:
        return self.http.post(f"{self.inference}/predictions/{model}", content=body, **kwargs)  # type: ignore[arg-type]

    def _frontend_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """Live worker processes of this server, with this server's marker in their environment:
        its children running server.workers.child, and the children of its worker template (which
        run with the template's command line)."""
        frontend = self._frontend_pid()
        marker = f"{SERVER_MARKER}={self.id}".encode()
        found: dict[int, tuple[int, bool]] = {}  # pid: (parent, is the template's command line)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
                if b"server.worker" not in cmdline or marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:
                continue
            if " Z " in stat.rsplit(")", 1)[1][:3]:
                continue  # exited, not yet reaped
            found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), b"child.template" in cmdline)
        templates = {pid for pid, (parent, template) in found.items() if template and parent == frontend}
        return [pid for pid, (parent, _) in found.items() if pid not in templates and (parent == frontend or parent in templates)]


class _ServerLog(logging.StreamHandler):  # type: ignore[type-arg]
    """One in-process server's log: the records logged by its threads (its event loop's and its
    executor's), formatted as ``serve --foreground`` formats them, into ``server.log``."""

    def __init__(self, stream: TextIO, thread_name: str, config: Any) -> None:
        from server.logs import log_formatter

        super().__init__(stream)
        self.setLevel(config.log_level)
        self.setFormatter(log_formatter(config))
        own = (thread_name, f"{thread_name}_")
        self.addFilter(lambda record: record.threadName == own[0] or record.threadName.startswith(own[1]))


class _SharedStream:
    """The log file as the access log writes it: under the log handler's lock, so that the two
    writers' lines never interleave."""

    def __init__(self, stream: TextIO, lock: threading.RLock) -> None:
        self._stream = stream
        self._lock = lock

    def write(self, text: str) -> int:
        with self._lock:
            return self._stream.write(text)

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()


# The root logger's level is the process's; while in-process servers run it is the lowest of
# their log_levels (and of the level it had before), and it is put back when the last one stops.
_root_levels: list[int] = []
_root_level_before = logging.WARNING


def _raise_root_level(level: int) -> None:
    global _root_level_before
    root = logging.getLogger()
    if not _root_levels:
        _root_level_before = root.level
    _root_levels.append(level)
    root.setLevel(min(_root_level_before, *_root_levels))


def _restore_root_level(level: int) -> None:
    _root_levels.remove(level)
    root = logging.getLogger()
    root.setLevel(min(_root_level_before, *_root_levels) if _root_levels else _root_level_before)


def _cli_options(server: Server) -> tuple[dict[str, object], bool]:
    """The config overrides and --ncs that ``serve`` would take from the server's ``args``
    (parsed by the CLI's own options; mapped as server/cli.py _config() maps them)."""
    from server.cli import cli, config_overrides

    options = cli.make_context("serve", [*server.args, "--model-store", str(server.store)]).params
    return config_overrides(options), bool(options["ncs"])


class InProcessServer(Server):
    """``serve()`` on its own event loop (uvloop, as the CLI runs it) in a thread of this process.

    The configuration is read from ``config`` and ``args`` as ``serve --foreground`` reads them;
    ``env`` is the environment serve() and its workers see; token keys go to ``root``. What only the
    process's own environment decides is the test process's: a server that needs its own
    (SSL_CERT_FILE for downloads) is a ``Server``.
    """

    STOP_TIMEOUT = 90.0

    def __init__(self, root: Path, config: str = "", args: tuple[str, ...] = ()) -> None:
        super().__init__(root, config, args)
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stream: TextIO | None = None
        self._handler: _ServerLog | None = None
        self._level = logging.NOTSET
        self._thread_name = f"marserve-{self.id}"

    def start(self, timeout: float = 30.0) -> InProcessServer:
        from server.config import load_config
        from server.logs import access_log_to
        from server.models.snapshot import plan_snapshots

        assert self.thread is None, "the server is running"
        self._ready.clear()
        self._error = None
        overrides, ncs = _cli_options(self)
        config = load_config(self.config, env=self.env, overrides=overrides)
        snapshots = plan_snapshots(config, enabled=not ncs)
        self._open_log(config)
        assert self._handler is not None and self._stream is not None
        access_log = access_log_to(_SharedStream(self._stream, self._handler.lock), config)  # type: ignore[arg-type]
        self.thread = threading.Thread(
            target=self._run, args=(config, snapshots, access_log), name=self._thread_name, daemon=True
        )
        self.thread.start()
        ready = self._ready.wait(timeout)
        if self._error is not None:
            self.thread.join(self.STOP_TIMEOUT)
            self.thread = None
            self._close_log()
            raise RuntimeError(f"serve() failed to start: {self._error!r}\n{self.log.read_text()}") from self._error
        if not ready:
            self.stop()
            raise RuntimeError(f"server did not start within {timeout} s:\n{self.log.read_text()}")
        return self

    def _run(self, config: object, snapshots: object, access_log: object) -> None:
        from server.serve import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            # asyncio.to_thread() runs in threads named after the server, so its log keeps their records.
            self._loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix=self._thread_name))
            self._stop = asyncio.Event()
            await serve(
                config, environ=self.env, stop=self._stop, key_file=self.root / "key_file.json",  # type: ignore[arg-type]
                temp_dir=self.tmp, on_ready=lambda _urls: self._ready.set(), access_log=access_log,  # type: ignore[arg-type]
                snapshots=snapshots,  # type: ignore[arg-type]
            )  # fmt: skip

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: serve()'s way out of a failed start
            self._error = exc
            logging.getLogger("marserve").error("in-process server failed: %r", exc, exc_info=exc)
        finally:
            self._ready.set()

    def _open_log(self, config: Any) -> None:
        self._stream = open(self.log, "a", encoding="utf-8")  # noqa: SIM115 - closed by stop()
        self._handler = _ServerLog(self._stream, self._thread_name, config)
        logging.getLogger().addHandler(self._handler)
        self._level = logging.getLevelName(config.log_level)
        _raise_root_level(self._level)

    def _close_log(self) -> None:
        if self._handler is None:
            return
        logging.getLogger().removeHandler(self._handler)
        _restore_root_level(self._level)
        self._handler.close()
        self._handler = None
        assert self._stream is not None
        self._stream.close()

    def stop(self) -> None:
        """Set serve()'s stop event, as SIGTERM would, and wait for it to finish (workers stopped)."""
        self.http.close()
        if self.thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self.thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop closed meanwhile: serve() has returned
        self.thread.join(self.STOP_TIMEOUT)
        if self.thread.is_alive():
            raise RuntimeError(f"serve() did not stop within {self.STOP_TIMEOUT} s:\n{self.log.read_text()}")
        self.thread = None
        self._close_log()
        if self._error is not None:
            raise RuntimeError(f"serve() failed: {self._error!r}\n{self.log.read_text()}") from self._error

    def _frontend_pid(self) -> int:
        assert self.thread is not None, "the server is not running"
        return os.getpid()


class Model:
    """An archive ``make_mar`` builds into a server's store as ``<name>.mar``, and (unless
    ``register`` is False) registers with ``params``, as the management API's query string."""

    def __init__(
        self, name: str, handler: str, *, version: str = "1.0", register: bool = True,
        archive: Mapping[str, object] | None = None, **params: object,
    ) -> None:  # fmt: skip
        self.name = name
        self.handler = handler
        self.version = version
        self.register = register
        self.archive = dict(archive or {})
        self.params = params

    def install(self, server: Server) -> None:
        make_mar(server.store, self.name, self.handler, version=self.version, **self.archive)
        if self.register:
            reply = server.register(f"{self.name}.mar", **self.params)
            assert reply.status_code == 200, reply.text


class ServerFactory:
    """``start_server(config, models, ...)``: a started server with ``models`` installed in order;
    every server it made is stopped when the fixture ends (``stop()`` may come earlier)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self.servers: list[Server] = []

    def __call__(
        self,
        config: str = "",
        models: Iterable[Model] = (),
        *,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        root: Path | None = None,
        name: str = "server",
        subprocess: bool = False,
        start: bool = True,
    ) -> Server:
        """``subprocess``: a ``serve`` process rather than an in-process server. ``start`` False:
        not started (nor ``models`` installed), for a test that changes its config first.
        ``root``: the server's directory (default: a new one named after ``name``)."""
        cls = Server if subprocess else InProcessServer
        srv = cls(root if root is not None else self._tmp.mktemp(name), config=config, args=args)
        srv.env.update(env or {})
        self.servers.append(srv)
        if start:
            srv.start()
            for model in models:
                model.install(srv)
        return srv

    def stop_all(self) -> None:
        errors = []
        for srv in reversed(self.servers):
            try:
                srv.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Servers for one test."""
    factory = ServerFactory(tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Servers for a whole test module, for tests that do not disturb each other."""
    factory = ServerFactory(tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture
def server(start_server: ServerFactory, tmp_path: Path) -> Server:
    """A fresh in-process server per test, in ``tmp_path``."""
    return start_server(root=tmp_path)


@pytest.fixture(scope="module")
def shared_server(start_module_server: ServerFactory) -> Server:
    """One in-process server for a whole test module, for tests that do not disturb each other."""
    return start_module_server()


@pytest.fixture
def subprocess_server(start_server: ServerFactory, tmp_path: Path) -> Server:
    """A fresh ``serve`` process per test, in ``tmp_path``: for the CLI and process behaviour."""
    return start_server(root=tmp_path, subprocess=True)
