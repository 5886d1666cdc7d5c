"""An archive made by marserve's model-archiver loads and predicts in the real TorchServe 0.12.

TorchServe lives in .venv-torchserve (scripts/torchserve-venv, which scripts/test runs) and needs
Java 17; it is kept out of .venv because its ``ts`` package must not meet marserve's shim.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from archiver import ArchiveSpec, build_archive
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCHSERVE = ROOT / ".venv-torchserve" / "bin" / "torchserve"
DIGITS = ROOT / "examples" / "digits"

pytestmark = pytest.mark.skipif(
    not TORCHSERVE.exists() or shutil.which("java") is None,
    reason="needs .venv-torchserve (scripts/torchserve-venv) and Java 17",
)


def test_digits_archive_predicts_in_torchserve(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    build_archive(
        ArchiveSpec(
            model_name="digits", version="1.0", handler=str(DIGITS / "digits_handler.py"),
            model_file=str(DIGITS / "model.py"), serialized_file=str(DIGITS / "digits.pt"),
            extra_files=str(DIGITS / "index_to_name.json"), export_path=str(store),
        )
    )  # fmt: skip
    ports = [free_port(), free_port(), free_port()]
    config = tmp_path / "config.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": f"{TORCHSERVE.parent}:{os.environ['PATH']}"}
    command = [str(TORCHSERVE), "--ncs", "--model-store", str(store), "--ts-config", str(config)]
    # Not captured: the Java process TorchServe leaves running would hold the pipes open forever.
    with open(tmp_path / "torchserve.out", "wb") as log:
        subprocess.run([*command, "--start", "--disable-token-auth", "--enable-model-api"], env=env, cwd=tmp_path,
                       check=True, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with httpx.Client(timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{ports[0]}/ping").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "TorchServe did not start"
                time.sleep(0.2)
            registered = client.post(
                f"http://127.0.0.1:{ports[1]}/models",
                params={"url": "digits.mar", "initial_workers": 1, "synchronous": "true"},
            )
            assert registered.status_code == 200, registered.text
            for digit in ("2", "7"):
                image = (DIGITS / "samples" / f"digit_{digit}.png").read_bytes()
                reply = client.put(f"http://127.0.0.1:{ports[0]}/predictions/digits", content=image)
                assert reply.status_code == 200, reply.text
                assert next(iter(reply.json())) == digit
    finally:
        subprocess.run([str(TORCHSERVE), "--stop"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
