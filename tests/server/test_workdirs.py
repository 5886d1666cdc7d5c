"""The server's private working directory: a start removes those that dead servers left in its
temp dir, and only those. Never a live server's (two may share a TMPDIR), never anything else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.models.workdirs import host_token, process_start
from tests.conftest import Model, ServerFactory, alive, wait_for


def owned_by(pid: int, start: int, host: str | None = None) -> str:
    return f"marserve-{pid}-{start}-{host or host_token()}-abcd1234"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    start = wait_for(lambda: process_start(process.pid), what="the process's start time")
    assert isinstance(start, int)
    process.kill()
    process.wait()
    return process.pid, start


def leftover(tmp: Path, name: str) -> Path:
    """A working directory as a server leaves it: an extracted archive inside."""
    directory = tmp / name
    (directory / "marserve-model-x1y2z3ab" / "MAR-INF").mkdir(parents=True)
    (directory / "marserve-model-x1y2z3ab" / "weights.pt").write_bytes(b"w" * 1024)
    directory.chmod(0o700)
    return directory


def test_a_start_removes_the_folders_of_dead_servers_only(
    start_server: ServerFactory, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    srv = start_server(root=tmp_path / "server", start=False)
    tmp = srv.tmp
    dead_pid, dead_start = dead_process()
    live_start = wait_for(lambda: process_start(sleeper.pid), what="the sleeper's start time")
    own_start = process_start(os.getpid())
    assert isinstance(live_start, int) and own_start is not None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")

    dead = leftover(tmp, owned_by(dead_pid, dead_start))
    # Its pid now belongs to another process: the start time tells them apart.
    reused = leftover(tmp, owned_by(sleeper.pid, live_start + 1))
    kept = {
        "live": leftover(tmp, owned_by(sleeper.pid, live_start)),
        "this process": leftover(tmp, owned_by(os.getpid(), own_start)),
        # Made where /proc could not be read: a running process with that pid may be the owner.
        "unknown start, live pid": leftover(tmp, owned_by(sleeper.pid, 0)),
        # Another kernel's or pid namespace's pids mean nothing here.
        "another host": leftover(tmp, owned_by(dead_pid, dead_start, host="0badc0de")),
        "older naming": leftover(tmp, "marserve-abcd1234"),
        "not ours": leftover(tmp, "unrelated"),
        "almost our name": leftover(tmp, owned_by(dead_pid, dead_start) + "x"),
    }
    link = tmp / owned_by(dead_pid, dead_start).replace("abcd1234", "link1234")
    link.symlink_to(elsewhere)
    plain_file = tmp / owned_by(dead_pid, dead_start).replace("abcd1234", "file1234")
    plain_file.write_text("not a directory")

    srv.start()

    assert not dead.exists()
    assert not reused.exists()
    for what, path in kept.items():
        assert path.is_dir(), what
    assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "keep"
    assert plain_file.read_text() == "not a directory"
    # The server's own directory names it.
    [own] = [p for p in tmp.glob(f"marserve-{os.getpid()}-*") if p not in kept.values()]
    assert own.name.startswith(f"marserve-{os.getpid()}-{own_start}-{host_token()}-")
    assert own.stat().st_mode & 0o777 == 0o700
    log = srv.log.read_text()
    assert str(dead) in log and str(reused) in log


def test_a_clean_stop_removes_the_servers_folder(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(root=tmp_path / "server")
    [own] = srv.tmp.glob("marserve-*")
    srv.stop()
    assert not own.exists()


def test_a_server_killed_with_sigkill_leaves_a_folder_that_the_next_start_removes(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    first = start_server(
        root=tmp_path / "server", subprocess=True, models=[Model("echo", "echo_handler.py", initial_workers=1)]
    )
    assert first.process is not None
    [extracted] = first.tmp.glob("marserve-*/marserve-model-*")
    workdir = extracted.parent
    assert workdir.name.startswith(f"marserve-{first.process.pid}-")
    workers = first.worker_pids()
    assert workers
    # A server that starts beside a live one, in the same TMPDIR, leaves that one's folder alone.
    beside = start_server(root=tmp_path / "server")
    [beside_dir] = (p for p in beside.tmp.glob("marserve-*") if p != workdir)
    assert workdir.is_dir() and extracted.is_dir()

    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), what="the workers to die with the frontend")
    assert extracted.is_dir()  # nothing cleaned up after a SIGKILL

    # The next start in the same TMPDIR removes the dead server's folder, and only that one.
    third = start_server(root=tmp_path / "server")
    assert not workdir.exists()
    assert beside_dir.is_dir()
    assert len(list(third.tmp.glob(f"marserve-{os.getpid()}-*"))) == 2
