"""A TorchServe-style MNIST classifier, archived by the real torch-model-archiver 0.12, served by marserve.

examples/digits is written the way TorchServe's own MNIST example is: a handler that subclasses
``ts.torch_handler.image_classifier.ImageClassifier`` with its own transforms, a model file and a
state_dict. Nothing in it knows about marserve.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SAMPLES = sorted((DIGITS / "samples").glob("digit_*.png"))


@pytest.fixture(scope="module")
def served(start_module_server: ServerFactory) -> Server:
    server = start_module_server(name="mnist")
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run(
        [
            str(archiver), "--model-name", "mnist", "--version", "1.0",
            "--model-file", str(DIGITS / "model.py"), "--serialized-file", str(DIGITS / "digits.pt"),
            "--handler", str(DIGITS / "digits_handler.py"), "--extra-files", str(DIGITS / "index_to_name.json"),
            "--export-path", str(server.store),
        ],
        check=True, cwd=server.root, env={**os.environ, "TMPDIR": str(server.tmp)},
    )  # fmt: skip
    reply = server.register("mnist.mar", batch_size=4, max_batch_delay=20)
    assert reply.status_code == 200, reply.text
    return server


def test_ten_samples() -> None:
    assert len(SAMPLES) == 10


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_raw_upload_predicts_the_true_label(served: Server, sample: Path) -> None:
    response = served.http.put(f"{served.inference}/predictions/mnist", content=sample.read_bytes())
    assert response.status_code == 200, response.text
    scores = response.json()
    truth = sample.stem.removeprefix("digit_")
    assert next(iter(scores)) == truth
    # Top-5, in descending order of probability, as TorchServe's ImageClassifier returns them.
    assert len(scores) == 5
    assert list(scores.values()) == sorted(scores.values(), reverse=True)


@pytest.mark.parametrize("sample", SAMPLES[:3], ids=lambda p: p.stem)
def test_multipart_upload_predicts_the_true_label(served: Server, sample: Path) -> None:
    response = served.http.post(
        f"{served.inference}/predictions/mnist", files={"data": (sample.name, sample.read_bytes(), "image/png")}
    )
    assert response.status_code == 200, response.text
    assert next(iter(response.json())) == sample.stem.removeprefix("digit_")


def test_explanations_are_integrated_gradients_with_captum(served: Server) -> None:
    response = served.http.post(f"{served.inference}/explanations/mnist", content=SAMPLES[3].read_bytes())
    assert response.status_code == 200, response.text
    # One attribution per input pixel: 1 channel of 8x8, as the model sees the image.
    attributions = response.json()
    assert len(attributions) == 1 and len(attributions[0]) == 8 and all(len(row) == 8 for row in attributions[0])


def test_explanations_without_captum_say_what_is_missing(start_server: ServerFactory, tmp_path: Path) -> None:
    # A captum that cannot be imported, ahead of the installed one on the workers' path.
    shadow = tmp_path / "shadow" / "captum"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('captum is not here')\n")
    server = start_server(env={"PYTHONPATH": str(shadow.parent)}, name="nocaptum")
    archiver = Path(sys.executable).parent / "model-archiver"
    subprocess.run(
        [
            str(archiver), "--model-name", "mnist", "--version", "1.0",
            "--model-file", str(DIGITS / "model.py"), "--serialized-file", str(DIGITS / "digits.pt"),
            "--handler", str(DIGITS / "digits_handler.py"), "--extra-files", str(DIGITS / "index_to_name.json"),
            "--export-path", str(server.store),
        ],
        check=True,
    )  # fmt: skip
    assert server.register("mnist.mar").status_code == 200
    response = server.http.post(f"{server.inference}/explanations/mnist", content=SAMPLES[3].read_bytes())
    assert response.status_code == 501
    body = response.json()
    assert body["type"] == "MissingDependencyException"
    assert "captum" in body["message"] and "marserve[explain]" in body["message"]
    # Predictions are not affected.
    assert server.http.post(f"{server.inference}/predictions/mnist", content=SAMPLES[3].read_bytes()).status_code == 200
