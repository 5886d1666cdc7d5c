"""``ts.torch_handler.object_detector``: marserve's handlers.object_detector (see the package docstring for the alias)."""

import sys

from handlers import object_detector as _marserve_module
from handlers.object_detector import ObjectDetector

sys.modules[__name__] = _marserve_module

__all__ = ["ObjectDetector"]
