"""In-process handler tests: a Context over a temporary model_dir, tiny models, and encoded images."""

from __future__ import annotations

import base64
import io
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import handlers
from handlers.context import Context, RequestProcessor

# Workers put the ts shim on sys.path; these tests import handlers the same way, in-process.
if handlers.COMPAT_PATH not in sys.path:
    sys.path.insert(0, handlers.COMPAT_PATH)


@pytest.fixture
def model_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty model directory; modules imported from it are forgotten afterwards."""
    directory = tmp_path / "model"
    directory.mkdir()
    yield directory
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def make_context(
    model_dir: Path,
    model: dict[str, Any] | None = None,
    *,
    limit_max_image_pixels: bool = True,
    gpu: int | None = None,
    metrics: Any = None,
    yaml_config: dict[str, Any] | None = None,
) -> Context:
    """A Context as a worker builds it, with ``model`` as the manifest's "model" section."""
    return Context(
        model_name="m",
        model_dir=str(model_dir),
        manifest={"model": {"modelName": "m", **(model or {})}},
        batch_size=8,
        gpu=gpu,
        mms_version="0.12.0",
        limit_max_image_pixels=limit_max_image_pixels,
        metrics=metrics,
        model_yaml_config=yaml_config,
    )


def run_batch(handler: Any, context: Context, data: list[Any], headers: dict[str, str] | None = None) -> list[Any]:
    """handle() as the worker calls it: fresh request ids and processors for this batch."""
    context.request_ids = {i: f"req-{i}" for i in range(len(data))}
    context.request_processor = [RequestProcessor(dict(headers or {})) for _ in data]
    return handler.handle(data, context)


def write_model_file(model_dir: Path, source: str, name: str = "model.py") -> str:
    (model_dir / name).write_text(textwrap.dedent(source))
    return name


def sample_image(width: int = 320, height: int = 240, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth, noisy picture: compresses like a photo, differs between seeds."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 6, width)[None, :, None] + np.linspace(0, 4, height)[:, None, None]
    pixels = (np.sin(x * np.array([1.0, 1.3, 1.7]) + seed) + 1) * 110 + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class MetricsRecorder:
    """Stands in for context.metrics, recording add_time calls."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def add_time(self, name: str, value: float, idx: Any = None, unit: str = "ms", **_: Any) -> None:
        self.times.append((name, value))
