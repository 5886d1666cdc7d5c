from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def model_inputs(tmp_path: Path) -> Path:
    """A directory with everything a typical archive is made of."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.py").write_text("import torch\n\nclass Net(torch.nn.Module):\n    pass\n")
    (src / "weights.pt").write_bytes(bytes(range(256)) * 64)
    (src / "my_handler.py").write_text("def handle(data, context):\n    return data\n")
    (src / "index_to_name.json").write_text('{"0": "zero"}')
    (src / "requirements.txt").write_text("numpy\n")
    (src / "model-config.yaml").write_text("batchSize: 4\n")
    extra = src / "assets"
    (extra / "vocab").mkdir(parents=True)
    (extra / "labels.txt").write_text("a\nb\n")
    (extra / "vocab" / "words.txt").write_text("hello\n")
    (extra / "__pycache__").mkdir()
    (extra / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    (extra / ".git").mkdir()
    (extra / ".git" / "HEAD").write_text("ref")
    return src


def archiver_args(src: Path, out: Path, *extra: str, handler: str | None = None) -> list[str]:
    """torch-model-archiver flags for the ``model_inputs`` fixture; both CLIs take them."""
    return [
        "--model-name", "toy",
        "--version", "2.1",
        "--model-file", str(src / "model.py"),
        "--serialized-file", str(src / "weights.pt"),
        "--handler", handler or str(src / "my_handler.py"),
        "--extra-files", f"{src / 'index_to_name.json'},{src / 'assets'}",
        "-r", str(src / "requirements.txt"),
        "-c", str(src / "model-config.yaml"),
        "--export-path", str(out),
        *extra,
    ]  # fmt: skip
