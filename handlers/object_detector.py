"""ObjectDetector (``--handler object_detector``): boxes scoring at least ``threshold``, with labels."""

from __future__ import annotations

from typing import Any

import torch

from handlers import images
from handlers.utils import label_for
from handlers.vision_handler import VisionHandler


class ObjectDetector(VisionHandler):
    """Images go in as they are (ToTensor only); per request a list of ``{label: [x1, y1, x2, y2], "score": s}``.

    The model returns one ``{"boxes", "labels", "scores"}`` dict per image, as torchvision's
    detection models do.
    """

    stages_thread_safe = True  # per-batch state is per thread (BaseHandler); the rest is read-only

    threshold = 0.5
    image_processing = images.compose(images.TO_TENSOR)
    _fast_path = images.TO_TENSOR

    def collate(self, tensors: list[torch.Tensor]) -> Any:
        """Images of one size are stacked; otherwise the model gets a list, which detection models take."""
        if len({t.shape for t in tensors}) == 1:
            return torch.stack(tensors).to(self.device)
        return [t.to(self.device) for t in tensors]

    def postprocess(self, data: Any) -> list[list[dict[str, Any]]]:
        result = []
        for detections in data:
            keep = detections["scores"] >= self.threshold
            boxes = detections["boxes"][keep].tolist()
            labels = detections["labels"][keep].tolist()
            scores = detections["scores"][keep].tolist()
            result.append(
                [
                    {label_for(self.mapping, label): box, "score": score}
                    for label, box, score in zip(labels, boxes, scores)
                ]
            )
        return result
