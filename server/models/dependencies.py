"""A model's own Python dependencies: its archive's requirements file, pip-installed for it alone.

Off unless ``install_py_dep_per_model=true``. pip installs with ``--target`` into a directory of
the model's private working copy, which its workers get on ``PYTHONPATH``; the server's own
environment is never written to. pip runs in isolated mode (``-I``), so neither ``PYTHONPATH``
nor the model's files can stand in for pip itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from ..errors import DependencyInstallFailed, InvalidModel

log = logging.getLogger("marserve.dependencies")

PIP_TIMEOUT = 900.0  # s for one model's whole install
_REASON_CHARS = 300


def requirements_path(model_dir: Path, requirements_file: str) -> Path:
    """The manifest's ``requirementsFile`` inside ``model_dir``; InvalidModel if it is not there."""
    root = model_dir.resolve()
    path = (root / requirements_file).resolve()
    # The manifest is untrusted: pip -r must not read a file from outside the archive.
    if not path.is_relative_to(root):
        raise InvalidModel(f"requirements file is outside the archive: {requirements_file}")
    if not path.is_file():
        raise InvalidModel(f"requirements file not found in the archive: {requirements_file}")
    return path


async def install_requirements(
    model_name: str, requirements: Path, target: Path, *, env: Mapping[str, str], timeout: float = PIP_TIMEOUT
) -> None:
    """``pip install -r requirements --target target``, run from the model's directory.

    Raises DependencyInstallFailed, with pip's last error line, on failure or timeout.
    """
    command = [
        sys.executable, "-I", "-m", "pip", "install", "--upgrade", "--no-input",
        "--disable-pip-version-check", "--no-warn-script-location",
        "--target", str(target), "--requirement", str(requirements),
    ]  # fmt: skip
    log.info("model %s: installing %s into %s", model_name, requirements.name, target)
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=requirements.parent,  # relative paths in the file are the archive's
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # so a timeout can stop pip and whatever it started
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        raise DependencyInstallFailed(model_name, f"pip did not finish within {timeout:g} s") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    text = output.decode(errors="replace")
    returncode = process.returncode or 0  # communicate() returned: pip has exited
    if returncode != 0:
        log.error("model %s: pip install failed (exit %d):\n%s", model_name, returncode, text.rstrip())
        raise DependencyInstallFailed(model_name, _reason(text, returncode))
    log.info("model %s: installed custom pip packages", model_name)


def _reason(output: str, returncode: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    # pip's first ERROR line names the failing requirement; the ones after it summarise.
    reason = errors[0] if errors else lines[-1] if lines else f"pip exited with status {returncode}"
    reason = reason.removeprefix("ERROR:").strip()
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 3] + "..."
