"""Handlers written for TorchServe run unchanged: the ``ts`` import names and the digits example."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import handlers
from handlers.context import Context
from server.workers.child.loader import load_handler
from tests.handlers.conftest import encode, make_context, run_batch, sample_image, write_model_file

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_ts_names_are_marserve_objects() -> None:
    import ts
    from ts.context import Context as TsContext
    from ts.handler_utils.timer import timed
    from ts.torch_handler.base_handler import BaseHandler
    from ts.torch_handler.image_classifier import ImageClassifier
    from ts.torch_handler.image_segmenter import ImageSegmenter
    from ts.torch_handler.object_detector import ObjectDetector
    from ts.torch_handler.vision_handler import VisionHandler
    from ts.utils.util import PredictionException, list_classes_from_module, load_label_mapping, map_class_to_label

    import handlers.base_handler
    import handlers.errors
    import handlers.image_classifier
    import handlers.image_segmenter
    import handlers.object_detector
    import handlers.utils
    import handlers.vision_handler

    assert Path(ts.__file__).is_relative_to(handlers.COMPAT_PATH)  # the shim, not an installed TorchServe
    assert BaseHandler is handlers.base_handler.BaseHandler
    assert VisionHandler is handlers.vision_handler.VisionHandler
    assert ImageClassifier is handlers.image_classifier.ImageClassifier
    assert ImageSegmenter is handlers.image_segmenter.ImageSegmenter
    assert ObjectDetector is handlers.object_detector.ObjectDetector
    assert issubclass(ImageClassifier, VisionHandler) and issubclass(VisionHandler, BaseHandler)
    assert PredictionException is handlers.errors.PredictionException
    assert PredictionException("nope", 418).error_code == 418
    assert TsContext is Context and timed is handlers.utils.timed
    assert map_class_to_label is handlers.utils.map_class_to_label
    assert (list_classes_from_module, load_label_mapping) == (
        handlers.utils.list_classes_from_module,
        handlers.utils.load_label_mapping,
    )


def test_ts_is_not_importable_outside_workers() -> None:
    """marserve installs no top-level ``ts``: outside a worker, ``import ts`` finds TorchServe or nothing."""
    assert os.path.isdir(os.path.join(handlers.COMPAT_PATH, "ts", "torch_handler"))
    probe = "import importlib.util, handlers; spec = importlib.util.find_spec('ts'); print(spec and spec.origin)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    assert handlers.COMPAT_PATH not in result.stdout


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("image_classifier", "ImageClassifier"),
        ("image_segmenter", "ImageSegmenter"),
        ("object_detector", "ObjectDetector"),
        ("vision_handler", "VisionHandler"),
        ("base_handler", "BaseHandler"),
    ],
)
def test_builtin_names_load_through_ts_torch_handler(name: str, cls: str) -> None:
    # The loader finds exactly one class defined in the module it imports: the shim must not hide it.
    initialize, entry = load_handler(name)
    assert type(entry.__self__).__name__ == cls  # type: ignore[attr-defined]
    assert sys.modules[f"ts.torch_handler.{name}"] is sys.modules[f"handlers.{name}"]


@pytest.fixture
def in_model_dir(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """model_dir as a worker sets it up: the cwd and first on sys.path."""
    monkeypatch.chdir(model_dir)
    monkeypatch.syspath_prepend(str(model_dir))
    yield model_dir


def test_digits_example_runs_unchanged(in_model_dir: Path) -> None:
    for name in ("digits_handler.py", "model.py", "digits.pt", "index_to_name.json"):
        shutil.copy(DIGITS / name, in_model_dir / name)
    manifest_model = {"serializedFile": "digits.pt", "modelFile": "model.py", "handler": "digits_handler.py"}
    context = make_context(in_model_dir, manifest_model)
    initialize, entry = load_handler("digits_handler.py")
    initialize(context)
    handler: Any = entry.__self__  # type: ignore[attr-defined]
    samples = sorted((DIGITS / "samples").glob("digit_*.png"))
    assert len(samples) == 10
    data = [{"data": bytearray(path.read_bytes())} for path in samples]
    out = run_batch(handler, context, data)
    truth = [path.stem.split("_")[1] for path in samples]
    assert [next(iter(prediction)) for prediction in out] == truth
    for prediction in out:
        assert len(prediction) == 5 and list(prediction.values()) == sorted(prediction.values(), reverse=True)
    # One at a time too, as base64 text.
    for path, label in zip(samples[:3], truth):
        single = run_batch(handler, context, [{"body": base64.b64encode(path.read_bytes()).decode()}])
        assert next(iter(single[0])) == label


def test_function_handler(in_model_dir: Path) -> None:
    write_model_file(
        in_model_dir,
        """
        from ts.utils.util import PredictionException


        def handle(data, context):
            if data is None:
                return None
            if any(row.get("body") == "fail" for row in data):
                raise PredictionException("asked to fail", 422)
            return [{"echo": row.get("body"), "model": context.model_name} for row in data]
        """,
        name="fn_handler.py",
    )
    context = make_context(in_model_dir, {})
    initialize, entry = load_handler("fn_handler.py")
    initialize(context)
    assert entry([{"body": "hi"}], context) == [{"echo": "hi", "model": "m"}]
    from handlers.errors import PredictionException

    with pytest.raises(PredictionException) as info:
        entry([{"body": "fail"}], context)
    assert info.value.error_code == 422


def test_torchserve_style_custom_handler(in_model_dir: Path) -> None:
    """The usual TorchServe pattern: subclass BaseHandler, override the steps, set statuses, use metrics."""
    write_model_file(
        in_model_dir,
        """
        import torch
        from torch import nn


        class Doubler(nn.Module):
            def forward(self, x):
                return x * 2
        """,
    )
    write_model_file(
        in_model_dir,
        """
        import json

        import torch
        from ts.torch_handler.base_handler import BaseHandler


        class JsonDoubler(BaseHandler):
            def preprocess(self, data):
                values = [json.loads(row.get("data") or row.get("body"))["x"] for row in data]
                return torch.tensor(values, dtype=torch.float32)

            def postprocess(self, data):
                for idx in range(len(data)):
                    self.context.set_response_content_type(idx, "application/json")
                if self.context.metrics is not None:
                    self.context.metrics.add_counter("Doubled", len(data))
                return [{"y": value} for value in data.tolist()]
        """,
        name="json_handler.py",
    )
    context = make_context(in_model_dir, {"modelFile": "model.py"})  # eager without weights: the class's own
    initialize, entry = load_handler("json_handler.py")
    initialize(context)
    data = [{"body": bytearray(b'{"x": 1.5}')}, {"data": bytearray(b'{"x": -2}')}]
    out = run_batch(entry.__self__, context, data)  # type: ignore[attr-defined]
    assert out == [{"y": 3.0}, {"y": -4.0}]
    assert context.get_response_content_type(1) == "application/json"


def test_image_classifier_by_name_with_torchscript(in_model_dir: Path) -> None:
    """``--handler image_classifier`` with a TorchScript model, as the worker loads it."""
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model.eval(), torch.zeros(1, 3, 224, 224)).save(str(in_model_dir / "model.pt"))
    context: Any = make_context(in_model_dir, {"serializedFile": "model.pt"})
    initialize, entry = load_handler("image_classifier")
    initialize(context)
    out = run_batch(entry.__self__, context, [{"body": encode(sample_image(), "JPEG")}])  # type: ignore[attr-defined]
    assert sorted(out[0]) == ["0", "1", "2", "3"] and sum(out[0].values()) == pytest.approx(1.0)
