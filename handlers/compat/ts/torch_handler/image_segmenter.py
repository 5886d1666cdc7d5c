"""``ts.torch_handler.image_segmenter``: an alias of ``handlers.image_segmenter`` (see the package docstring)."""

import sys

from handlers import image_segmenter as _marserve_module
from handlers.image_segmenter import ImageSegmenter

sys.modules[__name__] = _marserve_module

__all__ = ["ImageSegmenter"]
