"""``ts.torch_handler.object_detector``: an alias of ``handlers.object_detector`` (see the package docstring)."""

import sys

from handlers import object_detector as _marserve_module
from handlers.object_detector import ObjectDetector

sys.modules[__name__] = _marserve_module

__all__ = ["ObjectDetector"]
