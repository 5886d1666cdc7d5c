"""The server's private working directory in ``$TMPDIR``, and those left by servers that died.

Archives are extracted under ``marserve-<pid>-<start>-<host>-<random>``, made by the server whose
process id is ``pid``. ``start`` is that process's start time (clock ticks after boot, field 22 of
``/proc/<pid>/stat``), so that another process that got the same pid later is not taken for the
owner; ``host`` is a token of this kernel's boot and pid namespace, since a pid means something
only there. A clean stop removes the directory; a server killed with SIGKILL cannot, so each
start removes the directories of owners that are gone, and only those: a directory is removed
only if its name has exactly this form, it is a real directory (not a link) of this user, its
``host`` is ours, and no process with its pid and start time is running. Two servers may share
a ``$TMPDIR``: a live one's directory is never touched, nor anything that is not such a directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("marserve")

PREFIX = "marserve-"
# mkdtemp's random suffix: 8 characters of [a-z0-9_].
_NAME = re.compile(r"marserve-(\d+)-(\d+)-([0-9a-f]{8})-[a-z0-9_]{8}")
_UNKNOWN_START = 0


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot; None if no such process runs (a
    zombie, which has exited, does not) or there is no ``/proc`` to ask."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": split after the last.
    fields = text.rsplit(")", 1)[-1].split()
    try:
        state, start = fields[0], int(fields[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None
    return None if state in ("Z", "X", "x") else start


def host_token() -> str:
    """8 hex digits naming this boot of this kernel and this pid namespace: where a pid means this process."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def owner_alive(pid: int, start: int) -> bool:
    """Whether the process that made a directory named with ``pid`` and ``start`` still runs."""
    if start == _UNKNOWN_START:
        # Made where /proc could not be read: any process with that pid might be the owner.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # it exists (EPERM), and may be ours
        return True
    return process_start(pid) == start


def make_workdir(temp_dir: str | os.PathLike[str]) -> Path:
    """Remove what dead servers left in ``temp_dir``, then make this server's own directory (0700)."""
    remove_dead(temp_dir)
    pid = os.getpid()
    start = process_start(pid)
    prefix = f"{PREFIX}{pid}-{_UNKNOWN_START if start is None else start}-{host_token()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=temp_dir))


def remove_dead(temp_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the working directories in ``temp_dir`` whose servers are gone; returns them."""
    host = host_token()
    uid = os.getuid()
    removed = []
    try:
        entries = list(os.scandir(temp_dir))
    except OSError as exc:
        log.warning("cannot look for leftover working directories in %s: %s", temp_dir, exc)
        return []
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None or match[3] != host:
            continue
        pid, start = int(match[1]), int(match[2])
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or owner_alive(pid, start):
            continue
        path = Path(entry.path)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            log.info("removed %s, left by marserve process %d, which is gone", path, pid)
            removed.append(path)
        else:
            log.warning("could not remove %s, left by marserve process %d, which is gone", path, pid)
    return removed
