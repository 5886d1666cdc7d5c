"""ImageSegmenter (``--handler image_segmenter``): the most likely class of every pixel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from handlers import images
from handlers.vision_handler import VisionHandler


class ImageSegmenter(VisionHandler):
    """Input as ImageClassifier; per request an H x W x 2 list of ``[class index (float), probability]``.

    Takes the model's output tensor ``out`` (torchvision's segmentation models return a dict), or
    a plain N x K x H x W tensor.
    """

    stages_thread_safe = True  # per-batch state is per thread (BaseHandler); the rest is read-only

    image_processing = images.compose(images.IMAGENET)
    _fast_path = images.IMAGENET

    def postprocess(self, data: Any) -> list[Any]:
        logits = data["out"] if isinstance(data, Mapping) else data
        # max(softmax) == exp(max - logsumexp): the same numbers without an N x K x H x W softmax.
        best, classes = logits.max(dim=1)
        probs = torch.exp(best - torch.logsumexp(logits, dim=1))
        return torch.stack([classes.to(probs.dtype), probs], dim=3).tolist()
