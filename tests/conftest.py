"""Fixtures shared by the suite: free ports, archives built from test handlers, and real servers."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from archiver import MANIFEST_PATH, ArchiveSpec, build_archive

ASSETS = Path(__file__).parent / "assets"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """A real ``serve`` process on free loopback ports, with its own TMPDIR, model store and logs."""

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
        self.config.write_text(
            f"inference_address={self.inference}\nmanagement_address={self.management}\n"
            f"metrics_address={self.metrics}\nlog_location={root / 'logs'}\n{config}"
        )
        self.args = args
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        # One client for the test's calls: a new one per call costs more than the server's work.
        self.http = httpx.Client(timeout=120)

    def command(self, *args: str) -> list[str]:
        return [str(BIN / "serve"), *args, "--model-store", str(self.store), "--ts-config", str(self.config)]

    def start(self, timeout: float = 30.0) -> "Server":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.command("--start", "--foreground"), *self.args],
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

    def worker_pids(self) -> list[int]:
        """Live worker processes of this server (its children running server.worker)."""
        assert self.process is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.process.pid and b"server.worker" in cmdline:
                pids.append(int(entry.name))
        return pids


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A fresh server per test."""
    srv = Server(tmp_path).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a whole test module, for tests that do not disturb each other."""
    srv = Server(tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()
