"""Turning one request's payload into an image, and the built-in transforms done on tensors.

Decoding is per request so that a bad image can fail alone (RequestError). The built-in
handlers' torchvision pipelines (Resize, CenterCrop, ToTensor, Normalize on a PIL image) are
reproduced on uint8 tensors: the resize runs on the model's device, the float conversion and
normalisation run once for the whole batch. Results stay within one uint8 level of the PIL path.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms.v2 import functional as F

# Defined where importing them costs no torchvision (BaseHandler needs them); named here too.
from handlers.errors import RequestError as RequestError
from handlers.utils import payload as payload

# Formats that are plain raster images decoded by Pillow's own or well-fuzzed libraries; others
# (EPS runs Ghostscript, for one) are no input for a model server. None on a handler allows all.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

class FastPath(NamedTuple):
    """Resize(resize) -> CenterCrop(crop) -> ToTensor -> Normalize(mean, std); None skips a step."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


IMAGENET = FastPath(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TO_TENSOR = FastPath()


@functools.cache
def compose(spec: FastPath) -> transforms.Compose:
    """The torchvision pipeline a FastPath stands for; cached, so handlers can tell it by identity."""
    steps: list[Any] = []
    if spec.resize is not None:
        steps.append(transforms.Resize(spec.resize))
    if spec.crop is not None:
        steps.append(transforms.CenterCrop(spec.crop))
    steps.append(transforms.ToTensor())
    if spec.mean is not None and spec.std is not None:
        steps.append(transforms.Normalize(mean=list(spec.mean), std=list(spec.std)))
    return transforms.Compose(steps)


def image_input(row: Any) -> bytes | bytearray | memoryview | list[Any]:
    """Image bytes (base64 text decoded), or a JSON list that is already a tensor."""
    value = payload(row)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # a data: URL, as browsers produce
            text = text.split(",", 1)[1]
        # Line breaks are dropped (base64(1) wraps at 76 columns); anything else foreign is an error
        # here rather than silently skipped, so the message says "base64" and not "corrupt image".
        text = "".join(text.split())
        try:
            value = base64.b64decode(text, altchars=b"-_" if ("-" in text or "_" in text) else None, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("the input is text but not valid base64 (send image bytes or base64 of them)") from None
    if isinstance(value, (bytes, bytearray, memoryview, list)):
        if len(value) == 0:
            raise RequestError("the request carries no image: its 'data' or 'body' is empty")
        return value
    if value is None:
        raise RequestError("the request carries no image: it has no 'data' or 'body' input")
    raise RequestError(f"unsupported input: a JSON {type(value).__name__} (send image bytes or a base64 string)")


def open_image(raw: bytes | bytearray | memoryview, formats: Sequence[str] | None = DEFAULT_FORMATS) -> Image.Image:
    """Decode completely (so corrupt data fails here, not in a transform), refusing decompression bombs."""
    try:
        image = Image.open(io.BytesIO(raw), formats=None if formats is None else tuple(formats))
    except Image.DecompressionBombError as exc:
        message = f"image refused as a possible decompression bomb: {exc} (limit_max_image_pixels)"
        raise RequestError(message, 413) from None
    except UnidentifiedImageError:
        kinds = ", ".join(formats) if formats else "any format Pillow reads"
        raise RequestError(f"the input is not a decodable image (accepted: {kinds}; or base64 of one)") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's plugins raise all sorts (struct.error, IndexError...) on bad data
        raise RequestError(f"the image header is corrupt: {type(exc).__name__}: {exc}") from None
    # Pillow only warns between 1x and 2x its limit; a server should refuse there too.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise RequestError(
            f"image refused as a possible decompression bomb: {width}x{height} is {width * height} pixels, "
            f"over the limit of {limit} (limit_max_image_pixels)",
            413,
        )
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise RequestError(f"the {image.format or 'image'} data is corrupt or truncated: {exc}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB (grayscale, palette, alpha and CMYK images are converted; alpha is dropped)."""
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:
        raise RequestError(f"a {image.mode} image cannot be converted to RGB: {exc}") from None


def to_tensor_uint8(image: Image.Image, device: torch.device) -> torch.Tensor:
    """An RGB uint8 CHW tensor on ``device``: one copy out of Pillow, the layout stays channels-last."""
    array = np.asarray(to_rgb(image))
    with warnings.catch_warnings():
        # Pillow hands out a read-only buffer; nothing writes to this tensor, later steps make new ones.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.permute(2, 0, 1).to(device)


def resize_crop(image: torch.Tensor, spec: FastPath) -> torch.Tensor:
    """Resize the shorter side then centre-crop, as torchvision's PIL transforms would."""
    if spec.resize is not None:
        image = F.resize(image, [spec.resize], antialias=True)
    if spec.crop is not None:
        image = F.center_crop(image, [spec.crop])
    return image


def finish_batch(batch: torch.Tensor, spec: FastPath) -> torch.Tensor:
    """uint8 NCHW -> float in [0, 1], normalised: one conversion and two in-place passes for the batch."""
    out = batch.to(torch.float32)
    if spec.mean is None or spec.std is None:
        return out.div_(255.0)
    # (x/255 - mean)/std folded into x*scale + shift.
    std = torch.tensor(spec.std, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    return out.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def default_decode_threads() -> int:
    """Threads for decoding a batch: Pillow releases the GIL while it decodes, so they run in parallel."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


#: Mean encoded size of a batch's images below which they are decoded in one thread. Handing an
#: image to a pool thread costs about 0.1 ms (measured on 2 cores); a 200-byte PNG decodes in less
#: than that, a 13 KB 256x256 JPEG in 0.7 ms.
PARALLEL_DECODE_MIN_BYTES = 4096


def worth_parallel_decoding(rows: Sequence[Any]) -> bool:
    """Whether a batch's images are, on average, big enough to be worth decoding in threads."""
    total = 0
    for row in rows:
        value = payload(row)
        if isinstance(value, (bytes, bytearray, memoryview, str)):
            total += len(value)
    return total >= PARALLEL_DECODE_MIN_BYTES * len(rows)


@functools.cache
def decode_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size for the process (a worker serves one model), made on first use."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="marserve-decode")
