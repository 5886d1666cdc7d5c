"""ImageClassifier (``--handler image_classifier``): softmax over the classes, top 5 as ``{label: prob}``."""

from __future__ import annotations

from typing import Any

import torch

from handlers import images
from handlers.utils import map_class_to_label, timed
from handlers.vision_handler import VisionHandler


class ImageClassifier(VisionHandler):
    """Resize 256, centre-crop 224, ImageNet normalisation; answers the ``topk`` most likely labels.

    Override ``image_processing`` (applied to a PIL image) for other inputs, as in TorchServe;
    labels come from ``index_to_name.json``, else the class index.
    """

    stages_thread_safe = True  # per-batch state is per thread (BaseHandler); the rest is read-only

    topk = 5
    image_processing = images.compose(images.IMAGENET)
    _fast_path = images.IMAGENET

    def set_max_result_classes(self, topk: int) -> None:
        self.topk = topk

    def get_max_result_classes(self) -> int:
        return self.topk

    @timed
    def postprocess(self, data: Any) -> list[dict[str, float]]:
        """Per request, ``{label: probability}`` for the top ``topk`` classes, most likely first."""
        probabilities = torch.softmax(data, dim=1)
        # A model with fewer classes than topk answers all of them rather than failing.
        probs, classes = torch.topk(probabilities, min(self.topk, probabilities.shape[1]), dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())
