"""The built-in vision handlers: inputs, per-request failures, decompression bombs and output formats."""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision import transforms

from handlers import images
from handlers.image_classifier import ImageClassifier
from handlers.image_segmenter import ImageSegmenter
from handlers.object_detector import ObjectDetector
from tests.handlers.conftest import b64, encode, make_context, run_batch, sample_image, write_model_file

CLASSIFIER = """
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            assert x.shape[1:] == (3, 224, 224), x.shape
            return x.mean(dim=(1, 2, 3)).unsqueeze(1) * 0 + self.bias
"""

SEGMENTER = """
    import torch
    from torch import nn


    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return {"out": self.conv(x), "aux": None}
"""

DETECTOR = """
    import torch
    from torch import nn


    class FakeDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def forward(self, images):
            self.shapes = [tuple(image.shape) for image in images]
            return [
                {
                    "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 8.0, 8.0]]),
                    "labels": torch.tensor([1, 2, 3]),
                    "scores": torch.tensor([0.9, 0.4, 0.6]),
                }
                for _ in images
            ]
"""

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _classifier(model_dir: Path, **context: Any) -> ImageClassifier:
    torch.save({"bias": torch.arange(10.0) * 0.5}, model_dir / "tiny.pt")
    labels = {str(i): [f"n{i:04d}", name] for i, name in enumerate(NAMES)}
    (model_dir / "index_to_name.json").write_text(json.dumps(labels))
    handler = ImageClassifier()
    model = {"modelFile": write_model_file(model_dir, CLASSIFIER), "serializedFile": "tiny.pt"}
    handler.initialize(make_context(model_dir, model, **context))
    return handler


def _statuses(handler: Any, count: int) -> list[int]:
    return [handler.context.get_response_status(i)[0] for i in range(count)]


def _bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares ``width`` x ``height`` 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_top5_labels_in_descending_order(model_dir: Path) -> None:
    handler = _classifier(model_dir)
    out = run_batch(handler, handler.context, [{"data": bytearray(encode(sample_image(), "JPEG"))}])
    expected = torch.softmax(torch.arange(10.0) * 0.5, 0)
    assert list(out[0]) == ["nine", "eight", "seven", "six", "five"]  # last element of list labels
    assert list(out[0].values()) == pytest.approx(expected[[9, 8, 7, 6, 5]].tolist())


def test_inputs_jpeg_png_webp_bytes_and_base64(model_dir: Path) -> None:
    handler = _classifier(model_dir)
    image = sample_image(300, 200)
    png = encode(image, "PNG")
    inputs = [
        {"body": bytearray(encode(image, "JPEG", quality=95))},
        {"body": bytearray(png)},
        {"body": bytearray(encode(image, "WEBP", lossless=True))},
        {"body": b64(png)},  # text/plain bodies arrive as str
        {"data": "data:image/png;base64," + b64(png)},
        {"body": b64(png)[:40] + "\n" + b64(png)[40:]},  # wrapped base64
    ]
    batch = handler.preprocess(inputs)
    assert batch.shape == (6, 3, 224, 224) and batch.dtype == torch.float32
    # Within about one uint8 level (1/255/std) of torchvision's PIL pipeline on the same decoded image.
    for tensor, row in zip(batch[:3], inputs):
        reference = images.compose(images.IMAGENET)(Image.open(io.BytesIO(row["body"])))
        assert (tensor - reference).abs().max() < 0.05
        assert (tensor - reference).abs().mean() < 0.005
    assert torch.equal(batch[1], batch[2]) and torch.equal(batch[1], batch[3])  # lossless formats agree
    out = run_batch(handler, handler.context, inputs)
    assert _statuses(handler, 6) == [200] * 6 and all(list(o) == list(out[0]) for o in out)


def test_grayscale_rgba_and_palette_images_become_rgb(model_dir: Path) -> None:
    handler = _classifier(model_dir)
    kinds = (("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"))
    inputs = [{"body": encode(sample_image(mode=mode), fmt)} for mode, fmt in kinds]
    out = run_batch(handler, handler.context, inputs)
    assert _statuses(handler, 3) == [200, 200, 200] and all(len(o) == 5 for o in out)


def test_corrupt_image_fails_only_its_request(model_dir: Path) -> None:
    handler = _classifier(model_dir)
    data = [
        {"body": bytearray(encode(sample_image(seed=1), "JPEG"))},
        {"body": bytearray(b"this is not an image at all")},
        {"body": bytearray(encode(sample_image(seed=2), "PNG"))},
    ]
    out = run_batch(handler, handler.context, data)
    assert _statuses(handler, 3) == [200, 400, 200]
    assert list(out[0]) == list(out[2]) == ["nine", "eight", "seven", "six", "five"]
    assert out[1]["code"] == 400 and "not a decodable image" in out[1]["message"]
    assert handler.context.get_response_status(1)[1] == out[1]["message"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (encode(sample_image(), "JPEG")[:2000], "JPEG data is corrupt or truncated"),
        ("not base64 at all!", "not valid base64"),
        (bytearray(), "carries no image"),
        ({"json": "object"}, "unsupported input: a JSON dict"),
        (encode(sample_image(), "PPM"), "accepted: JPEG, PNG, WEBP"),
        ([[1.0, 2.0], [3.0]], "not an array of numbers"),
    ],
)
def test_bad_inputs_are_400_naming_the_problem(model_dir: Path, payload: Any, message: str) -> None:
    handler = _classifier(model_dir)
    good = {"body": encode(sample_image(), "PNG")}
    out = run_batch(handler, handler.context, [good, {"body": payload}])
    assert _statuses(handler, 2) == [200, 400]
    assert message in out[1]["message"]
    assert len(out[0]) == 5


def test_all_requests_bad(model_dir: Path) -> None:
    handler = _classifier(model_dir)
    out = run_batch(handler, handler.context, [{"body": b"x"}, {"body": b"y"}])
    assert _statuses(handler, 2) == [400, 400] and [o["code"] for o in out] == [400, 400]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [20000, 10000])  # past Pillow's own 2x error; between its 1x warning and 2x
def test_decompression_bomb_is_refused(model_dir: Path, side: int) -> None:
    handler = _classifier(model_dir)
    bomb = _bomb_png(side, side)
    assert len(bomb) < 2000
    out = run_batch(handler, handler.context, [{"body": bomb}, {"body": encode(sample_image(), "JPEG")}])
    assert _statuses(handler, 2) == [413, 200]
    assert "decompression bomb" in out[0]["message"] and "limit_max_image_pixels" in out[0]["message"]


def test_limit_max_image_pixels_false_lifts_the_limit(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    _classifier(model_dir, limit_max_image_pixels=False)
    assert Image.MAX_IMAGE_PIXELS is None


def test_decoding_threads_give_the_same_batch(model_dir: Path) -> None:
    handler = _classifier(model_dir)
    data = [{"body": encode(sample_image(seed=s), "JPEG")} for s in range(5)]
    handler.decode_threads = 1
    sequential = handler.preprocess(data)
    handler.decode_threads = 4
    assert torch.equal(handler.preprocess(data), sequential)


def test_only_images_big_enough_are_decoded_in_threads(model_dir: Path) -> None:
    # Handing an image to a pool thread costs more than decoding a tiny one, so small batches stay in
    # the calling thread; a handler's or the model YAML's explicit decode_threads always stands.
    handler = _classifier(model_dir)
    seen: list[str] = []
    decode = handler._decode

    def recording_decode(row: Any, spec: Any) -> Any:
        seen.append(threading.current_thread().name)
        return decode(row, spec)

    handler._decode = recording_decode  # type: ignore[method-assign]
    tiny = [{"body": encode(sample_image(8, 8, seed=s), "PNG")} for s in range(4)]
    big = [{"body": encode(sample_image(seed=s), "JPEG")} for s in range(4)]
    assert all(len(row["body"]) < images.PARALLEL_DECODE_MIN_BYTES for row in tiny)
    assert all(len(row["body"]) > images.PARALLEL_DECODE_MIN_BYTES for row in big)
    caller = threading.current_thread().name

    handler.preprocess(tiny)
    assert seen == [caller] * 4
    seen.clear()
    handler.decode_threads = 2
    handler.preprocess(tiny)
    assert caller not in seen and len(seen) == 4
    seen.clear()
    handler.decode_threads = None
    handler.preprocess(big)
    if images.default_decode_threads() > 1:
        assert caller not in seen and len(seen) == 4
    else:
        assert seen == [caller] * 4


def test_segmenter_output(model_dir: Path) -> None:
    handler = ImageSegmenter()
    handler.initialize(make_context(model_dir, {"modelFile": write_model_file(model_dir, SEGMENTER)}))
    data = [{"body": encode(sample_image(seed=s), "PNG")} for s in range(2)]
    out = run_batch(handler, handler.context, data)
    assert len(out) == 2 and len(out[0]) == 224 and len(out[0][0]) == 224 and len(out[0][0][0]) == 2
    with torch.inference_mode():
        probs = torch.softmax(handler.model(handler.preprocess(data))["out"], dim=1)
    values, indices = probs.max(dim=1)
    got = torch.tensor(out)
    assert torch.equal(got[..., 0], indices.float())
    torch.testing.assert_close(got[..., 1], values)


def test_object_detector_output(model_dir: Path) -> None:
    (model_dir / "index_to_name.json").write_text(json.dumps({"1": "cat", "2": "dog"}))
    handler = ObjectDetector()
    handler.initialize(make_context(model_dir, {"modelFile": write_model_file(model_dir, DETECTOR)}))
    data = [
        {"body": encode(sample_image(64, 48), "JPEG")},
        {"body": b"junk"},
        {"body": encode(sample_image(40, 30), "PNG")},
    ]
    out = run_batch(handler, handler.context, data)
    assert _statuses(handler, 3) == [200, 400, 200]
    expected = [
        {"cat": [0.0, 0.0, 10.0, 10.0], "score": pytest.approx(0.9)},
        {"3": [2.0, 2.0, 8.0, 8.0], "score": pytest.approx(0.6)},  # no label for class 3: its index
    ]
    assert out[0] == expected and out[2] == expected
    # Images of different sizes reach the model as a list, unresized, scaled to [0, 1].
    assert handler.model.shapes == [(3, 48, 64), (3, 30, 40)]
    batch = handler.preprocess([{"body": encode(sample_image(64, 48), "PNG")}])
    torch.testing.assert_close(batch[0], images.compose(images.TO_TENSOR)(sample_image(64, 48)))


def test_subclass_transforms_get_the_pil_image(model_dir: Path) -> None:
    seen = []

    class Custom(ImageClassifier):
        image_processing = transforms.Lambda(lambda image: seen.append(image.mode) or torch.zeros(3, 224, 224))

    handler = Custom()
    torch.save({"bias": torch.arange(10.0)}, model_dir / "tiny.pt")
    model = {"modelFile": write_model_file(model_dir, CLASSIFIER), "serializedFile": "tiny.pt"}
    handler.initialize(make_context(model_dir, model))
    run_batch(handler, handler.context, [{"body": encode(sample_image(mode="L"), "PNG")}])
    assert seen == ["L"]  # as decoded: a handler's own transforms get no RGB conversion


def test_mangled_images_never_fail_the_batch(model_dir: Path) -> None:
    """Bytes flipped, cut or spliced anywhere in a JPEG, PNG or WebP: a 4xx or a prediction, never a 5xx."""
    handler = _classifier(model_dir)
    rng = torch.Generator().manual_seed(0)
    originals = [encode(sample_image(96, 64), fmt) for fmt in ("JPEG", "PNG", "WEBP")]
    data = []
    for i in range(36):
        raw = bytearray(originals[i % 3])
        for _ in range(1 + i % 4):
            at = int(torch.randint(0, len(raw), (1,), generator=rng))
            raw[at] = int(torch.randint(0, 256, (1,), generator=rng))
        if i % 5 == 0:
            raw = raw[: len(raw) * 2 // 3]
        data.append({"body": raw})
    data.append({"body": originals[0]})
    out = run_batch(handler, handler.context, data)
    statuses = _statuses(handler, len(data))
    assert statuses[-1] == 200 and set(statuses) <= {200, 400}
    assert all(("message" in o) == (s == 400) for o, s in zip(out, statuses))
