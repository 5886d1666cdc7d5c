"""scripts/demo, run as the README says, leaves the Quick start runnable as written."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not all(_port_free(p) for p in (8080, 8081, 8082)), reason="the demo needs ports 8080-8082")
def test_demo_predicts_the_samples_and_leaves_the_model_store_as_it_was(tmp_path: Path) -> None:
    store = ROOT / "model-store"
    before = sorted(p.name for p in store.iterdir())
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo")], cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "==> 20 of 20 predictions match the true label" in result.stdout
    # The Quick start's step 1 (model-archiver without --force) would otherwise fail on digits.mar.
    assert sorted(p.name for p in store.iterdir()) == before
    assert not list(tmp_path.glob("marserve-demo-*"))
