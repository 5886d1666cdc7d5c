"""VisionHandler: images in (bytes, base64 text or JSON arrays), one batch tensor out.

Requests are decoded in parallel threads, each on its own: an undecodable image, or one over
the pixel limit, fails only its request (4xx) while the rest of the batch is served. A handler's
``image_processing`` is applied to the decoded PIL image as in TorchServe; the built-in handlers'
own transforms run on tensors instead (handlers/images.py), which is faster and uses the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from handlers import images
from handlers.base_handler import BaseHandler
from handlers.errors import MissingDependency
from handlers.images import FastPath, RequestError
from handlers.utils import timed

logger = logging.getLogger(__name__)


class VisionHandler(BaseHandler):
    """Base class of the image handlers; a subclass sets ``image_processing`` (PIL image -> tensor)."""

    stages_thread_safe = True  # per-batch state is per thread (BaseHandler); the rest is read-only

    #: Pillow formats accepted (None: any Pillow reads).
    image_formats: tuple[str, ...] | None = images.DEFAULT_FORMATS
    #: Decoding threads; None: the model YAML's ``handler: {decode_threads: N}``, else up to 8 for
    #: batches of images big enough to gain from them (images.worth_parallel_decoding).
    decode_threads: int | None = None
    #: PIL image -> tensor; the built-in handlers and TorchServe's subclasses set it.
    image_processing: Callable[[Any], Any]
    #: The tensor twin of the built-in ``image_processing``; used only while that is not overridden.
    _fast_path: FastPath | None = None

    def __init__(self) -> None:
        super().__init__()
        self.ig: Any = None

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        if not context.system_properties.get("limit_max_image_pixels", True):
            # Process-wide, as in TorchServe: a worker serves one model.
            Image.MAX_IMAGE_PIXELS = None

    @timed
    def preprocess(self, data: list[Any]) -> Any:
        """Decode each request, transform it, and stack the batch on the model's device."""
        spec = self._active_fast_path()
        rows = list(data)
        threads = self._decode_threads(rows) if len(rows) > 1 else 1
        if threads > 1:
            decoded = list(images.decode_pool(threads).map(lambda row: self._decode(row, spec), rows))
        else:
            decoded = [self._decode(row, spec) for row in rows]
        tensors = []
        for idx, item in enumerate(decoded):
            if isinstance(item, RequestError):
                self.reject_request(idx, item.message, item.code)
            elif isinstance(item, torch.Tensor):
                tensors.append(item.to(self.device))
            elif spec is not None:
                assert self.device is not None  # set by initialize()
                tensors.append(images.resize_crop(images.to_tensor_uint8(item, self.device), spec))
            else:
                # The handler's own transforms run here, in order and in one thread, as TorchServe runs them.
                tensors.append(self.image_processing(item))
        if not tensors:
            return None
        return self._batch(tensors, spec)

    def _decode(self, row: Any, spec: FastPath | None) -> Image.Image | torch.Tensor | RequestError:
        # Runs in a decoding thread: Pillow work only, errors returned rather than raised.
        try:
            value = images.image_input(row)
            if isinstance(value, list):
                return self._row_tensor(value)
            image = images.open_image(value, self.image_formats)
            # The built-in transforms expect 3 channels; a handler's own transforms get the image as decoded.
            return images.to_rgb(image) if spec is not None else image
        except RequestError as exc:
            return exc

    def _batch(self, tensors: list[torch.Tensor], spec: FastPath | None) -> Any:
        if spec is not None:
            if all(t.dtype == torch.uint8 for t in tensors) and len({t.shape for t in tensors}) == 1:
                return images.finish_batch(torch.stack(tensors), spec)
            tensors = [images.finish_batch(t.unsqueeze(0), spec)[0] if t.dtype == torch.uint8 else t for t in tensors]
        return self.collate(tensors)

    def collate(self, tensors: list[torch.Tensor]) -> Any:
        """The model's input from per-request tensors: stacked into one batch on the device."""
        return torch.stack(tensors).to(self.device)

    def _active_fast_path(self) -> FastPath | None:
        spec = self._fast_path
        if spec is None or getattr(self, "image_processing", None) is not images.compose(spec):
            return None
        return spec

    def _decode_threads(self, rows: list[Any]) -> int:
        threads = self.decode_threads
        if threads is None:
            section = (self.model_yaml_config or {}).get("handler")
            threads = section.get("decode_threads") if isinstance(section, dict) else None
        if threads is not None:
            return max(1, int(threads))
        return images.default_decode_threads() if images.worth_parallel_decoding(rows) else 1

    def get_insights(self, tensor_data: Any, _: Any, target: Any = 0) -> Any:
        """Integrated-gradients attributions of the batch (needs captum, imported on first use)."""
        if self.ig is None:
            try:
                from captum.attr import IntegratedGradients
            except ImportError:
                raise MissingDependency(
                    "explanations need captum, which is not installed on the server (pip install 'marserve[explain]')",
                    501,
                ) from None
            self.ig = IntegratedGradients(self.model)
        return self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()
